"""Shared test helpers: tiny timm ViTs and a per-block token recorder.

Kept generic on purpose (every method's tests may use them).  Tests run on a
shared 2-core CPU, so torch uses one thread.
"""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
# The orchestrator runs in the tests' own processes: its accuracy/ablations jobs stay there too (a test
# that wants job workers asks with --job-workers; bench/pipeline/workers.py)
os.environ["PMBENCH_JOB_WORKERS"] = "1"

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10)


@pytest.fixture
def make_vit():
    """Factory: a tiny random timm ViT in eval mode (64x64 input, 8x8 patches -> 64+1 tokens,
    width 48, 12 blocks, 3 heads).  Keyword arguments override the config; ``cls`` picks the
    class (e.g. ``timm.models.deit.VisionTransformerDistilled``); ``seed`` fixes the weights."""

    def make(cls=None, seed: int = 0, **overrides):
        from timm.models.vision_transformer import VisionTransformer

        cls = cls or VisionTransformer
        torch.manual_seed(seed)
        return cls(**{**TINY, **overrides}).eval()

    return make


@pytest.fixture
def load_benchmark():
    """Factory: ``load_benchmark("efficiency")`` imports ``benchmarks/efficiency.py`` as a module (the
    benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def record_tokens():
    """``rec = record_tokens(model)`` -> after a forward, ``rec['attn'][i]`` / ``rec['mlp'][i]``
    are the token counts block i's attention / MLP really saw (read from norm1 / norm2 inputs);
    ``rec.clear()`` resets; hooks are removed at teardown."""
    handles = []

    class Rec(dict):
        def clear(self):
            self["attn"].clear()
            self["mlp"].clear()

    def attach(model):
        rec = Rec(attn=[], mlp=[])

        def hook(kind):
            def fn(_mod, args):
                rec[kind].append(args[0].shape[1])

            return fn

        for blk in model.blocks:
            handles.append(blk.norm1.register_forward_pre_hook(hook("attn")))
            handles.append(blk.norm2.register_forward_pre_hook(hook("mlp")))
        return rec

    yield attach
    for h in handles:
        h.remove()


@pytest.fixture
def run_and_check_schedule(record_tokens):
    """``rec = run_and_check_schedule(model, reducer, x)``: one no-grad forward of the patched
    ``model`` on ``x``; asserts the token counts every block's attention and MLP really saw equal
    the reducer's declared ``token_schedule`` (the FLOP count's input); returns the record."""
    from bench.core.reducer import ModelInfo

    def run(model, reducer, x, img_size=None):
        rec = record_tokens(model)
        with torch.no_grad():
            model(x)
        sched = reducer.token_schedule(ModelInfo.from_model(model, img_size) if img_size else
                                       ModelInfo.from_model(model))
        assert rec["attn"] == [b.attn for b in sched], (rec["attn"], [b.attn for b in sched])
        assert rec["mlp"] == [b.mlp for b in sched], (rec["mlp"], [b.mlp for b in sched])
        return rec

    return run


def identity_blocks(model):
    """Zero every block's attention output projection and MLP output layer, so each block
    is the identity on its tokens while keys/queries (and so ToMe/EViT decisions) stay real.
    Token values then show exactly how tokens were moved, merged or dropped."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.zero_()
    return model


@pytest.fixture
def zero_blocks():
    """The :func:`identity_blocks` helper as a fixture."""
    return identity_blocks


@pytest.fixture
def patched_vit(make_vit):
    """``patched_vit(spec, seed=0)``: (a tiny ViT patched with ``spec``, its reducer, an unpatched
    copy with the same weights)."""
    import copy

    from bench.core import patch, registry

    def make(spec: str, seed: int = 0):
        m = make_vit(seed=seed)
        base = copy.deepcopy(m)
        r = registry.build(spec)
        patch.apply(m, r)
        return m, r, base

    return make


@pytest.fixture
def assert_spec_rejected():
    """``assert_spec_rejected([(spec, message regex), ...])``: building each spec raises a ConfigError
    whose message matches (bad option values are caught before any model exists)."""
    from bench.core import registry
    from bench.core.reducer import ConfigError

    def check(cases):
        for spec, msg in cases:
            with pytest.raises(ConfigError, match=msg):
                registry.build(spec)

    return check


@pytest.fixture
def assert_patch_rejected():
    """``assert_patch_rejected(model, [(spec, message regex), ...])``: each spec builds but fails
    ``patch.apply`` on ``model`` with a ConfigError matching the message, leaving it unpatched."""
    from bench.core import patch, registry
    from bench.core.reducer import ConfigError

    def check(model, cases):
        for spec, msg in cases:
            with pytest.raises(ConfigError, match=msg):
                patch.apply(model, registry.build(spec))
            assert not patch.is_patched(model), spec

    return check


def pytest_collection_finish(session):
    """Every test module is imported (torch, timm, mmseg): freeze the objects those imports made, so the
    garbage collector's full passes during the tests do not walk them again (bench/runtime/startup.py)."""
    import gc

    gc.freeze()
