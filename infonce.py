"""InfoNCE and its relatives, checked on correlated Gaussians.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Sections 2-3 and Appendix A.

Convention used by every estimator in this project
--------------------------------------------------
A score matrix ``scores`` of shape ``[B, K]``: row b holds critic values for one
anchor x_b. Column 0 is the positive pair f(x_b, y_b); columns 1..K-1 are the
negatives f(x_b, y_j).  K counts the positive, exactly as in Eq. 2.

What is here, in the order of Appendix A
----------------------------------------
  ba_bound        Eq. 12  Barber-Agakov: needs a normalized posterior q(x|y).
  uba_bound       Eq. 13  unnormalized BA: needs a critic f and its log Z(y).
  nwj_bound       Eq. 14  Nguyen-Wainwright-Jordan: replaces log Z(y) by Z(y)/e.
  infonce_bound   Eq. 2 / Eq. 15 (Theorem A.3): NWJ on K samples; <= log K.
  infonce_loss    the cross-entropy people train with (= log K - bound).
plus the Gaussian test bed with a closed-form I(X;Y) (Eq. 1), the critic that is
optimal for it, standard errors, and a learned separable critic
g_theta(x)^T g_phi(y) (the witness of Eq. 2 and the inductive bias of Sec. 4).

Each bound is a plain function that needs nothing but torch and math: copy it
alone (tests/test_copyable.py does, and checks value and gradient).
Precision, one rule for every bound here: the arithmetic is float32 whatever
the inputs are (float64 if they are float64); fp16 / bf16 scores are upcast
inside, because a logsumexp over K terms with an 8-bit mantissa loses the
answer.  Autograd carries the gradient back to the input's dtype.

Run ``python infonce.py`` for the table of every bound against the true MI,
``python infonce.py --plot out/staircase.png`` for the training staircase.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# Command-line arguments of the demo (``python infonce.py --help``).  Importing
# this file parses nothing; main() calls parse_args().
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Lower bounds on the mutual information I(X;Y) (Sec. 3, Appendix A) "
        "checked against the closed form for correlated Gaussians. Prints one table row "
        "per (true MI, K) and, with --plot, saves the training staircase.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dim",
        type=_positive_int,
        default=20,
        help="dimension of X and Y; every coordinate pair (x_i, y_i) is an "
        "independent bivariate Gaussian with correlation rho",
    )
    parser.add_argument(
        "--mi",
        type=_nonnegative_float,
        nargs="+",
        default=[2.0, 4.0, 6.0, 8.0, 10.0],
        help="true I(X;Y) in nats (Eq. 1) for each table block and each training "
        "stage of the staircase; rho is solved from it",
    )
    parser.add_argument(
        "--ks",
        type=_positive_int,
        nargs="+",
        default=[16, 128, 1024],
        help="K of Eq. 2: candidates per anchor x, the positive y_1 plus K-1 "
        "negatives y_2..y_K ~ p(y); each >= 2 (NWJ needs a negative)",
    )
    parser.add_argument(
        "--rows",
        type=_positive_int,
        default=16384,
        help="anchors (x, y_1) per estimate, split into rows/K independent "
        "batches of K pairs; the standard error is taken across batches",
    )
    parser.add_argument(
        "--train-k",
        type=_positive_int,
        default=128,
        help="K while training the learned critic: a batch of K pairs, each y "
        "of the batch a negative for the other anchors (in-batch negatives)",
    )
    parser.add_argument(
        "--steps-per-stage",
        type=_positive_int,
        default=400,
        help="optimizer steps spent at each true MI of --mi (one stair)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-3,
        help="Adam learning rate for theta and phi of the critic g_theta(x)^T g_phi(y)",
    )
    parser.add_argument(
        "--hidden",
        type=_positive_int,
        default=128,
        help="hidden width of the one-hidden-layer MLPs g_theta and g_phi",
    )
    parser.add_argument(
        "--embed-dim",
        type=_positive_int,
        default=32,
        help="dimension of the representations g_theta(x), g_phi(y) (Sec. 2)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the data and the critic's init"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads; 1 is fastest for these small matrices and "
        "avoids thrashing on a shared machine",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="save the staircase figure (learned critic's InfoNCE per training "
        "step vs the true MI and log K) to PATH, e.g. out/staircase.png",
    )
    args = parser.parse_args(argv)
    if min(args.ks) < 2:
        parser.error(
            f"--ks: every K must be >= 2 (one positive and at least one negative), got {args.ks}"
        )
    if args.train_k < 2:
        parser.error(
            f"--train-k must be >= 2 (in-batch negatives need two pairs), got {args.train_k}"
        )
    if args.rows < 2 * max(args.ks):
        parser.error(
            f"--rows must be >= 2 * max(--ks) = {2 * max(args.ks)} so that every K has at "
            f"least two independent batches for a standard error, got {args.rows}"
        )
    return args


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (nats), got {value}")
    return value


def _positive_float(text):
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


# ---------------------------------------------------------------------------
# Eq. 2: the InfoNCE lower bound, and the loss people train with.
# ---------------------------------------------------------------------------
def infonce_bound(scores, reduction="mean"):
    """Eq. 2 (with the 1/K):  f(x, y_1) - log (1/K) sum_i exp f(x, y_i).

    scores: [B, K], column 0 the positive.  Returns a scalar (reduction="mean")
    or the per-row values [B] (reduction="none").  Always <= log K, because the
    positive's term is one of the K terms of the sum.  Precision: module docstring.

    Theorem A.3: for y_2..y_K drawn i.i.d. from p(y), independently of (x, y_1),
    the expectation of this is <= I(X;Y); with the optimal critic
    f*(x, y) = log p(y|x)/p(y) + c(x) it rises with K towards I(X;Y), but never
    above log K, so it saturates at log K when I(X;Y) > log K.

    To copy: infonce_bound
    """
    # Where the paper is loose (checked in tests/test_infonce.py and the demo table):
    # * Sec. 3 calls y_{2:K} "a set of K negative samples"; there are K-1 of them
    #   (Theorem A.3 says K-1), and K - the count inside the 1/K - includes y_1.
    # * The proof of Theorem A.3 uses I(X;Y_1) = I(X;Y_1,Y_{2:K}) "as Y_1 and Y_{2:K}
    #   are independent"; what it needs is Y_{2:K} independent of (X, Y_1) jointly.
    #   In-batch negatives satisfy that (they come from other pairs).
    # * Sec. 3 says InfoNCE "requires a large number of negative samples to reduce
    #   the variance of its estimate".  With the optimal critic the variance is small
    #   (SE <= 0.02 nats in the demo table); what large K fixes is the bias, the cap
    #   at log K.  The high-variance estimator is NWJ (Eq. 14), see nwj_bound.
    if not (
        torch.is_tensor(scores)
        and scores.dim() == 2
        and scores.is_floating_point()
        and scores.numel() > 0
    ):
        raise ValueError(
            f"scores must be a floating-point tensor [B, K] with B >= 1, K >= 1 (column 0 = positive), "
            f"got {tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16 / bf16 -> float32
    # (positive - logsumexp) is <= 0 exactly in floating point (the positive is one
    # of the summands), and adding log K keeps that order, so every row <= log K.
    per_row = scores[:, 0] - torch.logsumexp(scores, dim=1) + math.log(scores.shape[1])
    return per_row.mean() if reduction == "mean" else per_row


def infonce_loss(scores, reduction="mean"):
    """The InfoNCE training loss: cross-entropy with the positive in column 0.

    scores: [B, K] (column 0 = positive).  Returns
        logsumexp_i f(x, y_i) - f(x, y_1)  =  log K - infonce_bound(scores),
    i.e. the negated bound shifted by the constant log K (footnote 1 of the
    paper: the constant does not change the optimum or the gradient).  This is
    the number IR / CPC code reports, and it sits at log K when nothing is
    learned.  Stable for any score scale: a log-softmax (a shifted logsumexp),
    never exp() of a raw score.  Precision: module docstring.

    Gradient: d loss / d scores[b] = (softmax(scores[b]) - e_0) / B for "mean".

    To copy: infonce_loss
    """
    # Footnote 1 calls the two forms (with and without 1/K) "proportional"; they
    # differ by the additive constant log K, which is what matters here: the
    # gradients are identical, and loss = log K - bound holds row by row.
    if not (
        torch.is_tensor(scores)
        and scores.dim() == 2
        and scores.is_floating_point()
        and scores.numel() > 0
    ):
        raise ValueError(
            f"scores must be a floating-point tensor [B, K] with B >= 1, K >= 1 (column 0 = positive), "
            f"got {tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16 / bf16 -> float32
    positive = torch.zeros(
        len(scores), dtype=torch.long, device=scores.device
    )  # the target class: column 0
    return F.cross_entropy(scores, positive, reduction=reduction)


# ---------------------------------------------------------------------------
# Appendix A: the bounds InfoNCE is built from (Lemma A.1, Lemma A.2).
# ---------------------------------------------------------------------------
def ba_bound(log_q_x_given_y, log_p_x, reduction="mean"):
    """Eq. 12, the (normalized) Barber-Agakov bound:  E_p(x,y)[log q(x|y) - log p(x)].

    log_q_x_given_y: [B], log q(x_b | y_b) of a *normalized* variational
    posterior at pairs (x_b, y_b) ~ p(x, y).  log_p_x: [B], log p(x_b).
    Returns the mean (or the [B] per-pair values with reduction="none").

    Lemma A.1: I(X;Y) - I_BA = E_p(y) KL(p(x|y) || q(x|y)) >= 0, so the bound is
    tight exactly when q is the true posterior.  No negatives are needed, which
    is why it needs q normalized: that is the hard part.

    To copy: ba_bound
    """
    for name, values in (("log_q_x_given_y", log_q_x_given_y), ("log_p_x", log_p_x)):
        if not (
            torch.is_tensor(values)
            and values.dim() == 1
            and values.is_floating_point()
            and values.shape == getattr(log_q_x_given_y, "shape", None)
        ):
            raise ValueError(
                f"{name} must be a 1-D floating-point tensor [B] (the same B for both), got "
                f"{tuple(values.shape) if torch.is_tensor(values) else type(values).__name__}"
            )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dtype = torch.promote_types(
        torch.promote_types(log_q_x_given_y.dtype, log_p_x.dtype), torch.float32
    )
    per_pair = log_q_x_given_y.to(dtype) - log_p_x.to(dtype)
    return per_pair.mean() if reduction == "mean" else per_pair


def uba_bound(scores, log_partition, reduction="mean"):
    """Eq. 13, the unnormalized Barber-Agakov bound:  E_p(x,y)[f(x,y) - log Z(y)].

    scores: [B, K] in the project's convention; only column 0, the positive
    f(x_b, y_b), is used (the negatives are not needed because Z is given).
    log_partition: [B], log Z(y_b) with Z(y) = E_p(x)[exp f(x, y)] for the y of
    row b's positive pair.  Note Z(y) averages over x for a fixed y, i.e. down a
    *column* of the all-pairs critic matrix, not along a row of ``scores``.

    Lemma A.1: this is Eq. 12 with q(x|y) = p(x) e^{f(x,y)} / Z(y), so it is a
    bound for any f, tight when f = log p(y|x)/p(y) + c(y) (then log Z(y) = c(y)).

    To copy: uba_bound
    """
    if not (
        torch.is_tensor(scores)
        and scores.dim() == 2
        and scores.is_floating_point()
        and scores.numel() > 0
    ):
        raise ValueError(
            f"scores must be a floating-point tensor [B, K] with B >= 1, K >= 1 (column 0 = positive), "
            f"got {tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}"
        )
    if not (
        torch.is_tensor(log_partition)
        and log_partition.shape == scores.shape[:1]
        and log_partition.is_floating_point()
    ):
        raise ValueError(
            f"log_partition must be a 1-D floating-point tensor of length B={len(scores)}, got "
            f"{tuple(log_partition.shape) if torch.is_tensor(log_partition) else type(log_partition).__name__}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dtype = torch.promote_types(
        torch.promote_types(scores.dtype, log_partition.dtype), torch.float32
    )
    per_row = scores[:, 0].to(dtype) - log_partition.to(dtype)
    return per_row.mean() if reduction == "mean" else per_row


def nwj_bound(scores, reduction="mean"):
    """Eq. 14, the Nguyen-Wainwright-Jordan bound:  E_p(x,y)[f] - E_p(y)[Z(y) / e].

    scores: [B, K] with K >= 2.  Column 0, f(x_b, y_b) with (x_b, y_b) ~ p(x, y),
    estimates the first term.  Columns 1..K-1, f(x_b, y_j) with y_j ~ p(y) drawn
    independently of x_b, are samples from p(x)p(y), so their mean of
    exp(f - 1) estimates the second term: E_p(y)[Z(y)]/e = e^{-1} E_p(x)p(y)[e^f]
    (Eq. 14 as printed writes Z(y)/e, i.e. exactly this e^{-1} E[e^f]).
    Per row: f(x_b, y_b) - (1/(K-1)) sum_{j>=1} exp(f(x_b, y_j) - 1), an unbiased
    estimate of Eq. 14 for every K >= 2 (unlike InfoNCE, whose value depends on K).

    Lemma A.2: Eq. 14 <= Eq. 13 <= I(X;Y), via log Z <= Z/e + log e - 1.  It is
    tight for f = 1 + log p(y|x)/p(y): then E_p[f] = 1 + I(X;Y) and
    e^{-1} E_p(x)p(y)[e^f] = E_p(x)p(y)[p(x,y)/(p(x)p(y))] = 1.  Unlike InfoNCE,
    NWJ is not shift invariant: f = log p(y|x)/p(y) (without the 1) gives I - 1/e.
    Its variance is the catch: Var_p(x)p(y)[e^{f-1}] = e^{2 I} - 1 for the
    optimal critic on Gaussians (see nwj_optimal_stderr), so the estimate gets
    noisy and heavy-tailed once I(X;Y) is a few nats.

    To copy: nwj_bound
    """
    if not (
        torch.is_tensor(scores)
        and scores.dim() == 2
        and scores.is_floating_point()
        and len(scores) > 0
        and scores.shape[1] >= 2
    ):
        raise ValueError(
            f"scores must be a floating-point tensor [B, K] with B >= 1 and K >= 2 for nwj_bound "
            f"(column 0 positive, at least one negative to estimate Z(y)), "
            f"got {tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16 / bf16 -> float32
    # e^{-1} * mean_j exp(f_j), computed through logsumexp so that it overflows only
    # when the value itself does (then the bound really is -inf in that precision).
    second_term = torch.exp(
        torch.logsumexp(scores[:, 1:], dim=1) - math.log(scores.shape[1] - 1) - 1.0
    )
    per_row = scores[:, 0] - second_term
    return per_row.mean() if reduction == "mean" else per_row


# ---------------------------------------------------------------------------
# Standard errors and the in-batch score matrix.
# ---------------------------------------------------------------------------
def mean_and_stderr(replicates):
    """Mean and standard error of independent replicates: [R] -> (float, float).

    SE = sample std (ddof 1) / sqrt(R).  Use it on values that are independent:
    per-batch means of independent batches (rows that share in-batch negatives
    are correlated, so per-row values of one batch are not independent).
    """
    if not torch.is_tensor(replicates) or replicates.dim() != 1 or replicates.shape[0] < 2:
        shape = (
            tuple(replicates.shape) if torch.is_tensor(replicates) else type(replicates).__name__
        )
        raise ValueError(f"replicates must be a 1-D tensor with at least 2 entries, got {shape}")
    values = replicates.double()
    return float(values.mean()), float(values.std() / math.sqrt(values.shape[0]))


def scores_from_critic_matrix(critic_matrix):
    """All-pairs critic values -> the project's score convention.

    critic_matrix: [..., B, B] with f(x_i, y_j) at [i, j] for a batch of B pairs
    (x_i, y_i) ~ p(x, y); the positives sit on the diagonal.  Returns [..., B, B]
    whose column 0 is the diagonal and whose columns 1..B-1 are the row's
    off-diagonal entries in their original order: every other y of the batch is
    a negative for x_i, drawn from p(y) independently of x_i (K = B).
    """
    if (
        not torch.is_tensor(critic_matrix)
        or critic_matrix.dim() < 2
        or critic_matrix.shape[-1] != critic_matrix.shape[-2]
    ):
        shape = (
            tuple(critic_matrix.shape)
            if torch.is_tensor(critic_matrix)
            else type(critic_matrix).__name__
        )
        raise ValueError(f"critic_matrix must be a square [..., B, B] tensor, got {shape}")
    b = critic_matrix.shape[-1]
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=critic_matrix.device)
    negatives = critic_matrix[..., off_diagonal].reshape(*critic_matrix.shape[:-2], b, b - 1)
    positives = critic_matrix.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    return torch.cat([positives, negatives], dim=-1)


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
    if not (math.isfinite(mi) and mi >= 0):
        raise ValueError(f"mi must be a finite number >= 0 nats, got {mi}")
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def optimal_critic(x, y, rho):
    """log p(y_j | x_i) / p(y_j) for every pair: returns [n_x, n_y].

    x: [n_x, dim], y: [n_y, dim] (or batched [..., n_x, dim] and [..., n_y, dim]
    with equal leading dims, giving [..., n_x, n_y]).
    p(y|x) = N(rho x, (1-rho^2) I) and p(y) = N(0, I), so per coordinate
        log p(y|x)/p(y) = -1/2 log(1-rho^2) - (y - rho x)^2 / (2(1-rho^2)) + y^2/2.
    With this critic f* = log p(y|x)/p(y), the expectation of f* over p(x, y)
    is exactly I(X;Y) (Eq. 1).  It is optimal for InfoNCE (Eq. 2), UBA (Eq. 13,
    with log Z = 0) and, shifted by +1, for NWJ (Eq. 14).
    """
    _check_rho(rho)
    if x.dim() < 2 or y.dim() < 2 or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"x and y must be [n, dim] (or [..., n, dim] with equal leading dims) with "
            f"the same dim, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    var = 1.0 - rho * rho
    dim = x.shape[-1]
    y_sq = (y * y).sum(-1).unsqueeze(-2)  # [..., 1, n_y]
    x_sq = (x * x).sum(-1).unsqueeze(-1)  # [..., n_x, 1]
    # (y - rho x)^2 summed over coordinates, for all pairs, without a [n_x, n_y, dim] tensor.
    sq_dist = y_sq - 2.0 * rho * (x @ y.transpose(-1, -2)) + (rho * rho) * x_sq
    return -0.5 * dim * math.log(var) - sq_dist / (2.0 * var) + 0.5 * y_sq


def nwj_optimal_stderr(dim, rho, k, n_batches):
    """Exact standard error of the NWJ estimate with f = 1 + optimal_critic.

    For the estimator used here: n_batches independent batches of k pairs, the
    scores built by scores_from_critic_matrix (in-batch negatives), nwj_bound
    averaged over the batch, then averaged over batches.  With r = p(x,y)/(p(x)p(y)):
        Var(one batch) = Var_p[f*]/k + (Var_p(x)p(y)[r] + Cov_swap) / (k (k-1)),
        Var_p[f*]            = dim rho^2            (per coordinate: Var((y^2-eps^2)/2)),
        Var_p(x)p(y)[r]      = (1-rho^2)^-dim - 1   = e^{2 I} - 1  (chi-square divergence),
        Cov_swap             = (1-rho^4)^-dim - 1   (the terms r(x_i,y_j), r(x_j,y_i) share two pairs).
    Every other covariance vanishes because E_y[r(x, y)] = E_x[r(x, y)] = 1.  The
    e^{2I} term is why the *sample* standard error of NWJ is not trustworthy at
    high MI: the variance sits in rare, huge values of r that a finite sample misses.
    """
    _check_dim(dim)
    _check_rho(rho)
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k}")
    if int(n_batches) != n_batches or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches}")
    rho2 = rho * rho
    var_positive = dim * rho2
    var_ratio = math.expm1(-dim * math.log1p(-rho2))
    cov_swap = math.expm1(-dim * math.log1p(-rho2 * rho2))
    var_batch = var_positive / k + (var_ratio + cov_swap) / (k * (k - 1))
    return math.sqrt(var_batch / n_batches)


# ---------------------------------------------------------------------------
# A learned critic: f(x, y) = g_theta(x)^T g_phi(y) (Eq. 2; Sec. 4's inductive bias).
# ---------------------------------------------------------------------------
class SeparableCritic(torch.nn.Module):
    """The witness of Eq. 2: two encoders, then a dot product.

    Sec. 4: because x and y are encoded *separately* and compared linearly, the
    encoders g_theta, g_phi must carry the whole burden of estimating the MI --
    the inductive bias that makes the representations useful.  (A joint critic
    h(g(x), g(y)) could leave the encoders as near-identities.)
    forward(x [..., n_x, dim], y [..., n_y, dim]) -> all-pairs scores [..., n_x, n_y].
    """

    def __init__(self, dim, hidden=128, embed_dim=32):
        super().__init__()
        _check_dim(dim)
        for name, value in (("hidden", hidden), ("embed_dim", embed_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.g_theta = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, embed_dim)
        )
        self.g_phi = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, embed_dim)
        )

    def forward(self, x, y):
        return self.g_theta(x) @ self.g_phi(y).transpose(-1, -2)


def train_critic(critic, optimizer, dim, rho, k, steps, generator=None):
    """Maximize InfoNCE (minimize infonce_loss) on fresh Gaussian batches.

    Each step draws k pairs, scores every x against every y of the batch (the
    other k-1 y's are the negatives), and takes one optimizer step.  Returns the
    per-step training estimates of the bound, a list of ``steps`` floats.
    """
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2 (in-batch negatives), got {k}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    estimates = []
    for _ in range(steps):
        x, y = sample_correlated_gaussians(k, dim, rho, generator=generator)
        scores = scores_from_critic_matrix(critic(x, y))
        loss = infonce_loss(scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        estimates.append(math.log(k) - loss.item())  # bound = log K - loss
    return estimates


@torch.no_grad()
def bound_replicates(critic, bound, dim, rho, k, n_batches, generator=None, dtype=torch.float32):
    """Per-batch values of ``bound`` on n_batches independent batches: returns [n_batches].

    critic(x [R, k, dim], y [R, k, dim]) -> [R, k, k] all-pairs critic values
    (e.g. ``lambda x, y: optimal_critic(x, y, rho)`` or a SeparableCritic).
    bound: infonce_bound or nwj_bound.  Batches are independent, so
    mean_and_stderr() of the result is an honest mean and standard error.
    """
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k}")
    if int(n_batches) != n_batches or n_batches < 2:
        raise ValueError(
            f"n_batches must be an integer >= 2 (for a standard error), got {n_batches}"
        )
    x, y = sample_correlated_gaussians(n_batches * k, dim, rho, generator=generator, dtype=dtype)
    x, y = x.view(n_batches, k, dim), y.view(n_batches, k, dim)
    scores = scores_from_critic_matrix(critic(x, y))  # [R, k, k], column 0 positive
    per_row = bound(scores.reshape(n_batches * k, k), reduction="none")
    return per_row.view(n_batches, k).mean(dim=1)


# ---------------------------------------------------------------------------
# The demo: every bound vs the closed-form MI, and the learned critic's staircase.
# ---------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    dim = args.dim

    # 1) The learned critic, trained through the staircase: one stair per true MI
    #    (as in the MI-stepping experiment of Poole et al. 2019, ref. [20]), and
    #    evaluated on fresh data at the end of each stair.
    critic = SeparableCritic(dim, args.hidden, args.embed_dim)
    optimizer = torch.optim.Adam(critic.parameters(), lr=args.lr)
    history, learned = [], {}
    print(
        f"training g_theta(x)^T g_phi(y) with InfoNCE (K={args.train_k}), "
        f"{args.steps_per_stage} steps per stair"
    )
    for stage, mi in enumerate(args.mi):
        rho = rho_from_mi(dim, mi)
        stage_start = time.time()
        estimates = train_critic(
            critic, optimizer, dim, rho, args.train_k, args.steps_per_stage, generator
        )
        history.append((mi, estimates))
        for k in args.ks:
            learned[mi, k] = mean_and_stderr(
                bound_replicates(critic, infonce_bound, dim, rho, k, args.rows // k, generator)
            )
        elapsed = time.time() - stage_start
        steps_done = (stage + 1) * args.steps_per_stage
        time_left = elapsed * (len(args.mi) - stage - 1)
        print(
            f"  stair {stage + 1}/{len(args.mi)}  I={mi:5.2f}  step {steps_done:6d}  "
            f"loss {math.log(args.train_k) - sum(estimates[-50:]) / len(estimates[-50:]):.3f}  "
            f"{args.steps_per_stage / elapsed:6.0f} steps/s  ~{time_left:4.1f} s left"
        )

    # 2) The table: each bound with the optimal critic, at each K.
    print(
        f"\nBounds on I(X;Y) for correlated Gaussians, dim={dim}; {args.rows} anchors per "
        f"estimate in rows/K independent batches of K pairs (in-batch negatives);"
    )
    print("'a +- s' = mean +- standard error across batches; [exact] = closed-form SE of NWJ.")
    print(
        "InfoNCE: Eq. 2 with the optimal critic f* = log p(y|x)/p(y).  NWJ: Eq. 14 with its optimal"
    )
    print(
        "critic 1 + f*.  learned: InfoNCE (Eq. 2) of the separable critic at the end of its stair."
    )
    header = (
        f"{'I(X;Y)':>7} {'K':>5} {'log K':>6} | {'InfoNCE (f*)':>16} | "
        f"{'NWJ (1+f*)':>16} {'[exact]':>8} | {'learned InfoNCE':>16}"
    )
    print(header)
    print("-" * len(header))
    for mi in args.mi:
        rho = rho_from_mi(dim, mi)
        for k in args.ks:
            n_batches = args.rows // k
            nce = mean_and_stderr(
                bound_replicates(
                    lambda x, y: optimal_critic(x, y, rho),
                    infonce_bound,
                    dim,
                    rho,
                    k,
                    n_batches,
                    generator,
                )
            )
            nwj = mean_and_stderr(
                bound_replicates(
                    lambda x, y: 1.0 + optimal_critic(x, y, rho),
                    nwj_bound,
                    dim,
                    rho,
                    k,
                    n_batches,
                    generator,
                )
            )
            exact = nwj_optimal_stderr(dim, rho, k, n_batches)
            print(
                f"{mi:7.2f} {k:5d} {math.log(k):6.3f} | {nce[0]:8.3f} +- {nce[1]:5.3f} | "
                f"{nwj[0]:8.3f} +- {nwj[1]:5.3f} {exact:8.3f} | "
                f"{learned[mi, k][0]:8.3f} +- {learned[mi, k][1]:5.3f}"
            )

    print(
        "NWJ's sample SE misses the e^{2I} variance of e^f that rare pairs carry; trust [exact] "
        "(nwj_optimal_stderr)."
    )

    # 3) The K-free bounds (Lemma A.1): they need an exact posterior or partition.
    #    BA with the true posterior p(x|y) = N(rho y, (1-rho^2) I) is tight; note
    #    log p(x|y)/p(x) = f*(x, y), so UBA with f* (log Z = 0) is the same number.
    #    UBA with the bilinear critic f = rho x.y: Z(y) = E_x exp(rho x.y) =
    #    exp(rho^2 |y|^2 / 2), and E[f - log Z] = rho^2 dim - rho^2 dim / 2 = rho^2 dim / 2
    #    < I (-log(1-t) > t).  Lemma A.1's q = p(x) e^f / Z is then N(rho y, I): a
    #    posterior with the right mean and too wide a variance.
    print(f"\nK-free bounds (Appendix A), {args.rows} i.i.d. pairs each, mean +- SE:")
    header = f"{'I(X;Y)':>7} | {'BA q=p(x|y)':>16} | {'UBA f=rho x.y':>16} {'[closed]':>8}"
    print(header)
    print("-" * len(header))
    for mi in args.mi:
        rho = rho_from_mi(dim, mi)
        x, y = sample_correlated_gaussians(
            args.rows, dim, rho, generator=generator, dtype=torch.float64
        )
        var = 1.0 - rho * rho
        log_q = (-0.5 * (x - rho * y) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(1)
        log_p = (-0.5 * x**2 - 0.5 * math.log(2 * math.pi)).sum(1)
        ba = mean_and_stderr(ba_bound(log_q, log_p, "none"))
        positives = (rho * (x * y).sum(1)).view(-1, 1)  # [B, K=1]: column 0 only
        uba = mean_and_stderr(uba_bound(positives, 0.5 * rho * rho * (y * y).sum(1), "none"))
        print(
            f"{mi:7.2f} | {ba[0]:8.3f} +- {ba[1]:5.3f} | {uba[0]:8.3f} +- {uba[1]:5.3f} "
            f"{rho * rho * dim / 2:8.3f}"
        )
    print(f"\nwall time {time.time() - start:.1f} s")

    if args.plot:
        save_staircase(args.plot, history, args.train_k, dim, args.seed)
        print(f"saved {args.plot}")


def save_staircase(path, history, k, dim, seed):
    """The staircase figure: the learned critic's InfoNCE per training step
    against the true MI (which steps up every stair) and the ceiling log K."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(seed + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    step = 0
    for stair, (mi, estimates) in enumerate(history):
        steps = list(range(step, step + len(estimates)))
        rho = rho_from_mi(dim, mi)
        smooth, acc = [], estimates[0]
        for value in estimates:  # exponential moving average, for readability only
            acc = 0.95 * acc + 0.05 * value
            smooth.append(acc)
        optimal = mean_and_stderr(
            bound_replicates(
                lambda x, y: optimal_critic(x, y, rho), infonce_bound, dim, rho, k, 16, generator
            )
        )[0]
        first = stair == 0
        ax.plot(
            steps,
            estimates,
            color="tab:blue",
            alpha=0.25,
            lw=0.8,
            label="learned critic, per batch" if first else None,
        )
        ax.plot(
            steps,
            smooth,
            color="tab:blue",
            lw=1.8,
            label="learned critic, moving average" if first else None,
        )
        ax.plot(
            [steps[0], steps[-1]],
            [mi, mi],
            color="black",
            lw=2,
            label="true I(X;Y)" if first else None,
        )
        ax.plot(
            [steps[0], steps[-1]],
            [optimal, optimal],
            color="tab:orange",
            ls="--",
            lw=1.5,
            label=f"optimal critic f*, K={k}" if first else None,
        )
        step += len(estimates)
    ax.axhline(math.log(k), color="tab:red", ls=":", lw=1.5, label=f"log K = {math.log(k):.2f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("nats")
    ax.set_title(f"InfoNCE (Eq. 2) on correlated Gaussians, dim={dim}: capped at log K")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
