"""Tiny on-disk image folders in ImageNet's layout for the data / train / DDP tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_imagefolder(root, n_classes: int = 3, train_per_class: int = 4, val_per_class: int = 3,
                     size: int = 40, seed: int = 0) -> Path:
    """``root/{train,val}/cNN/*.JPEG``: each class a distinct mean colour plus noise (learnable)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c in range(n_classes):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 80) % 256, (c * 150 + 40) % 256, (255 - c * 60) % 256], np.float32)
            for i in range(per):
                img = np.clip(base + rng.normal(0, 25, (size, size + 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


# Three ImageNet-1k synsets far from the start of the canonical order (indices 151, 805, 967): labels
# that a sorted-folder enumeration would get wrong (0, 1, 2).
SYNSETS = {"n02085620": 151, "n04254680": 805, "n07920052": 967}


def make_synset_folder(root, synsets=tuple(SYNSETS), train_synsets=None, per_class: int = 2, size: int = 40,
                       seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` with real ImageNet synset folder names (a subset of classes,
    as a real val subset has); ``train_synsets`` gives train other classes than val."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, names in (("train", train_synsets or synsets), ("val", synsets)):
        for c, wnid in enumerate(names):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 255, size=(size, size + 6, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{wnid}_{split}_{i}.JPEG", quality=90)
    return root
