"""The package's layering, checked from the source: imports run one way, feature packages do not
import each other or the command line, and the command line's parser needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict

from conftest import REPO

PACKAGE = REPO / "tinysam"
FEATURES = {"distill", "quant", "evaluation", "serve", "everything"}
# Features that others may build on: the everything generators are public API, like the predictor.
SHARED_FEATURES = {"everything"}


def _top(module: str) -> str:
    """``tinysam.quant.store`` -> ``quant``; ``tinysam`` -> ``tinysam``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports() -> dict[str, set[str]]:
    """For each module of the package, the package modules it imports (lazy imports too)."""
    found = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        here = module.split(".") if is_package else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                found[module].add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinysam"):
                found[module].add(node.module)
            elif isinstance(node, ast.Import):
                found[module].update(a.name for a in node.names if a.name.startswith("tinysam"))
    return found


def _graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for module, targets in _imports().items():
        for target in targets:
            if _top(target) != _top(module):
                graph[_top(module)].add(_top(target))
    return graph


def test_no_import_cycle_between_top_level_modules():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_features_import_no_sibling_feature_and_no_cli():
    graph = _graph()
    for feature in FEATURES:
        forbidden = (FEATURES - SHARED_FEATURES - {feature}) | {"cli", "backends"}
        assert not graph.get(feature, set()) & forbidden, (feature, graph.get(feature))
    # The batch runner runs any feature's job without importing one; embeddings sit below.
    assert not graph.get("batch", set()) & (FEATURES | {"cli", "backends"}), graph.get("batch")
    lower = {"modeling", "checks", "transforms", "masks", "io", "checkpoint", "predictor_base"}
    lower |= {"formats", "embeddings"}
    for module in lower:
        assert not graph.get(module, set()) & (FEATURES | {"cli", "backends"}), module


def test_integrations_are_entry_points_beside_cli():
    """integrations/ speaks other tools' contracts (Label Studio's HTTP API, nuclio's handler):
    an entry point like cli, so it may use serve and backends, and only cli imports it."""
    graph = _graph()
    assert not graph.get("integrations", set()) & (FEATURES - {"serve", "everything"} | {"cli"})
    importers = {module for module, targets in graph.items() if "integrations" in targets}
    assert importers <= {"cli"}, importers


def test_feature_packages_hold_no_argparse():
    for feature in FEATURES:
        for path in (PACKAGE / feature).rglob("*.py"):
            assert "argparse" not in path.read_text(), path


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
