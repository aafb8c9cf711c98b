"""Prune and Merge (PM-ViT, Mao et al., arXiv 2503.23455) as a ``bench`` reducer.

Every compressed block l (all blocks by default) runs, on the full token
sequence x (B, N, D) in raster order (docs/methods/pm.md §1.1)::

    y   = M_l x                       (C_l tokens: prefix + centres, merged segments)
    y   = y + Attn(LN(y)); y = y + MLP(LN(y))     (the shared block; fused SDPA at inference)
    out = R_l y + diag(1 - m_l) x     (back to N tokens; pruned tokens skip the block)

M_l (C_l x N) and R_l (N x C_l) are ``nn.Parameter``s under
``model.reducer_modules['pm']`` (trained and saved with the model); the
structure (centres, pruned masks, scores) comes from calibration
(:mod:`pm.calibrate`) and travels through :meth:`export_state` /
:meth:`import_state` (or :meth:`load_structure` from a checkpoint file).

Implementations (``impl``), all computing the formula above:

* ``dense``  the official formulation: ``tensordot`` with M, R and a dense
  N x N ``diag(1 - m)`` for the shortcut (reference only);
* ``matmul`` M x and R y as matmuls, shortcut by index arithmetic (exact for
  any M, R, also after fine-tuning that fills M densely);
* ``gather`` uses the disjoint row supports: merge = weighted ``index_add``
  of the supported tokens, reconstruct = one gather and a scale, shortcut =
  a masked select.  Exact only while M and R are zero off the support;
* ``auto`` (default) ``gather`` whenever it is exact (checked on the current
  parameter values, cached per parameter version), else ``matmul``; with
  ``support=free`` training uses ``matmul`` so every matrix entry receives
  gradients as in the official code.

``support``: ``free`` (official: M and R are dense trainable matrices; any
entry may become non-zero during fine-tuning) or ``fixed`` (only the
initial support is trained: the static sparsity, and so the fast gather
path, survives fine-tuning; a deviation, named).

Without a calibrated structure the reducer uses a *uniform* structure
(``int(n*keep)`` evenly spread centres per layer; labelled ``uniform
(uncalibrated)`` in reports): it serves FLOPs and speed measurements of
uncalibrated models only.  keep=1, prune=0 gives M = R = I, the unreduced
model (the official pre-calibration state).

Ablation options (docs/methods/pm.md §3.4 lists the paper's ablations; none are in the
released code): ``score`` (grad | cls_attn | random), ``structure``
(global | local), ``assign`` (raster | grid2d), ``merge`` (false: non-centres
are pruned instead of merged), ``shortcut`` (false: pruned tokens leave the
output, zero rows), ``trainable`` (false: frozen M and R).

Fine-tuning (docs/methods/pm.md §1.9, §5.9-10): self-distillation from the unreduced model
(CE + alpha*KL*tau^2, alpha 0.8 for DeiT-T width, else 1, tau 20); one
learning-rate schedule for all parameter groups by default; ``lr_quirk=true``
reproduces the released code's groups (every >=2-D weight, M and R included,
at a constant 1e-6; biases/norms/embeddings follow the cosine).

Resolutions of docs/methods/pm.md §5: (1) merge and restore inside every block (no staged
mode); (2) ``tm_prune_merge_to_center`` semantics; (3) Taylor score as in
:mod:`pm.calibrate`; (4) decay 0.025*l (option ``decay``); (5) keep/prune are
global fractions over the compressed layers; (6) raster assignment with the
ceil midpoint, row truncation and the last-column off-by-one (``grid2d`` is
the named alternative); (7) score-ratio weights, no row normalisation, the
dead log-sqrt attention bias is not applied; (8) R = pinv(M); (9) one lr
schedule by default, ``lr_quirk`` for the released behaviour; (10) recipe in
:meth:`PruneAndMerge.recipe`; (12) per-layer counts come from calibration
(reported by ``pm-calibrate``); (13) both FLOPs conventions in
:meth:`PruneAndMerge.flops_report`; (17) at least ``min_centers`` centres per
layer; (18) scores all-reduced across ranks.  (11, 14-16: evaluation, timing
and segmentation protocols live in the shared harness.)
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from bench.runtime.checkpoint import load_structure
from bench.core.reducer import (PAPER_COUNT, AttnRequest, BlockTokens, Calibrated, ConfigError, ModelInfo, Option,
                                TokenState, Trainable)

from . import matrices, structure
from .calibrate import collect_scores

STATE_FORMAT = "pm-structure/1"
NO_DECAY_KEYS = ("bias", "pos_embed", "cls_token", "dist_token", "reg_token", "gamma")
# implementation() labels: which M/R product inference runs in the compressed blocks
_MATRICES = {("gather",): "sparse (gather)", ("matmul",): "dense (matmul)", ("dense",): "dense (official diag)",
             ("gather", "matmul"): "sparse + dense (per block)"}


class PMMatrices(nn.Module):
    """Merge / reconstruct parameters of all compressed layers (keys are block indices)."""

    def __init__(self):
        super().__init__()
        self.merge = nn.ParameterDict()
        self.recover = nn.ParameterDict()


class _Layer:
    """Per-layer index tensors derived from the structure (not saved)."""

    def __init__(self, s: structure.LayerStructure, M: torch.Tensor, n_prefix: int):
        seg, pruned = matrices.support(M, n_prefix)
        self.C = M.shape[0]
        self.N = M.shape[1]
        self.seg = seg  # (N,) row of M per token, -1 pruned
        self.pruned = pruned  # (N,) bool
        self.cols = torch.nonzero(~pruned).flatten()  # supported tokens
        self.rows = seg[self.cols]
        self.segc = seg.clamp(min=0)
        self.pruned_idx = torch.nonzero(pruned).flatten()
        self.keep_mask = (~pruned).to(torch.float32)  # m_l of the official code
        self.arange = torch.arange(self.N)
        self.support_mask_M = torch.zeros(self.C, self.N, dtype=torch.bool)
        self.support_mask_M[self.rows, self.cols] = True
        self._dev = torch.device("cpu")

    def to(self, device):
        if self._dev != device:
            for k in ("seg", "pruned", "arange", "cols", "rows", "segc", "pruned_idx", "keep_mask", "support_mask_M"):
                setattr(self, k, getattr(self, k).to(device))
            self._dev = device
        return self


class PruneAndMerge(Calibrated, Trainable):
    name = "pm"
    summary = ("Prune and Merge: static per-layer merge/reconstruct matrices + shortcut, "
               "gradient-weighted global structure (Mao et al. 2025)")
    needs_training = False
    # docs/proxy.md: on a real pretrained ViT-Ti/16 (AugReg) keep 0.6 calibrated lost 19.8 points
    # before fine-tuning, the official code giving the same scores, structure and matrices
    off_the_shelf_note = ("calibrated, not fine-tuned: on real pretrained ViTs this loses heavily before "
                          "fine-tuning (ViT-Ti/16 keep 0.6: -19.8 points, docs/proxy.md)")
    needs_teacher = False  # distillation goes through the trainer's soft KD (recipe)
    structure_name = "PM structure"
    default_structure = "PM's uniform structure (int(N*keep) evenly spread centres in every compressed block)"
    paper_count_sources = ("PM README",)  # GFLOPs by the official code's formula (docs/methods/pm.md §1.4)
    report_notes = {
        "flops": "paper_count_gmacs of PM rows: the PM README's convention, the official code's formula (no patch "
                 "embedding, merge/reconstruct excluded)",
        "published": "PM: the PM README counts with the official code's formula (ours_count: method paper's rule)",
        "segmentation": "PM rows: calibrated with PM-Segmenter's settings (per-layer keep, no pruning, frozen M/R)",
        "ablations": "the Prune and Merge ablations of the paper's table 3, all at keep 0.6; fine-tuning is PM's "
                     "self-distillation recipe",
        "learned_structure": "PM rows: tokens = centres + CLS processed by each block; global rule: "
                             "sum = L*int(196*keep) + L (up to ties)",
        "accuracy": "structure (PM rows): calibrated = PM's calibrated structure with its calibrated merge/"
                    "reconstruct matrices M, R (sparse: each token feeds one centre; the off-the-shelf rows); "
                    "fine-tuned = the same structure with the fine-tuned checkpoint's M, R (free fine-tuning "
                    "fills them densely, so they run as dense matmuls and cost more). gmacs = the row's own "
                    "model ({model}) as it runs; speedup = the row's own matrices at the speed stage's size "
                    "(fine-tuned rows: the fine-tuned M, R transplanted, see the flops and throughput tables)",
        "structure": "structure (PM rows): calibrated = PM's calibrated structure with the merge/reconstruct "
                     "matrices M, R as calibration builds them (each token feeds one centre: sparse gather, the "
                     "off-the-shelf model); fine-tuned = the same structure with the fine-tuned checkpoint's M, R "
                     "(free fine-tuning, the official setting, makes them dense, so merge and reconstruct run as "
                     "matmuls: 2*C*N*D MACs per block), i.e. the cost of the fine-tuned model; implementation = the "
                     "merge/reconstruct implementation each row runs",
    }
    options = {
        "keep": Option("float", 0.6, "fraction of the patch tokens kept as centres, averaged over compressed layers"),
        "prune": Option("float", 0.1, "fraction of (token, layer) pairs pruned (shortcut past the block)"),
        "layers": Option("intlist", None, "0-based compressed blocks (default: all)", optional=True),
        "assign": Option("str", "raster", "merge assignment: raster (official) | grid2d (2-D nearest centre)",
                         choices=("raster", "grid2d")),
        "structure": Option("str", "global", "thresholds: global (official) | local (per layer, ablation)",
                            choices=("global", "local")),
        "score": Option("str", "grad", "token score: grad (official Taylor) | cls_attn | random (ablations)",
                        choices=("grad", "cls_attn", "random")),
        "merge": Option("bool", True, "merge non-centres into centres (false: prune them, ablation)"),
        "shortcut": Option("bool", True, "pruned tokens bypass the block (false: dropped, ablation)"),
        "trainable": Option("bool", True, "train M and R during fine-tuning"),
        "support": Option("str", "free", "free (official: dense M,R trained) | fixed (train the initial support only)",
                          choices=("free", "fixed")),
        "impl": Option("str", "auto", "auto | gather | matmul | dense (official diag formulation)",
                       choices=("auto", "gather", "matmul", "dense")),
        "lr_quirk": Option("bool", False, "reproduce the released code's LR groups (>=2-D weights at 1e-6)"),
        "decay": Option("float", 0.025, "depth decay of the scores, S' = S * (1 - decay * l)"),
        "min_centers": Option("int", 1, "minimum centres per layer (docs/methods/pm.md §5.17)"),
        "seed": Option("int", 0, "seed of score=random"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        self.structs: Optional[list[structure.LayerStructure]] = None
        self.raw_scores: Optional[torch.Tensor] = None
        self.source = "none"
        self.meta: dict = {}
        self._geom: Optional[dict] = None  # n_patches, grid, n_prefix, depth of the imported structure
        self._auto = False  # structure generated data-free (uniform / identity) for the patched model
        self._layers: dict[int, _Layer] = {}
        self._mats: Optional[PMMatrices] = None
        self._calib = None  # the score accumulator while calibrating (see scoring())
        self._exact_cache: dict = {}
        self.base_lr: Optional[float] = None
        self.min_lr: float = 1e-6

    # -- configuration -----------------------------------------------------------------------
    def validate_options(self):
        k, p = self.cfg["keep"], self.cfg["prune"]
        if not (0.0 < k <= 1.0):
            raise ConfigError(f"pm: keep must be in (0, 1], got {k}")
        if not (0.0 <= p < 1.0):
            raise ConfigError(f"pm: prune must be in [0, 1), got {p}")
        if k + p > 1.0 + 1e-9:
            raise ConfigError(f"pm: keep + prune must be <= 1 (a token cannot be both kept and pruned), got {k}+{p}")
        if self.cfg["min_centers"] < 1:
            raise ConfigError("pm: min_centers must be >= 1")
        ls = self.cfg["layers"]
        if ls is not None and (len(set(ls)) != len(ls) or any(l < 0 for l in ls) or not ls):
            raise ConfigError(f"pm: layers must be distinct non-negative block indices, got {ls}")

    def check(self, info: ModelInfo):
        ls = self.cfg["layers"]
        if ls is not None and max(ls) >= info.depth:
            raise ConfigError(f"pm: block index {max(ls)} past the model depth {info.depth} (valid 0..{info.depth - 1})")
        if int(info.n_patches * self.cfg["keep"]) < 1:
            raise ConfigError(f"pm: keep={self.cfg['keep']} leaves no centre out of {info.n_patches} patches")
        if self._geom is not None and not self._auto:
            g = self._geom
            want = {"n_patches": info.n_patches, "grid": list(info.grid), "n_prefix": info.n_prefix,
                    "depth": info.depth}
            bad = {k: (g[k], v) for k, v in want.items() if g[k] != v}
            if bad:
                raise ConfigError(
                    "pm: the checkpoint's structure does not match this model ("
                    + ", ".join(f"{k}: checkpoint {a}, model {b}" for k, (a, b) in bad.items())
                    + "); use the model (and input size) the checkpoint was calibrated on, or re-run pm-calibrate")

    def compressed_layers(self, depth: int) -> list[int]:
        if self.structs is not None:
            return [s.layer for s in self.structs]
        return structure.resolve_layers(self.cfg["layers"], depth)

    # -- structure -----------------------------------------------------------------------------
    def set_structure(self, structs, info: ModelInfo, source: str, raw_scores=None, meta=None) -> None:
        self._auto = False
        self.structs = list(structs)
        self.source = source
        self.raw_scores = None if raw_scores is None else raw_scores.detach().double().cpu()
        self.meta = dict(meta or {})
        self._geom = {"n_patches": info.n_patches, "grid": list(info.grid), "n_prefix": info.n_prefix,
                      "depth": info.depth}

    def structure_from_scores(self, scores: torch.Tensor, info: ModelInfo, meta=None) -> list:
        """Run the structure search on accumulated raw scores (depth, n) and adopt it."""
        layers = structure.resolve_layers(self.cfg["layers"], info.depth)
        st = structure.search(scores, layers, self.cfg["keep"], self.cfg["prune"], mode=self.cfg["structure"],
                              decay=self.cfg["decay"], min_centers=self.cfg["min_centers"], merge=self.cfg["merge"])
        m = {"keep": self.cfg["keep"], "prune": self.cfg["prune"], "merge": self.cfg["merge"],
             "structure": self.cfg["structure"], "score": self.cfg["score"], **(meta or {})}
        self.set_structure(st, info, "calibrated", scores, m)
        return st

    def export_state(self) -> dict:
        if self.structs is None or self._auto:
            return {}
        return {
            "format": STATE_FORMAT,
            "source": self.source,
            "geometry": dict(self._geom),
            "structs": [s.to_dict() for s in self.structs],
            "raw_scores": self.raw_scores,
            "meta": dict(self.meta),
        }

    def import_state(self, state: dict) -> None:
        if not state:
            return
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"pm: not a PM structure (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        self.structs = [structure.LayerStructure.from_dict(d) for d in state["structs"]]
        self._auto = False
        self.source = state.get("source", "checkpoint")
        self._geom = dict(state["geometry"])
        rs = state.get("raw_scores")
        self.raw_scores = None if rs is None else torch.as_tensor(rs).double()
        self.meta = dict(state.get("meta", {}))
        diff = [f"{k}: checkpoint {self.meta[k]}, spec {self.cfg[k]}" for k in ("keep", "prune", "merge")
                if k in self.meta and self.meta[k] != self.cfg[k]]
        if diff:
            raise ConfigError("pm: the checkpoint's structure was calibrated with other settings ("
                              + "; ".join(diff) + "); use the checkpoint's spec or re-run pm-calibrate")

    def load_structure(self, path) -> None:
        """Structure from a checkpoint file (``pmbench flops/speed --checkpoint``)."""
        load_structure(self, path)

    def structure_in(self, checkpoint) -> Optional[dict]:
        return find_state(checkpoint)

    # -- calibration (the Calibrated capability) -----------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self.structs is not None and not self._auto

    def calibrate(self, model, batches, info: ModelInfo, *, loss_fn=None, iters=None, device=None,
                  progress=None, meta=None, **options) -> dict:
        """Gradient-weighted scores on ``batches`` (:func:`pm.calibrate.collect_scores`; ``options``:
        ``max_images``, ``opt_step``, ``lr``, ``weight_decay``), then the structure search.  The caller
        re-patches the model so M and R are rebuilt from the new structure."""
        scores, m = collect_scores(model, self, batches, info, iters=iters, device=device, progress=progress,
                                   loss_fn=loss_fn, **options)
        self.structure_from_scores(scores, info, {**m, **(meta or {})})
        out = self.per_layer()
        out["calibration"] = m
        return out

    @contextlib.contextmanager
    def scoring(self, accumulator):
        """While active the blocks run unreduced and every attention reports its probabilities to
        ``accumulator.request(i)`` (calibration)."""
        self._calib = accumulator
        try:
            yield accumulator
        finally:
            self._calib = None

    # -- patching ---------------------------------------------------------------------------------
    def on_patch(self, model, info: ModelInfo) -> None:
        from bench.core.patch import reducer_modules

        if self.structs is None or self._auto:  # data-free structure, rebuilt for every model
            layers = structure.resolve_layers(self.cfg["layers"], info.depth)
            k, p = self.cfg["keep"], self.cfg["prune"]
            src = "identity" if (int(info.n_patches * k) == info.n_patches and int(info.n_patches * p) == 0) \
                else "uniform (uncalibrated)"
            self.set_structure(structure.uniform(info.n_patches, layers, k, p, merge=self.cfg["merge"]), info, src)
            self._auto = True
        self.check(info)
        ref = next(model.parameters())
        mats = PMMatrices()
        self._layers = {}
        width = info.grid[1]
        # Normal tensors even when patched (or loaded) inside torch.inference_mode(): M and R stay
        # trainable and keep their version counters (the gather/matmul choice is cached on them).
        with torch.inference_mode(False):
            for s in self.structs:
                M = matrices.merge_matrix(s.centers, s.pruned, s.score, width, info.n_prefix, self.cfg["assign"])
                R = matrices.reconstruct_matrix(M)
                self._layers[s.layer] = _Layer(s, M, info.n_prefix)
                tr = self.cfg["trainable"]
                mats.merge[str(s.layer)] = nn.Parameter(M.to(ref.dtype).to(ref.device), requires_grad=tr)
                mats.recover[str(s.layer)] = nn.Parameter(R.to(ref.dtype).to(ref.device), requires_grad=tr)
        reducer_modules(model)["pm"] = mats
        self._mats = mats
        self._exact_cache = {}

    def on_unpatch(self, model) -> None:
        self._mats = None
        self._layers = {}

    # -- the PM block -------------------------------------------------------------------------------
    def _impl(self, i: int, training: bool) -> str:
        impl = self.cfg["impl"]
        if impl != "auto":
            return impl
        if self.cfg["support"] == "fixed":
            return "gather"
        if training and torch.is_grad_enabled() and self.cfg["trainable"]:
            return "matmul"  # every entry of M and R gets its gradient, as in the official code
        return "gather" if self._gather_exact(i) else "matmul"

    def _gather_exact(self, i: int) -> bool:
        M, R = self._mats.merge[str(i)], self._mats.recover[str(i)]
        # inference tensors (e.g. M, R replaced by a load with assign=True inside inference_mode)
        # have no version counter: check them every time instead of caching
        key = None if (M.is_inference() or R.is_inference()) else (M._version, R._version, M.data_ptr(), R.data_ptr())
        if key is not None and self._exact_cache.get(i, (None,))[0] == key:
            return self._exact_cache[i][1]
        lay = self._layers[i].to(M.device)
        with torch.no_grad():
            ok = not M.masked_fill(lay.support_mask_M, 0).any().item()
            ok = ok and not R.masked_fill(lay.support_mask_M.t(), 0).any().item()
        self._exact_cache[i] = (key, ok)
        return ok

    def _support_weights(self, i: int, lay, dtype):
        """Inference bookkeeping of the gather path, computed once per parameter version: the merge
        weights ``M[rows, cols]`` and the reconstruct weights ``R[n, seg(n)] * m_n`` (the same numbers
        the per-forward indexing gives)."""
        M, R = self._mats.merge[str(i)], self._mats.recover[str(i)]
        cache = self.__dict__.setdefault("_weights_cache", {})
        key = None if (M.is_inference() or R.is_inference()) else \
            (M._version, R._version, M.data_ptr(), R.data_ptr(), dtype)
        hit = cache.get(i)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            w = (M[lay.rows, lay.cols].to(dtype),
                 R[lay.arange, lay.segc].to(dtype) * lay.keep_mask.to(dtype))
        if key is not None:
            cache[i] = (key, w)
        return w

    def pre_block(self, i, block, x, state: TokenState):
        if self._calib is not None or i not in self._layers:
            return x
        lay = self._layers[i].to(x.device)
        M = self._mats.merge[str(i)]
        impl = self._impl(i, block.training)
        state.scratch["pm"] = (x, impl)
        if impl == "gather":
            w = self._support_weights(i, lay, x.dtype)[0] if not torch.is_grad_enabled() else \
                M[lay.rows, lay.cols].to(x.dtype)
            src = x.index_select(1, lay.cols) * w[:, None]
            return x.new_zeros(x.shape[0], lay.C, x.shape[2]).index_add_(1, lay.rows, src)
        if impl == "dense":
            return torch.tensordot(x, M.to(x.dtype), dims=([1], [1])).transpose(1, 2)
        return torch.matmul(M.to(x.dtype), x)

    def post_block(self, i, block, y, state: TokenState):
        if self._calib is not None or i not in self._layers:
            return y
        x, impl = state.scratch.pop("pm")
        lay = self._layers[i]
        R = self._mats.recover[str(i)]
        sc = self.cfg["shortcut"]
        if impl == "gather":
            if not torch.is_grad_enabled():  # inference: cached weights; pruned rows copied, not selected
                w = self._support_weights(i, lay, y.dtype)[1]
                out = y.index_select(1, lay.segc) * w[:, None]
                if sc and lay.pruned_idx.numel():
                    out.index_copy_(1, lay.pruned_idx, x.index_select(1, lay.pruned_idx))
                return out
            w = R[lay.arange, lay.segc].to(y.dtype) * lay.keep_mask.to(y.dtype)
            out = y.index_select(1, lay.segc) * w[:, None]
            if sc and lay.pruned_idx.numel():
                out = torch.where(lay.pruned[:, None], x, out)
            return out
        if impl == "dense":
            out = torch.tensordot(y, R.to(y.dtype), dims=([1], [1])).transpose(1, 2)
            if sc:
                diag = torch.diag(1.0 - lay.keep_mask).to(x.dtype)
                out = out + torch.tensordot(x, diag, dims=([1], [1])).transpose(1, 2)
            return out
        out = torch.matmul(R.to(y.dtype), y)
        if sc and lay.pruned_idx.numel():
            out = out.index_add(1, lay.pruned_idx, x.index_select(1, lay.pruned_idx))
        return out

    def attn_request(self, i, block, x, state: TokenState) -> AttnRequest:
        if self._calib is not None:
            return self._calib.request(i)
        return AttnRequest()

    # -- FLOPs ------------------------------------------------------------------------------------------
    def tokens_per_block(self, info: ModelInfo) -> list[int]:
        n = info.n_tokens
        counts = [n] * info.depth
        if self.structs is None or self._auto:  # data-free structure, rebuilt for every model
            layers = structure.resolve_layers(self.cfg["layers"], info.depth)
            c = info.n_prefix + len(structure.uniform(info.n_patches, [0], self.cfg["keep"], 0.0)[0].centers)
            for l in layers:
                counts[l] = c
        else:
            for s in self.structs:
                counts[s.layer] = info.n_prefix + s.n_centers
        return counts

    def token_schedule(self, info: ModelInfo) -> list[BlockTokens]:
        return [BlockTokens(c, c) for c in self.tokens_per_block(info)]

    def _inference_impl(self, i: int) -> str:
        if self._mats is None:
            return "gather" if self.cfg["impl"] == "auto" else self.cfg["impl"]
        return self._impl(i, training=False)

    def implementation(self, info: ModelInfo) -> Optional[str]:
        """The merge/reconstruct implementation inference runs (sparse gather where M, R kept the
        calibrated support, dense matmul where fine-tuning filled them)."""
        impl = self._inference_impls(info.depth)
        return _MATRICES.get(impl, "+".join(impl)) if impl else None

    def _inference_impls(self, depth: int) -> tuple:
        """The M/R implementations the compressed blocks run at inference, sorted, each once."""
        return tuple(sorted({self._inference_impl(l) for l in self.compressed_layers(depth)}))

    def extra_macs(self, info: ModelInfo) -> int:
        """Merge + reconstruct (+ shortcut) MACs of the implementation that inference runs."""
        N, D = info.n_tokens, info.dim
        total = 0
        counts = self.tokens_per_block(info)
        for l in self.compressed_layers(info.depth):
            C = counts[l]
            impl = self._inference_impl(l)
            if impl == "gather":
                lay = self._layers.get(l)
                nsup = int(lay.cols.numel()) if lay is not None else N
                total += 2 * nsup * D  # weighted merge + scaled copy back
            else:
                total += 2 * C * N * D
                if impl == "dense" and self.cfg["shortcut"]:
                    total += N * N * D
        return total

    @staticmethod
    def _pm_code_formula(info: ModelInfo, tokens_per_block: list[int]) -> int:
        """docs/methods/pm.md §2.1: 12ND^2 + 2N^2D + hN^2 per block, head as n_patches * classes * D, no patch embed."""
        D, h = info.dim, info.num_heads
        return info.n_patches * info.num_classes * D + sum(12 * n * D * D + 2 * n * n * D + h * n * n
                                                           for n in tokens_per_block)

    def paper_count_macs(self, info: ModelInfo) -> int:
        """The PM README's convention (docs/methods/pm.md §1.4): the official code's formula, merge/reconstruct excluded."""
        return self._pm_code_formula(info, self.tokens_per_block(info))

    def flops_conventions(self, info: ModelInfo) -> dict:
        return {PAPER_COUNT: self.paper_count_macs(info), **self.flops_report(info)}

    def flops_report(self, info: ModelInfo) -> dict:
        """The official PM code's count (docs/methods/pm.md §2.1) and the full counts."""
        D, N = info.dim, info.n_tokens
        counts = self.tokens_per_block(info)
        layers = self.compressed_layers(info.depth)
        base = self._pm_code_formula(info, [N] * info.depth)
        pm = self._pm_code_formula(info, counts)
        mr = sum(2 * counts[l] * N * D for l in layers)
        diag = len(layers) * N * N * D
        g = lambda v: round(v / 1e9, 4)  # noqa: E731
        return {
            "structure_source": self.source if self.structs is not None else "uniform (uncalibrated)",
            "tokens_per_block": counts,
            "sum_tokens_compressed": sum(counts[l] for l in layers),
            "pm_code_formula_gmacs": g(pm),
            "pm_code_formula_baseline_gmacs": g(base),
            "merge_reconstruct_dense_gmacs": g(mr),
            "diag_shortcut_gmacs": g(diag),
            "official_code_full_gmacs": g(pm + mr + diag),
            "as_implemented_extra_gmacs": g(self.extra_macs(info)),
            "as_implemented_impl": list(self._inference_impls(info.depth)),
            "note": "pm_code_formula: 12ND^2+2N^2D+hN^2 per block + head as n_patches*classes*D, no patch embed "
                    "(PM README convention); official_code_full adds the dense merge/reconstruct and diag products",
        }

    # -- training ------------------------------------------------------------------------------------------
    def recipe(self, info: ModelInfo) -> dict:
        """docs/methods/pm.md §5.10: self-distillation (CE + alpha*KL*tau^2, tau 20), AdamW, cosine to 1e-6, no
        warm-up, the README's augmentation; epochs are the orchestration's (official 60).  The lr is
        the official value at global batch 512 (not rescaled here)."""
        if info.dim >= 768:  # run.sh (ViT-B): no mixup / cutmix / erasing, plain CE
            r = {"lr": 5e-5, "weight_decay": 0.05, "distill_alpha": 1.0, "mixup": 0.0, "cutmix": 0.0,
                 "label_smoothing": 0.0}
        else:  # README DeiT-T / DeiT-S commands (timm defaults they leave on)
            r = {"lr": 1e-4, "weight_decay": 1e-3, "distill_alpha": 0.8 if info.dim <= 192 else 1.0,
                 "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}
        r.update({"min_lr": 1e-6, "warmup_epochs": 0, "clip_grad": None, "distill": "soft",
                  "distill_form": "add", "distill_tau": 20.0})
        self.base_lr, self.min_lr = r["lr"], r["min_lr"]
        return r

    def param_group(self, name: str) -> str:
        """One group by default; with ``lr_quirk`` the released code's two groups: 'no_decay'
        (biases, norms, position/CLS embeddings, other 1-D parameters) and 'decay_const_lr'
        (every >=2-D weight, M and R included)."""
        if not self.cfg["lr_quirk"]:
            return "backbone"
        parts = name.split(".")
        if parts[-1] in NO_DECAY_KEYS or any(p.startswith("norm") or p.endswith("_norm") for p in parts[:-1]):
            return "no_decay"
        return "decay_const_lr"

    def lr_multiplier(self, name: str, epoch: float, num_epochs: float) -> float:
        return self.lr_scale(self.param_group(name), epoch, num_epochs)

    def lr_scale(self, group: str, epoch: float, num_epochs: float) -> float:
        """Under ``lr_quirk`` the 'decay_const_lr' group trains at a constant 1e-6: the multiplier
        that turns the trainer's cosine value at this step into 1e-6.  The cosine is recomputed
        from ``base_lr``/``min_lr`` (set by :meth:`recipe`; no warm-up, as the recipe says) at the
        fractional epoch bench.runtime.train passes each step, i.e. its per-step schedule."""
        if not self.cfg["lr_quirk"] or group != "decay_const_lr" or not self.base_lr:
            return 1.0
        t = min(1.0, float(epoch) / max(1e-9, float(num_epochs)))
        cur = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        return 1e-6 / cur

    # -- reporting ------------------------------------------------------------------------------------------
    def per_layer(self) -> dict:
        if self.structs is None:
            return {}
        n_prefix = self._geom["n_prefix"] if self._geom else 1
        d = structure.summary(self.structs, n_prefix)
        d["source"] = self.source
        return d

    def describe(self) -> dict:
        d = super().describe()
        d["structure"] = self.per_layer()
        return d


def find_state(ck) -> Optional[dict]:
    """The PM structure inside a checkpoint dict, whichever key the writer used."""
    if not isinstance(ck, dict):
        return None
    if ck.get("format") == STATE_FORMAT:
        return ck
    for k in ("reducer_state", "pm_structure", "structure", "reducer"):
        v = ck.get(k)
        if isinstance(v, dict):
            if v.get("format") == STATE_FORMAT:
                return v
            inner = find_state(v)
            if inner is not None:
                return inner
    return None
