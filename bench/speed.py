"""Throughput, measured like timm's ``benchmark.py``.

Synthetic input at the evaluation resolution, ``model.eval()`` +
``torch.inference_mode()``, warm-up iterations, timed iterations with a device
synchronisation before the clock stops, repeated ``repeats`` times; the figure
is the median over repeats, with min/max and the inter-quartile range.

Comparisons are interleaved in one process: within each repeat every model is
timed once (the order alternates between repeats to cancel drift), and the
speed-up of a reduced model is the median of the per-repeat ratios
``t_baseline / t_reduced`` (min and max reported too).  Data loading is never
timed (ToMe#11, DynamicViT#31).

Precision: ``fp32``; ``amp`` = autocast float16 on CUDA (bfloat16 on CPU,
where float16 autocast is not a fast path; the output says which);
``bf16`` = autocast bfloat16.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import env


@dataclass
class SpeedConfig:
    batch_size: int = 16
    precision: str = "fp32"
    device: str = "cpu"
    warmup: Optional[int] = None
    iters: Optional[int] = None
    repeats: int = 5
    channels_last: bool = False
    compile: bool = False
    img_size: tuple = (224, 224)

    def resolved(self) -> "SpeedConfig":
        cpu = torch.device(self.device).type == "cpu"
        c = SpeedConfig(**asdict(self))
        if c.warmup is None:
            c.warmup = 2 if cpu else 20
        if c.iters is None:
            c.iters = 3 if cpu else 50
        return c


def autocast_ctx(precision: str, device: str):
    dev = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext(), "float32"
    if precision == "amp":
        dtype = torch.float16 if dev == "cuda" else torch.bfloat16
        return torch.autocast(dev, dtype=dtype), f"autocast {str(dtype).replace('torch.', '')}"
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16), "autocast bfloat16"
    raise ValueError(f"unknown precision {precision!r}; use fp32, amp or bf16")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prepare(model, cfg: SpeedConfig) -> Callable:
    model.eval().to(cfg.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _time(fn, x, iters: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _summary(times: list[float], batch: int) -> dict:
    ips = sorted(batch / t for t in times)
    q = statistics.quantiles(ips, n=4) if len(ips) >= 2 else [ips[0]] * 3
    return {
        "img_s": statistics.median(ips),
        "img_s_min": ips[0],
        "img_s_max": ips[-1],
        "img_s_iqr": q[2] - q[0],
        "step_ms": statistics.median(times) * 1e3,
        "times_s": times,
    }


def measure(models: dict, cfg: SpeedConfig, baseline: Optional[str] = None, progress=None) -> dict:
    """Time several models interleaved; returns per-model stats and speed-ups vs ``baseline``."""
    cfg = cfg.resolved()
    ctx_factory = lambda: autocast_ctx(cfg.precision, cfg.device)[0]  # noqa: E731
    _, prec_desc = autocast_ctx(cfg.precision, cfg.device)
    x = torch.randn(cfg.batch_size, 3, *cfg.img_size, device=cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fns = {k: prepare(m, cfg) for k, m in models.items()}
    names = list(fns)
    with torch.inference_mode(), ctx_factory():
        for k in names:  # warm-up each model once before any timing
            for _ in range(cfg.warmup):
                fns[k](x)
        _sync(cfg.device)
        times = {k: [] for k in names}
        for rep in range(cfg.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for k in order:
                times[k].append(_time(fns[k], x, cfg.iters, cfg.device))
            if progress:
                progress(rep + 1, cfg.repeats)
    out = {
        "config": {**asdict(cfg), "precision_desc": prec_desc, "protocol": "synthetic input, eval+inference_mode, "
                   f"{cfg.warmup} warm-up + {cfg.iters} timed iterations x {cfg.repeats} repeats, "
                   "device sync, median; interleaved"},
        "stamp": env.stamp(cfg.device),
        "models": {k: _summary(v, cfg.batch_size) for k, v in times.items()},
    }
    if baseline is not None:
        base = times[baseline]
        for k in names:
            if k == baseline:
                continue
            ratios = sorted(b / t for b, t in zip(base, times[k]))
            out["models"][k]["speedup"] = statistics.median(ratios)
            out["models"][k]["speedup_min"] = ratios[0]
            out["models"][k]["speedup_max"] = ratios[-1]
    return out
