"""Make ``import torchvision`` work on CPU-only torch 2.13.

Why this exists: the only torchvision release pinned to torch 2.13.0 (0.28.0)
is a CUDA build.  Its compiled ``_C.so`` needs ``libtorch_cuda.so`` and does not
load on the CPU wheel of torch, and ``torchvision/_meta_registrations.py``
then calls ``torch.library.register_fake("torchvision::nms")`` (and ``qnms``)
without checking that those operators exist, so ``import torchvision`` (and
therefore ``import timm`` and ``import mmseg``) raises
``RuntimeError: operator torchvision::nms does not exist``.

Defining the two operator *schemas* (no kernels) before torchvision loads is
enough for the import to succeed.  Pure-Python parts (transforms, models) work;
``torchvision.ops.nms`` and ``torchvision.io.decode_*`` stay unavailable, so the
suite decodes images with PIL and never calls torchvision's C++ ops.

When torchvision's own library loads (a CUDA torch on a GPU machine, or any
matching build) nothing is changed.

The shim is activated in two ways, both idempotent:
* ``run_all.sh`` writes ``pmbench_tvshim.pth`` into the venv's site-packages,
  which calls :func:`install_hook` at interpreter start-up (cheap: it only
  inserts a finder; torch is imported the first time torchvision is);
* ``bench/__init__.py`` calls :func:`install_hook` too, for installs made
  without ``run_all.sh``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_LIB = None
APPLIED = None


def apply() -> bool:
    """Define the missing schemas if torchvision's C++ library cannot load."""
    global _LIB, APPLIED
    if APPLIED is not None:
        return APPLIED
    import torch

    APPLIED = False
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False  # already defined: a matching torchvision build
    except Exception:
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib_path = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(lib_path)
        return False  # torchvision matches this torch build
    except (OSError, ImportError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    APPLIED = True
    return True


class _TorchvisionFinder:
    """Meta-path finder that runs :func:`apply` right before torchvision loads."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            _remove_hook()
            apply()
        return None  # let the normal finders load the module


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]


def install_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
