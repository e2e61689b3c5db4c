"""The site (``bnlab report --html``) from hand-written experiment folders: the verdict table
comes from findings.json, every page stays inside the site and escapes what it shows,
nothing is copied through a symbolic link, and an experiment not run says how to run it.

The site built from real --quick grids and opened in a browser: tests/experiments/test_lab.py.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from bnlab import cli
from bnlab.experiments import EXPERIMENTS
from bnlab.experiments.findings import judge_difference, not_measured
from bnlab.experiments.report_html import render_report
from bnlab.experiments.site import MARKER, SiteError, build_site

HOSTILE = '<script>alert("x")</script>'


class Links(HTMLParser):
    """Every URL a page refers to (href, src), and its elements' ids and text."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []  # (tag, url)
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.urls.append((tag, value))
            if name == "id":
                self.ids.add(value)

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def check_internal_links(site: Path) -> list[Path]:
    """Assert that every page's URLs resolve inside the site (files and #anchors) and that no
    page loads anything from elsewhere; return the pages."""
    pages = sorted(site.rglob("*.html"))
    for page in pages:
        for tag, url in parse(page).urls:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https", "mailto"):
                assert tag == "a", f"{page}: {tag} loads {url} from the network"
                continue
            if parts.scheme == "data":
                continue
            assert not parts.scheme and not parts.netloc and not url.startswith("/"), (page, url)
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            assert target.is_file() and site.resolve() in target.parents, (page, url)
            if parts.fragment:
                assert parts.fragment in parse(target).ids, (page, url)
    return pages


def png(path: Path) -> None:
    Image.new("RGB", (30, 20), "white").save(path)


def write_experiment(root: Path, name: str, verdicts: list, report: str, smoke: bool = False,
                     files: dict[str, bytes] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "findings.json").write_text(json.dumps({
        "experiment": name, "smoke_test": smoke, "verdicts": [v.to_json() for v in verdicts],
        "findings": [], "calibration": [], "settings": {"seeds": 3, "note": HOSTILE},
        "provenance": {"command": f"bnlab exp {name} --out {root}"},
        "timing": {"training_s": 1.0, "analysis_s": 2.0, "analysis_started_at": 0.0,
                   "measurements": []}}))
    (folder / "report.md").write_text(report, encoding="utf-8")
    (folder / "results.jsonl").write_text("")
    (folder / "summary.csv").write_text("variant,measure\n")
    for file_name, content in (files or {}).items():
        (folder / file_name).write_bytes(content)
    return folder


A, B = {0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.90, 1: 0.91, 2: 0.93}


@pytest.fixture
def lab_folder(tmp_path) -> Path:
    root = tmp_path / "runs"
    chapter_claim = judge_difference("BN makes " + HOSTILE, "the chapter", "final accuracy, BN - none",
                                     A, B, paper="about 2x faster", evidence="lr.png")
    other = judge_difference("small batches hurt", "Wu & Johnson 2021", "accuracy", B, A,
                             evidence="Summary")
    lr = write_experiment(root, "lr", [chapter_claim, other],
                          f"# Learning rates\n\n**Question.** {HOSTILE}\n\n## Verdicts\n\n"
                          "| claim | verdict |\n| --- | --- |\n| a | b |\n\n## Summary\n\n"
                          "![lr](lr.png)\n\n![gone](missing.png)\n\n![linked](linked.png)\n\n"
                          "[outside](../../secret.txt) [data](summary.csv) [web](https://example.org)\n")
    png(lr / "lr.png")
    (lr / "linked.png").symlink_to(lr / "lr.png")
    (lr / "odd name.png").write_bytes((lr / "lr.png").read_bytes())
    (lr / "fake.png").write_text("not a png")
    write_experiment(root, "placement", [not_measured("placement matters", "Ioffe & Szegedy 2015",
                                                      "accuracy", "no run trained")],
                     "# Placement\n", smoke=True)
    (root / "placement" / "report.md").write_bytes(b"# Placement\n\nbad bytes: \xff\xfe\n")
    (root / "dropout").mkdir()
    (root / "dropout" / "findings.json").write_text("{not json")
    (root / "lab.json").write_text(json.dumps({
        "calls": [{"command": "bnlab lab", "wall_s": 12.0, "experiments": ["lr", "depth"],
                   "provenance": {"date": "today", "machine": "m", "torch": "t", "threads": 2}}],
        "experiments": {"depth": {"status": "failed", "error": f"ValueError: {HOSTILE}",
                                  "wall_s": 3.0}}}))
    return root


def test_the_site_is_built_from_findings_and_stays_inside_itself(lab_folder, tmp_path):
    site = build_site([lab_folder], tmp_path / "site")
    pages = check_internal_links(site)
    assert {p.relative_to(site).as_posix() for p in pages} == \
        {"index.html", *(f"{name}/index.html" for name in EXPERIMENTS)}
    index = (site / "index.html").read_text()
    # one row per verdict, the chapter's first, each linking to its evidence
    chapter, beyond = index.split("Beyond the chapter")
    assert chapter.count("<tr>") - 1 == 1 and "BN makes" in chapter and "supported" in chapter
    assert "about 2x faster" in chapter and 'href="lr/index.html#fig-lr"' in chapter
    assert "small batches hurt" in beyond and "contradicted" in beyond
    assert 'href="lr/index.html#summary"' in beyond
    assert "placement matters" in beyond and beyond.split("<h2")[0].count("<tr>") - 1 == 2
    assert "Some experiments here are smoke tests" in index
    # every experiment is listed; one not run says how to run it
    for name in EXPERIMENTS:
        assert f'id="exp-{name}"' in index
    assert f"bnlab exp convergence --out {lab_folder}" in index
    assert "not run yet" in (site / "convergence" / "index.html").read_text()
    # escaped wherever it came from: a claim, a report, settings, an error in lab.json
    for page in pages:
        text = page.read_text()
        assert HOSTILE not in text and "<script" not in text, page
    assert "&lt;script&gt;" in index and "ValueError" in index  # depth failed in the lab
    assert "depth" in index and "failed" in (site / "depth" / "index.html").read_text()


def test_only_plain_png_figures_and_data_files_are_copied(lab_folder, tmp_path):
    site = build_site([lab_folder], tmp_path / "site")
    assert sorted(p.name for p in (site / "lr").iterdir()) == [
        "findings.json", "index.html", "lr.png", "report.md", "results.jsonl", "summary.csv"]
    page = (site / "lr" / "index.html").read_text()
    assert '<img src="lr.png"' in page and 'id="fig-lr"' in page
    assert "[figure not in the site: gone]" in page and "[figure not in the site: linked]" in page
    assert "secret.txt" not in page and ">outside<" not in page and "outside" in page
    assert 'href="summary.csv"' in page and 'href="https://example.org"' in page
    assert "bnlab exp lr --out" in page  # the command that reproduces it
    # a report that is not UTF-8 is shown with replacement characters; damaged findings say so
    assert "bad bytes: \ufffd\ufffd" in (site / "placement" / "index.html").read_text()
    assert "unreadable" in (site / "dropout" / "index.html").read_text()


def test_a_site_replaces_only_a_site(lab_folder, tmp_path):
    out = tmp_path / "site"
    build_site([lab_folder], out)
    (out / "stale.html").write_text("old")
    build_site([lab_folder], out)
    assert (out / MARKER).is_file() and not (out / "stale.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]  # no leftovers
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SiteError, match="holds something other than a bnlab site"):
        build_site([lab_folder], other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_report_html_on_the_command_line(lab_folder, tmp_path, capsys):
    assert cli.main(["report", "--html", "--runs", str(lab_folder)]) == 0
    assert (lab_folder / "site" / "index.html").is_file()
    assert "site: " in capsys.readouterr().out
    assert cli.main(["report", "--html", "--runs", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["report", "--html", "--runs", str(lab_folder), "--out",
                     str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_an_empty_lab_is_a_site_of_experiments_not_run(tmp_path):
    site = build_site([tmp_path], tmp_path / "site")
    index = (site / "index.html").read_text()
    assert index.count("not run yet") >= len(EXPERIMENTS) and "None judged yet." in index
    check_internal_links(site)


def test_report_rendering_escapes_and_keeps_links_in_the_site():
    rendered = render_report("# Title\n\n<b>raw</b> [x](javascript:alert(1)) ![f](a.png)\n\n"
                             "## Same\n\n## Same\n", {"a.png"})
    assert "<b>" not in rendered.html and "&lt;b&gt;" in rendered.html
    assert "href=\"javascript" not in rendered.html and "Title" not in rendered.html
    assert rendered.figures == ["a.png"] and {"same", "same-2", "fig-a"} <= rendered.anchors


@pytest.mark.parametrize(("lab_date", "status"), [("2026-03-01 10:00 UTC", "incomplete"),
                                                  ("2026-01-01 10:00 UTC", "done")])
def test_a_lab_failure_shows_until_the_experiment_is_analysed_again(tmp_path, lab_date, status):
    folder = write_experiment(tmp_path, "lr", [], "# lr\n")
    findings = json.loads((folder / "findings.json").read_text())
    findings["provenance"]["date"] = "2026-02-01 10:00 UTC"
    (folder / "findings.json").write_text(json.dumps(findings))
    (tmp_path / "lab.json").write_text(json.dumps({"calls": [], "experiments": {"lr": {
        "status": "incomplete", "error": "2 of 9 runs could not be used", "date": lab_date}}}))
    site = build_site([tmp_path], tmp_path / "site")
    row = (site / "index.html").read_text().split('id="exp-lr"')[1].split("</tr>")[0]
    assert f'class="status {status}">{status}<' in row
    assert ("2 of 9 runs" in row) == (status == "incomplete")
