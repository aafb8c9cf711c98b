"""mmengine's log output for the Segmenter commands: warnings and errors only, unless ``--verbose``.

mmengine logs through ``MMLogger`` instances: the Runner makes one at ``cfg.log_level`` (its
environment dump, the config, every logging interval), and code outside a Runner (weight
initialisation, checkpoint loading) logs to the most recently created instance.  Quiet mode sets
``cfg.log_level`` (every config goes through :func:`bench.seg.configs.build_config`) and creates a
quiet instance, so both stay at WARNING.  ``pmbench seg-* --verbose`` shows everything.
"""
from __future__ import annotations

_VERBOSE = False
QUIET_NAME = "pmbench-quiet"


def set_verbose(verbose: bool) -> None:
    """Quiet mode also drops the deprecation notices OpenMMLab's packages raise as Python warnings on
    every run (``pkg_resources``, ``build_loss``, ``avg_non_ignore``); nothing the user can act on."""
    global _VERBOSE
    _VERBOSE = bool(verbose)
    if not _VERBOSE:
        import warnings

        warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(mmengine|mmseg|mmcv)(\.|$)")


def level() -> str:
    return "INFO" if _VERBOSE else "WARNING"


def apply(cfg) -> None:
    """Give ``cfg`` (and the loggers used outside a Runner) the chosen level."""
    cfg.log_level = level()
    if not _VERBOSE:
        from mmengine.logging import MMLogger

        instances = MMLogger._instance_dict  # ordered by creation; the last one is "current"
        if not instances or next(reversed(instances)) != QUIET_NAME:
            instances.pop(QUIET_NAME, None)
            MMLogger.get_instance(QUIET_NAME, log_level="WARNING")
