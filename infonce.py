"""InfoNCE and the bounds it is built from, checked against a closed-form mutual information.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning": Sec. 2 (Eq. 1), Sec. 3 (Eq. 2), Sec. 4 (the witness) and
Appendix A (Eq. 12-15, Lemmas A.1-A.2, Theorem A.3).

The idea
--------
I(X;Y) (Eq. 1) cannot be computed for images, but a critic f(x, y) scored on samples bounds
it from below.  Every estimator here reads a score matrix ``scores`` [B, K]: row b holds
f(x_b, y_1), the positive pair, in column 0, and f(x_b, y_i) for K-1 negatives y_2..y_K ~ p(y)
in columns 1..K-1.  K counts the positive, as in Eq. 2.  The test bed has a known answer:
x ~ N(0, I), y = rho x + sqrt(1 - rho^2) eps, so I(X;Y) = -dim/2 log(1 - rho^2) and the
optimal critic f* = log p(y|x)/p(y) is known in closed form.

Paper -> code
-------------
  Eq. 1            gaussian_mi, optimal_critic   the true I(X;Y) and f* of the test bed
  Eq. 2, Eq. 15    infonce_bound                 InfoNCE; infonce_loss = log K - infonce_bound
  Eq. 12           ba_bound                      Barber-Agakov (Lemma A.1)
  Eq. 13           uba_bound                     unnormalized Barber-Agakov (Lemma A.1)
  Eq. 14           nwj_bound                     Nguyen-Wainwright-Jordan (Lemma A.2)
  Sec. 4           SeparableCritic               the witness g_theta(x)^T g_phi(y)

Derivation (Appendix A)
-----------------------
For any normalized q(x|y), multiplying and dividing by q inside Eq. 1 gives
    I(X;Y) = E_p(x,y)[log q(x|y) - log p(x)] + E_p(y) KL(p(x|y) || q(x|y))  >=  I_BA    (Eq. 12)
Take q(x|y) = p(x) e^f(x,y) / Z(y) with Z(y) = E_p(x)[e^f(x,y)]; log p(x) cancels:
    I(X;Y) >= E_p(x,y)[f(x,y)] - E_p(y)[log Z(y)]  =  I_UBA                               (Eq. 13)
log Z needs an integral inside a log; log z <= z/e (the tangent of log at e) removes it:
    I(X;Y) >= E_p(x,y)[f(x,y)] - e^-1 E_p(y)[Z(y)]  =  I_NWJ                              (Eq. 14)
which is unbiased to estimate, with the variance of e^f.  Theorem A.3 applies Eq. 14 to X and
the tuple (Y_1..Y_K), whose MI is I(X;Y_1) when Y_2..K is independent of (X, Y_1), with the
critic 1 + log(e^f(x,y_1) / a), a = (1/K) sum_i e^f(x,y_i).  Under p(x) p(y_1..K) the K slots
are exchangeable, so E[e^f(x,y_1) / a] = 1 and the second term of Eq. 14 is exactly 1:
    I(X;Y) >= E[f(x,y_1) - log (1/K) sum_i e^f(x,y_i)]  =  I_NCE                    (Eq. 2, 15)
Each row is <= log K (the positive is one of the K terms of the mean), so InfoNCE saturates at
log K whatever I(X;Y) is; with f* it rises with K towards I(X;Y).

Where the paper is loose (each shown by the demo table or a test)
-----------------------------------------------------------------
* Sec. 3 calls y_2..K "a set of K negative samples"; there are K-1 of them (Theorem A.3 says
  K-1), and the K inside the 1/K counts y_1.
* The proof of Theorem A.3 uses I(X;Y_1) = I(X;Y_1,Y_2..K) "as Y_1 and Y_2..K are
  independent"; it needs Y_2..K independent of (X, Y_1) jointly.  In-batch negatives (the
  other pairs of a batch) satisfy that.
* Sec. 3 says InfoNCE "requires a large number of negative samples to reduce the variance of
  its estimate".  With f* its standard error is small (<= 0.02 nats in the demo table); what a
  large K fixes is the bias, the cap at log K.  The high-variance estimator is NWJ: the
  variance of e^f* is e^(2I) - 1 (nwj_optimal_stderr).
* Footnote 1 calls the forms with and without the 1/K "proportional"; they differ by the
  additive constant log K, which changes neither the optimum nor the gradient.

Precision, one rule for every bound: arithmetic in float32 (float64 if given float64).  fp16 /
bf16 scores are upcast, because a logsumexp over K terms with an 8-bit mantissa loses the
answer; autograd returns the gradient in the input's dtype.

Run ``python infonce.py`` for every bound against the true MI and a learned critic trained
through a staircase of MIs; ``python infonce.py --plot out/staircase.png`` saves the staircase.
"""

import argparse
import functools
import math
import time

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# Sec. 3, Eq. 2: InfoNCE, and the loss people train with.
# ---------------------------------------------------------------------------
def infonce_bound(scores, reduction="mean"):
    """Eq. 2: f(x, y_1) - log (1/K) sum_i exp f(x, y_i); each row <= log K, E <= I(X;Y).

    scores: [B, K], column 0 the positive.  Returns the mean, or [B] with reduction="none".
    To copy: infonce_bound, _check_scores
    """
    _check_scores(scores, reduction)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> float32
    per_row = scores[:, 0] - torch.logsumexp(scores, dim=1) + math.log(scores.shape[1])
    return per_row.mean() if reduction == "mean" else per_row


def infonce_loss(scores, reduction="mean"):
    """Cross-entropy with the positive as class 0: log K - infonce_bound (footnote 1).

    scores: [B, K], column 0 the positive.  Returns the mean, or [B] with reduction="none".
    To copy: infonce_loss, _check_scores
    """
    _check_scores(scores, reduction)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> float32
    target = scores.new_zeros(len(scores), dtype=torch.long)  # the positive, column 0
    return F.cross_entropy(scores, target, reduction=reduction)


# ---------------------------------------------------------------------------
# Appendix A: the bounds InfoNCE is built from (Lemma A.1, Lemma A.2).
# ---------------------------------------------------------------------------
def ba_bound(log_q_x_given_y, log_p_x, reduction="mean"):
    """Eq. 12, Barber-Agakov: E_p(x,y)[log q(x|y) - log p(x)], q a normalized posterior.

    log_q_x_given_y, log_p_x: [B], at pairs (x_b, y_b) ~ p(x, y).  Mean, or [B] if "none".
    To copy: ba_bound
    """
    if not (log_q_x_given_y.dim() == 1 and log_p_x.shape == log_q_x_given_y.shape):
        raise ValueError(
            f"log_q_x_given_y and log_p_x must both be [B], "
            f"got {tuple(log_q_x_given_y.shape)} and {tuple(log_p_x.shape)}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dtype = torch.promote_types(torch.result_type(log_q_x_given_y, log_p_x), torch.float32)
    per_pair = log_q_x_given_y.to(dtype) - log_p_x.to(dtype)
    return per_pair.mean() if reduction == "mean" else per_pair


def uba_bound(scores, log_partition, reduction="mean"):
    """Eq. 13, unnormalized Barber-Agakov: E_p(x,y)[f(x, y) - log Z(y)], Z(y) = E_p(x)[e^f(x,y)].

    scores: [B, K]; only column 0, f(x_b, y_b), is used.  log_partition: [B], log Z(y_b): an
    average down a column of the all-pairs critic matrix, not along a row of scores.
    To copy: uba_bound, _check_scores
    """
    _check_scores(scores, reduction)
    if log_partition.shape != scores.shape[:1]:
        raise ValueError(
            f"log_partition must be [B={len(scores)}], got {tuple(log_partition.shape)}"
        )
    dtype = torch.promote_types(torch.result_type(scores, log_partition), torch.float32)
    per_row = scores[:, 0].to(dtype) - log_partition.to(dtype)
    return per_row.mean() if reduction == "mean" else per_row


def nwj_bound(scores, reduction="mean"):
    """Eq. 14, Nguyen-Wainwright-Jordan: E_p(x,y)[f(x, y)] - e^-1 E_p(x)p(y)[e^f(x,y)].

    scores: [B, K], K >= 2: column 0 estimates the first term, the negatives (columns 1..K-1,
    drawn from p(y)) the second.  Unbiased for every K; tight for f = 1 + log p(y|x)/p(y).
    To copy: nwj_bound, _check_scores
    """
    _check_scores(scores, reduction, min_k=2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> float32
    # e^-1 mean_j e^f_j through logsumexp: it overflows only where the value itself does.
    second = torch.exp(torch.logsumexp(scores[:, 1:], dim=1) - math.log(scores.shape[1] - 1) - 1.0)
    per_row = scores[:, 0] - second
    return per_row.mean() if reduction == "mean" else per_row


# ---------------------------------------------------------------------------
# Helpers: the one argument check every bound shares, standard errors, in-batch scores.
# ---------------------------------------------------------------------------
def _check_scores(scores, reduction, min_k=1):
    ok = scores.dim() == 2 and scores.is_floating_point() and len(scores) >= 1
    if not (ok and scores.shape[1] >= min_k):
        raise ValueError(f"scores must be float [B >= 1, K >= {min_k}], got {tuple(scores.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


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
# The test bed: correlated Gaussians, whose mutual information is known exactly (Eq. 1).
# ---------------------------------------------------------------------------
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
    """Exact standard error of the NWJ estimate with f = 1 + optimal_critic, as bound_replicates
    computes it: n_batches independent batches of k pairs with in-batch negatives.

    With r = p(x,y) / (p(x)p(y)), one batch has variance
        Var_p[f*] / k + (Var_p(x)p(y)[r] + Cov_swap) / (k (k-1)),   where
        Var_p[f*] = dim rho^2,   Var_p(x)p(y)[r] = (1-rho^2)^-dim - 1 = e^(2I) - 1,
        Cov_swap = (1-rho^4)^-dim - 1   (r(x_i, y_j) and r(x_j, y_i) share two pairs);
    every other covariance vanishes since E_y[r] = E_x[r] = 1.  The e^(2I) term sits in rare,
    huge r that a finite sample misses: NWJ's sample standard error is not trustworthy.
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


def _check_rho(rho):
    if not (-1.0 < float(rho) < 1.0):
        raise ValueError(f"rho must lie in the open interval (-1, 1), got {rho}")


def _check_dim(dim):
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")


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
# The demo (python infonce.py): every bound vs the closed-form MI, the learned critic's
# staircase; then its argument parser and the staircase figure.
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
        f_star = functools.partial(optimal_critic, rho=rho)
        for k in args.ks:
            n_batches = args.rows // k
            draw = (dim, rho, k, n_batches, generator)
            nce = mean_and_stderr(bound_replicates(f_star, infonce_bound, *draw))
            nwj_star = lambda x, y, f=f_star: 1.0 + f(x, y)  # noqa: E731 (NWJ's optimum: 1 + f*)
            nwj = mean_and_stderr(bound_replicates(nwj_star, nwj_bound, *draw))
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


def parse_args(argv=None):
    parser = _Parser(
        prog="infonce.py",
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
        help="torch CPU threads (the matrices here are small)",
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
                functools.partial(optimal_critic, rho=rho),
                infonce_bound,
                dim,
                rho,
                k,
                16,
                generator,
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
