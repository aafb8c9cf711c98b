"""The embedded proxy segmentation set: deterministic, ADE20K layout, a few classes.

Why: segmentation numbers must be producible with no download.  The set mimics
what matters for token reduction in dense prediction: large uniform regions (sky,
ground: cheap to merge or prune) next to small textured objects (must survive the
reduction), in the ADE20K file layout so the very same mmseg pipeline reads it::

    <root>/images/{training,validation}/proxy_XXXXX.jpg
    <root>/annotations/{training,validation}/proxy_XXXXX.png

Label values follow ADE20K: 0 = unlabelled (ignored after ``reduce_zero_label``; a
thin band on object borders, as ADE's annotation gaps), 1..K = classes.  Every
image is a pure function of ``(seed, split, index)`` (numpy PCG64 seeded with that
triple), so the same seed gives the same bytes (PIL's JPEG/PNG encoders are
deterministic for fixed settings).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

CLASSES = ("sky", "ground", "disc", "box", "triangle", "ring")
PALETTE = [[120, 170, 230], [120, 90, 60], [220, 60, 50], [50, 80, 220], [60, 190, 70], [230, 200, 40]]
FORMAT_VERSION = 2
MANIFEST = "proxy_seg.json"
_GENERATED = re.compile(r"(images/(training|validation)/proxy_\d{5}\.jpg|annotations/(training|validation)/proxy_\d{5}\.png)")

SIZES = {
    # name: (train images, val images, height, width)
    "tiny": (4, 2, 256, 288),
    "smoke": (48, 8, 256, 288),
    "default": (400, 40, 256, 288),
}


def _noise(rng, h, w, scale):
    """Smooth value noise: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, h // scale + 2), max(2, w // scale + 2)
    g = rng.standard_normal((gh, gw))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _shape_mask(rng, kind, h, w, yy, xx):
    size = rng.uniform(0.12, 0.32) * min(h, w)
    cy, cx = rng.uniform(0.15 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    if kind == "disc":
        ry, rx = size * rng.uniform(0.7, 1.2), size * rng.uniform(0.7, 1.2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if kind == "box":
        hy, hx = size * rng.uniform(0.6, 1.1), size * rng.uniform(0.6, 1.1)
        return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
    if kind == "triangle":
        s = size * 1.3
        top = cy - s
        inside = (yy >= top) & (yy <= cy + s * 0.6)
        half = (yy - top) / (1.6 * s) * s
        return inside & (np.abs(xx - cx) <= half)
    # ring
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (r <= size) & (r >= size * rng.uniform(0.45, 0.65))


def _texture(rng, kind, h, w, yy, xx):
    """Class-specific colour family and texture, jittered per instance."""
    base = np.array(PALETTE[CLASSES.index(kind)], dtype=np.float64)
    base = base + rng.normal(0, 35, 3)
    n = _noise(rng, h, w, 24)[..., None] * 12
    if kind == "box":  # checker
        p = rng.integers(8, 14)
        t = (((yy // p) + (xx // p)) % 2)[..., None] * 40 - 20
    elif kind == "triangle":  # diagonal stripes
        p = rng.integers(6, 10)
        t = (np.sin((yy + xx) * np.pi / p) > 0)[..., None] * 36 - 18
    elif kind == "ring":
        t = _noise(rng, h, w, 4)[..., None] * 20
    else:  # disc: smooth shading
        t = ((yy - yy.mean()) / h)[..., None] * 40
    return base + n + t


def render(seed: int, split: str, index: int, h: int, w: int):
    """One (image HxWx3 uint8 RGB, label HxW uint8) pair."""
    rng = np.random.Generator(np.random.PCG64([seed, 0 if split == "training" else 1, index]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    label = np.zeros((h, w), dtype=np.uint8)
    horizon = (rng.uniform(0.3, 0.6) * h + _noise(rng, 1, w, 48)[0] * 10)[None, :]
    sky = yy < horizon
    img = np.empty((h, w, 3))
    sky_col = np.array(PALETTE[0], float) + rng.normal(0, 25, 3)
    img[:] = sky_col + ((yy / h)[..., None] * np.array([30, 20, -10])) + _noise(rng, h, w, 64)[..., None] * 6
    ground = np.array(PALETTE[1], float) + rng.normal(0, 25, 3) + _noise(rng, h, w, 6)[..., None] * 18
    img = np.where(sky[..., None], img, ground)
    label[sky] = 1
    label[~sky] = 2
    n_obj = int(rng.integers(1, 5))
    for _ in range(n_obj):
        kind = CLASSES[2 + int(rng.integers(0, len(CLASSES) - 2))]
        m = _shape_mask(rng, kind, h, w, yy, xx)
        if m.sum() < 64:
            continue
        img = np.where(m[..., None], _texture(rng, kind, h, w, yy, xx), img)
        label[m] = CLASSES.index(kind) + 1
        # unlabelled border band (ADE-like annotation gap)
        inner = m.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            inner &= np.roll(np.roll(m, dy, 0), dx, 1)
        label[m & ~inner] = 0
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def cache_root() -> Path:
    from bench.runtime import env

    return env.ROOT / ".cache" / "proxy_seg"


def ensure_proxy_seg(size: str = "default", seed: int = 0, root=None, force: bool = False) -> Path:
    """Generate (once) and return the proxy set's root in the ADE20K layout."""
    if size not in SIZES:
        from bench.core.reducer import ConfigError

        raise ConfigError(f"unknown proxy segmentation size '{size}'; available: {', '.join(SIZES)}")
    n_train, n_val, h, w = SIZES[size]
    in_cache = not root
    root = Path(root) if root else cache_root() / f"{size}-seed{seed}"
    spec = {"version": FORMAT_VERSION, "size": size, "seed": seed, "n_train": n_train, "n_val": n_val,
            "h": h, "w": w, "classes": list(CLASSES)}
    done = root / MANIFEST

    def made() -> bool:
        try:
            return json.loads(done.read_text()).get("spec") == spec
        except (OSError, ValueError):
            return False

    if made() and not force:
        return root
    from bench.runtime.outputs import exclusive_lock

    # in the cache, one generator at a time: a process that waited finds the set made
    with exclusive_lock(root.with_name(f".{root.name}.lock")) if in_cache else contextlib.nullcontext():
        if made() and not force:
            return root
        return _generate(root, spec, seed, in_cache)


def _generate(root: Path, spec: dict, seed: int, in_cache: bool) -> Path:
    """Render the set described by ``spec`` into ``root`` (a fresh folder renamed into place)."""
    from PIL import Image

    n_train, n_val, h, w = spec["n_train"], spec["n_val"], spec["h"], spec["w"]

    def build(tmp: Path) -> None:
        digest = hashlib.sha256()
        for split, n in (("training", n_train), ("validation", n_val)):
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "annotations" / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, lab = render(seed, split, i, h, w)
                ip = tmp / "images" / split / f"proxy_{i:05d}.jpg"
                lp = tmp / "annotations" / split / f"proxy_{i:05d}.png"
                Image.fromarray(img).save(ip, format="JPEG", quality=92)
                Image.fromarray(lab, mode="L").save(lp, format="PNG")
                digest.update(ip.read_bytes())
                digest.update(lp.read_bytes())
        (tmp / MANIFEST).write_text(json.dumps({"spec": spec, "sha256": digest.hexdigest()}, indent=1))

    # A fresh temporary folder renamed into place: an existing folder is replaced only when it is
    # an earlier output of this generator (manifest + generated files only), never a user's.
    from bench.runtime.outputs import build_dir

    return build_dir(root, build, manifest=MANIFEST,
                     is_ours=lambda m: isinstance(m.get("spec"), dict) and "sha256" in m,
                     allowed=lambda rel: bool(_GENERATED.fullmatch(rel.replace(os.sep, "/"))),
                     flag="the proxy segmentation folder", partial_ok=in_cache)
