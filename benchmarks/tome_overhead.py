"""How long do ToMe's own matching and merging take per forward, alone? (issue 14, docs/speed.md, section 7)

Not a unit test.  The DeiT-T efficiency target (speed-up / MAC ratio >= 0.85) counts only the MACs of the
transformer; ToMe's per-block work (``bipartite_soft_matching`` and ``merge_wavg``, plus the log-size bias of
proportional attention) is extra time.  This times exactly that work, at the token counts a ToMe
configuration gives a model (its ``token_schedule``), on random keys and features of the model's width,
with ``torch.utils.benchmark`` (median of blocked runs), so it can be set against a whole forward's time
from ``benchmarks/efficiency.py``.

    python benchmarks/tome_overhead.py --model deit_tiny_patch16_224 --batch-size 8 --r 8,13,16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import tome  # noqa: E402
from bench.core import patch, registry  # noqa: E402
from bench.core.reducer import ModelInfo, TokenState  # noqa: E402
from bench.runtime import models  # noqa: E402


def inputs(info: ModelInfo, spec: str, batch: int, width: int, heads: int) -> list[tuple]:
    """(block index, keys, features) for every block that merges, at the schedule's token counts; the
    keys are the (B, heads, N, head_dim) view of a qkv projection's output, as the attention has them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, bt in enumerate(registry.build(spec).token_schedule(info)):
        if bt.attn > bt.mlp:
            qkv = torch.randn(batch, bt.attn, 3 * width, generator=g)
            keys = qkv.reshape(batch, bt.attn, 3, heads, width // heads).permute(2, 0, 3, 1, 4)[1]
            out.append((i, keys, torch.randn(batch, bt.attn, width, generator=g)))
    return out


def matching_and_merging(reducer: tome.ToMe, model, info: ModelInfo, blocks: list[tuple]) -> None:
    """ToMe's own work in one forward, through its own hooks as the patched block calls them: per merging
    block the attention request (the log-size bias of proportional attention), the metric (keys averaged
    over heads, as ``bench.core.patch.attention`` computes it) and ``post_attn`` (matching and the
    size-weighted merge, inference bookkeeping only)."""
    x0 = blocks[0][2]
    st = TokenState(batch=x0.shape[0], n_prefix=info.n_prefix, grid=info.grid, n0=x0.shape[1], track=False)
    reducer.begin(model, x0, st)
    for i, keys, x in blocks:
        reducer.attn_request(i, None, x, st)
        reducer.post_attn(i, None, x, {"keys": patch.head_mean(keys)}, st)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--r", default="8,13,16", help="comma list of ToMe r values")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = models.create(a.model).eval()
    info = ModelInfo.from_model(model)
    width, heads = model.embed_dim, model.blocks[0].attn.num_heads
    print(f"{a.model}, batch {a.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| config | merging blocks | ms per forward | ms per block |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for r in a.r.split(","):
            spec = f"tome:r={r}"
            blocks = inputs(info, spec, a.batch_size, width, heads)
            t = benchmark.Timer("f(reducer, model, info, blocks)", num_threads=torch.get_num_threads(),
                                globals={"f": matching_and_merging, "reducer": registry.build(spec),
                                         "model": model, "info": info, "blocks": blocks})
            m = t.blocked_autorange(min_run_time=a.min_run_time).median * 1e3
            print(f"| {spec} | {len(blocks)} | {m:.2f} | {m / max(len(blocks), 1):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
