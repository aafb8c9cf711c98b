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
from bench.core import registry  # noqa: E402
from bench.core.reducer import ModelInfo  # noqa: E402
from bench.runtime import models  # noqa: E402


def inputs(info: ModelInfo, spec: str, batch: int, width: int, heads: int) -> list[tuple]:
    """(keys, features, r) for every block that merges, at the schedule's token counts; the keys are
    the (B, heads, N, head_dim) view of a qkv projection's output, as the attention hands them over."""
    g = torch.Generator().manual_seed(0)
    out = []
    for bt in registry.build(spec).token_schedule(info):
        r = bt.attn - bt.mlp
        if r > 0:
            qkv = torch.randn(batch, bt.attn, 3 * width, generator=g)
            keys = qkv.reshape(batch, bt.attn, 3, heads, width // heads).permute(2, 0, 3, 1, 4)[1]
            out.append((keys, torch.randn(batch, bt.attn, width, generator=g), r))
    return out


def matching_and_merging(blocks: list[tuple], cls: bool, dist: bool, prop_attn: bool = True) -> None:
    """ToMe's own work in one forward: per merging block the metric (keys averaged over heads), the
    proportional-attention bias (from the second merge on), the matching and the size-weighted merge.
    Sizes are fresh ones per block (their values do not change the work)."""
    for keys, x, r in blocks:
        size = None if x is blocks[0][1] else x.new_full((x.shape[0], x.shape[1], 1), 2.0)
        if prop_attn and size is not None:
            size.log()[:, None, None, :, 0]
        merge, _ = tome.bipartite_soft_matching(keys.mean(1), r, cls, dist, with_map=False)
        tome.merge_wavg(merge, x, size)


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
            t = benchmark.Timer("f(blocks, cls, dist)", globals={"f": matching_and_merging, "blocks": blocks,
                                                                "cls": info.has_cls, "dist": info.has_dist},
                                num_threads=torch.get_num_threads())
            m = t.blocked_autorange(min_run_time=a.min_run_time).median * 1e3
            print(f"| {spec} | {len(blocks)} | {m:.2f} | {m / max(len(blocks), 1):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
