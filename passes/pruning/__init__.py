"""Structural pruning: channel dependency analysis (``lib``), channel selection and removal, gradual pruning."""
