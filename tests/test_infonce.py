"""Checks of infonce.py against closed forms (Sec. 2-3, Appendix A of the paper).

Statistical checks use fixed seeds and a tolerance of 4 standard errors, where the
standard error comes from independent replicates (or, for NWJ, from its closed form,
because NWJ's sample SE is unreliable once e^{2I} is large).
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infonce
from infonce import (
    SeparableCritic,
    ba_bound,
    bound_replicates,
    gaussian_mi,
    infonce_bound,
    infonce_loss,
    mean_and_stderr,
    nwj_bound,
    nwj_optimal_stderr,
    optimal_critic,
    rho_from_mi,
    sample_correlated_gaussians,
    scores_from_critic_matrix,
    train_critic,
    uba_bound,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small matrices: one thread is faster and does not fight other processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def optimal_replicates(bound, mi, k, n_batches, seed, dim=20, shift=0.0):
    """Per-batch values of ``bound`` with the critic optimal_critic + shift (float64)."""
    rho = rho_from_mi(dim, mi)
    return bound_replicates(
        lambda x, y: shift + optimal_critic(x, y, rho),
        bound,
        dim,
        rho,
        k,
        n_batches,
        gen(seed),
        dtype=torch.float64,
    )


# ---------------------------------------------------------------------------
# The Gaussian test bed itself: closed forms checked independently.
# ---------------------------------------------------------------------------
def test_gaussian_mi_and_its_inverse():
    # One coordinate with rho = 0.6: I = -1/2 log(0.64), by hand.
    assert gaussian_mi(1, 0.6) == pytest.approx(-0.5 * math.log(0.64), rel=1e-12)
    assert gaussian_mi(20, 0.0) == 0.0
    for dim, mi in [(1, 0.3), (20, 2.0), (20, 10.0), (7, 0.0)]:
        assert gaussian_mi(dim, rho_from_mi(dim, mi)) == pytest.approx(mi, abs=1e-12)


def test_samples_have_the_stated_correlation():
    x, y = sample_correlated_gaussians(200_000, 3, 0.7, generator=gen(0), dtype=torch.float64)
    assert x.shape == y.shape == (200_000, 3)
    # Per coordinate: unit variances and correlation rho (SE of each ~ 0.003).
    assert torch.allclose(x.var(0), torch.ones(3, dtype=torch.float64), atol=0.02)
    assert torch.allclose(y.var(0), torch.ones(3, dtype=torch.float64), atol=0.02)
    assert torch.allclose((x * y).mean(0), torch.full((3,), 0.7, dtype=torch.float64), atol=0.01)
    # Coordinates are independent of each other.
    assert abs(float((x[:, 0] * y[:, 1]).mean())) < 0.01


def test_optimal_critic_is_the_log_density_ratio():
    rho, dim = 0.8, 5
    x, y = sample_correlated_gaussians(6, dim, rho, generator=gen(1), dtype=torch.float64)
    got = optimal_critic(x, y[:4], rho)
    assert got.shape == (6, 4)
    conditional = torch.distributions.Normal(rho * x[:, None, :], math.sqrt(1 - rho * rho))
    marginal = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = (
        conditional.log_prob(y[None, :4, :]) - marginal.log_prob(y[None, :4, :]).double()
    ).sum(-1)
    assert torch.allclose(got, expected, atol=1e-10)
    # Batched form agrees with the 2-D form batch by batch.
    xb, yb = x.view(2, 3, dim), y.view(2, 3, dim)
    batched = optimal_critic(xb, yb, rho)
    for i in range(2):
        assert torch.allclose(batched[i], optimal_critic(xb[i], yb[i], rho), atol=1e-12)


def test_mean_of_optimal_critic_on_positives_is_the_mi():
    # Eq. 1: I = E_p(x,y)[log p(y|x)/p(y)].
    for mi in (2.0, 8.0):
        rho = rho_from_mi(20, mi)
        x, y = sample_correlated_gaussians(20_000, 20, rho, generator=gen(2), dtype=torch.float64)
        f_pos = optimal_critic(x[:, None, :], y[:, None, :], rho).view(-1)
        mean, se = mean_and_stderr(f_pos)
        assert abs(mean - mi) <= 4 * se
        # Var_p[f*] = dim rho^2 (used by nwj_optimal_stderr): SE of a variance ~ 1%.
        assert float(f_pos.var()) == pytest.approx(20 * rho * rho, rel=0.05)


def test_mean_and_stderr_by_hand():
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0, rel=1e-12)  # std (ddof 1) / sqrt(4)


def test_scores_from_critic_matrix_puts_diagonal_first():
    m = torch.arange(16.0).view(4, 4)
    s = scores_from_critic_matrix(m)
    assert torch.equal(s[:, 0], torch.tensor([0.0, 5.0, 10.0, 15.0]))
    assert torch.equal(s[1], torch.tensor([5.0, 4.0, 6.0, 7.0]))
    assert torch.equal(s[3], torch.tensor([15.0, 12.0, 13.0, 14.0]))
    batched = torch.randn(3, 5, 5, generator=gen(3))
    for i in range(3):
        assert torch.equal(
            scores_from_critic_matrix(batched)[i], scores_from_critic_matrix(batched[i])
        )


# ---------------------------------------------------------------------------
# Eq. 2: InfoNCE <= log K for any scores; its loss, gradient and stability.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 16, 1024])
def test_infonce_at_most_log_k_exactly_for_any_scores(k):
    g = gen(k)
    cases = [
        torch.randn(256, k, generator=g),
        1e4 * torch.randn(256, k, generator=g),
        torch.randn(256, k, generator=g, dtype=torch.float64) * 50,
    ]
    dominant = torch.full((4, k), -1e6)
    dominant[:, 0] = 1e6  # the positive wins by far: the bound reaches log K
    cases.append(dominant)
    if k > 1:
        masked = torch.randn(8, k, generator=g)
        masked[:, 1:] = float("-inf")  # all negatives masked out: again exactly log K
        cases.append(masked)
    for scores in cases:
        per_row = infonce_bound(scores, reduction="none")
        assert torch.isfinite(per_row).all()
        assert (per_row <= math.log(k)).all()  # exact, no tolerance
    assert torch.allclose(infonce_bound(dominant, "none"), torch.full((4,), math.log(k)))
    # The mean of values <= log K can only exceed it by summation rounding.
    assert float(infonce_bound(cases[0])) <= math.log(k) + 1e-6


def test_infonce_loss_is_log_k_minus_bound():
    scores = torch.randn(64, 33, generator=gen(4), dtype=torch.float64)
    assert torch.allclose(
        infonce_loss(scores, "none"), math.log(33) - infonce_bound(scores, "none")
    )
    # It is the usual cross-entropy with target class 0.
    ce = torch.nn.functional.cross_entropy(scores, torch.zeros(64, dtype=torch.long))
    assert float(infonce_loss(scores)) == pytest.approx(float(ce), rel=1e-12)
    # Uninformative critic: loss = log K.
    assert float(infonce_loss(torch.zeros(5, 33))) == pytest.approx(math.log(33), rel=1e-6)


def test_infonce_loss_gradient_is_autograd_of_negated_bound():
    scores = torch.randn(32, 9, generator=gen(5), dtype=torch.float64, requires_grad=True)
    (grad_loss,) = torch.autograd.grad(infonce_loss(scores), scores)
    (grad_neg_bound,) = torch.autograd.grad(-infonce_bound(scores), scores)
    assert torch.allclose(grad_loss, grad_neg_bound, atol=1e-14)
    # And both equal the closed form (softmax - e_0) / B.
    one_hot = torch.zeros(32, 9, dtype=torch.float64)
    one_hot[:, 0] = 1.0
    assert torch.allclose(grad_loss, (torch.softmax(scores.detach(), 1) - one_hot) / 32, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda s: infonce_loss(s, "none"), (scores[:4].detach().requires_grad_(),)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_infonce_loss_stable_for_huge_scores(dtype):
    g = gen(6)
    scores = (1e4 * torch.rand(16, 64, generator=g)).to(dtype)  # fp16 holds up to 65504
    scores[:8, 0] = scores[:8].max(dim=1).values + 2  # some rows where the positive leads slightly
    naive = -torch.log(torch.exp(scores[:, 0].float()) / torch.exp(scores.float()).sum(1))
    assert not torch.isfinite(naive).all()  # the textbook formula overflows on these inputs
    leaf = scores.clone().requires_grad_()
    loss = infonce_loss(leaf, "none")
    reference = infonce_loss(scores.double(), "none")  # same (rounded) inputs, float64 arithmetic
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss.double(), reference, atol=1e-2, rtol=1e-6)
    loss.mean().backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()
    one_hot = torch.zeros(16, 64, dtype=torch.float64)
    one_hot[:, 0] = 1.0
    expected = (torch.softmax(scores.double(), 1) - one_hot) / 16
    assert torch.allclose(leaf.grad.double(), expected, atol=1e-3)
    bound = infonce_bound(scores, "none")
    assert torch.isfinite(bound).all() and (bound <= math.log(64)).all()


# ---------------------------------------------------------------------------
# Theorem A.3 with the optimal critic: below the MI, rising with K, capped at log K.
# ---------------------------------------------------------------------------
def test_infonce_optimal_critic_rises_with_k_and_stays_below_min_mi_log_k():
    rows = 8192
    for mi in (2.0, 6.0):
        previous = None
        for k in (4, 16, 128, 1024):
            mean, se = mean_and_stderr(
                optimal_replicates(infonce_bound, mi, k, rows // k, seed=10 + k)
            )
            assert mean - 4 * se <= min(mi, math.log(k))  # Theorem A.3 and the log K cap
            if previous is not None:
                # Strictly larger than at the previous K, by more than 4 combined SEs.
                assert mean - previous[0] > 4 * math.hypot(se, previous[1])
            previous = (mean, se)


def test_infonce_optimal_critic_approaches_min_mi_log_k():
    # MI << log K: close to the MI (the gap ~ (e^{2I}-1)/(2K) ~ 0.03 nats at I=2, K=1024).
    mean, se = mean_and_stderr(optimal_replicates(infonce_bound, 2.0, 1024, 16, seed=20))
    assert 2.0 - mean < 0.1 and mean - 4 * se <= 2.0
    gap_small_k = 2.0 - mean_and_stderr(optimal_replicates(infonce_bound, 2.0, 16, 512, seed=21))[0]
    assert gap_small_k > 0.3  # far from the MI at K=16 (log 16 = 2.77 > 2 nonetheless)
    # MI >> log K: pinned just under log K.
    mean, se = mean_and_stderr(optimal_replicates(infonce_bound, 10.0, 16, 512, seed=22))
    assert 0 <= math.log(16) - mean < 0.05


def test_infonce_is_shift_invariant_per_anchor():
    # Adding any c(x) to a row changes nothing: the optimal critic is only fixed up to c(x).
    scores = torch.randn(10, 7, generator=gen(23), dtype=torch.float64)
    shifted = scores + torch.randn(10, 1, generator=gen(24), dtype=torch.float64) * 100
    assert torch.allclose(infonce_bound(scores, "none"), infonce_bound(shifted, "none"), atol=1e-10)


def test_theorem_a3_symmetry_step():
    # Proof of Thm A.3: under p(x)p(y_1:K), E[e^{f(x,y_1)} / a(x, y_1:K)] = E[K softmax_0] = 1,
    # which turns NWJ with the K-sample witness into InfoNCE.  Under the joint it is > 1.
    mi, dim, k, n = 3.0, 20, 16, 512
    rho = rho_from_mi(dim, mi)
    x, y = sample_correlated_gaussians(n * k, dim, rho, generator=gen(25), dtype=torch.float64)
    x, y = x.view(n, k, dim), y.view(n, k, dim)
    joint = scores_from_critic_matrix(optimal_critic(x, y, rho)).reshape(n * k, k)
    x_indep = sample_correlated_gaussians(n * k, dim, rho, generator=gen(26), dtype=torch.float64)[
        0
    ]
    product = scores_from_critic_matrix(optimal_critic(x_indep.view(n, k, dim), y, rho)).reshape(
        n * k, k
    )
    ratio_product = (k * torch.softmax(product, 1)[:, 0]).view(n, k).mean(1)
    mean, se = mean_and_stderr(ratio_product)
    assert abs(mean - 1.0) <= 4 * se
    assert float((k * torch.softmax(joint, 1)[:, 0]).mean()) > 5.0
    # NWJ on the witness 1 + log(e^{f_1}/a): joint mean minus product mean of e^{F-1}.
    witness_joint = 1 + infonce_bound(joint, "none")
    nwj = float(witness_joint.mean()) - mean
    assert nwj == pytest.approx(float(infonce_bound(joint)), abs=4 * se)


# ---------------------------------------------------------------------------
# Lemma A.2: NWJ (Eq. 14).
# ---------------------------------------------------------------------------
def test_nwj_formula_on_a_hand_example():
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([2.0 - (math.exp(0.0) + math.exp(2.0)) / 2, 0.0 - 1.0])
    assert torch.allclose(nwj_bound(scores, "none"), expected.double(), atol=1e-12)


@pytest.mark.parametrize("mi", [1.0, 2.0])
def test_nwj_with_its_optimal_critic_is_unbiased_and_its_se_is_exact(mi):
    rho = rho_from_mi(20, mi)
    replicates = optimal_replicates(nwj_bound, mi, 16, 2000, seed=int(30 + mi), shift=1.0)
    mean, sample_se = mean_and_stderr(replicates)
    exact_se = nwj_optimal_stderr(20, rho, 16, 2000)
    assert abs(mean - mi) <= 4 * exact_se
    # The closed-form SE matches the spread of independent batches (rel. error of an SE
    # from 2000 replicates is a few %; at these MIs the 4th moment of e^f is finite or nearly).
    assert sample_se == pytest.approx(exact_se, rel=0.15)


def test_nwj_needs_the_plus_one_but_infonce_does_not():
    # NWJ is not shift invariant: f* alone gives I - 1/e; f* + 1 is tight.  InfoNCE is unchanged.
    mi = 1.0
    rho = rho_from_mi(20, mi)
    mean, _ = mean_and_stderr(optimal_replicates(nwj_bound, mi, 16, 2000, seed=40, shift=0.0))
    # (the SE of f*+1 is an upper bound here: the e^f term is e times smaller without the 1)
    assert abs(mean - (mi - 1 / math.e)) <= 4 * nwj_optimal_stderr(20, rho, 16, 2000)
    assert mean < mi - 0.3
    a = optimal_replicates(infonce_bound, mi, 16, 50, seed=41, shift=0.0)
    b = optimal_replicates(infonce_bound, mi, 16, 50, seed=41, shift=1.0)
    assert torch.allclose(a, b, atol=1e-12)


def test_nwj_at_high_mi_is_still_a_bound_with_its_exact_se():
    # At 6 nats the sample SE understates the spread (heavy tail of e^f); the one-sided
    # check uses the closed-form SE, whose e^{2I} term dominates.
    rho = rho_from_mi(20, 6.0)
    mean, _ = mean_and_stderr(optimal_replicates(nwj_bound, 6.0, 128, 64, seed=42, shift=1.0))
    exact_se = nwj_optimal_stderr(20, rho, 128, 64)
    assert mean - 4 * exact_se <= 6.0


def test_nwj_below_uba_below_mi_for_a_suboptimal_critic():
    # Lemma A.2 chain for f = c x.y: NWJ <= UBA <= I, with UBA in closed form
    # c rho d - c^2 d / 2 (log Z(y) = c^2 |y|^2 / 2).  c = 0.3, rho = 0.5, d = 4.
    c, rho, d, k, n = 0.3, 0.5, 4, 64, 200
    x, y = sample_correlated_gaussians(n * k, d, rho, generator=gen(43), dtype=torch.float64)
    x, y = x.view(n, k, d), y.view(n, k, d)
    scores = scores_from_critic_matrix(c * x @ y.transpose(1, 2)).reshape(n * k, k)
    nwj = mean_and_stderr(nwj_bound(scores, "none").view(n, k).mean(1))
    log_z = (0.5 * c * c * (y * y).sum(-1)).reshape(-1)
    uba = mean_and_stderr(uba_bound(scores, log_z, "none").view(n, k).mean(1))
    uba_closed = c * rho * d - c * c * d / 2
    assert abs(uba[0] - uba_closed) <= 4 * uba[1]
    # NWJ's closed form: E[f] - E[Z]/e = c rho d - e^{-1} (1 - c^2)^{-d/2}.
    nwj_closed = c * rho * d - (1 - c * c) ** (-d / 2) / math.e
    assert abs(nwj[0] - nwj_closed) <= 4 * nwj[1]
    assert nwj_closed < uba_closed < gaussian_mi(d, rho)


# ---------------------------------------------------------------------------
# Lemma A.1: BA (Eq. 12) and UBA (Eq. 13).
# ---------------------------------------------------------------------------
def _log_normal(value, mean, var):
    return (-0.5 * (value - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


def test_ba_with_the_true_posterior_is_the_mi_and_a_wrong_one_loses_the_kl():
    d, mi, n = 20, 4.0, 20_000
    rho = rho_from_mi(d, mi)
    x, y = sample_correlated_gaussians(n, d, rho, generator=gen(50), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    log_p_x = _log_normal(x, 0.0, one)
    true = mean_and_stderr(
        ba_bound(_log_normal(x, rho * y, (1 - rho * rho) * one), log_p_x, "none")
    )
    assert abs(true[0] - mi) <= 4 * true[1]
    # q = N(rho y, s^2 I) with s^2 = 1: I_BA = I - d KL(N(0, 1-rho^2) || N(0, 1)).
    s2 = 1.0
    kl = 0.5 * (math.log(s2 / (1 - rho * rho)) + (1 - rho * rho) / s2 - 1)
    wide = mean_and_stderr(ba_bound(_log_normal(x, rho * y, s2 * one), log_p_x, "none"))
    assert abs(wide[0] - (mi - d * kl)) <= 4 * wide[1]
    # Lemma A.1's q = p(x) e^f / Z for f = rho x.y is exactly this N(rho y, I), so the gap
    # leaves rho^2 d / 2, the UBA value of the bilinear critic (checked in the next test).
    assert mi - d * kl == pytest.approx(rho * rho * d / 2, rel=1e-12)
    assert wide[0] + 4 * wide[1] < mi - 0.5  # clearly below


def test_uba_with_exact_partition():
    d, mi, n = 10, 3.0, 20_000
    rho = rho_from_mi(d, mi)
    x, y = sample_correlated_gaussians(n, d, rho, generator=gen(51), dtype=torch.float64)
    f_star = optimal_critic(x[:, None, :], y[:, None, :], rho).view(n, 1)
    # f* + c(y) with c(y) = sin(|y|^2): Z(y) = e^{c(y)}, so UBA is unchanged and tight.
    c_y = torch.sin((y * y).sum(1))
    tight = mean_and_stderr(uba_bound(f_star + c_y[:, None], c_y, "none"))
    assert abs(tight[0] - mi) <= 4 * tight[1]
    # The same shift without its partition is not a bound on anything: it moves by E[c(y)].
    assert float(
        uba_bound(f_star + c_y[:, None], torch.zeros(n, dtype=torch.float64))
    ) == pytest.approx(tight[0] + float(c_y.mean()), abs=1e-9)
    # Bilinear critic f = rho x.y: check the closed-form log Z(y) = rho^2 |y|^2 / 2 by Monte Carlo
    # at one y, then UBA = rho^2 d / 2 < I.
    y0 = y[:1]
    x_fresh = torch.randn(400_000, d, generator=gen(52), dtype=torch.float64)
    log_z_mc = float(torch.logsumexp(rho * x_fresh @ y0[0], 0) - math.log(400_000))
    assert log_z_mc == pytest.approx(0.5 * rho * rho * float((y0 * y0).sum()), abs=0.05)
    lin = mean_and_stderr(
        uba_bound((rho * (x * y).sum(1))[:, None], 0.5 * rho * rho * (y * y).sum(1), "none")
    )
    assert abs(lin[0] - rho * rho * d / 2) <= 4 * lin[1]
    assert lin[0] + 4 * lin[1] < mi


# ---------------------------------------------------------------------------
# The learned separable critic (Sec. 4).
# ---------------------------------------------------------------------------
def test_learned_separable_critic_gets_a_clearly_positive_bound():
    torch.manual_seed(0)
    dim, mi, k = 20, 4.0, 64
    rho = rho_from_mi(dim, mi)
    critic = SeparableCritic(dim, hidden=64, embed_dim=16)
    x, y = sample_correlated_gaussians(5, dim, rho, generator=gen(60))
    assert critic(x, y[:3]).shape == (5, 3)
    before = mean_and_stderr(bound_replicates(critic, infonce_bound, dim, rho, k, 32, gen(61)))
    optimizer = torch.optim.Adam(critic.parameters(), lr=2e-3)
    estimates = train_critic(critic, optimizer, dim, rho, k, steps=300, generator=gen(62))
    assert len(estimates) == 300
    after = mean_and_stderr(bound_replicates(critic, infonce_bound, dim, rho, k, 64, gen(63)))
    optimal = mean_and_stderr(optimal_replicates(infonce_bound, mi, k, 64, seed=64))
    assert abs(before[0]) < 0.5  # an untrained critic knows (almost) nothing
    assert after[0] - 4 * after[1] > 1.5  # clearly positive on fresh data
    assert after[0] - 4 * math.hypot(after[1], optimal[1]) <= optimal[0]  # f* is the best critic


# ---------------------------------------------------------------------------
# Bad arguments name themselves.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sample_correlated_gaussians(10, 3, 1.0), "rho"),
        (lambda: sample_correlated_gaussians(10, 3, -1.0), "rho"),
        (lambda: sample_correlated_gaussians(10, 3, float("nan")), "rho"),
        (lambda: gaussian_mi(3, 1.5), "rho"),
        (lambda: optimal_critic(torch.zeros(2, 3), torch.zeros(2, 3), -2.0), "rho"),
        (lambda: sample_correlated_gaussians(0, 3, 0.5), "n must"),
        (lambda: gaussian_mi(0, 0.5), "dim"),
        (lambda: rho_from_mi(20, -1.0), "mi"),
        (lambda: rho_from_mi(20, float("inf")), "mi"),
        (lambda: infonce_bound(torch.zeros(4, 0)), "K >= 1"),
        (lambda: infonce_bound(torch.zeros(0, 3)), "B >= 1"),
        (lambda: infonce_loss(torch.zeros(4, 0)), "K >= 1"),
        (lambda: nwj_bound(torch.zeros(4, 1)), "K >= 2"),
        (lambda: infonce_bound(torch.zeros(4)), "scores"),
        (lambda: infonce_loss(torch.zeros(2, 3, 4)), "scores"),
        (lambda: infonce_bound(torch.zeros(4, 3, dtype=torch.long)), "scores"),
        (lambda: infonce_bound(torch.zeros(4, 3), reduction="sum"), "reduction"),
        (lambda: uba_bound(torch.zeros(4, 3), torch.zeros(5)), "log_partition"),
        (lambda: uba_bound(torch.zeros(4, 3), torch.zeros(4, 1)), "log_partition"),
        (lambda: ba_bound(torch.zeros(4), torch.zeros(3)), "log_p_x"),
        (lambda: ba_bound(torch.zeros(4, 2), torch.zeros(4, 2)), "log_q_x_given_y"),
        (lambda: optimal_critic(torch.zeros(2, 3), torch.zeros(2, 4), 0.5), "x and y"),
        (lambda: scores_from_critic_matrix(torch.zeros(3, 4)), "critic_matrix"),
        (lambda: mean_and_stderr(torch.zeros(1)), "replicates"),
        (lambda: nwj_optimal_stderr(20, 0.5, 1, 10), "k must"),
        (
            lambda: bound_replicates(
                lambda x, y: x @ y.transpose(-1, -2), infonce_bound, 3, 0.5, 1, 4
            ),
            "k must",
        ),
        (lambda: SeparableCritic(3, hidden=0), "hidden"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# The script.
# ---------------------------------------------------------------------------
def _run(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "infonce.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_explains_the_flags():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--dim", "--mi", "--ks", "--rows", "--train-k", "--steps-per-stage", "--plot"):
        assert flag in result.stdout
    assert "Eq. 2" in result.stdout and "I(X;Y)" in result.stdout


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--ks", "1"], "--ks"),
        (["--mi", "-1"], "--mi"),
        (["--mi", "nan"], "--mi"),
        (["--rows", "100", "--ks", "64"], "--rows"),
        (["--dim", "0"], "--dim"),
        (["--train-k", "1"], "--train-k"),
        (["--lr", "0"], "--lr"),
    ],
)
def test_bad_flags_give_clear_errors(args, flag, capsys):
    # In-process (argparse exits with status 2); --help and a full run go through a subprocess.
    with pytest.raises(SystemExit) as exit_info:
        infonce.parse_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err  # one line, naming the flag


def test_small_run_prints_the_table_and_saves_the_figure(tmp_path):
    figure = tmp_path / "staircase.png"
    result = _run(
        "--mi",
        "2",
        "10",
        "--ks",
        "16",
        "--rows",
        "256",
        "--steps-per-stage",
        "20",
        "--plot",
        str(figure),
    )
    assert result.returncode == 0, result.stderr
    assert "InfoNCE (f*)" in result.stdout and "BA q=p(x|y)" in result.stdout
    table_rows = [
        line for line in result.stdout.splitlines() if line.strip().startswith(("2.00", "10.00"))
    ]
    assert len(table_rows) == 4  # two MIs in the K table, two in the K-free table
    assert figure.exists() and figure.stat().st_size > 10_000
