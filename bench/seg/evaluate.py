"""``seg_eval``: mIoU with mmseg's IoUMetric and the config's sliding-window test, plus cost and FPS.

The test loop is mmengine's (dataloader from the config, ``model.test_step``,
``Evaluator(IoUMetric)``) run in-process, so the model can be built with the reducer
and the checkpoint converted before evaluation.  Weights: ``checkpoint`` (mmseg,
mmengine, this suite's, or an original Segmenter release); the proxy config falls back
to the cached proxy Segmenter (trained on first use); other configs without a
checkpoint fail with a clear message unless ``random_weights=True`` (smoke tests).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from bench.core import registry
from bench.core.reducer import Calibrated, ConfigError
from bench.runtime import env

from bench.seg import configs as segconfigs, cost
from bench.seg.calibrate import calibrate, calibration_loader


def _is_proxy(cfg) -> bool:
    return any(ds.get("type") == "PMBenchProxySegDataset" for _, ds in segconfigs._datasets(cfg))


def build_segmentor(cfg, checkpoint=None, *, random_weights: bool = False, trust: bool = False):
    """EncoderDecoder from ``cfg`` with weights; returns (model, load_info)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from bench.seg.checkpoint import load_into

    init_default_scope("mmseg")
    cfg.model.pretrained = None
    cfg.model.backbone.pretrained = None
    torch.manual_seed(0)  # reducer modules absent from the checkpoint start from a reproducible init
    model = MODELS.build(cfg.model)
    info = {"weights": "random"}
    if checkpoint is not None:
        info = load_into(model, checkpoint, trust=trust)
        info["weights"] = str(checkpoint)
    elif random_weights:
        model.init_weights()
    else:
        raise ConfigError(
            "no Segmenter weights: pass --checkpoint FILE (an mmseg Segmenter checkpoint such as "
            "segmenter_vit-t_mask_8x1_512x512_160k_ade20k_20220105_151706-ffcf7509.pth, or an original "
            "Segmenter release checkpoint.pth); this machine cannot download them. "
            "--random-weights runs the pipeline with untrained weights (smoke tests only)"
        )
    return model, info


def _reference_crop(model, data, crop) -> torch.Tensor:
    """One real crop (3, h, w) of the first evaluation image, zero-padded up to the crop size."""
    x = model.data_preprocessor(data, False)["inputs"][0]
    x = x[:, : crop[0], : crop[1]]
    ph, pw = crop[0] - x.shape[1], crop[1] - x.shape[2]
    if ph > 0 or pw > 0:
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)))
    return x.detach().cpu()


@dataclass
class SegEvalConfig:
    """The options of :func:`seg_eval` (everything but what to evaluate and the log).

    ``random_weights``: untrained weights when there is no checkpoint (smoke tests); ``trust``: allow
    pickled (non-weights-only) checkpoints; ``speed``: measure FPS at each of ``fps_batches`` with
    ``speed_warmup`` / ``speed_iters`` / ``speed_repeats``; ``max_images``: stop after this many
    evaluation images; ``reducer_structure``: a calibrated structure file; ``calib_iters``: training
    batches to calibrate a :class:`bench.core.reducer.Calibrated` method without one (0: do not calibrate).
    """
    random_weights: bool = False
    trust: bool = False
    speed: bool = True
    fps_batches: tuple = (32, 1)
    speed_warmup: int = 1
    speed_iters: int = 1
    speed_repeats: int = 3
    device: Optional[str] = None
    max_images: Optional[int] = None
    num_workers: int = 0
    reducer_structure: Optional[str] = None
    calib_iters: int = 20

    def validate(self) -> None:
        for name in ("max_images", "speed_iters", "speed_repeats"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be >= 1 (or not given), got {v}")


def seg_eval(config, reducer: str = "none", data: Optional[str] = "proxy", checkpoint=None,
             opts: Optional[SegEvalConfig] = None, *, log=None, **overrides) -> dict:
    """Evaluate ``config`` with ``reducer`` on ``data``; returns a JSON-able dict.

    ``opts`` (a :class:`SegEvalConfig`) holds the options; keyword ``overrides`` name its fields
    (``seg_eval(..., speed=False)`` is ``seg_eval(..., SegEvalConfig(speed=False))``).

    Keys: ``miou``, ``aAcc`` (percent), ``gmacs_per_window`` (at the config's crop size),
    ``gmacs_per_image`` (mean over the evaluated images, summed over their windows),
    ``fps_bs32``, ``fps_bs1`` (windows/s, None when ``speed`` is off), ``stamp``, and details.

    A :class:`bench.core.reducer.Calibrated` method without a structure file (e.g. PM) is calibrated first
    (:mod:`bench.seg.calibrate`: pixel-CE loss on ``calib_iters`` training batches), not fine-tuned.
    """
    o = dataclasses.replace(opts or SegEvalConfig(), **overrides)
    o.validate()
    red = registry.build(reducer)
    cfg = segconfigs.build_config(config, red.spec(), data, num_workers=o.num_workers,
                                  reducer_structure=o.reducer_structure)
    if checkpoint is None and _is_proxy(cfg) and not o.random_weights:
        from bench.seg.train import ensure_proxy_segmenter

        # the proxy Segmenter trained on the same proxy set (proxy:smoke -> its 30-iteration smoke model)
        size = str(data or "proxy").partition(":")[2].strip() or "default"
        checkpoint = ensure_proxy_segmenter(size=size, log=log or print)
    device = o.device or env.default_device()
    model, load_info = build_segmentor(cfg, checkpoint, random_weights=o.random_weights, trust=o.trust)
    model.to(device).eval()
    calib = _calibrate_if_needed(model, cfg, o.calib_iters, log)
    loop = _test_loop(model, cfg, o.max_images, log)
    crop = loop["crop"]
    win = cost.window_macs(model, crop)
    res = {
        "config": str(config),
        "reducer": red.spec(),
        "data": data,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights": load_info["weights"],
        "needs_training": bool(getattr(type(red), "needs_training", False)),
        "missing_reducer_modules": load_info.get("missing_reducer_modules", []),
        "n_images": loop["n"],
        "reducer_structure": (str(o.reducer_structure) if o.reducer_structure else
                              ("calibrated here: " + json.dumps(calib.get("calibration", calib), default=str)) if calib else None),
        "miou": float(loop["metrics"]["mIoU"]),
        "aAcc": float(loop["metrics"]["aAcc"]),
        "window": list(crop),
        "gmacs_per_window": round(win["total_macs"] / 1e9, 4),
        "gmacs_encoder_per_window": round(win["encoder_macs"] / 1e9, 4),
        "gmacs_head_per_window": round(win["head_macs"] / 1e9, 4),
        "gmacs_per_image": round(sum(loop["per_image_macs"]) / len(loop["per_image_macs"]) / 1e9, 4),
        "gmacs_convention": "analytic MACs (papers' 'GFLOPs'): encoder per-block formula with the reducer's token "
                            "schedule + SegmenterMaskTransformerHead; norms/softmax/upsampling not counted",
        "eval_seconds": round(loop["eval_s"], 2),
        "fps_bs32": None,
        "fps_bs1": None,
    }
    if o.speed and loop["first"] is not None:
        _measure_speed(res, model, loop["first"], crop, o, device)
    res["stamp"] = env.stamp(device, threads=torch.get_num_threads())
    return res


def _calibrate_if_needed(model, cfg, calib_iters: int, log) -> Optional[dict]:
    """Calibrate a :class:`~bench.core.reducer.Calibrated` backbone reducer that is not yet calibrated."""
    bb_red = model.backbone.reducer
    if not (isinstance(bb_red, Calibrated) and not bb_red.calibrated and calib_iters):
        return None
    from bench.seg.data import check_ade_layout

    check_ade_layout(cfg.train_dataloader.dataset.data_root, ("training",))
    if log:
        log(f"  calibrating the {bb_red.name} structure on {calib_iters} training batches")
    calib = calibrate(model, calibration_loader(cfg), calib_iters)
    model.eval()
    return calib


def _test_loop(model, cfg, max_images: Optional[int], log) -> dict:
    """mmengine's test loop with IoUMetric, and the MACs of each image's windows; returns the metrics,
    ``per_image_macs``, ``n`` (images), ``eval_s``, ``crop`` and the ``first`` batch."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    from mmseg.evaluation import IoUMetric

    loader = Runner.build_dataloader(cfg.test_dataloader)
    evaluator = Evaluator(IoUMetric(iou_metrics=["mIoU"]))
    evaluator.dataset_meta = loader.dataset.metainfo
    test_cfg = cfg.model.test_cfg
    crop = tuple(test_cfg.get("crop_size", cfg.model.backbone.img_size))
    stride = tuple(test_cfg.get("stride", crop))
    window_cache: dict = {}
    per_image_macs = []
    first = None
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            if first is None:
                first = batch
            out = model.test_step(batch)
            evaluator.process(out, batch)
            for x in batch["inputs"]:
                h, w = x.shape[-2:]
                tot = 0
                for hw in slide_or_whole(test_cfg, h, w, crop, stride):
                    if hw not in window_cache:
                        window_cache[hw] = cost.window_macs(model, hw)["total_macs"]
                    tot += window_cache[hw]
                per_image_macs.append(tot)
            n += len(batch["inputs"])
            if log and n % 20 == 0:
                log(f"  {n} images")
            if max_images is not None and n >= max_images:
                break
    eval_s = time.perf_counter() - t0
    if n == 0:
        raise ConfigError("the evaluation set is empty")
    metrics = evaluator.evaluate(n if max_images is None else min(n, len(loader.dataset)))
    return {"metrics": metrics, "per_image_macs": per_image_macs, "n": n, "eval_s": eval_s, "crop": crop,
            "first": first}


def _measure_speed(res: dict, model, first, crop, o: SegEvalConfig, device) -> None:
    """FPS on one real crop of the first image at each batch size: ``res["fps_bs{b}"]`` and ``res["speed"]``."""
    ref = _reference_crop(model, first, crop)
    speed_out = {}
    for b in o.fps_batches:
        r = cost.fps(model, ref, b, warmup=o.speed_warmup, iters=o.speed_iters, repeats=o.speed_repeats,
                     device=device)
        speed_out[f"bs{b}"] = r
        res[f"fps_bs{b}"] = round(r["img_s"], 3)
    res["speed"] = speed_out


def slide_or_whole(test_cfg, h, w, crop, stride):
    if test_cfg.get("mode", "whole") == "slide":
        return cost.slide_windows(h, w, crop, stride)
    return [(h, w)]


def calibrate_to_file(config, spec: str, data: str, checkpoint, out, iters: int = 20) -> dict:
    """Build ``config`` with the Calibrated ``spec`` and ``checkpoint``, calibrate on ``data``'s training
    split, save the structure to ``out`` (for ``reducer_structure=`` / ``--reducer-structure``)."""
    cfg = segconfigs.build_config(config, spec, data, splits=("training",))
    model, _ = build_segmentor(cfg, checkpoint)
    model.eval()
    return calibrate(model, calibration_loader(cfg), iters, out=out)
