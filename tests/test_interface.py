"""The reducer contract and the shared patch (bench.core.reducer, bench.core.patch, bench.core.registry).

Identity at zero reduction on every supported timm block variant, undo, hook order,
fused attention kept at inference, spec parsing, and config errors raised before compute.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled

from bench.core import patch, registry
from bench.core.reducer import AttnRequest, ConfigError, Reducer

# model variants the patch must handle (issue: LayerScale, q/k-norm, dist token, any resolution)
VARIANTS = {
    "plain": ({}, (64, 64)),
    "layerscale": ({"init_values": 0.1}, (64, 64)),
    "qk_norm": ({"qk_norm": True}, (64, 64)),
    "distilled": ({"cls": VisionTransformerDistilled}, (64, 64)),
    "dynamic_res": ({"dynamic_img_size": True}, (80, 96)),
    "img_size_96": ({"img_size": 96}, (96, 96)),
    "avg_pool": ({"global_pool": "avg"}, (64, 64)),
}


def _unfuse(model):
    for blk in model.blocks:
        blk.attn.fused_attn = False


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("spec", ["tome:r=0", "evit:keep=1"])
def test_zero_reduction_is_identity(make_vit, spec, variant, fused):
    kw, img = VARIANTS[variant]
    model = make_vit(**kw)
    # make LayerScale non-trivial per channel so a dropped ls1/ls2 would show
    if variant == "layerscale":
        with torch.no_grad():
            for blk in model.blocks:
                blk.ls1.gamma.uniform_(0.05, 2.0)
                blk.ls2.gamma.uniform_(0.05, 2.0)
    if not fused:
        _unfuse(model)
    x = torch.randn(2, 3, *img)
    with torch.no_grad():
        ref = model(x)
        patch.apply(model, registry.build(spec), img_size=img)
        assert patch.is_patched(model)
        out = model(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


def test_zero_reduction_identity_deit_tiny():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        for spec in ("tome:r=0", "evit:keep=1"):
            patch.apply(model, registry.build(spec))
            assert (model(x) - ref).abs().max().item() <= 1e-5


def test_none_leaves_model_alone(make_vit):
    model = make_vit()
    cls = type(model)
    patch.apply(model, registry.build("none"))
    assert type(model) is cls and not patch.is_patched(model)


# --------------------------------------------------------------------------- undo
class _WithModule(Reducer):
    """A reducer that owns a parameter (like PM's merge matrices) and changes the output."""

    name = "test_with_module"

    def on_patch(self, model, info):
        self.gain = patch.reducer_modules(model)["gain"] = nn.Linear(info.dim, info.dim)

    def post_block(self, i, block, x, state):
        return x + self.gain(x) if i == 0 else x


def test_remove_restores_model(make_vit):
    model = make_vit(init_values=0.1)
    x = torch.randn(2, 3, 64, 64)
    cls, block_classes = type(model), [type(b) for b in model.blocks]
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        patch.apply(model, _WithModule())
        assert "reducer_modules.gain.weight" in model.state_dict()
        assert (model(x) - ref).abs().max() > 1e-3  # the patch is really active
        patch.apply(model, registry.build("tome:r=8"))  # re-patching replaces the old patch
        assert not hasattr(model, "reducer_modules")
        assert isinstance(patch.get_reducer(model), registry.get("tome"))
        patch.remove(model)
        out = model(x)
    assert type(model) is cls
    assert [type(b) for b in model.blocks] == block_classes
    assert set(model.state_dict()) == keys
    assert not patch.is_patched(model) and not hasattr(model, "reducer_modules")
    assert all(not hasattr(b, "_pmb_ctx") for b in model.blocks)
    assert torch.equal(out, ref)


def test_remove_after_module_reducer_drops_modules(make_vit):
    model = make_vit()
    keys = set(model.state_dict())
    patch.apply(model, _WithModule())
    patch.remove(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "reducer_modules")


def test_apply_rejects_non_vit():
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        patch.apply(nn.Linear(2, 2), registry.build("tome"))


# --------------------------------------------------------------------------- hook order
class _Recorder(Reducer):
    name = "test_recorder"

    def __init__(self):
        super().__init__()
        self.calls = []

    def begin(self, model, x, state):
        self.calls.append(("begin", x.shape[1]))

    def pre_block(self, i, block, x, state):
        self.calls.append(("pre", i))
        return x

    def attn_request(self, i, block, x, state):
        self.calls.append(("req", i))
        return AttnRequest()

    def post_attn(self, i, block, x, extras, state):
        self.calls.append(("post_attn", i))
        return x

    def post_block(self, i, block, x, state):
        self.calls.append(("post_block", i))
        return x

    def end(self, model, x, state):
        self.calls.append(("end", x.shape[1]))
        return x


def test_hook_order(make_vit):
    model = make_vit(depth=3)
    rec = _Recorder()
    patch.apply(model, rec)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    expected = [("begin", 65)]
    for i in range(3):
        expected += [("pre", i), ("req", i), ("post_attn", i), ("post_block", i)]
    expected.append(("end", 65))
    assert rec.calls == expected
    assert patch.last_state(model).n0 == 65 and patch.last_state(model).grid == (8, 8)


# --------------------------------------------------------------------------- fused attention kept
@pytest.mark.parametrize("spec", ["tome:r=8", "tome:r=8,prop_attn=false", "evit:keep=0.7", "evit:keep=0.5,fuse=false"])
def test_inference_keeps_sdpa(make_vit, monkeypatch, spec):
    model = make_vit()
    patch.apply(model, registry.build(spec))
    calls = []
    real = patch.F.scaled_dot_product_attention

    def counting(q, k, v, *a, **kw):
        calls.append(q.shape[-2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(patch.F, "scaled_dot_product_attention", counting)
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    assert len(calls) == len(model.blocks)  # every block, once
    assert calls[0] == 65 and calls[-1] < 65  # and the reduced blocks too


@pytest.mark.parametrize("spec", ["tome:r=8", "evit:keep=0.7", "evit:keep=0.6,fuse=false"])
def test_fused_and_explicit_paths_agree(make_vit, spec):
    """SDPA with ToMe's log-size mask / EViT's CLS row recomputed alone == explicit softmax."""
    model = make_vit()
    x = torch.randn(2, 3, 64, 64)
    patch.apply(model, registry.build(spec))
    with torch.no_grad():
        fused = model(x)
        _unfuse(model)
        explicit = model(x)
    assert (fused - explicit).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- specs
def test_spec_round_trip():
    for spec, canon in [
        ("tome", "tome"),
        ("tome:r=13", "tome"),
        ("tome:r=8", "tome:r=8"),
        ("TOME: r = [16,16,8] ", "tome:r=[16,16,8]"),
        ("tome:r=16,inflect=-1", "tome:inflect=-1,r=16"),
        ("evit:keep=0.7", "evit"),
        ("evit:fuse=false,keep=0.5", "evit:fuse=false,keep=0.5"),
        ("evit:loc=[2,5,8]", "evit:loc=[2,5,8]"),
        ("none", "none"),
    ]:
        red = registry.build(spec)
        assert red.spec() == canon
        again = registry.build(red.spec())
        assert again.cfg == red.cfg
        assert registry.build(red.full_spec()).cfg == red.cfg


def test_name_alone_is_paper_default():
    assert registry.build("tome").cfg == {"r": [13], "inflect": None, "prop_attn": True}
    e = registry.build("evit").cfg
    assert (e["keep"], e["loc"], e["fuse"]) == (0.7, [3, 6, 9], True)


def test_available_lists_builtins():
    names = registry.available()
    assert names[0] == "none" and {"tome", "evit"} <= set(names)


# --------------------------------------------------------------------------- errors
def test_unknown_reducer_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        registry.build("tomee:r=3")
    msg = str(e.value)
    assert "tomee" in msg and all(n in msg for n in ("none", "tome", "evit"))


@pytest.mark.parametrize("spec,valid", [("tome:k=3", ("r", "inflect", "prop_attn")),
                                        ("evit:keep_rate=0.5", ("keep", "loc", "fuse"))])
def test_unknown_option_lists_valid_options(spec, valid):
    with pytest.raises(ConfigError) as e:
        registry.build(spec)
    msg = str(e.value)
    assert spec.split(":")[1].split("=")[0] in msg and all(v in msg for v in valid)


@pytest.mark.parametrize("spec", ["tome:r=abc", "tome:r=1.5", "tome:prop_attn=maybe", "evit:keep=abc",
                                  "evit:fuse=2", "evit:loc=[a,b]", "tome:inflect=x"])
def test_bad_value_type(spec):
    with pytest.raises(ConfigError, match="bad value"):
        registry.build(spec)


@pytest.mark.parametrize("spec", ["", "tome:r", "tome:r=1,r=2", ":r=3"])
def test_malformed_spec(spec):
    with pytest.raises(ConfigError):
        registry.build(spec)


@pytest.mark.parametrize("spec,match", [("evit:keep=0", r"\(0, 1\]"), ("evit:keep=1.5", r"\(0, 1\]"),
                                        ("evit:keep=-0.2", r"\(0, 1\]"), ("tome:r=-1", ">= 0"),
                                        ("evit:loc=[3,3]", "duplicate"),
                                        ("tome:r=[8,8],inflect=-1", "inflect")])
def test_impossible_config_at_build(spec, match):
    with pytest.raises(ConfigError, match=match):
        registry.build(spec)


@pytest.mark.parametrize("spec,match", [
    ("tome:r=33", "r <= 32"),  # tiny model: 65 tokens -> at most (65-1)//2 = 32 merges per block
    ("tome:r=20,inflect=-1", "r <= 32"),  # the decreasing schedule starts at 2r = 40
    ("tome:r=[1,1,1,1,1,1,1,1,1,1,1,1,1]", "13 per-layer"),
    ("evit:loc=[3,6,12]", "past the model depth"),
])
def test_impossible_config_at_apply_before_any_forward(make_vit, spec, match):
    model = make_vit()
    cls = type(model)
    forwards = []
    model.patch_embed.register_forward_hook(lambda *a: forwards.append(1))
    red = registry.build(spec)  # model-independent checks pass ...
    with pytest.raises(ConfigError, match=match):  # ... the model-dependent ones fail at apply
        patch.apply(model, red)
    assert forwards == [] and type(model) is cls and not patch.is_patched(model)


def test_r_at_the_limit_is_accepted(make_vit):
    model = make_vit()
    patch.apply(model, registry.build("tome:r=32"))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_set_tracking_needs_a_patched_model(make_vit):
    with pytest.raises(ConfigError):
        patch.set_tracking(make_vit(), True)


@pytest.mark.parametrize("spec", ["tome:r=8", "evit:keep=0.7"])
def test_training_backward_reaches_every_block(make_vit, spec):
    """Tokens are really removed in training too; gradients still reach all blocks and the embeddings."""
    model = make_vit(drop_path_rate=0.1)
    patch.apply(model, registry.build(spec))
    model.train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for blk in model.blocks:
        for p in (blk.attn.qkv.weight, blk.mlp.fc2.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.cls_token.grad is not None and model.pos_embed.grad.abs().sum() > 0


# --------------------------------------------------------------------------- inference fast path (issue 14)
FAST_PATH_SPECS = ["tome:r=8", "tome:r=[6,6,4],prop_attn=false", "evit:keep=0.7", "evit:keep=0.5,fuse=false",
                   "dynamicvit:rho=0.7", "mstm:keep=0.7", "mstm:assign=soft", "mstm:weights=size,prop_attn=true",
                   "mstm:merge=none,extra_token=true", "pm:keep=0.6", "pm:keep=0.6,impl=matmul"]


# the distillation-token variant only for the methods that handle one (ToMe and PM)
FAST_PATH_CASES = [(s, v) for s in FAST_PATH_SPECS for v in ("plain", "distilled", "avg_pool")
                   if v != "distilled" or s.startswith(("tome", "pm"))]


@pytest.mark.parametrize("spec, variant", FAST_PATH_CASES)
def test_inference_fast_path_equals_tracking_path(make_vit, spec, variant):
    """Bookkeeping only dense prediction or training needs (index maps, sizes nobody reads, kept-index
    lists, per-forward weight gathers) is skipped at inference; the logits are bit-identical to the
    tracking path, which computes all of it."""
    kw, img = VARIANTS[variant]
    model = make_vit(**kw)
    patch.apply(model, registry.build(spec))
    x = torch.randn(3, 3, *img)
    with torch.inference_mode():
        fast = model(x)
        st = patch.last_state(model)
        assert st.origin is None and st.last is None  # no grid tracking was built
        patch.set_tracking(model, True)
        tracked = model(x)
        if not spec.startswith("pm"):  # PM keeps the full sequence after every block: nothing to track
            assert patch.last_state(model).origin is not None
    assert torch.equal(fast, tracked)


def test_fast_path_skips_the_bookkeeping(make_vit):
    from baselines.tome import bipartite_soft_matching

    metric = torch.randn(2, 11, 4)
    merge, old_to_new = bipartite_soft_matching(metric, 3, True, False, with_map=False)
    assert old_to_new is None and merge(torch.randn(2, 11, 5)).shape == (2, 8, 5)
    m = make_vit()
    patch.apply(m, registry.build("mstm:keep=0.7"))
    with torch.inference_mode():
        m(torch.randn(2, 3, 64, 64))
    st = patch.last_state(m)
    assert st.size is None and "mstm_weight" not in st.scratch  # MSTM's defaults read no sizes
    patch.apply(m, registry.build("dynamicvit:rho=0.7"))
    with torch.inference_mode():
        m(torch.randn(2, 3, 64, 64))
    assert "dvit_kept" not in patch.last_state(m).scratch


@pytest.mark.parametrize("shape", [(3, 10, 5), (1, 7, 1)])
def test_gather_tokens_is_gather(shape):
    B, N, C = shape
    x = torch.randn(B, N, C)
    idx = torch.stack([torch.randperm(N)[:4] for _ in range(B)])
    want = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    assert torch.equal(patch.gather_tokens(x, idx), want)
    assert torch.equal(patch.gather_tokens(x[:, 1:], idx.clamp(max=N - 2)),
                       torch.gather(x[:, 1:], 1, idx.clamp(max=N - 2).unsqueeze(-1).expand(-1, -1, C)))
    assert torch.equal(patch.gather_tokens(x, idx[:1]), torch.gather(x, 1, idx[:1].unsqueeze(-1).expand(B, -1, C)))
