"""Issue 12's layering rule: ``bench/``'s folders are its layers, and a module imports only modules of
its own or a lower layer (module-level and function-local imports alike); the harness never imports a
method package (``pm``, ``baselines``): methods reach it through the registry.

Layers, lowest first (a module outside them is reported, so a new one must be placed):

0. core      ``bench/core/``: the contract and what it needs (reducer, errors, plugins, registry, patch, flops)
1. runtime   ``bench/runtime/``: data, models, weights, checkpoints, training, evaluation, timing, environment
2. seg       ``bench/seg/``: the Segmenter path
3. pipeline  ``bench/pipeline/``: profiles, overrides, stages, regression gate
4. report    ``bench/report/``: tables, the report folder, the published numbers, plots
5. front-end the command lines at the top of ``bench/`` (``cli``, ``commands/``, ``orchestrate``, ``entry``,
             ``testrun``) and ``bench/seg/cli``
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

LAYERS = {
    "core": ["bench.core"],
    "runtime": ["bench.runtime"],
    "seg": ["bench.seg"],
    "pipeline": ["bench.pipeline"],
    "report": ["bench.report"],
    # orchestrate is run_all.sh's command line (it runs the stages, then writes the reports);
    # seg.cli holds the seg-* commands
    "front-end": ["bench.cli", "bench.commands", "bench.seg.cli", "bench.orchestrate", "bench.entry", "bench.testrun"],
}
ORDER = list(LAYERS)
METHOD_PACKAGES = ("pm", "baselines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str):
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return None if best is None else best[0]


def imported_modules(path: Path, mod: str) -> set[str]:
    """Every repository module ``path`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("bench", *METHOD_PACKAGES)}


def _modules():
    return [(p, module_name(p)) for p in sorted(BENCH.rglob("*.py"))]


def test_every_bench_module_has_a_layer():
    assert [m for _, m in _modules() if m != "bench" and layer_of(m) is None] == []


def violations() -> list[str]:
    """Every import of a higher layer or of a method package, one line each."""
    bad = []
    for path, mod in _modules():
        mine = layer_of(mod)
        if mine is None:
            continue
        for target in imported_modules(path, mod):
            if target.split(".")[0] in METHOD_PACKAGES:
                bad.append(f"{mod} imports the method package {target}")
                continue
            theirs = layer_of(target)
            if theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                bad.append(f"{mod} ({mine}) imports {target} ({theirs})")
    return sorted(set(bad))


def test_no_module_imports_a_higher_layer_or_a_method():
    bad = violations()
    assert bad == [], "\n".join(bad)


def test_the_check_reports_planted_violations(tmp_path, monkeypatch):
    """The checker itself: an upward function-local import and a method import are reported, a
    downward one is not."""
    import sys

    fake = tmp_path / "bench"
    for d in ("core", "pipeline/stages", "report"):
        (fake / d).mkdir(parents=True)
    (fake / "core" / "reducer.py").write_text("def f():\n    from ..orchestrate import main\n")
    (fake / "core" / "flops.py").write_text("import pm.reducer\n")
    (fake / "pipeline" / "stages" / "x.py").write_text(
        "from ...report.writer import write\nfrom ...core import patch\n")
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "BENCH", fake)
    bad = violations()
    assert "bench.core.reducer (core) imports bench.orchestrate (front-end)" in bad
    assert "bench.core.flops imports the method package pm.reducer" in bad
    assert "bench.pipeline.stages.x (pipeline) imports bench.report.writer (report)" in bad
    assert not any("bench.core.patch" in b for b in bad)


# Modules that are configuration data, where built-in method names belong: the built-in reducer list,
# the built-in profiles, the plot colours, the segmentation table's rows, the real-model reference of the
# proxy check, and the published numbers' model names.
CONFIG_DATA = ("bench.core.plugins", "bench.pipeline.profiles", "bench.report.plots", "bench.seg.table",
               "bench.runtime.proxy_ranking", "bench.report.published")
_METHOD_NAME = re.compile(
    r"\b(?:pm|tome|evit|dynamicvit|mstm)(?::|$)|\b(?:PM(?!-Bench)|ToMe|EViT|DynamicViT|MSTM)\b")


def method_names_in_code_at(path: Path, root: Path) -> list[str]:
    """String constants (docstrings aside) that name a built-in method, other than an example ("e.g.")."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(n, clean=False) is not None}
    return [f"{path.relative_to(root)}:{n.lineno}: {n.value[:80]!r}" for n in sorted(
            ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
            and _METHOD_NAME.search(n.value) and "e.g." not in n.value]


def test_the_harness_names_no_method_outside_configuration_data():
    """Issue 12: what the harness does and says about a method comes from the method (its declared
    capabilities and report_notes), so a plug-in gets the same treatment; built-in names appear only
    in the modules that are configuration data, and as examples in help text."""
    found = [hit for path, mod in _modules() if not any(mod == d or mod.startswith(d + ".") for d in CONFIG_DATA)
             for hit in method_names_in_code_at(path, ROOT)]
    assert not found, "\n".join(found)


def test_the_method_name_check_sees_a_planted_name(tmp_path):
    planted = tmp_path / "bench" / "stages" / "x.py"
    planted.parent.mkdir(parents=True)
    planted.write_text('"""Docstrings may cite PM."""\nNOTE = "PM rows: calibrated"\nHELP = "e.g. tome:r=13"\n'
                       'IF = spec.startswith("pm:")\n')
    hits = [h.split(": ", 1)[1] for h in method_names_in_code_at(planted, tmp_path)]
    assert hits == ["'PM rows: calibrated'", "'pm:'"], hits


def import_cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def repository_import_graph() -> dict:
    """module -> the repository modules it imports (module-level and function-local), over bench/, pm/
    and baselines/; ``from pkg import name`` counts as importing ``pkg.name`` where that is a module."""
    mods = {module_name(p): p for root in ("bench", *METHOD_PACKAGES) for p in sorted((ROOT / root).rglob("*.py"))}

    def resolve(m):
        while m and m not in mods:
            m = m.rpartition(".")[0]
        return m

    return {m: sorted({resolve(t) for t in imported_modules(p, m)} - {m, ""}) for m, p in mods.items()}


def test_no_import_cycles():
    """Issue 12: no import cycle, hidden by function-local imports or not."""
    assert import_cycles(repository_import_graph()) == []
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]  # the check works
