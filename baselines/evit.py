"""EViT: attentive-token keeping with inattentive-token fusion (Liang et al., ICLR 2022),
as in youweiliang/evit (``evit.py``).

Specification: docs/methods/evit.md (sources, deviations, options).

Inside the blocks at ``loc`` (default 4/7/10, i.e. indices 3, 6, 9), after the
attention residual and before the MLP (docs/methods/evit.md §1.1-1.6):

* importance = the CLS query's post-softmax attention to every non-prefix
  token, averaged over heads (computed from the CLS query alone, so the fused
  SDPA kernel still serves the block's attention);
* keep ``ceil(keep * (N - prefix))`` tokens: top-k by importance, in
  descending-score order (not spatial), as the official ``torch.topk(sorted=True)``;
* ``fuse=true``: the remaining tokens are fused into one extra token, their sum
  weighted by the *raw* (not renormalised) CLS attention, appended last; in
  later stages it is an ordinary token;
* CLS (and any other prefix token) is always kept.  With a distillation token
  the score is still the CLS row (the official code does not support
  distillation tokens; EViT#15).

Training: the official keep-rate schedule (``adjust_keep_rate``) holds keep=1
for ``shrink_start`` epochs, then decays it by cosine over ``shrink_epochs``
epochs to the target, per iteration; the fine-tuning recipe sets both to 0
(docs/methods/evit.md §1.7).
"""
from __future__ import annotations

import math

import torch

from bench.core.patch import gather_tokens, topk_keep
from bench.core.reducer import (AttnRequest, BlockTokens, ConfigError, ModelInfo, Option, TokenState, Trainable,
                                keep_count, keep_map)


def complement_idx(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices in [0, dim) that are not in ``idx`` (B, k) -> (B, dim - k), ascending."""
    a = torch.arange(dim, device=idx.device).expand(idx.shape[0], -1)
    mask = torch.ones_like(a, dtype=torch.bool).scatter_(1, idx, False)
    return a[mask].reshape(idx.shape[0], dim - idx.shape[1])


def keep_rate_at(epoch: float, target: float, shrink_start: float, shrink_epochs: float) -> float:
    """EViT's ``adjust_keep_rate``: 1 before shrink_start, cosine to target over shrink_epochs
    (docs/methods/evit.md §1.7)."""
    if epoch < shrink_start:
        return 1.0
    if shrink_epochs <= 0 or epoch >= shrink_start + shrink_epochs:
        return target
    t = (epoch - shrink_start) / shrink_epochs
    return target + (1.0 - target) * (math.cos(math.pi * t) + 1) / 2


class EViT(Trainable):
    name = "evit"
    summary = "EViT: keep top-k tokens by CLS attention at blocks 4/7/10, fuse the rest (Liang et al. 2022)"
    options = {
        "keep": Option("float", 0.7, "fraction of non-prefix tokens kept at each reduction block"),
        "loc": Option("intlist", [3, 6, 9], "0-based indices of the reduction blocks"),
        "fuse": Option("bool", True, "fuse inattentive tokens into one extra token"),
        "shrink_start": Option("float", 0.0, "training: epochs at keep=1 before shrinking (official 300-ep recipe: 10)"),
        "shrink_epochs": Option("float", 0.0, "training: epochs of cosine decay 1 -> keep (official 300-ep recipe: 100)"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        self.current_keep = self.cfg["keep"]

    def validate_options(self):
        k = self.cfg["keep"]
        if not (0.0 < k <= 1.0):
            raise ConfigError(f"evit: keep must be in (0, 1], got {k}")
        if any(l < 0 for l in self.cfg["loc"]):
            raise ConfigError(f"evit: negative block index in loc={self.cfg['loc']}")
        if len(set(self.cfg["loc"])) != len(self.cfg["loc"]):
            raise ConfigError(f"evit: duplicate block index in loc={self.cfg['loc']}")

    def check(self, info: ModelInfo):
        bad = [l for l in self.cfg["loc"] if l >= info.depth]
        if bad:
            raise ConfigError(f"evit: block index {bad} past the model depth {info.depth} (valid 0..{info.depth - 1})")
        if not info.has_cls:
            raise ConfigError("evit: needs a CLS token (its attention row is the importance score)")

    # -- training schedule ------------------------------------------------------------------
    def on_step(self, model, epoch: float, num_epochs: float):
        self.current_keep = keep_rate_at(epoch, self.cfg["keep"], self.cfg["shrink_start"], self.cfg["shrink_epochs"])

    def _keep(self, training: bool, state: TokenState) -> float:
        # The scheduled keep rate applies to training steps, including EViT's fine-tuning, which
        # keeps the model in eval mode (train_mode=False): the trainer flags its steps explicitly
        # (docs/methods/evit.md §1.7).
        return self.current_keep if (training or state.train_step) else self.cfg["keep"]

    def recipe(self, info: ModelInfo) -> dict:
        """The official fine-tuning recipe (``finetune.sh``, 30 epochs from the DeiT checkpoint): lr
        2e-5 at global batch 512 (DeiT's scaling convention; not rescaled here), cosine to 2e-6, no
        warm-up, wd 1e-6, DeiT augmentation defaults (mixup 0.8, cutmix 1.0, smoothing 0.1), no
        distillation, and the model kept in eval mode (``set_training_mode = finetune == ''``: no
        drop-path / dropout).  The keep-rate warm-up is this reducer's ``shrink_start`` /
        ``shrink_epochs`` (official fine-tuning: 0 / 0, EViT#3; 300-epoch run: 10 / 100).
        See docs/methods/evit.md §4."""
        return {"epochs": 30.0, "lr": 2e-5, "min_lr": 2e-6, "warmup_epochs": 0.0, "weight_decay": 1e-6,
                "clip_grad": None, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "distill": "none",
                "train_mode": False}

    # -- hooks ---------------------------------------------------------------------------------
    def attn_request(self, i, block, x, state: TokenState) -> AttnRequest:
        if i in self.cfg["loc"] and self._keep(block.training, state) < 1.0:
            return AttnRequest(cls_attn=True)
        return AttnRequest()

    def post_attn(self, i, block, x, extras, state: TokenState):
        # keep ceil(keep * n) by CLS attention, fuse the rest: docs/methods/evit.md §1.3-1.5
        if "cls_attn" not in extras:
            return x
        p = state.n_prefix
        B, N, C = x.shape
        n = N - p
        left = keep_count(self._keep(block.training, state), n)
        if left >= n:
            return x
        cls_attn = extras["cls_attn"][:, p:]
        idx, kept = topk_keep(x, cls_attn, left, p)
        parts = [kept]
        if self.cfg["fuse"]:
            compl = complement_idx(idx, n)
            others = gather_tokens(x, compl + p)
            w = torch.gather(cls_attn, 1, compl)
            parts.append((others * w.unsqueeze(-1)).sum(dim=1, keepdim=True))
        if state.track:
            state.remap(x, keep_map(idx, N, p))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # -- declarations -----------------------------------------------------------------------
    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        # attention on n tokens, MLP on the kept (+ fused) tokens: docs/methods/evit.md §2
        out, n = [], info.n_tokens
        keep = self.cfg["keep"]
        for i in range(info.depth):
            n_mlp = n
            if i in self.cfg["loc"] and keep < 1.0:
                m = n - info.n_prefix
                left = keep_count(keep, m)
                if left < m:
                    n_mlp = info.n_prefix + left + (1 if self.cfg["fuse"] else 0)
            out.append(BlockTokens(n, n_mlp))
            n = n_mlp
        return out
