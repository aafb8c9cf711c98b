"""PM calibration inside Segmenter (PM-Segmenter's prune pass, pm.md §1.12).

PM's structure (centres and merge segments per layer) comes from the gradient-weighted
attention score; in segmentation the loss is the pixel cross-entropy of the Segmenter
on training crops (labels 255 ignored).  This reuses :func:`pm.calibrate.collect_scores`
unchanged: the Segmenter is wrapped so that ``model(images)`` returns per-pixel logits
(B, K, H, W), which ``F.cross_entropy`` accepts with (B, H, W) targets.  The PM options
(keep, prune, structure=local for PM-Segmenter's per-layer keep, trainable=false for its
frozen M and R) are the reducer spec's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from bench.reducer import ConfigError


class _PixelLogits(nn.Module):
    """``segmentor`` as images -> per-pixel logits at the input size (no sliding: training crops)."""

    def __init__(self, segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images):
        hw = tuple(images.shape[-2:])
        metas = [dict(img_shape=hw, ori_shape=hw, pad_shape=hw)] * images.shape[0]
        return self.segmentor.encode_decode(images, metas)


def _batches(segmentor, loader, max_batches: int):
    for i, data in enumerate(loader):
        if i >= max_batches:
            return
        d = segmentor.data_preprocessor(data, True)
        tgt = torch.stack([s.gt_sem_seg.data[0] for s in d["data_samples"]]).long()
        tgt[tgt == 255] = -100  # F.cross_entropy's ignore index
        yield d["inputs"], tgt


def calibrate(segmentor, loader, iters: int = 20, out: Optional[Path] = None, progress=None) -> dict:
    """Score PM on ``iters`` training batches, set the structure, re-patch; optionally save it."""
    from pm.calibrate import collect_scores

    bb = segmentor.backbone
    red = bb.reducer
    if red.name != "pm":
        raise ConfigError(f"PM calibration needs a pm reducer, the backbone has '{red.name}'")
    info = bb.model_info()
    scores, meta = collect_scores(_PixelLogits(segmentor), red, _batches(segmentor, loader, iters), info,
                                  iters=iters, progress=progress)
    red.structure_from_scores(scores, info, {**meta, "task": "segmentation (pixel CE)"})
    bb.set_reducer(red)  # rebuild M / R from the calibrated structure
    summary = red.per_layer()
    summary["calibration"] = meta
    if out is not None:
        from bench.outputs import temp_file

        with temp_file(Path(out)) as tmp:  # atomic; the temporary is removed on every exit path
            torch.save({"reducer_state": red.export_state()}, tmp)
    return summary


def calibration_loader(cfg, seed: int = 0):
    """The config's training loader with a seeded shuffle and seeded crops/flips (mmengine's sampler
    otherwise draws a fresh seed), so the calibrated structure, hence a row's mIoU and GMACs, is the
    same on every run."""
    import random

    import numpy as np
    from mmengine.runner import Runner

    random.seed(seed)
    np.random.seed(seed)
    return Runner.build_dataloader(cfg.train_dataloader, seed=seed)


def calibrate_to_file(config, spec: str, data: str, checkpoint, out, iters: int = 20) -> dict:
    """Build ``config`` with PM ``spec`` and ``checkpoint``, calibrate on ``data``'s training split,
    save the structure to ``out`` (for ``reducer_structure=`` / ``--reducer-structure``)."""
    from .configs import build_config
    from .evaluate import build_segmentor

    cfg = build_config(config, spec, data, splits=("training",))
    model, _ = build_segmentor(cfg, checkpoint)
    model.eval()
    return calibrate(model, calibration_loader(cfg), iters, out=out)


def finetune(config, spec: str, data: str, checkpoint, structure, out, max_iters: int = 100, **kw) -> dict:
    """PM-Segmenter's fine-tuning: the calibrated structure, M and R as the spec says
    (PM-Segmenter: ``trainable=false``), pixel CE through mmengine's Runner."""
    from .train import train_segmenter

    return train_segmenter(config, out, reducer=spec, data=data, load_from=checkpoint, max_iters=max_iters,
                           cfg_options={"model.backbone.reducer_structure": str(structure)}, **kw)
