"""Paired statistics for accuracy drops measured on the same images.

With 1000 images one top-1 has a standard error of 1.2-1.6 points, but two
configurations evaluated on the *same* images differ only where their
per-image outcomes differ, so the drop between them is known far more tightly.
Only the discordant pairs carry information:

* ``b`` = images the reference gets right and the reduced model gets wrong,
* ``c`` = images the reference gets wrong and the reduced model gets right,
* drop (points) = 100 * (c - b) / n.

Interval: the paired bootstrap (resample images with replacement, recompute the
drop) percentile interval.  A resample of the n image pairs only changes the
counts of the four outcome cells, so it is drawn exactly as one multinomial
draw over the cells: 10,000 resamples cost microseconds even for 50,000 images.
Test: the exact McNemar test (two-sided binomial test of b against b + c at 1/2).
See docs/statistics.md.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bench.core.reducer import ConfigError

N_BOOT = 10_000


def _as_bits(x) -> np.ndarray:
    if isinstance(x, str):
        if set(x) - {"0", "1"}:
            raise ConfigError("per-image correctness must be a string of 0/1")
        return np.frombuffer(x.encode(), dtype=np.uint8) - ord("0")
    return np.asarray(x, dtype=np.uint8)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - m/2| >= |b - m/2|), X ~ Binomial(m = b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def paired_drop(reference: Sequence[int] | str, reduced: Sequence[int] | str, *, n_boot: int = N_BOOT,
                seed: int = 0, level: float = 0.95) -> dict:
    """Drop of ``reduced`` vs ``reference`` (top-1 points, negative = worse) on the same images, with a
    paired-bootstrap ``level`` interval and the exact McNemar p-value."""
    a, r = _as_bits(reference), _as_bits(reduced)
    if a.shape != r.shape or a.ndim != 1:
        raise ConfigError(f"paired statistics need the same images: {a.size} vs {r.size} outcomes")
    n = int(a.size)
    if n == 0:
        raise ConfigError("paired statistics need at least one image")
    both = int(np.sum((a == 1) & (r == 1)))
    b = int(np.sum((a == 1) & (r == 0)))
    c = int(np.sum((a == 0) & (r == 1)))
    neither = n - both - b - c
    drop = 100.0 * (c - b) / n
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(n, np.array([both, b, c, neither], dtype=np.float64) / n, size=n_boot)
    boot = 100.0 * (cells[:, 2] - cells[:, 1]) / n
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"drop": drop, "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": n,
            "ref_only": b, "reduced_only": c, "mcnemar_p": mcnemar_exact_p(b, c), "n_boot": n_boot}


def format_interval(lo: float, hi: float) -> str:
    return f"[{lo:+.1f}, {hi:+.1f}]"
