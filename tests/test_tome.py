"""ToMe (baselines/tome.py) against the official algorithm (docs/methods/tome.md).

Hand-computed merges, declared vs observed token counts, sizes, CLS/dist protection,
source tracking, proportional attention and the size-weighted average pooling.
"""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled

from baselines.tome import _row_offsets, bipartite_soft_matching, merge_wavg, parse_r
from bench.core import patch, registry
from bench.core.reducer import AttnRequest, ModelInfo


# --------------------------------------------------------------------------- hand-computed reference
def _hand_case():
    """7 tokens, CLS at 0.  A = even indices {0,2,4,6}, B = odd {1,3,5}.

    2-d metric (cosine = angle):   t0 (1,0) CLS | t1 (1,0) | t2 (0,1) | t3 (0,1)
                                   t4 (1,.5)    | t5 (-1,0) | t6 (-1,.1)
    Best B partner of each A row:  t2 -> t3 (cos 1.000), t4 -> t1 (cos .894), t6 -> t5 (cos .995),
    CLS row forced to -inf.  Features x_i = 10*i, sizes (1,1,3,1,1,2,1).
    """
    metric = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, .5], [-1, 0], [-1, .1]], dtype=torch.float)[None]
    x = (10.0 * torch.arange(7, dtype=torch.float)).view(1, 7, 1)
    size = torch.tensor([1, 1, 3, 1, 1, 2, 1], dtype=torch.float).view(1, 7, 1)
    return metric, x, size


def test_hand_merge_r2():
    metric, x, size = _hand_case()
    merge, old_to_new = bipartite_soft_matching(metric, 2, class_token=True, distill_token=False)
    out, new_size = merge_wavg(merge, x, size)
    # r=2: sources t2 (->t3) and t6 (->t5); unmerged A sorted = [t0, t4]; then B = [t1, t3', t5']
    # t3' = (3*20 + 1*30)/4 = 22.5 (size 4);  t5' = (1*60 + 2*50)/3 = 160/3 (size 3)
    expected = torch.tensor([0.0, 40.0, 10.0, 22.5, 160 / 3]).view(1, 5, 1)
    assert torch.allclose(out, expected)
    assert new_size.flatten().tolist() == [1, 1, 1, 4, 3]
    assert old_to_new.tolist() == [[0, 2, 3, 3, 1, 4, 4]]


def test_hand_merge_r3_and_cap():
    metric, x, size = _hand_case()
    merge, old_to_new = bipartite_soft_matching(metric, 3, class_token=True, distill_token=False)
    out, new_size = merge_wavg(merge, x, size)
    # third source t4 -> t1: t1' = (1*40 + 1*10)/2 = 25; output [t0, t1', t3', t5']
    assert torch.allclose(out, torch.tensor([0.0, 25.0, 22.5, 160 / 3]).view(1, 4, 1))
    assert new_size.flatten().tolist() == [1, 2, 4, 3]
    assert old_to_new.tolist() == [[0, 1, 2, 2, 1, 3, 3]]
    # r is capped at (T - protected) // 2 = 3: asking for 10 merges does the same
    merge10, o10 = bipartite_soft_matching(metric, 10, class_token=True, distill_token=False)
    assert torch.equal(merge_wavg(merge10, x, size)[0], out) and torch.equal(o10, old_to_new)
    assert bipartite_soft_matching(metric, 0, True, False) == (None, None)


def test_hand_merge_with_dist_token():
    """Dist token (index 1 = B[0]) is never a destination; output order CLS, dist, rest of A, rest of B."""
    metric, x, size = _hand_case()
    merge, old_to_new = bipartite_soft_matching(metric, 3, class_token=True, distill_token=True)
    out, new_size = merge_wavg(merge, x, size)
    # t4's best partner t1 is now forbidden -> t4 -> t3 (cos .447) is the third merge but only
    # r = min(3, (7-2)//2) = 2 merges happen: t2 -> t3 (1.0), t6 -> t5 (.995); t4 stays.
    # order: [t0 (CLS), t1 (dist), t4, t3', t5']
    assert torch.allclose(out, torch.tensor([0.0, 10.0, 40.0, 22.5, 160 / 3]).view(1, 5, 1))
    assert new_size.flatten().tolist() == [1, 1, 1, 4, 3]
    assert old_to_new.tolist() == [[0, 1, 3, 3, 2, 4, 4]]


def _reference_wavg(metric, r, class_token, distill_token, x, size):
    """ToMe's published merge written out step by step (docs/methods/tome.md §1.3-1.4): split A/B alternately,
    cosine scores, best B partner per A token, the r best edges are sources; output
    ``[unmerged A, B.scatter_reduce(sources, sum)]`` of ``x * size`` and of ``size``, then divide."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        s = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), s, reduce="sum")
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    xs, new_size = merge(x * size), merge(size)
    return xs / new_size, new_size


@pytest.mark.parametrize("T,r,dist", [(197, 13, False), (197, 16, False), (184, 13, False), (53, 26, False),
                                      (198, 13, True), (11, 4, False)])
def test_merge_is_bit_identical_to_the_published_formulation(T, r, dist):
    """The single-gather merge (and the skipped ``x * 1`` of the first merge) equals the published
    formulation bit for bit, with ties in the scores and repeated destinations."""
    g = torch.Generator().manual_seed(T + r)
    B, C = 3, 24
    metric = torch.randn(B, T, 8, generator=g)
    metric[:, 5:9] = metric[:, 3:4]  # exact ties in the scores
    x = torch.randn(B, T, C, generator=g)
    size = torch.randint(1, 5, (B, T, 1), generator=g).float()
    want_x, want_size = _reference_wavg(metric, r, True, dist, x, size)
    merge, _ = bipartite_soft_matching(metric, r, class_token=True, distill_token=dist, with_map=False)
    got_x, got_size = merge_wavg(merge, x, size)
    assert torch.equal(got_x, want_x) and torch.equal(got_size, want_size)
    ones = torch.ones(B, T, 1)
    first_x, first_size = merge_wavg(merge, x, None)  # the first merge: every size is 1
    ref_x, ref_size = _reference_wavg(metric, r, True, dist, x, ones)
    assert torch.equal(first_x, ref_x) and torch.equal(first_size, ref_size)


# --------------------------------------------------------------------------- schedules
def test_parse_r_matches_official():
    assert parse_r(12, [13], None) == [13] * 12
    assert parse_r(4, [8, 4], None) == [8, 4, 0, 0]
    dec = parse_r(12, [16], -1.0)  # the paper's decreasing schedule: 2r down to 0
    assert dec[0] == 32 and dec[-1] == 0 and sorted(dec, reverse=True) == dec
    assert dec == [int(32 - 32 / 11 * i) for i in range(12)]


# published sequence lengths for DeiT (197 tokens), docs/methods/tome.md §2
PUBLISHED_AFTER_BLOCK = {
    "tome:r=8": [189 - 8 * i for i in range(12)],
    "tome:r=13": [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41],
    "tome:r=16": [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11],
}


@pytest.mark.parametrize("spec", ["tome:r=8", "tome:r=13", "tome:r=16", "tome:r=[20,10,0,5,30]",
                                  "tome:r=16,inflect=-1", "tome:r=60", "tome:r=13,prop_attn=false"])
def test_observed_tokens_match_schedule_deit(spec, run_and_check_schedule):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=12).eval()
    red = registry.build(spec)
    patch.apply(model, red)
    rec = run_and_check_schedule(model, red, torch.randn(2, 3, 224, 224))
    if spec in PUBLISHED_AFTER_BLOCK:
        assert rec["mlp"] == PUBLISHED_AFTER_BLOCK[spec]
    size = patch.last_state(model).size
    assert size.shape[1] == rec["mlp"][-1] and torch.all(size.sum(1) == 197)


def test_observed_tokens_dynamic_resolution(make_vit, run_and_check_schedule):
    """Non-default input (80x96 -> 120 patches + CLS): declared and real counts still agree."""
    model = make_vit(dynamic_img_size=True)
    red = registry.build("tome:r=9")
    patch.apply(model, red, img_size=(80, 96))
    rec = run_and_check_schedule(model, red, torch.randn(1, 3, 80, 96), img_size=(80, 96))
    assert rec["attn"][0] == 121


# --------------------------------------------------------------------------- invariants in a real forward
def _size_and_origin_per_block(model):
    """Hook on norm2 (after the merge of each block): copies of state.size / state.origin."""
    log = []

    def fn(_m, args):
        st = patch.last_state(model)
        log.append((args[0].shape[1], None if st.size is None else st.size.clone(),
                    None if st.origin is None else st.origin.clone()))

    hs = [b.norm2.register_forward_pre_hook(fn) for b in model.blocks]
    return log, hs


@pytest.mark.parametrize("distilled", [False, True], ids=["cls", "cls+dist"])
def test_sizes_tracking_and_prefix_positions(make_vit, zero_blocks, distilled):
    """With identity blocks, every current token must equal the size-weighted mean of the
    original tokens that the source tracking assigns to it: this checks the merge, the sizes
    and the tracking against each other in a real forward."""
    kw = {"cls": VisionTransformerDistilled} if distilled else {}
    model = zero_blocks(make_vit(**kw))
    n_pre = 2 if distilled else 1
    with torch.no_grad():  # make prefix tokens unique and far from patches
        model.cls_token.fill_(50.0)
        if distilled:
            model.dist_token.fill_(-50.0)
    red = registry.build("tome:r=6")
    patch.apply(model, red)
    patch.set_tracking(model, True)
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("x0", a[0].clone()))
    model.norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("xL", a[0].clone()))
    log, _ = _size_and_origin_per_block(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    x0, xL = captured["x0"], captured["xL"]
    n0 = x0.shape[1]
    assert n0 == 64 + n_pre
    for n, size, origin in log:
        assert size.shape[1] == n
        assert torch.all(size.sum(1) == n0)  # sizes sum to the input token count
        assert origin.min() >= 0 and origin.max() < n  # every original maps to one current token
        for b in range(2):
            counts = torch.bincount(origin[b], minlength=n)
            assert torch.equal(counts.float(), size[b, :, 0])  # size == number of originals carried
        assert torch.all(origin[:, 0] == 0)  # CLS stays at index 0
        if distilled:
            assert torch.all(origin[:, 1] == 1)
            assert torch.all(size[:, :2] == 1)  # prefix tokens never merged
    # final tokens == mean of their originals (all initial sizes are 1)
    origin = patch.last_state(model).origin
    for b in range(2):
        for j in range(xL.shape[1]):
            members = (origin[b] == j).nonzero().flatten()
            assert torch.allclose(xL[b, j], x0[b, members].mean(0), atol=1e-5)
    assert torch.allclose(xL[:, 0], torch.full_like(xL[:, 0], 50.0) + model.pos_embed[0, 0], atol=1e-5)
    # restore maps every original position to its carrier token
    full = red.restore(xL, patch.last_state(model))
    assert full.shape == x0.shape
    assert torch.equal(full, torch.gather(xL, 1, origin.unsqueeze(-1).expand(-1, -1, xL.shape[-1])))


def test_avg_pool_is_size_weighted(make_vit, zero_blocks):
    """Avg-pooled model with identity blocks: merging must not change the pooled mean (ToMe's MAE fix)."""
    model = zero_blocks(make_vit(global_pool="avg"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        patch.apply(model, registry.build("tome:r=8"))
        out = model(x)
    assert patch.last_state(model).size.shape[1] < 65  # merges happened
    assert (out - ref).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- proportional attention
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_prop_attn_equals_duplicated_tokens(fused):
    """docs/methods/tome.md §1.5: a token of size s with a log(s) bias attends exactly like s
    copies of that token without the bias."""
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qkv_bias=True).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 5, 24)
    s = 3
    dup = torch.cat([x[:, :3], x[:, 2:3].expand(-1, s - 1, -1), x[:, 3:]], dim=1)  # token 2 three times
    size = torch.ones(2, 5, 1)
    size[:, 2] = s
    with torch.no_grad():
        out_dup, _ = patch.attention(attn, dup, AttnRequest())
        out_w, _ = patch.attention(attn, x, AttnRequest(bias=size.log()[:, None, None, :, 0]))
        out_plain, _ = patch.attention(attn, x, AttnRequest())
    keep = [0, 1, 2, 2 + s, 3 + s]  # positions of the original tokens inside ``dup``
    assert torch.allclose(out_w, out_dup[:, keep], atol=1e-5)
    assert (out_plain - out_dup[:, keep]).abs().max() > 1e-3  # the bias matters


def test_prop_attn_switch_changes_output(make_vit):
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for spec in ("tome:r=8", "tome:r=8,prop_attn=false"):
        model = make_vit()
        patch.apply(model, registry.build(spec))
        with torch.no_grad():
            outs.append(model(x))
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_metric_is_head_mean_of_keys(make_vit):
    """The request asks for keys; extras['keys'] is k averaged over heads (ToMe's metric)."""
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(1, 6, 24)
    with torch.no_grad():
        _, ex = patch.attention(attn, x, AttnRequest(keys=True))
        k = attn.qkv(x).reshape(1, 6, 3, 3, 8)[:, :, 1]  # (B, N, H, hd)
    assert torch.allclose(ex["keys"], k.mean(2), atol=1e-6)
    assert math.isclose(ex["keys"].shape[-1], 8)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_head_mean_is_mean_bit_for_bit(heads, dtype):
    """``patch.head_mean`` (the head-by-head sum of the fast path) equals ``k.mean(1)`` bit for bit on the
    attention's own layout (a permuted view of the qkv projection), across head counts, token counts and
    magnitudes; bfloat16 and many heads take ``mean`` itself."""
    g = torch.Generator().manual_seed(heads)
    for B, N, hd in [(8, 197, 64), (16, 577, 64), (3, 50, 32), (1, 7, 16), (2, 1, 8), (1, 1, 8), (1, 2, 8)]:
        scale = torch.logspace(-3, 3, N, dtype=torch.float64).view(1, N, 1).float()
        qkv = (torch.randn(B, N, 3 * heads * hd, generator=g) * scale).to(dtype)
        k = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)[1]
        assert torch.equal(patch.head_mean(k), k.mean(1)), (B, N, hd)
        kc = k.contiguous()  # a contiguous (B, H, N, d) tensor too
        assert torch.equal(patch.head_mean(kc), kc.mean(1)), (B, N, hd)


@pytest.mark.parametrize("kw", [{"reg_tokens": 4}, {"class_token": False, "reg_tokens": 1, "global_pool": "avg"}])
def test_register_tokens_rejected(make_vit, kw):
    """ToMe protects only CLS and dist; a register token would be merged like a patch."""
    from bench.core.reducer import ConfigError

    with pytest.raises(ConfigError, match="register"):
        patch.apply(make_vit(**kw), registry.build("tome:r=4"))


def test_no_class_token(make_vit, run_and_check_schedule):
    model = make_vit(class_token=False, global_pool="avg")
    red = registry.build("tome:r=8")
    patch.apply(model, red)
    rec = run_and_check_schedule(model, red, torch.randn(2, 3, 64, 64))
    assert rec["attn"][0] == 64 and rec["mlp"][0] == 56
    assert torch.all(patch.last_state(model).size.sum(1) == 64)


def test_training_after_an_inference_forward(make_vit):
    """The gather offsets are cached across forwards (``_row_offsets``); ones first made under
    ``inference_mode`` must still serve a training step, whose backward saves the gather index."""
    m = make_vit()
    patch.apply(m, registry.build("tome:r=4"))
    x = torch.randn(2, 3, 64, 64)
    _row_offsets.cache_clear()
    with torch.inference_mode():
        m(x)
    assert all(t.is_inference() for t in _row_offsets(2, 65, x.device))  # cached in inference mode
    m.train()
    m(x).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None and m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
