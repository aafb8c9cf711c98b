"""Layer 3, the run of ``./run_all.sh``: the built-in profiles and their overrides, the stages that
fill each table (``stages/``) and the regression gate.  Imports the layers below it (core, runtime,
``bench.seg``)."""
