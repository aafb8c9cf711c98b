"""Segmenter commands: mmengine's logs only with ``--verbose``; ``seg-eval --data proxy:smoke`` uses
the smoke proxy Segmenter, not the full one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _seg_cost(*extra):
    return subprocess.run([sys.executable, "-m", "bench.cli", "seg-cost", "--config", "vit-t", "--reducer",
                           "tome:r=8", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_seg_cost_is_quiet_unless_verbose():
    quiet = _seg_cost("--json")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert json.loads(quiet.stdout)["gmacs_per_window"] > 0
    assert len(quiet.stderr.splitlines()) <= 5, quiet.stderr[-3000:]
    loud = _seg_cost("--json", "--verbose")
    assert loud.returncode == 0 and json.loads(loud.stdout) == json.loads(quiet.stdout)
    assert len(loud.stderr.splitlines()) > len(quiet.stderr.splitlines())


def test_seg_eval_proxy_smoke_uses_the_smoke_segmenter(monkeypatch):
    from bench.seg import evaluate, train

    asked = []

    class Stop(Exception):
        pass

    def fake(size="default", **kw):
        asked.append(size)
        raise Stop

    monkeypatch.setattr(train, "ensure_proxy_segmenter", fake)
    with pytest.raises(Stop):
        evaluate.seg_eval("proxy", "none", "proxy:smoke", speed=False)
    assert asked == ["smoke"]
