"""Prune and Merge: structure rule, matrices, PM block implementations, calibration, checkpoints, FLOPs."""
from __future__ import annotations

import copy

import pytest
import torch

from bench.core import patch, registry
from bench.core.reducer import ConfigError, ModelInfo
from pm import matrices, structure
from pm.calibrate import calibrate, collect_scores
from pm.reducer import PruneAndMerge, find_state

SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)  # 8x8 = 64 patches


def _data(n_batches=3, bs=6, img=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, img, img, generator=g), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n_batches)]


def _calibrated(make_vit, spec="pm:keep=0.6,prune=0.1", **kw):
    m = make_vit(**{**SMALL, **kw})
    r = registry.build(spec)
    calibrate(m, r, _data())
    return m, r


# --------------------------------------------------------------------------- identity
def test_keep1_prune0_is_the_unreduced_model(make_vit):
    m = make_vit(**SMALL)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    pm = copy.deepcopy(m)
    patch.apply(pm, registry.build("pm:keep=1,prune=0"))
    assert torch.equal(pm(x), ref)
    # also after calibration (scores cannot change an all-centre structure), for every impl
    r = registry.build("pm:keep=1,prune=0")
    calibrate(pm, r, _data(1))
    assert r.per_layer()["tokens"] == [65] * 4
    for impl in ("gather", "matmul", "dense"):
        r.cfg["impl"] = impl
        assert torch.allclose(pm(x), ref, atol=1e-6), impl
    r.cfg["impl"] = "auto"
    assert torch.equal(pm(x), ref)


# --------------------------------------------------------------------------- structure rule
@pytest.mark.parametrize("keep,expected", [(0.6, 1416), (0.7, 1656), (0.4, 948)])
def test_sum_of_tokens_rule_global(keep, expected):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(12, 196, generator=g, dtype=torch.float64) * torch.linspace(1, 3, 12)[:, None]
    st = structure.search(scores, list(range(12)), keep, 0.1)
    tokens = [1 + s.n_centers for s in st]
    assert sum(tokens) == expected == 12 * int(196 * keep) + 12
    assert sum(int(s.pruned.sum()) for s in st) == 12 * int(196 * 0.1)  # 228 shortcut pairs
    assert len(set(tokens)) > 1  # the global budget is spread unevenly
    for s in st:  # centres are never pruned; the three classes partition the 196 tokens
        assert not s.pruned[s.centers].any()
        c = s.counts()
        assert c["centers"] + c["merged"] + c["pruned"] == 196


def test_depth_decay_and_local_structure():
    g = torch.Generator().manual_seed(0)
    scores = 1 + torch.rand(12, 196, generator=g, dtype=torch.float64)
    st = structure.search(scores, list(range(12)), 0.6, 0.1)
    n = [s.n_centers for s in st]
    assert sum(n) == 1404 and all(a >= b for a, b in zip(n, n[1:]))  # same peakedness: decay decides
    assert n[0] - n[-1] > 50
    flat = structure.search(scores, list(range(12)), 0.6, 0.1, decay=0.0)
    assert max(s.n_centers for s in flat) - min(s.n_centers for s in flat) < 30
    loc = structure.search(scores, list(range(12)), 0.6, 0.1, mode="local")
    assert all(s.n_centers == 117 and int(s.pruned.sum()) == 19 for s in loc)


def test_every_layer_keeps_a_centre():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 196, generator=g, dtype=torch.float64)
    scores[0, :8] = 100.0  # two peaked layers take the whole global budget of 3 * 5 centres
    scores[1, :8] = 100.0
    plain = structure.search(scores, [0, 1, 2], 5 / 196 + 1e-9, 0.0, min_centers=0)
    assert plain[2].n_centers == 0  # what crashes the official code (docs/methods/pm.md §5.17)
    st = structure.search(scores, [0, 1, 2], 5 / 196 + 1e-9, 0.0)
    assert st[2].n_centers == 1 and st[2].centers == [int(torch.argmax(scores[2]))]


def test_compressed_layers_option(make_vit):
    m, r = _calibrated(make_vit, "pm:keep=0.5,layers=[1,3]")
    assert [s.layer for s in r.structs] == [1, 3]
    sched = r.token_schedule(patch.get_context(m).info)
    assert sched[0].attn == 65 and sched[2].attn == 65 and sched[1].attn < 65
    assert sum(b.attn for b in sched[1::2]) == 2 * int(64 * 0.5) + 2
    with pytest.raises(ConfigError, match="depth"):
        patch.apply(make_vit(**SMALL), registry.build("pm:layers=[7]"))
    with pytest.raises(ConfigError, match="keep \\+ prune"):
        registry.build("pm:keep=0.95,prune=0.1")


# --------------------------------------------------------------------------- matrices
def test_raster_init_hand_worked_4x4():
    """docs/methods/pm.md §1.5 on a 4x4 grid: centres 1, 6, 7, 14; patches 0 and 9 pruned.

    c=1:  line (1+1)//4 = 0, midpoint ceil(7/2) = 4 -> row 1 > 0 -> cut at 4: patches 0-3
    c=6:  line 7//4 = 1, midpoint ceil(13/2) = 7 (row 1)                      : patches 4-6
    c=7:  last column; line (7+1)//4 = 2 (off-by-one), midpoint ceil(21/2)=11 (row 2, not cut): 7-10
    c=14: the rest                                                             : patches 11-15
    """
    s = torch.tensor([0.5, 0.8, 0.2, 0.4, 0.3, 0.6, 0.9, 0.5, 0.25, 0.7, 0.1, 0.3, 0.2, 0.6, 0.8, 0.4],
                     dtype=torch.float64)
    pruned = torch.zeros(16, dtype=torch.bool)
    pruned[[0, 9]] = True
    M = matrices.merge_matrix([1, 6, 7, 14], pruned, s, width=4, n_prefix=1)
    E = torch.zeros(5, 17, dtype=torch.float64)
    E[0, 0] = 1
    E[1, 1:5] = torch.tensor([0.0, 1.0, 0.25, 0.5])  # p0 pruned, p2 = .2/.8, p3 = .4/.8
    E[2, 5:8] = torch.tensor([0.3 / 0.9, 0.6 / 0.9, 1.0])
    E[3, 8:12] = torch.tensor([1.0, 0.5, 0.0, 0.2])  # p9 pruned
    E[4, 12:17] = torch.tensor([0.375, 0.25, 0.75, 1.0, 0.5])
    assert torch.allclose(M, E, atol=1e-12)
    # ties at the midpoint go right; a centre absorbs centre-free rows before it
    assert matrices.raster_assign([4, 6], 8, 8) == [0, 0, 0, 0, 0, 1, 1, 1]
    assert matrices.raster_assign([1, 13], 16, 4) == [0] * 4 + [1] * 12
    # without the off-by-one the last-column centre 7 would stop at its row end
    assert matrices.raster_assign([1, 6, 7, 14], 16, 4)[8] == 2


def test_matrix_properties_on_a_calibrated_structure():
    g = torch.Generator().manual_seed(3)
    st = structure.search(torch.rand(12, 196, generator=g, dtype=torch.float64), list(range(12)), 0.6, 0.1)
    for assign in ("raster", "grid2d"):
        for s in st:
            M = matrices.merge_matrix(s.centers, s.pruned, s.score, 14, 1, assign)
            nz = M != 0
            assert (nz.sum(0) <= 1).all()  # disjoint row supports
            assert not nz[:, 1:][:, s.pruned].any()  # pruned columns are zero
            assert (nz.sum(0)[1:][~s.pruned] == 1).all()  # every other token is merged somewhere
            assert M[0, 0] == 1 and nz[0].sum() == 1 and nz[:, 0].sum() == 1  # CLS row / column
            for i, c in enumerate(s.centers):
                assert M[1 + i, 1 + c] == 1.0  # centre weight 1
            w = M[1:, 1:][nz[1:, 1:]]
            assert (w > 0).all() and (w <= 1).all()  # merged: s_j / s_centre < 1, rows not normalised
            R = matrices.reconstruct_matrix(M)
            assert torch.allclose(R, torch.linalg.pinv(M), atol=1e-12)
            assert torch.allclose(R, M.t() / (M * M).sum(1), atol=1e-12)  # M^T diag(1/||m_i||^2)
            assert not R[1:][s.pruned].any()
            if assign == "grid2d":
                own = torch.tensor(matrices.grid2d_assign(s.centers, 196, 14))
                c = torch.tensor(s.centers)
                p = torch.arange(196)
                d = (p[:, None] // 14 - c // 14) ** 2 + (p[:, None] % 14 - c % 14) ** 2
                assert (d[p, own] == d.min(1).values).all()
    # raster segments are contiguous in raster order
    s = st[0]
    own = matrices.raster_assign(s.centers, 196, 14)
    assert own == sorted(own)


# --------------------------------------------------------------------------- implementations
def _perturb(model, support_only: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.reducer_modules["pm"].parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.add_(noise * (p != 0) if support_only else noise)


@pytest.mark.parametrize("shortcut", [True, False])
def test_efficient_blocks_equal_dense_reference(make_vit, shortcut):
    m, r = _calibrated(make_vit, f"pm:keep=0.5,prune=0.2,shortcut={str(shortcut).lower()}")
    x = torch.randn(3, 3, 32, 32)

    def run(impl):
        r.cfg["impl"] = impl
        return m(x)

    _perturb(m, support_only=True)  # trained with the support kept: all three agree
    ref = run("dense")
    assert (run("gather") - ref).abs().max() < 1e-5
    assert (run("matmul") - ref).abs().max() < 1e-5
    r.cfg["impl"] = "auto"
    assert r._impl(0, training=False) == "gather"
    assert (m(x) - ref).abs().max() < 1e-5
    _perturb(m, support_only=False, seed=1)  # dense fine-tuning (support=free): gather is no longer exact
    ref = run("dense")
    assert (run("matmul") - ref).abs().max() < 1e-5
    assert (run("gather") - ref).abs().max() > 1e-3
    r.cfg["impl"] = "auto"
    assert r._impl(0, training=False) == "matmul"
    assert (m(x) - ref).abs().max() < 1e-5


def test_pm_block_processes_C_tokens_and_pruned_tokens_skip(make_vit, record_tokens, zero_blocks):
    m, r = _calibrated(make_vit)
    rec = record_tokens(m)
    m(torch.randn(1, 3, 32, 32))
    assert rec["attn"] == rec["mlp"] == r.per_layer()["tokens"]
    # with identity blocks a pruned token leaves every block unchanged
    zero_blocks(m)
    x = m.norm_pre(m._pos_embed(m.patch_embed(torch.randn(2, 3, 32, 32))))
    st = patch.get_context(m)
    from bench.core.reducer import TokenState

    st.state = TokenState(batch=2, n_prefix=1, grid=(8, 8), n0=65)
    blk = m.blocks[0]
    out = blk(x)
    pr = torch.nonzero(r.structs[0].pruned).flatten() + 1
    assert pr.numel() > 0 and torch.equal(out[:, pr], x[:, pr])


def test_matrices_are_registered_trainable_parameters(make_vit):
    m, r = _calibrated(make_vit)
    names = [n for n, _ in m.named_parameters() if n.startswith("reducer_modules.pm.")]
    assert len(names) == 8 and "reducer_modules.pm.merge.0" in names
    m.train()
    loss = m(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    M = m.reducer_modules["pm"].merge["0"]
    assert M.grad is not None and (M.grad[M == 0] != 0).any()  # support=free: dense gradient (official)
    m2, r2 = _calibrated(make_vit, "pm:support=fixed")
    m2.train()
    m2(torch.randn(2, 3, 32, 32)).sum().backward()
    M2 = m2.reducer_modules["pm"].merge["0"]
    assert not (M2.grad[M2 == 0] != 0).any() and (M2.grad != 0).any()
    m3, _ = _calibrated(make_vit, "pm:trainable=false")
    assert not any(p.requires_grad for p in m3.reducer_modules["pm"].parameters())


# --------------------------------------------------------------------------- calibration
def test_calibration_is_deterministic_and_follows_the_formula(make_vit):
    m = make_vit(**SMALL)
    data = _data()
    info = ModelInfo.from_model(m)
    r1, r2 = registry.build("pm"), registry.build("pm")
    patch.apply(m, r1)
    s1, meta = collect_scores(m, r1, data, info)
    m2 = copy.deepcopy(m)
    patch.apply(m2, r2)
    s2, _ = collect_scores(m2, r2, data, info)
    assert torch.equal(s1, s2) and meta["images"] == 18 and meta["iterations"] == 3
    # the official formula by hand, layer 2, through an explicit backward hook
    base = make_vit(**SMALL)
    for blk in base.blocks:
        blk.attn.fused_attn = False
    store = {}

    def grab(mod, inp, out):
        out.retain_grad()
        store["A"] = out

    h = base.blocks[2].attn.attn_drop.register_forward_hook(grab)
    ref = torch.zeros(64, dtype=torch.float64)
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(base(x), y)
        loss.backward()
        A, G = store["A"], store["A"].grad
        B, H, N, _ = A.shape
        ref += ((A * G).double().sum((0, 1, 2)).abs() / (B * H * N))[1:]
    h.remove()
    assert torch.allclose(s1[2], ref, rtol=1e-4, atol=1e-12)
    # structures agree too, and the opt-step variant moves the weights
    st1 = r1.structure_from_scores(s1, info)
    st2 = r2.structure_from_scores(s2, info)
    assert [s.centers for s in st1] == [s.centers for s in st2]
    m3 = copy.deepcopy(m)
    r3 = registry.build("pm")
    patch.apply(m3, r3)
    before = m3.blocks[0].attn.qkv.weight.clone()
    s3, _ = collect_scores(m3, r3, data, info, opt_step=True)
    assert not torch.equal(before, m3.blocks[0].attn.qkv.weight)
    assert s3.shape == s1.shape and not torch.equal(s3, s1)


def test_score_ablations(make_vit):
    m = make_vit(**SMALL)
    info = ModelInfo.from_model(m)
    rc = registry.build("pm:score=cls_attn")
    patch.apply(m, rc)
    sc, _ = collect_scores(m, rc, _data(2), info)
    assert sc.shape == (4, 64) and (sc > 0).all()
    assert (sc.sum(1) <= 2.0 + 1e-9).all()  # per batch: the CLS row's mass on patch keys, <= 1
    rr = registry.build("pm:score=random,seed=3")
    s1, _ = collect_scores(m, rr, [], info)
    s2, _ = collect_scores(m, registry.build("pm:score=random,seed=3"), [], info)
    assert torch.equal(s1, s2)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    """pm-calibrate's checkpoint rebuilds the fine-tuned model through bench.runtime.checkpoint.load_model."""
    from bench.runtime import models
    from bench.runtime.checkpoint import load_model, read_checkpoint
    from pm.cli import save

    torch.manual_seed(0)
    m = models.create("deit_tiny_patch16_224", img_size=64, num_classes=10).eval()  # 4x4 patches
    r = registry.build("pm:keep=0.5,assign=grid2d")
    calibrate(m, r, _data(2, img=64))
    _perturb(m, support_only=False)  # as after fine-tuning
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    path = tmp_path / "pm.pt"
    save(path, m, r, "deit_tiny_patch16_224", {"note": "test"})
    ck = read_checkpoint(path)  # weights_only loadable
    assert find_state(ck) is not None and ck["reducer"] == r.spec()
    m2, r2 = load_model(path)
    assert isinstance(r2, PruneAndMerge) and r2.per_layer()["tokens"] == r.per_layer()["tokens"]
    assert torch.equal(m2(x), ref)
    m3, _ = load_model(path, reducer="pm:keep=0.5,assign=grid2d")  # the same spec given explicitly
    assert torch.equal(m3(x), ref)
    # flops/speed --checkpoint path
    r4 = registry.build(r.spec())
    r4.load_structure(path)
    assert [s.centers for s in r4.structs] == [s.centers for s in r.structs]
    # a model of another geometry is refused with a clear error
    with pytest.raises(ConfigError, match="does not match"):
        patch.apply(models.create("deit_tiny_patch16_224", img_size=96, num_classes=10), r4)
    with pytest.raises(ConfigError, match="keep: checkpoint 0.5, spec 0.6"):
        registry.build("pm:assign=grid2d").load_structure(path)
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="no PM structure"):
        registry.build("pm").load_structure(tmp_path / "x.pt")


# --------------------------------------------------------------------------- FLOPs and training hooks
def _deit(dim, heads):
    return ModelInfo(depth=12, dim=dim, num_heads=heads, attn_dim=dim, mlp_hidden=4 * dim, n_prefix=1,
                     grid=(14, 14), patch_size=(16, 16), in_chans=3, num_classes=1000)


@pytest.mark.parametrize("dim,heads,base,k6", [(192, 3, 1.2636, 0.729), (384, 6, 4.6188, 2.710),
                                               (768, 12, 17.6036, 10.431)])
def test_flops_report_matches_the_pm_code_formula(dim, heads, base, k6):
    info = _deit(dim, heads)
    r = PruneAndMerge(keep=0.6)
    rep = r.flops_report(info)  # uncalibrated: uniform 118 tokens per block
    assert rep["structure_source"].startswith("uniform")
    assert rep["pm_code_formula_baseline_gmacs"] == pytest.approx(base, abs=1e-4)
    assert rep["pm_code_formula_gmacs"] == pytest.approx(k6, abs=1e-3)
    assert r.paper_count_macs(info) / 1e9 == pytest.approx(k6, abs=1e-3)  # what the PM README rows compare with
    assert rep["tokens_per_block"] == [118] * 12
    if dim == 192:
        assert rep["merge_reconstruct_dense_gmacs"] == pytest.approx(0.107, abs=1e-3)
        assert rep["diag_shortcut_gmacs"] == pytest.approx(0.089, abs=1e-3)
    assert rep["official_code_full_gmacs"] > rep["pm_code_formula_gmacs"]
    assert [b.attn for b in r.token_schedule(info)] == [118] * 12


def test_flops_of_the_patched_model_are_measured_consistently(make_vit):
    from bench.core import flops

    m, r = _calibrated(make_vit)
    info = patch.get_context(m).info
    rep = flops.analytic(info, r)
    assert r.extra_macs(info) > 0 and rep.reducer_extra == r.extra_macs(info)
    assert [b["attn_tokens"] for b in rep.blocks] == r.per_layer()["tokens"]
    meas = flops.measured_macs(m, (32, 32))
    # measured counts matmuls only: analytic minus the gather-path extra (index ops) within 1%
    assert abs(meas - (rep.total - rep.reducer_extra)) / meas < 0.01


def test_recipe_and_lr_quirk():
    r = PruneAndMerge()
    rt = r.recipe(_deit(192, 3))
    assert rt["distill"] == "soft" and rt["distill_form"] == "add" and rt["distill_tau"] == 20
    assert rt["distill_alpha"] == 0.8 and rt["lr"] == 1e-4 and rt["warmup_epochs"] == 0
    from bench.runtime.train import TrainConfig

    TrainConfig.from_dict(rt)  # every key is a TrainConfig field
    assert r.recipe(_deit(384, 6))["distill_alpha"] == 1.0
    assert r.param_group("blocks.0.attn.qkv.weight") == "backbone" and r.lr_scale("backbone", 3, 10) == 1.0
    q = PruneAndMerge(lr_quirk=True)
    q.recipe(_deit(384, 6))
    assert q.param_group("reducer_modules.pm.merge.3") == "decay_const_lr"
    assert q.param_group("blocks.0.attn.qkv.weight") == "decay_const_lr"
    assert q.param_group("blocks.0.norm1.weight") == "no_decay" and q.param_group("norm.weight") == "no_decay"
    assert q.param_group("blocks.0.ls1.gamma") == "no_decay"
    assert q.param_group("blocks.0.attn.qkv.bias") == "no_decay" and q.param_group("pos_embed") == "no_decay"
    from bench.runtime.train import CosineSchedule

    sched = CosineSchedule(1e-4, 1e-6, total_steps=100, warmup_steps=0, warmup_lr=1e-6)
    for step in (0, 37, 99):  # the trainer's per-step cosine times the scale stays at 1e-6
        # (bench.runtime.train passes the fractional epoch step / steps_per_epoch)
        assert sched.lr_at(step) * q.lr_scale("decay_const_lr", step / 10, 10) == pytest.approx(1e-6)
    assert q.lr_scale("no_decay", 5, 10) == 1.0


def test_inference_uses_the_fused_kernel_and_calibration_the_explicit_path(make_vit, monkeypatch):
    import torch.nn.functional as F

    m, r = _calibrated(make_vit)
    calls = {"sdpa": 0}
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls["sdpa"] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.inference_mode():
        m(torch.randn(1, 3, 32, 32))
    assert calls["sdpa"] == 4
    calls["sdpa"] = 0
    calibrate(m, r, _data(1))
    assert calls["sdpa"] == 0  # scoring needs the probabilities: explicit softmax only there


def test_pm_calibrate_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    import json

    from bench.runtime.checkpoint import load_model
    from bench.cli import main

    out = tmp_path / "pm.pt"
    rc = main(["pm-calibrate", "--model", "pmbench_proxy_vit", "--data", "proxy:smoke", "--keep", "0.7",
               "--prune", "0.1", "--iters", "2", "--batch-size", "8", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sum_tokens"] == 12 * int(196 * 0.7) + 12 and len(res["per_layer"]) == 12
    assert res["calibration"]["images"] == 16
    model, red = load_model(out)
    assert red.per_layer()["tokens"] == res["tokens"]
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 10)


def test_gradients_of_the_implementations_agree(make_vit):
    m, r = _calibrated(make_vit, "pm:keep=0.5,prune=0.2")
    _perturb(m, support_only=True)
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for impl in ("dense", "matmul", "gather"):
        r.cfg["impl"] = impl
        m.zero_grad(set_to_none=True)
        m(x).square().sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    M = m.reducer_modules["pm"].merge["1"]
    sup = M.detach() != 0
    for n, g in grads["dense"].items():
        assert torch.allclose(grads["matmul"][n], g, rtol=1e-4, atol=1e-5), n
        if n.startswith("reducer_modules.pm.merge"):  # gather trains the support only
            s = m.get_parameter(n).detach() != 0
            assert torch.allclose(grads["gather"][n][s], g[s], rtol=1e-4, atol=1e-5), n
            assert not grads["gather"][n][~s].any()
        elif not n.startswith("reducer_modules"):
            assert torch.allclose(grads["gather"][n], g, rtol=1e-4, atol=1e-5), n
    assert sup.any()
