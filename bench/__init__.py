"""PM-Bench harness: the reducer contract, registry, measurement, data, training and reports."""
import os as _os
import sys as _sys

if _sys.platform.startswith("linux"):
    # torch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages when this is set
    # before its first allocation, so it is set here, before anything of the suite imports torch.  Which
    # physical pages a process's activations land on otherwise varies from process to process, and with
    # it a configuration's speed-up: measured on DeiT-S at batch 8 (2-core Xeon, five configurations, 4-5
    # fresh processes each), the spread of a speed-up between processes fell from 1.5-3.9% (coefficient
    # of variation) to 1.0-2.2% (docs/speed.md, protocol item 9).  THP_MEM_ALLOC_ENABLE=0 turns it off;
    # every speed output records whether it was in effect (bench.runtime.speed.huge_pages).
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import pmbench_tvshim as _tvshim  # noqa: E402

_tvshim.install_hook()

__version__ = "0.1.0"
