"""MSTM: "Multi-Scale And Token Mergence: Make Your ViT More Efficient" (Bian et al.,
arXiv 2306.04897): a documented **reconstruction**.

Only the paper's abstract is public and no code is known, so this module
implements ``docs/methods/mstm.md``: the abstract's facts plus the most
likely choice for every gap, each gap being an option so that a user holding
the paper can switch to its exact setting.  Tags as in docs/methods/mstm.md:

* [VERIFIED] token *pruning* in which non-crucial tokens are *merged into*
  crucial ones (the sequence gets shorter); crucial vs non-crucial by an
  importance score; the destination of a non-crucial token by a similarity
  score; multi-scale features fused *before* pruning; DeiT-S: about -33% FLOPs
  for -0.1% top-1.
* [INFERRED] pruning inside blocks 4/7/10 (``loc=[3,6,9]``) with ``keep=0.7``
  of the non-prefix tokens: the only standard schedule that lands on -33% for
  DeiT-S (4.60 -> 3.00 GMACs + the small fusion overhead).
* [UNKNOWN -> default] everything else:

  - where: EViT's place, after the attention residual and before the MLP, so
    the MLP already runs on the reduced set (``token_schedule`` as EViT);
  - importance: the CLS query's post-softmax attention over patch keys,
    averaged over heads (EViT; recomputed from the CLS query alone, so the
    fused SDPA kernel still serves the block); crucial = top-k with
    ``k = ceil(keep * (N - prefix))``, in descending-score order; CLS (and any
    prefix token) always kept;
  - similarity (``sim``): cosine of the attention keys averaged over heads
    (``keys``, ToMe's metric) | cosine of the block's token features
    (``features``);
  - assignment (``assign``): ``hard`` = each non-crucial token goes to its most
    similar crucial token | ``soft`` = spread over all crucial tokens with
    ``softmax(sim / tau)``;
  - merge rule: weighted average including the crucial token itself,
    ``x_i' = (w_i x_i + sum_{j->i} w_j x_j) / (w_i + sum_{j->i} w_j)`` with
    ``weights`` = ``importance`` (CLS attention) | ``size`` (patches a token
    stands for, ToMe) | ``mean`` (1);  ``merge=none`` drops them instead
    (plain pruning, the ablation baseline);
  - ``extra_token``: append EViT's fused token (raw-CLS-attention-weighted sum
    of the non-crucial tokens); off by default ("merged into crucial ones").
    ``merge=none,extra_token=true,multiscale=false`` is exactly EViT (tested);
    with ``merge=sim`` the extra token's size also counts the non-crucial
    patches, which the crucial tokens already carry (the only case where the
    sizes do not sum to the patch count);
  - multi-scale fusion (``multiscale``), docs/methods/mstm.md §2.4 design (a): once, at the
    input of block ``fuse_block`` (default: the first pruning block, when the
    patch tokens are still the full spatial grid), every ``s`` in ``scales``
    average-pools the patch grid by ``s`` (14x14 -> 7x7 for s=2; ``[2,4]`` adds
    a 3x3 scale), upsamples it back (``upsample``) and adds it through a
    zero-initialised learnable per-channel scale ``gamma_s`` (optionally after
    a linear layer, ``proj``), so the pretrained model is unchanged at start;
  - sizes (patches per token) and importance weights of merged tokens are
    carried forward (``state.size``, ``state.scratch['mstm_weight']``); a
    token merged at block 4 can be merged again later;  ``prop_attn`` adds
    ToMe's log(size) attention bias (off by default).

Dense prediction (Segmenter) is our extension, not the paper's: when the full grid is restored
(``restore``), a non-crucial token takes the features of the crucial token it merged into
(``merged``, default: ToMe's unmerge, consistent with "merged into crucial ones") or keeps its own
features from the merge block (``own``: EViT's rule for pruned tokens).  Measured on the proxy
Segmenter off the shelf (``reports/default/segmentation.md``), ``merged`` loses far more mIoU than
ToMe at the same keep rate: the crucial tokens are chosen by CLS attention, which a Segmenter does
not train, so whole regions get copied from dissimilar tokens; ``own`` is the option to compare.

FLOPs: ``token_schedule`` (as EViT, no extra token by default) plus
``extra_macs``: the fusion (pooling and scaling, the optional projection) and
the similarity matrices (the soft merge's matrix product when ``assign=soft``).
DeiT-S at the defaults: 2.997 G backbone + 0.001 G = 2.998 GMACs, -34.8% vs
4.599 (the abstract: about -33%).
The training recipe (docs/methods/mstm.md §2.5 suggestion) is EViT's fine-tuning recipe;
``fusion_lr_scale`` lets the new zero-initialised fusion learn faster than the
backbone's small fine-tuning lr [UNKNOWN, default 1].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.evit import complement_idx
from bench.core.patch import gather_tokens, reducer_modules
from bench.core.reducer import (AttnRequest, BlockTokens, ConfigError, ModelInfo, Option, TokenState, Trainable,
                                keep_count, keep_map)

_KEY = "mstm"


class MultiScaleFusion(nn.Module):
    """x_patch + sum_s gamma_s * up(pool_s(x_patch)) on the patch grid; gamma zero-initialised."""

    def __init__(self, dim: int, scales: list[int], proj: bool, upsample: str):
        super().__init__()
        self.scales = list(scales)
        self.upsample = upsample
        self.gamma = nn.Parameter(torch.zeros(len(scales), dim))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in scales) if proj else None

    @staticmethod
    def coarse_hw(grid: tuple[int, int], s: int) -> tuple[int, int]:
        return max(1, grid[0] // s), max(1, grid[1] // s)

    def forward(self, xp: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, n, C = xp.shape
        H, W = grid
        g = xp.transpose(1, 2).reshape(B, C, H, W)
        out = xp
        for j, s in enumerate(self.scales):
            c = F.adaptive_avg_pool2d(g, self.coarse_hw(grid, s))
            if self.proj is not None:
                h, w = c.shape[-2:]
                c = self.proj[j](c.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, h, w)
            kw = {"align_corners": False} if self.upsample == "bilinear" else {}
            up = F.interpolate(c, size=(H, W), mode=self.upsample, **kw)
            out = out + self.gamma[j] * up.flatten(2).transpose(1, 2)
        return out


def merge_into_crucial(x, w, size, idx, metric, assign: str = "hard", tau: float = 0.1):
    """Merge the non-crucial tokens of ``x`` into the crucial ones (pure function).

    x (B, n, C) patch tokens; w (B, n, 1) merge weights; size (B, n, 1);
    idx (B, k) crucial indices; metric (B, n, d) similarity features (None: no
    merge, the non-crucial tokens are dropped).  Returns the crucial tokens
    after merging (B, k, C), their sizes and weights (B, k, 1: the sums of the
    merged sizes / weights, so both totals are conserved) and the assignment
    (B, n-k) index of each non-crucial token's main destination (or None).
    """
    B, n, C = x.shape
    k = idx.shape[1]
    g = gather_tokens  # exact row copies
    xc, wc = g(x, idx), g(w, idx)
    sc = g(size, idx) if size is not None else None  # size None: not tracked (inference), size_new None
    if metric is None or k >= n:
        return xc, sc, wc, None
    compl = complement_idx(idx, n)
    xu, wu = g(x, compl), g(w, compl)
    su = g(size, compl) if size is not None else None
    m = metric / metric.norm(dim=-1, keepdim=True)
    sim = g(m, compl) @ g(m, idx).transpose(1, 2)  # (B, n-k, k)
    dest = sim.argmax(dim=-1)
    num, den = wc * xc, wc.clone()
    if assign == "hard":
        num = num.scatter_add(1, dest.unsqueeze(-1).expand(-1, -1, C), wu * xu)
        den = den.scatter_add(1, dest.unsqueeze(-1), wu)
        size_new = sc.scatter_add(1, dest.unsqueeze(-1), su) if sc is not None else None
    else:
        a = (sim / tau).softmax(dim=-1).transpose(1, 2)  # (B, k, n-k), columns sum to 1
        num = num + a @ (wu * xu)
        den = den + a @ wu
        size_new = sc + a @ su if sc is not None else None
    return num / den, size_new, den, dest


class MSTM(Trainable):
    name = "mstm"
    summary = ("MSTM (reconstruction): CLS-attention crucial tokens at blocks 4/7/10, non-crucial tokens merged "
               "into the most similar crucial one, multi-scale fusion before pruning (Bian et al. 2023)")
    # the defaults reconstruct the abstract's headline setting (about -33% FLOPs on DeiT-S)
    defaults_are_published = True
    report_notes = {
        "segmentation": "MSTM in a Segmenter is our extension: 'mstm' restores a merged token from the crucial token "
                        "it joined (ToMe-style unmerge), 'mstm (restore=own)' from its own features at the merge "
                        "(EViT-style)",
    }
    options = {
        "keep": Option("float", 0.7, "[INFERRED] fraction of non-prefix tokens kept (crucial) at each pruning block"),
        "loc": Option("intlist", [3, 6, 9], "[INFERRED] 0-based indices of the pruning blocks"),
        "merge": Option("str", "sim", "[UNKNOWN] sim: merge non-crucial into similar crucial tokens; none: drop",
                        choices=("sim", "none")),
        "sim": Option("str", "keys", "[UNKNOWN] similarity: cosine of head-averaged keys or of token features",
                      choices=("keys", "features")),
        "assign": Option("str", "hard", "[UNKNOWN] hard: most similar crucial token; soft: softmax(sim/tau)",
                         choices=("hard", "soft")),
        "tau": Option("float", 0.1, "[UNKNOWN] temperature of the soft assignment"),
        "weights": Option("str", "importance", "[UNKNOWN] merge weights: CLS importance, token size or plain mean",
                          choices=("importance", "size", "mean")),
        "extra_token": Option("bool", False, "[UNKNOWN] also append EViT's fused token of the non-crucial tokens"),
        "multiscale": Option("bool", True, "[VERIFIED idea, UNKNOWN design] multi-scale fusion before pruning"),
        "scales": Option("intlist", [2], "[UNKNOWN] pooling factors of the coarse scales ([2,4] adds a 4x4 scale)"),
        "upsample": Option("str", "nearest", "[UNKNOWN] upsampling of the coarse maps",
                           choices=("nearest", "bilinear")),
        "proj": Option("bool", False, "[UNKNOWN] a linear layer on each coarse scale before the fusion"),
        "fuse_block": Option("int", None, "[UNKNOWN] block whose input is fused (default: the first pruning "
                             "block; 0 = the embedding stage)", optional=True),
        "prop_attn": Option("bool", False, "[UNKNOWN] ToMe's log(size) attention bias after merging"),
        "fusion_lr_scale": Option("float", 1.0, "[UNKNOWN] lr multiplier of the new fusion parameters"),
        "restore": Option("str", "merged", "[EXTENSION, segmentation] full-grid restore of a non-crucial token: "
                          "merged = its crucial token's features (ToMe unmerge); own = its features at the merge",
                          choices=("merged", "own")),
    }

    # -- configuration -----------------------------------------------------------------------
    def validate_options(self):
        c = self.cfg
        if not (0.0 < c["keep"] <= 1.0):
            raise ConfigError(f"mstm: keep must be in (0, 1], got {c['keep']}")
        loc = c["loc"]
        if not loc or any(l < 0 for l in loc) or len(set(loc)) != len(loc):
            raise ConfigError(f"mstm: loc must be distinct non-negative block indices, got {loc}")
        if c["tau"] <= 0:
            raise ConfigError(f"mstm: tau must be > 0, got {c['tau']}")
        if c["fusion_lr_scale"] < 0:
            raise ConfigError(f"mstm: fusion_lr_scale must be >= 0, got {c['fusion_lr_scale']}")
        if c["multiscale"] and (not c["scales"] or any(s < 2 for s in c["scales"])):
            raise ConfigError(f"mstm: scales must be pooling factors >= 2, got {c['scales']}")
        if c["fuse_block"] is not None and not (0 <= c["fuse_block"] <= min(loc)):
            raise ConfigError(f"mstm: fuse_block={c['fuse_block']} must be in [0, {min(loc)}] "
                              "(fusion runs before the first pruning block, on the full patch grid)")

    def check(self, info: ModelInfo):
        bad = [l for l in self.cfg["loc"] if l >= info.depth]
        if bad:
            raise ConfigError(f"mstm: block index {bad} past the model depth {info.depth} "
                              f"(valid 0..{info.depth - 1})")
        if not info.has_cls:
            raise ConfigError("mstm: needs a CLS token (its attention row is the importance score)")
        if self.cfg["multiscale"]:
            too_big = [s for s in self.cfg["scales"] if s > min(info.grid)]
            if too_big:
                raise ConfigError(f"mstm: pooling factor(s) {too_big} larger than the patch grid {info.grid}")

    def fuse_at(self) -> Optional[int]:
        if not self.cfg["multiscale"]:
            return None
        return self.cfg["fuse_block"] if self.cfg["fuse_block"] is not None else min(self.cfg["loc"])

    def reduces(self) -> bool:
        return self.cfg["keep"] < 1.0

    # -- patching ------------------------------------------------------------------------------
    def on_patch(self, model, info: ModelInfo):
        if self.cfg["multiscale"]:
            p = next(model.parameters())
            reducer_modules(model)[_KEY] = MultiScaleFusion(
                info.dim, self.cfg["scales"], self.cfg["proj"], self.cfg["upsample"]).to(p.device, p.dtype)

    # -- hooks ----------------------------------------------------------------------------------
    def begin(self, model, x, state: TokenState):
        if self.cfg["multiscale"]:
            state.scratch["mstm_fusion"] = model.reducer_modules[_KEY]
        # token sizes are bookkeeping unless something reads them: the merge weights, the log-size
        # bias, size-weighted average pooling (bench.core.patch) or tracking (dense prediction, tests)
        c = self.cfg
        state.scratch["mstm_sizes"] = bool(state.track or c["weights"] == "size" or c["prop_attn"]
                                           or getattr(model, "global_pool", None) == "avg")

    def pre_block(self, i, block, x, state: TokenState):
        if i != self.fuse_at():
            return x
        p = state.n_prefix
        if x.shape[1] - p != state.grid[0] * state.grid[1]:
            raise RuntimeError("mstm: multi-scale fusion needs the full patch grid (fuse before any reduction)")
        fused = state.scratch["mstm_fusion"](x[:, p:], state.grid)
        return torch.cat([x[:, :p], fused], dim=1)

    def attn_request(self, i, block, x, state: TokenState) -> AttnRequest:
        bias = None
        if self.cfg["prop_attn"] and state.size is not None:
            bias = state.size.log()[:, None, None, :, 0]
        if i in self.cfg["loc"] and self.reduces():
            keys = self.cfg["merge"] == "sim" and self.cfg["sim"] == "keys"
            return AttnRequest(bias=bias, cls_attn=True, keys=keys)
        return AttnRequest(bias=bias)

    def post_attn(self, i, block, x, extras, state: TokenState):
        if "cls_attn" not in extras:
            return x
        c = self.cfg
        p = state.n_prefix
        B, N, C = x.shape
        n = N - p
        k = keep_count(c["keep"], n)
        if k >= n:
            return x
        s = extras["cls_attn"][:, p:]
        idx = torch.topk(s, k, dim=1, largest=True, sorted=True).indices
        rest = x[:, p:]
        sized = state.scratch.get("mstm_sizes", True)
        size = state.ensure_size(x)[:, p:] if sized else None
        if c["weights"] == "importance":
            w = s.unsqueeze(-1).to(x.dtype)
        elif c["weights"] == "size":
            w = size
        else:
            w = x.new_ones(B, n, 1)
        metric = None
        if c["merge"] == "sim":
            metric = extras["keys"][:, p:] if c["sim"] == "keys" else rest
        kept, size_k, weight_k, dest = merge_into_crucial(rest, w, size, idx, metric, c["assign"], c["tau"])
        parts, sizes = [x[:, :p], kept], ([state.size[:, :p], size_k] if sized else None)
        weights = [weight_k]
        if c["extra_token"]:
            compl = complement_idx(idx, n)
            others = gather_tokens(rest, compl)
            wu = torch.gather(s, 1, compl).unsqueeze(-1).to(x.dtype)
            parts.append((others * wu).sum(dim=1, keepdim=True))
            if sized:
                sizes.append(torch.gather(size, 1, compl.unsqueeze(-1)).sum(dim=1, keepdim=True))
            weights.append(wu.sum(dim=1, keepdim=True))
        if state.track:
            old_to_new = keep_map(idx, N, p)
            if dest is not None and c["restore"] == "merged":
                old_to_new.scatter_(1, complement_idx(idx, n) + p, p + dest)
            # else: -1, the token left the sequence and the restore keeps its features from here
            state.remap(x, old_to_new)
        if sized:
            state.size = torch.cat(sizes, dim=1)
        if state.track:  # carried merge weights: bookkeeping for inspection only
            state.scratch["mstm_weight"] = torch.cat(weights, dim=1)
        return torch.cat(parts, dim=1)

    # -- training ---------------------------------------------------------------------------------
    def param_group(self, name: str) -> str:
        return "fusion" if name.startswith("reducer_modules.") else "backbone"

    def lr_scale(self, group: str, epoch: float, num_epochs: float) -> float:
        return self.cfg["fusion_lr_scale"] if group == "fusion" else 1.0

    def lr_multiplier(self, name: str, epoch: float, num_epochs: float) -> float:
        return self.lr_scale(self.param_group(name), epoch, num_epochs)

    def recipe(self, info: ModelInfo) -> dict:
        """docs/methods/mstm.md §2.5 suggestion: EViT's fine-tuning recipe (``finetune.sh``) without distillation."""
        from baselines.evit import EViT

        return EViT().recipe(info)

    # -- declarations ------------------------------------------------------------------------------
    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        out, n = [], info.n_tokens
        for i in range(info.depth):
            n_mlp = n
            if i in self.cfg["loc"] and self.reduces():
                m = n - info.n_prefix
                left = keep_count(self.cfg["keep"], m)
                if left < m:
                    n_mlp = info.n_prefix + left + (1 if self.cfg["extra_token"] else 0)
            out.append(BlockTokens(n, n_mlp))
            n = n_mlp
        return out

    def fusion_macs(self, info: ModelInfo) -> int:
        """Pooling (one add per input element) and the gamma scaling per scale, plus the optional
        projection on the coarse tokens; the upsampling copy and the residual add are not counted."""
        if not self.cfg["multiscale"]:
            return 0
        n, C = info.n_patches, info.dim
        tot = 0
        for s in self.cfg["scales"]:
            h, w = MultiScaleFusion.coarse_hw(info.grid, s)
            tot += 2 * n * C + (h * w * C * C if self.cfg["proj"] else 0)
        return tot

    def merge_macs(self, info: ModelInfo) -> int:
        """Similarity matrices (and the soft merge's matrix products) at each pruning block."""
        if self.cfg["merge"] != "sim":
            return 0
        d = info.attn_dim // info.num_heads if self.cfg["sim"] == "keys" else info.dim
        tot = 0
        for i, bt in enumerate(self.token_schedule(info)):
            if bt.mlp == bt.attn:
                continue
            n = bt.attn - info.n_prefix
            k = keep_count(self.cfg["keep"], n)
            tot += (n - k) * k * d
            if self.cfg["assign"] == "soft":
                tot += (n - k) * k * (info.dim + 2)
        return tot

    def extra_macs(self, info: ModelInfo) -> int:
        return self.fusion_macs(info) + self.merge_macs(info)
