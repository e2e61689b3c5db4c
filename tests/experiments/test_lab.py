"""``bnlab lab``: every experiment into one folder, a failing one listed while the others run,
a second call that trains nothing, the estimate of the time left, and the site it writes
opened in headless Chromium.

The lab's --quick over the whole registry is too slow for the suite on synthetic data
(every experiment's --quick runs on its own in test_experiments.py and the experiments'
own tests), so the end-to-end test here runs three: chapter, placement and precise (the
last with verdicts and measurements of finished runs).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from filelock import FileLock

from bnlab import cli
from bnlab.data import dataset
from bnlab.experiments import EXPERIMENTS, executors
from bnlab.experiments.findings import Analysis
from bnlab.experiments.lab import LabProgress
from bnlab.experiments.runner import Experiment, ExpSettings, Variant, plan
from bnlab.training import runs
from bnlab.util.config import config_to_dict
from tests.helpers import without_provenance

LAB_EXPERIMENTS = ("chapter", "placement", "precise")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""How Chromium runs here as root, on a machine without a network: no sandbox, and nothing it
would fetch by itself (its user data folder is a new empty one, Playwright's own)."""


def _lab(out: Path, *flags: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["lab", *LAB_EXPERIMENTS, "--quick", "--out", str(out), "--no-progress",
                         *flags])
    return code, stdout.getvalue()


@pytest.fixture(scope="session")
def lab(tmp_path_factory, synthetic_fashion) -> tuple[Path, int, str]:
    """`bnlab lab --quick` of three experiments on the synthetic dataset, run once for the
    whole session, pytest-xdist's workers included (they share the folder above their own
    temporary folders): (out, exit code, stdout). Tests read it and change nothing in it."""
    shared = tmp_path_factory.getbasetemp().parent
    out, result = shared / "lab", shared / "lab-result.json"
    with FileLock(shared / "lab.lock"):
        if not result.exists():
            shutil.rmtree(out, ignore_errors=True)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(dataset, "load_fashion_mnist",
                           lambda root=None, **kw: synthetic_fashion)
                code, printed = _lab(out)
            result.write_text(json.dumps([code, printed]))
    code, printed = json.loads(result.read_text())
    return out, code, printed


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_the_lab_runs_its_experiments_and_records_their_times(lab):
    out, code, printed = lab
    assert code == 0, printed
    record = json.loads((out / "lab.json").read_text())
    assert [c["experiments"] for c in record["calls"]][:1] == [list(LAB_EXPERIMENTS)]
    call = record["calls"][0]
    assert call["wall_s"] > 0 and {"machine", "torch", "threads"} <= set(call["provenance"])
    for name in LAB_EXPERIMENTS:
        entry = record["experiments"][name]
        assert entry["status"] == "done" and entry["wall_s"] > 0, entry
        assert entry["command"] == f"bnlab exp {name} --quick --out {out}"
        findings = json.loads((out / name / "findings.json").read_text())
        assert findings["provenance"]["command"] == entry["command"]  # reproduces it alone
        cost = record["costs"]["experiments"][name]
        assert cost["training_s"] > 0 and cost["total_s"] >= cost["training_s"]
    assert record["costs"]["experiments"]["precise"]["measurements_s"] > 0  # its replays
    # every run once in the total: chapter, placement and precise share BN-LeNet at lr 0.1
    planned = {p.run_dir.name for name in LAB_EXPERIMENTS
               for p in plan(EXPERIMENTS[name], ExpSettings(seeds=1, epochs=1, subset=1000,
                                                            val_size=1000, quick=True), out)}
    assert record["costs"]["total"]["runs"] == len(planned)
    for words in ("| experiment | status   | this call |", "| all ", "3/3 done",
                  "'cost' adds up what was recorded", "torch", f"site: {out}/site/index.html"):
        assert words in printed, words
    assert (out / "site" / "precise" / "index.html").is_file()


@pytest.mark.slow
def test_a_second_lab_call_trains_nothing(lab, synthetic_fashion, monkeypatch, tmp_path):
    assert lab[1] == 0
    out = tmp_path / "lab"
    shutil.copytree(lab[0], out, symlinks=True)  # the session's lab stays as it is
    reports = {n: without_provenance((out / n / "report.md").read_text()) for n in LAB_EXPERIMENTS}

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(executors, "start_run", must_not_train)
    monkeypatch.setattr(dataset, "load_fashion_mnist", lambda root=None, **kw: synthetic_fashion)
    code, printed = _lab(out)
    assert code == 0, printed
    record = json.loads((out / "lab.json").read_text())
    assert len(record["calls"]) == 2 and record["calls"][1]["command"].endswith(f"{out} --no-progress")
    assert all(record["experiments"][n]["trained"] == 0 for n in LAB_EXPERIMENTS)
    assert {n: without_provenance((out / n / "report.md").read_text())
            for n in LAB_EXPERIMENTS} == reports


def _fake(name: str, analyze) -> Experiment:
    return Experiment(name, f"Fake {name}", "Does the lab go on?",
                      lambda s: [Variant("plain", {"model": "lenet", "norm": "none",
                                                   "batch_size": 100})],
                      analyze, default_epochs=1, default_subset=200)


def _broken(rows, out, data, settings):
    raise RuntimeError("boom\nsecond line")


def test_a_failing_experiment_is_listed_and_the_others_run(fake_dataset, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setitem(EXPERIMENTS, "fake-broken", _fake("fake-broken", _broken))
    monkeypatch.setitem(EXPERIMENTS, "fake-ok", _fake("fake-ok", lambda *a: Analysis()))
    code = cli.main(["lab", "fake-broken", "fake-ok", "--quick", "--out", str(tmp_path),
                     "--no-progress"])
    printed = capsys.readouterr()
    assert code == 2
    assert printed.err.strip().splitlines()[-1] == (
        "bnlab: error: 1 of 2 experiments failed or left runs out: fake-broken (see above)")
    assert "fake-broken: failed: RuntimeError: boom second line" in printed.out
    record = json.loads((tmp_path / "lab.json").read_text())
    broken, ok = record["experiments"]["fake-broken"], record["experiments"]["fake-ok"]
    assert broken["status"] == "failed" and "_broken" in broken["traceback"]
    assert ok["status"] == "done" and (tmp_path / "fake-ok" / "report.md").is_file()
    index = (tmp_path / "site" / "index.html").read_text()  # the site is written all the same
    assert "RuntimeError: boom second line" in index


def test_unknown_experiments_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["lab", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "lab.json").exists()


# --------------------------------------------------------------------------- the estimate

def _finished_run(p, seconds_per_epoch: float) -> None:
    """A finished run folder of planned run ``p`` that recorded ``seconds_per_epoch``."""
    p.run_dir.mkdir(parents=True)
    (p.run_dir / runs.CONFIG).write_text(json.dumps(config_to_dict(p.config)))
    runs.write_jsonl(p.run_dir / runs.METRICS, [{"epoch": e + 1, "seconds": seconds_per_epoch}
                                                for e in range(p.config.epochs)])
    (p.run_dir / runs.SUMMARY).write_text(json.dumps({"diverged": False}))


def test_the_estimate_uses_the_seconds_per_step_of_runs_of_the_same_kind(tmp_path):
    # 1000 images in batches of 100: 10 steps an epoch, 2 epochs a run
    experiment = Experiment("x", "x", "?", lambda s: [
        Variant("lenet", {"model": "lenet", "norm": "none", "batch_size": 100}),
        Variant("bn", {"model": "bn-lenet", "norm": "bnlab", "batch_size": 100})],
        lambda *a: Analysis(), 2, 1000)
    planned = plan(experiment, ExpSettings(seeds=3, epochs=2, subset=1000, val_size=0), tmp_path)
    lenet = [p for p in planned if p.variant.label == "lenet"]
    bn = [p for p in planned if p.variant.label == "bn"]
    progress = LabProgress({"x": planned}, jobs=2, progress=False)
    assert progress.time_left() == "time left: known after the first run"
    _finished_run(lenet[0], 1.0)  # 0.1 s a step
    # every other run at LeNet's rate, over 2 jobs: 5 runs x 20 steps x 0.1 s / 2
    assert progress.time_left() == "~5 s of training left (from 1 run measured)"
    _finished_run(bn[0], 20.0)  # 2 s a step: BN-LeNet's own rate from now on
    # LeNet 2 x 20 x 0.1 + BN-LeNet 2 x 20 x 2, over 2 jobs
    assert progress.time_left() == "~42 s of training left (from 2 runs measured)"
    for p in planned[1:]:
        if not p.run_dir.exists():
            _finished_run(p, 1.0)
    assert progress.time_left() == "nothing left to train"


# --------------------------------------------------------------------------- the browser

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install "
        "'bnlab[dev]' brings it)")
    executable = chromium()
    if executable is None:
        pytest.skip("Debian's chromium is not installed: `make test` installs it where apt works "
                    "as root (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        except sync_api.Error as exc:
            pytest.skip(f"{executable} does not start here: {str(exc).splitlines()[0]}")
        yield launched
        launched.close()


def _open(browser, url: str):
    """A page at ``url`` and the problems it had: console errors, script errors, failed
    requests and requests for anything but a file of the site (or ``url``'s server)."""
    page = browser.new_page()
    problems: list[str] = []
    origin = urlsplit(url)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"script: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on("request", lambda r: urlsplit(r.url)[:2] == origin[:2]
            or problems.append(f"left the site: {r.url}"))
    page.goto(url, wait_until="load")
    return page, problems


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _images(page) -> list[tuple[str, int]]:
    return page.eval_on_selector_all(
        "img", "els => els.map(e => [e.getAttribute('src'), e.complete ? e.naturalWidth : 0])")


@pytest.mark.slow
def test_the_site_in_a_browser(browser, lab, tmp_path):  # skips before the lab runs
    out, code, _ = lab
    assert code == 0
    site = out / "site"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 1 + len(EXPERIMENTS)
    anchors: list[tuple[str, str]] = []
    for path in pages:
        page, problems = _open(browser, path.as_uri())
        assert problems == [], path
        assert all(width > 0 for _, width in _images(page)), (path, _images(page))
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
            parts = urlsplit(href)
            if parts.scheme != "file":
                continue
            target = Path(unquote(parts.path))
            assert target.is_file() and site in target.parents, (path, href)
            if parts.fragment:
                anchors.append((target.as_uri(), parts.fragment))
        page.close()
    for uri, fragment in set(anchors):  # every #anchor names an element of its page
        page, _ = _open(browser, uri)
        assert page.locator(f"[id='{fragment}']").count() == 1, (uri, fragment)
        page.close()

    index, _ = _open(browser, (site / "index.html").as_uri())
    verdicts = sum(len(json.loads((out / n / "findings.json").read_text())["verdicts"])
                   for n in LAB_EXPERIMENTS)
    assert verdicts > 0
    assert index.locator("#claims table.claims tbody tr").count() == verdicts
    rows = index.locator("#experiments tbody tr")
    assert rows.count() == len(EXPERIMENTS)
    for name in EXPERIMENTS:
        status = index.locator(f"#exp-{name} .status").inner_text()
        assert (status == "smoke test") == (name in LAB_EXPERIMENTS), (name, status)
    screenshot = tmp_path / "index.png"
    index.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    index.close()

    # the same site served over HTTP (python -m http.server)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for page_path in ("index.html", "precise/index.html"):
            page, problems = _open(browser, f"http://127.0.0.1:{server.server_port}/{page_path}")
            assert problems == [] and all(width > 0 for _, width in _images(page)), page_path
            page.close()
    finally:
        server.shutdown()
        server.server_close()
