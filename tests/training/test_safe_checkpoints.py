"""Opening a run folder runs no code from it (issue 26, item 1).

A crafted ``checkpoint.pt`` (a torch zip or a bare pickle whose ``__reduce__`` writes a
marker file) is planted where bnlab loads checkpoints: ``inspect``, ``train --resume``, the
analysis of a finished run (``restore.load_trained_model``, probed replays), a cut-off run
of an ``exp`` grid and ``train --nproc 2 --resume``. Each refuses in one line naming the
file, and the marker is never written. Checkpoints bnlab writes load with
``weights_only=True``; a trusted one that does not is converted by ``bnlab runs upgrade``.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bnlab
from bnlab import cli
from bnlab.experiments import probed
from bnlab.training import distributed, restore, runs
from bnlab.training.train import CHECKPOINT_KEYS, TrainConfig, start_run
from bnlab.util.config import config_to_dict
from bnlab.util.io import atomic_write_json

TINY = dict(epochs=2, subset=100, val_size=200, batch_size=50, eval_batch_size=200, device="cpu")
TINY_FLAGS = ["--epochs", "2", "--subset", "100", "--val-size", "200", "--batch-size", "50",
              "--eval-batch-size", "200", "--device", "cpu", "--no-progress"]
SRC = Path(bnlab.__file__).parent


class Crafted:
    """Unpickling this writes ``marker``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant(run_dir: Path, marker: Path, bare: bool = False) -> Path:
    """Replace ``run_dir``'s checkpoint by a crafted one: torch's zip format whose model is the
    payload, or (``bare``) a plain pickle of the payload alone."""
    path = run_dir / runs.CHECKPOINT
    path.unlink(missing_ok=True)
    if bare:
        path.write_bytes(pickle.dumps(Crafted(marker)))
    else:
        torch.save({key: Crafted(marker) for key in CHECKPOINT_KEYS}, path)
    return path


def assert_refused(err: str, path: Path, marker: Path) -> None:
    assert err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    assert f"{path}: refused" in err and "bnlab runs upgrade" in err, err
    assert not marker.exists(), "the crafted checkpoint ran code"


@pytest.fixture(scope="module")
def finished_run(synthetic_fashion, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    start_run(TrainConfig(**TINY), synthetic_fashion, run_dir, progress=False).train()
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_the_crafted_checkpoint_does_run_code_when_unpickled(tmp_path):
    """The payload is live: a full unpickle writes the marker (so the tests below mean it)."""
    (tmp_path / "run").mkdir()
    path = plant(tmp_path / "run", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "code ran"


def test_checkpoints_bnlab_writes_load_with_weights_only(finished_run):
    checkpoint = torch.load(finished_run / runs.CHECKPOINT, weights_only=True)
    assert set(checkpoint) == set(CHECKPOINT_KEYS)
    runs.check_plain(checkpoint)


def test_saving_anything_but_tensors_and_plain_containers_is_refused(tmp_path):
    for bad, where in (({"history": [np.float64(1.0)]}, "checkpoint['history'][0]"),
                       ({"model": torch.nn.Linear(1, 1)}, "checkpoint['model']"),
                       ({(1, 2): 0}, "checkpoint has a key")):
        with pytest.raises(TypeError, match="^" + re.escape(where)):
            runs.save_checkpoint(tmp_path, bad)
    assert not (tmp_path / runs.CHECKPOINT).exists()


@pytest.mark.parametrize("bare", [False, True], ids=["torch-zip", "bare-pickle"])
def test_inspect_and_train_resume_refuse_a_crafted_checkpoint(run_copy, tmp_path, capsys,
                                                              fake_dataset, bare):
    marker = tmp_path / "marker"
    path = plant(run_copy, marker, bare)
    assert cli.main(["inspect", str(run_copy), "--no-figure"]) == 2
    assert_refused(capsys.readouterr().err, path, marker)
    (run_copy / runs.SUMMARY).unlink()  # a cut-off run: --resume loads its checkpoint
    assert cli.main(["train", *TINY_FLAGS, "--out", str(run_copy), "--resume"]) == 2
    assert_refused(capsys.readouterr().err, path, marker)


def test_analysis_loads_of_a_finished_run_refuse_a_crafted_checkpoint(run_copy, tmp_path,
                                                                      synthetic_fashion):
    marker = tmp_path / "marker"
    path = plant(run_copy, marker)
    with pytest.raises(runs.RunFileError, match=f"^{path}: refused"):
        restore.load_trained_model(run_copy)
    with pytest.raises(runs.RunFileError, match=f"^{path}: refused"):  # a probed replay
        probed.replay(TrainConfig(**{**TINY, "epochs": 1}), synthetic_fashion, [],
                      lambda *args: {}, path, progress=False)
    assert not marker.exists()


def test_every_checkpoint_load_in_bnlab_is_weights_only():
    """The one loader is ``runs._load_safely``; only ``runs.upgrade_checkpoint`` (the user's
    explicit trust) unpickles fully. No other module calls torch.load or pickle."""
    loads = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for call in ast.walk(function):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in ("load", "loads", "Unpickler")
                        and isinstance(call.func.value, ast.Name)
                        and call.func.value.id in ("torch", "pickle")):
                    safe = {k.arg: getattr(k.value, "value", None) for k in call.keywords}
                    loads.append((path.name, function.name, call.func.value.id,
                                  safe.get("weights_only")))
    assert sorted(loads) == [("runs.py", "_load_safely", "torch", True),
                             ("runs.py", "upgrade_checkpoint", "torch", False)]


def test_runs_upgrade_converts_a_trusted_checkpoint_and_the_run_resumes_exactly(
        finished_run, tmp_path, capsys, fake_dataset, synthetic_fashion):
    """An older checkpoint holding numpy numbers (not loadable safely) is refused with the way
    out; ``bnlab runs upgrade`` says it trusts the file, rewrites it, and the run resumes to
    the uninterrupted run's numbers."""
    cut = tmp_path / "runs" / "cut"
    start_run(TrainConfig(**{**TINY, "epochs": 1}), synthetic_fashion, cut, progress=False).train()
    (cut / runs.SUMMARY).unlink()
    config = json.loads((cut / runs.CONFIG).read_text())
    atomic_write_json(cut / runs.CONFIG, {**config, "epochs": 2})
    old = torch.load(cut / runs.CHECKPOINT, weights_only=True)
    old["history"] = [{k: np.float64(v) if isinstance(v, float) else v for k, v in row.items()}
                      for row in old["history"]]
    torch.save(old, cut / runs.CHECKPOINT)
    assert cli.main(["train", *TINY_FLAGS, "--out", str(cut), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`bnlab runs upgrade {cut}` converts it" in err
    assert "numpy" in err

    assert cli.main(["runs", "upgrade", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{cut / runs.CHECKPOINT}: trusting it as you asked: unpickling it fully, "
                   "which runs any code it holds",
                   f"{cut / runs.CHECKPOINT}: rewritten with tensors and plain containers only; "
                   "it now loads safely"]
    runs.check_plain(torch.load(cut / runs.CHECKPOINT, weights_only=True))
    assert cli.main(["runs", "upgrade", str(cut)]) == 0  # a second time: nothing to do
    assert capsys.readouterr().out == f"{cut / runs.CHECKPOINT}: loads safely already; unchanged\n"

    assert cli.main(["train", *TINY_FLAGS, "--out", str(cut), "--resume"]) == 0
    resumed, whole = runs.read_jsonl(cut / runs.METRICS), runs.read_jsonl(finished_run / runs.METRICS)
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in whole]


def test_runs_upgrade_of_no_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["runs", "upgrade", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"bnlab: error: {tmp_path}: no checkpoint.pt in it or below it\n"


@pytest.mark.slow
def test_exp_over_a_finished_and_a_cut_off_run_refuses_their_crafted_checkpoints(
        fake_dataset, tmp_path, capsys):
    """A finished run is analysed again (its cached measurement removed: the analysis loads
    its checkpoint) and a cut-off one resumed: each crafted checkpoint is named, none runs."""
    out = tmp_path / "exp"
    argv = ["exp", "dropout", "--quick", "--subset", "100", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    finished, cut = sorted(p for p in (out / "runs").iterdir() if "bnlab" in p.name)[:2]
    shutil.rmtree(finished / runs.ANALYSIS)
    (cut / runs.SUMMARY).unlink()
    marker = tmp_path / "marker"
    paths = [plant(finished, marker), plant(cut, marker, bare=True)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err and all(f"{path}: refused" in err for path in paths), err


@pytest.mark.slow
def test_train_nproc_resume_refuses_a_crafted_checkpoint(synthetic_fashion, tmp_path):
    config = TrainConfig(**TINY)
    world = distributed.DistributedConfig(nproc=2, dist_timeout=30)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_json(run_dir / runs.CONFIG, config_to_dict(config))
    atomic_write_json(run_dir / distributed.DISTRIBUTED,
                      {"world_size": 2, "sync_bn": False, "backend": "gloo"})
    marker = tmp_path / "marker"
    path = plant(run_dir, marker)
    with pytest.raises(distributed.DistributedError, match=f"^rank 0: {path}: refused"):
        distributed.launch(config, world, synthetic_fashion, run_dir, resume=True, progress=False)
    assert not marker.exists()
