"""PM-Bench harness: the reducer contract, registry, measurement, data, training and reports."""
import pmbench_tvshim as _tvshim

_tvshim.install_hook()

__version__ = "0.1.0"
