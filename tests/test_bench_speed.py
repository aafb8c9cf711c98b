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


def test_tome_overhead_benchmark_times_the_schedules_merges(capsys, load_benchmark):
    """benchmarks/tome_overhead.py (docs/speed.md, section 7) times ToMe's own work at the token counts of
    the configuration's schedule: one row per r, one merging block per block that merges."""
    from bench.core.reducer import ModelInfo
    from bench.runtime import models

    mod = load_benchmark("tome_overhead")
    info = ModelInfo.from_model(models.create("deit_tiny_patch16_224"))
    blocks = mod.inputs(info, "tome:r=16", 2, 192, 3)
    sched = registry.build("tome:r=16").token_schedule(info)
    assert [(i, k.shape[2]) for i, k, _ in blocks] == [(i, b.attn) for i, b in enumerate(sched) if b.attn > b.mlp]
    assert blocks[0][1].shape == (2, 3, 197, 64) and blocks[0][2].shape == (2, 197, 192)
    assert mod.main(["--r", "8", "--batch-size", "1", "--min-run-time", "0.01"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tome:r=8 |")]
    assert len(row) == 1 and row[0].split("|")[2].strip() == "12"


def test_efficiency_benchmark_reports_host_load_and_contended_pairs(capsys, tmp_path, load_benchmark):
    """benchmarks/efficiency.py prints the host load of its timings and, per configuration, how many pairs
    contention left out (docs/speed.md, section 1, step 7), and writes them to its JSON."""
    import json

    from bench.runtime import fixtures

    mod = load_benchmark("efficiency")
    out = tmp_path / "eff.json"
    mod.main(["--model", fixtures.TINY_MODEL, "--configs", "tome:r=2", "--batch-size", "1", "--min-time", "0.01",
              "--repeats", "3", "--extra-repeats", "0", "--refill-repeats", "0", "--target", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| contended pairs | unsteady pairs |" in text and "| tome:r=2 " in text
    data = json.loads(out.read_text())
    assert data["rows"][0]["contended"] >= 0 and data["rows"][0]["unsteady"] >= 0 and data["host_load"]["timings"] == 1 + 2 * 3  # B r B r B r B
    if data["host_load"]["measured"]:
        assert "host load (other processes + steal)" in text


def test_agreement_benchmark_shows_contended_pairs(capsys, tmp_path, load_benchmark):
    """benchmarks/speed_agreement.py --reuse compares two report folders row by row and shows, per row, the
    pairs each run left out (contended, unsteady) next to the difference."""
    import json

    mod = load_benchmark("speed_agreement")
    base = {"model": "DeiT-S", "method": "tome", "config": "tome:r=13", "structure": None, "variant": "eager",
            "precision": "fp32", "batch_size": 8, "noisy": False}
    for name, sp, left, shaky in (("a", 1.80, 0, 3), ("b", 1.95, 2, 1)):
        d = tmp_path / name
        d.mkdir()
        (d / "throughput.json").write_text(json.dumps({"rows": [{**base, "speedup": sp, "contended": left,
                                                                 "unsteady": shaky}]}))
    assert mod.main(["--reuse", str(tmp_path / "a"), str(tmp_path / "b"), "--models", "DeiT-S"]) == 1
    row = [line for line in capsys.readouterr().out.splitlines() if "tome:r=13" in line and line.startswith("|")]
    assert len(row) == 1 and "| 0/2 " in row[0] and "| 3/1 " in row[0] and "NO" in row[0]
