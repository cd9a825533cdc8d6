"""The package's layers hold: bottom to top, `align.errors` < `align.io` < `align.rl`, `align.metrics` < `align.data` <
everything else (models, generation, trainers, evaluation, inspect, hub, stages, config, chain, cli), and a module
imports only from its own layer or the ones below it.

The import graph is read from the source with `ast`, module-level and in-function imports alike, so a lazy import
cannot hide a climb. The layers above `align.data` are not ordered here yet.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "align"

# Bottom to top. A name is a module or a package (`align.data` holds all of align/data/).
LAYERS: list[set[str]] = [
    {"align", "align.errors"},  # `align` is the package's own __init__ (its version)
    {"align.io"},  # atomic writes, align_stage.json, locks: imports only align.errors
    {"align.rl", "align.metrics"},  # torch-only math; the shipped `evaluate` metric modules
    {"align.data"},  # loading, formats, rankings, the tiny world, padding, Hub-id checks
]
# Everything else sits above align.data; listed so that a new top-level module or package has to be placed.
UPPER = {
    "align.__main__", "align.models", "align.generation", "align.trainers", "align.evaluation", "align.inspect",
    "align.hub", "align.stages", "align.config", "align.chain", "align.cli",
}  # fmt: skip
TOP = len(LAYERS)
TINY_WORLD_NAMES = {"TINYWORLD", "is_tinyworld"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit(module: str) -> str:
    """The layered unit a module belongs to: `align`, a top-level module (`align.io`) or a package (`align.data`)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    return TOP


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported align module) for every import in the file, at any depth."""
    return _imports_in(path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py")


def _imports_in(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "align"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
            if base.split(".")[0] != "align":
                continue
            for a in node.names:  # `from align.data import load` imports the module align.data.load
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else base))
    return out


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_unit_has_a_place():
    units = {_unit(_module_name(p)) for p in _files()}
    placed = set().union(*LAYERS) | UPPER
    assert units <= placed, f"place these in tests/test_layering.py (LAYERS or UPPER): {sorted(units - placed)}"


def test_no_module_imports_from_a_layer_above_its_own():
    bad = []
    for path in _files():
        here = _layer(_unit(_module_name(path)))
        if here == TOP:
            continue
        for line, target in _imports(path):
            if _layer(_unit(target)) > here:
                unit = _unit(_module_name(path))
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}, a layer above {unit}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_graph_reader_sees_lazy_and_relative_imports():
    # The check itself: an in-function or relative import counts as much as one at the top.
    src = "import os\nfrom . import load\n\ndef f():\n    from align.stages import rank\n    import align.hub.card\n"
    found = _imports_in(src, "align.data.rankings")
    assert found == [(2, "align.data.load"), (5, "align.stages.rank"), (6, "align.hub.card")]
    assert [_layer(_unit(t)) > _layer("align.data") for _, t in found] == [False, True, True]


def test_only_align_data_names_the_tiny_world():
    bad = []
    for path in _files():
        if _unit(_module_name(path)) == "align.data":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (
                node.id if isinstance(node, ast.Name)
                else node.attr if isinstance(node, ast.Attribute)
                else None
            )  # fmt: skip
            names = {a.name for a in node.names} if isinstance(node, ast.ImportFrom) else set()
            if name in TINY_WORLD_NAMES or names & TINY_WORLD_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "tests for the tiny world by name outside align/data:\n" + "\n".join(sorted(set(bad)))
