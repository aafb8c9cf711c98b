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


def ranking_note(rows: list[dict]) -> str | None:
    """One sentence on this run's off-the-shelf ranking of the reference configurations against the
    real model's, or None when the run has fewer than two of them.  ``rows``: accuracy rows with
    ``config``, ``kind`` and ``drop`` (and ``drop_ci95`` when measured)."""
    ours = {r["config"]: r for r in rows
            if r.get("kind") == "off-the-shelf" and r["config"] in REAL_REFERENCE and r.get("drop") is not None}
    if len(ours) < 2:
        return None
    real = _order({k: REAL_REFERENCE[k] for k in ours})
    mine = _order({k: ours[k]["drop"] for k in ours})
    listed = ", ".join(f"{k} {ours[k]['drop']:+.1f}" + (f" {ours[k]['drop_ci95']}" if ours[k].get("drop_ci95") else "")
                       for k in mine)
    if mine == real:
        verdict = "agrees with the real model's order"
    else:
        verdict = ("does NOT agree with the real model's order (" + " > ".join(real) + "); read these accuracy "
                   "columns as a check of the code paths, not as evidence of which method is better")
    return f"off-the-shelf ranking on this proxy, least loss first: {listed}; it {verdict} ({REAL_MODEL}, docs/proxy.md)"
