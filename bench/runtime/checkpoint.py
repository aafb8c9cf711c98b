"""Checkpoints that rebuild a reduced model: weights + model name + reducer spec + reducer state.

Format (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "pmbench-checkpoint-1", "model": state_dict, "model_name": str,
     "model_kwargs": {"num_classes", "img_size"}, "reducer": spec, "reducer_state": dict,
     "optimizer": ..., "scheduler": ..., "epoch": int, "step": int, "extra": {...}}

Written atomically (temporary file + ``os.replace``) so an interrupted run never
leaves a truncated checkpoint; the temporary file is removed on every exit path
(:func:`bench.runtime.outputs.temp_file`).  ``load_model`` also accepts plain timm/DeiT
state dicts (``{"model": ...}`` wrapping included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from bench.core import patch, registry
from bench.core.reducer import Calibrated, ConfigError, Reducer
from bench.runtime import models
from bench.runtime.outputs import temp_file

FORMAT = "pmbench-checkpoint-1"


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def model_name_of(model) -> Optional[str]:
    m = _unwrap(model)
    name = getattr(m, "pmbench_name", None)
    if name:
        return name
    cfg = getattr(m, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def model_kwargs_of(model) -> dict:
    m = _unwrap(model)
    kw = {}
    head = getattr(m, "head", None)
    if isinstance(head, torch.nn.Linear):
        kw["num_classes"] = head.out_features
    pe = getattr(m, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        kw["img_size"] = list(pe.img_size)
    return kw


def save_checkpoint(path, model, *, optimizer=None, scheduler=None, epoch=None, step=None, extra=None) -> Path:
    """Save model weights with everything needed to rebuild the (reduced) model."""
    m = _unwrap(model)
    red = patch.get_reducer(m)
    ck = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in m.state_dict().items()},
        "model_name": model_name_of(m),
        "model_kwargs": model_kwargs_of(m),
        "reducer": red.spec() if red is not None else "none",
        "reducer_state": red.export_state() if red is not None else {},
        "epoch": epoch,
        "step": step,
        "extra": extra or {},
    }
    if optimizer is not None:
        ck["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ck["scheduler"] = scheduler.state_dict() if hasattr(scheduler, "state_dict") else scheduler
    path = Path(path)
    with temp_file(path) as tmp:  # removed on every exit path; stale ones of killed runs too
        torch.save(ck, tmp)
    return path


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict (weights_only where possible)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"model": load_file(str(path))}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - give the user the reason and the way out
        raise ConfigError(f"cannot load {path} with torch.load(weights_only=True): {e}. "
                          "Re-save it as a plain state dict (trusted files only)") from None


def state_dict_of(ck) -> dict:
    """Model weights from a pmbench, DeiT ({'model': ...}) or plain state-dict checkpoint."""
    if isinstance(ck, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in ck and isinstance(ck[key], dict):
                return ck[key]
    if isinstance(ck, dict) and all(torch.is_tensor(v) for v in ck.values()):
        return ck
    raise ConfigError("checkpoint holds no model weights (expected a state dict or a {'model': state_dict} dict)")


def load_state_strict(model, sd: dict, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a ConfigError naming every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and torch.is_tensor(sd[k]) and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        if missing:
            parts.append(f"missing in {source}: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"not in the model: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise ConfigError(f"{source} does not match the model ({'; '.join(parts)}); check --model, "
                          "--num-classes/--img-size and --reducer")
    model.load_state_dict(sd, strict=True)


def load_structure(red: Reducer, path) -> None:
    """Give a :class:`bench.core.reducer.Calibrated` reducer the structure stored in a checkpoint file
    (``pmbench flops/speed --checkpoint``, the run's calibrated checkpoints, a Segmenter's
    ``reducer_structure``); call before :func:`bench.core.patch.apply`."""
    if not isinstance(red, Calibrated):
        raise ConfigError(f"reducer '{red.name}' learns no structure from data: it takes no structure file")
    state = red.structure_in(read_checkpoint(path))
    if state is None:
        raise ConfigError(f"{red.name}: {path} holds no {red.structure_name} (was it written by the method's "
                          "calibration or by training it?)")
    red.import_state(state)


def _same_reducer(a: Reducer, b: Reducer) -> bool:
    return a.full_spec() == b.full_spec()


def apply_off_the_shelf(model, red, img_size=None) -> None:
    """Patch trained unreduced weights with ``red``: the reducer's own modules (MSTM's gamma, DynamicViT's
    predictors, PM's matrices) start from a seeded init, whatever ran before in the process, so the
    accuracy stage, ``pmbench eval --reducer`` and a torchrun job all build the same model."""
    torch.manual_seed(0)
    patch.apply(model, red, img_size=img_size)


def load_model(path, model_name: Optional[str] = None, *, reducer=None, device="cpu"):
    """Rebuild ``(model, reducer)`` from a checkpoint.

    The reducer comes from the stored spec, or from ``reducer`` (an error if both are
    given and differ; a checkpoint of the unreduced model accepts any reducer, which is
    how off-the-shelf configurations are evaluated: the weights load strictly, then
    :func:`apply_off_the_shelf`).  Otherwise ``reducer.import_state`` runs before
    :func:`bench.core.patch.apply`, then the weights load strictly.  An unreduced
    result is returned unpatched, with ``Reducer()`` ("none") as its reducer.
    """
    ck = read_checkpoint(path)
    sd = state_dict_of(ck)
    is_ours = isinstance(ck, dict) and ck.get("format") == FORMAT
    stored_name = ck.get("model_name") if is_ours else None
    name = model_name or stored_name
    if not name:
        raise ConfigError(f"{path} does not name its model; pass --model")
    if model_name and stored_name and model_name != stored_name:
        raise ConfigError(f"{path} holds a '{stored_name}' model, not '{model_name}'; drop --model or fix it")
    kw = dict(ck.get("model_kwargs", {})) if is_ours else {}
    if "num_classes" not in kw:
        for k in ("head.weight",):
            if k in sd:
                kw["num_classes"] = sd[k].shape[0]
    if "img_size" in kw and isinstance(kw["img_size"], (list, tuple)):
        kw["img_size"] = tuple(kw["img_size"])
    model = models.create(name, **kw)

    stored_spec = ck.get("reducer", "none") if is_ours else "none"
    stored = registry.build(stored_spec)
    given = registry.build(reducer) if reducer is not None else None
    if given is not None and stored.name != "none" and not _same_reducer(given, stored):
        raise ConfigError(f"{path} was trained with reducer '{stored.spec()}', not '{given.spec()}'; "
                          "drop --reducer to use the stored one")
    red = given if given is not None else stored
    off_the_shelf = red.name != "none" and stored.name == "none"  # its modules are not in the checkpoint
    if red.name != "none" and not off_the_shelf:
        state = ck.get("reducer_state") or {}
        if state:
            red.import_state(state)
        patch.apply(model, red)
    load_state_strict(model, sd, f"checkpoint {path}")
    if off_the_shelf:
        apply_off_the_shelf(model, red)
    model.to(device)
    model.eval()
    return model, red
