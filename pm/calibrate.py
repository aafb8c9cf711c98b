"""Calibration: the gradient-weighted attention score and the structure search (docs/methods/pm.md §1.2-1.4).

Official score (first-order Taylor of the loss w.r.t. the attention map), per
layer l and key token j, for one iteration on a batch of B images::

    v_l[j] = | Σ_b Σ_h Σ_i A[b,h,i,j] * dL/dA[b,h,i,j] | / (B * H * N)

the CLS (prefix) keys dropped, the absolute value taken after the batch sum,
and the per-iteration values summed over iterations.  The model is in eval
mode (no dropout / drop-path), the loss is cross-entropy on hard labels, and
the probabilities come from the shared attention's explicit path
(``AttnRequest(probs_hook=...)``); only calibration uses it.

Differences from the released code, all deliberate:

* scores are all-reduced (summed) over ranks under torch.distributed
  (docs/methods/pm.md §5.18; the original keeps rank 0's local scores);
* by default no optimiser step is taken.  The official pass steps AdamW at
  lr 1e-6 (wd as configured) while scoring, which nudges the weights and
  makes the scores depend on batch order and optimiser state; ``opt_step=True``
  reproduces it (and returns the nudged weights in the model);
* dL/dA is obtained with ``torch.autograd.grad`` on the retained
  probabilities, so no weight gradients are computed (same values as the
  official backward hook; cheaper).

``score="cls_attn"`` (ablation) accumulates the head-averaged CLS-query
attention per key (mean over the batch); ``score="random"`` draws seeded
uniform scores without data.  Same weights and data give the same scores.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from bench.core import patch
from bench.core.reducer import AttnRequest, ConfigError, ModelInfo
from bench.runtime import distributed as bd


class ScoreAccumulator:
    """Collects each layer's attention probabilities during one forward and turns them into scores."""

    def __init__(self, depth: int, n_prefix: int, n_patches: int, kind: str = "grad"):
        self.kind = kind
        self.n_prefix = n_prefix
        self.scores = torch.zeros(depth, n_patches, dtype=torch.float64)
        self.probs: dict[int, torch.Tensor] = {}
        self.iterations = 0
        self.images = 0

    def request(self, i: int) -> AttnRequest:
        return AttnRequest(probs_hook=lambda p, i=i: self._hook(i, p))

    def _hook(self, i: int, probs: torch.Tensor) -> None:
        if self.kind == "cls_attn":
            with torch.no_grad():
                v = probs[:, :, 0, self.n_prefix:].mean(1).sum(0) / probs.shape[0]
                self.scores[i] += v.double().cpu()
        else:
            self.probs[i] = probs

    def finish_batch(self, loss: Optional[torch.Tensor], batch: int, grads: Optional[dict] = None) -> None:
        """Add the batch's Taylor scores (grad mode) and clear the stored probabilities.

        ``grads`` maps layer -> dL/dA when the caller already ran backward (opt_step);
        otherwise they are computed here with ``torch.autograd.grad`` (no weight gradients)."""
        if self.kind == "grad" and self.probs:
            idx = sorted(self.probs)
            tens = [self.probs[i] for i in idx]
            if grads is None:
                gl = torch.autograd.grad(loss, tens, allow_unused=True)
            else:
                gl = [grads.get(i) for i in idx]
            with torch.no_grad():
                for i, A, G in zip(idx, tens, gl):
                    if G is None:
                        continue
                    B, H, N, _ = A.shape
                    v = (A.double() * G.double()).sum(dim=(0, 1, 2)).abs() / (B * H * N)
                    self.scores[i] += v[self.n_prefix:].cpu()
        self.probs = {}
        self.iterations += 1
        self.images += batch


def all_reduce_scores(scores: torch.Tensor) -> torch.Tensor:
    """Sum the accumulated scores over ranks (no-op without an initialised process group)."""
    return bd.all_reduce_sum(scores.clone())


@dataclass
class ScoringOptions:
    """How :func:`collect_scores` / :func:`calibrate` score: ``iters`` / ``max_images`` cap the batches
    (None: the whole loader); ``opt_step``: AdamW steps at ``lr`` / ``weight_decay`` while scoring (as
    the official code does); ``device`` (None: the model's); ``progress(iterations, images, seconds)``
    after each batch; ``loss_fn(logits, targets)`` (None: cross entropy)."""
    iters: Optional[int] = None
    max_images: Optional[int] = None
    opt_step: bool = False
    lr: float = 1e-6
    weight_decay: float = 0.05
    device: Optional[str] = None
    progress: Optional[Callable] = None
    loss_fn: Optional[Callable] = None


def collect_scores(model, reducer, loader: Iterable, info: ModelInfo, opts: Optional[ScoringOptions] = None,
                   **overrides) -> tuple[torch.Tensor, dict]:
    """Accumulated raw scores (depth, n_patches) over the loader (then all-reduced); ``reducer`` is
    the :class:`pm.reducer.PruneAndMerge` the model is patched with; ``opts`` (keyword ``overrides``
    name its fields) say how: ``loss_fn(logits, targets)`` (default: cross entropy) is the loss whose
    gradient weights the attention."""
    o = dataclasses.replace(opts or ScoringOptions(), **overrides)
    iters, max_images, opt_step, device, progress = o.iters, o.max_images, o.opt_step, o.device, o.progress
    loss_fn = o.loss_fn or F.cross_entropy
    kind = reducer.cfg["score"]
    if kind == "random":
        g = torch.Generator().manual_seed(reducer.cfg["seed"])
        sc = torch.rand(info.depth, info.n_patches, generator=g, dtype=torch.float64)
        return sc, {"iterations": 0, "images": 0, "score": "random", "seed": reducer.cfg["seed"]}
    dev = torch.device(device) if device else next(model.parameters()).device
    acc = ScoreAccumulator(info.depth, info.n_prefix, info.n_patches, kind)
    was_training = model.training
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                            weight_decay=o.weight_decay) if opt_step else None
    t0 = time.time()
    try:
        with reducer.scoring(acc):
            for it, batch in enumerate(loader):
                if iters is not None and it >= iters:
                    break
                if max_images is not None and acc.images >= max_images:
                    break
                images, targets = batch[0].to(dev), batch[1].to(dev)
                if kind == "cls_attn":
                    with torch.no_grad():
                        model(images)
                    acc.finish_batch(None, images.shape[0])
                    continue
                images = images.requires_grad_(True)  # the probabilities need a graph even with frozen weights
                loss = loss_fn(model(images), targets)
                if not torch.isfinite(loss):  # NaN/inf scores would silently decide the structure
                    raise ConfigError(f"PM calibration: the loss is {loss.item()} at iteration {it + 1}; the weights "
                                      "or the inputs are not finite (check --init/--weights and the data)")
                if opt is not None:  # official: AdamW at lr 1e-6 steps while scoring
                    for A in acc.probs.values():
                        A.retain_grad()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    acc.finish_batch(None, images.shape[0], grads={i: A.grad for i, A in acc.probs.items()})
                    opt.step()
                else:
                    acc.finish_batch(loss, images.shape[0])
                if progress:
                    progress(acc.iterations, acc.images, time.time() - t0)
    finally:
        model.train(was_training)
    scores = all_reduce_scores(acc.scores)
    if not torch.isfinite(scores).all():
        raise ConfigError("PM calibration produced non-finite scores (NaN/inf attention or gradients); the "
                          "weights or the inputs are not finite (check --init/--weights and the data)")
    if acc.iterations == 0 and bd.world_size() == 1:
        raise ConfigError("PM calibration saw no batch (empty split, or --iters/--max-images too small?)")
    return scores, {"iterations": acc.iterations, "images": acc.images, "score": kind,
                    "opt_step": opt_step, "seconds": round(time.time() - t0, 2)}


def calibrate(model, reducer, loader: Iterable, opts: Optional[ScoringOptions] = None, **overrides) -> dict:
    """Score on ``loader`` with the model patched by ``reducer`` (``opts``: a :class:`ScoringOptions`;
    keyword ``overrides`` name its fields), search the structure and re-patch the model with it (fresh
    M/R initialised from the scores).  Returns the summary."""
    o = dataclasses.replace(opts or ScoringOptions(), **overrides)
    if patch.get_reducer(model) is not reducer:
        patch.apply(model, reducer)
    info = patch.get_context(model).info
    extra = {"loss_fn": o.loss_fn} if o.loss_fn is not None else {}
    out = reducer.calibrate(model, loader, info, iters=o.iters, max_images=o.max_images, opt_step=o.opt_step,
                            lr=o.lr, weight_decay=o.weight_decay, device=o.device, progress=o.progress, **extra)
    img = (info.grid[0] * info.patch_size[0], info.grid[1] * info.patch_size[1])
    patch.apply(model, reducer, img_size=img)  # rebuild M/R with the new shapes
    return out
