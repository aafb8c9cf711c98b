"""MSTM reconstruction (baselines/mstm.py) against docs/methods/mstm.md.

Identity settings, agreement with EViT where the options make it EViT, the merge rule
(weighted average including the crucial token, totals conserved), token counts per block,
FLOPs rows of its §2.6, the fusion's zero initialisation and errors.
"""
from __future__ import annotations


import pytest
import torch

from baselines.mstm import MSTM, merge_into_crucial
from bench.core import flops, patch, registry
from bench.core.reducer import ModelInfo


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _fwd(m, x=X):
    with torch.no_grad():
        return m(x)


# --------------------------------------------------------------------------- identity / agreement
@pytest.mark.parametrize("spec", ["mstm:keep=1", "mstm:keep=1,scales=[2,4],proj=true,upsample=bilinear",
                                  "mstm:keep=1,fuse_block=0"])
def test_keep_one_and_zero_gamma_reproduce_unpatched(patched_vit, spec):
    m, r, base = patched_vit(spec)
    assert torch.equal(_fwd(m), _fwd(base))


def test_zero_gamma_fusion_is_exact_identity_under_reduction(patched_vit):
    a, _, _ = patched_vit("mstm")
    b, _, _ = patched_vit("mstm:multiscale=false")
    assert torch.equal(_fwd(a), _fwd(b))
    with torch.no_grad():  # and the fusion does something once gamma moves
        a.reducer_modules["mstm"].gamma.fill_(0.5)
    assert not torch.allclose(_fwd(a), _fwd(b), atol=1e-3)


@pytest.mark.parametrize("mstm_spec,evit_spec", [
    ("mstm:merge=none,extra_token=true,multiscale=false", "evit"),
    ("mstm:merge=none,extra_token=false,multiscale=false", "evit:fuse=false"),
    ("mstm:merge=none,extra_token=true,multiscale=false,keep=0.5,loc=[2,7]", "evit:keep=0.5,loc=[2,7]"),
])
def test_options_that_make_it_evit_match_evit(patched_vit, mstm_spec, evit_spec):
    a, _, _ = patched_vit(mstm_spec)
    b, _, _ = patched_vit(evit_spec)
    torch.testing.assert_close(_fwd(a), _fwd(b), rtol=0, atol=1e-6)


def test_soft_assignment_at_low_temperature_equals_hard(patched_vit):
    a, _, _ = patched_vit("mstm:assign=soft,tau=1e-4")
    b, _, _ = patched_vit("mstm:assign=hard")
    torch.testing.assert_close(_fwd(a), _fwd(b), rtol=0, atol=1e-5)
    c, _, _ = patched_vit("mstm:assign=soft,tau=1")
    assert not torch.allclose(_fwd(c), _fwd(b), atol=1e-4)


# --------------------------------------------------------------------------- the merge rule
def test_merge_rule_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    w = torch.tensor([[[0.4], [0.3], [0.1], [0.15], [0.05]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [3.0]]])
    idx = torch.tensor([[0, 1]])  # crucial tokens 0 and 1; token 2 -> 0, token 3 -> 1 (by direction)
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.2, 1.0]]])
    xm, sm, wm, dest = merge_into_crucial(x, w, size, idx, metric, "hard")
    assert dest.tolist() == [[0, 1, 1]]  # non-crucial 2, 3, 4 -> crucial 0, 1, 1
    want0 = (0.4 * x[0, 0] + 0.1 * x[0, 2]) / 0.5
    want1 = (0.3 * x[0, 1] + 0.15 * x[0, 3] + 0.05 * x[0, 4]) / 0.5
    torch.testing.assert_close(xm[0], torch.stack([want0, want1]))
    assert sm[0, :, 0].tolist() == [2.0, 6.0] and wm[0, :, 0].tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("assign", ["hard", "soft"])
def test_merge_conserves_total_weight_and_size(assign):
    g = torch.Generator().manual_seed(0)
    B, n, C, k = 3, 40, 8, 17
    x, metric = torch.randn(B, n, C, generator=g), torch.randn(B, n, 5, generator=g)
    w = torch.rand(B, n, 1, generator=g) + 0.01
    size = torch.randint(1, 4, (B, n, 1), generator=g).float()
    idx = torch.rand(B, n, generator=g).argsort(1)[:, :k]
    xm, sm, wm, _ = merge_into_crucial(x, w, size, idx, metric, assign, 0.5)
    torch.testing.assert_close(wm.sum((1, 2)), w.sum((1, 2)))
    torch.testing.assert_close(sm.sum((1, 2)), size.sum((1, 2)))
    # a weighted average of its inputs: the weighted feature sum is conserved too
    torch.testing.assert_close((wm * xm).sum(1), (w * x).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["mstm", "mstm:assign=soft", "mstm:weights=size,prop_attn=true",
                                  "mstm:merge=none,extra_token=true"])
def test_sizes_conserved_in_the_model(patched_vit, spec):
    m, r, _ = patched_vit(spec)
    patch.set_tracking(m, True)  # sizes and carried weights are bookkeeping kept while tracking
    _fwd(m)
    st = patch.last_state(m)
    torch.testing.assert_close(st.size[:, 1:].sum((1, 2)), torch.full((2,), 64.0))
    assert st.scratch["mstm_weight"].shape[1] == st.size.shape[1] - 1


def test_tracking_maps_merged_tokens_to_their_destination(patched_vit, zero_blocks):
    m, r, _ = patched_vit("mstm:loc=[3],multiscale=false")
    patch.set_tracking(m)
    with torch.no_grad():
        feats = m.forward_features(X)
    st = patch.last_state(m)
    assert bool((st.origin >= 0).all())  # merged, not dropped
    assert int(st.origin[0].unique().numel()) == 1 + 45  # CLS + ceil(0.7*64) crucial tokens
    m2, _, _ = patched_vit("mstm:loc=[3],merge=none,multiscale=false")
    patch.set_tracking(m2)
    with torch.no_grad():
        m2.forward_features(X)
    assert int((patch.last_state(m2).origin < 0).sum(1)[0]) == 64 - 45
    assert r.restore(feats, st).shape == (2, 65, feats.shape[-1])


# --------------------------------------------------------------------------- token counts, FLOPs
# docs/methods/mstm.md §2.6: tokens incl. CLS after the reductions at blocks 4/7/10 (indices 3/6/9) of DeiT-S, and GMACs
TABLE = {  # keep: (no extra token stages, GMACs), (extra token stages, GMACs)
    0.9: ((178, 161, 145), 3.99, (179, 163, 148), 4.02), 0.8: ((158, 127, 102), 3.44, (159, 129, 105), 3.48),
    0.7: ((139, 98, 69), 3.00, (140, 100, 72), 3.03), 0.6: ((119, 72, 44), 2.61, (120, 74, 46), 2.64),
    0.5: ((99, 50, 26), 2.28, (100, 52, 28), 2.31),
}
DEIT_S = ModelInfo(depth=12, dim=384, num_heads=6, attn_dim=384, mlp_hidden=1536, n_prefix=1, grid=(14, 14),
                   patch_size=(16, 16), in_chans=3, num_classes=1000)


@pytest.mark.parametrize("keep", sorted(TABLE))
@pytest.mark.parametrize("extra", [False, True])
def test_flops_rows_of_mstm_md(keep, extra):
    stages, gm = (TABLE[keep][2], TABLE[keep][3]) if extra else (TABLE[keep][0], TABLE[keep][1])
    r = MSTM(keep=keep, extra_token=extra)
    sched = r.token_schedule(DEIT_S)
    assert tuple(sched[i].mlp for i in (3, 6, 9)) == stages
    rep = flops.analytic(DEIT_S, r)
    backbone = (rep.total - rep.reducer_extra) / 1e9
    assert round(backbone, 2) == gm
    assert 0 < rep.reducer_extra < 0.005e9  # fusion + similarity: a few MMACs


def test_default_configuration_hits_the_abstracts_budget():
    """Abstract: about -33% FLOPs on DeiT-S (4.6 G).  Our default: 2.997 G backbone + 1.0 MMACs
    (fusion 0.15 + similarity 0.89) = 2.998 G -> -34.8%."""
    base = flops.analytic(DEIT_S, registry.build("none")).gmacs
    ours = flops.analytic(DEIT_S, registry.build("mstm")).gmacs
    assert ours == pytest.approx(2.99804, abs=1e-5)
    assert 0.33 <= 1 - ours / base <= 0.35


@pytest.mark.parametrize("spec", ["mstm", "mstm:extra_token=true,keep=0.5", "mstm:assign=soft,sim=features,loc=[2,8]"])
def test_real_token_counts_follow_schedule(patched_vit, run_and_check_schedule, spec):
    m, r, _ = patched_vit(spec)
    run_and_check_schedule(m, r, X)


def test_analytic_close_to_measured(patched_vit):
    """FlopCounterMode sees the same matmuls (plus EViT's CLS-row recomputation, minus the
    elementwise fusion), so both agree within 0.1%."""
    m, r, _ = patched_vit("mstm:assign=soft,proj=true")
    a = flops.analytic(ModelInfo.from_model(m), r).total
    assert abs(flops.measured_macs(m, (64, 64)) - a) / a < 1e-3


# --------------------------------------------------------------------------- training
def test_fusion_parameters_train(patched_vit):
    m, r, _ = patched_vit("mstm:scales=[2,4]")
    gamma = m.reducer_modules["mstm"].gamma
    assert gamma.shape == (2, 48) and not gamma.any()
    assert r.param_group("reducer_modules.mstm.gamma") == "fusion" and r.param_group("blocks.0.mlp.fc1.weight") == "backbone"
    assert r.lr_scale("fusion", 0, 1) == 1.0 and MSTM(fusion_lr_scale=10).lr_scale("fusion", 0, 1) == 10.0
    m.train()
    m(X).logsumexp(-1).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0


# --------------------------------------------------------------------------- errors
def test_bad_options(assert_spec_rejected):
    assert_spec_rejected([
        ("mstm:keep=0", "keep"), ("mstm:keep=1.5", "keep"), ("mstm:loc=[3,3]", "distinct"),
        ("mstm:scales=[1]", "scales"), ("mstm:fuse_block=5", "fuse_block"), ("mstm:assign=best", "one of"),
        ("mstm:tau=0", "tau"), ("mstm:weights=norm", "one of"), ("mstm:fusion_lr_scale=-1", "fusion_lr_scale"),
    ])


def test_model_dependent_errors(make_vit, assert_patch_rejected):
    assert_patch_rejected(make_vit(), [("mstm:loc=[3,12]", "past the model depth"),
                                       ("mstm:scales=[16]", "larger than the patch grid")])
