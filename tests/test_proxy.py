"""The embedded proxy: deterministic generator, ImageNet layout, DeiT-shaped registered model."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch

from bench.runtime import data, models, proxy


def _digest(root):
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest(), len(files)


def test_generator_same_seed_same_bytes(tmp_path):
    a = proxy.generate(tmp_path / "a", train_per_class=1, val_per_class=1, seed=5)
    b = proxy.generate(tmp_path / "b", train_per_class=1, val_per_class=1, seed=5)
    c = proxy.generate(tmp_path / "c", train_per_class=1, val_per_class=1, seed=6)
    da, n = _digest(a)
    assert n == 2 * len(proxy.CLASSES) + 1  # images + proxy.json
    assert da == _digest(b)[0]
    assert da != _digest(c)[0]


def test_generator_bytes_do_not_depend_on_workers(tmp_path, monkeypatch):
    """The set is written by a process pool above PARALLEL_MIN_IMAGES: same bytes as one process."""
    monkeypatch.setattr(proxy, "PARALLEL_MIN_IMAGES", 1)
    serial = proxy.generate(tmp_path / "serial", train_per_class=2, val_per_class=1, seed=3, workers=1)
    pooled = proxy.generate(tmp_path / "pooled", train_per_class=2, val_per_class=1, seed=3, workers=2)
    assert _digest(serial) == _digest(pooled)
    assert _digest(serial)[1] == 3 * len(proxy.CLASSES) + 1


def test_render_is_order_independent():
    """Each image has its own seed, so one image does not depend on which were drawn before."""
    rng = lambda: np.random.default_rng(np.random.SeedSequence([0, 1, 3, 7]))  # noqa: E731
    first = np.asarray(proxy.render(3, rng()))
    proxy.render(5, np.random.default_rng(1))
    assert np.array_equal(first, np.asarray(proxy.render(3, rng())))


def test_layout_and_reuse(tmp_path):
    root = proxy.ensure_proxy_data(tmp_path / "px", size="smoke")
    classes, train = data.scan_split(root, "train")
    _, val = data.scan_split(root, "val")
    sz = proxy.SIZES["smoke"]
    assert len(classes) == len(proxy.CLASSES)
    assert len(train) == sz.train_per_class * len(classes) and len(val) == sz.val_per_class * len(classes)
    assert all(p.endswith(".JPEG") for p, _ in train)
    stamp = (root / "proxy.json").stat().st_mtime_ns
    assert proxy.ensure_proxy_data(tmp_path / "px", size="smoke") == root
    assert (root / "proxy.json").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_data_info_cli(tmp_path, capsys):
    import json

    from bench.cli import main

    root = proxy.generate(tmp_path / "px", train_per_class=1, val_per_class=2, seed=0)
    assert main(["data", "info", f"imagenet:{root}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_train"] == 10 and info["n_val"] == 20 and info["num_classes"] == 10


def test_proxy_model_is_deit_shaped():
    m = timm.create_model(proxy.PROXY_MODEL)
    assert type(m).__name__ == "VisionTransformer" and len(m.blocks) == 12
    assert m.cls_token is not None and m.patch_embed.num_patches == 196
    assert type(m.blocks[0]).__name__ == "Block"
    with torch.inference_mode():
        out = models.create(proxy.PROXY_MODEL).eval()(torch.randn(2, 3, proxy.IMG_SIZE, proxy.IMG_SIZE))
    assert out.shape == (2, len(proxy.CLASSES))
    with pytest.raises(RuntimeError, match="no downloadable weights"):
        timm.create_model(proxy.PROXY_MODEL, pretrained=True)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path))
    assert proxy.cache_dir() == tmp_path / "proxy"
    assert proxy.backbone_path().parent == tmp_path / "proxy"
