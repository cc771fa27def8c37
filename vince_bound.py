"""VINCE: InfoNCE with negatives drawn from a proposal q(y_i | y_1) instead of p(y).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning": Sec. 3 (Theorem 3.1, Eq. 3, Corollaries 3.1.1-3.1.2, Examples 1-4,
Eq. 4), Sec. 5.1 (the masked-language-model reading), Appendix B (proof of Theorem 3.1) and
Appendix C (VINCE+, Eq. 17, Lemma C.1).

The idea
--------
InfoNCE (Eq. 2, infonce.py) draws its K-1 negatives from p(y).  Sec. 3 asks which proposals
q(y_i | y_1), such as hard or easy negatives, keep a lower bound on I(X;Y), and answers with
importance weights: VINCE (Eq. 3) multiplies the InfoNCE term of a row by
W = prod_{i>=2} p(y_i) / q(y_i | y_1) and subtracts K - 1.  Conventions as in infonce.py:
``scores`` [B, K] holds the positive f(x_b, y_1) in column 0 and the negatives, here drawn from
q, in columns 1..K-1; ``log_weights`` [B] holds log W_b.  Below, l = f(x, y_1) - log (1/K)
sum_i exp f(x, y_i) is the InfoNCE term of one row.

Paper -> code
-------------
  Theorem 3.1, Eq. 3      vince_bound; vince_cap, the largest mean it can have
  Corollary 3.1.1         rejection_sample, estimate_acceptance_rate, rejection_log_weights
  Examples 1, 2           threshold_acceptance, band_acceptance (sigmoid_acceptance: full support)
  Corollary 3.1.2         corollary_3_1_2_bound
  Examples 3, 4           a uniform q; tempered (vocabulary), gaussian_tempered_proposal
  Eq. 4                   vince_surrogate (infonce_bound on negatives from q)
  Sec. 5.1 (MLM)          mlm_full_vocabulary_value
  Appendix C, Lemma C.1   vince_plus_objective, lemma_c1_gradient
Two problems with a known I(X;Y): the correlated Gaussians of infonce.py (optimal_scores), and
a Zipf vocabulary where y copies x with probability keep (finite sums, exact enumeration).

What the file shows (each claim is a test; ``python vince_bound.py`` prints them)
--------------------------------------------------------------------------------
(i)   InfoNCE <= I(X;Y)                       (Theorem A.3; infonce.py).
(ii)  VINCE   <= I(X;Y) for every proposal    (Theorem 3.1) ... but see (iii).
(iii) The range of Eq. 3.  l <= log K in every row (the positive is one of the K terms of the
      mean), W >= 0, and E_q[W] = P_p(negatives inside supp q) <= 1.  Hence
          E[VINCE] = E[W l] - K + 1  <=  log K - K + 1        (with the 1/K, as Appendix B)
      and row by row VINCE <= 1 - K for Eq. 3 as printed (no 1/K, so l - log K <= 0).  The cap
      is sharp (a critic that separates the positive perfectly reaches it).  It is 0 for K = 1
      and negative for every K >= 2 (K = 16: -12.23, K = 128: -122.15), so "I >= VINCE"
      already follows from I >= 0, and VINCE never reports a positive number of nats.
      Where the -K + 1 comes from: Appendix B bounds L = E_p[exp f(x, y_1) / a(x, y_1..K)] by K,
      but L is an expectation under p alone (the change of measure to q is an identity), and
      Theorem A.3's symmetry gives L = 1 exactly.  With L = 1 the same proof gives the tight
          E_{p(x, y_1) q(y_2..K | y_1)}[W l] = InfoNCE(K)    whenever supp q covers supp p,
      i.e. E[VINCE] = InfoNCE(K) - (K - 1) for EVERY such proposal: the proposal changes the
      variance of the estimate (through W, which degenerates as K grows), never its mean.  As an
      objective, the weighted term has InfoNCE's expectation and gradient in the critic; hard or
      easy negatives change what is optimized only once the weights are dropped (Eq. 4).
(iv)  Eq. 4 (weights and constants dropped) is NOT a lower bound in general.  Gaussians,
      I = 2 nats, K = 128: easy negatives (Example 1) push it above I, hard ones (Example 2, a
      high band) keep it below; when I > log K everything stays below (Eq. 4 <= log K).
      Vocabulary: uniform or tempered negatives raise it above InfoNCE.  Sec. 5.1's MLM (every
      token of the vocabulary once, no weights) is >= I at f*, and at its own optimum
      f = log p(y|x) it equals E[log p(y|x)] + log |V| = I(X;Y) + KL(p(y) || uniform).
(v)   With q = p every weight is 1 and VINCE = InfoNCE - (K - 1) row by row
      (Eq. 3 as printed: InfoNCE - log K - (K - 1)).

Where the paper is loose or wrong
---------------------------------
* Corollary 3.1.1 writes q(y | y_1) = r(y | y_1) p(y), which integrates to
  Z_r(y_1) = E_p[r(y | y_1)] <= 1: not a density unless r == 1.  Rejection sampling draws from
  q = r p / Z_r, so p/q = Z_r / r and log W = (K-1) log Z_r - sum_i log r(y_i | y_1).  The
  paper's weight prod 1/r is too large by Z_r^-(K-1), and the "bound" can then exceed I(X;Y):
  the demo shows it with a constant acceptance r = c, whose q is exactly p.  Z_r is estimated by
  Monte Carlo; its standard error puts an error of (K-1) se(Z)/Z on log W.
* Examples 1 and 2 are hard thresholds: r = 0 outside the accepted region breaks r in (0, 1]
  (Corollary 3.1.1) and the same-support condition of Theorem 3.1.  With normalized weights the
  estimator then sees E_q[W l] = E_p[l 1{every negative accepted}], and W = Z_r^(K-1) is tiny.
* Corollary 3.1.2's proof multiplies W >= c by l, valid only where l >= 0: a poor critic
  violates it, and for Eq. 3 as printed (l - log K <= 0) the inequality reverses.  The result
  still sits below I(X;Y), but only because it is <= log K - K + 1 <= 0 as well.
* Example 4 read literally (q~ = p / t, renormalized) is p itself; tempering means p^(1/t).
* Lemma C.1 (the gradient of VINCE+) is wrong as printed.  Eq. 17 puts prod_j 1/r_psi(y_j|y_1)
  outside the expectation where y_j is not bound; the reading in which the lemma's terms make
  sense is J(psi) = E_p(x,y_1) E_q_psi(y_2..K|y_1)[W_psi l] with W_psi = prod_j 1/r_psi(y_j|y_1).
  - L1 = E_q[W f(x, y_1)]: the printed gradient has no grad r_i factor (it is a number, not a
    vector in psi); restored, it is the pathwise term f grad W only, and it misses the
    score-function term E_q[W f grad log q_psi] that sampling y_j from q_psi brings.
  - L2 (score function) is derived for q = r p, which is not normalized; the sampler's density
    r p / Z_psi has the score sum_j grad log r_j - (K-1) grad log Z_psi(y_1).
  - L3 (pathwise) is right, but L2 + L3 = 0 sample by sample: grad W = -W sum_j grad log r_j.
  Corrected, for any weight W_psi and q_psi = r_psi p / Z_psi:
      grad J = E[W l (sum_j grad log r_j - (K-1) grad log Z_psi) + l grad W]
             = -(K-1) E[grad log Z_psi(y_1) W l]  (Eq. 17's W),   = 0  (true W = p/q).
  With correct weights psi cannot change the objective, only its variance; with Eq. 17's
  weights it only rescales each anchor by Z_psi^-(K-1); for the paper's unnormalized q = r p,
  q W = p and the true gradient is 0, while the printed lemma's is not.  psi does matter for
  Eq. 4 with q_psi negatives, whose gradient is the score-function term alone.
"""

import argparse
import math
import time

import torch

from infonce import (
    _check_scores,
    _Parser,
    infonce_bound,
    rho_from_mi,
    sample_correlated_gaussians,
)


# ---------------------------------------------------------------------------
# Theorem 3.1: Eq. 3, and the largest mean it can have.
# ---------------------------------------------------------------------------
def vince_bound(scores, log_weights, reduction="mean", one_over_k=True):
    """Eq. 3: W (f(x, y_1) - log a(x, y_1..K)) - K + 1,  W = prod_{i>=2} p(y_i) / q(y_i | y_1).

    scores: [B, K], column 0 the positive, columns 1..K-1 negatives drawn from q(. | y_1).
    log_weights: [B], log W (zeros when q = p).  one_over_k: a = (1/K) sum_i exp f(x, y_i) as in
    the proof of Theorem 3.1 (True), or Eq. 3 as printed, a = sum_i exp f(x, y_i) (False).
    Returns the mean, or [B] with reduction="none".  W spans decades: use float64 for large K.
    To copy: vince_bound, _check_scores
    """
    _check_scores(scores, reduction)
    if log_weights.shape != scores.shape[:1]:
        raise ValueError(f"log_weights must be [B={len(scores)}], got {tuple(log_weights.shape)}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> float32
    k = scores.shape[1]
    log_ratio = scores[:, 0] - torch.logsumexp(scores, dim=1) + (math.log(k) if one_over_k else 0.0)
    per_row = torch.exp(log_weights.to(scores.dtype)) * log_ratio - (k - 1)
    return per_row.mean() if reduction == "mean" else per_row


def vince_cap(k, one_over_k=True):
    """The largest mean of Eq. 3 at this K: log K - K + 1 (1 - K as printed); < 0 for K >= 2."""
    _check_k(k)
    return (math.log(k) if one_over_k else 0.0) - (k - 1)


# ---------------------------------------------------------------------------
# Corollary 3.1.1: a proposal by rejection sampling from p; Examples 1 and 2.
# Acceptance functions map similarities s in [0, 1] (any shape) to probabilities r.
# ---------------------------------------------------------------------------
def rejection_sample(y1, n_neg, acceptance, generator=None, max_proposals=1_000_000):
    """Corollary 3.1.1: n_neg i.i.d. draws per row from q(y | y_1) = r(y | y_1) p(y) / Z_r(y_1).

    y1: [B, d];  acceptance: similarity s(y_1, y) in [0, 1] -> r in [0, 1].  Candidates come
    from p = N(0, I), each kept with probability r; rows that still need negatives get new
    candidates.  The kept ones are the first n_neg accepted of an i.i.d. stream, hence i.i.d.
    from q (a round's size depends only on past acceptance counts, never on values).
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
        # Candidates drawn in float32 (cheaper) and widened exactly to y1's dtype.
        cand = torch.randn(len(rows), m, d, generator=generator, dtype=torch.float32).to(y1.dtype)
        r = acceptance(similarity01(y1[rows], cand))
        accepted = torch.rand(len(rows), m, generator=generator, dtype=y1.dtype) < r
        slot = torch.cumsum(accepted, dim=1) - 1 + filled[rows, None]  # where each accepted goes
        keep = accepted & (slot < n_neg)
        ri, ci = keep.nonzero(as_tuple=True)
        out[rows[ri], slot[ri, ci]] = cand[ri, ci]
        r_out[rows[ri], slot[ri, ci]] = r[ri, ci]
        filled[rows] = torch.clamp(filled[rows] + accepted.sum(1), max=n_neg)
        proposed += m * len(rows)
        accepted_total += accepted.sum().item()
        rate = max(accepted_total / proposed, 1e-3)  # running acceptance rate: sets the next m
        if proposed > max_proposals * b:
            raise ValueError(
                f"acceptance accepts almost nothing: fewer than {n_neg} of {proposed // b} "
                "candidates per row accepted for some rows; widen t / [l, u] or raise max_proposals"
            )
    return out, r_out


def estimate_acceptance_rate(y1, acceptance, n_samples, generator=None, chunk=8192):
    """Monte Carlo estimate of Corollary 3.1.1's normalizer Z_r(y_1) = E_p(y)[r(y | y_1)].

    y1: [B, d].  One pool of n_samples fresh y ~ p serves all rows (each row's estimate is
    unbiased; rows are correlated).  Returns (z [B], its standard error [B]).
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
        # float32 is plenty for a Monte Carlo average (its error is se, not 1e-7); sums in y1's
        # dtype.
        unit_pool = pool / pool.norm(dim=1, keepdim=True)
        cos = (y1 / y1.norm(dim=1, keepdim=True)).float() @ unit_pool.T  # [B, m]
        r = acceptance(0.5 * (1.0 + cos)).to(y1.dtype)
        total += r.sum(1)
        total_sq += (r * r).sum(1)
        done += m
    z = total / n_samples
    var = (total_sq / n_samples - z * z).clamp_min(0.0) * n_samples / (n_samples - 1)
    return z, (var / n_samples).sqrt()


def rejection_log_weights(r, z, normalized=True):
    """log W = sum_{i>=2} log p(y_i) / q(y_i | y_1) for Corollary 3.1.1's proposal: [B].

    r: [B, K-1], acceptance probabilities at the drawn negatives;  z: [B], Z_r(y_1).
        normalized=True:  (K-1) log Z_r(y_1) - sum_i log r(y_i | y_1)   (q = r p / Z_r)
        normalized=False: -sum_i log r(y_i | y_1)                  (the paper's q = r p)
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
    if z.shape != r.shape[:1]:
        raise ValueError(f"z must be [B={len(r)}], one Z_r(y_1) per row of r, got {tuple(z.shape)}")
    if (z <= 0).any() or (z > 1).any():
        raise ValueError(
            f"z (the normalizer Z_r = E_p[r]) must lie in (0, 1], got range "
            f"[{z.min().item()}, {z.max().item()}]; raise the Monte Carlo sample size"
        )
    return r.shape[1] * z.log() + log_w


def threshold_acceptance(t):
    """Example 1: accept y_i iff s(y_1, y_i) <= t, t in (0, 1]: easy, dissimilar negatives."""
    if not (0.0 < t <= 1.0):
        raise ValueError(f"t (Example 1 threshold) must lie in (0, 1], got {t}")
    return lambda s: (s <= t).to(s.dtype)


def band_acceptance(l, u):  # noqa: E741 (Example 2 names its lower threshold l)
    """Example 2: accept y_i iff l <= s(y_1, y_i) <= u, 0 <= l <= u <= 1; a high band: hard."""
    if not (0.0 <= l <= 1.0):
        raise ValueError(f"l (Example 2 lower threshold) must lie in [0, 1], got {l}")
    if not (l <= u <= 1.0):
        raise ValueError(f"u (Example 2 upper threshold) must lie in [l, 1] = [{l}, 1], got {u}")
    return lambda s: ((s >= l) & (s <= u)).to(s.dtype)


def sigmoid_acceptance(bias, weight):
    """r = sigmoid(bias + weight s) in (0, 1): full support; VINCE+'s r_psi (Appendix C).
    weight > 0 prefers hard negatives."""
    return lambda s: torch.sigmoid(bias + weight * s)


def constant_acceptance(c):
    """r == c in (0, 1]: a valid rejection sampler whose normalized q is exactly p."""
    if not (0.0 < c <= 1.0):
        raise ValueError(f"c (constant acceptance probability) must lie in (0, 1], got {c}")
    return lambda s: torch.full_like(s, c)


# ---------------------------------------------------------------------------
# Corollary 3.1.2: a proposal with a bounded ratio p/q >= c_i; Examples 3 and 4.
# ---------------------------------------------------------------------------
def corollary_3_1_2_bound(scores, log_c, reduction="mean", one_over_k=True):
    """Corollary 3.1.2's claimed lower bound on Eq. 3: c (f(x, y_1) - log a(x, y_1..K)) - K + 1.

    scores: [B, K], negatives drawn from q.  log_c: float <= 0, or [B]: log c = sum_i log c_i,
    c_i = inf p/q.  one_over_k: a = (1/K) sum_i exp f(x, y_i) (True) or Eq. 3's sum (False).
    The proof multiplies W >= c by the log term: it holds only where that term is >= 0.
    Returns the mean, or [B] with reduction="none".
    To copy: corollary_3_1_2_bound, _check_scores
    """
    _check_scores(scores, reduction)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> float32
    c = torch.as_tensor(log_c, dtype=scores.dtype).exp()
    if c.shape not in ((), scores.shape[:1]) or (not torch.is_tensor(log_c) and log_c > 0):
        raise ValueError(f"log_c must be a float <= 0 or [B={len(scores)}], got {log_c}")
    log_ratio = scores.log_softmax(dim=1)[:, 0] + (math.log(scores.shape[1]) if one_over_k else 0.0)
    per_row = c * log_ratio - (scores.shape[1] - 1)
    return per_row.mean() if reduction == "mean" else per_row


def tempered(p, t):
    """Example 4 on a vocabulary: q ~ p^(1/t) (t = 4/3: word2vec's unigram^0.75; t -> inf:
    Example 3's uniform q)."""
    if not (t > 0.0):
        raise ValueError(f"t (Example 4 temperature) must be > 0, got {t}")
    logq = p.log() / t
    return torch.softmax(logq, dim=0)


def gaussian_tempered_proposal(n, n_neg, dim, t, generator=None, dtype=torch.float64):
    """Example 4 on the Gaussians: q ~ p^(1/t) = N(0, t I) (p / t, read literally, is p again).

    Returns (negatives [n, n_neg, dim], log W [n], log c): log p(y)/q(y) = dim/2 log t -
    |y|^2 (1 - 1/t) / 2, whose infimum (Corollary 3.1.2's c_i) is at y = 0 when t <= 1;
    for t > 1 q has heavier tails, inf p/q = 0 and log c = -inf.
    """
    if not (t > 0.0):
        raise ValueError(f"t (Example 4 temperature) must be > 0, got {t}")
    y = math.sqrt(t) * torch.randn(n, n_neg, dim, generator=generator, dtype=dtype)
    log_ratio = 0.5 * dim * math.log(t) - 0.5 * (y * y).sum(2) * (1.0 - 1.0 / t)
    log_c_i = 0.5 * dim * math.log(t) if t <= 1.0 else -math.inf
    return y, log_ratio.sum(1), (n_neg * log_c_i if n_neg else 0.0)


# ---------------------------------------------------------------------------
# Eq. 4 (the weights dropped), and Sec. 5.1's masked language model.
# ---------------------------------------------------------------------------
def vince_surrogate(scores, reduction="mean"):
    """Eq. 4: Eq. 2's formula on negatives drawn from q, without W and -K + 1; not a bound."""
    return infonce_bound(scores, reduction=reduction)


def mlm_full_vocabulary_value(joint, critic):
    """Sec. 5.1's I^MLM, exactly: E_p(x,y)[f(x, y) - log (1/|V|) sum_{w in V} exp f(x, w)].

    Eq. 4 with every token once as a negative (uniform q, no weights); joint, critic: [V, V].
    """
    v = joint.shape[1]
    lse = torch.logsumexp(critic, dim=1, keepdim=True) - math.log(v)
    term = torch.where(joint > 0, critic - lse, torch.zeros_like(critic))
    return (joint * term).sum().item()


# ---------------------------------------------------------------------------
# Appendix C: VINCE+, a learned acceptance r_psi(y | y_1) = sigmoid(psi_0 + psi_1 s(y_1, y)),
# and Lemma C.1 (corrected in the module docstring), exactly on an enumerated vocabulary.
# ---------------------------------------------------------------------------
def vince_plus_objective(psi, joint, critic, similarity, k, weights="paper", normalized=True):
    """J(psi) of Eq. 17 (read as in the module docstring), exactly, over all negative tuples.

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
    log_q = log_r + p.log()[tuples].sum(1)[None, :]  # the paper's q = r p
    if normalized:
        log_q = log_q - (k - 1) * log_z[:, None]  # what rejection sampling draws: r p / Z
    log_w = torch.zeros_like(log_r) if weights == "none" else -log_r  # Eq. 17: W = prod 1/r
    if weights == "true":
        log_w = log_w + (k - 1) * log_z[:, None]  # p/q = Z^(K-1) prod 1/r
    g = _enumerated_log_ratio(critic, tuples, k)  # [x, y1, T]
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
    feature = torch.stack([torch.ones_like(similarity), similarity], dim=2)  # d(psi_0 + psi_1 s)
    grad_r = (r * (1 - r))[..., None] * feature  # [y1, y, 2]
    z = (p[None, :] * r).sum(1)  # [y1]
    grad_log_z = (p[None, :, None] * grad_r).sum(1) / z[:, None]  # [y1, 2]
    tuples = enumerate_negatives(len(p), k)  # [T, K-1]
    r_t = r[:, tuples]  # [y1, T, K-1]
    grad_r_t = grad_r[:, tuples]  # [y1, T, K-1, 2]
    log_r = r_t.log().sum(2)  # [y1, T]
    log_q = log_r + p.log()[tuples].sum(1)[None, :]
    if normalized:
        log_q = log_q - (k - 1) * z.log()[:, None]
    w = {
        "paper": (-log_r).exp(),
        "true": (-log_r + (k - 1) * z.log()[:, None]).exp(),
        "none": torch.ones_like(log_r),
    }[weights]  # [y1, T]
    sum_grad_log_r = (grad_r_t / r_t[..., None]).sum(2)  # [y1, T, 2]
    g = _enumerated_log_ratio(critic, tuples, k)  # [x, y1, T]
    f1 = critic[:, :, None].expand_as(g)
    lse = f1 - g  # log (1/K) sum_i e^f_i
    if form == "printed":
        # sum_i -1/r_i^2 prod_{j != i} 1/r_j grad r_i  ==  sum_i (-W / r_i) grad r_i  (W = prod 1/r)
        d_prod = (-(w[..., None] / r_t)[..., None] * grad_r_t).sum(2)  # [y1, T, 2]
        grad_l1 = f1[..., None] * d_prod[None]
        grad_l2 = (w[None] * lse)[..., None] * sum_grad_log_r[None]
        # printed: -(sum_i 1/r_i^2 prod_{j!=i} 1/r_j grad r_i) LSE
        grad_l3 = d_prod[None] * lse[..., None]
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


# ---------------------------------------------------------------------------
# Helpers: the two test problems, exact enumeration, argument checks.
# The vocabulary: p(y) = Zipf over V tokens; x ~ p; y = x with probability keep, else y ~ p.
# Its support is bounded, so Example 3's uniform q exists and Corollary 3.1.2's c_i > 0.
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


def zipf_marginal(vocab, exponent=1.0, dtype=torch.float64):
    """p(w) proportional to 1 / (rank + 1)^exponent over `vocab` tokens: [V]."""
    if int(vocab) != vocab or vocab < 2:
        raise ValueError(f"vocab must be an integer >= 2, got {vocab}")
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    w = torch.arange(1, vocab + 1, dtype=dtype) ** (-float(exponent))
    return w / w.sum()


def copy_channel_joint(p, keep):
    """P[x, y] = p(x) (keep 1{x = y} + (1 - keep) p(y)): a [V, V] joint, both marginals p."""
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


def token_similarity(vocab, dtype=torch.float64):
    """A fixed similarity between token ids in (0, 1]: s(a, b) = 1 / (1 + |a - b|)."""
    ids = torch.arange(vocab, dtype=dtype)
    return 1.0 / (1.0 + (ids[:, None] - ids[None, :]).abs())


def enumerate_negatives(vocab, k):
    """All (K-1)-tuples of token ids: [V^(K-1), K-1].  For exact expectations on tiny problems."""
    _check_k(k)
    if k == 1:
        return torch.zeros(1, 0, dtype=torch.long)
    grids = torch.meshgrid(*[torch.arange(vocab)] * (k - 1), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _enumerated_log_ratio(critic, tuples, k, one_over_k=True):
    # l[x, y1, T] = f(x, y1) - log (1/K) sum_i exp f(x, y_i) for every anchor pair and tuple T.
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
    log_ratio = _enumerated_log_ratio(critic, tuples, k, one_over_k)  # l: [x, y1, T]
    prob = joint[:, :, None] * log_q.exp()[None]  # p(x, y1) q(y_2..K | y1)
    keep = prob > 0  # skip impossible cells (0 * inf)
    e_wl = (prob * log_w.exp()[None] * log_ratio)[keep].sum().item()
    e_l = (prob * log_ratio)[keep].sum().item()
    e_cl = (prob * log_c.exp()[None, :, None] * log_ratio)[keep].sum().item()
    return e_wl, e_l, e_cl


def _check_k(k):
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"K must be an integer >= 1 (the positive plus K-1 negatives), got {k}")


def _check_weights(weights):
    if weights not in ("paper", "true", "none"):
        raise ValueError(f"weights must be 'paper', 'true' or 'none', got {weights!r}")


# ---------------------------------------------------------------------------
# The demo (python vince_bound.py), then its argument parser.
# ---------------------------------------------------------------------------
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
                paper_w = rejection_log_weights(r, z, normalized=False)  # q = r p:  p/q = 1 / r
                dlogw = (k - 1) * z_se / z  # the error that se(Z) puts on log W
                row.update(z=z.mean().item(), z_se=z_se.mean().item(), dlogw=dlogw.mean().item())
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
                vince = vince_bound(scores, log_w, "none")
                printed = vince_bound(scores, log_w, "none", one_over_k=False)
                row["v_gap"] = (vince - (nce - (k - 1))).abs().max().item()
                row["v_gap_printed"] = (printed - (nce - math.log(k) - (k - 1))).abs().max().item()
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
        neg = torch.multinomial(q, n * (k - 1), replacement=True, generator=generator)
        neg = neg.view(n, k - 1)
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
        f"dim = {args.dim}, B = {args.anchors} anchors; s = (1 + cos(y_1, y))/2; "
        f"Z_r = E_p[r(y|y_1)] from {args.z_samples} draws;\n"
        "VINCE = mean of W l - K + 1 with W = prod p/q (normalized q).  cap = log K - K + 1 is\n"
        "the largest value E[VINCE] can take for this K; a single estimate obeys estimate <=\n"
        "log K * mean(W) - K + 1 exactly, so heavy-tailed W can put it above cap.  Z_r +- se:\n"
        "Monte Carlo normalizer; dlogW = (K-1) se/Z, the error it puts on log W; mean W should\n"
        "be 1; paper W=1/r: VINCE with the paper's unnormalized weights; (3.1.2): Corollary\n"
        "3.1.2's bound; Eq.4 vs MI: +-4 se verdict."
    )
    for mi in args.mi:
        blocks = gaussian_blocks(mi, args.k, args, generator)
        for k in args.k:
            rows = blocks[k]
            nce, gap, gap_printed = rows[0]["nce"], rows[0]["v_gap"], rows[0]["v_gap_printed"]
            print(
                f"\nI(X;Y) = {mi:.2f} nats   K = {k}   log K = {math.log(k):.2f}   "
                f"cap = {vince_cap(k):.2f}   InfoNCE = {nce[0]:.3f} {pm} {nce[1]:.3f}"
            )
            print(
                f"  (v) q = p: max |VINCE - (InfoNCE - (K-1))| = {gap:.1e}; Eq. 3 as printed: "
                f"max |VINCE - (InfoNCE - log K - (K-1))| = {gap_printed:.1e}"
            )
            print(
                f"  {'proposal':<25}{'Z_r':>17}{'dlogW':>6}{'mean W':>9}{'VINCE':>12}{'':8}"
                f"{'paper W=1/r':>16}{'Eq.4 surrogate':>17}{'Eq.4 vs MI':>12}"
            )
            for row in rows:
                z = f"{row['z']:.4f} {pm} {row['z_se']:.4f}" if "z" in row else "exact"
                dlogw = f"{row['dlogw']:.2f}" if "dlogw" in row else "0"
                paper = f"{row['paper']:.3g}" if "paper" in row else "-"
                if "cor312" in row:
                    paper = f"(3.1.2) {row['cor312']:.2f}"
                v, e = row["vince"], row["eq4"]
                print(
                    f"  {row['name']:<25}{z:>17}{dlogw:>6}{row['mean_w']:>9.2g}"
                    f"{v[0]:>12.3f} {pm} {v[1]:<5.3f}{paper:>16}"
                    f"{e[0]:>9.3f} {pm} {e[1]:<5.3f}{_verdict(e, mi):>12}"
                )

    p = zipf_marginal(args.vocab, args.zipf)
    joint = copy_channel_joint(p, args.keep)
    critic = discrete_optimal_critic(joint)
    mi_v = discrete_mi(joint)
    kl_u = math.log(args.vocab) + (p * p.log()).sum().item()  # KL(p || uniform) = log V - H(p)
    print(
        f"\nVINCE on a vocabulary (Sec. 5.1 reading): |V| = {args.vocab}, Zipf({args.zipf:g}) "
        f"token frequencies, y = x with prob. {args.keep:g}; I(X;Y) = {mi_v:.3f} nats"
    )
    print("Corollary 3.1.2: c = prod inf p/q; its claimed bound c*mean(l) - K + 1 (needs l >= 0).")
    for k in args.k:
        rows = vocabulary_block(k, p, joint, critic, args, generator)
        print(f"\nK = {k}   log K = {math.log(k):.2f}   cap = {vince_cap(k):.2f}")
        print(
            f"  {'proposal':<26}{'log c':>10}{'mean W':>10}{'VINCE':>19}{'Cor3.1.2':>11}"
            f"{'Eq.4 surrogate':>17}  {'Eq.4 vs MI':>10}"
        )
        for row in rows:
            v, e = row["vince"], row["eq4"]
            print(
                f"  {row['name']:<26}{row['log_c']:>10.1f}{row['mean_w']:>10.2g}"
                f"{v[0]:>11.3f} {pm} {v[1]:<5.3f}{row['cor312']:>11.2f}"
                f"{e[0]:>9.3f} {pm} {e[1]:<5.3f}  {_verdict(e, mi_v):>10}"
            )
    log_cond = joint.log() - p.log()[:, None]  # log p(y|x): the full-vocabulary softmax's optimum
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
        f"\nExact enumeration: |V| = {v_small}, K = {k_small}, I(X;Y) = "
        f"{discrete_mi(joint5):.4f}, cap = {vince_cap(k_small):.4f}, q = uniform (Ex. 3)"
    )
    for name, crit in [("f*", f5), ("-f*", -f5)]:
        e_wl, _, e_cl = exact_weighted_infonce(joint5, crit, u5, k_small)
        e_p = exact_weighted_infonce(joint5, crit, p5, k_small)[0]
        verdict = "holds" if e_wl >= e_cl else "VIOLATED: VINCE < bound"
        print(
            f"  critic {name:<4} InfoNCE(K) = {e_p:8.4f}  E_q[W l] = {e_wl:8.4f}  "
            f"VINCE = {e_wl - k_small + 1:8.4f}  Cor3.1.2 bound = {e_cl - k_small + 1:8.4f}  "
            f"({verdict})"
        )

    s5 = token_similarity(v_small)
    psi = torch.tensor([0.3, -1.5], dtype=torch.float64)
    print(
        f"\nVINCE+ (Appendix C): r_psi = sigmoid(psi0 + psi1 s), psi = {psi.tolist()}, "
        "exact grad_psi of Eq. 17"
    )
    print(f"  {'reading of Eq. 17':<44}{'autograd':>22}{'Lemma C.1 printed':>24}{'corrected':>24}")
    for label, weights, normalized in [
        ("q = r p / Z (sampler), W = prod 1/r", "paper", True),
        ("q = r p (paper, unnormalized), W = prod 1/r", "paper", False),
        ("q = r p / Z, true W = Z^(K-1) prod 1/r", "true", True),
    ]:
        leaf = psi.clone().requires_grad_(True)
        vince_plus_objective(leaf, joint5, f5, s5, k_small, weights, normalized).backward()
        problem = (psi, joint5, f5, s5, k_small)
        printed = "n/a"
        if weights == "paper":
            printed = _fmt(lemma_c1_gradient(*problem, "printed", weights, normalized))
        corrected = _fmt(lemma_c1_gradient(*problem, "corrected", weights, normalized))
        print(f"  {label:<44}{_fmt(leaf.grad):>22}{printed:>24}{corrected:>24}")
    print(f"\ndone in {time.time() - start:.1f} s")


def _verdict(estimate, mi):
    """Eq. 4's estimate (mean, se) against the true MI, at 4 standard errors."""
    mean, se = estimate
    return "ABOVE" if mean - 4 * se > mi else ("below" if mean + 4 * se < mi else "~equal")


def _fmt(gradient):
    return f"[{gradient[0]:+.4f}, {gradient[1]:+.4f}]"


def parse_args(argv=None):
    ap = _Parser(
        prog="vince_bound.py",
        description="VINCE (Theorem 3.1, Eq. 3-4, Corollaries 3.1.1-3.1.2, Appendices B-C) "
        "checked against a closed-form mutual information: correlated Gaussians and a Zipf "
        "vocabulary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = ap.add_argument
    add("--dim", type=int, default=20, help="dimension of the Gaussian pair (x, y); >= 1")
    add(
        "--mi",
        type=float,
        nargs="+",
        default=[2.0, 6.0],
        help="true I(X;Y) in nats of the Gaussian pair (Eq. 1), one table each; >= 0",
    )
    add(
        "--k",
        type=int,
        nargs="+",
        default=[16, 128],
        help="K of Eq. 2-4: the positive plus K-1 negatives; each >= 1",
    )
    add(
        "--anchors",
        type=int,
        default=1000,
        help="B: pairs (x, y_1) per estimate, the standard error taken across them; >= 2",
    )
    add(
        "--z-samples",
        type=int,
        default=16384,
        help="Monte Carlo draws from p(y) for each anchor's Z_r(y_1) = E_p[r(y|y_1)] "
        "(Corollary 3.1.1's normalizer); >= 2",
    )
    add(
        "--t",
        type=float,
        default=0.4,
        help="Example 1's threshold: accept negatives with similarity <= t; in (0, 1]",
    )
    add(
        "--band",
        type=float,
        nargs=2,
        default=[0.6, 1.0],
        metavar=("L", "U"),
        help="Example 2's band: accept negatives with L <= similarity <= U (hard negatives); "
        "0 <= L <= U <= 1",
    )
    add(
        "--soft",
        type=float,
        nargs=2,
        default=[-12.0, 20.0],
        metavar=("BIAS", "WEIGHT"),
        help="a soft acceptance r = sigmoid(BIAS + WEIGHT * similarity) with full support "
        "(VINCE+'s r_psi, Appendix C); finite",
    )
    add(
        "--c",
        type=float,
        default=0.5,
        help="a constant acceptance r = c, whose normalized q is p itself; in (0, 1]",
    )
    add(
        "--temper",
        type=float,
        default=0.9,
        help="Example 4 on the Gaussians: q ~ p^(1/t) = N(0, t I); t <= 1 bounds p/q "
        "(Corollary 3.1.2); > 0",
    )
    add(
        "--vocab",
        type=int,
        default=1000,
        help="|V|, the vocabulary of the Sec. 5.1 problem (tables are V x V); in [2, 5000]",
    )
    add("--zipf", type=float, default=1.0, help="Zipf exponent of the token frequencies p(y); >= 0")
    add(
        "--keep",
        type=float,
        default=0.9,
        help="probability that y copies its context x (else y ~ p); in [0, 1)",
    )
    add(
        "--vocab-temper",
        type=float,
        default=4 / 3,
        help="Example 4 on the vocabulary: q ~ p^(1/t) (4/3 is word2vec's unigram^0.75); > 0",
    )
    add("--seed", type=int, default=0, help="random seed")
    args = ap.parse_args(argv)
    finite = math.isfinite
    checks = [
        ("--dim", args.dim, args.dim >= 1, "an integer >= 1"),
        ("--mi", args.mi, all(finite(m) and m >= 0 for m in args.mi), "finite, >= 0 nats"),
        ("--k", args.k, min(args.k) >= 1, "integers >= 1"),
        ("--anchors", args.anchors, args.anchors >= 2, "an integer >= 2"),
        ("--z-samples", args.z_samples, args.z_samples >= 2, "an integer >= 2"),
        ("--t", args.t, 0 < args.t <= 1, "in (0, 1]"),
        ("--band", args.band, 0 <= args.band[0] <= args.band[1] <= 1, "L, U: 0 <= L <= U <= 1"),
        ("--soft", args.soft, all(map(finite, args.soft)), "finite"),
        ("--c", args.c, 0 < args.c <= 1, "in (0, 1]"),
        ("--temper", args.temper, 0 < args.temper < math.inf, "finite, > 0"),
        ("--vocab", args.vocab, 2 <= args.vocab <= 5000, "an integer in [2, 5000]"),
        ("--zipf", args.zipf, 0 <= args.zipf < math.inf, "finite, >= 0"),
        ("--keep", args.keep, 0 <= args.keep < 1, "in [0, 1)"),
        ("--vocab-temper", args.vocab_temper, 0 < args.vocab_temper < math.inf, "finite, > 0"),
    ]
    for flag, value, ok, allowed in checks:
        if not ok:
            ap.error(f"{flag} must be {allowed}, got {value}")
    return args


if __name__ == "__main__":
    main()
