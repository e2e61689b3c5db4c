"""The lab as a static site: every claim with its verdict, and every experiment with its report.

Why: people share results as a page. ``bnlab report --html`` (and ``bnlab lab``) writes one
folder that works from ``file://``, from ``python -m http.server`` and from a zip: no request
leaves it (no CDN, fonts or scripts), it reads without JavaScript, and it has a light and a
dark scheme. It is made from the experiments' own data, never by reading their markdown
back for facts: the verdict tables come from each ``findings.json`` (the objects the
reports were written from, so the index and the reports cannot disagree), the times from
``bnlab.experiments.costs`` and the lab's ``lab.json``, and each experiment's page renders
its ``report.md`` (``report_html``), with its figures and data files copied beside it.

Layout of the site::

    index.html        the claims (the chapter's, then those beyond it), then the experiments
    style.css
    <experiment>/index.html   its report, settings, times, the command that reproduces it
    <experiment>/*.png, results.jsonl, summary.csv, findings.json, report.md   copies

Copies are made of plain files only (a symbolic link is never followed), by names that
need no escaping in a URL; a page shows only what was copied.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bnlab import __version__
from bnlab.experiments import EXPERIMENTS
from bnlab.experiments.costs import (
    TIMES_EXPLAINED,
    Cost,
    CostUnknown,
    experiment_cost,
    total_cost,
)
from bnlab.experiments.findings import CONTRADICTED, SMOKE_TEST, SUPPORTED, UNRESOLVED, Verdict
from bnlab.experiments.report_html import figure_id, render_report, slug
from bnlab.experiments.sizing import format_duration
from bnlab.util.errors import BnlabError
from bnlab.util.io import read_json
from bnlab.util.provenance import utc_now

TEMPLATES = Path(__file__).resolve().parent / "templates"
MARKER = ".bnlab-site"
"""A file in every site folder: only such a folder (or an empty one) is replaced."""
LAB_RECORD = "lab.json"
DATA_FILES = ("results.jsonl", "summary.csv", "findings.json", "report.md")
FIGURE_SUFFIXES = (".png",)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CHAPTER_SOURCES = ("chapter", "d2l")
"""A verdict whose source names one of these is one of the chapter's claims; the others are
questions beyond it (papers the chapter cites or leads to)."""

NOT_RUN, SMOKE, DONE, FAILED, UNREADABLE = "not run yet", "smoke test", "done", "failed", "unreadable"
INCOMPLETE = "incomplete"  # analysed without some of its runs (their folders could not be used)
OUTCOME_CLASSES = {SUPPORTED: "supported", CONTRADICTED: "contradicted",
                   UNRESOLVED: "unresolved", SMOKE_TEST: "smoke"}


class SiteError(BnlabError):
    """The site cannot be written where it was asked to be."""


@dataclass
class Claim:
    """A row of the index's verdict table."""

    verdict: Verdict
    experiment: str
    evidence: str  # a link within the site

    @property
    def outcome_class(self) -> str:
        return OUTCOME_CLASSES.get(self.verdict.outcome, "unresolved")


@dataclass(frozen=True)
class LabCall:
    """What ``lab.json`` says of a call of the lab (or of one experiment in it), every field
    present whatever the file held."""

    wall_s: float | None
    status: str = ""
    error: str = ""
    date: str = ""
    command: str = ""
    machine: str = ""
    torch: str = ""
    threads: str = ""
    experiments: int = 0

    @classmethod
    def of_experiment(cls, entry: Any) -> LabCall | None:
        if not isinstance(entry, dict):
            return None
        return cls(_seconds(entry.get("wall_s")), str(entry.get("status", "")),
                   str(entry.get("error", "")), str(entry.get("date", "")),
                   str(entry.get("command", "")))

    @classmethod
    def of_call(cls, call: Any) -> LabCall | None:
        if not isinstance(call, dict):
            return None
        facts = call.get("provenance") if isinstance(call.get("provenance"), dict) else {}
        names = call.get("experiments") if isinstance(call.get("experiments"), list) else []
        return cls(_seconds(call.get("wall_s")), date=str(facts.get("date", "")),
                   command=str(call.get("command", "")), machine=str(facts.get("machine", "")),
                   torch=str(facts.get("torch", "")), threads=str(facts.get("threads", "")),
                   experiments=len(names))


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass
class Page:
    """What the site says about one experiment."""

    name: str
    title: str
    question: str
    status: str
    command: str  # the command that reproduces it (or runs it, when not run yet)
    note: str = ""  # why it failed or is unreadable
    findings: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    report: Any = ""  # Markup of the rendered report
    figures: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    anchors: set[str] = field(default_factory=set)
    cost: Cost | None = None
    cost_note: str = ""
    last_call: LabCall | None = None  # this experiment in the latest lab call that ran it
    settings: list[tuple[str, str]] = field(default_factory=list)  # as resolved for the grid

    @property
    def thumbnail(self) -> str | None:
        return self.figures[0] if self.figures else None

    @property
    def status_class(self) -> str:
        return slug(self.status)

    def evidence_link(self, evidence: str) -> str:
        """Where a verdict's evidence (a figure's file or a section's title) is on the page."""
        if evidence in self.figures:
            return f"{self.name}/index.html#{figure_id(evidence)}"
        if evidence and slug(evidence) in self.anchors:
            return f"{self.name}/index.html#{slug(evidence)}"
        return f"{self.name}/index.html" + ("#verdicts" if "verdicts" in self.anchors else "")


def is_chapter_claim(verdict: Verdict) -> bool:
    return any(word in verdict.source.lower() for word in CHAPTER_SOURCES)


def duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


# --------------------------------------------------------------------------- reading

def _regular(path: Path) -> bool:
    """A plain file (a symbolic link is not one, whatever it points at)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def copyable(folder: Path) -> list[Path]:
    """The files of an experiment's folder the site copies: its data files and PNG figures,
    plain files with safe names only."""
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if not SAFE_NAME.match(entry.name) or not _regular(path):
            continue
        if entry.name in DATA_FILES or (entry.name.endswith(FIGURE_SUFFIXES) and _is_png(path)):
            found.append(path)
    return found


def _verdicts(findings: dict[str, Any]) -> list[Verdict]:
    names = {f.name for f in dataclasses.fields(Verdict)}
    rows = findings.get("verdicts", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(r) <= names for r in rows):
        raise ValueError("its verdicts are not the verdicts bnlab writes")
    return [Verdict(**r) for r in rows]


def read_page(name: str, root: Path, lab: dict[str, Any]) -> tuple[Page, list[Path]]:
    """The page of experiment ``name`` from its folder under ``root`` (and ``lab``, the lab's
    record there), and the files to copy beside it."""
    experiment = EXPERIMENTS[name]
    folder = root / name
    entries = lab.get("experiments")
    last_call = LabCall.of_experiment(entries.get(name) if isinstance(entries, dict) else None)
    page = Page(name, experiment.title, experiment.question, NOT_RUN,
                shlex.join(["bnlab", "exp", name, "--out", str(root)]), last_call=last_call)
    if folder.is_symlink():
        page.status, page.note = UNREADABLE, f"{folder} is a symbolic link (not followed)"
        return page, []
    lab_failed = last_call is not None and last_call.status != "done"
    if lab_failed:  # said unless the experiment was analysed again since
        page.status = INCOMPLETE if last_call.status == INCOMPLETE else FAILED
        page.note = last_call.error
    if not _regular(folder / "findings.json"):
        return page, []
    try:
        findings = read_json(folder / "findings.json")
        if not isinstance(findings, dict):
            raise ValueError("expected a JSON object")
        page.verdicts = _verdicts(findings)
    except (OSError, ValueError, TypeError) as exc:
        page.status, page.note = UNREADABLE, f"findings.json: {exc}"
        return page, []
    page.findings = findings
    facts = findings.get("provenance") if isinstance(findings.get("provenance"), dict) else {}
    page.command = str(facts.get("command", page.command))
    if not (lab_failed and last_call.date >= str(facts.get("date", ""))):
        page.status, page.note = (SMOKE if findings.get("smoke_test") else DONE), ""
    settings = findings.get("settings")
    if isinstance(settings, dict):
        page.settings = [(str(k), str(v)) for k, v in settings.items()]
    files = copyable(folder)
    names = {p.name for p in files}
    text = ""
    if "report.md" in names:
        text = (folder / "report.md").read_bytes().decode("utf-8", errors="replace")
    rendered = render_report(text, names - set(DATA_FILES))
    page.report, page.figures, page.anchors = rendered.html, rendered.figures, rendered.anchors
    page.files = [n for n in DATA_FILES if n in names]
    try:
        page.cost = experiment_cost(folder, root / "runs")
    except CostUnknown as exc:
        page.cost_note = str(exc)
    return page, files


def read_lab(root: Path) -> dict[str, Any]:
    """The lab's record in ``root`` (``bnlab lab`` writes it), or an empty one."""
    path = root / LAB_RECORD
    if not _regular(path):
        return {}
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def find_pages(roots: list[Path]) -> tuple[list[tuple[Page, list[Path]]], LabCall | None]:
    """Every registered experiment's page, from the first root holding its folder, in the
    registry's order; and the latest lab call recorded in the first root that has one."""
    labs = {root: read_lab(root) for root in roots}
    pages = []
    for name in EXPERIMENTS:
        root = next((r for r in roots if (r / name / "findings.json").exists()), roots[0])
        pages.append(read_page(name, root, labs[root]))
    calls = next((lab["calls"] for lab in labs.values() if isinstance(lab.get("calls"), list)
                  and lab["calls"]), [None])
    return pages, LabCall.of_call(calls[-1])


# --------------------------------------------------------------------------- writing

def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = duration
    return env


def _claims(pages: list[Page]) -> tuple[list[Claim], list[Claim]]:
    chapter, beyond = [], []
    for page in pages:
        for v in page.verdicts:
            claim = Claim(v, page.name, page.evidence_link(v.evidence))
            (chapter if is_chapter_claim(v) else beyond).append(claim)
    return chapter, beyond


def tally(claims: list[Claim]) -> list[tuple[str, int, str]]:
    """(outcome, how many claims have it, its CSS class), in the order of ``OUTCOME_CLASSES``."""
    counts = [(o, sum(c.verdict.outcome == o for c in claims), css)
              for o, css in OUTCOME_CLASSES.items()]
    return [t for t in counts if t[1]]


def _prepare(out: Path) -> Path:
    """A new empty folder beside ``out`` to build into; SiteError where ``out`` is something
    the site must not replace."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SiteError(f"{out} exists and is not a folder: choose another --out for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SiteError(f"{out} is a folder that holds something other than a bnlab site: "
                        "choose another --out (an empty or new folder, or an earlier site)")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir()
    return building


def _swap_in(building: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``building`` folder (never a half-written site)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    building.rename(out)
    if old.exists():
        shutil.rmtree(old)


def build_site(roots: list[str | Path], out: str | Path) -> Path:
    """Write the site of the experiments found under ``roots`` (their output folders, as
    ``bnlab exp --out``) into the folder ``out`` (replacing an earlier site there); return
    ``out``."""
    roots, out = [Path(r) for r in roots], Path(out)
    found, last_call = find_pages(roots)
    pages = [page for page, _ in found]
    building = _prepare(out)
    try:
        env = _environment()
        shutil.copyfile(TEMPLATES / "style.css", building / "style.css")
        (building / MARKER).write_text("a folder written by bnlab report --html\n")
        for page, files in found:
            folder = building / page.name
            folder.mkdir()
            for path in files:
                shutil.copyfile(path, folder / path.name, follow_symlinks=False)
            (folder / "index.html").write_text(
                env.get_template("experiment.html.j2").render(
                    page=page, explained=TIMES_EXPLAINED, version=__version__, date=utc_now(),
                    base="../"), encoding="utf-8")
        chapter, beyond = _claims(pages)
        costs = [p.cost for p in pages if p.cost is not None]
        (building / "index.html").write_text(env.get_template("index.html.j2").render(
            pages=pages, chapter=chapter, beyond=beyond, last_call=last_call,
            tally=tally(chapter + beyond), ran=sum(p.status not in (NOT_RUN, UNREADABLE) for p in pages),
            total=total_cost(costs) if costs else None, explained=TIMES_EXPLAINED,
            smoke=any(p.status == SMOKE for p in pages), version=__version__, date=utc_now(),
            base=""), encoding="utf-8")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _swap_in(building, out)
    return out
