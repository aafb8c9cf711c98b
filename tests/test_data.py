"""Loaders on fixture folders: layout, transforms, subsets, errors, cache, sharding, eval counting."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bench.core.reducer import ConfigError
from bench.runtime import data, preprocess
from bench.runtime.evaluate import evaluate
from fixtures_data import make_imagefolder


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "inet", n_classes=3, train_per_class=4, val_per_class=3)


def test_loader_batches_and_labels(folder):
    dl = data.build_loader(f"imagenet:{folder}", "val", 4, img_size=32)
    xs, ys = zip(*list(dl))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (9, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert x.mean().abs() < 3 and x.min() < 0  # normalised, not [0, 1]
    info = data.describe_data(f"imagenet:{folder}")
    assert info["source"] == "real" and info["num_classes"] == 3 and info["n_train"] == 12 and info["n_val"] == 9
    assert data.num_classes(f"imagenet:{folder}") == 3


def test_eval_transform_is_deit(folder):
    """resize int(img/crop_pct) on the short side (bicubic), centre crop, ImageNet mean/std."""
    path = sorted((folder / "val" / "c01").iterdir())[0]
    img = Image.open(path).convert("RGB")  # 46 x 40
    got = preprocess.default(32, 0.875).eval_transform()(img)
    short = int(32 / 0.875)  # 36
    r = img.resize((round(46 * short / 40), short), Image.BICUBIC)
    w, h = r.size
    left, top = int(round((w - 32) / 2.0)), int(round((h - 32) / 2.0))
    ref = np.asarray(r.crop((left, top, left + 32, top + 32)), np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(data.IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(data.IMAGENET_STD)[:, None, None]
    assert torch.allclose(got, ref, atol=1e-5)


def test_train_loader_shuffles_per_epoch_and_drops_last(folder):
    dl = data.build_loader(f"imagenet:{folder}", "train", 5, train=True, img_size=32, seed=3)
    assert len(dl) == 2  # 12 images, full batches only
    dl.sampler.set_epoch(0)
    a = dl.sampler.indices()
    dl.sampler.set_epoch(1)
    b = dl.sampler.indices()
    assert sorted(a) == sorted(b) == list(range(12)) and a != b
    dl.sampler.set_epoch(0)
    assert dl.sampler.indices() == a  # seeded


def test_max_images_subset_is_seeded(folder):
    a = data.build_dataset(f"imagenet:{folder}", "val", img_size=32, max_images=5, seed=1)
    b = data.build_dataset(f"imagenet:{folder}", "val", img_size=32, max_images=5, seed=1)
    assert len(a) == 5 and a.indices == b.indices


def test_missing_split_names_the_layout(tmp_path, folder):
    shutil.rmtree(folder / "val")
    with pytest.raises(FileNotFoundError, match=r"val/<class>/\*\.JPEG"):
        data.build_loader(f"imagenet:{folder}", "val", 2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_loader(f"imagenet:{tmp_path / 'nope'}", "val", 2)


def test_flat_val_folder_is_explained(folder):
    """ImageNet's val as shipped: 50k loose JPEGs, no class folders."""
    val = folder / "val"
    for f in list(val.rglob("*.JPEG")):
        f.rename(val / f.name)
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(ConfigError, match="no class folders.*valprep"):
        data.build_loader(f"imagenet:{folder}", "val", 2)


def test_empty_class_folder_keeps_its_index(folder):
    """An empty class folder holds its label index (a val subset that lacks some classes still
    evaluates); a class folder present in one split only is an error for non-synset names."""
    (folder / "val" / "c00a").mkdir()
    with pytest.raises(ConfigError, match=r"different class folders .*only in val: \['c00a'\]"):
        data.build_loader(f"imagenet:{folder}", "val", 2)
    (folder / "train" / "c00a").mkdir()
    ys = torch.cat([y for _, y in data.build_loader(f"imagenet:{folder}", "val", 4, img_size=32)]).tolist()
    assert ys == [0, 0, 0, 2, 2, 2, 3, 3, 3]  # c00 -> 0, (empty c00a -> 1), c01 -> 2, c02 -> 3
    info = data.describe_data(f"imagenet:{folder}")
    assert info["num_classes"] == 4 and info["n_classes_present"] == 3
    for split in ("train", "val"):
        for f in (folder / split / "c01").iterdir():
            f.unlink()
    (folder / "val" / "c00").rename(folder / "val" / "tmp")
    with pytest.raises(ConfigError, match="different class folders"):
        data.build_loader(f"imagenet:{folder}", "val", 2)


def test_unreadable_image(folder):
    bad = folder / "val" / "c00" / "broken.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    dl = data.build_loader(f"imagenet:{folder}", "val", 16)
    with pytest.raises(ConfigError, match="cannot read image .*broken.JPEG"):
        list(dl)


def test_bad_data_spec():
    with pytest.raises(ConfigError, match="unknown data spec"):
        data.parse_data("cifar:/x")
    with pytest.raises(ConfigError, match="unknown proxy size"):
        data.parse_data("proxy:huge")


def test_val_cache_equals_uncached(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    plain = data.build_loader(f"imagenet:{folder}", "val", 4, img_size=32)
    cached = data.build_loader(f"imagenet:{folder}", "val", 4, img_size=32, cache=True)
    again = data.build_loader(f"imagenet:{folder}", "val", 4, img_size=32, cache=True)  # reuses the file
    for (x0, y0), (x1, y1), (x2, _) in zip(plain, cached, again):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(x1, x2)
    assert len(list((tmp_path / "cache" / "valcache").glob("*.u8"))) == 1


def test_sharded_sampler_counts():
    # evaluation: every sample exactly once over the ranks, no padding
    shards = [data.ShardedEpochSampler(7, shuffle=False, rank=r, world=3, pad=False) for r in range(3)]
    got = sorted(i for s in shards for i in s)
    assert got == list(range(7)) and [len(s) for s in shards] == [3, 2, 2]
    # training: equal counts per rank (DDP needs the same number of steps)
    shards = [data.ShardedEpochSampler(7, shuffle=True, seed=1, rank=r, world=2, pad=True) for r in range(2)]
    assert [len(list(s)) for s in shards] == [4, 4] and set(i for s in shards for i in s) == set(range(7))
    s = data.ShardedEpochSampler(10, shuffle=True, seed=0)
    full = list(s)
    s.skip = 4
    assert list(s) == full[4:] and list(s) == full  # a skip applies to one pass only


def test_evaluate_drops_distributed_sampler_padding(folder):
    """torch's DistributedSampler repeats samples to pad; evaluate() must count each once."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    ds = data.build_dataset(f"imagenet:{folder}", "val", img_size=32, max_images=7)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    full = evaluate(model, DataLoader(ds, batch_size=3))
    parts = []
    for r in range(2):
        s = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)
        parts.append(evaluate(model, DataLoader(ds, batch_size=3, sampler=s)))
    assert sum(p["n_images"] for p in parts) == 7 == full["n_images"]
    correct = sum(p["top1"] * p["n_images"] for p in parts) / 100
    assert correct == pytest.approx(full["top1"] * 7 / 100)
