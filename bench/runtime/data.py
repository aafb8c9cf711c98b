"""Image-classification data: the embedded proxy and real ImageNet through one loader.

Both sources use ImageNet's folder layout (``<root>/{train,val}/<class>/*.JPEG``)
and the same PIL decoding (torchvision's C++ image ops do not work with the
CPU torch here), so the proxy exercises the real code path.

Data specs: ``proxy`` (the default proxy set, generated on first use),
``proxy:smoke`` (the tiny one), ``imagenet:/path/to/root``.

Transforms come from a :class:`bench.runtime.preprocess.Preprocess` resolved from the
model (its timm ``pretrained_cfg``: mean/std, interpolation, input size; the
papers' 0.875 centre crop); without one, DeiT's input (ImageNet mean/std,
bicubic, 0.875).  See docs/preprocessing.md.

Labels (docs/preprocessing.md): class folders that are ImageNet-1k synsets
(``n01440764`` ...) are indexed in ImageNet-1k's canonical order, for train and
val alike, so a subset of classes (or a train split with other classes than
val) still lines up with a 1000-way head; other folder names are indexed in
sorted order and both splits must hold the same folders.

Distributed: training shards a per-epoch seeded permutation over ranks (padded so
every rank takes the same number of steps, as DDP needs); evaluation shards
without padding, so every sample is counted exactly once.

Optional validation cache (``cache=True``): the decoded, resized and cropped
uint8 images are written once to a memory-mapped file; since ``ToTensor`` is
``uint8 / 255`` the cached path gives bit-identical batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.core.reducer import ConfigError
from bench.runtime import preprocess as pp

IMAGENET_MEAN, IMAGENET_STD = pp.IMAGENET_MEAN, pp.IMAGENET_STD
IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SYNSET = re.compile(r"^n\d{8}$")
LABEL_MODES = ("auto", "imagenet-1k", "folders")


# --------------------------------------------------------------------------- data specs
def parse_data(data: str) -> dict:
    """``proxy`` / ``proxy:SIZE`` / ``imagenet:PATH`` -> {source, root, size}."""
    if not isinstance(data, str) or not data.strip():
        raise ConfigError("empty data spec; use 'proxy' or 'imagenet:/path/to/imagenet'")
    kind, _, rest = data.strip().partition(":")
    kind = kind.lower()
    if kind == "proxy":
        from bench.runtime import proxy

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
        from bench.runtime import proxy

        return proxy.ensure_proxy_data(size=d["size"])
    return d["root"]


# --------------------------------------------------------------------------- labels
@lru_cache(maxsize=1)
def imagenet1k_synsets() -> tuple[str, ...]:
    """ImageNet-1k's class order (index -> WordNet id), as timm ships it."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@dataclass(frozen=True)
class LabelSpace:
    """How class folders map to label indices.

    ``imagenet-1k``: folders are ImageNet-1k synsets, indexed in the canonical order (1000 labels,
    whatever subset of folders a split holds).  ``folders``: index = position in the sorted folder list.
    """

    kind: str
    names: tuple  # index -> class folder name

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self) -> dict:
        return {n: i for i, n in enumerate(self.names)}

    def describe(self) -> str:
        return ("ImageNet-1k synsets in the canonical 1000-class order" if self.kind == "imagenet-1k"
                else f"{len(self.names)} class folders in sorted order")


def _class_folders(root: Path, split: str) -> list[str]:
    """Sorted class folder names of ``root/split``, with clear errors for bad layouts."""
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
    return classes


def _is_in1k(folders) -> bool:
    known = set(imagenet1k_synsets())
    return all(SYNSET.match(f) and f in known for f in folders)


def resolve_labels(root: Path, num_classes: Optional[int] = None, mode: str = "auto") -> LabelSpace:
    """The label space of the folders under ``root`` (val, and train where present), checked against
    each other and against a model with ``num_classes`` outputs.  Lists folder names only (cheap).

    ``auto``: ImageNet-1k synset folders -> canonical indices when the model has 1000 classes (or is
    not known yet); any other folder names (or a head of another size) -> sorted folder order.
    """
    if mode not in LABEL_MODES:
        raise ConfigError(f"unknown label mode '{mode}'; use one of {', '.join(LABEL_MODES)}")
    root = Path(root)
    splits = {s: _class_folders(root, s) for s in ("val", "train") if (root / s).is_dir()}
    if not splits:
        _class_folders(root, "val")  # raises the layout error
    syn = {s: _is_in1k(f) for s, f in splits.items()}
    if len(set(syn.values())) > 1:
        a, b = ("val", "train") if syn.get("val") else ("train", "val")
        raise ConfigError(f"{root}/{a} holds ImageNet synset folders but {root}/{b} does not "
                          f"(e.g. '{splits[b][0]}'); both splits need the same kind of class folders")
    canonical = all(syn.values()) and (mode == "imagenet-1k" or (mode == "auto" and num_classes in (None, 1000)))
    if mode == "imagenet-1k" and not all(syn.values()):
        bad = next(f for fs in splits.values() for f in fs if not (SYNSET.match(f) and f in set(imagenet1k_synsets())))
        raise ConfigError(f"--labels imagenet-1k: folder '{bad}' is not an ImageNet-1k synset")
    if canonical:
        space = LabelSpace("imagenet-1k", imagenet1k_synsets())
    else:
        names = splits.get("val") or splits["train"]
        if "train" in splits and "val" in splits and splits["train"] != splits["val"]:
            only_t = sorted(set(splits["train"]) - set(splits["val"]))
            only_v = sorted(set(splits["val"]) - set(splits["train"]))
            raise ConfigError(
                f"{root}/train and {root}/val hold different class folders (only in train: {only_t[:5]}, only in "
                f"val: {only_v[:5]}); labels are the sorted folder order here ("
                + ("a head of " + str(num_classes) + " classes, not ImageNet-1k's 1000" if all(syn.values())
                   else "folder names that are not ImageNet-1k synsets")
                + "), so both splits need the same folders (keep empty folders to hold an index)")
        space = LabelSpace("folders", tuple(names))
    if num_classes is not None and space.num_classes != num_classes:
        hint = (" (the folders are ImageNet synsets: a 1000-class model indexes them canonically)"
                if all(syn.values()) else "")
        raise ConfigError(f"the model has {num_classes} classes but {root} has {space.num_classes} class folders"
                          f"{hint}; use a model whose head matches the data (--num-classes) or the matching data")
    return space


# --------------------------------------------------------------------------- folder dataset
def scan_split(root: Path, split: str, labels: Optional[LabelSpace] = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folders of ``root/split`` that hold images, [(path, label)]) with labels from ``labels``
    (default: :func:`resolve_labels` of ``root``).  Empty class folders are allowed (they keep their
    index); a split without any image is an error."""
    root = Path(root)
    folders = _class_folders(root, split)
    labels = labels or resolve_labels(root)
    index = labels.index()
    unknown = [c for c in folders if c not in index]
    if unknown:
        raise ConfigError(f"{root / split} has class folders outside the label space ({labels.describe()}): "
                          f"{unknown[:5]}")
    samples, present = [], []
    for c in folders:
        files = sorted(f for f in (root / split / c).iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        if files:
            present.append(c)
        samples.extend((str(f), index[c]) for f in files)
    if not samples:
        raise ConfigError(f"{root / split} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return present, samples


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"cannot read image {path}: {e}; replace or delete the file") from None


class FolderDataset(Dataset):
    """``root/split/<class>/*`` decoded with PIL, labelled by a :class:`LabelSpace`."""

    def __init__(self, root: Path, split: str, transform=None, labels: Optional[LabelSpace] = None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.labels = labels or resolve_labels(self.root)
        self.classes, self.samples = scan_split(self.root, split, self.labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, list(indices)
        if hasattr(base, "samples"):
            self.samples = [base.samples[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


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
    """Decoded, resized, centre-cropped uint8 images in a memory-mapped file (built once).
    Normalisation is applied on reading; the key holds the whole preprocessing anyway."""

    def __init__(self, base: FolderDataset, prep: pp.Preprocess, cache_root: Path):
        self.samples = base.samples
        key = hashlib.sha1(json.dumps([str(base.root.resolve()), base.split, prep.key(), base.labels.kind,
                                       [(p, l, os.path.getsize(p)) for p, l in base.samples]]).encode()).hexdigest()[:16]
        self.path = Path(cache_root) / f"valcache-{key}.u8"
        img_size = prep.img_size
        self.shape = (len(self.samples), img_size, img_size, 3)
        self.norm = prep.normalizer()
        if not (self.path.with_suffix(".done")).exists():
            from bench.runtime.outputs import exclusive_lock

            with exclusive_lock(self.path.with_suffix(".lock")):  # one builder (torchrun ranks, users)
                if not (self.path.with_suffix(".done")).exists():
                    self._build(prep.eval_transform(to_tensor=False))
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


# --------------------------------------------------------------------------- public API
def stratified_subset(labels: list[int], max_images: Optional[int], seed: int) -> Optional[list[int]]:
    """A seeded, class-stratified sample of ``max_images`` indices (sorted), or None for all.

    Classes are visited in a seeded order, one image each per round (each class's images in a seeded
    order), so N images cover min(N, #classes) classes and no class gets two more than another."""
    if max_images is None or max_images >= len(labels):
        return None
    if max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, not {max_images}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    order = [sorted(by_class)[j] for j in torch.randperm(len(by_class), generator=g).tolist()]
    queues = {c: [by_class[c][j] for j in torch.randperm(len(by_class[c]), generator=g).tolist()] for c in order}
    picked: list[int] = []
    r = 0
    while len(picked) < max_images:
        for c in order:
            if r < len(queues[c]):
                picked.append(queues[c][r])
                if len(picked) == max_images:
                    break
        r += 1
    return sorted(picked)


def _prep_for(d: dict, img_size: Optional[int], crop_pct: Optional[float], prep: Optional[pp.Preprocess]):
    if prep is not None:
        if img_size is not None and img_size != prep.img_size:
            prep = prep.with_size(img_size)
        return prep
    return pp.default(img_size or d["default_img_size"], pp.PROTOCOL_CROP_PCT if crop_pct is None else crop_pct)


@dataclass
class DatasetConfig:
    """What :func:`build_dataset` builds: ``train`` (augmentation), ``img_size`` / ``crop_pct`` (DeiT's
    input without ``prep``), ``max_images`` (a stratified subset drawn with ``seed``), ``cache``
    (evaluation images decoded once into a cache), ``prep``: the model's preprocessing
    (:func:`bench.runtime.preprocess.resolve`), ``labels``: the label space (default: resolved from the folders)."""
    train: bool = False
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    max_images: Optional[int] = None
    seed: int = 0
    cache: bool = False
    prep: Optional[pp.Preprocess] = None
    labels: Optional[LabelSpace] = None


@dataclass
class LoaderConfig(DatasetConfig):
    """:func:`build_loader`'s options: the dataset's plus ``workers``, ``distributed`` and ``shuffle``."""
    workers: int = 0
    distributed: bool = False
    shuffle: Optional[bool] = None


def build_dataset(data: str, split: str, opts: Optional[DatasetConfig] = None, **overrides) -> Dataset:
    """The dataset of ``data``'s ``split`` (``opts``: a :class:`DatasetConfig`; keyword ``overrides``
    name its fields); without ``prep`` DeiT's input at ``img_size`` / ``crop_pct``."""
    o = dataclasses.replace(opts or DatasetConfig(), **overrides)
    train, img_size, crop_pct, max_images, seed = o.train, o.img_size, o.crop_pct, o.max_images, o.seed
    cache, prep, labels = o.cache, o.prep, o.labels
    d = parse_data(data)
    root = data_root(data)
    prep = _prep_for(d, img_size, crop_pct, prep)
    labels = labels or resolve_labels(root)
    if train:
        ds = FolderDataset(root, split, prep.train_transform(d["source"]), labels=labels)
    elif cache:
        from bench.runtime import proxy

        ds = CachedEvalDataset(FolderDataset(root, split, labels=labels), prep, proxy.cache_dir().parent / "valcache")
    else:
        ds = FolderDataset(root, split, prep.eval_transform(), labels=labels)
    idx = stratified_subset([lab for _, lab in ds.samples], max_images, seed)
    return Subset(ds, idx) if idx is not None else ds


def build_loader(data: str, split: str, batch_size: int, opts: Optional[LoaderConfig] = None,
                 **overrides) -> DataLoader:
    """A DataLoader of (normalised float images, long labels); ``opts``: a :class:`LoaderConfig`
    (keyword ``overrides`` name its fields).

    ``train=True``: augmentation, seeded per-epoch shuffling (call ``loader.sampler.set_epoch``),
    full batches only.  ``shuffle=True`` without ``train``: the evaluation transform in a seeded
    shuffled order (calibration on the first N images then sees every class, not the first few).  ``distributed=True``: the sampler shards over the torch.distributed ranks
    (training pads to equal counts, evaluation does not).
    """
    from bench.runtime import distributed as dist

    o = dataclasses.replace(opts or LoaderConfig(), **overrides)
    train, workers, distributed, seed, cache, shuffle = o.train, o.workers, o.distributed, o.seed, o.cache, o.shuffle
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, not {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, not {workers}")
    ds = build_dataset(data, split, train=train, img_size=o.img_size, crop_pct=o.crop_pct, max_images=o.max_images,
                       seed=seed, cache=cache and not train, prep=o.prep, labels=o.labels)
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    shuffle = train if shuffle is None else shuffle
    sampler = ShardedEpochSampler(len(ds), shuffle=shuffle, seed=seed, rank=rank, world=world, pad=train)
    drop_last = bool(train and len(sampler) >= batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=False, persistent_workers=False)


def describe_data(data: str, *, count_train: bool = True, labels: Optional[LabelSpace] = None) -> dict:
    """Source, path, label space and split sizes of a data spec (stored in checkpoints and reports).
    ``count_train=False`` skips listing the (large) training split: n_train is None."""
    d = parse_data(data)
    root = data_root(data)
    labels = labels or resolve_labels(root)
    n_train = None
    if count_train and (Path(root) / "train").is_dir():
        n_train = len(scan_split(root, "train", labels)[1])
    present, val = scan_split(root, "val", labels)
    out = {"spec": data, "source": d["source"], "path": str(root), "num_classes": labels.num_classes,
           "n_classes_present": len(present), "labels": labels.kind,
           "n_train": n_train, "n_val": len(val), "img_size": d["default_img_size"]}
    if d["source"] == "proxy":
        out["proxy_size"] = d["size"]
        out["note"] = "synthetic proxy task: numbers are not ImageNet numbers"
    return out


def num_classes(data: str) -> int:
    return resolve_labels(data_root(data)).num_classes
