"""Pretrained weights by timm name, with the papers' tags pinned, or from a local file.

* Hub: ``deit_*_patch16_224`` -> ``.fb_in1k`` (the DeiT paper weights); AugReg ViTs ->
  ``.augreg_in21k_ft_in1k`` (what ToMe used; timm >= 0.9 would otherwise pick
  ``augreg2``, ~0.5 points higher).  A name that already has a tag is used as given.
* Local: ``--weights FILE`` for timm or official DeiT ``.pth`` / ``.safetensors``
  (``{"model": ...}`` wrapping handled; position embeddings resized by timm's
  ``checkpoint_filter_fn`` when the input size differs).

Offline (no route to the hub within a 3 s probe, or ``HF_HUB_OFFLINE=1``) the hub
is only asked for cached files; missing weights give one error naming both ways out.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from bench.core.reducer import ConfigError

PINNED_TAGS = {
    "deit_tiny_patch16_224": "fb_in1k",
    "deit_small_patch16_224": "fb_in1k",
    "deit_base_patch16_224": "fb_in1k",
    "deit_tiny_distilled_patch16_224": "fb_in1k",
    "deit_small_distilled_patch16_224": "fb_in1k",
    "deit_base_distilled_patch16_224": "fb_in1k",
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",
    "vit_small_patch16_384": "augreg_in21k_ft_in1k",
}


def pinned_name(name: str) -> str:
    """``deit_small_patch16_224`` -> ``deit_small_patch16_224.fb_in1k`` (tagged names pass through)."""
    if "." in name:
        return name
    tag = PINNED_TAGS.get(name)
    return f"{name}.{tag}" if tag else name


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except Exception:  # noqa: BLE001
        pass


def _offline_error(name: str, why: str) -> ConfigError:
    return ConfigError(
        f"no pretrained weights for '{name}' ({why}). Either pass a local file with --weights PATH "
        f"(timm or DeiT .pth/.safetensors), or make the Hugging Face hub reachable (or pre-fill its cache) "
        f"so timm can fetch '{pinned_name(name)}'")


def load_file_weights(model, path, *, strict: bool = True):
    """Load a local timm/DeiT checkpoint into ``model`` (with timm's ViT key/pos-embed filter)."""
    from bench.runtime.checkpoint import load_state_strict, read_checkpoint, state_dict_of

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    sd = dict(state_dict_of(read_checkpoint(path)))
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)
    except Exception:  # noqa: BLE001 - non-ViT layouts are loaded as they are
        pass
    if strict:
        load_state_strict(model, sd, f"weights {path}")
    else:
        model.load_state_dict(sd, strict=False)
    return model


def load_pretrained(name: str, weights: Optional[str] = None, *, num_classes: Optional[int] = None,
                    img_size=None, **kwargs):
    """A timm model with pretrained weights: from ``weights`` (a file) or the hub (pinned tag)."""
    from bench.runtime import models

    base = name.split(".")[0]
    if weights:
        w = Path(weights)
        if w.is_dir():  # a folder of <model>.pth / <model>.safetensors
            cands = [w / f"{base}{ext}" for ext in (".safetensors", ".pth", ".pt", ".bin")]
            found = [c for c in cands if c.exists()]
            if not found:
                raise FileNotFoundError(f"no weights for {base} in {w} (looked for {', '.join(c.name for c in cands)})")
            w = found[0]
        model = models.create(base, num_classes=num_classes, img_size=img_size, **kwargs)
        models.require_vit(model, base)
        return load_file_weights(model, w)
    if not hub_reachable():
        _set_offline()
    try:
        return models.create(pinned_name(name), pretrained=True, num_classes=num_classes, img_size=img_size, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - network / cache failures
        raise _offline_error(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
