"""Speed goals as pytest-benchmark benchmarks (never as timed assertions in the test suite).

In the normal suite each runs once (rounds=1) as a smoke test; for real numbers run
``PMBENCH_BENCH_ROUNDS=50 pytest tests/test_bench_speed.py --benchmark-only`` on an idle
machine and compare the group (baseline vs ToMe vs EViT on the same tiny model).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.core import patch, registry

pytestmark = pytest.mark.benchmark(group="tiny-vit-forward", warmup=False)
ROUNDS = int(os.environ.get("PMBENCH_BENCH_ROUNDS", "1"))


@pytest.mark.parametrize("spec", ["none", "tome:r=8", "evit:keep=0.7"])
def test_forward_throughput(benchmark, make_vit, spec):
    model = make_vit()
    patch.apply(model, registry.build(spec))
    x = torch.randn(8, 3, 64, 64)

    def run():
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == (8, 10)


def test_tome_overhead_benchmark_times_the_schedules_merges(capsys):
    """benchmarks/tome_overhead.py (docs/speed.md, section 7) times ToMe's own work at the token counts of
    the configuration's schedule: one row per r, one merging block per block that merges."""
    import importlib.util
    from pathlib import Path

    from bench.core.reducer import ModelInfo
    from bench.runtime import models

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tome_overhead.py"
    spec = importlib.util.spec_from_file_location("tome_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = ModelInfo.from_model(models.create("deit_tiny_patch16_224"))
    blocks = mod.inputs(info, "tome:r=16", 2, 192, 3)
    sched = registry.build("tome:r=16").token_schedule(info)
    assert [(i, k.shape[2]) for i, k, _ in blocks] == [(i, b.attn) for i, b in enumerate(sched) if b.attn > b.mlp]
    assert blocks[0][1].shape == (2, 3, 197, 64) and blocks[0][2].shape == (2, 197, 192)
    assert mod.main(["--r", "8", "--batch-size", "1", "--min-run-time", "0.01"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tome:r=8 |")]
    assert len(row) == 1 and row[0].split("|")[2].strip() == "12"
