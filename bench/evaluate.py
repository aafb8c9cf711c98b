"""Top-1 / top-5 accuracy, deterministic, each validation sample counted exactly once.

Under torchrun the loader should shard without padding (``bench.data.build_loader(...,
distributed=True)`` does); a loader with torch's ``DistributedSampler`` (which pads
by repeating samples) is handled too: the repeated tail samples are masked out.
Counts and loss sums are all-reduced, so every rank returns the same numbers.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import distributed as dist


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


@torch.inference_mode()
def evaluate(model, loader, device="cpu", amp: bool = False, progress: bool = False) -> dict:
    """Returns dict(top1, top5 (percent), n_images, loss (mean CE), wall_s)."""
    t0 = time.time()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    stats = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, n, loss_sum
    it = loader
    if progress and dist.is_main():
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", mininterval=2.0, leave=False)
    for bi, (x, y) in enumerate(it):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=amp):
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        out = out.float()
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
    model.train(was_training)
    dist.all_reduce_sum(stats)
    n = int(stats[2].item())
    return {
        "top1": 100.0 * stats[0].item() / max(1, n),
        "top5": 100.0 * stats[1].item() / max(1, n),
        "n_images": n,
        "loss": stats[3].item() / max(1, n),
        "wall_s": time.time() - t0,
    }
