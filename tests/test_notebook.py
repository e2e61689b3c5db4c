"""The chapter as a notebook: committed without outputs, and it runs top to bottom in quick
mode (BNLAB_NOTEBOOK_QUICK=1) in a real Jupyter kernel, failing on any cell's error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.data.dataset import load_fashion_mnist
from bnlab.experiments import EXPERIMENTS
from bnlab.util.errors import DatasetError

nbformat = pytest.importorskip("nbformat")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "batch_norm.ipynb"


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_committed_notebook_carries_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert len(cells) >= 8
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    try:
        load_fashion_mnist()
    except DatasetError as exc:
        pytest.skip(f"the notebook trains on the real Fashion-MNIST, not found here: {exc}")
    monkeypatch.setenv("BNLAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in code_cells(notebook) for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "quick mode: 1 epoch, 1000 training images" in text
    assert "outputs, input gradients and running statistics agree" in text
    assert "conv (N, C, H, W): statistics over dims (0, 2, 3), 288 values per channel" in text
    assert "first norm layer (conv1)" in text
    # the teaching moment: eval mode at chance after 8 steps, and what fixes it
    assert " step | acc, train mode | acc, eval mode | running var" in text
    assert "the same weights after update_bn_stats over 20 batches" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # figures, inline
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "def reference_batch_norm(" in shown  # the from-scratch function's own code
    assert all(f"`bnlab exp {name}`" in shown for name in EXPERIMENTS)  # the table of commands
    assert "> **Smoke test.**" in shown  # the quick experiment's report states no verdict
    for norm in ("bnlab", "torch"):
        summary = json.loads((tmp_path / "runs" / "notebook-quick" / f"bn-lenet-{norm}"
                              / "summary.json").read_text())
        assert summary["epochs_completed"] == 1 and not summary["diverged"]
