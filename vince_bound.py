"""VINCE: InfoNCE with negatives drawn from a proposal q(y_i | y_1) instead of p(y).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning": Sec. 3 (Theorem 3.1, Corollaries 3.1.1
and 3.1.2, Examples 1-4, Eq. 3 and Eq. 4), Sec. 5.1 (the masked-language-model
reading), Appendix B (proof of Theorem 3.1) and Appendix C (VINCE+, Lemma C.1).

Convention (the same as infonce.py)
-----------------------------------
``scores`` is ``[B, K]``: column 0 holds f(x_b, y_1), the positive pair; columns
1..K-1 hold f(x_b, y_i) for the negatives y_2..y_K, which here are drawn from a
proposal q(y_i | y_1).  ``log_weights`` is ``[B]``: the log of the importance
weight of row b,  log W_b = sum_{i>=2} log p(y_i) / q(y_i | y_1).

What this file shows (run ``python vince_bound.py``; each claim is a test)
--------------------------------------------------------------------------
Write  l = f(x, y_1) - log (1/K) sum_{i=1..K} exp f(x, y_i)   (the InfoNCE term).

(i)   InfoNCE <= I(X;Y)                       (Theorem A.3; infonce.py).
(ii)  VINCE   <= I(X;Y) for every proposal    (Theorem 3.1) ... but see (iii).
(iii) The range of VINCE.  l <= log K for any scores (the positive is one of the
      K terms of the mean), W >= 0, and with correct weights E_q[W] =
      P_p(negatives inside supp q) <= 1.  Hence  E[W l] <= log K * E[W] <= log K:
            E[VINCE] = E[W l] - K + 1  <=  log K - K + 1        (Appendix B's form)
      and, for Eq. 3 exactly as printed (sum without the 1/K, so l - log K <= 0),
            VINCE <= 1 - K   (row by row).
      The cap is sharp (a critic that separates the positive perfectly reaches it).
      For K = 1 VINCE is identically 0; for every K >= 2 its expectation is
      negative (K = 16: <= -12.23, K = 128: <= -122.15), so "I >= VINCE" already
      follows from I >= 0, and VINCE can never report a positive number of nats.
      Where the -K + 1 comes from: Appendix B bounds
          L = E_{p(x) p(y_1..K)}[exp f(x, y_1) / a(x, y_1..K)]  by  K,
      but L is an expectation under p alone (the change of measure to q is an
      identity), and Theorem A.3's symmetry argument gives L = 1 exactly.  With
      L = 1 the same proof gives the tight statement
          E_{p(x, y_1) q(y_2..K | y_1)}[W l] = I^NCE(K)  whenever supp q covers supp p,
      i.e. E[VINCE] = InfoNCE(K) - (K - 1) for EVERY such proposal: the proposal
      changes only the variance of the estimate (through W), never its mean.
      As an estimate, then, VINCE is InfoNCE(K) minus a constant, with more
      variance (W degenerates as K grows: the sample mean of W falls far below 1);
      as an objective, the constant has no gradient and W does not depend on the
      critic, so the weighted term has the same expectation and gradient in the
      critic as InfoNCE with p-negatives.  Hard or easy negatives change what is
      optimized only once the weights are dropped (Eq. 4) -- and then (iv) applies.
(iv)  Eq. 4 (weights and constants dropped) is NOT a lower bound in general.
      Gaussians, I = 2 nats, K = 128: easy negatives (Example 1) push it well
      above I, hard ones (Example 2, a high band) keep it below; when I > log K
      everything stays below (Eq. 4 <= log K for any scores).  Vocabulary:
      uniform or tempered negatives raise it above InfoNCE; the MLM reading of
      Sec. 5.1 (every token of the vocabulary once, no weights) is >= I at the
      optimal critic and equals I + KL(p(y) || uniform) at its own optimum.
(v)   With q = p every weight is 1 and VINCE = InfoNCE - (K - 1) row by row
      (Eq. 3 as printed: InfoNCE - log K - (K - 1)).

Also checked: Corollary 3.1.2 multiplies W >= c by l, valid only where l >= 0
(a poor critic violates it; with Eq. 3 as printed it is reversed).  Example 4
read literally (q~ = p/t, renormalized) is p itself; tempering means p^(1/t).
Lemma C.1 (VINCE+) is wrong as printed; see the block above vince_plus_objective.

Normalizing the rejection-sampling proposal (Corollary 3.1.1)
-------------------------------------------------------------
The paper writes q(y | y_1) = r(y | y_1) p(y).  That integrates to
Z_r(y_1) = E_p[r(y | y_1)] <= 1, so it is not a density unless r == 1.  The
density rejection sampling actually draws from is q = r p / Z_r(y_1), hence
    p(y_i) / q(y_i | y_1) = Z_r(y_1) / r(y_i | y_1),   log W = (K-1) log Z_r - sum log r.
The paper's weight prod 1/r is too large by Z_r^-(K-1): its mean under q is
Z_r^-(K-1), not 1, and with the 1/K inside the log (the form the proof and the
corollaries use) the "bound" can then exceed I(X;Y) -- the demo shows it with
a constant acceptance r = c, whose q is exactly p.  Z_r(y_1) is estimated here
by Monte Carlo over fresh draws from p, and its standard error is reported
together with the error it induces on log W, which is (K-1) se(Z)/Z.
Examples 1 and 2 are hard thresholds: r = 0 outside the accepted region, which
breaks the condition r in (0, 1] of Corollary 3.1.1 and the same-support
condition of Theorem 3.1.  With the normalized weights the estimator then sees
E_q[W l] = E_p[l * 1{every negative accepted}], and W = Z_r^(K-1) is tiny.
"""

import argparse
import math
import time

import torch

from infonce import infonce_bound, rho_from_mi, sample_correlated_gaussians


# ---------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------
def _check_row_vector(value, name, rows):
    if not torch.is_tensor(value) or value.shape != (rows,):
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per row of scores, shape ({rows},), got {got}"
        )


def _check_k(k):
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"K must be an integer >= 1 (the positive plus K-1 negatives), got {k}")


# ---------------------------------------------------------------------------
# Eq. 3 (Theorem 3.1), Eq. 4, the range of Eq. 3, and Corollary 3.1.2.
# ---------------------------------------------------------------------------
def vince_bound(scores, log_weights, reduction="mean", one_over_k=True):
    """Theorem 3.1 / Eq. 3:  W * (f(x, y_1) - log a(x, y_1..K)) - K + 1.

    scores:      [B, K], column 0 the positive, columns 1..K-1 negatives from q(. | y_1).
    log_weights: [B], log W_b = sum_{i>=2} log p(y_i) / q(y_i | y_1).  Zeros when q = p.
    one_over_k:  True  -> a = (1/K) sum_i exp f(x, y_i), the a of Appendix B's proof and
                          of Corollaries 3.1.1-3.1.2 (default);
                 False -> Eq. 3 exactly as printed, a = sum_i exp f(x, y_i), which is
                          lower by W log K (the printed equation drops the 1/K).
    Returns the mean over rows (the estimate) or the per-row values [B].
    Its expectation is <= log K - K + 1 (<= 1 - K printed): see vince_cap.
    Computed in float32 (float64 if given float64: use it for large K, W can span
    hundreds of orders of magnitude); fp16 / bf16 inputs are upcast.

    To copy: vince_bound
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
    if not (torch.is_tensor(log_weights) and log_weights.shape == scores.shape[:1]):
        raise ValueError(
            f"log_weights must be a 1-D tensor with one entry per row of scores, shape ({len(scores)},), "
            f"got {tuple(log_weights.shape) if torch.is_tensor(log_weights) else type(log_weights).__name__}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16 / bf16 -> float32
    k = scores.shape[1]
    # l = f(x, y_1) - log (1/K) sum_i exp f(x, y_i); without the 1/K (Eq. 3 as printed) it is lower by log K.
    l = scores[:, 0] - torch.logsumexp(scores, dim=1) + (math.log(k) if one_over_k else 0.0)
    per_row = torch.exp(log_weights.to(scores.dtype)) * l - (k - 1)
    return per_row.mean() if reduction == "mean" else per_row


def vince_surrogate(scores, reduction="mean"):
    """Eq. 4: f(x, y_1) - log (1/K) sum_i exp f(x, y_i), negatives from q, no weights, no -K+1.

    scores: [B, K] (column 0 = positive).  This is exactly the formula of Eq. 2, so it
    calls infonce.infonce_bound (copy that one); what differs is where the negatives came
    from.  It is what people train with, and it is not covered by Theorem 3.1 (see (iv)).
    """
    return infonce_bound(scores, reduction=reduction)


def vince_cap(k, one_over_k=True):
    """The largest value the expectation of Eq. 3 can take for a given K (derivation (iii)).

    one_over_k=True:  log K - K + 1   (l <= log K, W >= 0, E_q[W] <= 1)
    one_over_k=False: 1 - K           (Eq. 3 as printed: l - log K <= 0)
    Zero for K = 1, negative for every K >= 2 (while I(X;Y) >= 0).
    """
    _check_k(k)
    return (math.log(k) if one_over_k else 0.0) - (k - 1)


def corollary_3_1_2_bound(scores, log_c, reduction="mean", one_over_k=True):
    """Corollary 3.1.2's claimed lower bound on VINCE:  c * l - K + 1,  c = prod_i c_i.

    scores: [B, K] with negatives from q;  log_c: float (or [B]) = sum_{i>=2} log inf p/q.
    c_i <= 1 always (two normalized densities cannot have p/q > 1 everywhere); log_c > 0
    is refused for values on the CPU.  Precision as for vince_bound.
    CAUTION: the corollary's proof multiplies W >= c by l, which needs l >= 0.  Where
    l < 0 the inequality reverses: VINCE - bound = E[(W - c) l] can be negative (the
    tests exhibit this exactly), and for Eq. 3 as printed (l' <= 0 always) the
    corollary gives an upper bound on VINCE, not a lower one.  It is still below
    I(X;Y), but only because it is <= log K - K + 1 <= 0 as well.

    To copy: corollary_3_1_2_bound
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
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16 / bf16 -> float32
    log_c = torch.as_tensor(
        log_c, dtype=scores.dtype, device=scores.device if torch.is_tensor(log_c) else "cpu"
    )
    if log_c.shape not in ((), scores.shape[:1]):
        raise ValueError(
            f"log_c must be a float or a [B] = [{len(scores)}] tensor, got shape {tuple(log_c.shape)}"
        )
    if log_c.device.type == "cpu" and (log_c > 0).any():
        raise ValueError(
            f"log_c must be <= 0 (c_i = inf p/q <= 1 for normalized p, q), got max {float(log_c.max())}"
        )
    k = scores.shape[1]
    l = (
        scores[:, 0] - torch.logsumexp(scores, dim=1) + (math.log(k) if one_over_k else 0.0)
    )  # as in vince_bound
    per_row = (torch.exp(log_c) * l - (k - 1)).expand(len(scores))
    return per_row.mean() if reduction == "mean" else per_row


# ---------------------------------------------------------------------------
# The Gaussian problem of infonce.py: p(y) = N(0, I), y = rho x + sqrt(1-rho^2) eps.
# ---------------------------------------------------------------------------
def optimal_scores(x, y_pos, y_neg, rho):
    """Row-wise optimal critic f*(x, y) = log p(y|x)/p(y) (same formula as infonce.optimal_critic).

    x, y_pos: [B, d];  y_neg: [B, K-1, d] (negatives of row b).  Returns scores [B, K].
    Per row:  f*(x, y) = (2 rho x.y - rho^2 (|x|^2 + |y|^2)) / (2 (1 - rho^2)) - d/2 log(1 - rho^2).
    """
    if not (-1.0 < float(rho) < 1.0):
        raise ValueError(f"rho must lie in (-1, 1), got {rho}")
    if (
        x.dim() != 2
        or y_pos.shape != x.shape
        or y_neg.dim() != 3
        or y_neg.shape[0] != x.shape[0]
        or y_neg.shape[2] != x.shape[1]
    ):
        raise ValueError(
            f"need x, y_pos [B, d] and y_neg [B, K-1, d]; got {tuple(x.shape)}, "
            f"{tuple(y_pos.shape)}, {tuple(y_neg.shape)}"
        )
    ys = torch.cat([y_pos[:, None, :], y_neg], dim=1)  # [B, K, d]
    var = 1.0 - rho * rho
    xy = torch.einsum("bd,bkd->bk", x, ys)
    sq = (x * x).sum(1, keepdim=True) + (ys * ys).sum(2)
    return (2.0 * rho * xy - rho * rho * sq) / (2.0 * var) - 0.5 * x.shape[1] * math.log(var)


def similarity01(y1, y):
    """The similarity f: Y x Y -> [0, 1] of Examples 1-2: (1 + cos(y_1, y)) / 2.

    y1: [B, d];  y: [B, M, d] (candidates for row b).  Returns [B, M].
    """
    cos = torch.einsum("bd,bmd->bm", y1, y) / (
        y1.norm(dim=1, keepdim=True) * y.norm(dim=2)
    ).clamp_min(1e-30)
    return 0.5 * (1.0 + cos)


# Acceptance functions map similarities s in [0, 1] (any shape) to acceptance probabilities r.
def threshold_acceptance(t):
    """Example 1: accept y_i iff s(y_1, y_i) <= t, t in (0, 1]  (keeps easy, dissimilar negatives)."""
    if not (0.0 < t <= 1.0):
        raise ValueError(f"t (Example 1 threshold) must lie in (0, 1], got {t}")
    return lambda s: (s <= t).to(s.dtype)


def band_acceptance(l, u):
    """Example 2: accept y_i iff l <= s(y_1, y_i) <= u, 0 <= l <= u <= 1 (a high band keeps hard negatives)."""
    if not (0.0 <= l <= 1.0):
        raise ValueError(f"l (Example 2 lower threshold) must lie in [0, 1], got {l}")
    if not (l <= u <= 1.0):
        raise ValueError(f"u (Example 2 upper threshold) must lie in [l, 1] = [{l}, 1], got {u}")
    return lambda s: ((s >= l) & (s <= u)).to(s.dtype)


def sigmoid_acceptance(bias, weight):
    """r = sigmoid(bias + weight * s) in (0, 1): a soft acceptance with full support
    (the r_psi of VINCE+, Appendix C, with psi = (bias, weight)); weight > 0 prefers hard negatives."""
    return lambda s: torch.sigmoid(bias + weight * s)


def constant_acceptance(c):
    """r == c in (0, 1]: a valid rejection sampler whose normalized q is exactly p."""
    if not (0.0 < c <= 1.0):
        raise ValueError(f"c (constant acceptance probability) must lie in (0, 1], got {c}")
    return lambda s: torch.full_like(s, c)


def rejection_sample(y1, n_neg, acceptance, generator=None, max_proposals=1_000_000):
    """Corollary 3.1.1: n_neg i.i.d. draws per row from q(y | y_1) = r(y | y_1) p(y) / Z_r(y_1).

    y1: [B, d];  acceptance: similarity s(y_1, y) in [0, 1] -> r in [0, 1] (see above).
    Candidates come from p = N(0, I); each is kept with probability r.  Rows that still
    need negatives get new candidates, so the kept ones are the first n_neg accepted of an
    i.i.d. stream, hence i.i.d. from q (how many candidates a round draws depends only on
    past acceptance counts, never on the candidates' values).
    Returns (negatives [B, n_neg, d], r at them [B, n_neg]).
    """
    if int(n_neg) != n_neg or n_neg < 0:
        raise ValueError(f"n_neg must be an integer >= 0, got {n_neg}")
    b, d = y1.shape
    out = torch.empty(b, n_neg, d, dtype=y1.dtype)
    r_out = torch.empty(b, n_neg, dtype=y1.dtype)
    filled = torch.zeros(b, dtype=torch.long)
    proposed, accepted_total, rate = 0, 0, 0.5
    while (filled < n_neg).any():
        rows = (filled < n_neg).nonzero().squeeze(1)
        need = (n_neg - filled[rows]).max().item()
        m = int(1.25 * need / rate) + 16  # enough candidates for most rows in one round
        # Candidates drawn in float32 (4x faster on CPU) and widened exactly to y1's dtype.
        cand = torch.randn(len(rows), m, d, generator=generator, dtype=torch.float32).to(y1.dtype)
        r = acceptance(similarity01(y1[rows], cand))
        accepted = torch.rand(len(rows), m, generator=generator, dtype=y1.dtype) < r
        slot = (
            torch.cumsum(accepted, dim=1) - 1 + filled[rows, None]
        )  # where each accepted one goes
        keep = accepted & (slot < n_neg)
        ri, ci = keep.nonzero(as_tuple=True)
        out[rows[ri], slot[ri, ci]] = cand[ri, ci]
        r_out[rows[ri], slot[ri, ci]] = r[ri, ci]
        filled[rows] = torch.clamp(filled[rows] + accepted.sum(1), max=n_neg)
        proposed += m * len(rows)
        accepted_total += accepted.sum().item()
        rate = max(
            accepted_total / proposed, 1e-3
        )  # running acceptance rate (only sets the next m)
        if proposed > max_proposals * b:
            raise ValueError(
                f"acceptance accepts almost nothing: fewer than {n_neg} of {proposed // b} "
                f"candidates per row accepted for some rows; widen t / [l, u] or raise max_proposals"
            )
    return out, r_out


def rejection_log_weights(r, z, normalized=True):
    """log W = sum_{i>=2} log p(y_i)/q(y_i | y_1) for the rejection-sampling proposal (Cor. 3.1.1).

    r: [B, K-1] acceptance probabilities at the drawn negatives;  z: [B] the normalizer
    Z_r(y_1) (e.g. from estimate_acceptance_rate).  Returns [B]:
        normalized=True:  (K-1) log Z_r(y_1) - sum_i log r(y_i | y_1)   (q = r p / Z_r, a density)
        normalized=False: -sum_i log r(y_i | y_1)                        (the paper's q = r p)
    """
    if not torch.is_tensor(r) or r.dim() != 2:
        raise ValueError(
            f"r must be a [B, K-1] tensor of acceptance probabilities, got {getattr(r, 'shape', r)}"
        )
    if (r <= 0).any() or (r > 1).any():
        raise ValueError(
            "r must lie in (0, 1] at every drawn negative (a drawn negative was accepted)"
        )
    log_w = -r.log().sum(1)
    if not normalized:
        return log_w
    _check_row_vector(z, "z", r.shape[0])
    if (z <= 0).any() or (z > 1).any():
        raise ValueError(
            f"z (the normalizer Z_r = E_p[r]) must lie in (0, 1], got range "
            f"[{z.min().item()}, {z.max().item()}]; raise the Monte Carlo sample size"
        )
    return r.shape[1] * z.log() + log_w


def estimate_acceptance_rate(y1, acceptance, n_samples, generator=None, chunk=8192):
    """Monte Carlo estimate of the normalizer Z_r(y_1) = E_{p(y)}[r(y | y_1)], with its standard error.

    y1: [B, d].  Draws n_samples fresh y ~ p (one pool shared by all rows, so each row's
    estimate is unbiased; rows are correlated).  Returns (z [B], se [B]).
    """
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples}")
    b, d = y1.shape
    total = torch.zeros(b, dtype=y1.dtype)
    total_sq = torch.zeros(b, dtype=y1.dtype)
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        pool = torch.randn(m, d, generator=generator, dtype=torch.float32)
        # float32 is plenty for a Monte Carlo average (its error is se, not 1e-7); sums in y1's dtype.
        cos = (y1 / y1.norm(dim=1, keepdim=True)).float() @ (
            pool / pool.norm(dim=1, keepdim=True)
        ).T  # [B, m]
        r = acceptance(0.5 * (1.0 + cos)).to(y1.dtype)
        total += r.sum(1)
        total_sq += (r * r).sum(1)
        done += m
    z = total / n_samples
    var = (total_sq / n_samples - z * z).clamp_min(0.0) * n_samples / (n_samples - 1)
    return z, (var / n_samples).sqrt()


def gaussian_tempered_proposal(n, n_neg, dim, t, generator=None, dtype=torch.float64):
    """Example 4 on the Gaussian problem: q(y) proportional to p(y)^(1/t) = N(0, t I).

    Read literally, Example 4's q~ = p / t renormalizes back to p (t cancels); a tempered p
    must mean p^(1/t).  Returns (negatives [n, n_neg, dim], log_weights [n], log_c float):
        log p(y)/q(y) = dim/2 log t - |y|^2 / 2 * (1 - 1/t),
    whose infimum is dim/2 log t at y = 0 when t <= 1 (Corollary 3.1.2's c_i); for t > 1
    q has heavier tails than p, inf p/q = 0 and log_c = -inf (no bounded ratio).
    """
    if not (t > 0.0):
        raise ValueError(f"t (Example 4 temperature) must be > 0, got {t}")
    y = math.sqrt(t) * torch.randn(n, n_neg, dim, generator=generator, dtype=dtype)
    log_ratio = 0.5 * dim * math.log(t) - 0.5 * (y * y).sum(2) * (1.0 - 1.0 / t)
    log_c_i = 0.5 * dim * math.log(t) if t <= 1.0 else -math.inf
    return y, log_ratio.sum(1), (n_neg * log_c_i if n_neg else 0.0)


# ---------------------------------------------------------------------------
# A vocabulary with unequal token frequencies (the MLM reading of Sec. 5.1).
# Bounded support, so Example 3's uniform q exists and Corollary 3.1.2's c_i > 0.
#   p(y) = Zipf over V tokens;  x ~ p;  y = x with probability `keep`, else y ~ p.
# Then p(y) is the same Zipf, the MI is a finite sum, and the optimal critic is
#   f*(x, y) = log p(y | x) / p(y) = log(keep * 1{x = y} / p(y) + 1 - keep).
# ---------------------------------------------------------------------------
def zipf_marginal(vocab, exponent=1.0, dtype=torch.float64):
    """p(w) proportional to 1 / (rank + 1)^exponent over `vocab` tokens: [V]."""
    if int(vocab) != vocab or vocab < 2:
        raise ValueError(f"vocab must be an integer >= 2, got {vocab}")
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    w = torch.arange(1, vocab + 1, dtype=dtype) ** (-float(exponent))
    return w / w.sum()


def copy_channel_joint(p, keep):
    """P[x, y] = p(x) (keep * 1{x = y} + (1 - keep) p(y)): a [V, V] joint whose marginals are both p."""
    if not (0.0 <= keep < 1.0):
        raise ValueError(f"keep (probability that y copies x) must lie in [0, 1), got {keep}")
    return p[:, None] * (keep * torch.eye(len(p), dtype=p.dtype) + (1.0 - keep) * p[None, :])


def discrete_mi(joint):
    """I(X;Y) in nats of a [V_x, V_y] joint probability table (Eq. 1 as a finite sum)."""
    px, py = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return (joint[nz] * (joint[nz].log() - (px * py).expand_as(joint)[nz].log())).sum().item()


def discrete_optimal_critic(joint):
    """f*(x, y) = log p(y | x) / p(y) = log P[x, y] / (p(x) p(y)): [V_x, V_y] (-inf where P = 0)."""
    px, py = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return joint.log() - (px * py).log()


def tempered(p, t):
    """Example 4 on a vocabulary: q proportional to p^(1/t) (t = 4/3 is word2vec's unigram^0.75).
    t -> infinity gives Example 3's uniform q."""
    if not (t > 0.0):
        raise ValueError(f"t (Example 4 temperature) must be > 0, got {t}")
    logq = p.log() / t
    return torch.softmax(logq, dim=0)


def mlm_full_vocabulary_value(joint, critic):
    """Sec. 5.1's I^MLM: E_{p(x,y)}[f(x, y) - log (1/|V|) sum_{w in V} exp f(x, w)], exactly.

    Every token of the vocabulary enters once (uniform negatives, no weights): Eq. 4's
    form with q = uniform.  Its maximum over critics is reached at f = log p(y|x) and equals
        E[log p(y|x)] + log |V| = I(X;Y) + KL(p(y) || uniform) >= I(X;Y),
    so it is not a lower bound on I(X;Y) unless p(y) is uniform.
    """
    v = joint.shape[1]
    lse = torch.logsumexp(critic, dim=1, keepdim=True) - math.log(v)
    term = torch.where(joint > 0, critic - lse, torch.zeros_like(critic))
    return (joint * term).sum().item()


def enumerate_negatives(vocab, k):
    """All (K-1)-tuples of token ids: [V^(K-1), K-1].  For exact expectations on tiny problems."""
    _check_k(k)
    if k == 1:
        return torch.zeros(1, 0, dtype=torch.long)
    grids = torch.meshgrid(*[torch.arange(vocab)] * (k - 1), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _enumerated_l(critic, tuples, k, one_over_k=True):
    # l[x, y1, T] = f(x, y1) - log (1/K) sum_i exp f(x, y_i) for every anchor pair and negative tuple T.
    v = critic.shape[0]
    f_all = torch.cat(
        [
            critic[:, :, None, None].expand(v, v, len(tuples), 1),
            critic[:, tuples][:, None].expand(v, v, len(tuples), k - 1),
        ],
        dim=3,
    )  # [x, y1, T, K]
    return critic[:, :, None] - torch.logsumexp(f_all, dim=3) + (math.log(k) if one_over_k else 0.0)


def exact_weighted_infonce(joint, critic, q, k, one_over_k=True):
    """Exact expectations over p(x, y_1) q(y_2..K | y_1) by enumeration (tiny V and K only).

    joint, critic: [V, V];  q: [V] (q(y)) or [V, V] (row y_1 holds q(. | y_1)); zeros allowed
    (restricted support: W is then p/q on q's support, as an estimator would compute it).
    Returns (E[W l], E[l] (Eq. 4: no weights), E[c l] (Corollary 3.1.2, c = prod_i inf p/q)).
    E[W l] equals InfoNCE(K) (q = p) exactly when q > 0 wherever p > 0: importance sampling.
    """
    _check_k(k)
    v = joint.shape[0]
    p = joint.sum(0)
    qq = q.expand(v, v) if q.dim() == 1 else q  # [y1, y]
    tuples = enumerate_negatives(v, k)  # [T, K-1]
    log_q = qq.log()[:, tuples].sum(2)  # [y1, T]
    log_w = p.log()[tuples].sum(1)[None, :] - log_q  # [y1, T]
    ratio = torch.where(qq > 0, p[None, :] / qq, torch.full_like(qq, math.inf))
    log_c = (k - 1) * ratio.min(dim=1).values.log()  # [y1]
    l = _enumerated_l(critic, tuples, k, one_over_k)  # [x, y1, T]
    prob = joint[:, :, None] * log_q.exp()[None]  # p(x, y1) q(y_2..K | y1)
    keep = prob > 0  # skip impossible cells (0 * inf)
    e_wl = (prob * log_w.exp()[None] * l)[keep].sum().item()
    e_l = (prob * l)[keep].sum().item()
    e_cl = (prob * log_c.exp()[None, :, None] * l)[keep].sum().item()
    return e_wl, e_l, e_cl


# ---------------------------------------------------------------------------
# VINCE+ (Appendix C): a learned acceptance r_psi(y | y_1) = sigmoid(psi_0 + psi_1 s(y_1, y)).
#
# Eq. 17 puts prod_j 1/r_psi(y_j|y_1) outside the inner expectation, where y_j is not
# bound; the only reading in which Lemma C.1's terms make sense is
#     J(psi) = E_{p(x,y_1)} E_{q_psi(y_2..K | y_1)}[ W_psi * (f(x,y_1) - log (1/K) sum_i exp f(x,y_i)) ]
# with W_psi = prod_j 1/r_psi(y_j|y_1) (Eq. 17's weight).  Write g = f(x,y_1) - LSE for the bracket.
#
# What Lemma C.1 gets wrong (each checked below against autograd on an enumerated problem):
#  * L1 = E_q[W f(x,y_1)]: the printed gradient is f * sum_i (-1/r_i^2) prod_{j!=i} 1/r_j, with
#    no grad r_i factor (it is a number, not a vector in psi-space); with grad r_i restored it is
#    the pathwise term f grad W only.  The y_j inside L1 are sampled from q_psi too, so L1 needs
#    the same score-function term as L2: E_q[W f grad log q_psi].  The printed lemma has none.
#  * L2 (score function) is derived for q = r p, which is not normalized; the sampler's density
#    is q = r p / Z_psi(y_1), whose score is sum_j grad log r_j - (K-1) grad log Z_psi(y_1).
#  * L3 (pathwise, the chain rule on 1/r) is right, but L2 + L3 = 0 sample by sample:
#    W LSE sum_j grad log r_j + LSE grad W = 0 because grad W = -W sum_j grad log r_j.
# Corrected, for any weight W_psi and q_psi = r_psi p / Z_psi:
#     grad J = E_{p(x,y_1)} E_q[ W g (sum_j grad log r_j - (K-1) grad log Z) + g grad W ]
#            = -(K-1) E[ grad log Z_psi(y_1) * W g ]       (Eq. 17's W = prod 1/r)
#            = 0                                           (true W = Z^(K-1) prod 1/r = p/q)
# So with correct weights the acceptance function cannot change the objective at all (only
# the variance of its estimate), and with Eq. 17's weights the only effect of psi is to rescale
# each anchor by Z_psi(y_1)^-(K-1).  For the paper's unnormalized "q = r p", J does not depend
# on psi either (q W = p) and the true gradient is 0, while the printed lemma is not.
# Where psi does matter is Eq. 4 with q_psi negatives (weights dropped); its gradient is the
# score-function term alone:  grad E_q[g] = E_q[g (sum_j grad log r_j - (K-1) grad log Z_psi)].
# ---------------------------------------------------------------------------
def _check_weights(weights):
    if weights not in ("paper", "true", "none"):
        raise ValueError(f"weights must be 'paper', 'true' or 'none', got {weights!r}")


def vince_plus_objective(psi, joint, critic, similarity, k, weights="paper", normalized=True):
    """J(psi) of Eq. 17 (reading above), exactly, by enumerating all negative tuples.

    psi: [2] tensor (bias, weight) of r_psi = sigmoid(psi_0 + psi_1 * similarity);
    joint, critic, similarity: [V, V];  weights: "paper" (W = prod 1/r, Eq. 17), "true"
    (W = prod p/q = Z^(K-1) prod 1/r) or "none" (W = 1: Eq. 4 with q_psi negatives);
    normalized: q = r p / Z (True, what rejection sampling draws) or the paper's
    unnormalized q = r p (False).  Differentiable in psi.
    """
    _check_weights(weights)
    _check_k(k)
    p = joint.sum(0)
    r = torch.sigmoid(psi[0] + psi[1] * similarity)  # [y1, y]
    log_z = (p[None, :] * r).sum(1).log()  # [y1]
    tuples = enumerate_negatives(len(p), k)
    log_r = r.log()[:, tuples].sum(2)  # [y1, T] sum_j log r_j
    log_q = (
        log_r + p.log()[tuples].sum(1)[None, :] - ((k - 1) * log_z[:, None] if normalized else 0.0)
    )
    log_w = {"paper": -log_r, "true": -log_r + (k - 1) * log_z[:, None], "none": 0.0 * log_r}[
        weights
    ]
    g = _enumerated_l(critic, tuples, k)  # [x, y1, T]
    return (joint[:, :, None] * (log_q + log_w).exp()[None] * g).sum()


def lemma_c1_gradient(
    psi, joint, critic, similarity, k, form="corrected", weights="paper", normalized=True
):
    """grad_psi J by Lemma C.1, expectations taken exactly by enumeration.  Returns [2].

    form="printed":   E[grad L1 - grad L2 - grad L3] with the printed terms (grad r_i restored
                      in L1 so that it is a vector at all); only for weights="paper".
    form="corrected": E_q[W g (sum_j grad log r_j - (K-1) grad log Z) + g grad W]
                      (drop the grad log Z term when normalized=False; grad W = 0 for
                      weights="none", which leaves the score-function term of Eq. 4).
    Derivatives of r = sigmoid(psi_0 + psi_1 s) are written out: grad r = r (1 - r) [1, s].
    """
    if form not in ("printed", "corrected"):
        raise ValueError(f"form must be 'printed' or 'corrected', got {form!r}")
    _check_weights(weights)
    if form == "printed" and weights != "paper":
        raise ValueError("form='printed' is stated for Eq. 17's weights only: use weights='paper'")
    _check_k(k)
    psi = psi.detach()
    p = joint.sum(0)
    r = torch.sigmoid(psi[0] + psi[1] * similarity)  # [y1, y]
    feature = torch.stack(
        [torch.ones_like(similarity), similarity], dim=2
    )  # d(psi_0 + psi_1 s)/d psi
    grad_r = (r * (1 - r))[..., None] * feature  # [y1, y, 2]
    z = (p[None, :] * r).sum(1)  # [y1]
    grad_log_z = (p[None, :, None] * grad_r).sum(1) / z[:, None]  # [y1, 2]
    tuples = enumerate_negatives(len(p), k)  # [T, K-1]
    r_t = r[:, tuples]  # [y1, T, K-1]
    grad_r_t = grad_r[:, tuples]  # [y1, T, K-1, 2]
    log_r = r_t.log().sum(2)  # [y1, T]
    log_q = (
        log_r
        + p.log()[tuples].sum(1)[None, :]
        - ((k - 1) * z.log()[:, None] if normalized else 0.0)
    )
    w = {
        "paper": (-log_r).exp(),
        "true": (-log_r + (k - 1) * z.log()[:, None]).exp(),
        "none": torch.ones_like(log_r),
    }[weights]  # [y1, T]
    sum_grad_log_r = (grad_r_t / r_t[..., None]).sum(2)  # [y1, T, 2]
    g = _enumerated_l(critic, tuples, k)  # [x, y1, T]
    f1 = critic[:, :, None].expand_as(g)
    lse = f1 - g  # log (1/K) sum_i e^f_i
    if form == "printed":
        # sum_i -1/r_i^2 prod_{j != i} 1/r_j grad r_i  ==  sum_i (-W / r_i) grad r_i   (W = prod 1/r)
        d_prod = (-(w[..., None] / r_t)[..., None] * grad_r_t).sum(2)  # [y1, T, 2]
        grad_l1 = f1[..., None] * d_prod[None]
        grad_l2 = (w[None] * lse)[..., None] * sum_grad_log_r[None]
        grad_l3 = (
            d_prod[None] * lse[..., None]
        )  # printed: -(sum_i 1/r_i^2 prod_{j!=i} 1/r_j grad r_i) LSE
        per_sample = grad_l1 - grad_l2 - grad_l3
    else:
        score = sum_grad_log_r - ((k - 1) * grad_log_z[:, None, :] if normalized else 0.0)
        grad_log_w = {
            "paper": -sum_grad_log_r,
            "true": -sum_grad_log_r + (k - 1) * grad_log_z[:, None, :],
            "none": torch.zeros_like(sum_grad_log_r),
        }[weights]
        grad_w = w[..., None] * grad_log_w
        per_sample = (w[None] * g)[..., None] * score[None] + g[..., None] * grad_w[None]
    prob = joint[:, :, None] * log_q.exp()[None]  # [x, y1, T]
    return (prob[..., None] * per_sample).sum((0, 1, 2))


def token_similarity(vocab, dtype=torch.float64):
    """A fixed similarity between token ids in (0, 1]: s(a, b) = 1 / (1 + |a - b|)."""
    ids = torch.arange(vocab, dtype=dtype)
    return 1.0 / (1.0 + (ids[:, None] - ids[None, :]).abs())


# ---------------------------------------------------------------------------
# The demonstration: python vince_bound.py
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="VINCE (Theorem 3.1, Eq. 3-4, Corollaries 3.1.1-3.1.2, Appendix B-C) checked against "
        "closed-form mutual information: correlated Gaussians and a Zipf vocabulary."
    )
    ap.add_argument(
        "--dim",
        type=int,
        default=20,
        help="dimension of the Gaussian pair (x, y) (Sec. 3 toy problem)",
    )
    ap.add_argument(
        "--mi",
        type=float,
        nargs="+",
        default=[2.0, 6.0],
        help="true I(X;Y) in nats of the Gaussian pair",
    )
    ap.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[16, 128],
        help="K: the positive plus K-1 negatives (Eq. 2-4)",
    )
    ap.add_argument(
        "--anchors", type=int, default=1000, help="B: number of pairs (x, y_1) per estimate"
    )
    ap.add_argument(
        "--z-samples",
        type=int,
        default=16384,
        help="Monte Carlo draws from p(y) to estimate each anchor's Z_r(y_1) = E_p[r(y|y_1)]",
    )
    ap.add_argument(
        "--t",
        type=float,
        default=0.4,
        help="Example 1 threshold: accept negatives with similarity <= t",
    )
    ap.add_argument(
        "--band",
        type=float,
        nargs=2,
        default=[0.6, 1.0],
        metavar=("L", "U"),
        help="Example 2 band [l, u]: accept negatives with l <= similarity <= u (hard negatives)",
    )
    ap.add_argument(
        "--soft",
        type=float,
        nargs=2,
        default=[-12.0, 20.0],
        metavar=("BIAS", "WEIGHT"),
        help="soft acceptance r = sigmoid(BIAS + WEIGHT * similarity) (full support; VINCE+'s r_psi)",
    )
    ap.add_argument(
        "--c", type=float, default=0.5, help="constant acceptance r = c (q = p after normalizing)"
    )
    ap.add_argument(
        "--temper",
        type=float,
        default=0.9,
        help="Example 4 on the Gaussian: q ~ p^(1/t) = N(0, t I); t <= 1 gives a bounded p/q",
    )
    ap.add_argument(
        "--vocab",
        type=int,
        default=1000,
        help="|V|: vocabulary size of the discrete (Sec. 5.1) problem",
    )
    ap.add_argument(
        "--zipf", type=float, default=1.0, help="Zipf exponent of the token frequencies p(y)"
    )
    ap.add_argument(
        "--keep", type=float, default=0.9, help="probability that the context x reveals the token y"
    )
    ap.add_argument(
        "--vocab-temper",
        type=float,
        default=4 / 3,
        help="Example 4 on the vocabulary: q ~ p^(1/t) (4/3 = word2vec's unigram^0.75)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    args = ap.parse_args(argv)
    for k in args.k:
        _check_k(k)
    # Fail before any work: each constructor raises a ValueError naming its argument.
    threshold_acceptance(args.t), band_acceptance(*args.band), constant_acceptance(args.c)
    gaussian_tempered_proposal(1, 1, 1, args.temper)
    copy_channel_joint(zipf_marginal(args.vocab, args.zipf), args.keep)
    tempered(torch.ones(2, dtype=torch.float64) / 2, args.vocab_temper)
    if args.dim < 1 or args.anchors < 2 or args.z_samples < 2 or any(m < 0 for m in args.mi):
        ap.error("need --dim >= 1, --anchors >= 2, --z-samples >= 2 and every --mi >= 0")
    return args


def _mean_se(values):
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def gaussian_blocks(mi, ks, args, generator):
    """The Gaussian table at one MI: {K: rows}, every proposal scored with the optimal critic.

    The anchors (x, y_1) and each anchor's Z_r(y_1) estimate are shared by all K (Z_r does
    not depend on K); negatives are drawn afresh for every K.
    """
    dim, n = args.dim, args.anchors
    rho = rho_from_mi(dim, mi)
    x, y1 = sample_correlated_gaussians(n, dim, rho, generator=generator, dtype=torch.float64)
    proposals = [
        ("q = p (InfoNCE)", "p", None),
        (f"Ex.1 s <= {args.t:g}", "reject", threshold_acceptance(args.t)),
        (f"Ex.2 {args.band[0]:g} <= s <= {args.band[1]:g}", "reject", band_acceptance(*args.band)),
        (
            f"soft r=sig({args.soft[0]:g}+{args.soft[1]:g}s)",
            "reject",
            sigmoid_acceptance(*args.soft),
        ),
        (f"constant r = {args.c:g}", "reject", constant_acceptance(args.c)),
        (f"Ex.4 N(0, {args.temper:g} I)", "temper", args.temper),
    ]
    blocks = {k: [] for k in ks}
    for name, kind, spec in proposals:
        if kind == "reject":
            z, z_se = estimate_acceptance_rate(y1, spec, args.z_samples, generator)
        for k in ks:
            row = {"name": name}
            if kind == "p":
                neg = torch.randn(n, k - 1, dim, generator=generator, dtype=torch.float64)
                log_w = torch.zeros(n, dtype=torch.float64)
            elif kind == "reject":
                neg, r = rejection_sample(y1, k - 1, spec, generator)
                log_w = rejection_log_weights(r, z)  # q = r p / Z:  p/q = Z / r
                paper_w = rejection_log_weights(
                    r, z, normalized=False
                )  # paper's q = r p:  p/q = 1 / r
                row.update(
                    z=z.mean().item(),
                    z_se=z_se.mean().item(),
                    dlogw=((k - 1) * z_se / z).mean().item(),
                )  # error that se(Z) puts on log W
            else:
                neg, log_w, log_c = gaussian_tempered_proposal(n, k - 1, dim, spec, generator)
            scores = optimal_scores(x, y1, neg, rho)
            row["vince"] = _mean_se(vince_bound(scores, log_w, reduction="none"))
            row["mean_w"] = log_w.exp().mean().item()
            row["eq4"] = _mean_se(vince_surrogate(scores, reduction="none"))
            if kind == "reject":
                row["paper"] = vince_bound(scores, paper_w).item()
            if kind == "temper":
                row["cor312"] = corollary_3_1_2_bound(scores, log_c).item()
            if kind == "p":
                nce = infonce_bound(scores, reduction="none")
                # (v): with W == 1, Eq. 3 is InfoNCE - (K - 1) row by row.
                row["v_gap"] = (
                    (vince_bound(scores, log_w, reduction="none") - (nce - (k - 1)))
                    .abs()
                    .max()
                    .item()
                )
                row["v_gap_printed"] = (
                    (
                        vince_bound(scores, log_w, reduction="none", one_over_k=False)
                        - (nce - math.log(k) - (k - 1))
                    )
                    .abs()
                    .max()
                    .item()
                )
                row["nce"] = _mean_se(nce)
            blocks[k].append(row)
    return blocks


def vocabulary_block(k, p, joint, critic, args, generator):
    """One K of the vocabulary table: negatives from p, uniform (Ex. 3), tempered (Ex. 4)."""
    n = args.anchors
    x = torch.multinomial(p, n, replacement=True, generator=generator)
    # y copies x with probability keep, else it is a fresh draw from p.
    fresh = torch.multinomial(p, n, replacement=True, generator=generator)
    y1 = torch.where(torch.rand(n, generator=generator, dtype=p.dtype) < args.keep, x, fresh)
    rows = []
    for name, q in [
        ("q = p (InfoNCE)", p),
        ("Ex.3 uniform", torch.full_like(p, 1.0 / len(p))),
        (f"Ex.4 p^(1/{args.vocab_temper:.3g})", tempered(p, args.vocab_temper)),
    ]:
        neg = torch.multinomial(q, n * (k - 1), replacement=True, generator=generator).view(
            n, k - 1
        )
        log_w = (p.log() - q.log())[neg].sum(1)
        log_c = (k - 1) * (p.log() - q.log()).min().item()
        scores = torch.cat([critic[x, y1][:, None], critic[x[:, None], neg]], dim=1)
        rows.append(
            {
                "name": name,
                "log_c": log_c,
                "mean_w": log_w.exp().mean().item(),
                "vince": _mean_se(vince_bound(scores, log_w, reduction="none")),
                "cor312": corollary_3_1_2_bound(scores, log_c).item(),
                "eq4": _mean_se(vince_surrogate(scores, reduction="none")),
            }
        )
    return rows


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    pm = "+-"

    print("VINCE (Theorem 3.1) on correlated Gaussians, optimal critic f* = log p(y|x)/p(y)")
    print(
        f"dim = {args.dim}, B = {args.anchors} anchors; s = (1 + cos(y_1, y))/2; Z_r = E_p[r(y|y_1)] from "
        f"{args.z_samples} draws; VINCE = mean of W l - K + 1 with W = prod p/q (normalized q)"
    )
    print(
        "cap = log K - K + 1 is the largest value E[VINCE] can take for this K (derivation (iii)); a single"
    )
    print(
        "estimate obeys estimate <= log K * mean(W) - K + 1 exactly, so heavy-tailed W can put it above cap."
    )
    print(
        "Z_r +- se: Monte Carlo normalizer; dlogW = (K-1) se/Z, the error it puts on log W; mean W should be 1;"
    )
    print(
        "paper W=1/r: VINCE with the paper's unnormalized weights; (3.1.2): Corollary 3.1.2's bound; "
        "Eq.4 vs MI: +-4 se verdict."
    )
    for mi in args.mi:
        blocks = gaussian_blocks(mi, args.k, args, generator)
        for k in args.k:
            rows = blocks[k]
            head = rows[0]
            print(
                f"\nI(X;Y) = {mi:.2f} nats   K = {k}   log K = {math.log(k):.2f}   cap = {vince_cap(k):.2f}   "
                f"InfoNCE = {head['nce'][0]:.3f} {pm} {head['nce'][1]:.3f}"
            )
            print(
                f"  (v) q = p: max |VINCE - (InfoNCE - (K-1))| = {head['v_gap']:.1e}; "
                f"Eq. 3 as printed: max |VINCE - (InfoNCE - log K - (K-1))| = {head['v_gap_printed']:.1e}"
            )
            print(
                f"  {'proposal':<25}{'Z_r':>17}{'dlogW':>6}{'mean W':>9}{'VINCE':>12}{'':8}"
                f"{'paper W=1/r':>16}{'Eq.4 surrogate':>17}{'Eq.4 vs MI':>12}"
            )
            for row in rows:
                z = f"{row['z']:.4f} {pm} {row['z_se']:.4f}" if "z" in row else "exact"
                dlogw = f"{row['dlogw']:.2f}" if "dlogw" in row else "0"
                paper = (
                    f"{row['paper']:.3g}"
                    if "paper" in row
                    else (f"(3.1.2) {row['cor312']:.2f}" if "cor312" in row else "-")
                )
                v, e = row["vince"], row["eq4"]
                verdict = (
                    "ABOVE"
                    if e[0] - 4 * e[1] > mi
                    else ("below" if e[0] + 4 * e[1] < mi else "~equal")
                )
                print(
                    f"  {row['name']:<25}{z:>17}{dlogw:>6}{row['mean_w']:>9.2g}{v[0]:>12.3f} {pm} {v[1]:<5.3f}"
                    f"{paper:>16}{e[0]:>9.3f} {pm} {e[1]:<5.3f}{verdict:>12}"
                )

    p = zipf_marginal(args.vocab, args.zipf)
    joint = copy_channel_joint(p, args.keep)
    critic = discrete_optimal_critic(joint)
    mi_v = discrete_mi(joint)
    kl_u = math.log(args.vocab) + (p * p.log()).sum().item()  # KL(p || uniform) = log V - H(p)
    print(
        f"\nVINCE on a vocabulary (Sec. 5.1 reading): |V| = {args.vocab}, Zipf({args.zipf:g}) token frequencies, "
        f"y = x with prob. {args.keep:g}; I(X;Y) = {mi_v:.3f} nats"
    )
    print(
        "Corollary 3.1.2: c = prod inf p/q; its claimed bound c*mean(l) - K + 1 (valid only where l >= 0)."
    )
    for k in args.k:
        rows = vocabulary_block(k, p, joint, critic, args, generator)
        print(f"\nK = {k}   log K = {math.log(k):.2f}   cap = {vince_cap(k):.2f}")
        print(
            f"  {'proposal':<26}{'log c':>10}{'mean W':>10}{'VINCE':>19}{'Cor3.1.2':>11}{'Eq.4 surrogate':>17}"
            f"  {'Eq.4 vs MI':>10}"
        )
        for row in rows:
            v, e = row["vince"], row["eq4"]
            verdict = (
                "ABOVE"
                if e[0] - 4 * e[1] > mi_v
                else ("below" if e[0] + 4 * e[1] < mi_v else "~equal")
            )
            print(
                f"  {row['name']:<26}{row['log_c']:>10.1f}{row['mean_w']:>10.2g}{v[0]:>11.3f} {pm} {v[1]:<5.3f}"
                f"{row['cor312']:>11.2f}{e[0]:>9.3f} {pm} {e[1]:<5.3f}  {verdict:>10}"
            )
    log_cond = (
        joint.log() - p.log()[:, None]
    )  # log p(y | x): the optimum of the full-vocabulary softmax
    print("\n  MLM, whole vocabulary as negatives (Eq. 4 with uniform q, K = |V|), exact:")
    print(
        f"    at f* = log p(y|x)/p(y): {mlm_full_vocabulary_value(joint, critic):.3f}   "
        f"at its optimum f = log p(y|x): {mlm_full_vocabulary_value(joint, log_cond):.3f}   "
        f"= I + KL(p||uniform) = {mi_v:.3f} + {kl_u:.3f}"
    )

    # Exact checks on a 5-token vocabulary, K = 3: every expectation enumerated.
    v_small, k_small = 5, 3
    p5 = zipf_marginal(v_small, 1.0)
    joint5 = copy_channel_joint(p5, 0.6)
    f5 = discrete_optimal_critic(joint5)
    u5 = torch.full_like(p5, 1.0 / v_small)
    print(
        f"\nExact enumeration: |V| = {v_small}, K = {k_small}, I(X;Y) = {discrete_mi(joint5):.4f}, "
        f"cap = {vince_cap(k_small):.4f}, q = uniform (Ex. 3)"
    )
    for name, crit in [("f*", f5), ("-f*", -f5)]:
        e_wl, e_l, e_cl = exact_weighted_infonce(joint5, crit, u5, k_small)
        e_p = exact_weighted_infonce(joint5, crit, p5, k_small)[0]
        holds = e_wl >= e_cl
        print(
            f"  critic {name:<4} InfoNCE(K) = {e_p:8.4f}  E_q[W l] = {e_wl:8.4f}  VINCE = {e_wl - k_small + 1:8.4f}  "
            f"Cor3.1.2 bound = {e_cl - k_small + 1:8.4f}  ({'holds' if holds else 'VIOLATED: VINCE < bound'})"
        )

    s5 = token_similarity(v_small)
    psi = torch.tensor([0.3, -1.5], dtype=torch.float64)
    print(
        f"\nVINCE+ (Appendix C): r_psi = sigmoid(psi0 + psi1 s), psi = {psi.tolist()}, exact grad_psi of Eq. 17"
    )
    print(f"  {'reading of Eq. 17':<44}{'autograd':>22}{'Lemma C.1 printed':>24}{'corrected':>24}")
    for label, weights, normalized in [
        ("q = r p / Z (sampler), W = prod 1/r", "paper", True),
        ("q = r p (paper, unnormalized), W = prod 1/r", "paper", False),
        ("q = r p / Z, true W = Z^(K-1) prod 1/r", "true", True),
    ]:
        leaf = psi.clone().requires_grad_(True)
        vince_plus_objective(leaf, joint5, f5, s5, k_small, weights, normalized).backward()
        fmt = lambda g: f"[{g[0]:+.4f}, {g[1]:+.4f}]"
        printed = (
            fmt(lemma_c1_gradient(psi, joint5, f5, s5, k_small, "printed", weights, normalized))
            if weights == "paper"
            else "n/a"
        )
        corrected = fmt(
            lemma_c1_gradient(psi, joint5, f5, s5, k_small, "corrected", weights, normalized)
        )
        print(f"  {label:<44}{fmt(leaf.grad):>22}{printed:>24}{corrected:>24}")
    print(f"\ndone in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
