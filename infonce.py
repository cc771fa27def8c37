"""InfoNCE and its relatives, checked on correlated Gaussians.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Sections 2-3 and Appendix A.

Convention used by every estimator in this project
--------------------------------------------------
A score matrix ``scores`` of shape ``[B, K]``: row b holds critic values for one
anchor x_b. Column 0 is the positive pair f(x_b, y_b); columns 1..K-1 are the
negatives f(x_b, y_j).  K counts the positive, exactly as in Eq. 2.
"""

import math

import torch


# ---------------------------------------------------------------------------
# Argument checks shared by the functions below.
# ---------------------------------------------------------------------------
def _check_scores(scores, name="scores"):
    if not torch.is_tensor(scores) or scores.dim() != 2:
        shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"{name} must be a 2-D tensor [B, K] (column 0 = positive), got {shape}")
    if scores.shape[1] < 1:
        raise ValueError(f"{name} must have K >= 1 columns, got K={scores.shape[1]}")
    if scores.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row, got B={scores.shape[0]}")


def _reduce(values, reduction):
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------
# Eq. 2: the InfoNCE lower bound, and the loss people train with.
# ---------------------------------------------------------------------------
def infonce_bound(scores, reduction="mean"):
    """Eq. 2 (with the 1/K):  f(x, y_1) - log (1/K) sum_i exp f(x, y_i).

    scores: [B, K], column 0 the positive.  Returns a scalar (reduction="mean")
    or the per-row values [B] (reduction="none").  Always <= log K, because the
    positive's term is one of the K terms of the sum.
    """
    _check_scores(scores)
    k = scores.shape[1]
    per_row = scores[:, 0] - torch.logsumexp(scores, dim=1) + math.log(k)
    return _reduce(per_row, reduction)


def infonce_loss(scores, reduction="mean"):
    """The InfoNCE training loss: cross-entropy with the positive in column 0.

    scores: [B, K] (column 0 = positive).  Returns
        logsumexp_i f(x, y_i) - f(x, y_1)  =  log K - infonce_bound(scores),
    i.e. the negated bound shifted by the constant log K (footnote 1 of the
    paper: the constant does not change the optimum or the gradient).  This is
    the number IR / CPC code reports, and it sits at log K when nothing is
    learned.  Stable for any score scale: only a logsumexp, no exp().
    """
    _check_scores(scores)
    per_row = torch.logsumexp(scores, dim=1) - scores[:, 0]
    return _reduce(per_row, reduction)


# ---------------------------------------------------------------------------
# Correlated Gaussians: a problem whose mutual information is known exactly.
# ---------------------------------------------------------------------------
def _check_rho(rho):
    if not (-1.0 < float(rho) < 1.0):
        raise ValueError(f"rho must lie in the open interval (-1, 1), got {rho}")


def _check_dim(dim):
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")


def sample_correlated_gaussians(n, dim, rho, generator=None, dtype=torch.float32):
    """n pairs (x, y), each [n, dim]: x ~ N(0, I), y = rho*x + sqrt(1-rho^2)*eps.

    Every coordinate pair is an independent bivariate Gaussian with correlation
    rho, so I(X;Y) = gaussian_mi(dim, rho) in closed form.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    _check_dim(dim)
    _check_rho(rho)
    x = torch.randn(n, dim, generator=generator, dtype=dtype)
    eps = torch.randn(n, dim, generator=generator, dtype=dtype)
    y = rho * x + math.sqrt(1.0 - rho * rho) * eps
    return x, y


def gaussian_mi(dim, rho):
    """Closed-form I(X;Y) in nats for sample_correlated_gaussians: -dim/2 log(1-rho^2)."""
    _check_dim(dim)
    _check_rho(rho)
    return -0.5 * dim * math.log(1.0 - rho * rho)


def rho_from_mi(dim, mi):
    """Inverse of gaussian_mi: the rho >= 0 that gives ``mi`` nats at ``dim``."""
    _check_dim(dim)
    if mi < 0:
        raise ValueError(f"mi must be >= 0 nats, got {mi}")
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def optimal_critic(x, y, rho):
    """log p(y_j | x_i) / p(y_j) for every pair: returns [n_x, n_y].

    p(y|x) = N(rho x, (1-rho^2) I) and p(y) = N(0, I), so per coordinate
        log p(y|x)/p(y) = -1/2 log(1-rho^2) - (y - rho x)^2 / (2(1-rho^2)) + y^2/2.
    With this critic f* = log p(y|x)/p(y), the expectation of f* over p(x, y)
    is exactly I(X;Y) (Eq. 1).
    """
    _check_rho(rho)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [n, dim] with the same dim, got {tuple(x.shape)} and {tuple(y.shape)}")
    var = 1.0 - rho * rho
    dim = x.shape[1]
    # (y - rho x)^2 summed over coordinates, for all pairs, without a [n_x, n_y, dim] tensor.
    sq_dist = (y * y).sum(1)[None, :] - 2.0 * rho * (x @ y.T) + (rho * rho) * (x * x).sum(1)[:, None]
    return -0.5 * dim * math.log(var) - sq_dist / (2.0 * var) + 0.5 * (y * y).sum(1)[None, :]
