"""ToMe: Token Merging (Bolya et al., ICLR 2023), as in facebookresearch/ToMe.

Specification: docs/methods/tome.md (sources, deviations, options).

Per block, after the attention residual and before the MLP (docs/methods/tome.md §1.1-1.5):

1. the metric is the attention keys averaged over heads;
2. bipartite soft matching: tokens are split alternately into A (even
   indices) and B (odd), cosine similarities A·Bᵀ, each A token's best B
   partner; the r A tokens with the highest best-similarity are merged into
   their partners;  CLS is never a source, a distillation token never a
   destination; r is capped at (T - protected) // 2;
3. merged features are size-weighted averages, sizes add up;
4. proportional attention (on by default for supervised models): log(size) is
   added to the attention logits; here it is passed to the fused SDPA kernel
   as an additive mask, which is exactly ToMe's bias.

Token order after a merge follows the official code (docs/methods/tome.md §1.3):
[unmerged A (in index order when there is a CLS token), B]; with a distillation token CLS and dist
stay at 0 and 1.  The r schedule follows ``tome.utils.parse_r``: one value =
constant r, a list = per-layer r (padded with zeros), ``inflect`` = the
official (r, inflection) linear schedule (the paper's "decreasing" schedule is
``inflect=-1``; docs/methods/tome.md §1.6).  Source tracking is the shared grid tracking of
``bench.core.reducer.TokenState`` (each original token maps to exactly one current
token), used to unmerge for dense prediction (docs/methods/tome.md §1.10).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from bench.core.reducer import AttnRequest, BlockTokens, ConfigError, ModelInfo, Option, TokenState, Trainable


def parse_r(num_layers: int, r: list[int], inflect: Optional[float]) -> list[int]:
    """Per-layer r exactly as ``tome.utils.parse_r``: int, list, or (r, inflect) (docs/methods/tome.md §1.6)."""
    if len(r) > 1:
        return list(r) + [0] * (num_layers - len(r))
    r0 = r[0]
    infl = 0.0 if inflect is None else inflect
    min_val = int(r0 * (1.0 - infl))
    max_val = 2 * r0 - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


@functools.lru_cache(maxsize=256)
def _row_offsets(B: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, T, c) sequence flattened to B*T rows: ``(B, 1)`` offsets ``b*T`` of each image's first
    row, and ``(B, T // 2)`` the rows of the B tokens (``b*T + 2j + 1``).  Cached: every merge of a
    forward asks for the same few (B, T)."""
    offsets = (torch.arange(B, device=device) * T).unsqueeze(1)
    return offsets, offsets + (2 * torch.arange(T // 2, device=device) + 1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool,
                            with_map: bool = True):
    """ToMe's matching (pure function; docs/methods/tome.md §1.3-1.4).

    Returns ``(merge, old_to_new)`` where ``merge(x, mode)`` merges a (B, T, C) tensor and
    ``old_to_new`` (B, T) gives each old token's new index, or ``(None, None)`` when nothing can be
    merged.  The index map only serves source tracking (dense prediction, visualisation): with
    ``with_map=False`` (inference) it is not built and ``old_to_new`` is None.

    ``merge`` computes exactly the official ``[unm, dst.scatter_reduce(src)]`` (bit for bit) as one
    row gather of the whole sequence in the order [kept..., sources...] and one ``scatter_reduce_`` of
    the sources into the destination part of the kept rows, in the official source order (no
    concatenation, no copy of ``dst``).  The result is a view with the sequence's batch stride.
    """
    protected = int(class_token) + int(distill_token)
    B, T = metric.shape[0], metric.shape[1]
    r = min(r, (T - protected) // 2)
    if r <= 0:
        return None, None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :].fill_(-math.inf)
        if distill_token:
            scores[..., :, 0].fill_(-math.inf)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, t1): A tokens, best edge first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)

    t1 = (T + 1) // 2
    t2 = T // 2
    n_unm = t1 - r
    offsets, b_rows = _row_offsets(B, T, metric.device)
    # The rows of the flattened sequence (A token j of image b is row b*T + 2j, B token j row
    # b*T + 2j + 1) in the order [unmerged A..., B..., sources...]: a single row gather in that
    # order gives the output's kept rows followed by the r sources, so the sources are added in place
    # (no second gather, no cat).  ToMe keeps the unmerged A tokens in index order when there is a CLS
    # token; sorting their rows sorts their indices (same offset within an image).
    a_rows = torch.add(offsets, edge_idx, alpha=2)
    unm_rows = a_rows[:, r:].sort(dim=1)[0] if class_token else a_rows[:, r:]
    rows = torch.cat([unm_rows, b_rows, a_rows[:, :r]], dim=1).reshape(-1)
    dst_out = dst_idx + n_unm  # the destination's index in the output

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        c = x.shape[-1]  # x has the metric's batch and tokens: (B, T, c)
        seq = x.reshape(B * T, c).index_select(0, rows).view(B, T, c)
        out, src = seq[:, :T - r], seq[:, T - r:]
        if src.requires_grad:  # training: autograd keeps the sources, which the in-place add would overwrite
            src = src.clone()
        out.scatter_reduce_(-2, dst_out.unsqueeze(-1).expand(B, r, c), src, reduce=mode)
        if distill_token:  # [unm0, dst0, unm1.., dst1..]: CLS and the distillation token stay at 0 and 1
            return torch.cat([out[:, :1], out[:, n_unm:n_unm + 1], out[:, 1:n_unm], out[:, n_unm + 1:]], dim=1)
        return out

    if not with_map:
        return merge, None
    # old index -> new index (for source tracking / unmerging)
    dev = metric.device
    unm_idx = (unm_rows - offsets).div_(2, rounding_mode="floor")  # back from rows to A indices
    a_new = torch.empty(B, t1, dtype=torch.long, device=dev)
    a_new.scatter_(1, unm_idx, torch.arange(n_unm, device=dev).expand(B, -1))
    a_new.scatter_(1, src_idx, dst_out)
    b_new = (n_unm + torch.arange(t2, device=dev)).expand(B, -1)
    old_to_new = torch.empty(B, T, dtype=torch.long, device=dev)
    old_to_new[:, ::2] = a_new
    old_to_new[:, 1::2] = b_new
    if distill_token:
        # standard order [unm..., dst...] -> [unm0, dst0, unm1.., dst1..]
        n_new = n_unm + t2
        perm = torch.empty(n_new, dtype=torch.long, device=dev)
        perm[0] = 0
        perm[n_unm] = 1
        perm[1:n_unm] = torch.arange(2, n_unm + 1, device=dev)
        perm[n_unm + 1:] = torch.arange(n_unm + 1, n_new, device=dev)
        old_to_new = perm[old_to_new]
    return merge, old_to_new


def merge_wavg(merge, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Size-weighted average merge (docs/methods/tome.md §1.4); returns merged x and merged sizes.
    ``size=None`` means every token has size 1 (the first merge): ``x * 1`` is ``x`` bit for bit, so
    that product is skipped."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        x = merge(x, mode="sum")
    else:
        x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


class ToMe(Trainable):
    name = "tome"
    summary = "Token Merging: bipartite soft matching on keys, r merges per block (Bolya et al. 2023)"
    options = {
        "r": Option("intlist", [13], "tokens merged per block: one value (constant) or a per-layer list"),
        "inflect": Option("float", None, "official (r, inflect) schedule; -1 = the paper's decreasing schedule",
                          optional=True),
        "prop_attn": Option("bool", True, "proportional attention (log size bias); off for MAE models"),
    }

    def validate_options(self):
        r = self.cfg["r"]
        if not r or any(v < 0 for v in r):
            raise ConfigError(f"tome: r must be >= 0, got {r}")
        if len(r) > 1 and self.cfg["inflect"] is not None:
            raise ConfigError("tome: inflect applies to a single r, not a per-layer list")

    def format_option(self, key, value) -> str:
        if key == "r" and len(value) == 1:
            return str(value[0])
        return super().format_option(key, value)

    def check(self, info: ModelInfo):
        if info.n_prefix != int(info.has_cls) + int(info.has_dist):
            raise ConfigError("tome: only CLS and distillation prefix tokens are supported (no register tokens)")
        if len(self.cfg["r"]) > info.depth:
            raise ConfigError(f"tome: {len(self.cfg['r'])} per-layer r values for a {info.depth}-block model")
        rs = parse_r(info.depth, self.cfg["r"], self.cfg["inflect"])
        limit = (info.n_tokens - info.n_prefix) // 2
        if max(rs) > limit:
            raise ConfigError(
                f"tome: r={max(rs)} exceeds what one block can merge ({limit} = half of the "
                f"{info.n_tokens - info.n_prefix} non-prefix tokens); choose r <= {limit}"
            )
        if min(rs) < 0:
            raise ConfigError(f"tome: the schedule gives negative r: {rs}")

    def schedule(self, depth: int) -> list[int]:
        return parse_r(depth, self.cfg["r"], self.cfg["inflect"])

    def recipe(self, info: ModelInfo) -> dict:
        """The released DeiT+ToMe models were trained with the official DeiT recipe with merging
        active (``prop_attn`` on, this reducer's default): 300 epochs, AdamW, lr 5e-4 at global batch
        512 (not rescaled here), 5 warm-up epochs, cosine to 1e-5, wd 0.05, mixup 0.8, cutmix 1.0,
        smoothing 0.1, ``model.train()`` (tokens are merged in training exactly as at inference);
        docs/methods/tome.md §4."""
        return {"epochs": 300.0, "lr": 5e-4, "min_lr": 1e-5, "warmup_epochs": 5.0, "weight_decay": 0.05,
                "clip_grad": None, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "distill": "none",
                "train_mode": True}

    # -- hooks -------------------------------------------------------------------------
    def begin(self, model, x, state: TokenState):
        state.scratch["r"] = self.schedule(len(model.blocks))
        state.scratch["cls"] = getattr(model, "cls_token", None) is not None
        state.scratch["dist"] = getattr(model, "dist_token", None) is not None

    def attn_request(self, i, block, x, state: TokenState) -> AttnRequest:
        bias = None
        if self.cfg["prop_attn"] and state.size is not None:
            bias = state.size.log()[:, None, None, :, 0]
        return AttnRequest(bias=bias, keys=state.scratch["r"][i] > 0)

    def post_attn(self, i, block, x, extras, state: TokenState):
        r = state.scratch["r"][i]
        if r <= 0:
            return x
        merge, old_to_new = bipartite_soft_matching(
            extras["keys"], r, state.scratch["cls"], state.scratch["dist"], with_map=state.track
        )
        if merge is None:
            return x
        if state.track:  # the index map only serves source tracking; inference skips it
            state.remap(x, old_to_new)
        x_new, state.size = merge_wavg(merge, x, state.size)
        return x_new

    # -- declarations --------------------------------------------------------------------
    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        # attention on n tokens, MLP on n - r (merging sits between them): docs/methods/tome.md §2
        out, n = [], info.n_tokens
        for r in self.schedule(info.depth):
            r_eff = max(0, min(r, (n - info.n_prefix) // 2))
            out.append(BlockTokens(n, n - r_eff))
            n -= r_eff
        return out
