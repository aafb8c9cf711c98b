"""Stages of ``run_all.sh`` (one module each, ``run(ctx)``); see bench/orchestrate.py."""
