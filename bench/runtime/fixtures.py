"""Small fixtures in the real formats, so the paper profile's real path is exercised offline.

* an ImageNet-layout folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of a few tiny images,
* a tiny timm ViT (``pmbench_tiny_vit``: 12 blocks, 64 patches, CLS) and a DeiT-style
  ``{"model": state_dict}`` weights file for it, loaded through ``--weights`` like real DeiT files.

``./run_all.sh --profile paper --fixture`` runs the paper profile's code on these.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from bench.runtime.env import ROOT

TINY_MODEL = "pmbench_tiny_vit"
TINY_IMG = 64
CLASSES = ["n01440764", "n01443537", "n01484850"]


@register_model
def pmbench_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DeiT-structured ViT for fixtures: 12 blocks, patch 8 on 64x64 (64 patches + CLS)."""
    args = dict(img_size=TINY_IMG, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=len(CLASSES),
                qkv_bias=True)
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's create_model extras
        kwargs.pop(k, None)
    args.update(kwargs)
    m = VisionTransformer(**args)
    m.pmbench_name = TINY_MODEL
    # An AugReg-style input config (mean = std = 0.5, crop 0.9), as the real vit_* releases carry: the
    # paper profile's fixture run then exercises a normalisation other than ImageNet's end to end.
    m.pretrained_cfg = {"architecture": TINY_MODEL, "input_size": (3, args["img_size"], args["img_size"]),
                        "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                        "num_classes": args["num_classes"]}
    return m


def fixture_dir() -> Path:
    return Path(os.environ.get("PMBENCH_CACHE", ROOT / ".cache")) / "fixtures"


def _write_imagenet(root: Path, per_class: dict, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for ci, wnid in enumerate(CLASSES):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = rng.integers(0, 60, size=(80, 80, 3), dtype=np.uint8)
                img[..., ci] += 150  # class = dominant colour channel
                Image.fromarray(img).save(d / f"{wnid}_{k:04d}.JPEG", quality=90)


def ensure_fixture() -> dict:
    root = fixture_dir()
    inet = root / "imagenet"
    weights = root / "weights" / f"{TINY_MODEL}.pth"
    if not (inet / "val").exists():
        _write_imagenet(inet, {"train": 6, "val": 3})
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        m = pmbench_tiny_vit()
        tmp = weights.with_suffix(".tmp")
        torch.save({"model": m.state_dict()}, tmp)  # the official DeiT checkpoint layout
        os.replace(tmp, weights)
    return {"imagenet": str(inet), "model": TINY_MODEL, "weights": str(weights), "img_size": TINY_IMG,
            "weights_dir": str(weights.parent)}
