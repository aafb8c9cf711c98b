"""Prune and Merge (PM-ViT): reducer (pm.reducer), structure search (pm.structure), merge/reconstruct
matrices (pm.matrices), gradient-weighted calibration (pm.calibrate) and the ``pm-calibrate`` CLI."""

# pmbench sub-commands of this package (bench/core/plugins.py): (command, module with add_parser, help)
PMBENCH_COMMANDS = [
    ("pm-calibrate", "pm.cli", "Prune and Merge: gradient-weighted scores -> per-layer structure -> checkpoint"),
]
