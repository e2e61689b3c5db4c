"""An experiment's ``report.md`` as HTML for the site: escaped, and every link kept inside it.

Why: the site shows each report as it was written (its tables, figures and findings), so
the page and ``report.md`` cannot say different things. The text of a report comes from
many places (labels, folder names, error messages), so it is rendered by a CommonMark
renderer (markdown-it-py) with raw HTML off: everything is escaped. A site must work from a
zip, so a figure is shown only where it was copied into the site, and a relative link only
where it points at a file of the site; anything else becomes plain text saying so.
Headings get ids, and figures ``fig-<name>``, so a verdict can link to its evidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

_EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def slug(text: str) -> str:
    """An id for an anchor: lower-case words joined by hyphens ("Verdicts" -> "verdicts")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def figure_id(file_name: str) -> str:
    """The id of a figure on its page, from its file name."""
    return "fig-" + slug(file_name.rsplit(".", 1)[0])


@dataclass
class RenderedReport:
    html: Markup
    figures: list[str] = field(default_factory=list)  # the files shown, in order
    anchors: set[str] = field(default_factory=set)  # ids of the headings and figures


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def table_open(self, tokens, idx, options, env):  # wide tables scroll, not the page
        return '<div class="table-wrap">' + self.renderToken(tokens, idx, options, env)

    def table_close(self, tokens, idx, options, env):
        return self.renderToken(tokens, idx, options, env) + "</div>"

    md.add_render_rule("table_open", table_open)
    md.add_render_rule("table_close", table_close)
    return md


def _text(content: str) -> Token:
    token = Token("text", "", 0)
    token.content = content
    return token


def _police(children: list[Token], files: set[str], shown: list[str],
            anchors: set[str]) -> list[Token]:
    """The inline tokens with figures not in ``files`` replaced by a note, and links that
    lead outside the site unlinked (their text kept)."""
    kept, dropped_links = [], 0
    for token in children:
        if token.type == "image":
            src = str(token.attrGet("src") or "")
            if src in files:
                token.attrSet("id", figure_id(src))
                anchors.add(figure_id(src))
                shown.append(src)
                kept.append(token)
            else:
                alt = "".join(c.content for c in token.children or []) or src
                kept.append(_text(f"[figure not in the site: {alt}]"))
        elif token.type == "link_open":
            href = str(token.attrGet("href") or "")
            if href.startswith("#") or href in files:
                kept.append(token)
            elif _EXTERNAL.match(href):
                token.attrSet("rel", "noopener noreferrer")
                kept.append(token)
            else:
                dropped_links += 1  # its text stays; its link_close goes too
        elif token.type == "link_close" and dropped_links:
            dropped_links -= 1
        else:
            kept.append(token)
    return kept


def render_report(markdown: str, files: set[str], drop_title: bool = True) -> RenderedReport:
    """``markdown`` (a report) as escaped HTML in which only ``files`` (names of files copied
    beside the page) are shown or linked; with ``drop_title``, without its leading ``# title``
    (the page shows it)."""
    md = _markdown()
    tokens = md.parse(markdown)
    if drop_title and len(tokens) >= 3 and tokens[0].type == "heading_open" and tokens[0].tag == "h1":
        tokens = tokens[3:]  # heading_open, inline, heading_close
    shown: list[str] = []
    anchors: set[str] = set()
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            anchor, n = slug(tokens[i + 1].content), 2
            while anchor in anchors:
                anchor, n = f"{slug(tokens[i + 1].content)}-{n}", n + 1
            token.attrSet("id", anchor)
            anchors.add(anchor)
        if token.type == "inline" and token.children:
            token.children = _police(token.children, files, shown, anchors)
    return RenderedReport(Markup(md.renderer.render(tokens, md.options, {})), shown, anchors)
