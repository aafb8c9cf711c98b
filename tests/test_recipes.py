"""Fine-tuning recipes of ToMe, EViT, DynamicViT and MSTM (``Reducer.recipe``) and their
integration with the shared trainer (bench/runtime/train.py): the recipes are valid TrainConfigs with
the official values, EViT keeps the model in eval mode and its keep-rate schedule, ToMe merges
while training, and each method trains a few steps through ``bench.runtime.train.train``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from baselines.evit import keep_rate_at
from bench.core import patch, registry
from bench.core.reducer import ModelInfo
from bench.runtime.train import TrainConfig, train

METHODS = ["tome", "evit", "dynamicvit", "mstm"]


def _info(make_vit):
    return ModelInfo.from_model(make_vit())


@pytest.mark.parametrize("name", METHODS)
def test_recipe_is_a_valid_train_config(make_vit, name):
    rec = registry.build(name).recipe(_info(make_vit))
    cfg = TrainConfig.from_dict(rec)  # unknown fields raise
    cfg.validate()
    assert rec["distill"] == "none" and rec["lr"] > 0 and "train_mode" in rec


def test_official_values(make_vit):
    info = _info(make_vit)
    evit = registry.build("evit").recipe(info)  # finetune.sh
    assert (evit["lr"], evit["min_lr"], evit["weight_decay"], evit["warmup_epochs"], evit["epochs"]) == (
        2e-5, 2e-6, 1e-6, 0.0, 30.0)
    assert evit["train_mode"] is False  # set_training_mode = finetune == ''
    tome = registry.build("tome").recipe(info)  # DeiT recipe, merging active
    assert (tome["lr"], tome["epochs"], tome["warmup_epochs"], tome["train_mode"]) == (5e-4, 300.0, 5.0, True)
    assert registry.build("tome").cfg["prop_attn"] is True
    dv = registry.build("dynamicvit").recipe(info)  # HEAD README: lr 1e-3 at 1024 = 5e-4 at 512
    assert (dv["lr"], dv["epochs"], dv["warmup_epochs"], dv["min_lr"], dv["train_mode"]) == (5e-4, 30.0, 5.0, 1e-6,
                                                                                              True)
    assert registry.build("mstm").recipe(info) == evit  # docs/methods/mstm.md §2.5: EViT's fine-tuning recipe


def test_evit_keep_rate_warmup_schedule():
    """adjust_keep_rate: 1 before shrink_start, cosine to the target over shrink_epochs, per iteration."""
    r = registry.build("evit:keep=0.6,shrink_start=1,shrink_epochs=2")
    vals = []
    for e in (0.0, 0.99, 1.0, 2.0, 3.0, 5.0):
        r.on_step(None, e, 6)
        vals.append(r.current_keep)
    assert vals[:3] == [1.0, 1.0, 1.0] and vals[4:] == [0.6, 0.6]
    assert vals[3] == pytest.approx(0.8)  # halfway: (1 + 0.6) / 2
    assert keep_rate_at(1.5, 0.6, 1, 2) == pytest.approx(0.6 + 0.4 * (math.cos(math.pi / 4) + 1) / 2)


def test_tome_merges_while_training(make_vit, record_tokens):
    m = make_vit()
    patch.apply(m, registry.build("tome:r=4"))
    rec = record_tokens(m)
    m.train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert rec["mlp"][0] == 61 and rec["mlp"][-1] == 65 - 4 * 12
    assert patch.last_state(m).size is not None  # proportional attention has sizes to use


def _data(n=2, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 64, 64, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("spec", ["tome:r=4", "evit:keep=0.7", "dynamicvit", "mstm"])
def test_each_recipe_trains_through_the_shared_trainer(make_vit, spec):
    m = make_vit()
    teacher = copy.deepcopy(m)
    red = registry.build(spec)
    patch.apply(m, red)
    rec = red.recipe(ModelInfo.from_model(m))
    cfg = TrainConfig(**{**rec, "epochs": 1, "warmup_epochs": 0, "lr": 1e-3, "mixup": 0.0, "cutmix": 0.0,
                         "progress": False, "device": "cpu"})
    modes = []
    h = m.blocks[5].register_forward_pre_hook(lambda mod, a: modes.append(mod.training))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    hist = train(m, _data(), cfg, teacher=teacher if red.needs_teacher else None)
    h.remove()
    assert hist["final_step"] == 2 and math.isfinite(hist["epochs"][-1]["train_loss"])
    assert set(modes) == {rec["train_mode"]}  # EViT fine-tunes in eval mode
    moved = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert moved
    if spec == "mstm":
        assert "reducer_modules.mstm.gamma" in moved  # the zero-initialised fusion starts to learn
