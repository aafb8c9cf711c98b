"""``PMBenchViT``: a Segmenter backbone in which any registered reducer runs.

Why a timm encoder: every reducer of the suite hooks into timm ``Block``s through
:func:`bench.core.patch.apply`.  Building the Segmenter encoder as a timm
``VisionTransformer`` lets the very same mechanism run in segmentation with no
per-method code.  The module is a drop-in replacement for mmseg's
``VisionTransformer`` backbone: it takes the same constructor arguments (so a stock
config only swaps ``type``), loads mmseg ViT weights (keys are renamed on load,
:func:`convert_key`) and returns the same ``(B, C, H/16, W/16)`` feature map.

Equivalence with mmseg's ``VisionTransformer`` (tested on random weights):

* patch embedding: conv without bias (mmseg ``patch_bias=False``), the input padded
  at the bottom/right to a multiple of the patch size (``patch_pad='corner'``);
* position embedding with the CLS slot; for another input size the grid part is
  resized exactly as mmseg does (``F.interpolate``, ``interpolate_mode``,
  ``align_corners=False``, no antialias, which differs from timm's own resampling);
* pre-norm blocks with ``nn.MultiheadAttention``'s in-proj == timm's qkv layout;
  stochastic depth only on the MLP residual, like mmseg (``drop_path_attn=False``);
* ``final_norm``: one LayerNorm after the last block.

Token restoration.  The reducer runs inside ``vit.forward_features`` with grid
tracking on (:func:`bench.core.patch.set_tracking`); the reduced tokens are mapped back
to the full grid by the reducer's own :meth:`bench.core.reducer.Reducer.restore` (ToMe:
unmerge through the source map; pruning methods: each pruned token's last
features; PM: its reconstruct already returns the full grid).  The restore happens
*before* the final norm, so restored tokens (e.g. a pruned token's
intermediate-layer features) are normalised like every other token.
"""
from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from timm.models.vision_transformer import VisionTransformer as TimmViT

from bench.core import patch as bpatch, registry
from bench.core.reducer import Calibrated, ConfigError, ModelInfo
from bench.runtime.checkpoint import load_structure

from bench.seg.checkpoint import block_rules, load_weights


# --------------------------------------------------------------------------- position embedding
def resize_pos_embed(pos_embed: torch.Tensor, new_hw, old_hw, mode: str = "bicubic") -> torch.Tensor:
    """mmseg's ``VisionTransformer.resize_pos_embed``: (1, 1 + h*w, C) -> (1, 1 + H*W, C)."""
    oh, ow = old_hw
    cls = pos_embed[:, :1]
    grid = pos_embed[:, -oh * ow:].reshape(1, oh, ow, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode=mode, align_corners=False if mode != "nearest" else None)
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class SegViT(TimmViT):
    """timm ViT (NHWC dynamic patch embedding) whose pos-embed resize follows mmseg."""

    interpolate_mode: str = "bicubic"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pos = self.pos_embed
        gh, gw = self.patch_embed.grid_size
        if (H, W) != (gh, gw):
            pos = resize_pos_embed(pos, (H, W), (gh, gw), self.interpolate_mode)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + pos)


# --------------------------------------------------------------------------- key conversion
# The block-key table and rule generator live with the checkpoint loaders (bench/seg/checkpoint.py).
_MMSEG_RULES = [
    (r"^patch_embed\.projection\.", "vit.patch_embed.proj."),
    *block_rules("layers.", "vit.blocks.", to_timm=True),
    (r"^ln1\.", "norm."),
    (r"^(cls_token|pos_embed)$", r"vit.\1"),
]
_PMBENCH_TO_MMSEG_RULES = [
    (r"^vit\.patch_embed\.proj\.", "patch_embed.projection."),
    *block_rules("vit.blocks.", "layers.", to_timm=False),
    (r"^norm\.", "ln1."),
    (r"^vit\.(cls_token|pos_embed)$", r"\1"),
]
# timm / original Segmenter (rstrudel) encoder keys
_TIMM_RULES = [
    (r"^(patch_embed\.|blocks\.|cls_token$|pos_embed$)", r"vit.\1"),
    (r"^norm\.", "norm."),
    (r"^(head|fc_norm|pre_logits|dist_token|head_dist)\b", None),  # classification leftovers
]


def convert_key(key: str) -> Optional[str]:
    """A backbone-relative key of an mmseg ViT or a timm/Segmenter encoder -> this module's key.

    Returns the key unchanged when it is already in this module's layout and ``None``
    for classification leftovers that a segmentation backbone does not have.
    """
    if key.startswith("vit.") or key.startswith("norm."):
        return key
    for pat, rep in _MMSEG_RULES:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    for pat, rep in _TIMM_RULES:
        if re.match(pat, key):
            return None if rep is None else re.sub(pat, rep, key)
    return key


def mmseg_to_pmbench(state: dict) -> dict:
    """Convert a backbone state dict (mmseg ``VisionTransformer`` keys) to ``PMBenchViT`` keys."""
    out = {}
    for k, v in state.items():
        nk = convert_key(k)
        if nk is not None:
            out[nk] = v
    return out


def pmbench_to_mmseg(state: dict) -> dict:
    """Inverse of :func:`mmseg_to_pmbench` (for exporting to stock mmseg)."""
    out = {}
    for k, v in state.items():
        for pat, rep in _PMBENCH_TO_MMSEG_RULES:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- the backbone
@dataclasses.dataclass
class MmsegViTArgs:
    """mmseg ``VisionTransformer``'s constructor arguments, with its defaults, so a stock Segmenter
    config only swaps ``type``.  :meth:`unsupported` names the settings this backbone does not build."""
    img_size: object = 224
    patch_size: int = 16
    patch_pad: str = "corner"
    in_channels: int = 3
    embed_dims: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4
    out_origin: bool = False
    out_indices: object = -1
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    with_cls_token: bool = True
    output_cls_token: bool = False
    norm_cfg: dict = dataclasses.field(default_factory=lambda: dict(type="LN"))
    act_cfg: dict = dataclasses.field(default_factory=lambda: dict(type="GELU"))
    patch_norm: bool = False
    patch_bias: bool = False
    pre_norm: bool = False
    final_norm: bool = False
    interpolate_mode: str = "bicubic"
    num_fcs: int = 2
    norm_eval: bool = False
    with_cp: bool = False
    frozen_exclude: object = ("all",)
    pretrained: Optional[str] = None

    @classmethod
    def parse(cls, kwargs: dict) -> "MmsegViTArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"PMBenchViT: unknown argument(s) {unknown}; it takes mmseg VisionTransformer's "
                              f"({', '.join(sorted(names))}) plus reducer, reducer_structure, drop_path_attn, "
                              "pad_to_img_size and init_cfg")
        return cls(**kwargs)

    def unsupported(self) -> list[str]:
        bad = [k for k, v in {"patch_norm": self.patch_norm, "pre_norm": self.pre_norm, "out_origin": self.out_origin,
                              "with_cls_token=False": not self.with_cls_token, "num_fcs!=2": self.num_fcs != 2,
                              "with_cp": self.with_cp}.items() if v]
        if self.act_cfg.get("type") != "GELU":
            bad.append(f"act_cfg={self.act_cfg}")
        if self.norm_cfg.get("type") != "LN":
            bad.append(f"norm_cfg={self.norm_cfg}")
        oi = [self.out_indices] if isinstance(self.out_indices, int) else list(self.out_indices)
        if oi not in ([-1], [self.num_layers - 1]):
            bad.append(f"out_indices={self.out_indices} (only the last block's output)")
        if self.patch_pad != "corner":
            bad.append(f"patch_pad={self.patch_pad!r}")
        return bad


class PMBenchViT(BaseModule):
    """Segmenter ViT backbone with a token reducer (``reducer='tome:r=13'``); see module doc.

    Arguments are those of mmseg's ``VisionTransformer`` (:class:`MmsegViTArgs`) plus:
    ``reducer`` (spec string), ``reducer_structure`` (file for methods whose structure is
    calibrated, e.g. PM; read by ``bench.runtime.checkpoint.load_structure``), ``drop_path_attn``
    (also drop-path the attention residual, as timm does; mmseg does not) and
    ``pad_to_img_size`` (zero-pad windows smaller than ``img_size`` at the bottom/right and crop
    the features back: for reducers whose structure is tied to one token grid, e.g. PM's merge
    matrices; off by default because mmseg runs small windows unpadded).
    """

    def __init__(self, reducer="none", reducer_structure=None, drop_path_attn=False, pad_to_img_size=False,
                 init_cfg=None, **mmseg_vit_args):
        super().__init__(init_cfg=init_cfg)
        a = MmsegViTArgs.parse(mmseg_vit_args)
        bad = a.unsupported()
        if bad:
            raise ConfigError(
                "PMBenchViT supports the Segmenter ViT layout only; unsupported setting(s): " + ", ".join(bad)
            )
        if a.pretrained is not None and not isinstance(a.pretrained, str):
            raise TypeError("pretrained must be a str or None")
        img_size = (a.img_size, a.img_size) if isinstance(a.img_size, int) else tuple(a.img_size)
        img_size = img_size if len(img_size) == 2 else (img_size[0], img_size[0])
        self.img_size = img_size
        self.patch_size = a.patch_size
        self.patch_pad = a.patch_pad
        self.pretrained = a.pretrained
        self.pad_to_img_size = pad_to_img_size
        self.output_cls_token = a.output_cls_token
        self.frozen_exclude = list(a.frozen_exclude)
        eps = a.norm_cfg.get("eps", 1e-5)
        self.vit = SegViT(
            img_size=img_size, patch_size=a.patch_size, in_chans=a.in_channels, num_classes=0, global_pool="",
            embed_dim=a.embed_dims, depth=a.num_layers, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
            qkv_bias=a.qkv_bias, class_token=True, no_embed_class=False, dynamic_img_size=True,
            pos_drop_rate=a.drop_rate, proj_drop_rate=a.drop_rate, attn_drop_rate=a.attn_drop_rate,
            drop_path_rate=a.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=eps),
            act_layer=nn.GELU,
        )
        self.vit.interpolate_mode = a.interpolate_mode
        pe = self.vit.patch_embed
        if not a.patch_bias:
            old = pe.proj
            pe.proj = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, bias=False)
        if not drop_path_attn:
            for blk in self.vit.blocks:
                blk.drop_path1 = nn.Identity()
        self.vit.norm = nn.Identity()  # final norm applied after restore (see module doc)
        self.norm = nn.LayerNorm(a.embed_dims, eps=eps) if a.final_norm else nn.Identity()
        self.register_load_state_dict_pre_hook(_convert_on_load)
        self.set_reducer(reducer, reducer_structure)
        self._freeze()

    # -- reducer ---------------------------------------------------------------------
    def set_reducer(self, spec, structure=None):
        """(Re)patch the encoder with ``spec`` (a spec string or a Reducer)."""
        red = registry.build(spec)
        if structure:
            if not isinstance(red, Calibrated):
                raise ConfigError(f"reducer '{red.name}' takes no structure file (reducer_structure)")
            load_structure(red, structure)
        bpatch.remove(self.vit)
        bpatch.apply(self.vit, red, img_size=self.img_size)
        if bpatch.is_patched(self.vit):
            bpatch.set_tracking(self.vit, True)
        self._reducer_spec = red.spec()
        return red

    @property
    def reducer(self):
        return bpatch.get_reducer(self.vit) or registry.build("none")

    def model_info(self, img_size=None) -> ModelInfo:
        return ModelInfo.from_model(self.vit, tuple(img_size) if img_size else self.img_size)

    # -- weights ---------------------------------------------------------------------
    def _freeze(self):
        if "all" in self.frozen_exclude:
            return
        for name, p in self.named_parameters():
            if not any(e in name for e in self.frozen_exclude):
                p.requires_grad = False

    def init_weights(self):
        if self.pretrained or (isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained"):
            src = self.pretrained or self.init_cfg["checkpoint"]
            sd = load_weights(src)
            sd = sd.get("state_dict", sd.get("model", sd))
            if any(k.startswith("backbone.") for k in sd):
                sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            elif any(k.startswith("encoder.") for k in sd):
                sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
            missing, unexpected = self.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("vit.reducer_modules.")]
            if missing:
                raise ConfigError(f"pretrained backbone {src} lacks {len(missing)} weights, e.g. {missing[:3]}")
            self._is_init = True
            return
        # mmseg's ViT init (timm 'jax'-style): trunc-normal 0.02, zero biases, MLP biases ~N(0, 1e-6)
        nn.init.trunc_normal_(self.vit.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        for n, m in self.named_modules():
            if n.startswith("vit.reducer_modules"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    if ".mlp." in n:
                        nn.init.normal_(m.bias, mean=0.0, std=1e-6)
                    else:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._is_init = True

    # -- forward ---------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor):
        p = self.patch_size
        H, W = inputs.shape[-2:]
        if H % p or W % p:  # mmseg AdaptivePadding('corner'): zeros at the bottom/right
            inputs = F.pad(inputs, (0, (-W) % p, 0, (-H) % p))
        gh, gw = inputs.shape[-2] // p, inputs.shape[-1] // p
        fh, fw = gh, gw  # the grid returned
        if self.pad_to_img_size and (inputs.shape[-2] < self.img_size[0] or inputs.shape[-1] < self.img_size[1]):
            inputs = F.pad(inputs, (0, max(0, self.img_size[1] - inputs.shape[-1]),
                                    0, max(0, self.img_size[0] - inputs.shape[-2])))
            gh, gw = inputs.shape[-2] // p, inputs.shape[-1] // p
        try:
            x = self.vit.forward_features(inputs)
        except RuntimeError as e:
            if (gh * p, gw * p) == tuple(self.img_size):
                raise
            raise RuntimeError(
                f"reducer '{self._reducer_spec}' failed on a {gh}x{gw} token grid (patched for "
                f"{self.img_size[0] // p}x{self.img_size[1] // p}): {e}. If its structure is tied to one grid "
                f"(e.g. PM), set model.backbone.pad_to_img_size=True"
            ) from e
        st = bpatch.last_state(self.vit)
        if st is not None:
            x = bpatch.get_reducer(self.vit).restore(x, st)
        x = self.norm(x)
        B, N, C = x.shape
        if N != 1 + gh * gw:
            raise RuntimeError(
                f"reducer '{self._reducer_spec}' returned {N} tokens after restore; the dense head needs "
                f"the full grid 1 + {gh}x{gw} = {1 + gh * gw} (its restore() must map tokens back)"
            )
        out = x[:, 1:].reshape(B, gh, gw, C)[:, :fh, :fw].permute(0, 3, 1, 2).contiguous()
        if self.output_cls_token:
            return ([out, x[:, 0]],)
        return (out,)


def _convert_on_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Rename mmseg/timm encoder keys to this layout and resize the position embedding."""
    keys = [k for k in list(state_dict) if k.startswith(prefix)]
    for k in keys:
        rest = k[len(prefix):]
        nk = convert_key(rest)
        v = state_dict.pop(k)
        if nk is None:
            continue
        state_dict[prefix + nk] = v
    pk = prefix + "vit.pos_embed"
    if pk in state_dict:
        src = state_dict[pk]
        dst = module.vit.pos_embed
        if src.shape != dst.shape:
            n = src.shape[1] - 1
            s = int(math.isqrt(n))
            if s * s != n:
                raise ConfigError(f"cannot resize a non-square position embedding of {n} patches")
            state_dict[pk] = resize_pos_embed(src, module.vit.patch_embed.grid_size, (s, s),
                                              module.vit.interpolate_mode)


def _register():
    """Register :class:`PMBenchViT` in mmseg's ``MODELS`` once; a second import (mmengine's
    ``custom_imports``, a reload) keeps and returns the class registered first."""
    if "PMBenchViT" not in MODELS.module_dict:
        MODELS.register_module(module=PMBenchViT)
    return MODELS.module_dict["PMBenchViT"]


PMBenchViT = _register()
