"""Sub-commands of the ``pmbench`` CLI (one module each)."""
