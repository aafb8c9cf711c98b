"""Helpers shared by the stages: model construction by name and reducer building."""
from __future__ import annotations

import copy

import torch

from .. import models, patch, registry
from ..reducer import ModelInfo

_MODEL_CACHE: dict = {}


def base_model(name: str, seed: int = 0):
    """A random-weight timm model (cost and speed need no trained weights), memoised."""
    if name not in _MODEL_CACHE:
        torch.manual_seed(seed)
        _MODEL_CACHE[name] = models.create(name).eval()
    return _MODEL_CACHE[name]


def reducer_for(ctx, spec: str):
    """A configured reducer; methods with a learned structure get it from the run context
    (e.g. PM's per-layer counts calibrated on the proxy), else their documented default."""
    red = registry.build(spec)
    hook = getattr(ctx, "structure_for", None)
    if hook is not None:
        hook(red)
    return red


def pm_structure_note(ctx, configs) -> list[str]:
    """Say where the PM rows' per-layer token counts came from (the profile's calibration or the
    uniform default of a run without data)."""
    pm = [s for s in configs if method_of(s) == "pm"]
    if not pm:
        return []
    missing = [s for s in pm if getattr(ctx, "structure_key", lambda s: None)(s) in (None, "default-structure")]
    if not missing:
        return ["PM rows: the per-layer structure PM calibrated on this profile's data (its pm-calibrate jobs)"]
    return [f"PM rows {', '.join(missing)}: PM's uniform structure (int(N*keep) evenly spread centres in every "
            "compressed block), because no calibration ran in this invocation"]


def patched_copy(ctx, name: str, spec: str):
    m = copy.deepcopy(base_model(name))
    red = reducer_for(ctx, spec)
    patch.apply(m, red)
    return m, red


def info_for(name: str) -> ModelInfo:
    return ModelInfo.from_model(base_model(name))


def short_model(name: str) -> str:
    return {
        "deit_tiny_patch16_224": "DeiT-T",
        "deit_small_patch16_224": "DeiT-S",
        "deit_base_patch16_224": "DeiT-B",
        "vit_base_patch16_224": "ViT-B/16",
        "pmbench_proxy_vit": "proxy ViT",
    }.get(name, name)


def method_of(spec: str) -> str:
    return spec.split(":", 1)[0]
