"""Layer 0, the contract: the reducer interface and its options (``reducer``, ``errors``), the registry
of methods and plug-ins (``registry``, ``plugins``), the class-swap patch that runs any reducer in a timm
ViT (``patch``) and the analytic FLOPs count derived from a method's declared token schedule
(``flops``).  Imports nothing above it (tests/test_layers.py)."""
