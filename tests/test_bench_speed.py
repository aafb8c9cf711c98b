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
