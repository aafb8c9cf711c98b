"""External reducers through the ``pmbench.reducers`` entry-point group.

tests/plugin_fixture is a complete one-module distribution.  It is "installed" offline into a
temporary directory the way pip lays out an installed distribution (the module plus a
``*.dist-info`` folder with METADATA and entry_points.txt, both taken from the fixture's
pyproject.toml), which importlib.metadata discovers once the directory is on sys.path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_install import install

from bench.core import flops, patch, registry
from bench.core.reducer import ConfigError, ModelInfo

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "plugin_fixture"


def install_fixture(target: Path) -> Path:
    """Install tests/plugin_fixture into ``target`` (no network, no build step)."""
    return install(FIXTURE, target)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    return install_fixture(tmp_path_factory.mktemp("site"))


def _pmbench(args, plugin_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    exe = Path(sys.executable).parent / "pmbench"  # the installed console script when present
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bench.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_list_finds_plugin(plugin_dir):
    p = _pmbench(["list", "--json"], plugin_dir)
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["reducers"]}
    row = rows["droplast"]
    assert "error" not in row, row
    assert row["source"].startswith("plugin") and "pmb_droplast:DropLast" in row["source"]
    assert set(row["options"]) == {"n", "block"} and row["default_spec"] == "droplast:block=0,n=1"
    assert {"none", "tome", "evit"} <= set(rows)


def test_flops_runs_plugin(plugin_dir):
    p = _pmbench(["flops", "--model", "deit_tiny_patch16_224", "--reducer", "droplast:n=3,block=2",
                  "--measure", "--json"], plugin_dir)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["reducer"] == "droplast:block=2,n=3"
    counts = [(b["attn_tokens"], b["mlp_tokens"]) for b in out["blocks"]]
    assert counts == [(197, 197)] * 2 + [(197, 194)] + [(194, 194)] * 9
    # the measured count comes from a real forward through the plug-in's hooks
    assert abs(out["measured_macs"] - out["total_macs"]) / out["total_macs"] < 0.01


def test_plugin_errors_reach_the_cli(plugin_dir, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--reducer", "droplast:block=12"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "past the model depth" in err


def test_plugin_in_process(plugin_dir, monkeypatch, make_vit, run_and_check_schedule):
    """Discovery depends on sys.path only; the plug-in then behaves like a built-in."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    assert "droplast" not in registry.available()
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert "droplast" in registry.available()
    with pytest.raises(ConfigError, match="valid options: block, n"):
        registry.build("droplast:m=1")
    model = make_vit()
    red = registry.build("droplast:n=5,block=1")
    patch.apply(model, red)
    patch.set_tracking(model, True)
    rec = run_and_check_schedule(model, red, torch.randn(2, 3, 64, 64))
    assert rec["mlp"][1] == 60
    origin = patch.last_state(model).origin
    assert torch.all(origin[:, -5:] == -1) and torch.equal(origin[0, :60], torch.arange(60))
    assert flops.analytic(ModelInfo.from_model(model), red).total < flops.analytic(
        ModelInfo.from_model(model), registry.build("none")).total
