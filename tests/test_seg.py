"""Segmentation: reducers inside mmseg's Segmenter (bench.seg).

A tiny Segmenter (width 32, 12 blocks, patch 16) on 64x96 inputs keeps every test fast;
the stock mmseg ViT backbone is the reference for weight conversion and logits.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.core import registry
from bench.core.reducer import ConfigError

pytest.importorskip("mmseg")

from bench.seg import backbone as segbb  # noqa: E402
from bench.seg import configs as segcfg  # noqa: E402
from bench.seg import cost as segcost  # noqa: E402
from bench.seg import data as segdata  # noqa: E402
from bench.seg import proxy_data  # noqa: E402

TINY_VIT = dict(img_size=(64, 64), patch_size=16, embed_dims=32, num_layers=12, num_heads=2, final_norm=True,
                norm_cfg=dict(type="LN", eps=1e-6), interpolate_mode="bicubic", drop_path_rate=0.1)

# specs that fit a 4x4..4x6 token grid; methods that land later fall back to their defaults
SPECS = {"tome": "tome:r=3", "evit": "evit:keep=0.5", "dynamicvit": "dynamicvit", "mstm": "mstm", "pm": "pm"}


def available_reducers():
    out = []
    for name in registry.available():
        if name == "none":
            continue
        try:
            registry.get(name)
        except (ImportError, ConfigError):
            continue  # a method whose module has not landed yet
        out.append(name)
    return out


def tiny_cfg(reducer="none", stock=False, img=(64, 64)):
    cfg = segcfg.build_config("proxy", reducer)
    m = cfg.model
    m.pretrained = None
    m.data_preprocessor.size = (64, 64)
    bb = dict(TINY_VIT, img_size=img)
    if stock:
        m.backbone = dict(type="VisionTransformer", **bb)
    else:
        m.backbone.update(bb)
    m.decode_head.update(in_channels=32, channels=32, embed_dims=32, num_heads=2, num_classes=6)
    m.test_cfg = dict(mode="slide", crop_size=img, stride=(48, 48))
    return cfg


def build(cfg, seed=0):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval()


def slide_logits(model, x):
    meta = [dict(img_shape=tuple(x.shape[-2:]), ori_shape=tuple(x.shape[-2:]), pad_shape=tuple(x.shape[-2:]))]
    with torch.no_grad():
        return model.inference(x, meta * x.shape[0])


# --------------------------------------------------------------------------- weights
def test_mmseg_vit_conversion_preserves_features():
    from mmseg.models.backbones.vit import VisionTransformer

    torch.manual_seed(0)
    ref = VisionTransformer(**TINY_VIT)
    ref.init_weights()
    ref.eval()
    ours = segbb.PMBenchViT(**TINY_VIT).eval()
    sd = ref.state_dict()
    ours.load_state_dict(sd, strict=True)  # mmseg keys renamed on load
    for hw in [(64, 64), (80, 48), (70, 90)]:  # pretrained grid, resized pos-embed, corner padding
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            a, b = ref(x)[0], ours(x)[0]
        assert a.shape == b.shape == (2, 32, -(-hw[0] // 16), -(-hw[1] // 16))
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    back = segbb.pmbench_to_mmseg(ours.state_dict())
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert set(segbb.mmseg_to_pmbench(sd)) == set(ours.state_dict())


def test_pretrained_pos_embed_is_resized_on_load():
    small = segbb.PMBenchViT(**{**TINY_VIT, "img_size": (48, 48)})
    big = segbb.PMBenchViT(**TINY_VIT)
    big.load_state_dict(segbb.pmbench_to_mmseg(small.state_dict()))
    assert big.vit.pos_embed.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(big.vit.pos_embed[:, 0], small.vit.pos_embed[:, 0])


def test_stock_segmenter_checkpoint_gives_same_logits(tmp_path):
    """A stock mmseg Segmenter checkpoint (incl. an mmengine HistoryBuffer) loads under
    weights_only and our model reproduces its sliding-window logits."""
    from mmengine.logging.history_buffer import HistoryBuffer

    from bench.seg.checkpoint import load_into, load_weights

    stock = build(tiny_cfg(stock=True), seed=1)
    ckpt = tmp_path / "mmseg.pth"
    torch.save({"state_dict": stock.state_dict(), "meta": {"dataset_meta": {"classes": list("abcdef")}},
                "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}}, ckpt)
    with pytest.raises(Exception):
        torch.load(ckpt, weights_only=True)  # the problem the loader solves
    assert "state_dict" in load_weights(ckpt)
    ours = build(tiny_cfg("none"), seed=2)
    load_into(ours, ckpt)
    assert ours.dataset_meta["classes"] == list("abcdef")
    x = torch.randn(1, 3, 64, 96)  # two windows
    torch.testing.assert_close(slide_logits(ours, x), slide_logits(stock, x), atol=2e-5, rtol=1e-5)


def test_clean_checkpoint_roundtrip(tmp_path):
    from bench.seg.checkpoint import load_into, save_clean

    a = build(tiny_cfg("none"), seed=3)
    p = save_clean(a, tmp_path / "c.pth", {"dataset_meta": {"classes": ["x"]}})
    torch.load(p, weights_only=True)
    b = build(tiny_cfg("none"), seed=4)
    load_into(b, p)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(slide_logits(b, x), slide_logits(a, x))


def test_bad_checkpoint_errors(tmp_path):
    from bench.seg.checkpoint import load_into

    m = build(tiny_cfg("none"))
    with pytest.raises(ConfigError, match="not found"):
        load_into(m, tmp_path / "missing.pth")
    torch.save({"state_dict": {"backbone.foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        load_into(m, tmp_path / "bad.pth")


def test_segmenter_release_conversion_maps_decoder():
    from bench.seg.checkpoint import segmenter_release_to_mmseg

    P = torch.randn(4, 4)
    sd = segmenter_release_to_mmseg({"encoder.blocks.0.attn.qkv.weight": torch.zeros(12, 4),
                                     "decoder.proj_patch": P, "decoder.blocks.1.mlp.fc2.bias": torch.zeros(4),
                                     "decoder.cls_emb": torch.zeros(1, 2, 4)})
    assert torch.equal(sd["decode_head.patch_proj.weight"], P.t())  # x @ P == Linear(weight=P.T)
    assert "backbone.blocks.0.attn.qkv.weight" in sd
    assert "decode_head.layers.1.ffn.layers.1.bias" in sd and "decode_head.cls_emb" in sd
    assert segbb.convert_key("blocks.0.attn.qkv.weight") == "vit.blocks.0.attn.qkv.weight"
    assert segbb.convert_key("head.weight") is None


# --------------------------------------------------------------------------- reducers in Segmenter
@pytest.mark.parametrize("name", available_reducers())
def test_each_reducer_restores_full_grid(name):
    spec = SPECS.get(name, name)
    model = build(tiny_cfg(spec, img=(64, 96)))  # one window: the grid some reducers' structure is built for
    assert model.backbone.reducer.name == name
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.extract_feat(x)[0]
    assert feats.shape == (2, 32, 4, 6) and torch.isfinite(feats).all()
    logits = slide_logits(model, x)
    assert logits.shape == (2, 6, 64, 96) and torch.isfinite(logits).all()


def test_tome_unmerge_copies_merged_tokens():
    """After ToMe, the restored grid holds exactly as many distinct features as tokens survive."""
    model = build(tiny_cfg("tome:r=2"))
    x = torch.randn(1, 3, 64, 96)  # 24 patches + CLS
    with torch.no_grad():
        feats = model.extract_feat(x)[0][0].flatten(1).t()  # (24, C)
    info = model.backbone.model_info((64, 96))
    final = model.backbone.reducer.token_schedule(info)[-1].mlp - 1  # patch tokens after the last block
    assert final < 24
    assert torch.unique(feats.round(decimals=5), dim=0).shape[0] == final


def test_evit_pruned_tokens_keep_their_last_features():
    model = build(tiny_cfg("evit:keep=0.5,fuse=false"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.extract_feat(x)[0]
    st = segbb.bpatch.last_state(model.backbone.vit)
    dropped = (st.origin[0, 1:] < 0).nonzero().flatten()
    assert len(dropped) > 0
    expect = model.backbone.norm(st.last[0, 1 + dropped])
    got = feats[0].flatten(1).t()[dropped]
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("spec", ["tome:r=0", "evit:keep=1"])
def test_identity_settings_match_unpatched(spec):
    base = build(tiny_cfg("none"), seed=5)
    red = build(tiny_cfg(spec), seed=5)
    red.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(slide_logits(red, x), slide_logits(base, x), atol=1e-5, rtol=1e-5)


def test_real_reduction_changes_logits_but_not_shape():
    base = build(tiny_cfg("none"), seed=6)
    red = build(tiny_cfg("tome:r=3"), seed=6)
    red.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 64, 96)
    a, b = slide_logits(base, x), slide_logits(red, x)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_unsupported_backbone_settings_are_config_errors():
    with pytest.raises(ConfigError, match="out_indices"):
        segbb.PMBenchViT(**{**TINY_VIT, "out_indices": [3, 11]})
    with pytest.raises(ConfigError, match="past the model depth"):
        segbb.PMBenchViT(**{**TINY_VIT, "num_layers": 4}, reducer="evit")


# --------------------------------------------------------------------------- cost
def test_window_gmacs_match_flop_counter():
    model = build(tiny_cfg("none"))
    for hw in [(64, 64), (64, 96)]:
        w = segcost.window_macs(model, hw)
        assert w["total_macs"] == segcost.measured_window_macs(model, hw)
    red = build(tiny_cfg("evit:keep=0.5"))
    assert segcost.window_macs(red, (64, 96))["encoder_macs"] < segcost.window_macs(model, (64, 96))["encoder_macs"]
    assert segcost.window_macs(red, (64, 96))["head_macs"] == segcost.window_macs(model, (64, 96))["head_macs"]


def test_slide_windows_match_mmseg():
    assert segcost.slide_windows(512, 683, (512, 512), (480, 480)) == [(512, 512)] * 2
    assert segcost.slide_windows(100, 50, (512, 512), (480, 480)) == [(100, 50)]
    assert len(segcost.slide_windows(1024, 1024, (512, 512), (480, 480))) == 9  # 3 x 3 (stride 480)
    assert len(segcost.slide_windows(992, 992, (512, 512), (480, 480))) == 4


# --------------------------------------------------------------------------- metric, configs, data
def test_iou_metric_known_answer():
    """2x4 labels with one wrong pixel: IoU(0) = 3/4, IoU(1) = 4/5 -> mIoU 77.5; aAcc 7/8."""
    from mmengine.structures import PixelData
    from mmseg.evaluation import IoUMetric
    from mmseg.structures import SegDataSample

    gt = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    ign = torch.tensor([[255, 0, 0, 0], [1, 1, 1, 1]])  # ignored pixel leaves class 0 at 2/3
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=("a", "b"))
    for g in (gt, ign):
        s = SegDataSample()
        s.pred_sem_seg = PixelData(data=pred[None])
        s.gt_sem_seg = PixelData(data=g[None])
        metric.process({}, [s.to_dict()])
    res = metric.compute_metrics(metric.results)
    # pooled: class 0 inter 3+2, union 4+3 -> 5/7; class 1 inter 4+4, union 5+5 -> 8/10
    assert res["mIoU"] == pytest.approx(round((5 / 7 + 8 / 10) / 2 * 100, 2), abs=0.01)
    assert res["aAcc"] == pytest.approx(round(13 / 15 * 100, 2), abs=0.01)


def test_config_round_trip(tmp_path):
    from mmengine.config import Config

    cfg = segcfg.build_config("vit-t", "tome:r=13,prop_attn=false")
    assert cfg.model.backbone.type == "PMBenchViT"
    assert cfg.model.backbone.reducer == "tome:prop_attn=false"
    assert cfg.model.backbone.embed_dims == 192 and cfg.model.decode_head.type == "SegmenterMaskTransformerHead"
    assert cfg.model.test_cfg.mode == "slide" and tuple(cfg.model.test_cfg.crop_size) == (512, 512)
    p = tmp_path / "cfg.py"
    cfg.dump(str(p))
    again = Config.fromfile(str(p))
    assert segcfg.model_spec(again) == segcfg.model_spec(cfg)
    for name in ("vit-s", "vit-b"):
        c = segcfg.build_config(name, "evit:keep=0.7")
        assert c.model.backbone.reducer == "evit"
    assert segcfg.build_config("vit-s").model.backbone.embed_dims == 384


def test_bad_reducer_spec_fails_before_build():
    with pytest.raises(ConfigError, match="unknown reducer"):
        segcfg.build_config("proxy", "nosuch:x=1")


def test_bad_dataset_path_is_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"images/\{training,validation\}"):
        segdata.resolve(f"ade20k:{tmp_path / 'nope'}")
    (tmp_path / "images" / "validation").mkdir(parents=True)
    with pytest.raises(ConfigError, match="annotations"):
        segdata.resolve(f"ade20k:{tmp_path}")
    with pytest.raises(ConfigError, match="unknown --data"):
        segdata.resolve("cityscapes:/x")
    from bench.cli import main

    assert main(["seg-eval", "--config", "vit-t", "--data", f"ade20k:{tmp_path / 'nope'}", "--random-weights"]) == 2


def test_no_weights_offline_is_clear(ade_fixture):
    from bench.seg.evaluate import seg_eval

    with pytest.raises(ConfigError, match="--checkpoint"):
        seg_eval("vit-t", "none", f"ade20k:{ade_fixture}", speed=False)


def test_proxy_data_is_deterministic(tmp_path):
    a = proxy_data.render(0, "training", 3, 64, 80)
    b = proxy_data.render(0, "training", 3, 64, 80)
    c = proxy_data.render(1, "training", 3, 64, 80)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    labels = a[1]
    assert labels.max() <= len(proxy_data.CLASSES) and {1, 2} <= set(np.unique(labels))
    r1 = proxy_data.ensure_proxy_seg("tiny", root=tmp_path / "a")
    r2 = proxy_data.ensure_proxy_seg("tiny", root=tmp_path / "b")
    h1 = json.loads((r1 / "proxy_seg.json").read_text())["sha256"]
    assert h1 == json.loads((r2 / "proxy_seg.json").read_text())["sha256"]
    assert len(list((r1 / "images" / "training").glob("*.jpg"))) == proxy_data.SIZES["tiny"][0]
    assert segdata.check_ade_layout(r1, ("training", "validation")) == r1


def test_a_cached_proxy_set_made_by_another_process_while_this_one_waited_is_reused(tmp_path, monkeypatch):
    """Two processes that both miss the cached proxy segmentation set (parallel test workers, two runs):
    the second waits on the lock and then uses the first one's set instead of rendering it again."""
    import contextlib

    from bench.runtime import outputs

    monkeypatch.setattr(proxy_data, "cache_root", lambda: tmp_path)
    real_lock, real_generate = outputs.exclusive_lock, proxy_data._generate
    rendered = []
    monkeypatch.setattr(proxy_data, "_generate", lambda root, *a: rendered.append(root) or real_generate(root, *a))

    @contextlib.contextmanager
    def another_process_renders_first(path):
        with real_lock(path):
            proxy_data.ensure_proxy_seg("tiny", root=tmp_path / "tiny-seed0")
            yield

    monkeypatch.setattr(outputs, "exclusive_lock", another_process_renders_first)
    root = proxy_data.ensure_proxy_seg("tiny")
    assert root == tmp_path / "tiny-seed0" and rendered == [root]  # rendered once, by the other process
    assert segdata.check_ade_layout(root, ("training", "validation")) == root


@pytest.fixture
def ade_fixture(tmp_path):
    """Two tiny images in the ADE20K layout (labels 0..150)."""
    from PIL import Image

    root = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            lab = np.zeros((48, 64), np.uint8)
            lab[:, 32:] = 3
            lab[:24, :32] = 150
            Image.fromarray(lab).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return tmp_path  # the parent: resolve() finds ADEChallengeData2016 inside


def test_grid_bound_reducer_needs_padding_for_small_windows():
    """PM's matrices fit the patched grid; a smaller window fails clearly unless padded."""
    if "pm" not in available_reducers():
        pytest.fail("pm reducer not importable")
    cfg = tiny_cfg("pm:keep=0.5,prune=0", img=(64, 96))
    model = build(cfg)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="pad_to_img_size"):
        with torch.no_grad():
            model.extract_feat(x)
    model.backbone.pad_to_img_size = True
    with torch.no_grad():
        assert model.extract_feat(x)[0].shape == (1, 32, 4, 4)


def test_mstm_restore_options():
    """restore=merged: a non-crucial token shows its crucial token's features (as ToMe's unmerge);
    restore=own: it keeps its own features from the merge block (as EViT's pruned tokens)."""
    x = torch.randn(1, 3, 64, 96)  # 24 patches + CLS; one merge at block 1 keeps ceil(0.5 * 24) = 12
    out = {}
    for mode in ("merged", "own"):
        model = build(tiny_cfg(f"mstm:keep=0.5,loc=[1],multiscale=false,restore={mode}"), seed=3)
        with torch.no_grad():
            feats = model.extract_feat(x)[0][0].flatten(1).t()  # (24, C)
        out[mode] = (model, feats, segbb.bpatch.last_state(model.backbone.vit))
    _, feats, st = out["merged"]
    assert (st.origin[0, 1:] >= 0).all()  # every patch maps to a surviving token
    assert torch.unique(feats.round(decimals=5), dim=0).shape[0] == 12
    model, feats, st = out["own"]
    dropped = (st.origin[0, 1:] < 0).nonzero().flatten()
    assert len(dropped) == 12
    torch.testing.assert_close(feats[dropped], model.backbone.norm(st.last[0, 1 + dropped]))
    # the crucial tokens are the same tokens either way
    torch.testing.assert_close(feats[st.origin[0, 1:] >= 0], out["merged"][1][st.origin[0, 1:] >= 0])
