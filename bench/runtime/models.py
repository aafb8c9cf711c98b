"""Models by name (timm registry), with the reducer applied by spec."""
from __future__ import annotations

from typing import Optional

import timm

from bench.core import patch, registry
from bench.core.reducer import ConfigError
from bench.runtime import proxy as _proxy  # noqa: F401  registers pmbench_proxy_vit with timm
from bench.runtime import fixtures as _fixtures  # noqa: F401  registers pmbench_tiny_vit (fixture model)


def create(name: str, *, pretrained: bool = False, num_classes: Optional[int] = None, img_size=None, **kwargs):
    """A timm model by name (random weights unless ``pretrained``)."""
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if img_size is not None:
        kw["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown model '{name}': {e}") from None
        raise


def with_reducer(model, spec, img_size=None):
    """Patch ``model`` with the reducer described by ``spec``; returns (model, reducer)."""
    red = registry.build(spec)
    patch.apply(model, red, img_size=img_size)
    return model, red


def require_vit(model, name: str) -> None:
    """The suite patches timm ``VisionTransformer``-style models (patch embedding + blocks with
    ``attn.qkv``); anything else gets one clear error instead of an AttributeError deep inside."""
    blocks = getattr(model, "blocks", None)
    ok = (getattr(model, "patch_embed", None) is not None and blocks is not None and len(blocks) > 0
          and hasattr(getattr(blocks[0], "attn", None), "qkv"))
    if not ok:
        raise ConfigError(f"'{name}' is a {type(model).__name__}, not a ViT: PM-Bench's token reducers work on "
                          "timm VisionTransformer models (deit_*, vit_*, or a VisionTransformer subclass)")
