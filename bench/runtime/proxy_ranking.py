"""Does a proxy run rank methods the way a real pretrained ViT does?

The embedded proxy exists so that a user without ImageNet can compare methods; its accuracy columns
are only worth reading if their ranking resembles a real model's.  ``REAL_REFERENCE`` holds the one
real check we have (docs/proxy.md: AugReg ViT-Ti/16, 1000 ImageNet validation images, every method
applied off-the-shelf, PM calibrated and not fine-tuned), and :func:`ranking_note` states, for a
run's off-the-shelf rows, whether their order of drops agrees with it.
"""
from __future__ import annotations

# top-1 drop vs the unreduced model, points (docs/proxy.md gives the source and the setting)
REAL_REFERENCE = {"tome:r=13": -1.6, "mstm:keep=0.7": -2.2, "evit:keep=0.7": -2.7, "pm:keep=0.6": -19.8}
REAL_MODEL = "AugReg ViT-Ti/16, 1000 ImageNet val images, off-the-shelf"

CHECKED = (
    "**What the proxy's ranking has been checked against.** One real pretrained ViT ("
    + REAL_MODEL + "): drops of " + ", ".join(f"{k} {v:+.1f}" for k, v in REAL_REFERENCE.items())
    + " points (PM calibrated, not fine-tuned). The accuracy table says whether this run's off-the-shelf "
    "ranking agrees with that order (docs/proxy.md)."
)


def _order(drops: dict) -> list[str]:
    return sorted(drops, key=lambda k: -drops[k])  # smallest loss first


def _interval(row: dict):
    """(low, high) of a row's ``drop_ci95`` ("[-1.8, +2.2]"), or the drop itself when none was measured."""
    ci = row.get("drop_ci95")
    if isinstance(ci, str) and ci.startswith("["):
        lo, hi = (float(v) for v in ci.strip("[]").split(","))
        return lo, hi
    return row["drop"], row["drop"]


def ranking_note(rows: list[dict]) -> str | None:
    """One sentence on this run's off-the-shelf ranking of the reference configurations against the
    real model's, or None when the run has fewer than two of them.  ``rows``: accuracy rows with
    ``config``, ``kind`` and ``drop`` (and ``drop_ci95`` when measured).

    The verdict reads the intervals: a pair that the run orders the other way round from the real model
    but whose intervals overlap is a tie on these images, not a contradiction.  When every pair's
    intervals overlap the run orders nothing, whatever its point estimates say (a backbone at chance
    loses nothing to any method), and the note says so instead of calling it agreement.  When the
    configuration the real model ranks last has an interval below every other's, the note says it is set
    apart, as on the real model."""
    ours = {r["config"]: r for r in rows
            if r.get("kind") == "off-the-shelf" and r["config"] in REAL_REFERENCE and r.get("drop") is not None}
    if len(ours) < 2:
        return None
    real = _order({k: REAL_REFERENCE[k] for k in ours})
    mine = _order({k: ours[k]["drop"] for k in ours})
    listed = ", ".join(f"{k} {ours[k]['drop']:+.1f}" + (f" {ours[k]['drop_ci95']}" if ours[k].get("drop_ci95") else "")
                       for k in mine)
    iv = {k: _interval(ours[k]) for k in ours}

    def below(a, b):  # a's whole interval below b's
        return iv[a][1] < iv[b][0]

    pairs = [(a, b) for i, a in enumerate(real) for b in real[i + 1:]]  # a ranks above b on the real model
    swapped = [(a, b) for a, b in pairs if ours[a]["drop"] < ours[b]["drop"]]
    contradicted = [(a, b) for a, b in swapped if below(a, b)]
    apart = [(a, b) for a, b in pairs if below(a, b) or below(b, a)]
    if not apart:
        verdict = ("does not resolve any order: the intervals of every pair overlap, so these drops cannot rank "
                   "the methods (the real model's order: " + " > ".join(real) + ")")
    elif not swapped:
        verdict = "agrees with the real model's order"
    elif not contradicted:
        verdict = ("agrees with the real model's order within the paired intervals ("
                   + "; ".join(f"{a} and {b} overlap" for a, b in swapped) + ")")
    else:
        verdict = ("does NOT agree with the real model's order (" + " > ".join(real) + "); read these accuracy "
                   "columns as a check of the code paths, not as evidence of which method is better")
    last = real[-1]
    if not contradicted and len(real) > 2 and all(below(last, k) for k in real[:-1]):
        verdict += f", and {last}'s interval lies below all the others', as the real model's loss does"
    return f"off-the-shelf ranking on this proxy, least loss first: {listed}; it {verdict} ({REAL_MODEL}, docs/proxy.md)"
