"""Helpers shared by the stages: model construction by name and reducer building."""
from __future__ import annotations

import copy

import torch

from bench.core import patch, registry
from bench.core.reducer import ConfigError, ModelInfo
from bench.runtime import models
from bench.runtime.checkpoint import load_structure, read_checkpoint, state_dict_of
from bench.runtime.results import file_hash

_MODEL_CACHE: dict = {}


def base_model(name: str, seed: int = 0):
    """A random-weight timm model (cost and speed need no trained weights), memoised."""
    if name not in _MODEL_CACHE:
        torch.manual_seed(seed)
        _MODEL_CACHE[name] = models.create(name).eval()
    return _MODEL_CACHE[name]


def reducer_for(ctx, spec: str):
    """A configured reducer; methods with a learned structure get it from the run context
    (e.g. per-layer counts calibrated on the proxy), else their documented default."""
    red = registry.build(spec)
    ctx.structure_for(red)
    return red


def calibrated_specs(configs) -> list[str]:
    """The specs whose method declares the Calibrated capability."""
    return [s for s in configs if registry.is_calibrated(s)]


def method_notes(specs, key: str) -> list[str]:
    """Each method's own report line ``key`` (``Reducer.report_notes``), once per method."""
    out = []
    for cls in dict.fromkeys(type(registry.build(s)) for s in specs):
        note = cls.report_notes.get(key)
        if note and note not in out:
            out.append(note)
    return out


def structure_note(ctx, configs) -> list[str]:
    """Say where the rows' learned structures came from (the profile's calibration or the method's
    data-free default in a run without data)."""
    cal = calibrated_specs(configs)
    if not cal:
        return []
    missing = [s for s in cal if ctx.structure_key(s) in (None, "default-structure")]
    methods = ", ".join(dict.fromkeys(registry.build(s).name for s in cal))
    if not missing:
        return [f"rows of {methods}: the per-layer structure calibrated on this profile's data (the accuracy "
                "stage's calibrate jobs)"]
    return [f"rows {', '.join(missing)}: {type(registry.build(missing[0])).default_structure}, because no "
            "calibration ran in this invocation"]


FINETUNED = "fine-tuned"
CALIBRATED = "calibrated"
UNIFORM = "uniform (uncalibrated)"


def finetuned_path(ctx, model_name: str, spec: str):
    """The fine-tuned checkpoint of a Calibrated method's ``spec`` from this run's accuracy stage: the one
    fine-tuned on ``model_name`` itself if there is one, else any (the proxy shares DeiT's 196-token
    geometry; the structure's geometry is checked when it is imported)."""
    ft = ctx.finetuned
    if not ft or not registry.is_calibrated(spec):
        return None
    want = registry.build(spec).spec()
    # keys may be written as given ('pm:keep=0.6') or canonical ('pm'): compare canonical forms
    hits = [(m, p) for (m, s), p in ft.items() if registry.build(s).spec() == want]
    for m, p in hits:
        if m == model_name:
            return p
    return hits[0][1] if hits else None


def finetuned_key(ctx, model_name: str, spec: str):
    """Cache key part of a fine-tuned row: the hash of the checkpoint its learned modules come from."""
    p = finetuned_path(ctx, model_name, spec)
    return None if p is None else "finetuned:" + file_hash(p)


def structure_label(ctx, spec: str):
    """What a Calibrated method's row runs: 'calibrated' (this run's calibration) or 'uniform
    (uncalibrated)' (the data-free default); None for other methods."""
    if not registry.is_calibrated(spec):
        return None
    key = ctx.structure_key(spec)
    return UNIFORM if key in (None, "default-structure") else CALIBRATED


def finetuned_note(ctx, configs, models=()) -> list[str]:
    """Say what the 'structure' column means and where the fine-tuned rows' learned modules came from."""
    cal = calibrated_specs(configs)
    if not cal:
        return []
    methods = ", ".join(dict.fromkeys(registry.build(s).name for s in cal))
    lines = method_notes(cal, "structure") or [
        f"structure ({methods} rows): calibrated = the structure and learned modules as calibration builds "
        "them (the off-the-shelf model); fine-tuned = the same structure with the fine-tuned checkpoint's "
        "learned modules, i.e. the cost of the fine-tuned model"]
    if ctx.finetuned:
        src = sorted({short_model(m) for m, _ in ctx.finetuned})
        dst = sorted({m for m in models if m not in src})
        lines.append(f"{methods} fine-tuned rows: the learned modules of the checkpoints fine-tuned on the "
                     f"{', '.join(src)} in this run"
                     + (f", transplanted onto the random-weight {', '.join(dst)} (they act on tokens, not "
                        "channels, and the token geometry is the same: 196 patches + CLS, 12 blocks)"
                        if dst else ""))
    else:
        lines.append(f"{methods} fine-tuned rows: none (no such model was fine-tuned in this invocation; run the "
                     "accuracy stage with it)")
    return lines


def transplant(model, red, path) -> None:
    """Patch ``model`` with the Calibrated reducer ``red`` as a fine-tuned checkpoint runs it: the
    checkpoint's structure (fine-tuning does not change it) and its fine-tuned reducer modules (e.g.
    PM's merge / reconstruct matrices), copied verbatim.  Such modules act on tokens, not channels, so
    they carry over to any model of the same token geometry (the proxy ViT -> DeiT-T/S/B: 196 patches
    + CLS, 12 blocks), and the patched model runs exactly the fine-tuned model's implementation and so
    has exactly its cost at that width.  The backbone's weights are left as they are."""
    ck = read_checkpoint(path)
    load_structure(red, path)
    patch.apply(model, red)
    sd = state_dict_of(ck)
    with torch.no_grad():
        for k, p in model.state_dict(keep_vars=True).items():
            if not k.startswith("reducer_modules."):
                continue
            src = sd.get(k)
            if src is None or tuple(src.shape) != tuple(p.shape):
                raise ConfigError(f"{path}: no reducer tensor {k} with shape {tuple(p.shape)}")
            p.copy_(src.to(dtype=p.dtype, device=p.device))


def finetuned_copy(ctx, name: str, spec: str):
    """A copy of the random-weight ``name`` model running ``spec`` with this run's fine-tuned modules."""
    path = finetuned_path(ctx, name, spec)
    if path is None:
        raise RuntimeError(f"no fine-tuned checkpoint of {spec} in this run")
    m = copy.deepcopy(base_model(name))
    red = registry.build(spec)
    transplant(m, red, path)
    return m, red


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
