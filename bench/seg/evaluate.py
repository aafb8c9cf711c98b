"""``seg_eval``: mIoU with mmseg's IoUMetric and the config's sliding-window test, plus cost and FPS.

The test loop is mmengine's (dataloader from the config, ``model.test_step``,
``Evaluator(IoUMetric)``) run in-process, so the model can be built with the reducer
and the checkpoint converted before evaluation.  Weights: ``checkpoint`` (mmseg,
mmengine, this suite's, or an original Segmenter release); the proxy config falls back
to the cached proxy Segmenter (trained on first use); other configs without a
checkpoint fail with a clear message unless ``random_weights=True`` (smoke tests).
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch
import torch.nn.functional as F

from bench import env, registry
from bench.reducer import Calibrated, ConfigError

from . import configs as segconfigs
from . import cost
from .calibrate import calibrate, calibration_loader


def _is_proxy(cfg) -> bool:
    return any(ds.get("type") == "PMBenchProxySegDataset" for _, ds in segconfigs._datasets(cfg))


def build_segmentor(cfg, checkpoint=None, *, random_weights: bool = False, trust: bool = False):
    """EncoderDecoder from ``cfg`` with weights; returns (model, load_info)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from .checkpoint import load_into

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


def seg_eval(config, reducer: str = "none", data: Optional[str] = "proxy", checkpoint=None, *,
             random_weights: bool = False, trust: bool = False, speed: bool = True,
             fps_batches=(32, 1), speed_warmup: int = 1, speed_iters: int = 1, speed_repeats: int = 3,
             device: Optional[str] = None, max_images: Optional[int] = None, num_workers: int = 0,
             reducer_structure=None, calib_iters: int = 20, log=None) -> dict:
    """Evaluate ``config`` with ``reducer`` on ``data``; returns a JSON-able dict.

    Keys: ``miou``, ``aAcc`` (percent), ``gmacs_per_window`` (at the config's crop size),
    ``gmacs_per_image`` (mean over the evaluated images, summed over their windows),
    ``fps_bs32``, ``fps_bs1`` (windows/s, None when ``speed`` is off), ``stamp``, and details.

    A :class:`bench.reducer.Calibrated` method without a structure file (e.g. PM) is calibrated first
    (:mod:`bench.seg.calibrate`: pixel-CE loss on ``calib_iters`` training batches), not fine-tuned.
    """
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    from mmseg.evaluation import IoUMetric

    for name, v in (("max_images", max_images), ("speed_iters", speed_iters), ("speed_repeats", speed_repeats)):
        if v is not None and (isinstance(v, bool) or v < 1):
            raise ConfigError(f"{name} must be >= 1 (or not given), got {v}")
    red = registry.build(reducer)
    cfg = segconfigs.build_config(config, red.spec(), data, num_workers=num_workers,
                                  reducer_structure=reducer_structure)
    if checkpoint is None and _is_proxy(cfg) and not random_weights:
        from .train import ensure_proxy_segmenter

        # the proxy Segmenter trained on the same proxy set (proxy:smoke -> its 30-iteration smoke model)
        size = str(data or "proxy").partition(":")[2].strip() or "default"
        checkpoint = ensure_proxy_segmenter(size=size, log=log or print)
    device = device or env.default_device()
    model, load_info = build_segmentor(cfg, checkpoint, random_weights=random_weights, trust=trust)
    model.to(device).eval()
    calib = None
    bb_red = model.backbone.reducer
    if isinstance(bb_red, Calibrated) and not bb_red.calibrated and calib_iters:
        from .data import check_ade_layout

        check_ade_layout(cfg.train_dataloader.dataset.data_root, ("training",))
        if log:
            log(f"  calibrating the {bb_red.name} structure on {calib_iters} training batches")
        calib = calibrate(model, calibration_loader(cfg), calib_iters)
        model.eval()
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
                wins = slide_or_whole(test_cfg, h, w, crop, stride)
                tot = 0
                for hw in wins:
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
    win = cost.window_macs(model, crop)
    res = {
        "config": str(config),
        "reducer": red.spec(),
        "data": data,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights": load_info["weights"],
        "needs_training": bool(getattr(type(red), "needs_training", False)),
        "missing_reducer_modules": load_info.get("missing_reducer_modules", []),
        "n_images": n,
        "reducer_structure": (str(reducer_structure) if reducer_structure else
                              ("calibrated here: " + json.dumps(calib.get("calibration", calib), default=str)) if calib else None),
        "miou": float(metrics["mIoU"]),
        "aAcc": float(metrics["aAcc"]),
        "window": list(crop),
        "gmacs_per_window": round(win["total_macs"] / 1e9, 4),
        "gmacs_encoder_per_window": round(win["encoder_macs"] / 1e9, 4),
        "gmacs_head_per_window": round(win["head_macs"] / 1e9, 4),
        "gmacs_per_image": round(sum(per_image_macs) / len(per_image_macs) / 1e9, 4),
        "gmacs_convention": "analytic MACs (papers' 'GFLOPs'): encoder per-block formula with the reducer's token "
                            "schedule + SegmenterMaskTransformerHead; norms/softmax/upsampling not counted",
        "eval_seconds": round(eval_s, 2),
        "fps_bs32": None,
        "fps_bs1": None,
    }
    if speed and first is not None:
        ref = _reference_crop(model, first, crop)
        speed_out = {}
        for b in fps_batches:
            r = cost.fps(model, ref, b, warmup=speed_warmup, iters=speed_iters, repeats=speed_repeats,
                         device=device)
            speed_out[f"bs{b}"] = r
            res[f"fps_bs{b}"] = round(r["img_s"], 3)
        res["speed"] = speed_out
    res["stamp"] = env.stamp(device, threads=torch.get_num_threads())
    return res


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
