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


def test_seg_stage_drops_openmmlab_deprecation_warnings():
    """The pipeline's seg stage is quiet like `pmbench seg-eval` without --verbose: the deprecation
    warnings OpenMMLab's packages raise on every Segmenter build do not reach the run's log."""
    import argparse
    import warnings

    from bench.pipeline.stages import seg as stage

    class Ctx:
        profile = {"data_source": "real"}
        args = argparse.Namespace(ade20k=None, fixture=False, weights=None)
        skipped = None

        def skip_stage(self, name, why):
            self.skipped = (name, why)

    ctx = Ctx()
    with warnings.catch_warnings(record=True) as seen:
        stage.run(ctx)  # no --ade20k: the stage is skipped, after setting the log level
        warnings.warn("pkg_resources is deprecated as an API", UserWarning)
        warnings.warn_explicit("``build_loss`` would be deprecated soon", UserWarning, "builder.py", 36,
                               module="mmseg.models.builder")
        warnings.warn("a warning of the suite's own", UserWarning)
    assert ctx.skipped and ctx.skipped[0] == "seg"
    assert [str(w.message) for w in seen] == ["a warning of the suite's own"]
