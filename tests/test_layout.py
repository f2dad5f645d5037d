"""The package's layering, checked from the source: imports run one way, feature packages do not
import each other or the command line, and the command line's parser needs no torch.

The packages and modules come from the file system: a package that lands tomorrow is a feature
(held to the feature rules) unless it is named below as an entry point, an engine or a
segment-anything import path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "tinysam"
# Speak to users and other tools (argparse, Label Studio's HTTP API, nuclio's handler): they may
# import anything, and only the command line imports the integrations.
ENTRY_POINTS = {"cli", "integrations"}
# The model and the engines that run it: what features build on.
ENGINES = {"modeling", "runtime"}
# segment-anything's import paths (tinysam.utils.amg, tinysam.build_sam, ...) and the package's
# own re-exports: thin aliases over the rest.
ALIASES = {"tinysam", "utils", "build_sam", "automatic_mask_generator"}
ALIASES |= {"hierarchical_mask_generator"}
# Picks an engine and a model for the entry points (PredictorSpec), and composes features into
# one study (the method in miniature): above the features.
COMPOSITION = {"backends", "miniature"}
# Features that others may build on: the everything generators are public API, like the predictor.
SHARED_FEATURES = {"everything"}


def packages(root: Path = PACKAGE) -> set[str]:
    return {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}


def modules(root: Path = PACKAGE) -> set[str]:
    return {p.stem for p in root.glob("*.py") if p.stem != "__init__"}


def features(root: Path = PACKAGE) -> set[str]:
    """Every package that is not an entry point, an engine or an alias."""
    return packages(root) - ENTRY_POINTS - ENGINES - ALIASES


def _top(module: str) -> str:
    """``tinysam.quant.store`` -> ``quant``; ``tinysam`` -> ``tinysam``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """For each module of the package, every module it imports (lazy imports too), with
    relative imports made absolute."""
    found = defaultdict(set)
    for path in root.rglob("*.py"):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        here = module.split(".") if is_package else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                found[module].add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom):
                found[module].add(node.module)
            elif isinstance(node, ast.Import):
                found[module].update(a.name for a in node.names)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Top-level package or module -> the other top-level ones of the package it imports."""
    edges = defaultdict(set)
    for module, targets in imports(root).items():
        for target in targets:
            if target.split(".")[0] == root.name and _top(target) != _top(module):
                edges[_top(module)].add(_top(target))
    return edges


def layering_problems(root: Path = PACKAGE) -> list[str]:
    """Every import that goes against the layering, as readable lines (empty: all is well)."""
    edges = graph(root)
    problems = []
    feature_set = features(root)
    for feature in sorted(feature_set):
        forbidden = (feature_set - SHARED_FEATURES - {feature}) | ENTRY_POINTS | COMPOSITION
        for target in sorted(edges.get(feature, set()) & forbidden):
            problems.append(f"feature {feature} imports {target}")
    lower = (modules(root) | ENGINES) - ALIASES - COMPOSITION
    for module in sorted(lower):
        for target in sorted(edges.get(module, set()) & (feature_set | ENTRY_POINTS | COMPOSITION)):
            problems.append(f"{module} (below the features) imports {target}")
    for module, targets in sorted(edges.items()):
        if "integrations" in targets and module != "cli":
            problems.append(f"{module} imports integrations (only cli may)")
    return problems


def test_no_import_cycle_between_top_level_modules():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in list(edges):
        if node not in state:
            visit(node, [node])


def test_imports_follow_the_layers():
    assert features() >= {"batch", "distill", "evaluation", "everything", "quant", "serve"}
    assert layering_problems() == []


def test_integrations_use_the_service_not_the_features():
    """integrations/ may use the serving service (its HTTP helpers too, never the web demo's
    app) and the everything generators, and no other feature."""
    allowed = {"serve", "everything"}
    assert not graph().get("integrations", set()) & (features() - allowed)
    for module, targets in imports().items():
        if _top(module) == "integrations":
            assert "tinysam.serve.app" not in targets, module


def test_no_private_name_is_imported_from_another_module():
    """A name another module needs is public (or lives where it is used)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("tinysam")
            ):
                private = [
                    a.name
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
                found += [f"{path.relative_to(REPO)}: {name}" for name in private]
    assert found == [], found


def test_feature_packages_hold_no_argparse():
    found = imports()
    for module, targets in found.items():
        if _top(module) in features():
            assert "argparse" not in targets, module


@pytest.mark.parametrize(
    "new_module, source, problem",
    [
        (
            "newfeature/__init__.py",
            "from ..quant import store\n",
            "feature newfeature imports quant",
        ),
        ("newfeature/x.py", "import tinysam.cli\n", "feature newfeature imports cli"),
        ("helpers.py", "def f():\n    from .serve import app\n", "helpers (below the features)"),
        ("quant/extra.py", "from ..backends import load_model\n", "feature quant imports backends"),
    ],
)
def test_the_layering_check_covers_a_package_the_day_it_lands(
    tmp_path, new_module, source, problem
):
    """A copy of the package with one new file: the check names the import that breaks the
    layers, without anyone adding the new package to a list."""
    import shutil

    root = tmp_path / "tinysam"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "static"))
    path = root / new_module
    path.parent.mkdir(exist_ok=True)
    if path.parent != root and not (path.parent / "__init__.py").exists():
        (path.parent / "__init__.py").write_text("")
    path.write_text(path.read_text() + source if path.exists() else source)
    assert any(problem in line for line in layering_problems(root)), layering_problems(root)


def test_command_parser_imports_no_torch():
    code = "import sys, tinysam.cli as cli; cli.build_parser().parse_args(['segment', '--help'])"
    check = "import sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0 and "--point" in result.stdout
    result = subprocess.run(
        [sys.executable, "-c", "import tinysam.cli as cli; cli.build_parser()\n" + check],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
