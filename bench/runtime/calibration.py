"""Calibrating a method with a learned structure (:class:`bench.core.reducer.Calibrated`): one path for the
pipeline's in-process jobs and the ``pmbench calibrate`` command (alone or under torchrun)."""
from __future__ import annotations

from pathlib import Path

from bench.core import patch
from bench.runtime import distributed as bd
from bench.runtime.checkpoint import save_checkpoint


def calibrate_and_save(model, red, batches, *, iters, device, out: Path, model_name: str, progress=None) -> dict:
    """Calibrate ``red`` (already patched onto ``model``) on ``batches``, re-patch the model so the
    modules built from the structure are rebuilt, and save the checkpoint (rank 0); returns the
    reducer's summary (``per_layer``, ``sum_tokens``, ... as the method reports them)."""
    info = patch.get_context(model).info
    summ = red.calibrate(model, batches, info, iters=iters, device=device, progress=progress)
    patch.apply(model, red, img_size=(info.grid[0] * info.patch_size[0], info.grid[1] * info.patch_size[1]))
    if not getattr(model, "pmbench_name", None):
        model.pmbench_name = model_name
    extra = {"calibration": summ}
    if bd.world_size() > 1:  # recorded only then: a one-process checkpoint stays byte-identical run to run
        extra["world_size"] = bd.world_size()
    if bd.rank() == 0:
        save_checkpoint(out, model, extra=extra)
    return summ
