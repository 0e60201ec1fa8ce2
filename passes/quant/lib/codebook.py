"""Weight sharing by clustering: a layer's weight as ``codebook[codes]``.

    W: out x cols  (cols = in/groups x prod(kernel))    blocks of d consecutive weights of a row
    codes: out x cols/d  (integers < K)                codebook: K x d          W ~ codebook[codes]

d = 1 is scalar k-means (Deep Compression: K = 2^bits centroids, initialised linearly between the smallest and the
largest weight); d > 1 is product quantization ("And the bit goes down": one codebook of K d-vectors per layer,
k-means++ initialisation).  Both fit the weights by k-means (``kmeans``).

Data-aware fitting minimises the error of the layer's outputs on real inputs instead:

    f(C) = sum over groups g of tr(R_g H_g R_g^T) + lam ||R||^2,   R = codebook[codes] - W,   H_g = X_g^T X_g

(X_g: the inputs the rows of group g multiply, as patches for a conv; lam a small damping relative to H's mean
diagonal, which also keeps f convex).  For fixed codes f is quadratic in the codebook: the update solves its normal
equations by conjugate gradients (exactly, in at most K d steps).  Codes are assigned block by block along each
row with the error of every block compensated on the blocks after it (``sequential_assign``: GPTQ's rounding with
the codebook as its grid, for d-vectors as GPTVQ does); assignment and update alternate ``iterations`` times and the
best codebook and codes found are kept.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

DAMPING = 1e-2  # lam relative to the mean of H's diagonal: the output error stays the objective, W's error a guard
CHUNK = 1 << 16  # blocks assigned at a time (an out x nb x K distance tensor would not fit for wide layers)
LAZY = 128  # columns whose errors reach the rest of the row together (sequential_assign)


@dataclasses.dataclass
class Fit:
    """A layer's codebook (K x d) and codes (out x nb), with the errors they leave."""

    codebook: torch.Tensor
    codes: torch.Tensor
    weight_sqnr_db: float
    output_sqnr_db: float | None  # on the inputs whose H was given


def blocks(weight: torch.Tensor, d: int) -> torch.Tensor:
    """The weight as out x nb x d blocks (``d`` must divide the row length, checked by the caller)."""
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    return rows.reshape(rows.shape[0], -1, d)


def kmeans(vectors: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook k' x d, codes) from Lloyd's k-means (scikit-learn) on n x d ``vectors``; k' = min(k, number of
    distinct vectors), in which case the codebook is those vectors and the fit exact."""
    from sklearn.cluster import KMeans

    distinct, inverse = torch.unique(vectors, dim=0, return_inverse=True)
    if len(distinct) <= k:
        return distinct.clone(), inverse
    x = vectors.numpy()
    if vectors.shape[1] == 1:  # Deep Compression's linear initialisation
        init = np.linspace(x.min(), x.max(), k)[:, None]
    else:
        init = "k-means++"
    fitted = KMeans(k, init=init, n_init=1, random_state=seed, max_iter=100, tol=1e-8).fit(x)
    codebook = torch.from_numpy(fitted.cluster_centers_).double()
    return codebook, assign(vectors, codebook)


def assign(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The nearest codeword of every vector (n x d)."""
    return torch.cat([torch.cdist(vectors[s:s + CHUNK], codebook).argmin(1) for s in range(0, len(vectors), CHUNK)])


def sequential_assign(w: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Codes for ``w`` (out x cols) chosen block by block with the error of each block compensated on the blocks
    after it (GPTQ's rounding with a codebook for a grid): with H^-1 = U^T U (upper Cholesky factor, H damped),
    block b takes the codeword nearest in the metric ||(w_b - c) U_bb^-1||, and its error E = (w_b - c) U_bb^-1
    moves the later columns by -E U_b,after (within a batch of LAZY columns at once, on the rest per batch, as
    GPTQ's lazy updates).  Returns out x nb codes."""
    d = codebook.shape[1]
    out, cols = w.shape
    groups = hessian.shape[0]
    rows = out // groups
    codes = torch.empty(out, cols // d, dtype=torch.long)
    lazy = max(d, LAZY // d * d)
    for g in range(groups):
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian[g])), upper=True)
        work = w[g * rows:(g + 1) * rows].clone()
        for start in range(0, cols, lazy):
            stop = min(start + lazy, cols)
            errors = torch.empty(rows, stop - start, dtype=work.dtype)
            for s in range(start, stop, d):
                e = s + d
                if d == 1:
                    k = (work[:, s:e] - codebook.T).abs().argmin(1)
                    err = (work[:, s:e] - codebook[k]) / u[s, s]
                else:
                    inv = torch.linalg.inv(u[s:e, s:e])
                    k = torch.cdist(work[:, s:e] @ inv, codebook @ inv).argmin(1)
                    err = (work[:, s:e] - codebook[k]) @ inv
                codes[g * rows:(g + 1) * rows, s // d] = k
                errors[:, s - start:e - start] = err
                if e < stop:
                    work[:, e:stop] -= err @ u[s:e, e:stop]
            if stop < cols:
                work[:, stop:] -= errors @ u[start:stop, stop:]
    return codes


class OutputError:
    """f(C) of the module docstring for one layer: weight (out x cols), H (groups x cols x cols)."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor):
        self.w = weight.detach().double().reshape(weight.shape[0], -1)
        self.raw = hessian.double()
        self.groups, cols = hessian.shape[0], hessian.shape[1]
        lam = DAMPING * float(hessian.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-12))
        self.h = self.raw + lam * torch.eye(cols, dtype=torch.float64)

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (out x cols) @ (H + lam) of each row's group."""
        g = rows.reshape(self.groups, -1, rows.shape[1])
        return torch.bmm(g, self.h).reshape(rows.shape)

    def __call__(self, approx: torch.Tensor) -> float:
        r = approx - self.w
        return float((self.apply(r) * r).sum())

    def output_sqnr_db(self, approx: torch.Tensor) -> float:
        """The SQNR of the layer's outputs on the inputs of H (no damping)."""
        def energy(rows: torch.Tensor) -> float:
            g = rows.reshape(self.groups, -1, rows.shape[1])
            return float((torch.bmm(g, self.raw) * g).sum())

        return _db(energy(self.w), energy(approx - self.w))

    def refit(self, codebook: torch.Tensor, codes: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The codebook minimising f for these codes: conjugate gradients on its normal equations, from
        ``codebook``."""
        k, d = codebook.shape
        flat = codes.reshape(-1)

        def gather(c: torch.Tensor) -> torch.Tensor:
            return c[flat].reshape(self.w.shape)

        def scatter(rows: torch.Tensor) -> torch.Tensor:
            return torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat, rows.reshape(-1, d))

        def operator(c: torch.Tensor) -> torch.Tensor:
            return scatter(self.apply(gather(c)))

        rhs = scatter(self.apply(self.w))
        used = torch.zeros(k, dtype=torch.bool)
        used[flat] = True
        c = codebook.clone()
        r = (rhs - operator(c)) * used[:, None]
        p = r.clone()
        rr = float((r * r).sum())
        scale = float((rhs * rhs).sum())
        for _ in range(steps or k * d):
            if rr <= 1e-24 * max(scale, 1e-300):
                break
            ap = operator(p)
            alpha = rr / float((p * ap).sum())
            c += alpha * p
            r -= alpha * ap
            new = float((r * r).sum())
            p = r + (new / rr) * p
            rr = new
        return c


def fit(weight: torch.Tensor, k: int, d: int, hessian: torch.Tensor | None = None, iterations: int = 2,
        seed: int = 0) -> Fit:
    """Cluster ``weight``'s d-blocks into ``k`` codewords: k-means, then (given the layer's input second moments
    ``hessian``, groups x cols x cols) ``iterations`` rounds of error-compensating assignment and output-error
    refit, keeping the best codebook and codes found."""
    w = blocks(weight, d)
    flat = w.reshape(w.shape[0], -1)
    codebook, codes = kmeans(w.reshape(-1, d), k, seed)
    codes = codes.reshape(w.shape[:2])
    error = None if hessian is None else OutputError(weight, hessian)
    if error is not None and len(codebook) == k:  # (fewer distinct blocks than k: already exact)
        best = (error(codebook[codes].reshape(flat.shape)), codebook, codes)
        for _ in range(iterations):
            codes = sequential_assign(flat, codebook, error.h)
            codebook = error.refit(codebook, codes)
            value = error(codebook[codes].reshape(flat.shape))
            if value < best[0]:
                best = (value, codebook, codes)
        _, codebook, codes = best
    approx = codebook[codes].reshape(flat.shape)
    out_db = None if error is None else error.output_sqnr_db(approx)
    return Fit(codebook, codes, _db(float((flat * flat).sum()), float(((approx - flat) ** 2).sum())), out_db)


def _db(signal: float, noise: float) -> float:
    return math.inf if noise <= 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def entropy_bits(codes: torch.Tensor, k: int) -> float:
    """Shannon entropy (bits per code) of the codes' frequencies: what an entropy coder needs per code."""
    p = torch.bincount(codes.reshape(-1), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())
