"""Tests for instance_disc.py: Eq. 6, Theorem 5.1, Definitions 5.2/5.3, Corollary 5.3.1,
stability, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import infonce
import instance_disc
from instance_disc import ann_loss, ball_loss, ir_loss, ir_nce_loss, sample_negatives
from memory_bank import MemoryBank


def unit(n, d, seed, dtype=torch.float32):
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    ).to(dtype)


def problem(n=300, d=16, b=12, seed=0, noise=0.6, dtype=torch.float32):
    """A bank, a batch of indices and views z near their own entries (so i is usually in B_i)."""
    bank = unit(n, d, seed, torch.float64)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:b]
    z = F.normalize(bank[idx] + noise * unit(b, d, seed + 2, torch.float64), dim=1)
    return z.to(dtype), bank.to(dtype), idx


def all_scores(z, bank, idx, tau):
    """[B, N] InfoNCE scores, the positive in column 0 and the other N-1 entries after it (fp64)."""
    s = (z.double() @ bank.double().T) / tau
    b, n = s.shape
    others = torch.stack([torch.cat([s[r, : idx[r]], s[r, idx[r] + 1 :]]) for r in range(b)])
    return torch.cat([s.gather(1, idx[:, None]), others], dim=1)


def ball_by_definition(z, bank, idx, tau, k, anchor="z", close=0, add_positive=True):
    """Definitions 5.2/5.3 straight from p(j | x, M): full-softmax probabilities, sorted sets."""
    s = (z.double() @ bank.double().T) / tau
    p = torch.softmax(s, dim=1)  # Eq. 6, normalized over all N
    rank_by = s if anchor == "z" else bank.double()[idx] @ bank.double().T
    order = torch.argsort(rank_by, dim=1, descending=True)
    values = []
    for r in range(len(idx)):
        denominator = set(order[r, close:k].tolist())  # B_i \ C_i, C_i = the `close` nearest
        if add_positive:
            denominator.add(int(idx[r]))
        p_set = p[r, sorted(denominator)].sum()
        values.append(-(torch.log(p[r, idx[r]]) - torch.log(p_set)))
    return torch.stack(values).mean()


# ----------------------------------------------------------------------
# Eq. 6 and Theorem 5.1
# ----------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_ir_loss_is_minus_log_p_of_eq6(tau):
    z, bank, idx = problem()
    p = torch.softmax(z.double() @ bank.double().T / tau, dim=1)
    expected = -torch.log(p[torch.arange(len(idx)), idx]).mean()
    assert float(ir_loss(z, bank, idx, tau)) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_ir_loss_matches_the_lemniscate_full_softmax_formulation():
    # lemniscate.pytorch (full softmax): logits = x M^T / T, then CrossEntropyLoss(logits, index).
    z, bank, idx = problem(seed=3)
    reference = F.cross_entropy(z @ bank.T / 0.07, idx)
    torch.testing.assert_close(ir_loss(z, bank, idx), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_theorem_5_1_ir_is_infonce_over_all_entries_up_to_log_n(tau):
    z, bank, idx = problem(n=200, seed=4)
    nce = infonce.infonce_bound(
        all_scores(z, bank, idx, tau)
    )  # K = N, the positive plus N-1 negatives
    ir = ir_loss(z, bank, idx, tau)
    assert float(nce) == pytest.approx(math.log(200) - float(ir), abs=1e-5)
    # and the InfoNCE training loss is IR itself
    assert float(infonce.infonce_loss(all_scores(z, bank, idx, tau))) == pytest.approx(
        float(ir), abs=1e-5
    )


# ----------------------------------------------------------------------
# IR with sampled negatives
# ----------------------------------------------------------------------
def test_sampled_negatives_never_hit_the_positive_and_cover_the_others_uniformly():
    idx = torch.tensor([0, 2, 4])
    neg = sample_negatives(idx, 5, 40000, torch.Generator().manual_seed(0))
    assert neg.shape == (3, 40000) and neg.dtype == torch.long
    for r, i in enumerate(idx.tolist()):
        counts = torch.bincount(neg[r], minlength=5).double()
        assert counts[i] == 0
        others = counts[[j for j in range(5) if j != i]]
        # 10,000 expected each; binomial sd ~ 87: a 5 sd band.
        assert (others - 10000).abs().max() < 450


def test_ir_nce_with_two_entries_has_only_the_other_one_as_negative():
    # N = 2: every negative must be the other entry, so the loss is known in closed form.
    bank = unit(2, 8, seed=0)
    z = F.normalize(bank[[0, 1]] + 0.5 * unit(2, 8, seed=1), dim=1)
    idx = torch.tensor([0, 1])
    tau, k = 0.3, 7
    s = z @ bank.T / tau
    pos = s[[0, 1], [0, 1]]
    other = s[[0, 1], [1, 0]]
    expected = (torch.log(torch.exp(pos) + k * torch.exp(other)) - pos).mean()
    torch.testing.assert_close(
        ir_nce_loss(z, bank, idx, tau, num_negatives=k), expected, rtol=1e-5, atol=1e-6
    )


def test_ir_nce_is_infonce_on_the_sampled_negatives():
    z, bank, idx = problem(seed=5)
    tau, k = 0.1, 50
    negatives = sample_negatives(idx, 300, k, torch.Generator().manual_seed(9))
    s = z.double() @ bank.double().T / tau
    scores = torch.cat([s.gather(1, idx[:, None]), s.gather(1, negatives)], dim=1)  # K = k + 1
    got = ir_nce_loss(z, bank, idx, tau, k, generator=torch.Generator().manual_seed(9))
    assert float(got) == pytest.approx(float(infonce.infonce_loss(scores)), rel=1e-5)


def test_ir_nce_approaches_ir_with_many_negatives():
    # With K' negatives drawn uniformly from the N-1 others, the denominator's negative part
    # is K'/(N-1) times the full one (law of large numbers).
    z, bank, idx = problem(n=100, seed=6, noise=1.5)
    tau, k = 0.2, 20000
    s = z.double() @ bank.double().T / tau
    pos = s.gather(1, idx[:, None])[:, 0]
    rest = torch.logsumexp(s.scatter(1, idx[:, None], -math.inf), dim=1)
    expected = (torch.logaddexp(pos, rest + math.log(k / 99)) - pos).mean()
    got = ir_nce_loss(z, bank, idx, tau, k, generator=torch.Generator().manual_seed(0))
    assert float(got) == pytest.approx(float(expected), rel=2e-3)


# ----------------------------------------------------------------------
# Definitions 5.2 / 5.3 and Corollary 5.3.1
# ----------------------------------------------------------------------
@pytest.mark.parametrize("anchor", ["z", "bank"])
@pytest.mark.parametrize("add_positive", [True, False])
def test_ball_is_definition_5_2_from_full_softmax_probabilities(anchor, add_positive):
    # Corollary 5.3.1's cancellation: log p(i)/p(B_i) with p normalized over all N equals the
    # direct logsumexp over B_i that ball_loss computes.
    z, bank, idx = problem(seed=7, noise=2.0)  # noisy views: some rows have i outside z's B_i
    tau, k = 0.1, 20
    got = ball_loss(z, bank, idx, tau, k, anchor, add_positive)
    expected = ball_by_definition(z, bank, idx, tau, k, anchor, 0, add_positive)
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_the_test_problem_has_rows_with_i_outside_its_background_set():
    # Guards the test above: both branches of add_positive are exercised.
    z, bank, idx = problem(seed=7, noise=2.0)
    top = torch.topk(z @ bank.T, 20, dim=1).indices
    inside = (top == idx[:, None]).any(1)
    assert inside.any() and (~inside).any()


def test_ball_without_positive_can_exceed_one_in_ratio_but_with_positive_is_a_bound():
    z, bank, idx = problem(seed=7, noise=2.0)
    literal = ball_loss(z, bank, idx, 0.1, 20, add_positive=False)
    vince = ball_loss(z, bank, idx, 0.1, 20, add_positive=True)
    assert float(vince) >= 0.0
    assert float(literal) < float(vince)


@pytest.mark.parametrize("anchor", ["z", "bank"])
def test_ann_is_definition_5_3(anchor):
    z, bank, idx = problem(seed=8, noise=1.0)
    tau, k, close = 0.1, 30, 6
    for add_positive in (True, False):
        got = ann_loss(z, bank, idx, tau, k, close, neighbours_of=anchor, add_positive=add_positive)
        expected = ball_by_definition(z, bank, idx, tau, k, anchor, close, add_positive)
        assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_ann_with_an_explicit_close_set():
    z, bank, idx = problem(seed=9, noise=1.0)
    tau, k = 0.1, 25
    top = torch.topk(z @ bank.T, k, dim=1).indices
    # C_i: four members of B_i plus entries outside it, padded with -1 to equal widths.
    close_set = torch.cat(
        [top[:, [1, 3, 5, 7]], torch.full((len(idx), 2), -1), (top[:, :1] + 1) % 300], dim=1
    )
    s = (z.double() @ bank.double().T) / tau
    values = []
    for r in range(len(idx)):
        members = set(top[r].tolist()) - set(close_set[r].tolist())
        members.add(int(idx[r]))
        values.append(torch.logsumexp(s[r, sorted(members)], 0) - s[r, idx[r]])
    expected = torch.stack(values).mean()
    got = ann_loss(z, bank, idx, tau, k, k_close=close_set)
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_ann_with_everything_close_keeps_only_the_positive():
    # C_i covering all of B_i: the denominator is the positive alone, loss 0, zero (not NaN)
    # gradient.
    z, bank, idx = problem(seed=9, noise=1.0)
    top = torch.topk(z @ bank.T, 10, dim=1).indices
    z = z.clone().requires_grad_()
    loss = ann_loss(z, bank, idx, 0.1, 10, k_close=top)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().max()) < 1e-6


def test_special_cases_tie_the_losses_together():
    z, bank, idx = problem(n=120, seed=10, noise=1.0)
    tau = 0.2
    # |B_i| = N: BALL is IR.
    torch.testing.assert_close(
        ball_loss(z, bank, idx, tau, 120), ir_loss(z, bank, idx, tau), rtol=1e-5, atol=1e-6
    )
    # No close set: ANN is BALL (k_close = 0, or an all-padding close_set).
    torch.testing.assert_close(ann_loss(z, bank, idx, tau, 30, 0), ball_loss(z, bank, idx, tau, 30))
    torch.testing.assert_close(
        ann_loss(z, bank, idx, tau, 30, k_close=torch.full((len(idx), 3), -1)),
        ball_loss(z, bank, idx, tau, 30),
    )
    # The default close set is the inner tenth of B_i.
    torch.testing.assert_close(ann_loss(z, bank, idx, tau, 30), ann_loss(z, bank, idx, tau, 30, 3))


def test_ball_matches_the_local_aggregation_code_with_close_set_of_just_i():
    # LA code (TF and PyTorch): B_i = top-k of z M^T; p_j = exp(s_j)/Z with a FIXED Z
    # (2876934.2 / 1281167 * N); loss = -log(sum_{C_i in B_i} p / sum_{B_i} p).  For C_i = {i}
    # and i in B_i that is BALL without the added positive: Z cancels.
    z, bank, idx = problem(seed=11, noise=0.5)
    tau, k = 0.07, 40
    dots = z.double() @ bank.double().T
    back_dots, back_idx = torch.topk(dots, k, dim=1, sorted=False)
    assert (back_idx == idx[:, None]).any(1).all()  # i in B_i for every row here
    Z = 2876934.2 / 1281167 * bank.shape[0]
    probs = torch.exp(back_dots / tau) / Z
    relative = torch.where(back_idx == idx[:, None], probs, torch.zeros_like(probs)).sum(
        1
    ) / probs.sum(1)
    la_code = -torch.log(relative).mean()
    assert float(ball_loss(z, bank, idx, tau, k, add_positive=False)) == pytest.approx(
        float(la_code), rel=1e-5
    )
    assert float(ball_loss(z, bank, idx, tau, k, add_positive=True)) == pytest.approx(
        float(la_code), rel=1e-5
    )


def test_vince_constant_of_corollary_5_3_1():
    # Eq. 4 value = log|D_i| - loss <= log|D_i| when D_i holds the positive (here i in B_i always).
    z, bank, idx = problem(seed=11, noise=0.3)
    loss = ball_loss(z, bank, idx, 0.07, 40)
    assert 0.0 <= float(loss) and math.log(40) - float(loss) <= math.log(40)


# ----------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------
def test_ir_gradient_matches_the_closed_form():
    z, bank, idx = problem(seed=12)
    tau = 0.1
    z = z.double().requires_grad_()
    bank = bank.double()
    ir_loss(z, bank, idx, tau).backward()
    p = torch.softmax(z.detach() @ bank.T / tau, dim=1)
    expected = (p @ bank - bank[idx]) / (tau * len(idx))  # d/dz of mean(logsumexp - positive)
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("name", ["ir", "ir_nce", "ball", "ann", "ball_bank"])
def test_gradients_reach_z_only_and_pass_gradcheck(name):
    z, bank, idx = problem(n=60, d=6, b=4, seed=13, noise=1.0, dtype=torch.float64)
    bank = bank.clone().requires_grad_()  # even a bank that asks for gradients gets none
    losses = {
        "ir": lambda z_: ir_loss(z_, bank, idx, 0.2),
        "ir_nce": lambda z_: ir_nce_loss(z_, bank, idx, 0.2, 10, torch.Generator().manual_seed(0)),
        "ball": lambda z_: ball_loss(z_, bank, idx, 0.2, 12),
        "ann": lambda z_: ann_loss(z_, bank, idx, 0.2, 12, 3),
        "ball_bank": lambda z_: ball_loss(z_, bank, idx, 0.2, 12, neighbours_of="bank"),
    }
    fn = losses[name]
    z = z.clone().requires_grad_()
    fn(z).backward()
    assert bank.grad is None
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # Finite differences (the neighbour sets are locally constant, so the loss is smooth at z).
    assert torch.autograd.gradcheck(fn, (z.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)


def test_masked_logsumexp_of_an_empty_set_has_zero_gradient():
    # The losses mask with -inf and call torch.logsumexp.  An all-masked row (an empty set) gives
    # -inf, and torch.logsumexp's backward alone would give NaN there (0 * exp(-inf + inf)); the
    # masked_fill in front of it zeroes the gradient of every masked entry, so no NaN reaches z.
    x = (
        20 * torch.randn(4, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ).requires_grad_()
    masked = torch.zeros(4, 30, dtype=torch.bool)
    masked[1, :10] = True
    masked[3] = True  # an empty set
    out = torch.logsumexp(x.masked_fill(masked, -math.inf), dim=1)
    assert torch.isneginf(out[3]) and torch.isfinite(out[:3]).all()
    torch.testing.assert_close(out[1], torch.logsumexp(x[1, 10:], dim=0))
    torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum().backward()
    assert (
        torch.isfinite(x.grad).all()
        and float(x.grad[3].abs().sum()) == 0.0
        and float(x.grad[1, :10].abs().sum()) == 0.0
    )
    torch.testing.assert_close(x.grad[0], torch.softmax(x.detach()[0], dim=0))


# ----------------------------------------------------------------------
# Stability in half precision
# ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_finite_at_tau_0_07(dtype):
    z, bank, idx = problem(n=400, d=32, b=16, seed=14, noise=0.1)
    z_h, bank_h = F.normalize(z.to(dtype), dim=1), bank.to(dtype)
    # The pitfall is real: exp(dot / tau) overflows fp16 (and is inaccurate in bf16).
    if dtype == torch.float16:
        assert torch.isinf(torch.exp((z_h @ bank_h.T) / 0.07)).any()
    calls = [
        lambda a, b: ir_loss(a, b, idx, 0.07),
        lambda a, b: ir_nce_loss(a, b, idx, 0.07, 64, torch.Generator().manual_seed(0)),
        lambda a, b: ball_loss(a, b, idx, 0.07, 50),
        lambda a, b: ann_loss(a, b, idx, 0.07, 50, 5),
    ]
    for call in calls:
        zz = z_h.clone().requires_grad_()
        loss = call(zz, bank_h)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        # Same value as float32 on the same (rounded) numbers: all the arithmetic is fp32.
        reference = call(z_h.float(), bank_h.float())
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        loss.backward()
        assert zz.grad.dtype == dtype and torch.isfinite(zz.grad.float()).all()


def test_losses_accept_a_memory_bank_buffer():
    bank = MemoryBank(500, 16, seed=0)
    idx = torch.arange(8)
    z = F.normalize(bank.vectors[idx] + 0.1 * unit(8, 16, 1), dim=1)
    for loss in (ir_loss(z, bank.vectors, idx), ball_loss(z, bank.vectors, idx, k_background=50)):
        assert torch.isfinite(loss)


# ----------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    # One ValueError per argument check, naming the argument.  Unit rows of z and indices in range
    # are checked by MemoryBank.update (tests/test_memory_bank.py), not by the losses.
    z, bank, idx = problem()
    shapes = r"z \[B,d\], bank \[N,d\], int idx \[B\]"
    for call in (
        lambda: ir_loss(z[:, :8], bank, idx),  # z and bank differ in d
        lambda: ball_loss(z[0], bank, idx, k_background=10),  # z is not [B, d]
        lambda: ir_nce_loss(z, bank, idx[:-1]),  # idx is not [B]
        lambda: ann_loss(z, bank, idx.float(), k_background=10),  # idx is not integer
    ):
        with pytest.raises(ValueError, match=shapes):
            call()
    with pytest.raises(ValueError, match="tau"):
        ir_loss(z, bank, idx, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        ir_nce_loss(z, bank, idx, tau=-1.0)
    with pytest.raises(ValueError, match=r"k_background must be in \[1, N = 300\], got 4096"):
        ball_loss(z, bank, idx)  # the default 4096 > N = 300
    with pytest.raises(ValueError, match=r"k_background must be in \[1, N = 300\], got 301"):
        ann_loss(z, bank, idx, k_background=301, k_close=5)
    with pytest.raises(ValueError, match=r"k_close must be in \[0, k_background\)"):
        ann_loss(z, bank, idx, k_background=10, k_close=10)
    with pytest.raises(ValueError, match=r"k_close .*\[B, c\]"):
        ann_loss(z, bank, idx, k_background=10, k_close=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="neighbours_of"):
        ball_loss(z, bank, idx, k_background=10, neighbours_of="M")
    with pytest.raises(ValueError, match="num_negatives"):
        ir_nce_loss(z, bank, idx, num_negatives=0)
    with pytest.raises(ValueError, match=r"num_items \(N\) must be >= 2"):
        ir_nce_loss(z[:1], bank[:1], torch.tensor([0]))


def test_ann_with_an_empty_annulus_is_minus_infinity():
    # add_positive=False and C_i covering all of B_i: the denominator B_i \ C_i is empty.
    z, bank, idx = problem()
    top = torch.topk(z @ bank.T, 10, dim=1).indices
    assert ann_loss(z, bank, idx, k_background=10, k_close=top, add_positive=False) == -math.inf
    assert torch.isfinite(ann_loss(z, bank, idx, k_background=10, k_close=top))


def test_demo_prints_the_table_and_the_checks(capsys):
    instance_disc.main(
        [
            "--num-items",
            "800",
            "--dim",
            "16",
            "--batch-size",
            "32",
            "--k-background",
            "100",
            "--num-negatives",
            "200",
        ]
    )
    out = capsys.readouterr().out
    for word in ("IR (Eq. 6)", "IR-NCE", "BALL", "ANN", "Theorem 5.1", "Corollary 5.3.1", "fp16"):
        assert word in out
    theorem_line = next(line for line in out.splitlines() if line.startswith("Theorem 5.1"))
    assert float(theorem_line.rsplit("difference", 1)[1]) < 1e-4
    with pytest.raises(SystemExit):
        instance_disc.main(["--k-background", "0"])


@pytest.mark.parametrize("name", ["ir", "ir_nce", "ball", "ann"])
def test_autocast_does_not_lower_the_precision(name):
    # A mixed-precision trainer runs the loss inside torch.autocast; the losses switch it off.
    z, bank, idx = problem(n=500, d=32, b=16, seed=16, noise=0.5)
    calls = {
        "ir": lambda z_: ir_loss(z_, bank, idx, 0.07),
        "ir_nce": lambda z_: ir_nce_loss(z_, bank, idx, 0.07, 64, torch.Generator().manual_seed(0)),
        "ball": lambda z_: ball_loss(z_, bank, idx, 0.07, 50),
        "ann": lambda z_: ann_loss(z_, bank, idx, 0.07, 50, 5),
    }
    plain = z.clone().requires_grad_()
    reference = calls[name](plain)
    reference.backward()
    mixed = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = calls[name](mixed)
    # backward outside the autocast region, as PyTorch's AMP docs prescribe (and imagenet_train.py
    # does):
    # on the CPU a backward called inside it would run the matmul's backward in bf16 too.
    loss.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(mixed.grad, plain.grad)
    # (without the guard, bf16 matmuls move the loss by about 1e-2: checked with autocast on)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rough = (z @ bank.T).float()
    assert float((rough - z @ bank.T).abs().max()) > 1e-3
