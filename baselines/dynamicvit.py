"""DynamicViT: learned token sparsification (Rao et al., NeurIPS 2021), as in
raoyongming/DynamicViT (``vit.py`` of the NeurIPS code = ``models/dyvit.py`` at HEAD,
``losses.py``).

Specification: docs/methods/dynamicvit.md (sources, deviations, options).

Three prediction modules (``PredictorLG``) sit *between* blocks, before the
blocks at ``loc`` (default 3, 6, 9, i.e. before the 4th/7th/10th block), so the
block at a location already runs on the reduced set.  A predictor sees the
patch tokens only (never CLS or other prefix tokens) plus the previous keep
decision and outputs log-probabilities ``[keep, drop]`` per token
(docs/methods/dynamicvit.md §1.1-1.2).

* **Inference** (``model.eval()``): at stage s keep ``int(n_patches * rho**s)``
  patch tokens (cumulative ratios ``[rho, rho^2, rho^3]``, counted relative to
  the *original* patch count, 196 for DeiT), chosen by top-k on the keep
  log-probability and gathered (tokens really removed, ordered by score, as the
  official ``argsort``); attention uses the fused SDPA kernel (docs/methods/dynamicvit.md §1.3-1.4).
* **Training** (``model.train()``): Gumbel-softmax hard decisions
  (straight-through, tau 1) on the keep channel, multiplied by the previous
  decision (cumulative); no token is removed, instead every block's attention
  uses the official masked softmax (``bench.core.patch.softmax_with_policy``, keys
  whose policy is 0 are hidden from every other query; all-ones policy before
  the first stage, exactly as the official code passes ``policy`` to every
  block).  Per-stage decisions and the final tokens go to ``state.scratch``
  (docs/methods/dynamicvit.md §1.5).
* **Losses** (``extra_losses``, official ``DistillDiffPruningLoss_dynamic``
  with ``mse_token=True``): ``ratio_weight * sum_s mean_b(mean_i d_bis - rho^s)^2 / n_stages``,
  ``distill_weight * KL(teacher || student)`` on logits (T=1, batchmean) and
  ``distill_weight * MSE`` between the student's final normed patch tokens and
  the teacher's, at positions kept at the end.  The classification loss is the
  trainer's.  Hence ``needs_teacher`` (docs/methods/dynamicvit.md §1.6).
* **Optimisation** (``param_group``/``lr_scale``): predictor parameters train at
  the full lr; the backbone is frozen (lr 0) for the first ``freeze_epochs``
  (official 5 of 30; by default the same fraction 1/6 of any schedule) and then
  trains at ``backbone_lr_scale`` (0.01) of the lr; ``cls_token`` and
  ``pos_embed`` stay frozen as in the official optimiser (docs/methods/dynamicvit.md §1.7, §4).

FLOPs (docs/methods/dynamicvit.md §2): the suite's count adds the predictors' linears on the tokens each one
sees (``n_patches``, ``int(n_patches*rho)``, ``int(n_patches*rho^2)``) to the
blocks' count; this is what fvcore counts on the official eval model, the
counter of the T-PAMI-era repository (``calc_flops.py``), and its README figures
(DeiT-S 2.9, DeiT-B 11.4, DeiT-256 1.3) are that count cut to one decimal.
The NeurIPS paper's figures were made another way (DynamicViT#14: "manually
writing down the complexity of each type of layer and summing them up").  The
per-layer complexities in question are in the repository: the ``flops(s)``
methods of ``Block`` and ``PatchEmbed*`` in its LV-ViT model file
(``models/dylvvit.py``, inherited from LV-ViT).  Those count, per token, the
matmuls plus fixed costs for softmax, dropout, scaling, biases, residuals,
LayerNorm and GELU; ``PredictorLG`` has no such method, and the paper's figures
agree with the sum without a predictor term, not with any sum that has one.
:func:`paper_formula_macs` is that rule;
:meth:`DynamicViT.paper_count_macs` applies it to the eval token schedule.  It
gives DeiT-S rho 0.9..0.5 3.98 / 3.40 / 2.92 / 2.51 / 2.18 and DeiT-B rho 0.7
11.16 against the paper's 4.0 / 3.4 / 2.9 / 2.5 / 2.2 and 11.2, and, on the LV-ViT
configurations (with their 4-conv stem, no token-labelling head), 6.57 / 4.58 /
3.74 and 12.74 / 8.47 / 9.64 against 6.6 / 4.6 / 3.7 and 12.7 / 8.5 / 9.6; no
predictor-inclusive count reaches 11.2.  The only paper rows it misses are
DeiT-S at 384 px (9.56 / 7.10 against 9.5 / 7.0), whose configuration the paper
does not give (``tests/test_dynamicvit.py``).  The suite's tables keep the
predictor-inclusive count; the published-vs-reproduced table compares the
paper's rows with the paper's rule and labels them so.

Deviations (docs/methods/dynamicvit.md §6; none by default): ``keep_ratios`` overrides the
cumulative ``[rho, rho^2, rho^3]`` (e.g. the paper's two-stage ablation);
any number of prefix tokens is supported (the official code assumes CLS only);
``int(n_patches * r)`` replaces the hard-coded ``14*14`` so other resolutions
work; with ``k == n`` at a stage nothing is gathered (the official code would
only reorder the tokens, which does not change any output).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.patch import reducer_modules, topk_keep
from bench.core.reducer import (PAPER_COUNT, AttnRequest, BlockTokens, ConfigError, ModelInfo, Option, TokenState,
                                Trainable, keep_map)

_KEY = "dynamicvit"  # name of the ModuleList under model.reducer_modules
_FROZEN = ("cls_token", "pos_embed")  # official: in no optimiser group


class PredictorLG(nn.Module):
    """The official local-global prediction module (2-way log-probabilities, channel 0 = keep;
    docs/methods/dynamicvit.md §1.2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        for m in self.modules():  # the official model's _init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor]) -> torch.Tensor:
        """``policy`` (B, N, 1) keep decisions; None = all ones (inference), where the masked mean is the
        plain mean: ``x * 1`` and a sum of N ones are exact, so the numbers are the same, without the
        multiply and the policy sum."""
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, : C // 2]
        if policy is None:
            global_x = x[:, :, C // 2:].sum(dim=1, keepdim=True) / float(N)
        else:
            global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand(B, N, C - C // 2)], dim=-1)
        return self.out_conv(x)

    @staticmethod
    def macs_per_token(dim: int) -> int:
        return dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2


# Fixed per-element costs the official per-layer formula charges (models/dylvvit.py constants).
_SOFTMAX, _DROPOUT, _LAYER_NORM, _ACTIVATION = 5, 4, 5, 8


def paper_formula_macs(info: ModelInfo, tokens_per_block: list[int], patch_embed_macs: Optional[int] = None) -> int:
    """The DynamicViT paper's count: the official per-layer complexities summed over the blocks at
    their token counts (prefix tokens included), plus the patch embedding and the classifier.

    Per token of a block seeing ``s`` tokens (D width, A attention width, H heads, F MLP hidden):
    attention ``3DA + 2As + (softmax + dropout + 1 scale) * H * s + AD + (1 bias + dropout + 1
    residual + layer_norm) * D``; MLP ``2DF + (activation + 1 bias) * F + (1 bias + dropout + 1
    residual + layer_norm) * D``.  The patch embedding is ``n_patches * p^2 * in_chans * D`` unless
    ``patch_embed_macs`` is given (e.g. LV-ViT's conv stem); the classifier ``D * classes`` (the
    official formula has no head term; it adds < 0.001 G).  The predictors are not counted: the
    official ``PredictorLG`` has no complexity method (see the module docstring and
    docs/methods/dynamicvit.md §2)."""
    if len(tokens_per_block) != info.depth:
        raise ValueError(f"paper_formula_macs: {len(tokens_per_block)} token counts for depth {info.depth}")
    D, A, H, F_ = info.dim, info.attn_dim, info.num_heads, info.mlp_hidden
    total = 0
    for s in tokens_per_block:
        attn = 3 * D * A + 2 * A * s + (_SOFTMAX + _DROPOUT + 1) * H * s + A * D + (2 + _DROPOUT + _LAYER_NORM) * D
        mlp = 2 * D * F_ + (_ACTIVATION + 1) * F_ + (2 + _DROPOUT + _LAYER_NORM) * D
        total += (attn + mlp) * s
    if patch_embed_macs is None:
        patch_embed_macs = info.n_patches * info.patch_size[0] * info.patch_size[1] * info.in_chans * D
    return total + patch_embed_macs + D * info.num_classes * info.num_heads_out


class DynamicViT(Trainable):
    name = "dynamicvit"
    summary = "DynamicViT: learned predictors drop tokens before blocks 4/7/10, keep rho^s (Rao et al. 2021)"
    needs_training = True  # the predictors start random
    needs_teacher = True
    # its NeurIPS paper (and the ToMe paper's copy of one of its rows) summed the official per-layer
    # formula without the predictors; its later README prints fvcore counts, i.e. the suite's count
    paper_count_sources = ("DynamicViT paper (secondary copy)", "ToMe paper (secondary copy)")
    report_notes = {
        "flops": "paper_count_gmacs of DynamicViT rows: its paper's rule, the official per-layer formula with the "
                 "predictors excluded",
        "published": "DynamicViT: its paper summed the official per-layer formula without the predictors "
                     "(ours_count: method paper's rule); its README prints its fvcore counts, predictors included, "
                     "cut to one decimal (gmacs_agree: ours truncated)",
        "segmentation": "DynamicViT rows: untrained predictors (it needs training; a Segmenter is not fine-tuned here)",
    }
    options = {
        "rho": Option("float", 0.7, "base keep ratio; stage s keeps int(n_patches * rho**s) patch tokens"),
        "loc": Option("intlist", [3, 6, 9], "0-based indices of the blocks the predictors sit in front of"),
        "keep_ratios": Option("floatlist", None, "per-stage cumulative keep ratios (default [rho, rho^2, ...])",
                              optional=True),
        "ratio_weight": Option("float", 2.0, "keep-ratio loss weight (official DeiT-S 2.0; DeiT-B README 5.0)"),
        "distill_weight": Option("float", 0.5, "weight of the teacher logit KL and of the token MSE"),
        "freeze_epochs": Option("float", None, "epochs with the backbone frozen (default freeze_frac x epochs)",
                                optional=True),
        "freeze_frac": Option("float", 5 / 30, "fraction of the schedule with the backbone frozen (official 5/30)"),
        "backbone_lr_scale": Option("float", 0.01, "backbone lr multiplier after the freeze (official 0.01)"),
        "tau": Option("float", 1.0, "Gumbel-softmax temperature in training (official 1)"),
    }

    # -- configuration ---------------------------------------------------------------------
    def validate_options(self):
        c = self.cfg
        if not (0.0 < c["rho"] <= 1.0):
            raise ConfigError(f"dynamicvit: rho must be in (0, 1], got {c['rho']}")
        loc = c["loc"]
        if not loc:
            raise ConfigError("dynamicvit: loc must name at least one block")
        if any(l < 0 for l in loc) or sorted(set(loc)) != list(loc):
            raise ConfigError(f"dynamicvit: loc must be strictly increasing, non-negative block indices, got {loc}")
        kr = c["keep_ratios"]
        if kr is not None:
            if len(kr) != len(loc):
                raise ConfigError(f"dynamicvit: {len(kr)} keep_ratios for {len(loc)} locations in loc={loc}")
            if any(not (0.0 < r <= 1.0) for r in kr) or any(b > a for a, b in zip(kr, kr[1:])):
                raise ConfigError(f"dynamicvit: keep_ratios must be non-increasing values in (0, 1], got {kr}")
        if c["tau"] <= 0:
            raise ConfigError(f"dynamicvit: tau must be > 0, got {c['tau']}")
        if not (0.0 <= c["freeze_frac"] <= 1.0):
            raise ConfigError(f"dynamicvit: freeze_frac must be in [0, 1], got {c['freeze_frac']}")
        if c["freeze_epochs"] is not None and c["freeze_epochs"] < 0:
            raise ConfigError(f"dynamicvit: freeze_epochs must be >= 0, got {c['freeze_epochs']}")
        self._stage_of = {l: s for s, l in enumerate(loc)}

    def ratios(self) -> list[float]:
        """Cumulative keep ratios per stage, computed as the official ``[r, r**2, r**3]``
        (docs/methods/dynamicvit.md §1.3)."""
        if self.cfg["keep_ratios"] is not None:
            return list(self.cfg["keep_ratios"])
        rho = self.cfg["rho"]
        return [rho ** (s + 1) for s in range(len(self.cfg["loc"]))]

    def keep_counts(self, n_patches: int) -> list[int]:
        """Patch tokens kept at each stage: ``int(n_patches * ratio)`` (official ``int(init_n * r)``)."""
        return [int(n_patches * r) for r in self.ratios()]

    def check(self, info: ModelInfo):
        bad = [l for l in self.cfg["loc"] if l >= info.depth]
        if bad:
            raise ConfigError(
                f"dynamicvit: block index {bad} past the model depth {info.depth} (valid 0..{info.depth - 1})")
        ks = self.keep_counts(info.n_patches)
        if min(ks) < 1:
            raise ConfigError(f"dynamicvit: the keep ratios {self.ratios()} leave no patch token out of "
                              f"{info.n_patches} at some stage ({ks}); raise rho")
        if info.dim < 4:
            raise ConfigError(f"dynamicvit: embedding dim {info.dim} too small for the predictor (needs >= 4)")

    # -- patching ----------------------------------------------------------------------------
    def on_patch(self, model, info: ModelInfo):
        mods = reducer_modules(model)
        p = next(model.parameters())
        mods[_KEY] = nn.ModuleList(PredictorLG(info.dim) for _ in self.cfg["loc"]).to(p.device, p.dtype)

    @staticmethod
    def predictors(model) -> nn.ModuleList:
        return model.reducer_modules[_KEY]

    # -- per-forward hooks -----------------------------------------------------------------------
    def begin(self, model, x, state: TokenState):
        sc = state.scratch
        sc["dvit_predictors"] = model.reducer_modules[_KEY]
        sc["dvit_train"] = bool(model.training)
        B, N = x.shape[:2]
        n_p = N - state.n_prefix
        sc["dvit_n0"] = n_p
        if sc["dvit_train"]:
            sc["dvit_prev"] = x.new_ones(B, n_p, 1)
            sc["dvit_policy"] = x.new_ones(B, N, 1)
            sc["dvit_decisions"] = []
        elif state.track:  # original patch index of every kept token, per stage (tracking only)
            sc["dvit_orig"] = torch.arange(n_p, device=x.device).expand(B, -1)
            sc["dvit_kept"] = []

    def sample_keep(self, logp: torch.Tensor, stage: int) -> torch.Tensor:
        """Training decision (B, N, 1): hard Gumbel-softmax sample of the keep channel (straight-through).
        A separate method so tests can substitute a fixed decision."""
        return F.gumbel_softmax(logp, tau=self.cfg["tau"], hard=True)[:, :, 0:1]

    def pre_block(self, i, block, x, state: TokenState):
        s = self._stage_of.get(i)
        if s is None:
            return x
        sc, p = state.scratch, state.n_prefix
        pred = sc["dvit_predictors"][s]
        if sc["dvit_train"]:
            prev = sc["dvit_prev"]
            logp = pred(x[:, p:], prev)
            hard = self.sample_keep(logp, s) * prev
            sc["dvit_decisions"].append(hard.reshape(x.shape[0], -1))
            sc["dvit_policy"] = torch.cat([x.new_ones(x.shape[0], p, 1), hard], dim=1)
            sc["dvit_prev"] = hard
            return x
        # inference: top-k on the keep log-probability, gather
        B, N, C = x.shape
        n = N - p
        k = self.keep_counts(sc["dvit_n0"])[s]
        if k >= n:
            if state.track:
                sc["dvit_kept"].append(sc["dvit_orig"])
            return x
        logp = pred(x[:, p:], None)  # prev decision is all ones in eval: the plain mean (same numbers)
        idx, kept = topk_keep(x, logp[:, :, 0], k, p)
        if state.track:
            sc["dvit_orig"] = torch.gather(sc["dvit_orig"], 1, idx)
            sc["dvit_kept"].append(sc["dvit_orig"])
            state.remap(x, keep_map(idx, N, p))
        return kept

    def attn_request(self, i, block, x, state: TokenState) -> AttnRequest:
        if state.scratch.get("dvit_train"):
            return AttnRequest(policy=state.scratch["dvit_policy"])
        return AttnRequest()

    def end(self, model, x, state: TokenState):
        if state.scratch.get("dvit_train"):
            state.scratch["dvit_final"] = x  # pre-norm; extra_losses applies model.norm
        return x

    # -- training ----------------------------------------------------------------------------------
    def ratio_loss(self, decisions: list[torch.Tensor]) -> torch.Tensor:
        """Official: sum over stages of mean_b (mean_i d - target_s)^2, divided by the number of stages
        (docs/methods/dynamicvit.md §1.6)."""
        tot = 0.0
        for d, r in zip(decisions, self.ratios()):
            tot = tot + ((d.mean(1) - r) ** 2).mean()
        return tot / len(self.cfg["loc"])

    def extra_losses(self, model, outputs, targets, state: Optional[TokenState], teacher_out=None) -> dict:
        if state is None or not state.scratch.get("dvit_train"):
            return {}
        sc = state.scratch
        out = {"ratio": self.cfg["ratio_weight"] * self.ratio_loss(sc["dvit_decisions"])}
        if teacher_out is None:
            return out
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        w = self.cfg["distill_weight"]
        out["cls_kl"] = w * F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_out["logits"], dim=-1),
                                     reduction="batchmean", log_target=True)
        p = state.n_prefix
        student = model.norm(sc["dvit_final"])[:, p:]
        teacher = teacher_out["features"][:, p:]
        mask = sc["dvit_prev"].detach().reshape(-1) > 0.5
        if mask.sum() < 0.1:
            out["token_distill"] = student.sum() * 0.0
        else:
            C = student.shape[-1]
            out["token_distill"] = w * F.mse_loss(student.reshape(-1, C)[mask], teacher.reshape(-1, C)[mask].to(student.dtype))
        return out

    def param_group(self, name: str) -> str:
        if name.startswith("reducer_modules."):
            return "predictor"
        if name in _FROZEN:
            return "frozen"
        return "backbone"

    def frozen_epochs(self, num_epochs: float) -> float:
        fe = self.cfg["freeze_epochs"]
        return fe if fe is not None else self.cfg["freeze_frac"] * num_epochs

    def lr_scale(self, group: str, epoch: float, num_epochs: float) -> float:
        if group == "predictor":
            return 1.0
        if group == "frozen":
            return 0.0
        return 0.0 if epoch < self.frozen_epochs(num_epochs) else self.cfg["backbone_lr_scale"]

    def lr_multiplier(self, name: str, epoch: float, num_epochs: float) -> float:
        return self.lr_scale(self.param_group(name), epoch, num_epochs)

    def recipe(self, info: ModelInfo) -> dict:
        """HEAD README (``main.py``): 30 epochs, AdamW, lr 1e-3 at global batch 1024 (returned as
        5e-4 at 512, the suite's convention, not rescaled here), per-step cosine to 1e-6, 5 warm-up
        epochs, wd 0.05, DeiT augmentation (mixup 0.8, cutmix 1.0, smoothing 0.1), no clipping,
        ``model.train()``.  The teacher KL is one of the method's own losses, so the trainer's
        distillation stays off.  A shorter run should scale ``warmup_epochs`` with ``epochs``
        (the backbone freeze scales by itself through ``freeze_frac``).  See docs/methods/dynamicvit.md §4."""
        return {"epochs": 30.0, "lr": 5e-4, "min_lr": 1e-6, "warmup_epochs": 5.0, "weight_decay": 0.05,
                "clip_grad": None, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0,
                "distill": "none", "train_mode": True}

    # -- declarations -------------------------------------------------------------------------------
    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        # prefix + stage count from each location on, attention and MLP alike: docs/methods/dynamicvit.md §2
        ks = self.keep_counts(info.n_patches)
        out, n = [], info.n_tokens
        for i in range(info.depth):
            if i in self.cfg["loc"]:
                n = min(n, info.n_prefix + ks[self.cfg["loc"].index(i)])
            out.append(BlockTokens(n, n))
        return out

    def extra_macs(self, info: ModelInfo) -> int:
        """The predictors' linears (LayerNorm/GELU/softmax not counted, as for the backbone)."""
        seen, n = [], info.n_patches
        for k in self.keep_counts(info.n_patches):
            seen.append(n)
            n = min(n, k)
        return sum(seen) * PredictorLG.macs_per_token(info.dim)

    def paper_count_macs(self, info: ModelInfo) -> int:
        """The NeurIPS paper's rule (:func:`paper_formula_macs`) on the eval token schedule."""
        return paper_formula_macs(info, [bt.attn for bt in self.token_schedule(info)])

    def flops_conventions(self, info: ModelInfo) -> dict:
        return {PAPER_COUNT: self.paper_count_macs(info)}
