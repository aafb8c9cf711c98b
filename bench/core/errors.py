"""The suite's error types, in a module without heavy imports (``pmbench --help`` must not load torch).

``bench.core.reducer`` re-exports :class:`ConfigError`, so ``from bench.core.reducer import ConfigError`` (the
plug-in contract) names the same class.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A reducer spec or configuration that cannot work.  Raised before any compute."""
