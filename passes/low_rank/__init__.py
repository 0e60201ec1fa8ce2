"""Low-rank factorization of weighted layers (truncated SVD)."""
