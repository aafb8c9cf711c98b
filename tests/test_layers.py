"""Layering of ``bench/``: every module belongs to one layer and imports only its own layer or lower ones,
and nothing in ``bench/`` imports a method package (``pm``, ``baselines``): methods reach the harness
through entry points (``bench/plugins.py`` names the built-in ones as strings).

    core      the contract: reducer, patch, registry, flops, plugin discovery, errors, environment
    runtime   data, preprocessing, models, weights, checkpoints, training, evaluation, speed,
              distributed, calibration, launching, results cache, the proxy, segmentation (bench.seg)
    pipeline  profiles, overrides, stages, the proxy-ranking reference
    report    tables, the report writer, published numbers, plots
    app       the front-ends that compose everything: run_all (orchestrate), pmbench (cli, commands,
              bench.seg.cli), the gate, the test runner, the Ctrl-C-safe entry

Function-local imports count too: deferring an import does not change which way it points.
"""
from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
ORDER = ["core", "runtime", "pipeline", "report", "app"]
LAYERS = {  # module (dotted, below bench) or package prefix -> layer; the longest match wins
    "reducer": "core", "errors": "core", "patch": "core", "registry": "core", "flops": "core",
    "plugins": "core", "env": "core", "__init__": "core",
    "data": "runtime", "preprocess": "runtime", "models": "runtime", "weights": "runtime",
    "checkpoint": "runtime", "train": "runtime", "evaluate": "runtime", "speed": "runtime",
    "distributed": "runtime", "proxy": "runtime", "fixtures": "runtime", "outputs": "runtime",
    "calibration": "runtime", "launch": "runtime", "stats": "runtime", "results": "runtime", "seg": "runtime",
    "profiles": "pipeline", "overrides": "pipeline", "stages": "pipeline", "proxy_ranking": "pipeline",
    "report": "report", "reports_writer": "report", "published": "report", "plots": "report",
    "orchestrate": "app", "cli": "app", "commands": "app", "seg.cli": "app", "gate": "app", "testrun": "app",
    "entry": "app",
}
METHOD_PACKAGES = ("pm", "baselines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BENCH).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str):
    """The layer of ``name`` (dotted, below bench), or None when no entry covers it."""
    best = None
    for key, layer in LAYERS.items():
        if (name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, layer)
    return best and best[1]


def _imports(path: Path):
    """(dotted target, line) of every import in ``path``, relative ones resolved, including those
    inside functions."""
    mod = _module_name(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if mod == "__init__":
        pkg = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module, node.lineno
                continue
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            if node.module:
                yield "bench." + ".".join(base + [node.module]) if base else "bench." + node.module, node.lineno
            else:  # from . import a, b: each name is a module of that package
                for a in node.names:
                    yield "bench." + ".".join(base + [a.name]), node.lineno


def _violations():
    bad, unplaced = [], []
    for path in sorted(BENCH.rglob("*.py")):
        mod = _module_name(path)
        mine = layer_of(mod)
        if mine is None:
            unplaced.append(mod)
            continue
        for target, line in _imports(path):
            top = target.split(".")[0]
            where = f"bench/{path.relative_to(BENCH)}:{line}"
            if top in METHOD_PACKAGES:
                bad.append(f"{where} imports the method package {target}")
            elif top == "bench" and target != "bench":
                theirs = layer_of(target[len("bench."):])
                if theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                    bad.append(f"{where} ({mine}) imports {target} ({theirs})")
    return bad, unplaced


def test_every_module_has_a_layer():
    _, unplaced = _violations()
    assert not unplaced, f"place these modules in a layer (tests/test_layers.py LAYERS): {unplaced}"


def test_imports_point_down_and_never_at_a_method():
    bad, _ = _violations()
    assert not bad, "upward or method imports:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing the orchestrator, or PM, is reported."""
    import sys

    fake = tmp_path / "bench"
    (fake / "stages").mkdir(parents=True)
    (fake / "reducer.py").write_text("def f():\n    from .orchestrate import main\n")
    (fake / "flops.py").write_text("import pm.reducer\n")
    (fake / "stages" / "x.py").write_text("from ..reports_writer import write\nfrom .. import patch\n")
    monkeypatch.setattr(sys.modules[__name__], "BENCH", fake)
    bad, unplaced = _violations()
    assert any("reducer.py:2 (core) imports bench.orchestrate (app)" in b for b in bad)
    assert any("flops.py:1 imports the method package pm.reducer" in b for b in bad)
    assert any("stages/x.py:1 (pipeline) imports bench.reports_writer (report)" in b for b in bad)
    assert not any("bench.patch" in b for b in bad) and not unplaced
