"""The embedded default: a synthetic classification task and a small DeiT-shaped backbone.

Why a proxy: the suite must run end to end on a fresh CPU-only machine with no
ImageNet and no downloadable weights, and token reduction must still *cost*
something, so the task is spatially structured like natural images.

Task (``ensure_proxy_data``): 10 classes, 128x128 RGB JPEGs in ImageNet's layout
(``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``).  The default task, ``object-hue``, draws a smooth,
low-saturation scene of a random hue with a few large soft blobs (neighbouring tokens are redundant, as in
photographs) and one saturated object (ellipse / rectangle / polygon, 18-30 px, about 4-16 of the 196
patches) whose *hue* decides the label: 10 hue centres 20 degrees apart, the object's hue drawn +-12
degrees around its centre, so neighbouring classes overlap and even the unreduced backbone stays below
100% (84.7%).  The backbone is trained with deep supervision at blocks 3, 6 and 9 (:data:`DEEP_SUPERVISION`),
which makes the CLS attention of its middle blocks find the object; with it the off-the-shelf ranking of
ToMe, MSTM, EViT and calibrated PM agrees with a real ViT-Ti's within the paired intervals (docs/proxy.md,
"The default since 2026-12-01").

Other tasks are experiments, chosen with ``PMBENCH_PROXY_TASK`` (docs/proxy.md): ``largest-hue`` (the
default until 2026-12-01: the hue of the largest of several textured objects over dense coloured clutter;
88.5% unreduced, but calibrated PM ranked best on it), ``small-object`` (10-20 px objects) and
``medium-object`` (18-30 px, +-5 degrees, a 96-wide backbone; :data:`TASKS`) and ``object-part`` (the
class's hue only on a small part of an object of another hue: a detail that merging similar tokens can
average away), ``object-shape`` (the object's outline decides the label, its hue is random) and
``large-shape`` (the same with 40-60 px objects), ``object-clutter`` (``object-hue``'s object over
``largest-hue``'s dense confetti, so few background tokens are alike), ``small-clutter`` (the same with
14-24 px objects; ``wide-clutter`` is its images with a 96-wide backbone, ``wide-tiny-clutter`` and
``wide-mid-clutter`` the same with 10-18 and 12-20 px objects), ``sparse-clutter`` (those with a third
of the confetti), ``centred-object`` (``object-hue`` with the object drawn around the image centre, as
photographs centre their subject; ``loosely-centred-object`` with a wider spread),
``centred-clutter`` (``small-clutter`` placed so), ``grey-object`` (``object-hue``'s images with the
scene turned grey, so a blend of the object with it keeps the object's hue), and ``object-texture`` and
``large-texture`` (the object's texture decides the label, its hue is random).  The smoke size always draws
``largest-hue`` images (its 8-step backbone learns nothing on the object task).

Everything is seeded per image (``numpy.random.SeedSequence([seed, split,
index])``), so the same seed writes the same bytes, independent of order.

Model (``pmbench_proxy_vit``): timm ``VisionTransformer`` with DeiT's structure
(12 standard pre-norm blocks, CLS token, learned position embedding, MLP ratio
4) and DeiT's token geometry (112x112 input, patch 8 -> 14x14 = 196 patch
tokens + CLS = 197), so the papers' configurations (ToMe r, EViT keep rates at
blocks 4/7/10, DynamicViT's rho) apply unchanged; width 64 with 2 heads so that
evaluating and fine-tuning it fits the default run on 2 CPU cores.  The eval transform is DeiT's with
crop_pct 0.875 (resize 128, centre crop 112).

The backbone (:mod:`bench.runtime.proxy_backbone`) is trained by the suite's own trainer
(``train_command``: 6 epochs of 8000 images, batch 32, AdamW lr 1e-3, 0.5 warm-up epochs, label
smoothing 0.1, deep supervision at blocks 3/6/9: 1500 steps, about 16-20 min on 2 CPU cores, 84.7% val top-1).  Those weights ship in ``data_files/`` (SHA-256 in ``proxy_backbone.json``, made with
``benchmarks/proxy_weights.py ship``), so a fresh clone loads them instead of training; a changed recipe
or data version has no shipped weights and trains.  ``./run_all.sh --retrain-proxy`` trains again.  The
backbone is cached under ``<repo>/.cache/proxy/`` (or ``$PMBENCH_CACHE/proxy``).
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from bench.runtime.env import ROOT

PROXY_MODEL = "pmbench_proxy_vit"
# The proxy task.  "object-hue" is the embedded default (its backbone ships); the others are the experiments
# of docs/proxy.md, chosen with PMBENCH_PROXY_TASK (:data:`TASKS`, after the renderers).  Each has its own
# data version, so its data, backbone and results never mix with the default's, and every table header
# names it.  Read once at import, so torchrun ranks and any other process of the run see the same task.
TASK_ENV = "PMBENCH_PROXY_TASK"
DEFAULT_TASK = "object-hue"
TASK = os.environ.get(TASK_ENV) or DEFAULT_TASK
IMG_SIZE = 112  # model input
GEN_SIZE = 128  # stored image side = int(112 / 0.875)
# 10 hue classes 20 degrees apart on a 200-degree arc (red .. blue): neighbouring classes look
# alike, so merging or dropping the wrong tokens changes the answer.
CLASSES = [f"hue{int(i * 20):03d}" for i in range(10)]
HUE_STEP = 20.0
HUE_JITTER = 5.0
TEXTURES = ["hstripes", "vstripes", "diag45", "diag135", "checker", "dots", "rings", "grid", "solid", "speckle"]


# The default recipe supervises the CLS token after blocks 3, 6 and 9 (0-based; EViT's and DynamicViT's
# pruning blocks) with the backbone's own norm and head (docs/proxy.md, "The default since 2026-12-01").  Without it
# a proxy backbone trained to convergence reads the label into the CLS token only in its last blocks, so
# the CLS attention of the middle blocks, which EViT and MSTM prune by, does not point at the object.
DEEP_SUPERVISION = (3, 6, 9)


@dataclass(frozen=True)
class ProxySize:
    train_per_class: int
    val_per_class: int
    epochs: float
    batch_size: int
    lr: float
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.0
    # blocks whose CLS token is also classified during training (``TrainConfig.deep_supervision``)
    deep_supervision: tuple = ()
    # the task this size's images are drawn from (None: the process's task, :data:`TASK`)
    task: Optional[str] = None

    def recipe(self) -> str:
        """The training recipe in a file name: a changed recipe is a different backbone."""
        r = f"{self.epochs:g}ep-bs{self.batch_size}-lr{self.lr:g}"
        if self.warmup_epochs != 0.2:
            r += f"-wu{self.warmup_epochs:g}"
        if self.label_smoothing:
            r += f"-ls{self.label_smoothing:g}"
        if self.deep_supervision:
            r += "-ds" + ".".join(str(b) for b in self.deep_supervision)
        return r


SIZES = {
    # the default profile: 48k training samples seen (1500 steps, about 16-20 min on 2 CPU cores, 84.7% top-1
    # measured; shipped, so a run does not train it), 1000 val images
    "default": ProxySize(train_per_class=800, val_per_class=100, epochs=6.0, batch_size=32, lr=1e-3,
                         warmup_epochs=0.5, label_smoothing=0.1, deep_supervision=DEEP_SUPERVISION),
    # smoke: seconds; every code path runs.  Its images are always largest-hue's: on the object task its
    # 8-step backbone stays at chance (10%), on largest-hue it learns enough (about 20%) for the CI gate
    # to see a reducer that breaks the model fall to chance
    "smoke": ProxySize(train_per_class=24, val_per_class=8, epochs=1.0, batch_size=32, lr=1e-3,
                       deep_supervision=DEEP_SUPERVISION, task="largest-hue"),
}


# --------------------------------------------------------------------------- model
@register_model
def pmbench_proxy_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT structure and token geometry (196 patches), width 64 with 2 heads (an experimental task may
    set another shape, :data:`TASKS`): the proxy backbone."""
    if pretrained:
        raise RuntimeError(
            "pmbench_proxy_vit has no downloadable weights; train it with `pmbench train --model "
            "pmbench_proxy_vit --data proxy` or use bench.runtime.proxy_backbone.load_proxy_backbone()"
        )
    args = dict(img_size=IMG_SIZE, patch_size=8, embed_dim=EMBED_DIM, depth=12, num_heads=NUM_HEADS, mlp_ratio=4.0,
                num_classes=len(CLASSES), qkv_bias=True)
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        kwargs.pop(k, None)  # timm.create_model's bookkeeping arguments
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pmbench_name = PROXY_MODEL
    model.pretrained_cfg = {"architecture": PROXY_MODEL, "input_size": (3, IMG_SIZE, IMG_SIZE),
                            "crop_pct": 0.875, "interpolation": "bicubic",
                            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                            "num_classes": args["num_classes"]}
    return model


# --------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    base = os.environ.get("PMBENCH_CACHE")
    return (Path(base) if base else ROOT / ".cache") / "proxy"


def size_task(size: str = "default") -> str:
    """The task the images of ``size`` are drawn from (the smoke size: always largest-hue)."""
    sz = SIZES.get(size)
    return (sz.task if sz else None) or TASK


def data_version(size: str = "default") -> int:
    return task_version(size_task(size))


def data_dir(size: str = "default", root: Optional[Path] = None) -> Path:
    return Path(root) if root is not None else cache_dir() / f"cls-v{data_version(size)}-{size}"


def backbone_path(size: str = "default") -> Path:
    """Cache file of the trained backbone, keyed by the data version and the training recipe, so a
    changed recipe trains a new backbone instead of reusing a stale one."""
    return cache_dir() / f"backbone-v{data_version(size)}-{size}-{SIZES[size].recipe()}.pt"


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive file lock in the cache dir: concurrent processes (torchrun ranks, several
    users of one cache) generate or train once and the others wait, then reuse the result."""
    from bench.runtime.outputs import exclusive_lock

    with exclusive_lock(cache_dir() / f".{name}.lock"):
        yield


# --------------------------------------------------------------------------- textures
def _texture(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """A [0,1] pattern map of texture ``kind`` over the pixel grid."""
    T = rng.uniform(3.5, 6.0)  # period in pixels: 1-2 cycles per 8x8 patch
    ph = rng.uniform(0, 2 * math.pi)
    jit = math.radians(rng.uniform(-8, 8))

    def stripes(angle):
        a = angle + jit
        u = xx * math.cos(a) + yy * math.sin(a)
        return (np.sin(2 * math.pi * u / T + ph) > 0).astype(np.float32)

    name = TEXTURES[kind]
    if name == "hstripes":
        return stripes(math.pi / 2)
    if name == "vstripes":
        return stripes(0.0)
    if name == "diag45":
        return stripes(math.pi / 4)
    if name == "diag135":
        return stripes(3 * math.pi / 4)
    if name == "checker":
        s = T * 0.8
        return ((np.floor((xx + ph) / s) + np.floor((yy + ph) / s)) % 2).astype(np.float32)
    if name == "dots":
        s = T * 1.2
        dx = (xx + ph) % s - s / 2
        dy = (yy + ph) % s - s / 2
        return (dx * dx + dy * dy < (0.28 * s) ** 2).astype(np.float32)
    if name == "rings":
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        return (np.sin(2 * math.pi * r / T + ph) > 0).astype(np.float32)
    if name == "grid":
        s = T * 1.3
        return ((((xx + ph) % s) < 1.6) | (((yy + ph) % s) < 1.6)).astype(np.float32)
    if name == "solid":
        return np.full(xx.shape, 0.85, np.float32) + rng.normal(0, 0.04, xx.shape).astype(np.float32)
    if name == "speckle":
        n = GEN_SIZE // 2 + 1
        small = (rng.random((n, n)) > 0.5).astype(np.float32)
        return np.kron(small, np.ones((2, 2), np.float32))[: xx.shape[0], : xx.shape[1]]
    raise ValueError(kind)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360, s, v), np.float32) * 255


def _shades(h: float, rng: np.random.Generator, dark=(0.35, 0.6)) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark shade of hue ``h`` (degrees), the dark one's value drawn from ``dark``."""
    return (_hsv(h, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)),
            _hsv(h, rng.uniform(0.5, 1.0), rng.uniform(*dark)))


def _colour_pair(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark shade of class ``cls``'s hue (+-5 degrees jitter)."""
    return _shades(cls * HUE_STEP + rng.uniform(-HUE_JITTER, HUE_JITTER), rng)


def _shape_mask(rng: np.random.Generator, cy: float, cx: float, side: float) -> np.ndarray:
    """A random ellipse / rectangle / polygon of about ``side`` pixels, as a bool mask."""
    img = Image.new("L", (GEN_SIZE, GEN_SIZE), 0)
    d = ImageDraw.Draw(img)
    kind = rng.integers(0, 3)
    h = side / 2 * rng.uniform(0.75, 1.0)
    w = side / 2 * rng.uniform(0.75, 1.0)
    if kind == 0:
        d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=255)
    elif kind == 1:
        d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=255)
    else:
        n = int(rng.integers(3, 7))
        rot = rng.uniform(0, 2 * math.pi)
        r = side / 2 * 1.1
        pts = [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
               for k in range(n)]
        d.polygon(pts, fill=255)
    return np.asarray(img) > 127


def _background(rng: np.random.Generator, confetti=(120, 200)) -> np.ndarray:
    """``largest-hue``'s busy background: a grey-ish low-frequency field, random segments, and
    ``confetti`` (a range) small dots in the classes' hues."""
    S = GEN_SIZE
    base = rng.uniform(60, 200) + rng.normal(0, 8, 3)  # low saturation: grey-ish
    low = rng.normal(0, 30, (6, 6, 1)) + rng.normal(0, 8, (6, 6, 3))
    low_img = np.stack([np.asarray(Image.fromarray(low[..., c].astype(np.float32), mode="F").resize((S, S), Image.BICUBIC))
                        for c in range(3)], -1)
    img = np.clip(base + low_img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 11))):  # clutter: random segments
        x0, y0 = rng.uniform(0, S, 2)
        ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(8, 40)
        col = tuple(int(c) for c in rng.uniform(0, 255, 3))
        d.line([x0, y0, x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(*confetti))):  # dense confetti in the classes' hues: few redundant tokens
        x0, y0 = rng.uniform(0, S, 2)
        r = rng.uniform(1.5, 4.5)
        col = tuple(int(c) for c in _hsv(rng.uniform(-10, 10 + HUE_STEP * len(CLASSES)), rng.uniform(0.3, 0.9),
                                         rng.uniform(0.4, 0.95)))
        d.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
    return np.asarray(pil.filter(ImageFilter.SMOOTH)).astype(np.float32)


def _with_pixel_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Every task's last step: Gaussian pixel noise of ``sigma`` over the float image, clipped to 8 bits."""
    img += rng.normal(0, sigma, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _render_largest_hue(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of the ``largest-hue`` task (the default until 2026-12-01) of class ``label``."""
    S = GEN_SIZE
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    img = _background(rng)
    side = rng.uniform(40, 60)
    margin = 8 + side / 2  # keep the target mostly inside the 112 centre crop
    cy, cx = rng.uniform(margin, S - margin, 2)
    objects = [(label, cy, cx, side)]
    for _ in range(int(rng.integers(1, 4))):
        off = int(rng.choice([-2, -1, 1, 2]))  # a neighbouring class's hue: similar, not equal
        cls = label + off if 0 <= label + off < len(CLASSES) else label - off
        s = side * rng.uniform(0.3, 0.85)
        dy, dx = rng.uniform(s / 2, S - s / 2, 2)
        objects.append((cls, dy, dx, s))
    order = list(range(len(objects)))
    if rng.random() < 0.5:  # half the time distractors are drawn first (target on top)
        order = order[1:] + order[:1]
    for k in order:
        cls, oy, ox, s = objects[k]
        mask = _shape_mask(rng, oy, ox, s)
        pat = _texture(int(rng.integers(0, len(TEXTURES))), rng, yy, xx, oy, ox)
        c1, c2 = _colour_pair(cls, rng)
        tex = pat[..., None] * c1 + (1 - pat[..., None]) * c2
        img[mask] = tex[mask]
    return _with_pixel_noise(img, rng, 6)


def _smooth_field(rng: np.random.Generator, scales=(64, 32, 16, 8), amp0: float = 40.0) -> np.ndarray:
    """A 1/f-like colour field: bicubically upsampled noise whose amplitude grows with its scale."""
    S = GEN_SIZE
    out = np.zeros((S, S, 3), np.float32)
    for sc in scales:
        n = max(2, S // sc + 1)
        amp = amp0 * sc / scales[0]
        low = rng.normal(0, amp, (n, n, 1)) + rng.normal(0, amp * 0.35, (n, n, 3))
        out += np.stack([np.asarray(Image.fromarray(low[..., c].astype(np.float32), mode="F").resize((S, S), Image.BICUBIC))
                         for c in range(3)], -1)
    return out


def _smooth_scene(rng: np.random.Generator) -> np.ndarray:
    """The object tasks' background: a smooth, low-saturation scene of a random hue with a few large soft
    blobs (neighbouring tokens are redundant, as in photographs)."""
    S = GEN_SIZE
    img = _hsv(rng.uniform(0, 360), rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.85)) + _smooth_field(rng)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, S, 2)
        rx, ry = rng.uniform(8, 24, 2)
        col = tuple(int(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9)))
        d.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=col)
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(3))).astype(np.float32)


def _place_object(rng: np.random.Generator, sides, spread: Optional[float] = None) -> tuple[float, float, float]:
    """The object tasks' object: its size (``sides`` px range) and a centre inside the 112 centre crop,
    uniform there, or with ``spread`` drawn around the image centre with that standard deviation (px), the
    way photographers centre their subject (``centred-object``)."""
    side = rng.uniform(*sides)
    margin = 10 + side / 2
    if spread is None:
        cy, cx = rng.uniform(margin, GEN_SIZE - margin, 2)
    else:
        cy, cx = np.clip(rng.normal(GEN_SIZE / 2, spread, 2), margin, GEN_SIZE - margin)
    return side, cy, cx


def _paint(img: np.ndarray, rng: np.random.Generator, mask: np.ndarray, hue: float) -> None:
    """Fill ``mask`` with a saturated, bright colour of ``hue`` (degrees) and a little pixel noise."""
    img[mask] = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)) + rng.normal(0, 4, (int(mask.sum()), 3))


def _with_object(img: np.ndarray, label: int, rng: np.random.Generator, sides, jitter: float,
                 spread: Optional[float]) -> Image.Image:
    """``img`` with the object tasks' object painted on it (placed by :func:`_place_object`, the class's hue
    +-``jitter`` degrees) and pixel noise: the object of ``small-object``, ``object-hue`` and the clutter
    tasks, whatever their background."""
    side, cy, cx = _place_object(rng, sides, spread)
    _paint(img, rng, _shape_mask(rng, cy, cx, side), label * HUE_STEP + rng.uniform(-jitter, jitter))
    return _with_pixel_noise(img, rng, 5)


def _render_small_object(label: int, rng: np.random.Generator, sides=(10, 20), jitter: float = HUE_JITTER,
                         spread: Optional[float] = None, grey: bool = False) -> Image.Image:
    """One image of the ``small-object`` task of class ``label``: a smooth, low-saturation scene of a
    random hue with a few large soft blobs (neighbouring tokens are redundant, as in photographs), and
    one small saturated object (side ``sides`` px: 10-20, i.e. 2-6 tokens) of the class's hue (+-5
    degrees), placed by :func:`_place_object`.  ``medium-object`` is the same scene with 18-30 px objects."""
    scene = _smooth_scene(rng)
    if grey:  # grey-object: the same scene without colour (the same draws), so blending keeps the object's hue
        scene = np.repeat(scene @ np.array([[0.299], [0.587], [0.114]], np.float32), 3, axis=-1)
    return _with_object(scene, label, rng, sides, jitter, spread)


# object-hue: neighbouring classes' hues overlap (+-12 degrees around centres 20 apart), so even the
# unreduced model cannot be sure near a class boundary and stays below 100%
OBJECT_HUE_JITTER = 12.0


def _render_object_part(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of the ``object-part`` task (an experiment, docs/proxy.md): ``object-hue``'s scene and
    18-30 px object, but the object's body has a distractor hue 30-60 degrees from the class's, and only
    a small part of it (7-11 px, one or two tokens) has the class's hue (+-12 degrees).  The label is a
    detail next to similar tokens, the kind of information that averaging similar tokens (ToMe) loses."""
    img = _smooth_scene(rng)
    side, cy, cx = _place_object(rng, (18, 30))
    _paint(img, rng, _shape_mask(rng, cy, cx, side), label * HUE_STEP + rng.choice([-1.0, 1.0]) * rng.uniform(30, 60))
    part = rng.uniform(7, 11)
    py, px = np.array([cy, cx]) + rng.uniform(-0.25, 0.25, 2) * (side - part)
    mask = _shape_mask(rng, py, px, part)  # drawn before the hue, as in every object task
    _paint(img, rng, mask, label * HUE_STEP + rng.uniform(-OBJECT_HUE_JITTER, OBJECT_HUE_JITTER))
    return _with_pixel_noise(img, rng, 5)


# object-shape: the ten outlines, in class order (each class folder keeps its hue name: the folders are
# only the labels' order)
SHAPES = ["disc", "square", "triangle-up", "triangle-down", "h-bar", "v-bar", "ring", "plus", "diamond", "corner"]


def _outline_mask(kind: str, rng: np.random.Generator, cy: float, cx: float, side: float) -> np.ndarray:
    """A bool mask of outline ``kind`` (:data:`SHAPES`) about ``side`` px across, centred on (cy, cx), with
    its width and height each jittered by up to 15%."""
    img = Image.new("L", (GEN_SIZE, GEN_SIZE), 0)
    d = ImageDraw.Draw(img)
    w, h = side / 2 * rng.uniform(0.85, 1.0), side / 2 * rng.uniform(0.85, 1.0)
    box = [cx - w, cy - h, cx + w, cy + h]
    t = side * 0.3 / 2  # half the thickness of the bars, the ring, the plus and the corner
    if kind == "disc":
        d.ellipse(box, fill=255)
    elif kind == "square":
        d.rectangle([cx - 0.85 * w, cy - 0.85 * h, cx + 0.85 * w, cy + 0.85 * h], fill=255)
    elif kind == "triangle-up":
        d.polygon([(cx, cy - h), (cx + w, cy + h), (cx - w, cy + h)], fill=255)
    elif kind == "triangle-down":
        d.polygon([(cx, cy + h), (cx + w, cy - h), (cx - w, cy - h)], fill=255)
    elif kind == "h-bar":
        d.rectangle([cx - w, cy - t, cx + w, cy + t], fill=255)
    elif kind == "v-bar":
        d.rectangle([cx - t, cy - h, cx + t, cy + h], fill=255)
    elif kind == "ring":
        d.ellipse(box, fill=255)
        d.ellipse([cx - w + 2 * t, cy - h + 2 * t, cx + w - 2 * t, cy + h - 2 * t], fill=0)
    elif kind == "plus":
        d.rectangle([cx - w, cy - t, cx + w, cy + t], fill=255)
        d.rectangle([cx - t, cy - h, cx + t, cy + h], fill=255)
    elif kind == "diamond":
        d.polygon([(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)], fill=255)
    elif kind == "corner":  # an L: the left and the bottom edge of the box
        d.rectangle([cx - w, cy - h, cx - w + 2 * t, cy + h], fill=255)
        d.rectangle([cx - w, cy + h - 2 * t, cx + w, cy + h], fill=255)
    else:
        raise ValueError(kind)
    return np.asarray(img) > 127


def _render_object_shape(label: int, rng: np.random.Generator, sides=(24, 36)) -> Image.Image:
    """One image of the ``object-shape`` task (an experiment, docs/proxy.md): ``object-hue``'s scene and
    one saturated object of a random hue, 24-36 px (3-4.5 tokens across), whose outline (:data:`SHAPES`)
    decides the label.  The outline lives in where the object's tokens are and in the tokens on its edge,
    which merging similar tokens (ToMe) moves and averages, while its mean colour carries nothing.
    ``large-shape`` is the same with 40-60 px objects (5-7.5 tokens across)."""
    img = _smooth_scene(rng)
    side, cy, cx = _place_object(rng, sides)
    mask = _outline_mask(SHAPES[label], rng, cy, cx, side)
    _paint(img, rng, mask, rng.uniform(0, 360))
    return _with_pixel_noise(img, rng, 5)


def _render_object_clutter(label: int, rng: np.random.Generator, sides=(18, 30), confetti=(120, 200),
                           spread: Optional[float] = None) -> Image.Image:
    """One image of the ``object-clutter`` task (an experiment, docs/proxy.md): ``object-hue``'s object
    (18-30 px, the class's hue +-12 degrees) over ``largest-hue``'s busy background (dense small confetti
    in the classes' hues, random segments), so few background tokens are alike.  Merging similar tokens
    (ToMe) then runs out of redundant pairs in its later blocks and must average the object's tokens with
    confetti of nearby hues, as a real image's tokens are averaged with unlike ones.  Its variants:
    ``small-clutter`` (14-24 px objects; ``wide-clutter`` draws the same images for a 96-wide backbone),
    ``sparse-clutter`` (14-24 px objects, 40-70 dots), ``wide-tiny-clutter`` (10-18 px objects, for a
    96-wide backbone), ``wide-mid-clutter`` (12-20 px objects, for a 96-wide backbone) and
    ``centred-clutter`` (``small-clutter`` with ``centred-object``'s placement)."""
    return _with_object(_background(rng, confetti), label, rng, sides, OBJECT_HUE_JITTER, spread)


def _render_object_texture(label: int, rng: np.random.Generator, sides=(30, 50)) -> Image.Image:
    """One image of the ``object-texture`` task (an experiment, docs/proxy.md): ``object-hue``'s smooth scene
    and one object of ``sides`` px (4-6 tokens across) filled with the class's texture (:data:`TEXTURES`, in
    class order) in two shades of a random hue, so every object token shows the class, as texture does in
    photographs, and a blend of two object tokens still does."""
    S = GEN_SIZE
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    img = _smooth_scene(rng)
    side, cy, cx = _place_object(rng, sides)
    mask = _shape_mask(rng, cy, cx, side)
    pat = _texture(label, rng, yy, xx, cy, cx)[..., None]
    light, dark = _shades(rng.uniform(0, 360), rng, dark=(0.3, 0.55))
    img[mask] = (pat * light + (1 - pat) * dark)[mask]
    return _with_pixel_noise(img, rng, 5)


# The backbone's (width, heads): the shipped proxy's, and the 96-wide one of the experiments whose CLS
# attention finds the object far better (docs/proxy.md, "A wider backbone").
DEFAULT_SHAPE = (64, 2)
WIDE = (96, 3)


@dataclass(frozen=True)
class ProxyTask:
    """One proxy task: the data version its images, backbone and results are cached under, how one image
    of a class is drawn, and the backbone's (width, heads)."""
    version: int
    render: Callable[[int, np.random.Generator], Image.Image]
    shape: tuple = DEFAULT_SHAPE


TASKS = {
    "largest-hue": ProxyTask(5, _render_largest_hue),  # the default until 2026-12-01
    "small-object": ProxyTask(8, _render_small_object),
    "medium-object": ProxyTask(9, partial(_render_small_object, sides=(18, 30)), WIDE),
    "object-hue": ProxyTask(10, partial(_render_small_object, sides=(18, 30), jitter=OBJECT_HUE_JITTER)),
    "object-part": ProxyTask(11, _render_object_part),
    "object-shape": ProxyTask(12, _render_object_shape),
    "large-shape": ProxyTask(13, partial(_render_object_shape, sides=(40, 60))),
    "object-clutter": ProxyTask(14, _render_object_clutter),
    "small-clutter": ProxyTask(15, partial(_render_object_clutter, sides=(14, 24))),
    "sparse-clutter": ProxyTask(16, partial(_render_object_clutter, sides=(14, 24), confetti=(40, 70))),
    "wide-clutter": ProxyTask(17, partial(_render_object_clutter, sides=(14, 24)), WIDE),  # small-clutter's images
    "wide-tiny-clutter": ProxyTask(18, partial(_render_object_clutter, sides=(10, 18)), WIDE),
    "wide-mid-clutter": ProxyTask(19, partial(_render_object_clutter, sides=(12, 20)), WIDE),
    # object-hue's image with the object drawn around the image centre, as photographs place their subject,
    # which a token structure fixed per position (PM) can learn to keep; uniform placement in the crop has a
    # spread of about 26 px
    "centred-object": ProxyTask(20, partial(_render_small_object, sides=(18, 30), jitter=OBJECT_HUE_JITTER,
                                            spread=12.0)),
    "centred-clutter": ProxyTask(21, partial(_render_object_clutter, sides=(14, 24), spread=12.0)),
    "loosely-centred-object": ProxyTask(22, partial(_render_small_object, sides=(18, 30), jitter=OBJECT_HUE_JITTER,
                                                    spread=18.0)),
    # object-hue's images with a colourless scene: a token blended with the background keeps the object's
    # hue (mixing with grey scales the chroma, not the angle), only its saturation falls
    "grey-object": ProxyTask(23, partial(_render_small_object, sides=(18, 30), jitter=OBJECT_HUE_JITTER, grey=True)),
    "object-texture": ProxyTask(24, _render_object_texture),
    "large-texture": ProxyTask(25, partial(_render_object_texture, sides=(40, 60))),
}
_TASK_ERROR = None if TASK in TASKS else (
    f"{TASK_ENV}={TASK!r} is not a proxy task; use one of {', '.join(TASKS)} (or unset it)")
_PROCESS_TASK = TASKS.get(TASK, TASKS[DEFAULT_TASK])  # an unknown TASK fails in check_task(), not here
DATA_VERSION = _PROCESS_TASK.version
EMBED_DIM, NUM_HEADS = _PROCESS_TASK.shape


def task_version(task: Optional[str]) -> int:
    """The data version of ``task``'s images (this process's task's for None or an unknown name)."""
    return TASKS[task].version if task in TASKS else DATA_VERSION


def render(label: int, rng: np.random.Generator, task: Optional[str] = None) -> Image.Image:
    """One proxy image of class ``label`` for ``task`` (default: this process's task, :data:`TASK`)."""
    return TASKS.get(task or TASK, TASKS[DEFAULT_TASK]).render(label, rng)


def check_task() -> None:
    """A ConfigError naming the valid tasks when ``PMBENCH_PROXY_TASK`` names none."""
    if _TASK_ERROR:
        from bench.core.reducer import ConfigError

        raise ConfigError(_TASK_ERROR)


def task_note(size: str = "default") -> str:
    """What a table header adds for a non-default task ("" for the default)."""
    if size_task(size) != TASK:  # the smoke size's own images
        return f"images of task {size_task(size)} (the {size} size always uses them; bench/runtime/proxy.py SIZES)"
    if TASK == DEFAULT_TASK:
        return ""
    wide = (EMBED_DIM, NUM_HEADS) != DEFAULT_SHAPE
    shape = f", backbone width {EMBED_DIM}, {NUM_HEADS} heads" if wide else ""
    return f"task {TASK} ({TASK_ENV}; experimental, docs/proxy.md{shape})"


def _write_class(out: Path, split: str, c: int, per_class: int, seed: int, task: Optional[str] = None) -> None:
    """The ``per_class`` images of class ``c`` in one split (each seeded on its own)."""
    split_id = {"train": 0, "val": 1}[split]
    d = out / split / f"{c:02d}_{CLASSES[c]}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        idx = c * per_class + i
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, c, i]))
        render(c, rng, task).save(d / f"{split}_{idx:06d}.JPEG", format="JPEG", quality=90)


# Below this many images the set is written in-process (tests, smoke): a worker pool costs more than it saves.
PARALLEL_MIN_IMAGES = 500


def _write_splits(out: Path, per_class: dict, seed: int, workers: Optional[int] = None,
                  task: Optional[str] = None) -> None:
    """Every (split, class) folder, on ``workers`` processes (default: the CPUs this process may use).
    Images are seeded one by one, so the bytes do not depend on the number of workers or the order."""
    jobs = [(out, split, c, n, seed, task) for split, n in per_class.items() for c in range(len(CLASSES))]
    if workers is None:
        from bench.runtime.startup import usable_cpus

        workers = usable_cpus()
    if workers <= 1 or sum(per_class.values()) * len(CLASSES) < PARALLEL_MIN_IMAGES:
        for job in jobs:
            _write_class(*job)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        for f in [pool.submit(_write_class, *job) for job in jobs]:
            f.result()  # re-raises a worker's error


MANIFEST = "proxy.json"
MANIFEST_KIND = "pmbench-proxy-classification"
_GENERATED = re.compile(r"(train|val)/\d\d_[A-Za-z0-9]+/(train|val)_\d{6}\.JPEG")


def _read_meta(root: Path) -> Optional[dict]:
    """The manifest of a proxy folder, or None (absent, unreadable or not ours)."""
    try:
        meta = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == MANIFEST_KIND else None


def generate(out: Path, *, train_per_class: int, val_per_class: int, seed: int = 0,
             workers: Optional[int] = None, task: Optional[str] = None) -> Path:
    """Write the proxy set to ``out``; a ``proxy.json`` manifest is written last.

    The set is built in a fresh temporary folder beside ``out`` and renamed into place.  ``out``
    may be absent, an empty folder or an earlier proxy set (its manifest says so and it holds
    only generated images), which is replaced; anything else is a ConfigError and nothing is
    touched (:func:`bench.runtime.outputs.build_dir`).  ``task``: the images' task (default :data:`TASK`)."""
    from bench.runtime.outputs import build_dir

    task = task or TASK

    def build(tmp: Path) -> None:
        _write_splits(tmp, {"train": train_per_class, "val": val_per_class}, seed, workers, task)
        meta = {"kind": MANIFEST_KIND, "version": task_version(task), "task": task, "seed": seed,
                "classes": CLASSES, "image_size": GEN_SIZE, "model_input": IMG_SIZE,
                "train_per_class": train_per_class, "val_per_class": val_per_class,
                "n_train": train_per_class * len(CLASSES), "n_val": val_per_class * len(CLASSES)}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))

    return build_dir(out, build, manifest=MANIFEST, is_ours=lambda m: m.get("kind") == MANIFEST_KIND,
                     allowed=lambda rel: bool(_GENERATED.fullmatch(rel.replace(os.sep, "/"))))


def ensure_proxy_data(root: Optional[Path] = None, *, size: str = "default", seed: int = 0) -> Path:
    """The proxy set's root (train/ and val/ class folders), generated on first use."""
    check_task()
    if size not in SIZES:
        from bench.core.reducer import ConfigError

        raise ConfigError(f"unknown proxy size '{size}'; available: {', '.join(SIZES)}")
    out = data_dir(size, root)
    sz = SIZES[size]

    def ready() -> bool:
        meta = _read_meta(out)
        if meta is None:
            return False
        return (meta.get("version") == data_version(size) and meta.get("seed") == seed
                and meta.get("train_per_class") == sz.train_per_class and meta.get("val_per_class") == sz.val_per_class)

    if ready():
        return out
    from bench.runtime.outputs import check_out_dir

    check_out_dir(out, "--out" if root is not None else "the proxy data folder", manifest=MANIFEST)
    with cache_lock(f"data-{size}"):
        if ready():  # made by another process while we waited
            return out
        t0 = time.time()
        print(f"[pmbench] generating the proxy dataset ({size}) in {out} ...", file=sys.stderr)
        generate(out, train_per_class=sz.train_per_class, val_per_class=sz.val_per_class, seed=seed,
                 task=size_task(size))
        print(f"[pmbench] proxy dataset ready in {time.time() - t0:.0f} s", file=sys.stderr)
    return out
