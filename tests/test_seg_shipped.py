"""The shipped proxy Segmenter (bench/data_files/proxy_segmenter.*, docs/proxy.md "Shipped weights"):
hash-checked, installed instead of trained, refused with the fix when damaged, retrained on request."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.core.reducer import ConfigError
from bench.runtime.results import file_hash

pytest.importorskip("mmseg")

from bench.seg import train as segtrain  # noqa: E402


def test_the_shipped_segmenter_matches_its_manifest_and_the_proxy_config(tmp_path):
    """A change of the proxy config or data version without re-shipping
    (`python benchmarks/proxy_weights.py ship --what segmenter`) fails here."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from bench.seg import configs as segconfigs, proxy_data
    from bench.seg.checkpoint import load_into

    e = segtrain.shipped_segmenter_entry()
    assert e is not None, (f"no shipped proxy Segmenter for key {segtrain.proxy_key('default')}: run "
                           "`python benchmarks/proxy_weights.py ship --what segmenter`")
    assert file_hash(segtrain.SHIPPED_MANIFEST.parent / e["file"], n=64) == e["sha256"]
    cfg = segconfigs.build_config("proxy", "none")
    assert e["command"] == segtrain.RETRAIN_COMMAND and e["meta"]["config"] == "proxy"
    assert e["meta"]["max_iters"] == cfg.train_cfg.max_iters and 0 < e["val_miou"] <= 100
    out = tmp_path / "segmenter.pth"
    segtrain._install_shipped(e, out)
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    load_into(model, out)  # strict: every weight of the proxy config, nothing else
    assert list(model.dataset_meta["classes"]) == list(proxy_data.CLASSES)


@pytest.fixture
def fake_shipped(tmp_path, monkeypatch):
    """A shipped-weights folder holding a small random state dict for the current proxy key, and an
    empty Segmenter cache; training raises unless a test replaces it."""
    from safetensors.torch import save_file

    d = tmp_path / "data_files"
    d.mkdir()
    sd = {"backbone.w": torch.randn(4, 3), "decode_head.b": torch.randn(5)}
    save_file(sd, str(d / "s.safetensors"))
    meta = {"config": "proxy", "reducer": "none", "max_iters": 300, "train_seconds": 1.0,
            "val": {"mIoU": 50.0}, "dataset_meta": {"classes": ["a", "b"]}}
    entry = {"file": "s.safetensors", "sha256": file_hash(d / "s.safetensors", n=64),
             "key": segtrain.proxy_key("default"), "command": segtrain.RETRAIN_COMMAND, "val_miou": 50.0,
             "meta": meta}
    (d / "proxy_segmenter.json").write_text(json.dumps({"default": entry}))
    monkeypatch.setattr(segtrain, "SHIPPED_MANIFEST", d / "proxy_segmenter.json")
    cache = tmp_path / "seg"
    monkeypatch.setattr(segtrain, "proxy_checkpoint_path", lambda size="default": cache / f"proxy_segmenter-{size}.pth")
    trained = []

    def no_training(config, out, opts=None, **kw):
        raise AssertionError(f"the Segmenter was trained: {out}")

    monkeypatch.setattr(segtrain, "train_segmenter", no_training)
    return SimpleNamespace(dir=d, sd=sd, trained=trained)


def _fake_training(fs, monkeypatch):
    def train(config, out, opts=None, **kw):
        fs.trained.append((config, Path(out), opts))
        meta = {"config": "proxy", "max_iters": opts.max_iters or 300, "train_seconds": 2.0, "val": {"mIoU": 40.0}}
        segtrain.save_clean({"x": torch.zeros(1)}, out, meta)
        Path(str(out) + ".json").write_text(json.dumps(meta))
        return meta

    monkeypatch.setattr(segtrain, "train_segmenter", train)


def test_a_fresh_cache_installs_the_shipped_segmenter_without_training(fake_shipped):
    logs = []
    out = segtrain.ensure_proxy_segmenter(log=logs.append)
    ck = torch.load(out, weights_only=True)
    assert ck.keys() == {"state_dict", "meta"}
    assert all(torch.equal(ck["state_dict"][k], v) for k, v in fake_shipped.sd.items())
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["origin"] == "shipped" and meta["sha256"] == ck["meta"]["sha256"] and meta["val"]["mIoU"] == 50.0
    assert "shipped weights" in logs[0] and "50.0" in logs[0]
    line = segtrain.origin_line(out)
    assert line.startswith("shipped weights s.safetensors") and "val mIoU 50.0" in line and "--retrain-proxy" in line
    (fake_shipped.dir / "s.safetensors").unlink()
    assert segtrain.ensure_proxy_segmenter() == out  # cached: the shipped file is not read again


def test_damaged_or_missing_shipped_segmenter_is_refused_with_the_fix(fake_shipped):
    f = fake_shipped.dir / "s.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="SHA-256") as e:
        segtrain.ensure_proxy_segmenter()
    assert "git checkout" in str(e.value) and segtrain.RETRAIN_COMMAND in str(e.value)
    f.unlink()
    with pytest.raises(ConfigError, match="missing"):
        segtrain.ensure_proxy_segmenter()


def test_a_changed_config_trains_instead_of_loading_weights_of_another_config(fake_shipped, monkeypatch):
    m = json.loads((fake_shipped.dir / "proxy_segmenter.json").read_text())
    m["default"]["key"] = "0123456789"
    (fake_shipped.dir / "proxy_segmenter.json").write_text(json.dumps(m))
    assert segtrain.shipped_segmenter_entry() is None
    _fake_training(fake_shipped, monkeypatch)
    out = segtrain.ensure_proxy_segmenter(log=None)
    assert [(c, o) for c, o, _ in fake_shipped.trained] == [("proxy", out)]
    assert segtrain.origin_line(out).startswith("trained by this suite (300 iterations")


def test_force_and_other_schedules_train_even_when_weights_are_shipped(fake_shipped, monkeypatch):
    out = segtrain.ensure_proxy_segmenter(log=None)  # shipped first
    _fake_training(fake_shipped, monkeypatch)
    assert segtrain.ensure_proxy_segmenter(force=True, log=None) == out
    assert json.loads(Path(str(out) + ".json").read_text()).get("origin") is None  # the trained one replaced it
    short = segtrain.ensure_proxy_segmenter(max_iters=5, log=None)
    smoke = segtrain.ensure_proxy_segmenter(size="smoke", log=None)
    assert [o for _, o, _ in fake_shipped.trained] == [out, short, smoke]
    assert [opts.max_iters for _, _, opts in fake_shipped.trained] == [None, 5, segtrain.SMOKE_ITERS]


def test_a_segmenter_made_by_another_process_while_this_one_waited_is_reused(fake_shipped, monkeypatch):
    """Two processes that both miss the cached Segmenter (parallel test workers, two runs on one
    cache): the second waits on the lock, then takes the first one's checkpoint instead of training."""
    import contextlib

    from bench.runtime import outputs

    real_lock = outputs.exclusive_lock

    @contextlib.contextmanager
    def another_process_trains_first(path):
        with real_lock(path):
            segtrain.save_clean({"x": torch.ones(1)}, segtrain.proxy_checkpoint_path("smoke"), {"origin": "other"})
            yield

    monkeypatch.setattr(outputs, "exclusive_lock", another_process_trains_first)
    out = segtrain.ensure_proxy_segmenter(size="smoke", log=None)  # training would fail the fixture
    assert torch.equal(torch.load(out, weights_only=True)["state_dict"]["x"], torch.ones(1))


@pytest.mark.parametrize("retrain", [False, True])
def test_the_seg_stage_retrains_the_proxy_segmenter_with_retrain_proxy(monkeypatch, retrain):
    from bench.pipeline.stages import seg

    calls = []
    monkeypatch.setattr(segtrain, "ensure_proxy_segmenter", lambda **kw: calls.append(kw) or Path("ck.pth"))
    ctx = SimpleNamespace(profile={"data_source": "proxy", "proxy_size": "default"},
                          args=SimpleNamespace(retrain_proxy=retrain))
    assert seg._targets(ctx) == [("proxy", "proxy", Path("ck.pth"))]
    assert calls == [{"size": "default", "force": retrain}]
