"""Image-classification data: the embedded proxy and real ImageNet through one loader.

Both sources use ImageNet's folder layout (``<root>/{train,val}/<class>/*.JPEG``)
and the same PIL decoding (torchvision's C++ image ops do not work with the
CPU torch here), so the proxy exercises the real code path.

Data specs: ``proxy`` (the default proxy set, generated on first use),
``proxy:smoke`` (the tiny one), ``imagenet:/path/to/root``.

Transforms (measurement.md §3):

* eval: DeiT's ``Resize(int(img_size / crop_pct), bicubic)``, ``CenterCrop(img_size)``,
  ImageNet mean/std; ``crop_pct`` defaults to the papers' 0.875 (timm's cfgs use 0.9);
* train (real data): DeiT's augmentation through ``timm.data.create_transform``
  (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.3,
  random erasing 0.25); mixup / cutmix / label smoothing are applied by the trainer;
* train (proxy): RandomResizedCrop(scale 0.5-1) and colour jitter, *no flip*
  (a horizontal flip turns the "diag45" texture class into "diag135").

Distributed: training shards a per-epoch seeded permutation over ranks (padded so
every rank takes the same number of steps, as DDP needs); evaluation shards
without padding, so every sample is counted exactly once.

Optional validation cache (``cache=True``): the decoded, resized and cropped
uint8 images are written once to a memory-mapped file; since ``ToTensor`` is
``uint8 / 255`` the cached path gives bit-identical batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .reducer import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- data specs
def parse_data(data: str) -> dict:
    """``proxy`` / ``proxy:SIZE`` / ``imagenet:PATH`` -> {source, root, size}."""
    if not isinstance(data, str) or not data.strip():
        raise ConfigError("empty data spec; use 'proxy' or 'imagenet:/path/to/imagenet'")
    kind, _, rest = data.strip().partition(":")
    kind = kind.lower()
    if kind == "proxy":
        from . import proxy

        size = rest or "default"
        if size not in proxy.SIZES:
            raise ConfigError(f"unknown proxy size '{size}' in '{data}'; use one of: "
                              + ", ".join("proxy" if s == "default" else f"proxy:{s}" for s in proxy.SIZES))
        return {"source": "proxy", "root": None, "size": size, "default_img_size": proxy.IMG_SIZE}
    if kind in ("imagenet", "folder"):
        if not rest:
            raise ConfigError(f"'{data}': give the dataset root, e.g. imagenet:/data/imagenet")
        return {"source": "real", "root": Path(rest).expanduser(), "size": None, "default_img_size": 224}
    raise ConfigError(f"unknown data spec '{data}'; use 'proxy' or 'imagenet:/path/to/imagenet' "
                      "(a folder with train/<class>/*.JPEG and val/<class>/*.JPEG)")


def data_root(data: str) -> Path:
    d = parse_data(data)
    if d["source"] == "proxy":
        from . import proxy

        return proxy.ensure_proxy_data(size=d["size"])
    return d["root"]


# --------------------------------------------------------------------------- folder dataset
def scan_split(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) samples of ``root/split``; clear errors for bad layouts."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist; pass the folder that holds train/ and val/")
    d = root / split
    if not d.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"{d} not found: expected ImageNet's layout {root}/{split}/<class>/*.JPEG "
            f"(folders present in {root}: {have or 'none'})")
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    loose = [p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if not classes:
        hint = (f" ({len(loose)} images lie directly in {d}: sort them into one folder per class, e.g. with "
                "ImageNet's valprep.sh)" if loose else "")
        raise ConfigError(f"{d} has no class folders; expected {d}/<class>/*.JPEG{hint}")
    if loose:
        raise ConfigError(f"{d} mixes class folders with {len(loose)} loose images (e.g. {loose[0]}); "
                          "move every image into its class folder")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(f for f in (d / c).iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ConfigError(f"class folder {d / c} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                              "remove the folder or add its images")
        samples.extend((str(f), label) for f in files)
    return classes, samples


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"cannot read image {path}: {e}; replace or delete the file") from None


class FolderDataset(Dataset):
    """``root/split/<class>/*`` decoded with PIL."""

    def __init__(self, root: Path, split: str, transform=None, classes: Optional[list[str]] = None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.classes, self.samples = scan_split(self.root, split)
        if classes is not None and classes != self.classes:
            raise ConfigError(f"{self.root / split} has {len(self.classes)} classes that differ from the "
                              f"training split's {len(classes)}; both splits need the same class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


# --------------------------------------------------------------------------- transforms
def eval_transform(img_size: int, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, to_tensor=True):
    """DeiT's evaluation transform: resize int(img/crop_pct) bicubic, centre crop, normalise."""
    from torchvision import transforms as T

    t = [T.Resize(int(math.floor(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
         T.CenterCrop(img_size)]
    if to_tensor:
        t += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(t)


def train_transform(img_size: int, source: str):
    if source == "proxy":
        from torchvision import transforms as T

        return T.Compose([
            T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ColorJitter(0.3, 0.3, 0.3),
            T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    from timm.data import create_transform

    # DeiT (main.py defaults): --aa rand-m9-mstd0.5-inc1 --color-jitter 0.3 --reprob 0.25 bicubic
    return create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3,
                            interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)


# --------------------------------------------------------------------------- samplers
class ShardedEpochSampler(Sampler):
    """Seeded per-epoch shuffle (or identity) sharded over ranks.

    ``pad=True`` (training) repeats indices so every rank gets the same count;
    ``pad=False`` (evaluation) gives every sample to exactly one rank.
    ``skip`` drops the first samples of this rank's share (exact mid-epoch resume).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, pad: bool = True):
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and self.world > 1 and self.n % self.world:
            extra = self.world - self.n % self.world
            idx = idx + (idx * math.ceil(extra / max(1, self.n)))[:extra]
        return idx[self.rank::self.world]

    def __iter__(self):
        k, self.skip = self.skip, 0  # a skip applies to the next pass only
        return iter(self.indices()[k:])

    def __len__(self) -> int:
        if self.pad and self.world > 1:
            total = math.ceil(self.n / self.world)
        else:
            total = len(range(self.rank, self.n, self.world))
        return max(0, total - self.skip)


# --------------------------------------------------------------------------- validation cache
class CachedEvalDataset(Dataset):
    """Decoded, resized, centre-cropped uint8 images in a memory-mapped file (built once)."""

    def __init__(self, base: FolderDataset, img_size: int, crop_pct: float, cache_root: Path):
        self.samples = base.samples
        key = hashlib.sha1(json.dumps([str(base.root.resolve()), base.split, img_size, crop_pct,
                                       [(p, l, os.path.getsize(p)) for p, l in base.samples]]).encode()).hexdigest()[:16]
        self.path = Path(cache_root) / f"valcache-{key}.u8"
        self.shape = (len(self.samples), img_size, img_size, 3)
        self.norm = _normalizer()
        if not (self.path.with_suffix(".done")).exists():
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as fh:  # one builder (torchrun ranks, users)
                fcntl.flock(fh, fcntl.LOCK_EX)
                if not (self.path.with_suffix(".done")).exists():
                    self._build(eval_transform(img_size, crop_pct, to_tensor=False))
                fcntl.flock(fh, fcntl.LOCK_UN)
        self.arr = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)

    def _build(self, tf) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=self.shape)
        for i, (p, _) in enumerate(self.samples):
            arr[i] = np.asarray(tf(load_rgb(p)), dtype=np.uint8)
        arr.flush()
        del arr
        os.replace(tmp, self.path)
        self.path.with_suffix(".done").write_text("ok")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.arr[i])).permute(2, 0, 1).float().div(255)
        return self.norm(x), self.samples[i][1]


def _normalizer():
    from torchvision import transforms as T

    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


# --------------------------------------------------------------------------- public API
def _subset_indices(n: int, max_images: Optional[int], seed: int) -> Optional[list[int]]:
    if max_images is None or max_images >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_images].tolist())


def build_dataset(data: str, split: str, *, train: bool = False, img_size: Optional[int] = None,
                  crop_pct: float = 0.875, max_images: Optional[int] = None, seed: int = 0,
                  cache: bool = False) -> Dataset:
    d = parse_data(data)
    root = data_root(data)
    img = img_size or d["default_img_size"]
    if train:
        ds = FolderDataset(root, split, train_transform(img, d["source"]))
    elif cache:
        from . import proxy

        ds = CachedEvalDataset(FolderDataset(root, split), img, crop_pct, proxy.cache_dir().parent / "valcache")
    else:
        ds = FolderDataset(root, split, eval_transform(img, crop_pct))
    idx = _subset_indices(len(ds), max_images, seed)
    return Subset(ds, idx) if idx is not None else ds


def build_loader(data: str, split: str, batch_size: int, *, train: bool = False, img_size: Optional[int] = None,
                 crop_pct: float = 0.875, workers: int = 0, distributed: bool = False,
                 max_images: Optional[int] = None, seed: int = 0, cache: bool = False) -> DataLoader:
    """A DataLoader of (normalised float images, long labels).

    ``train=True``: augmentation, seeded per-epoch shuffling (call ``loader.sampler.set_epoch``),
    full batches only.  ``distributed=True``: the sampler shards over the torch.distributed ranks
    (training pads to equal counts, evaluation does not).
    """
    from . import distributed as dist

    ds = build_dataset(data, split, train=train, img_size=img_size, crop_pct=crop_pct,
                       max_images=max_images, seed=seed, cache=cache and not train)
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    sampler = ShardedEpochSampler(len(ds), shuffle=train, seed=seed, rank=rank, world=world, pad=train)
    drop_last = bool(train and len(sampler) >= batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=False, persistent_workers=False)


def describe_data(data: str, *, count_train: bool = True) -> dict:
    """Source, path and split sizes of a data spec (stored in checkpoints and reports).
    ``count_train=False`` skips listing the (large) training split: n_train is None."""
    d = parse_data(data)
    root = data_root(data)
    n_train = None
    if count_train and (Path(root) / "train").is_dir():
        n_train = len(scan_split(root, "train")[1])
    vclasses, val = scan_split(root, "val")
    out = {"spec": data, "source": d["source"], "path": str(root), "num_classes": len(vclasses),
           "n_train": n_train, "n_val": len(val), "img_size": d["default_img_size"]}
    if d["source"] == "proxy":
        out["proxy_size"] = d["size"]
        out["note"] = "synthetic proxy task: numbers are not ImageNet numbers"
    return out


def num_classes(data: str) -> int:
    return len(scan_split(data_root(data), "val")[0])
