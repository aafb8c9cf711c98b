"""Merge / reconstruct matrices of one PM block (docs/methods/pm.md §1.5-1.6).

Patch tokens are indexed 0..n-1 in raster order (row ``p // width``, column
``p % width``); the sequence index of patch ``p`` is ``p + n_prefix``.  Prefix
tokens (CLS, distillation) map to themselves: rows/columns ``0..n_prefix-1``
of M are the identity and appear nowhere else.

Assignment rules
----------------
``raster`` (official ``get_merge_matrix`` of ``tm_prune_merge_to_center.py``):
each centre absorbs a contiguous raster segment that starts where the previous
centre's segment stopped and ends (exclusive) at ``ceil((c_i + c_{i+1}) / 2)``
(ties go right), truncated at the end of the centre's row; the row is computed
as ``(c_i + 1) // width``, the official off-by-one (the code uses the sequence
index), so a centre in the last column may extend into the next row.  The
last centre takes everything after it; the first takes everything before it.

``grid2d`` (a named deviation): every non-pruned token goes to the nearest
centre by 2-D Euclidean distance on the patch grid (ties: lowest patch index).

Weights: centre 1, merged token ``s_j / s_centre`` (no row normalisation),
pruned tokens 0.  ``R = pinv(M)``; with disjoint row supports this equals
``Mᵀ diag(1 / ||m_i||²)``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def raster_assign(centers: Sequence[int], n: int, width: int) -> list[int]:
    """Segment owner (index into ``centers``) of every patch, official raster rule."""
    centers = sorted(int(c) for c in centers)
    if not centers:
        raise ValueError("a PM layer needs at least one centre")
    owner = [-1] * n
    left = 0
    for i in range(len(centers) - 1):
        c, nxt = centers[i], centers[i + 1]
        line = (c + 1) // width  # official: (seq_index) // square, seq_index = c + 1
        right = (c + nxt + 1) // 2  # ceil midpoint, exclusive end, in patch indices
        if line < right // width:  # midpoint in a later row: stop at the end of row `line`
            right = (line + 1) * width
        for p in range(left, right):
            owner[p] = i
        left = right
    for p in range(left, n):
        owner[p] = len(centers) - 1
    return owner


def grid2d_assign(centers: Sequence[int], n: int, width: int) -> list[int]:
    """Nearest centre in 2-D (row, col) distance; ties go to the lower centre index."""
    centers = sorted(int(c) for c in centers)
    if not centers:
        raise ValueError("a PM layer needs at least one centre")
    p = torch.arange(n)
    c = torch.tensor(centers)
    d = ((p[:, None] // width - c[None] // width) ** 2 + (p[:, None] % width - c[None] % width) ** 2)
    return d.argmin(dim=1).tolist()  # argmin returns the first minimum


def merge_matrix(
    centers: Sequence[int],
    pruned: torch.Tensor,
    score: torch.Tensor,
    width: int,
    n_prefix: int = 1,
    assign: str = "raster",
) -> torch.Tensor:
    """M (C x (n_prefix + n)) as the official initialisation builds it.

    ``pruned`` (n,) bool; ``score`` (n,) the layer's normalised (decayed) scores,
    pruned entries are zeroed here as in the official code.
    """
    n = pruned.numel()
    centers = sorted(int(c) for c in centers)
    owner = raster_assign(centers, n, width) if assign == "raster" else grid2d_assign(centers, n, width)
    s = score.double().clone()
    s[pruned] = 0.0
    C = n_prefix + len(centers)
    M = torch.zeros(C, n_prefix + n, dtype=torch.float64)
    M[:n_prefix, :n_prefix] = torch.eye(n_prefix, dtype=torch.float64)
    for p in range(n):
        i = owner[p]
        sc = s[centers[i]]
        M[n_prefix + i, n_prefix + p] = s[p] / sc if sc > 0 else float(p == centers[i])
    for i, c in enumerate(centers):  # exactly 1, whatever the float division did
        M[n_prefix + i, n_prefix + c] = 1.0
    return M


def reconstruct_matrix(M: torch.Tensor) -> torch.Tensor:
    """R = pinv(M) (Moore-Penrose, computed in float64)."""
    return torch.linalg.pinv(M.double())


def support(M: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg, pruned): the M row of each token (prefix included) and the pruned-token mask.

    A token whose M column is all zero is pruned (seg = -1).  Raises if some
    column has two non-zeros (row supports not disjoint).
    """
    nz = M != 0
    cnt = nz.sum(0)
    if (cnt > 1).any():
        raise ValueError("merge matrix rows overlap; the gather implementation needs disjoint supports")
    seg = torch.where(cnt > 0, nz.double().argmax(0), torch.full_like(cnt, -1))
    return seg.long(), cnt == 0
