"""Libraries of the quantization passes: quantization specs, placement planning, range calibrators."""
