"""FP8 (W8A8) and INT4 (W4A16, AWQ) quantization of mixbuild artifacts."""
