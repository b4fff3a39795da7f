"""mixbuild: export, quantize, compile, run and validate Mixtral-family MoE models."""

__version__ = "0.1.0"
