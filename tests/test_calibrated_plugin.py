"""Issue 12's acceptance test: a third-party *calibrated* method goes through every stage.

tests/calibrated_plugin_fixture is a distribution the suite knows nothing about: ``scoredrop``
scores every patch position on calibration batches (the loss gradient's magnitude on the patch's
pixels) and drops the lowest-scoring ones.  It declares the :class:`bench.core.reducer.Calibrated`
capability and adds a ``pmbench`` sub-command through the ``pmbench.commands`` entry-point group.
Installed into a temporary folder (as tests/test_plugin.py installs its fixture), with no file of
this repository edited, ``./run_all.sh --profile smoke --configs SPEC`` (with a profile file that
trims the profile's own rows) calibrates it, checkpoints the structure, evaluates it, fine-tunes it,
counts it, times it and segments it (calibrated on the Segmenter's training crops), and every table
has its rows.  The proxy data and backbones are the repository's cached ones; results are fresh.
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

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "calibrated_plugin_fixture"
SPEC = "scoredrop:n=20,at=2"


def _cache(tmp: Path) -> Path:
    """A fresh results cache that shares the repository's cached proxy data and backbones."""
    cache = tmp / "cache"
    cache.mkdir()
    src = ROOT / ".cache" / "proxy"
    src.mkdir(parents=True, exist_ok=True)
    (cache / "proxy").symlink_to(src, target_is_directory=True)
    return cache


def _run(args, site, cache, timeout=1500):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PMBENCH_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_a_calibrated_plugin_goes_through_every_stage(tmp_path):
    (tmp_path / "site").mkdir()
    site = install(FIXTURE, tmp_path / "site")
    cache = _cache(tmp_path)
    trim = tmp_path / "trim.json"
    trim.write_text(json.dumps({"accuracy_configs": ["none"], "finetune_configs": [], "cost_configs": ["none"],
                                "ablations": [], "seg_keeps": [0.5], "speed": {"min_time": 0.05, "repeats": 3}}))
    out = tmp_path / "rep"
    p = _run(["-m", "bench.orchestrate", "--profile", "smoke", "--configs", SPEC, "--profile-file", str(trim),
              "--out", str(out)], site, cache)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"scoredrop-calibrate {SPEC}" in p.stderr

    # calibrated: the checkpoint holds the learned structure, not the data-free default
    (ckpt,) = (cache / "runs" / "smoke" / "checkpoints").glob("scoredrop-*.pt")
    state = torch.load(ckpt, weights_only=True)["reducer_state"]
    assert state["format"] == "scoredrop/1" and len(state["drop"]) == 20 and state["grid"] == [14, 14]
    assert state["drop"] != list(range(176, 196))

    tables = {name: json.loads((out / f"{name}.json").read_text())
              for name in ("accuracy", "flops", "throughput", "segmentation", "learned_structure")}
    acc = {(r["config"], r["kind"]): r for r in tables["accuracy"]["rows"]}
    assert acc[(SPEC, "off-the-shelf")]["structure"] == "calibrated"
    assert acc[(SPEC, "fine-tuned")]["structure"] == "fine-tuned" and acc[(SPEC, "fine-tuned")]["steps"] == 3
    assert acc[(SPEC, "off-the-shelf")]["gmacs"] < acc[("none", "off-the-shelf")]["gmacs"]
    assert all(0 <= r["top1"] <= 100 for r in acc.values())

    fl = {(r["config"], r["structure"]): r for r in tables["flops"]["rows"]}
    assert {(SPEC, "calibrated"), (SPEC, "fine-tuned")} <= set(fl)
    assert fl[(SPEC, "calibrated")]["gmacs"] < fl[("none", None)]["gmacs"]
    sp = {(r["config"], r["structure"]) for r in tables["throughput"]["rows"] if r["speedup"] > 0}
    assert {(SPEC, "calibrated"), (SPEC, "fine-tuned")} <= sp

    seg = {r["config"]: r for r in tables["segmentation"]["rows"]}
    assert seg[SPEC]["method"] == "scoredrop" and 0 <= seg[SPEC]["miou"] <= 100
    assert seg[SPEC]["gmacs_per_window"] < seg["none"]["gmacs_per_window"]
    assert [r["config"] for r in tables["learned_structure"]["rows"]] == [SPEC]
    for name, t in tables.items():
        assert SPEC in json.dumps(t["rows"]), name

    # the plug-in's own sub-command, found through the pmbench.commands entry-point group
    h = _run(["-m", "bench.cli", "--help"], site, cache, timeout=120)
    assert h.returncode == 0 and "scoredrop-info" in h.stdout
    c = _run(["-m", "bench.cli", "scoredrop-info", str(ckpt)], site, cache, timeout=120)
    assert c.returncode == 0 and json.loads(c.stdout) == state["drop"]
