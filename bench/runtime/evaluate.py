"""Top-1 / top-5 accuracy, deterministic, each validation sample counted exactly once.

Under torchrun the loader should shard without padding (``bench.runtime.data.build_loader(...,
distributed=True)`` does); a loader with torch's ``DistributedSampler`` (which pads
by repeating samples) is handled too: the repeated tail samples are masked out.
Counts and loss sums are all-reduced, so every rank returns the same numbers.

``keep_preds=True`` also returns every image's prediction (dataset index, label,
top-1 class, correct), gathered from all ranks in dataset order: the per-image
record behind paired statistics (:mod:`bench.runtime.stats`) and ``pmbench eval --save-preds``.
Non-finite logits (NaN weights, an overflow) are an error, never a score.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.core.reducer import ConfigError
from bench.runtime import distributed as dist


def _padding_mask(loader, batch_index: int, batch_len: int):
    """For a padding DistributedSampler: which samples of this batch are real (not repeats)."""
    s = getattr(loader, "sampler", None)
    if not isinstance(s, torch.utils.data.distributed.DistributedSampler) or s.drop_last:
        return None
    n = len(s.dataset)
    start = batch_index * loader.batch_size
    local = torch.arange(start, start + batch_len)
    global_pos = s.rank + local * s.num_replicas
    return global_pos < n


def _sample_order(loader) -> list[int] | None:
    """Dataset indices in the order this rank's loader yields them (None if unknown)."""
    s = getattr(loader, "sampler", None)
    if hasattr(s, "indices") and callable(s.indices) and not getattr(s, "shuffle", False):
        return list(s.indices())[getattr(s, "skip", 0):]
    if isinstance(s, torch.utils.data.distributed.DistributedSampler) and not s.shuffle:
        return list(range(s.rank, len(s.dataset), s.num_replicas))
    if isinstance(s, torch.utils.data.SequentialSampler):
        return list(range(len(s.data_source)))
    return None


@torch.inference_mode()
def evaluate(model, loader, device="cpu", amp: bool = False, progress: bool = False,
             keep_preds: bool = False) -> dict:
    """Returns dict(top1, top5 (percent), n_images, correct_top1, correct_top5, loss (mean CE), wall_s[, preds])."""
    t0 = time.time()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    stats = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, n, loss_sum
    order = _sample_order(loader) if keep_preds else None
    preds: list[tuple[int, int, int]] = []  # (position in this rank's order, label, top-1 class)
    pos = 0
    it = loader
    if progress and dist.is_main():
        import sys

        from tqdm import tqdm

        it = tqdm(loader, desc="eval", mininterval=2.0, leave=False, file=sys.stderr, dynamic_ncols=True)
    for bi, (x, y) in enumerate(it):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=amp):
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        out = out.float()
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).any(dim=1).sum())
            raise ConfigError(f"the model produced non-finite logits (NaN/inf) for {bad} of {x.shape[0]} images "
                              f"in batch {bi}: the weights hold NaN/inf or the precision overflows; check the "
                              "checkpoint/weights (and try without --amp)")
        if y.numel() and (int(y.max()) >= out.shape[1] or int(y.min()) < 0):
            raise ConfigError(f"label {int(y.max())} is outside the model's {out.shape[1]} classes; the data's "
                              "label space does not match the model's head")
        n_in = x.shape[0]
        keep = _padding_mask(loader, bi, x.shape[0])
        if keep is not None:
            keep = keep.to(device)
            out, y = out[keep], y[keep]
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top == y[:, None]
        stats[0] += hit[:, :1].sum().item()
        stats[1] += hit.any(dim=1).sum().item()
        stats[2] += y.numel()
        stats[3] += F.cross_entropy(out, y, reduction="sum").item()
        if keep_preds:
            for j, (lab, p) in enumerate(zip(y.tolist(), top[:, 0].tolist())):
                preds.append((pos + j, lab, p))
        pos += n_in
    model.train(was_training)
    dist.all_reduce_sum(stats)
    n = int(stats[2].item())
    if n == 0:
        raise ConfigError("the evaluation loader yielded no images")
    res = {
        "top1": 100.0 * stats[0].item() / n,
        "top5": 100.0 * stats[1].item() / n,
        "n_images": n,
        "correct_top1": int(stats[0].item()),  # the counts behind top1 / top5 (exact, for recomputing them)
        "correct_top5": int(stats[1].item()),
        "loss": stats[3].item() / n,
        "wall_s": time.time() - t0,
    }
    if keep_preds:
        mine = [((order[p] if order is not None else p), lab, pr) for p, lab, pr in preds]
        merged = sorted(r for part in dist.gather_objects(mine) for r in part)
        res["preds"] = [{"index": i, "label": lab, "pred": pr, "correct": int(lab == pr)} for i, lab, pr in merged]
    return res


def correct_bits(preds: list[dict]) -> str:
    """Per-image correctness in dataset order as a compact '0'/'1' string (stored in results)."""
    return "".join(str(p["correct"]) for p in sorted(preds, key=lambda p: p["index"]))
