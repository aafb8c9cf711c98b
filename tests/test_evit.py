"""EViT (baselines/evit.py) against the official algorithm (docs/methods/evit.md §1, §2).

Keep counts vs the published sequence-length table, a hand-written block with explicit
attention for the fused inattentive token, grid tracking, distillation token, schedule.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled

from baselines.evit import keep_rate_at
from bench.core import patch, registry
from bench.core.reducer import ModelInfo

# docs/methods/evit.md §2: tokens (incl. CLS) from the MLP of blocks 4 / 7 / 10 onward, 197-token DeiT
TABLE = {
    (0.9, True): (179, 163, 148), (0.8, True): (159, 129, 105), (0.7, True): (140, 100, 72),
    (0.6, True): (120, 74, 46), (0.5, True): (100, 52, 28),
    (0.9, False): (178, 161, 145), (0.8, False): (158, 127, 102), (0.7, False): (139, 98, 69),
    (0.6, False): (119, 72, 44), (0.5, False): (99, 50, 26),
}


def _expand(stages):
    """Per-block (attn, mlp) counts implied by the table for reductions inside blocks 3, 6, 9."""
    n, out = 197, []
    for i in range(12):
        m = stages[[3, 6, 9].index(i)] if i in (3, 6, 9) else n
        out.append((n, m))
        n = m
    return out


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


@pytest.mark.parametrize("keep,fuse", list(TABLE), ids=[f"k{k}-{'fuse' if f else 'nofuse'}" for k, f in TABLE])
def test_schedule_matches_published_table(deit_tiny, keep, fuse):
    red = registry.build(f"evit:keep={keep},fuse={str(fuse).lower()}")
    sched = red.token_schedule(ModelInfo.from_model(deit_tiny))
    assert [(b.attn, b.mlp) for b in sched] == _expand(TABLE[(keep, fuse)])


@pytest.mark.parametrize("keep,fuse", [(0.9, True), (0.7, True), (0.7, False), (0.5, True), (0.5, False)])
def test_observed_tokens_match_table(deit_tiny, record_tokens, keep, fuse):
    red = registry.build(f"evit:keep={keep},fuse={str(fuse).lower()}")
    patch.apply(deit_tiny, red)
    try:
        rec = record_tokens(deit_tiny)
        with torch.no_grad():
            deit_tiny(torch.randn(2, 3, 224, 224))
    finally:
        patch.remove(deit_tiny)
    assert list(zip(rec["attn"], rec["mlp"])) == _expand(TABLE[(keep, fuse)])


@pytest.mark.parametrize("spec", ["evit:keep=0.7,loc=[0,1,2,3,4]", "evit:keep=0.3,loc=[1,5,11]",
                                  "evit:keep=0.5,loc=[0]"])
def test_observed_tokens_match_declared_custom_loc(make_vit, run_and_check_schedule, spec):
    model = make_vit()
    red = registry.build(spec)
    patch.apply(model, red)
    run_and_check_schedule(model, red, torch.randn(2, 3, 64, 64))


# --------------------------------------------------------------------------- hand-written reference
@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_fused_token_by_hand(make_vit, fused_attn):
    """Block 0 of a tiny ViT written out with explicit attention, then EViT's step from the paper:
    keep ceil(k (N-1)) tokens by the head-averaged CLS attention (descending score order) and
    append sum_{dropped} a_i x_i with the raw, not renormalised, weights a_i."""
    model = make_vit(init_values=0.5, qk_norm=True)
    for blk in model.blocks:
        blk.attn.fused_attn = fused_attn
    img = torch.randn(2, 3, 64, 64)
    blk = model.blocks[0]
    with torch.no_grad():
        x0 = model.norm_pre(model._pos_embed(model.patch_embed(img)))
        B, N, C = x0.shape
        H = blk.attn.num_heads
        hd = C // H
        h = blk.norm1(x0)
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        probs = ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(-1)  # (B, H, N, N)
        a = blk.attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
        x1 = x0 + blk.ls1(a)
        score = probs[:, :, 0, 1:].mean(1)  # (B, N-1)
        left = math.ceil(0.4 * (N - 1))
        order = score.argsort(dim=1, descending=True)
        idx, rest = order[:, :left], order[:, left:]
        patches = x1[:, 1:]
        kept = torch.stack([patches[b, idx[b]] for b in range(B)])
        fused = torch.stack([(score[b, rest[b], None] * patches[b, rest[b]]).sum(0) for b in range(B)])
        expected = torch.cat([x1[:, :1], kept, fused[:, None]], dim=1)
        renorm = torch.stack([(score[b, rest[b], None] * patches[b, rest[b]]).sum(0) / score[b, rest[b]].sum()
                              for b in range(B)])

    patch.apply(model, registry.build("evit:keep=0.4,loc=[0]"))
    got = {}
    blk.norm2.register_forward_pre_hook(lambda m, a_: got.__setitem__("x", a_[0].clone()))
    with torch.no_grad():
        model(img)
    x = got["x"]
    assert x.shape == (B, 1 + left + 1, C)
    assert torch.allclose(x, expected, atol=1e-5)
    assert (x[:, -1] - renorm).abs().max() > 1e-2  # the weights are not renormalised


# --------------------------------------------------------------------------- tracking, restore, CLS
@pytest.mark.parametrize("fuse", [True, False])
def test_tracking_and_restore(make_vit, zero_blocks, fuse):
    """Identity blocks: kept tokens keep their values; the tracking must point at them, dropped
    tokens are -1, and restore() puts every token back at its grid position."""
    model = zero_blocks(make_vit())
    with torch.no_grad():
        model.cls_token.fill_(50.0)
    red = registry.build(f"evit:keep=0.6,fuse={str(fuse).lower()}")
    patch.apply(model, red)
    patch.set_tracking(model, True)
    cap = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: cap.__setitem__("x0", a[0].clone()))
    model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("xL", a[0].clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    x0, xL = cap["x0"], cap["xL"]
    st = patch.last_state(model)
    origin = st.origin
    n_final = xL.shape[1]
    assert n_final == red.token_schedule(ModelInfo.from_model(model))[-1].mlp
    assert torch.all(origin[:, 0] == 0)  # CLS kept at index 0
    assert torch.allclose(xL[:, 0], x0[:, 0])
    for b in range(2):
        alive = origin[b] >= 0
        assert torch.all(origin[b][~alive] == -1)
        carried = origin[b][alive]
        assert len(set(carried.tolist())) == len(carried)  # pruning: one original per kept token
        assert carried.max() < n_final - (1 if fuse else 0)  # the fused token carries no original
        if fuse:  # an earlier stage's fused token is an ordinary token later and may be kept
            assert n_final - 3 <= len(carried) <= n_final - 1
        else:
            assert len(carried) == n_final  # every token (CLS included) carries one original
        assert torch.allclose(xL[b, carried], x0[b, alive], atol=1e-6)
    full = red.restore(xL, st)
    assert torch.allclose(full, x0, atol=1e-6)  # dropped tokens keep their last features


def test_distilled_model_runs_cls_scored(record_tokens):
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=64, patch_size=8, embed_dim=48, depth=12, num_heads=3,
                                       num_classes=10).eval()
    red = registry.build("evit:keep=0.7")
    patch.apply(model, red)
    patch.set_tracking(model, True)
    rec = record_tokens(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    sched = red.token_schedule(ModelInfo.from_model(model))
    assert rec["mlp"] == [b.mlp for b in sched]
    assert rec["mlp"][3] == 2 + math.ceil(0.7 * 64) + 1  # CLS + dist kept, keep counted on patches
    origin = patch.last_state(model).origin
    assert torch.all(origin[:, 0] == 0) and torch.all(origin[:, 1] == 1)


# --------------------------------------------------------------------------- training schedule
def test_keep_rate_schedule():
    assert keep_rate_at(0, 0.5, 10, 100) == 1.0
    assert keep_rate_at(9.99, 0.5, 10, 100) == 1.0
    assert keep_rate_at(10, 0.5, 10, 100) == pytest.approx(1.0)
    assert keep_rate_at(60, 0.5, 10, 100) == pytest.approx(0.75)
    assert keep_rate_at(110, 0.5, 10, 100) == 0.5
    assert keep_rate_at(0, 0.7, 0, 0) == 0.7  # the fine-tuning recipe: target from step 0


def test_training_uses_scheduled_keep_eval_uses_target(make_vit, record_tokens):
    model = make_vit()
    red = registry.build("evit:keep=0.5,shrink_start=1,shrink_epochs=2")
    patch.apply(model, red)
    rec = record_tokens(model)
    x = torch.randn(2, 3, 64, 64)
    red.on_step(model, 0.5, 10)  # still in the warm-up: keep = 1 in training
    model.train()
    with torch.no_grad():
        model(x)
    assert rec["mlp"] == [65] * 12
    rec.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert rec["mlp"][3] == 1 + math.ceil(0.5 * 64) + 1
