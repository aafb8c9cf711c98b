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
