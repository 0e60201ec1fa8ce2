"""Passes that train: fine-tuning, distillation, QAT, BatchNorm recalibration."""
