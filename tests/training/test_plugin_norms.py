"""Plug-in norms: named by import path or entry point, checked early, seen by every process.

Why: a researcher adds a norm without editing bnlab (issue 31, item 6). The README's worked
example is the plug-in these tests run, through ``train`` (one process and ``--nproc 2``)
and a quick ``exp norms`` grid with ``--jobs 2``, whose workers resolve the name by
themselves; the bad plug-ins check that each mistake is one line before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

from bnlab import cli
from bnlab.experiments import norm_choice
from bnlab.experiments.runner import ExpSettings, resolve
from bnlab.training import norms, restore
from bnlab.training.norms import create_norm_layer, describe_norm, uses_batch_statistics
from bnlab.util.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = ["--epochs", "1", "--subset", "100", "--val-size", "200", "--batch-size", "50",
        "--eval-batch-size", "200", "--device", "cpu", "--no-progress"]


def readme_example() -> str:
    """The Python block of the README's "Add your own norm" section (``# mynorms.py``)."""
    section = README.read_text().split("## Add your own norm", 1)[1]
    match = re.search(r"```python\n# mynorms.py\n(.*?)```", section, re.S)
    assert match, "the README's section has no mynorms.py block"
    return match.group(1)


@pytest.fixture
def mynorms(tmp_path, monkeypatch) -> Path:
    """The README's ``mynorms`` module in a folder on ``sys.path`` and ``PYTHONPATH``."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "mynorms.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(folder))  # spawned processes inherit sys.path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_the_readme_norm_builds_and_computes_rms_norm(mynorms, kind):
    shape = (4, 6, 5, 5) if kind == "conv" else (4, 6)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    layer = create_norm_layer("mynorms:RMSNorm:0.01", kind, 6).double()
    with torch.no_grad():
        layer.scale.copy_(torch.linspace(0.5, 2, 6).reshape(layer.scale.shape))
    dims = tuple(range(1, x.dim()))
    rms = (x.pow(2).mean(dims, keepdim=True) + 0.01).sqrt()  # per sample: (N, 1[, 1, 1])
    torch.testing.assert_close(layer(x), layer.scale * x / rms)
    assert layer.eps == 0.01 and create_norm_layer("mynorms:RMSNorm", kind, 6).eps == 1e-5
    assert not uses_batch_statistics("mynorms:RMSNorm")
    assert describe_norm("mynorms:RMSNorm").startswith("RMS norm: each sample")


def test_checking_a_plugin_draws_no_random_numbers(mynorms, tmp_path):
    write_module(mynorms, "drawing_norm", """
        import torch
        from torch import nn

        def build(kind, num_features):
            torch.randn(3)  # a plug-in that draws at construction
            return nn.Identity()
        build.batch_statistics = False
    """)
    torch.manual_seed(0)
    norms.check_norm_name("drawing_norm:build")
    after_check = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_check, torch.rand(3))


BAD_PLUGINS = {
    "no module": ("no_such_module_xyz:Norm", "no module named 'no_such_module_xyz'"),
    "no attribute": ("bad_norms:Missing", "module 'bad_norms' has no attribute 'Missing'"),
    "not callable": ("bad_norms:NUMBER", "is a int; expected a callable"),
    "no batch_statistics": ("bad_norms:undeclared", "needs an attribute batch_statistics"),
    "takes no value": ("bad_norms:identity:3", "norm 'bad_norms:identity' takes no value"),
    "bad value": ("bad_norms:Scaled:abc", "parse_value('abc') failed: ValueError"),
    "bad shape": ("bad_norms:flatten", "maps a (2, 4, 3, 3) batch to (2, 36); expected the same"),
    "raises": ("bad_norms:broken", "building it for kind 'conv' with 4 features failed: "
                                   "RuntimeError: no"),
    "import fails": ("failing_import:X", "importing module 'failing_import' failed: "
                                         "ZeroDivisionError"),
    "not a name": ("not-a-module:X", "unknown norm 'not-a-module:X'"),
}


@pytest.fixture
def bad_norms(mynorms) -> Path:
    write_module(mynorms, "bad_norms", """
        from torch import nn

        NUMBER = 3

        def undeclared(kind, num_features):
            return nn.Identity()

        def identity(kind, num_features):
            return nn.Identity()
        identity.batch_statistics = False

        class Scaled(nn.Module):
            batch_statistics = False
            parse_value = float
            def __init__(self, kind, num_features, factor=1.0):
                super().__init__()
                self.factor = factor
            def forward(self, x):
                return x * self.factor

        def flatten(kind, num_features):
            return nn.Flatten()
        flatten.batch_statistics = False

        def broken(kind, num_features):
            raise RuntimeError("no")
        broken.batch_statistics = True
    """)
    write_module(mynorms, "failing_import", "1 / 0\n")
    return mynorms


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_a_bad_plugin_is_one_line_before_anything_is_written(bad_norms, tmp_path, capsys,
                                                             fake_dataset, case):
    name, message = BAD_PLUGINS[case]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--norm", name, "--out", str(out))
    assert code == 2 and err.startswith("bnlab: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_exp_norms_refuses_a_bad_plugin_in_one_line(bad_norms, tmp_path, capsys):
    out = tmp_path / "exp"
    code, _, err = run_cli(capsys, "exp", "norms", "--norms", "bnlab,bad_norms:flatten",
                           "--quick", "--out", str(out), "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "--norms: norm 'bad_norms:flatten'" in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- --norms for exp

def test_exp_norms_default_grid_is_unchanged_and_a_list_selects_from_it():
    default = norm_choice.variants(resolve(ExpSettings(), norm_choice.EXPERIMENT))
    assert [v.tags["norm"] for v in default][:len(norm_choice.BATCH_SIZES) * 5:4] == list(
        norm_choice.NORMS)
    assert len(default) == 2 * len(norm_choice.NORMS) * len(norm_choice.BATCH_SIZES)
    chosen = norm_choice.variants(resolve(ExpSettings(norms="layer,bnlab"), norm_choice.EXPERIMENT))
    assert sorted((v.label, str(v.params)) for v in chosen) == sorted(
        (v.label, str(v.params)) for v in default if v.tags["norm"] in ("layer", "bnlab"))


@pytest.mark.parametrize(("norms_flag", "message"), [
    ("bnlab,bnlab", "--norms names ['bnlab'] more than once"),
    (",", "expected --norms as a comma list"), ("bnlab,nope", "--norms: unknown norm 'nope'")])
def test_bad_norm_lists_are_config_errors(norms_flag, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ExpSettings(norms=norms_flag)


def test_an_experiment_without_a_norm_list_refuses_norms(tmp_path, capsys):
    code, _, err = run_cli(capsys, "exp", "lr", "--norms", "bnlab", "--quick", "--out",
                           str(tmp_path), "--no-progress")
    assert code == 2 and "experiment 'lr' takes no --norms" in err


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_the_readme_norm_trains_through_the_cli(mynorms, fake_dataset, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", *TINY, "--norm", "mynorms:RMSNorm:1e-3", "--out",
                             str(tmp_path / "rms"))
    assert code == 0, err
    model, config = restore.load_trained_model(tmp_path / "rms")
    assert config.norm == "mynorms:RMSNorm:1e-3"
    layers = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert len(layers) == 4 and {m.eps for m in layers} == {1e-3}
    assert any(not torch.equal(m.scale, torch.ones_like(m.scale)) for m in layers)  # trained


@pytest.mark.slow
def test_the_readme_norm_trains_over_two_processes(mynorms, fake_dataset, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY, "--nproc", "2", "--norm", "mynorms:RMSNorm",
                           "--out", str(tmp_path / "rms2"))
    assert code == 0, err
    assert json.loads((tmp_path / "rms2" / "summary.json").read_text())["epochs_completed"] == 1


@pytest.fixture
def entry_point(mynorms) -> str:
    """An installed distribution (a dist-info folder on sys.path) registering the README's
    norm under the entry point ``rms-plugin`` of ``bnlab.norms``."""
    info = mynorms / "mynorms_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mynorms-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bnlab.norms]\nrms-plugin = mynorms:RMSNorm\n")
    norms._entry_points.cache_clear()
    yield "rms-plugin"
    norms._entry_points.cache_clear()


def test_an_entry_point_names_a_plugin(entry_point):
    layer = create_norm_layer(f"{entry_point}:0.5", "fc", 3)
    assert type(layer).__name__ == "RMSNorm" and layer.eps == 0.5
    with pytest.raises(ValueError, match=r"unknown norm 'nope'.*a plug-in of bnlab.norms "
                                         r"\['rms-plugin'\]"):
        create_norm_layer("nope", "fc", 3)


@pytest.mark.slow
def test_a_quick_grid_with_plugins_runs_in_two_worker_processes(entry_point, fake_dataset,
                                                                 tmp_path, capsys):
    names = ["bnlab", "mynorms:RMSNorm:1e-3", entry_point]
    code, out, err = run_cli(capsys, "exp", "norms", "--norms", ",".join(names), "--quick",
                             "--jobs", "2", "--out", str(tmp_path), "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in
            (tmp_path / "norms" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(names) * 2  # arms x norms x batch sizes, one seed
    assert {r["config"]["norm"] for r in rows} == set(names)
    assert not any(r["summary"]["diverged"] for r in rows)
    report = (tmp_path / "norms" / "report.md").read_text()
    for name in names[1:]:  # a row of the accuracy tables, named as given
        assert re.search(rf"^\| {re.escape(name)} +\| ", report, re.M), name
    settings = json.loads((tmp_path / "norms" / "settings.json").read_text())
    assert settings["norms"] == ",".join(names)
