"""Quantization: BN folding, observer insertion, calibration, lowering to quantized (QDQ) form."""
