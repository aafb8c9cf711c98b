"""Prune and Merge (PM-ViT): reducer (pm.reducer), structure search (pm.structure), merge/reconstruct
matrices (pm.matrices), gradient-weighted calibration (pm.calibrate) and the ``pm-calibrate`` CLI."""
