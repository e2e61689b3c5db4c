"""The package's architecture, checked from its source: imports point down, never in a circle,
and the library a user imports (``bnlab.nn``, ``bnlab.functional``) loads nothing of the lab."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "bnlab"

LAYERS = {"util": 0, "kernels": 1, "functional": 2, "nn": 3, "data": 4, "probes": 4,
          "training": 5, "experiments": 6, "bench": 7, "cli": 8}
"""The order of the README's Architecture section: a module may import its own package and
any package of a lower layer; packages that share a layer (data, probes) do not import
each other."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(path: Path, known: dict[str, Path]) -> set[str]:
    """Every bnlab module ``path`` imports, at top level or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from bnlab.nn import fold` imports the submodule bnlab.nn.fold
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imported(path, known) for name, path in known.items()}


def _layer(module: str) -> tuple[str, int] | None:
    """(top-level part, layer) of a bnlab module; None for the package root ``bnlab``."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1], LAYERS[parts[1]]


def test_every_package_has_a_layer():
    tops = {_module_name(p).split(".")[1] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE
            or p.name != "__init__.py"}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS and the README"


def test_imports_point_down():
    upward = []
    for module, imports in _graph().items():
        here = _layer(module)
        for target in imports:
            there = _layer(target)
            if here is None or there is None:
                continue
            if there[1] > here[1] or (there[1] == here[1] and there[0] != here[0]):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    """The check itself: a kernel importing the training lab is caught."""
    fake = tmp_path / "bnlab"
    (fake / "kernels").mkdir(parents=True)
    (fake / "training").mkdir()
    for init in (fake / "__init__.py", fake / "kernels" / "__init__.py",
                 fake / "training" / "__init__.py"):
        init.write_text("")
    (fake / "training" / "train.py").write_text("")
    (fake / "kernels" / "bad.py").write_text("from bnlab.training import train\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="bnlab.kernels.bad -> bnlab.training.train"):
        test_imports_point_down()


def test_at_most_eight_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize("imported", ["bnlab.nn", "bnlab.functional"])
def test_the_library_loads_nothing_of_the_lab(imported):
    """In a fresh interpreter: importing the library loads no training, experiments or plots,
    and no matplotlib or tqdm beyond what ``import torch`` itself loads (torch.hub loads tqdm)."""
    code = ("import sys, torch; before = set(sys.modules); "
            f"import {imported}; "
            "print('\\n'.join(sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] in ('bnlab', 'matplotlib', 'tqdm'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()
    library = ("bnlab", "bnlab.nn", "bnlab.functional", "bnlab.kernels")
    lab = [m for m in loaded if not (m in library or m.startswith(("bnlab.nn.", "bnlab.kernels.")))]
    assert lab == [], f"import {imported} loaded {lab}"
    assert imported in loaded
