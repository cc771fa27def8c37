"""Checks of vince_bound.py: Theorem 3.1 / Eq. 3-4, Corollaries 3.1.1-3.1.2, Examples 1-4,
the range of Eq. 3 (Appendix B), and Lemma C.1 (Appendix C) against autograd.

Monte Carlo checks use "estimate -/+ 4 standard errors"; exact checks enumerate every
negative tuple on a 5-token vocabulary and compare with an independent brute-force loop.
"""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import infonce
import vince_bound as vb

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mean_se(values):
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


# ---------------------------------------------------------------------------
# Exact reference values for the similarity s = (1 + cos)/2 of an isotropic Gaussian:
# for a fixed y_1 and y ~ N(0, I_d), s ~ Beta((d-1)/2, (d-1)/2).  Integrated on a grid
# with numpy, independently of the code under test.
# ---------------------------------------------------------------------------
def _beta_grid(dim, n=400_001):
    a = (dim - 1) / 2.0
    s = (np.arange(n) + 0.5) / n
    log_pdf = (a - 1) * (np.log(s) + np.log1p(-s)) - (2 * math.lgamma(a) - math.lgamma(2 * a))
    return s, np.exp(log_pdf) / n  # grid points and their probability mass


def _exact_z_and_mean_s(dim, r_of_s):
    s, mass = _beta_grid(dim)
    r = r_of_s(s)
    z = float((r * mass).sum())
    return z, float((s * r * mass).sum()) / z  # Z_r = E_p[r],  E_q[s] with q = r p / Z_r


# ---------------------------------------------------------------------------
# (v) and the algebra of Eq. 3.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_q_equals_p_gives_infonce_minus_k_minus_1_row_by_row(k):
    scores = 3.0 * torch.randn(50, k, generator=_gen(k), dtype=F64)
    zeros = torch.zeros(50, dtype=F64)
    nce = infonce.infonce_bound(scores, reduction="none")
    vince = vb.vince_bound(scores, zeros, reduction="none")
    assert torch.allclose(vince, nce - (k - 1), atol=1e-12, rtol=0)
    printed = vb.vince_bound(scores, zeros, reduction="none", one_over_k=False)
    assert torch.allclose(printed, nce - math.log(k) - (k - 1), atol=1e-12, rtol=0)
    if k == 1:  # no negatives: l = 0 and W = 1, so VINCE is identically 0 = cap
        assert torch.all(vince == 0)


def test_printed_eq3_is_lower_by_w_log_k():
    k = 7
    scores = torch.randn(40, k, generator=_gen(1), dtype=F64)
    log_w = torch.randn(40, generator=_gen(2), dtype=F64)
    gap = vb.vince_bound(scores, log_w, "none") - vb.vince_bound(
        scores, log_w, "none", one_over_k=False
    )
    assert torch.allclose(gap, log_w.exp() * math.log(k), atol=1e-12, rtol=0)


def test_low_precision_scores_are_reduced_in_fp32():
    scores = 4.0 * torch.randn(64, 128, generator=_gen(4))
    log_w = 0.1 * torch.randn(64, generator=_gen(5))
    want = vb.vince_bound(scores, log_w, "none")
    for dtype in (torch.float16, torch.bfloat16):
        got = vb.vince_bound(scores.to(dtype), log_w.to(dtype), "none")
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=0.1, rtol=0)


def test_surrogate_is_eq2_formula_on_q_negatives():
    scores = torch.randn(30, 9, generator=_gen(3), dtype=F64)
    by_hand = scores[:, 0] - torch.log(torch.exp(scores).mean(1))
    assert torch.allclose(vb.vince_surrogate(scores, "none"), by_hand, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# (iii) The range of Eq. 3.
# ---------------------------------------------------------------------------
def test_cap_values():
    assert vb.vince_cap(1) == 0.0
    assert vb.vince_cap(2) == pytest.approx(math.log(2) - 1)
    assert vb.vince_cap(128) == pytest.approx(math.log(128) - 127)
    assert all(vb.vince_cap(k) < 0 for k in range(2, 300))
    assert vb.vince_cap(16, one_over_k=False) == -15


@pytest.mark.parametrize("k", [2, 16, 128])
def test_estimate_never_exceeds_log_k_times_mean_weight_minus_k_plus_1(k):
    # Deterministic: l <= log K in every row and W >= 0, so mean(W l) <= log K * mean(W).
    scores = 10.0 * torch.randn(500, k, generator=_gen(k), dtype=F64)
    scores[:, 0] += 20.0 * torch.rand(
        500, generator=_gen(k + 1), dtype=F64
    )  # many near-perfect rows
    log_w = 2.0 * torch.randn(500, generator=_gen(k + 2), dtype=F64)
    est = vb.vince_bound(scores, log_w).item()
    assert est <= math.log(k) * log_w.exp().mean().item() - (k - 1) + 1e-9
    printed_rows = vb.vince_bound(scores, log_w, "none", one_over_k=False)
    assert torch.all(printed_rows <= 1 - k + 1e-12)


def test_cap_is_sharp():
    # A critic that separates the positive perfectly reaches the cap (with W = 1).
    k = 16
    scores = torch.zeros(10, k, dtype=F64)
    scores[:, 0] = 60.0
    assert vb.vince_bound(scores, torch.zeros(10, dtype=F64)).item() == pytest.approx(
        vb.vince_cap(k), abs=1e-12
    )


# ---------------------------------------------------------------------------
# (i), (ii), (iii) on the Gaussian problem, every proposal.
# ---------------------------------------------------------------------------
def test_gaussian_mi_above_infonce_and_vince_for_every_proposal():
    dim, mi, k, n = 20, 2.0, 32, 800
    g = _gen(5)
    rho = infonce.rho_from_mi(dim, mi)
    x, y1 = infonce.sample_correlated_gaussians(n, dim, rho, generator=g, dtype=F64)
    cap = vb.vince_cap(k)
    neg_p = torch.randn(n, k - 1, dim, generator=g, dtype=F64)
    nce = infonce.infonce_bound(vb.optimal_scores(x, y1, neg_p, rho), "none")
    m, se = _mean_se(nce)
    assert m - 4 * se <= mi  # (i)
    for acceptance in [
        vb.threshold_acceptance(0.45),
        vb.band_acceptance(0.55, 1.0),
        vb.sigmoid_acceptance(-12.0, 20.0),
        vb.constant_acceptance(0.3),
    ]:
        neg, r = vb.rejection_sample(y1, k - 1, acceptance, g)
        z, _ = vb.estimate_acceptance_rate(y1, acceptance, 4096, g)
        log_w = vb.rejection_log_weights(r, z)
        m, se = _mean_se(vb.vince_bound(vb.optimal_scores(x, y1, neg, rho), log_w, "none"))
        assert m - 4 * se <= mi  # (ii)
        assert m - 4 * se <= cap  # (iii)
    neg, log_w, _ = vb.gaussian_tempered_proposal(n, k - 1, dim, 0.9, g)
    m, se = _mean_se(vb.vince_bound(vb.optimal_scores(x, y1, neg, rho), log_w, "none"))
    assert m - 4 * se <= cap < 0 <= mi


def test_paper_unnormalized_weights_break_the_bound():
    # r == c is a legal acceptance function; its q is exactly p.  The paper's weight prod 1/r
    # = c^-(K-1) turns InfoNCE into c^-(K-1) * InfoNCE - K + 1, far above I(X;Y).
    dim, mi, k, n, c = 20, 2.0, 16, 500, 0.5
    g = _gen(6)
    rho = infonce.rho_from_mi(dim, mi)
    x, y1 = infonce.sample_correlated_gaussians(n, dim, rho, generator=g, dtype=F64)
    acceptance = vb.constant_acceptance(c)
    neg, r = vb.rejection_sample(y1, k - 1, acceptance, g)
    scores = vb.optimal_scores(x, y1, neg, rho)
    z, z_se = vb.estimate_acceptance_rate(y1, acceptance, 1000, g)
    assert torch.all(z == c) and torch.all(z_se == 0)
    paper_log_w = vb.rejection_log_weights(r, z, normalized=False)
    assert torch.allclose(paper_log_w, torch.full_like(paper_log_w, -(k - 1) * math.log(c)))
    m, se = _mean_se(vb.vince_bound(scores, paper_log_w, "none"))
    assert m - 4 * se > mi
    log_w = vb.rejection_log_weights(r, z)
    assert torch.allclose(log_w, torch.zeros_like(log_w), atol=1e-12)  # normalized: q = p, W = 1
    m, se = _mean_se(vb.vince_bound(scores, log_w, "none"))
    assert m - 4 * se <= vb.vince_cap(k)


# ---------------------------------------------------------------------------
# The proposals: normalizer, sampler, tempered density.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ex1", "ex2", "soft"])
def test_normalizer_estimate_and_sampler_match_the_exact_density(name):
    dim = 20
    acceptance, r_np = {
        "ex1": (vb.threshold_acceptance(0.4), lambda s: (s <= 0.4).astype(float)),
        "ex2": (vb.band_acceptance(0.6, 1.0), lambda s: ((s >= 0.6) & (s <= 1.0)).astype(float)),
        "soft": (
            vb.sigmoid_acceptance(-12.0, 20.0),
            lambda s: 1.0 / (1.0 + np.exp(-(-12.0 + 20.0 * s))),
        ),
    }[name]
    z_exact, mean_s_exact = _exact_z_and_mean_s(dim, r_np)
    g = _gen(7)
    y1 = torch.randn(3, dim, generator=g, dtype=F64)
    z, se = vb.estimate_acceptance_rate(y1, acceptance, 100_000, g)
    assert torch.all((z - z_exact).abs() <= 4 * se)
    neg, r = vb.rejection_sample(y1, 4000, acceptance, g)
    s = vb.similarity01(y1, neg)
    assert torch.allclose(r, acceptance(s))
    if name == "ex1":
        assert torch.all(s <= 0.4)
    if name == "ex2":
        assert torch.all(s >= 0.6)
    for row in s:  # each row's negatives follow q = r p / Z_r, not p
        m, se_s = _mean_se(row)
        assert abs(m - mean_s_exact) <= 4 * se_s


def test_gaussian_tempered_proposal_weights_and_bounded_ratio():
    dim, t = 6, 0.7
    y, log_w, log_c = vb.gaussian_tempered_proposal(400, 3, dim, t, _gen(8))
    zero = torch.zeros((), dtype=F64)
    log_p = torch.distributions.Normal(zero, zero + 1.0).log_prob(y).sum(2)
    log_q = torch.distributions.Normal(zero, zero + math.sqrt(t)).log_prob(y).sum(2)
    assert torch.allclose(log_w, (log_p - log_q).sum(1), atol=1e-10, rtol=0)
    assert log_c == pytest.approx(3 * 0.5 * dim * math.log(t))
    assert torch.all(log_w >= log_c - 1e-12)  # c = prod inf p/q
    assert y.var().item() == pytest.approx(t, rel=0.1)
    assert (
        vb.gaussian_tempered_proposal(2, 3, dim, 1.5, _gen(9))[2] == -math.inf
    )  # t > 1: no bounded ratio


def test_tempered_vocabulary_proposal():
    p = vb.zipf_marginal(30, 1.1)
    assert torch.allclose(vb.tempered(p, 1.0), p)
    assert torch.allclose(vb.tempered(p, 1e9), torch.full_like(p, 1 / 30), atol=1e-8)
    q = vb.tempered(p, 4 / 3)
    assert torch.allclose(q, p**0.75 / (p**0.75).sum())


def test_optimal_scores_match_infonce_optimal_critic():
    rho, g = 0.6, _gen(10)
    x, y = infonce.sample_correlated_gaussians(8, 5, rho, generator=g, dtype=F64)
    neg = torch.randn(8, 3, 5, generator=g, dtype=F64)
    scores = vb.optimal_scores(x, y, neg, rho)
    for b in range(8):
        ys = torch.cat([y[b : b + 1], neg[b]], 0)
        assert torch.allclose(
            scores[b], infonce.optimal_critic(x[b : b + 1], ys, rho)[0], atol=1e-10
        )


# ---------------------------------------------------------------------------
# (iv) Eq. 4 is not a lower bound: easy negatives exceed MI, hard ones stay below.
# ---------------------------------------------------------------------------
def test_surrogate_with_easy_negatives_exceeds_mi_and_with_hard_stays_below():
    dim, mi, k, n = 20, 2.0, 128, 500
    g = _gen(11)
    rho = infonce.rho_from_mi(dim, mi)
    x, y1 = infonce.sample_correlated_gaussians(n, dim, rho, generator=g, dtype=F64)
    easy, _ = vb.rejection_sample(y1, k - 1, vb.threshold_acceptance(0.4), g)
    m, se = _mean_se(vb.vince_surrogate(vb.optimal_scores(x, y1, easy, rho), "none"))
    assert m - 4 * se > mi
    hard, _ = vb.rejection_sample(y1, k - 1, vb.band_acceptance(0.6, 1.0), g)
    m, se = _mean_se(vb.vince_surrogate(vb.optimal_scores(x, y1, hard, rho), "none"))
    assert m + 4 * se < mi


def test_mlm_whole_vocabulary_objective_exceeds_mi():
    for exponent in [1.0, 0.0]:  # Zipf tokens, and uniform tokens as the control
        p = vb.zipf_marginal(50, exponent)
        joint = vb.copy_channel_joint(p, 0.5)
        mi = vb.discrete_mi(joint)
        entropy = -(p * p.log()).sum().item()
        at_opt = vb.mlm_full_vocabulary_value(joint, joint.log() - p.log()[:, None])
        at_fstar = vb.mlm_full_vocabulary_value(joint, vb.discrete_optimal_critic(joint))
        assert at_opt == pytest.approx(mi + math.log(50) - entropy, abs=1e-10)
        if exponent > 0:
            assert at_opt > mi + 0.3 and at_fstar > mi + 0.05
        else:
            assert at_opt == pytest.approx(mi, abs=1e-10) and at_fstar == pytest.approx(
                mi, abs=1e-10
            )


# ---------------------------------------------------------------------------
# Exact enumeration: importance sampling identity, support, Corollary 3.1.2.
# ---------------------------------------------------------------------------
def _brute_force(joint, critic, q_rows, k):
    """Independent loop over (x, y_1, y_2..K): E[W l], E[l] under q, E[c l]."""
    v = joint.shape[0]
    p = joint.sum(0)
    e_wl = e_l = e_cl = 0.0
    for y1 in range(v):
        q = q_rows[y1]
        c_i = min(p[y].item() / q[y].item() for y in range(v) if q[y] > 0)
        for x in range(v):
            if joint[x, y1] == 0:
                continue
            for negs in itertools.product(range(v), repeat=k - 1):
                prob_q = math.prod(q[y].item() for y in negs)
                if prob_q == 0:
                    continue
                w = math.prod(p[y].item() / q[y].item() for y in negs)
                f = [critic[x, y1].item()] + [critic[x, y].item() for y in negs]
                log_ratio = f[0] - math.log(sum(math.exp(fi) for fi in f) / k)
                weight = joint[x, y1].item() * prob_q
                e_wl += weight * w * log_ratio
                e_l += weight * log_ratio
                e_cl += weight * c_i ** (k - 1) * log_ratio
    return e_wl, e_l, e_cl


def _tiny_problem():
    p = vb.zipf_marginal(5, 1.0)
    joint = vb.copy_channel_joint(p, 0.6)
    return p, joint, vb.discrete_optimal_critic(joint)


def test_exact_enumeration_matches_brute_force_loop():
    p, joint, critic = _tiny_problem()
    q = vb.tempered(p, 0.5)
    got = vb.exact_weighted_infonce(joint, critic, q, 3)
    want = _brute_force(joint, critic, q.expand(5, 5), 3)
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_full_support_proposal_has_the_same_expectation_as_infonce(k):
    # Tight form of Appendix B: E_q[W l] = E_p[l] = InfoNCE(K) when q > 0 wherever p > 0.
    p, joint, critic = _tiny_problem()
    nce = vb.exact_weighted_infonce(joint, critic, p, k)[0]
    sim = vb.token_similarity(5)
    r = torch.sigmoid(1.0 - 3.0 * sim)
    conditional = (
        r * p[None, :] / (r * p[None, :]).sum(1, keepdim=True)
    )  # normalized rejection q(. | y_1)
    for q in [torch.full_like(p, 0.2), vb.tempered(p, 0.5), vb.tempered(p, 3.0), conditional]:
        e_wl, e_l, _ = vb.exact_weighted_infonce(joint, critic, q, k)
        assert e_wl == pytest.approx(nce, abs=1e-12)
        assert e_wl - (k - 1) <= vb.vince_cap(k) and e_wl - (k - 1) <= vb.discrete_mi(joint)
    assert (
        abs(vb.exact_weighted_infonce(joint, critic, torch.full_like(p, 0.2), k)[1] - nce) > 1e-3
    )  # Eq. 4 differs


def test_restricted_support_proposal_sees_only_the_accepted_event():
    # Example 1 on tokens: accept y iff s(y_1, y) <= 0.4.  r = 0 elsewhere violates
    # Corollary 3.1.1's r in (0, 1].
    p, joint, critic = _tiny_problem()
    k = 3
    accept = (vb.token_similarity(5) <= 0.4).to(F64)
    q = accept * p[None, :] / (accept * p[None, :]).sum(1, keepdim=True)
    e_wl = vb.exact_weighted_infonce(joint, critic, q, k)[0]
    assert e_wl == pytest.approx(_brute_force(joint, critic, q, k)[0], abs=1e-12)
    nce = vb.exact_weighted_infonce(joint, critic, p, k)[0]
    assert abs(e_wl - nce) > 1e-2
    assert e_wl - (k - 1) <= vb.vince_cap(k)


def test_corollary_3_1_2_inequality_needs_nonnegative_l():
    p, joint, critic = _tiny_problem()
    k = 3
    u = torch.full_like(p, 0.2)
    e_wl, _, e_cl = vb.exact_weighted_infonce(joint, critic, u, k)
    assert e_wl >= e_cl  # holds for the optimal critic here ...
    e_wl, _, e_cl = vb.exact_weighted_infonce(joint, -critic, u, k)
    assert e_wl < e_cl - 0.1  # ... and fails for a poor critic (l mostly < 0)
    for crit in [critic, -critic]:  # Eq. 3 as printed (l' <= 0): always reversed
        e_wl, _, e_cl = vb.exact_weighted_infonce(joint, crit, u, k, one_over_k=False)
        assert e_wl <= e_cl
        assert e_cl - (k - 1) <= 0 <= vb.discrete_mi(joint)


def test_corollary_3_1_2_bound_function():
    scores = torch.randn(20, 4, generator=_gen(12), dtype=F64)
    log_c = -2.5
    nce = infonce.infonce_bound(scores, "none")
    got = vb.corollary_3_1_2_bound(scores, log_c, "none")
    assert torch.allclose(got, math.exp(log_c) * nce - 3, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# VINCE+ (Appendix C): Lemma C.1 against autograd on the enumerated objective.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("normalized", [True, False])
def test_lemma_c1_printed_fails_and_corrected_matches_autograd(k, normalized):
    _, joint, critic = _tiny_problem()
    sim = vb.token_similarity(5)
    psi = torch.tensor([0.3, -1.5], dtype=F64, requires_grad=True)
    vb.vince_plus_objective(psi, joint, critic, sim, k, "paper", normalized).backward()
    truth = psi.grad
    corrected = vb.lemma_c1_gradient(psi, joint, critic, sim, k, "corrected", "paper", normalized)
    printed = vb.lemma_c1_gradient(psi, joint, critic, sim, k, "printed", "paper", normalized)
    assert torch.allclose(corrected, truth, atol=1e-12, rtol=1e-10)
    assert (printed - truth).abs().max() > 0.1
    if not normalized:  # the paper's q = r p: q W = p, the objective does not depend on psi
        assert truth.abs().max() < 1e-12


@pytest.mark.parametrize("normalized", [True, False])
def test_vince_plus_with_true_weights_does_not_depend_on_psi(normalized):
    _, joint, critic = _tiny_problem()
    sim, k = vb.token_similarity(5), 3
    nce = vb.exact_weighted_infonce(joint, critic, joint.sum(0), k)[0]
    for psi0, psi1 in [(0.3, -1.5), (-2.0, 4.0)]:
        psi = torch.tensor([psi0, psi1], dtype=F64, requires_grad=True)
        weights = "true" if normalized else "paper"  # both make q W = p exactly
        j = vb.vince_plus_objective(psi, joint, critic, sim, k, weights, normalized)
        j.backward()
        assert j.item() == pytest.approx(nce, abs=1e-12)
        assert psi.grad.abs().max() < 1e-12
        corrected = vb.lemma_c1_gradient(
            psi, joint, critic, sim, k, "corrected", weights, normalized
        )
        assert corrected.abs().max() < 1e-12


@pytest.mark.parametrize("normalized", [True, False])
def test_eq4_with_learned_proposal_has_score_function_gradient(normalized):
    # Weights dropped (Eq. 4 with q_psi negatives): psi does change the objective, and the
    # gradient is the score-function term alone.
    _, joint, critic = _tiny_problem()
    sim, k = vb.token_similarity(5), 3
    psi = torch.tensor([0.3, -1.5], dtype=F64, requires_grad=True)
    vb.vince_plus_objective(psi, joint, critic, sim, k, "none", normalized).backward()
    corrected = vb.lemma_c1_gradient(psi, joint, critic, sim, k, "corrected", "none", normalized)
    assert psi.grad.abs().max() > 1e-3
    assert torch.allclose(corrected, psi.grad, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------
# Bad input, CLI.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: vb.vince_bound(torch.zeros(4), torch.zeros(4)), "scores"),
        (lambda: vb.vince_bound(torch.zeros(4, 0), torch.zeros(4)), "K >= 1"),
        (lambda: vb.vince_bound(torch.zeros(4, 3), torch.zeros(5)), "log_weights"),
        (lambda: vb.vince_bound(torch.zeros(4, 3), torch.zeros(4), reduction="sum"), "reduction"),
        (lambda: vb.vince_cap(0), "K"),
        (lambda: vb.vince_cap(2.5), "K"),
        (lambda: vb.corollary_3_1_2_bound(torch.zeros(4, 3), 0.1), "log_c"),
        (lambda: vb.corollary_3_1_2_bound(torch.zeros(4, 3), torch.zeros(3)), "log_c"),
        (lambda: vb.threshold_acceptance(0.0), "t"),
        (lambda: vb.threshold_acceptance(1.5), "t"),
        (lambda: vb.band_acceptance(-0.1, 0.5), "l"),
        (lambda: vb.band_acceptance(0.7, 0.6), "u"),
        (lambda: vb.band_acceptance(0.2, 1.1), "u"),
        (lambda: vb.constant_acceptance(0.0), "c"),
        (
            lambda: vb.estimate_acceptance_rate(torch.zeros(2, 3), vb.constant_acceptance(0.5), 1),
            "n_samples",
        ),
        (
            lambda: vb.rejection_sample(
                torch.ones(2, 3), 4, vb.threshold_acceptance(1e-9), max_proposals=10_000
            ),
            "acceptance",
        ),
        (lambda: vb.rejection_sample(torch.ones(2, 3), -1, vb.constant_acceptance(0.5)), "n_neg"),
        (lambda: vb.rejection_log_weights(torch.full((2, 3), 0.5), torch.zeros(2)), "z"),
        (lambda: vb.rejection_log_weights(torch.full((2, 3), 0.5), torch.ones(3)), "z"),
        (lambda: vb.rejection_log_weights(torch.zeros(2, 3), torch.ones(2)), "r"),
        (
            lambda: vb.optimal_scores(
                torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4, 3), 1.0
            ),
            "rho",
        ),
        (
            lambda: vb.optimal_scores(
                torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 4, 3), 0.5
            ),
            "y_neg",
        ),
        (lambda: vb.gaussian_tempered_proposal(2, 3, 4, -1.0), "t"),
        (lambda: vb.zipf_marginal(1), "vocab"),
        (lambda: vb.copy_channel_joint(vb.zipf_marginal(4), 1.0), "keep"),
        (lambda: vb.tempered(vb.zipf_marginal(4), 0.0), "t"),
        (lambda: vb.enumerate_negatives(4, 0), "K"),
        (
            lambda: vb.lemma_c1_gradient(
                torch.zeros(2), torch.eye(2) / 2, torch.eye(2), torch.eye(2), 2, form="x"
            ),
            "form",
        ),
        (
            lambda: vb.lemma_c1_gradient(
                torch.zeros(2), torch.eye(2) / 2, torch.eye(2), torch.eye(2), 2, "printed", "true"
            ),
            "weights",
        ),
        (
            lambda: vb.vince_plus_objective(
                torch.zeros(2), torch.eye(2) / 2, torch.eye(2), torch.eye(2), 2, "x"
            ),
            "weights",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--k", "0"], "--k"),
        (["--band", "0.7", "0.6"], "--band"),
        (["--keep", "1.0"], "--keep"),
        (["--t", "nan"], "--t"),
        (["--anchors", "1"], "--anchors"),
        (["--vocab", "1"], "--vocab"),
        (["--mi", "-1"], "--mi"),
        (["--temper", "0"], "--temper"),
        (["--dim", "x"], "--dim"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vb.parse_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err


def test_help_runs():
    out = subprocess.run(
        [sys.executable, "vince_bound.py", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "--z-samples" in out.stdout and "Example 1" in out.stdout


def test_demo_prints_the_checks(capsys):
    vb.main(["--mi", "2", "--k", "4", "--anchors", "64", "--z-samples", "256", "--vocab", "40"])
    text = capsys.readouterr().out
    assert "(v) q = p: max |VINCE - (InfoNCE - (K-1))| = 0.0e+00" in text
    assert "cap = -1.61" in text  # log 4 - 3
    assert "VIOLATED" in text and "holds" in text  # Corollary 3.1.2, -f* and f*
    assert "Lemma C.1 printed" in text
