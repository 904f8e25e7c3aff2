"""The layering, read from the source with ``ast``: the library never imports the application.

Library (bottom to top): errors, _atomic, _json, _tensors, axes < rules < capture, sharded < per_example, verify < stats <
distributed < checks. Applications: train < integrations < report < cli (the callbacks write
the trainer's metrics.csv schema). A module imports only
from its own layer or below (docs: shared/DESIGN.md); lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src"
LAYERS = [
    ("errors", "_atomic", "_json", "_tensors", "axes"),
    ("rules",),
    ("capture", "sharded"),
    ("per_example", "verify"),
    ("stats",),
    ("distributed",),
    ("checks",),
    ("train",),
    ("integrations",),
    ("report",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
LIBRARY = {name for names in LAYERS[: LAYERS.index(("checks",)) + 1] for name in names}


def imported_pergrad_parts(source: str, module: str) -> set[str]:
    """The top-level parts of pergrad (``rules``, ``train``, …) that ``source`` imports, for the
    module named ``module`` (e.g. ``pergrad.checks.identity``); relative imports resolved."""
    package = module.split(".")[:-1]
    parts = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
        else:
            continue
        for name in names:
            path = name.split(".")
            if path[0] == "pergrad" and len(path) > 1:
                parts.add(path[1])
    return parts


def violations(name: str, source: str) -> list[str]:
    """The parts of pergrad that module ``name`` imports from layers above its own."""
    own = name.split(".")[1]
    imported = imported_pergrad_parts(source, name) - {own}
    return sorted(p for p in imported if RANK.get(p, -1) > RANK[own])


def _layered_modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module under a layer (not pergrad/__init__ or __main__)."""
    modules = []
    for path in sorted((SRC / "pergrad").rglob("*.py")):
        relative = path.relative_to(SRC).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if len(parts) > 1 and parts[1] != "__main__":
            modules.append((".".join(parts), path))
    return modules


def test_the_resolver_reads_relative_absolute_and_lazy_imports():
    source = (
        "from ..train.config import TrainConfig\nfrom .. import report, stats\nimport pergrad.cli.main\n"
        "from . import additivity\ndef f():\n    from ...pergrad_elsewhere import x\n    from ..integrations import y\n"
    )
    assert imported_pergrad_parts(source, "pergrad.checks.identity") == {
        "train", "report", "stats", "cli", "checks", "integrations",
    }  # fmt: skip
    assert violations("pergrad.checks.suite", source) == ["cli", "integrations", "report", "train"]
    assert violations("pergrad.report.build", source) == ["cli"]


def test_every_part_of_the_package_has_a_layer():
    parts = {name.split(".")[1] for name, _ in _layered_modules()}
    assert parts <= set(RANK), f"give these a layer in LAYERS: {parts - set(RANK)}"
    assert {"errors", "per_example", "stats", "checks", "train", "report", "cli"} <= parts


@pytest.mark.parametrize("name, path", _layered_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_modules_import_only_their_own_layer_or_below(name, path):
    above = violations(name, path.read_text())
    if name.split(".")[1] in LIBRARY:
        assert not (set(above) - LIBRARY), f"library module {name} imports the application: {above}"
    assert not above, f"{name} imports from layers above its own: {above}"
