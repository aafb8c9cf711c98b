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


FINETUNED = "fine-tuned"
CALIBRATED = "calibrated"
UNIFORM = "uniform (uncalibrated)"


def pm_finetuned_path(ctx, model_name: str, spec: str):
    """The fine-tuned PM checkpoint of ``spec`` from this run's accuracy stage: the one fine-tuned on
    ``model_name`` itself if there is one, else any (the proxy shares DeiT's 196-token geometry; the
    structure's geometry is checked when it is imported)."""
    ft = getattr(ctx, "pm_finetuned", None) or {}
    if method_of(spec) != "pm" or not ft:
        return None
    want = registry.build(spec).spec()
    # keys may be written as given ('pm:keep=0.6') or canonical ('pm'): compare canonical forms
    hits = [(m, p) for (m, s), p in ft.items() if registry.build(s).spec() == want]
    for m, p in hits:
        if m == model_name:
            return p
    return hits[0][1] if hits else None


def finetuned_key(ctx, model_name: str, spec: str):
    """Cache key part of a fine-tuned PM row: the hash of the checkpoint its matrices come from."""
    from ..results import file_hash

    p = pm_finetuned_path(ctx, model_name, spec)
    return None if p is None else "finetuned:" + file_hash(p)


def structure_label(ctx, spec: str):
    """What a PM row's structure and matrices are: 'calibrated' (this run's pm-calibrate, M and R as
    calibrated) or 'uniform (uncalibrated)'; None for other methods."""
    if method_of(spec) != "pm":
        return None
    key = getattr(ctx, "structure_key", lambda s: None)(spec)
    return UNIFORM if key in (None, "default-structure") else CALIBRATED


def pm_finetuned_note(ctx, configs, models=()) -> list[str]:
    """Say what the PM rows' 'structure' column means and where the fine-tuned matrices came from."""
    pm = [s for s in configs if method_of(s) == "pm"]
    if not pm:
        return []
    ft = getattr(ctx, "pm_finetuned", None) or {}
    lines = ["structure (PM rows): calibrated = PM's calibrated structure with the merge/reconstruct matrices M, R "
             "as calibration builds them (each token feeds one centre: sparse gather, the off-the-shelf model); "
             "fine-tuned = the same structure with the fine-tuned checkpoint's M, R (free fine-tuning, the official "
             "setting, makes them dense, so merge and reconstruct run as matmuls: 2*C*N*D MACs per block), i.e. "
             "the cost of the fine-tuned model; pm_matrices = the implementation each row runs"]
    if ft:
        src = sorted({short_model(m) for m, _ in ft})
        dst = sorted({m for m in models if m not in src})
        lines.append(f"PM fine-tuned rows: M and R of the checkpoints fine-tuned on the {', '.join(src)} in this run"
                     + (f", transplanted onto the random-weight {', '.join(dst)} (M and R act on tokens, not "
                        "channels, and the token geometry is the same: 196 patches + CLS, 12 blocks); the "
                        "matrices, and so which blocks run sparse or dense, are the fine-tuned model's"
                        if dst else ""))
    else:
        lines.append("PM fine-tuned rows: none (no PM model was fine-tuned in this invocation; run the accuracy "
                     "stage with it)")
    return lines


def transplant_pm(model, red, path) -> None:
    """Patch ``model`` with PM ``red`` as a fine-tuned checkpoint runs it: the checkpoint's structure
    (centres, pruned tokens; fine-tuning does not change it) and its fine-tuned merge / reconstruct
    matrices M (C x N) and R (N x C), copied verbatim.  M and R act on tokens, not channels, so they
    carry over to any model of the same token geometry (the proxy ViT -> DeiT-T/S/B: 196 patches + CLS,
    12 blocks) and the patched model runs exactly the implementation (sparse gather where M and R kept
    their calibrated support, dense matmul where fine-tuning filled them) and so has exactly the cost
    of the fine-tuned model at that width.  The backbone's weights are left as they are."""
    from pm.reducer import find_state

    from ..checkpoint import read_checkpoint, state_dict_of
    from ..reducer import ConfigError

    ck = read_checkpoint(path)
    st = find_state(ck)
    if st is None:
        raise ConfigError(f"{path} holds no PM structure")
    red.import_state(st)
    patch.apply(model, red)
    sd = state_dict_of(ck)
    mats = patch.reducer_modules(model)["pm"]
    with torch.no_grad():
        for kind in ("merge", "recover"):
            for k, p in getattr(mats, kind).items():
                src = sd.get(f"reducer_modules.pm.{kind}.{k}")
                if src is None or tuple(src.shape) != tuple(p.shape):
                    raise ConfigError(f"{path}: no {kind} matrix of block {k} with shape {tuple(p.shape)}")
                p.copy_(src.to(dtype=p.dtype, device=p.device))


def pm_finetuned_copy(ctx, name: str, spec: str):
    """A copy of the random-weight ``name`` model running PM ``spec`` with this run's fine-tuned matrices."""
    path = pm_finetuned_path(ctx, name, spec)
    if path is None:
        raise RuntimeError(f"no fine-tuned checkpoint of {spec} in this run")
    m = copy.deepcopy(base_model(name))
    red = registry.build(spec)
    transplant_pm(m, red, path)
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
