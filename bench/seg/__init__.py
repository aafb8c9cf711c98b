"""Segmentation: every registered reducer inside mmsegmentation's Segmenter.

* :mod:`bench.seg.backbone`   ``PMBenchViT``: a Segmenter backbone (registered in mmseg's
  ``MODELS``) built on a timm ``VisionTransformer``, so :func:`bench.core.patch.apply` runs any
  reducer in it unchanged; it restores the full token grid through ``Reducer.restore``.
  mmseg ViT checkpoints load directly (keys are renamed on load).
* :mod:`bench.seg.configs`    configs derived from mmseg's stock Segmenter configs, with the
  reducer chosen by one option; dataset wiring (ADE20K, proxy).
* :mod:`bench.seg.proxy_data` the deterministic embedded proxy segmentation set.
* :mod:`bench.seg.cost`       segmentation GMACs (encoder + decode head) and FPS.
* :mod:`bench.seg.train`      mmengine Runner training (CPU, torchrun gloo, CUDA);
  :func:`ensure_proxy_segmenter`.
* :mod:`bench.seg.evaluate`   :func:`seg_eval`: mIoU (IoUMetric, sliding window), cost, speed.

The package itself imports nothing (``import bench.seg`` is cheap and no sub-module depends on it);
callers import the sub-module they use, e.g. ``from bench.seg.evaluate import seg_eval``.
"""
