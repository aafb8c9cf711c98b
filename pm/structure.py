"""Structure search: which tokens every compressed layer keeps, merges and prunes (docs/methods/pm.md §1.4).

Official ``tm_prune`` (mode 'attn', ``tm_prune_merge_to_center.py``)::

    S_l  = |v_l| / ||v_l||_2                   per-layer L2 normalisation
    S'_l = S_l * (1 - decay * l)               decay 0.025, l = block index
    pool = sort(concat_l S'_l)                 over the compressed layers only
    prune_thr = pool[P]    P = int(n * prune) * L    mask_l = S'_l >= prune_thr
    keep_thr  = pool[-K]   K = int(n * keep)  * L    centres_l = {j : S'_l[j] * mask_l[j] >= keep_thr}

so Σ_l |centres_l| = K up to ties and Σ_l C_l = L * int(n * keep) + L * n_prefix.
``structure="local"`` (ablation; legacy ``tm_prune.py`` / Segmenter) applies
the two thresholds per layer instead: exactly ``int(n * keep)`` centres and
``int(n * prune)`` pruned tokens in every layer.

Resolution of docs/methods/pm.md §5.17: a layer left without centres would crash the
official code; here its best unpruned token is promoted until the layer has
``min_centers`` centres (this can only add tokens, and only in that case).

``merge=False`` (the "prune only" ablation): every non-centre token is pruned
(passes the block through the shortcut) instead of being merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class LayerStructure:
    """One compressed block: centre patch indices (sorted), pruned mask (n,), weights' scores (n,)."""

    layer: int
    centers: list[int]
    pruned: torch.Tensor  # (n,) bool
    score: torch.Tensor  # (n,) float64, normalised + decayed, pruned entries zeroed

    @property
    def n_centers(self) -> int:
        return len(self.centers)

    def counts(self) -> dict:
        n = self.pruned.numel()
        npr = int(self.pruned.sum())
        return {"centers": self.n_centers, "pruned": npr, "merged": n - npr - self.n_centers}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "centers": list(self.centers), "pruned": self.pruned.clone(),
                "score": self.score.clone()}

    @staticmethod
    def from_dict(d: dict) -> "LayerStructure":
        return LayerStructure(int(d["layer"]), [int(c) for c in d["centers"]],
                              torch.as_tensor(d["pruned"]).bool(), torch.as_tensor(d["score"]).double())


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """|v_l| / ||v_l||_2 per layer (rows of a (depth, n) tensor)."""
    v = scores.double().abs()
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)


def search(
    scores: torch.Tensor,
    layers: Sequence[int],
    keep: float,
    prune: float,
    mode: str = "global",
    decay: float = 0.025,
    min_centers: int = 1,
    merge: bool = True,
) -> list[LayerStructure]:
    """Per-layer structures from accumulated raw scores ``(depth, n)``."""
    n = scores.shape[1]
    S = normalise(scores)
    L = len(layers)
    dec = {l: S[l] * (1.0 - decay * l) for l in layers}
    n_prune, n_keep = int(n * prune), int(n * keep)
    if mode == "global":
        pool = torch.sort(torch.cat([dec[l] for l in layers])).values
        P, K = n_prune * L, n_keep * L
        prune_thr = {l: pool[P] for l in layers}
        keep_thr = {l: pool[-K] for l in layers}
    elif mode == "local":
        prune_thr, keep_thr = {}, {}
        for l in layers:
            srt = torch.sort(dec[l]).values
            prune_thr[l] = srt[n_prune]
            keep_thr[l] = srt[-n_keep]
    else:
        raise ValueError(f"unknown structure mode {mode!r}")
    out = []
    for l in layers:
        mask = dec[l] >= prune_thr[l]
        score = dec[l] * mask
        centers = (score >= keep_thr[l]) & mask
        if centers.sum() < min_centers:  # docs/methods/pm.md §5.17
            order = torch.argsort(score, descending=True, stable=True)
            for j in order.tolist():
                if centers.sum() >= min_centers:
                    break
                centers[j] = True
                mask[j] = True
        pruned = ~mask
        if not merge:
            pruned = ~centers
        score = dec[l].clone()
        score[pruned] = 0.0
        out.append(LayerStructure(int(l), torch.nonzero(centers).flatten().tolist(), pruned, score))
    return out


def uniform(n: int, layers: Sequence[int], keep: float, prune: float, merge: bool = True) -> list[LayerStructure]:
    """A data-free structure (NOT the method): int(n*keep) evenly spread centres per layer,
    int(n*prune) evenly spread pruned tokens among the rest, equal scores.  Used only when no
    calibrated structure is available (FLOPs/speed of an uncalibrated model); keep=1, prune=0
    gives the identity."""
    k = max(1, int(n * keep))
    centers = sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})
    cs = set(centers)
    rest = [p for p in range(n) if p not in cs]
    npr = min(int(n * prune), len(rest))
    pr = [rest[min(len(rest) - 1, int((i + 0.5) * len(rest) / npr))] for i in range(npr)] if npr else []
    out = []
    for l in layers:
        pruned = torch.zeros(n, dtype=torch.bool)
        pruned[pr] = True
        if not merge:
            pruned[:] = True
            pruned[centers] = False
        score = torch.ones(n, dtype=torch.float64)
        score[pruned] = 0.0
        out.append(LayerStructure(int(l), list(centers), pruned, score))
    return out


def summary(structs: Sequence[LayerStructure], n_prefix: int = 1) -> dict:
    """Per-layer counts for reports: C_l (tokens processed), centres, merged, pruned."""
    rows = [{"layer": s.layer, "tokens": n_prefix + s.n_centers, **s.counts()} for s in structs]
    return {"per_layer": rows, "tokens": [r["tokens"] for r in rows],
            "sum_tokens": sum(r["tokens"] for r in rows)}


def resolve_layers(layers: Optional[Sequence[int]], depth: int) -> list[int]:
    return list(range(depth)) if layers is None else sorted(int(l) for l in layers)
