"""The shipped proxy backbone (bench/data_files/, docs/proxy.md "Shipped weights"): hash-checked,
loaded instead of trained, refused with the fix when damaged, retrained on request."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bench import orchestrate
from bench.core.reducer import ConfigError
from bench.runtime import proxy, proxy_backbone
from bench.runtime.checkpoint import load_model
from bench.runtime.results import file_hash


def test_the_shipped_weights_match_their_manifest_and_the_recipe():
    """A recipe or data change without re-shipping (benchmarks/proxy_weights.py ship) fails here."""
    e = proxy_backbone.shipped_entry("default")
    assert e is not None, (f"no shipped weights for the default recipe {proxy.SIZES['default'].recipe()} and data "
                           f"version {proxy.DATA_VERSION}: run `python benchmarks/proxy_weights.py ship`")
    f = proxy_backbone.SHIPPED_DIR / e["file"]
    assert file_hash(f, n=64) == e["sha256"]
    assert e["command"].split()[1:] == proxy_backbone.train_command("default", "OUT.pt")[3:]
    assert 0 < e["val_top1"] <= 100 and e["n_val"] == proxy.SIZES["default"].val_per_class * len(proxy.CLASSES)
    m = proxy_backbone.load_shipped(e)
    assert sum(p.numel() for p in m.parameters()) > 0 and not m.training


@pytest.fixture
def fake_shipped(tmp_path, monkeypatch):
    """A shipped-weights folder holding random proxy weights, and an empty cache."""
    from safetensors.torch import save_file

    d = tmp_path / "data_files"
    d.mkdir()
    torch.manual_seed(0)
    model = proxy.pmbench_proxy_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    entry = {"file": "w.safetensors", "sha256": file_hash(d / "w.safetensors", n=64),
             "data_version": proxy.DATA_VERSION, "recipe": proxy.SIZES["default"].recipe(), "val_top1": 50.0}
    (d / "proxy_backbone.json").write_text(json.dumps({"default": entry}))
    monkeypatch.setattr(proxy_backbone, "SHIPPED_DIR", d)
    monkeypatch.setattr(proxy_backbone, "SHIPPED_MANIFEST", d / "proxy_backbone.json")
    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    return model, d


def _no_training(*a, **k):
    raise AssertionError(f"the backbone was trained: {a}")


def test_a_fresh_cache_loads_the_shipped_weights_without_training(fake_shipped, monkeypatch):
    model, _ = fake_shipped
    monkeypatch.setattr(subprocess, "run", _no_training)
    path = proxy_backbone.ensure_backbone(size="default")
    assert path == proxy.backbone_path("default") and proxy_backbone.backbone_origin(path) == "shipped"
    loaded, _ = load_model(path, proxy.PROXY_MODEL)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert proxy_backbone.ensure_backbone(size="default") == path  # cached: no second conversion


def test_damaged_shipped_weights_are_refused_with_the_fix(fake_shipped, monkeypatch):
    _, d = fake_shipped
    raw = bytearray((d / "w.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "w.safetensors").write_bytes(bytes(raw))
    monkeypatch.setattr(subprocess, "run", _no_training)
    with pytest.raises(ConfigError, match="SHA-256") as e:
        proxy_backbone.ensure_backbone(size="default")
    assert "git checkout" in str(e.value) and "--retrain-proxy" in str(e.value)
    (d / "w.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing"):
        proxy_backbone.ensure_backbone(size="default")


def test_a_changed_recipe_does_not_load_weights_of_another_recipe(fake_shipped, monkeypatch):
    _, d = fake_shipped
    m = json.loads((d / "proxy_backbone.json").read_text())
    m["default"]["recipe"] = "1ep-bs8-lr1"
    (d / "proxy_backbone.json").write_text(json.dumps(m))
    assert proxy_backbone.shipped_entry("default") is None


def test_retrain_trains_with_the_recipe_even_when_weights_are_shipped(fake_shipped, monkeypatch):
    model, _ = fake_shipped
    calls = []

    def fake_train(size, out):
        from bench.runtime.checkpoint import save_checkpoint

        calls.append((size, out))
        save_checkpoint(out, model)

    monkeypatch.setattr(proxy, "ensure_proxy_data", lambda **k: None)
    proxy_backbone.ensure_backbone(size="default")  # shipped first
    monkeypatch.setattr(proxy_backbone, "train_backbone", fake_train)
    path = proxy_backbone.ensure_backbone(force=True, size="default")
    assert calls == [("default", path)]
    assert proxy_backbone.backbone_origin(path) == "trained"


def test_the_backbone_is_trained_in_process_exactly_as_its_recorded_command(tmp_path, monkeypatch):
    """The library trains the backbone without a subprocess; the weights and the checkpoint's record
    are those of the `pmbench train` command the shipped manifest names (smoke recipe)."""
    import sys

    from bench.runtime.checkpoint import read_checkpoint, state_dict_of
    from bench.runtime.env import ROOT

    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "cache"))
    proxy.ensure_proxy_data(size="smoke")
    by_cli, in_process = tmp_path / "cli.pt", tmp_path / "lib.pt"
    cmd = proxy_backbone.train_command("smoke", by_cli)
    assert cmd[:4] == [sys.executable, "-m", "bench.cli", "train"]
    # the same thread count in both processes (conftest pins this one): float sums depend on it
    env = {**__import__("os").environ, "PMBENCH_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    hist = proxy_backbone.train_backbone("smoke", in_process)
    assert hist["final_step"] == json.loads(res.stdout)["steps"] > 0
    a, b = read_checkpoint(by_cli), read_checkpoint(in_process)
    sa, sb = state_dict_of(a), state_dict_of(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ex_a, ex_b = a.get("extra") or {}, b.get("extra") or {}
    assert ex_a.get("data") == ex_b.get("data") and ex_a.get("preprocess") == ex_b.get("preprocess")


def test_retrain_proxy_is_refused_outside_the_proxy_profiles(capsys):
    assert orchestrate.main(["--profile", "paper", "--only", "cost", "--retrain-proxy"]) == 2
    assert "--retrain-proxy applies to the proxy profiles" in capsys.readouterr().err


def test_the_shipped_file_is_packaged():
    import tomllib

    from bench.runtime.env import ROOT

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bench"]
    assert "data_files/*.safetensors" in data and "data_files/*.json" in data
