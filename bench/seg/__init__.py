"""Segmentation: every registered reducer inside mmsegmentation's Segmenter.

* :mod:`bench.seg.backbone`   ``PMBenchViT``: a Segmenter backbone (registered in mmseg's
  ``MODELS``) built on a timm ``VisionTransformer``, so :func:`bench.patch.apply` runs any
  reducer in it unchanged; it restores the full token grid through ``Reducer.restore``.
  mmseg ViT checkpoints load directly (keys are renamed on load).
* :mod:`bench.seg.configs`    configs derived from mmseg's stock Segmenter configs, with the
  reducer chosen by one option; dataset wiring (ADE20K, proxy).
* :mod:`bench.seg.proxy_data` the deterministic embedded proxy segmentation set.
* :mod:`bench.seg.cost`       segmentation GMACs (encoder + decode head) and FPS.
* :mod:`bench.seg.train`      mmengine Runner training (CPU, torchrun gloo, CUDA);
  :func:`ensure_proxy_segmenter`.
* :mod:`bench.seg.evaluate`   :func:`seg_eval`: mIoU (IoUMetric, sliding window), cost, speed.

Heavy imports (mmseg, mmengine) happen inside the sub-modules, so ``import bench.seg`` is cheap.
"""
from __future__ import annotations


def ensure_proxy_segmenter(force: bool = False, **kw):
    from .train import ensure_proxy_segmenter as f

    return f(force=force, **kw)


def seg_eval(config, reducer="none", data="proxy", checkpoint=None, opts=None, **kw) -> dict:
    """:func:`bench.seg.evaluate.seg_eval` (``opts``: a :class:`bench.seg.evaluate.SegEvalConfig`)."""
    from .evaluate import seg_eval as f

    return f(config, reducer, data, checkpoint, opts, **kw)


__all__ = ["ensure_proxy_segmenter", "seg_eval"]
