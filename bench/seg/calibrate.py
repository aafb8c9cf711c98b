"""Calibration of a :class:`bench.core.reducer.Calibrated` method inside Segmenter (e.g. PM-Segmenter's
prune pass: docs/methods/pm.md, "Segmentation").

The backbone's reducer calibrates through its own :meth:`~bench.core.reducer.Calibrated.calibrate`, the
same call as in classification; in segmentation the loss is the pixel cross-entropy of the
Segmenter on training crops (labels 255 ignored): the Segmenter is wrapped so that ``model(images)``
returns per-pixel logits (B, K, H, W), which ``F.cross_entropy`` accepts with (B, H, W) targets.
The method's options (e.g. PM's keep, prune, structure=local for PM-Segmenter's per-layer keep,
trainable=false for its frozen M and R) are the reducer spec's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from bench.core.reducer import Calibrated, ConfigError
from bench.runtime.outputs import temp_file


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
    """Calibrate the backbone's reducer on ``iters`` training batches, re-patch; optionally save the
    structure (a ``{"reducer_state": ...}`` file for ``reducer_structure=``)."""
    bb = segmentor.backbone
    red = bb.reducer
    if not isinstance(red, Calibrated):
        raise ConfigError(f"reducer '{red.name}' learns no structure from data: nothing to calibrate")
    info = bb.model_info()
    summary = red.calibrate(_PixelLogits(segmentor), _batches(segmentor, loader, iters), info, iters=iters,
                            progress=progress, meta={"task": "segmentation (pixel CE)"})
    bb.set_reducer(red)  # rebuild the modules made from the structure (PM: M / R)
    if out is not None:
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
