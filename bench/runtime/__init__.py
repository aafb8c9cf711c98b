"""Layer 1, what a measurement runs on: the environment stamp, data (the proxy and ImageNet), models
and weights, checkpoints, training, evaluation, calibration, throughput timing, result caching and the
torchrun launcher.  Imports only the contract (``bench.core``) and itself."""
