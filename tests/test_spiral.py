"""Checks for spiral.py (Sec. 4.3, Figure 1): data, views, IR pieces, the linear probe, the CLI."""

import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import spiral
from infonce import infonce_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Data and views
# ---------------------------------------------------------------------------
def test_views_are_x_plus_uniform_0_eta_per_coordinate():
    eta, n = 0.4, 200_000
    x = torch.tensor([[0.3, -0.7]]).expand(n, 2)
    noise = spiral.sample_views(x, eta, torch.Generator().manual_seed(0)) - x
    # support [0, eta] (not centred), for both coordinates
    assert noise.min() >= 0 and noise.max() <= eta + 1e-6
    assert noise.min() < 0.001 and noise.max() > eta - 0.001
    # U(0, eta): mean eta/2, variance eta^2/12, within 5 standard errors
    se_mean = eta / math.sqrt(12 * n)
    assert torch.allclose(noise.mean(0).double(), torch.tensor([eta / 2, eta / 2], dtype=torch.float64), atol=5 * se_mean)
    var = noise.double().var(0)
    assert torch.allclose(var, torch.full((2,), eta * eta / 12, dtype=torch.float64), rtol=0.02)
    # flat: each tenth of [0, eta] holds a tenth of the draws
    counts = torch.histc(noise[:, 0], bins=10, min=0, max=eta)
    assert (counts / n - 0.1).abs().max() < 0.005
    # independent coordinates
    assert abs(torch.corrcoef(noise.T)[0, 1].item()) < 0.01


def test_eta_zero_is_the_privileged_view_and_negative_eta_fails():
    x = torch.randn(10, 2)
    assert torch.equal(spiral.sample_views(x, 0.0), x)
    with pytest.raises(ValueError, match="eta"):
        spiral.sample_views(x, -0.1)


def test_spirals_balanced_reproducible_and_half_a_unit_apart():
    points, labels = spiral.make_spirals(4000, generator=torch.Generator().manual_seed(3))
    again, labels_again = spiral.make_spirals(4000, generator=torch.Generator().manual_seed(3))
    other, _ = spiral.make_spirals(4000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(points, again) and torch.equal(labels, labels_again)
    assert not torch.equal(points, other)
    assert (labels == 0).sum() == (labels == 1).sum() == 2000
    radius = points.norm(dim=1)
    assert radius.min() >= spiral.INNER_RADIUS - 1e-6
    assert radius.max() <= spiral.INNER_RADIUS + 2 * spiral.ARM_SPACING * spiral.TURNS + 1e-6
    dense, dense_labels = spiral.make_spirals(20_000, generator=torch.Generator().manual_seed(0))
    # spiral 1 is spiral 0 turned by 180 degrees: -x of every spiral-0 point lies on spiral 1
    turned = -points[labels == 0]
    assert torch.cdist(turned, dense[dense_labels == 1]).min(dim=1).values.max() < 0.01
    # Along any ray from the centre the two arms alternate 0.5 apart: the gap
    # the noise has to cross before the spirals become unidentifiable.
    gap = torch.cdist(dense[dense_labels == 0], dense[dense_labels == 1]).min()
    # the nearest approach is the radial gap times cos(pitch) (pitch <= atan(1 / pi) at r >= 0.5)
    assert 0.5 * math.cos(math.atan(1 / math.pi)) - 0.01 < gap < 0.5 + 0.01


def test_raw_coordinates_are_useless_to_a_linear_probe():
    # Whole turns, uniform in angle: chance (0.5) really is the floor, as the paper assumes.
    g = torch.Generator().manual_seed(0)
    train, train_labels = spiral.make_spirals(20_000, generator=g)
    test, test_labels = spiral.make_spirals(20_000, generator=g)
    assert abs(spiral.transfer_accuracy(train, train_labels, test, test_labels) - 0.5) < 0.02


# ---------------------------------------------------------------------------
# IR pieces: scores, Eq. 7, the 2-D floor of the loss
# ---------------------------------------------------------------------------
def test_ir_scores_are_positive_then_negatives_over_tau():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 2, generator=g), dim=1)
    z = F.normalize(torch.randn(8, 2, generator=g), dim=1)
    idx = torch.randperm(50, generator=g)[:8]
    negative_idx = torch.randint(50, (30,), generator=g)
    scores = spiral.ir_scores(z, bank, idx, negative_idx, tau=0.1)
    assert scores.shape == (8, 31)
    expected_positive = torch.stack([z[b] @ bank[idx[b]] for b in range(8)]) / 0.1
    torch.testing.assert_close(scores[:, 0], expected_positive)
    torch.testing.assert_close(scores[:, 1:], z @ bank[negative_idx].T / 0.1)
    # gradient flows to z through both parts, as through the plain matmul
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    weights = torch.randn(8, 31, generator=g)
    (spiral.ir_scores(z1, bank, idx, negative_idx, 0.1) * weights).sum().backward()
    reference = torch.cat([(z2 * bank[idx]).sum(1, keepdim=True), z2 @ bank[negative_idx].T], 1) / 0.1
    (reference * weights).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_sgd_step_is_torch_sgd_with_momentum_and_weight_decay():
    # The hand-written step must reproduce torch.optim.SGD (dampening 0) exactly,
    # including the first step (buffer = gradient) and a change of lr (warmup).
    torch.manual_seed(0)
    ours, theirs = spiral.make_encoder(), spiral.make_encoder()
    theirs.load_state_dict(ours.state_dict())
    params, buffers = list(ours.parameters()), [None] * len(list(ours.parameters()))
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-5)
    x = torch.randn(64, 2)
    for lr in (0.01, 0.02, 0.03, 0.03, 0.03):
        for model in (ours, theirs):
            for p in model.parameters():
                p.grad = None
            F.normalize(model(x), dim=1)[:, 0].sum().backward()
        spiral.sgd_step_(params, buffers, lr, 0.9, 1e-5)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial))  # every tensor did move


def test_bank_update_is_eq7_renormalized_and_touches_only_its_rows():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(20, 2, generator=g), dim=1)
    before = bank.clone()
    idx = torch.tensor([3, 7, 11])
    z = F.normalize(torch.randn(3, 2, generator=g), dim=1)
    spiral.update_bank_(bank, idx, z, alpha=0.5)
    mixed = 0.5 * before[idx] + 0.5 * z
    torch.testing.assert_close(bank[idx], mixed / mixed.norm(dim=1, keepdim=True))
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(20))
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(bank[untouched], before[untouched])
    spiral.update_bank_(bank, idx, z, alpha=0.0)  # alpha = 0: the bank holds the latest view
    torch.testing.assert_close(bank[idx], z)


def test_uniform_circle_loss_matches_monte_carlo():
    # Bank spread evenly on the circle, every view embedded exactly on its own entry.
    negatives, tau = 4096, 0.07
    n = 100_000
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(n, (512,), generator=g)
    losses = [infonce_loss(spiral.ir_scores(bank[idx], bank, idx, torch.randint(n, (negatives,), generator=g), tau))
              for _ in range(8)]
    assert abs(torch.stack(losses).mean().item() - spiral.uniform_circle_loss(negatives, tau)) < 0.01
    # and the closed form is below log K: a perfect 2-D embedding still cannot reach 0
    assert 5.5 < spiral.uniform_circle_loss(negatives, tau) < math.log(negatives + 1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def test_short_run_lowers_the_loss_and_keeps_the_bank_on_the_circle():
    points, _ = spiral.make_spirals(2048, generator=torch.Generator().manual_seed(0))
    encoder, bank, losses = spiral.train_ir(points, 0.4, iters=320, negatives=512, seed=0, progress=False)
    log_k = math.log(513)
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16  # one epoch = 16 steps
    assert last < first - 0.5
    assert last < log_k - 0.5
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(2048))
    assert torch.isfinite(torch.tensor(losses)).all()


def test_training_is_reproducible_by_seed():
    points, _ = spiral.make_spirals(512, generator=torch.Generator().manual_seed(0))
    runs = [spiral.train_ir(points, 0.2, iters=20, negatives=128, seed=s, progress=False)[2] for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_progress_lines_report_iteration_loss_rate_and_time_left(capsys):
    points, _ = spiral.make_spirals(512, generator=torch.Generator().manual_seed(0))
    spiral.train_ir(points, 0.2, iters=10, negatives=64, progress=True, label="[x] ")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[x] iter     10/10  loss ")
    assert "it/s" in line and "s left" in line


def test_encoder_is_five_linear_layers_128_wide_with_a_2d_output():
    encoder = spiral.make_encoder()
    linears = [m for m in encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 128), (128, 128), (128, 128), (128, 128), (128, 2)]
    # He init: the untrained encoder already spreads directions (PyTorch's default does not)
    points, _ = spiral.make_spirals(4000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    spread = spiral.embed(spiral.make_encoder(), points).std(0).norm()
    assert spread > 0.3


def test_shared_view_fraction_marks_eta_04_as_the_border():
    # Sec. 4.3: "a noise level of 0.4 is on the border": no view is shared
    # between the spirals below 0.3, most are at 0.4, all are from 0.5 on.
    points, labels = spiral.make_spirals(8000, generator=torch.Generator().manual_seed(0))
    fractions = {eta: spiral.shared_view_fraction(points, labels, eta) for eta in (0.0, 0.3, 0.4, 0.5, 1.0)}
    assert fractions[0.0] == fractions[0.3] == 0.0
    assert 0.3 < fractions[0.4] < 0.95
    assert fractions[0.5] > 0.99 and fractions[1.0] == 1.0


# ---------------------------------------------------------------------------
# Figure 1's claims, in a reduced but honest setting: the paper's data size,
# negatives, optimiser and network, 2000 iterations (20 epochs) instead of 10k,
# two seeds.  It guards what our runs showed (README): the loss rises with eta
# (Fig. 1c), eta = 0 and eta = 5 leave the linear probe at chance, and an
# intermediate noise level beats both.  After 20 epochs that level is eta = 1
# (eta = 0.4 is still at chance).  After the full 100 epochs the bump spans
# eta = 0.2 to 1, its top moves between 0.4 and 1 from one set of seeds to the
# next, and it stays near 0.55-0.6, not the paper's 0.70 at eta = 0.4: the
# paper's exact claim did not reproduce, so it is not what this test asserts.
# ---------------------------------------------------------------------------
SWEEP_ETAS = (0.0, 0.4, 1.0, 5.0)


@pytest.fixture(scope="module")
def reduced_sweep():
    # One thread: these tensors are small, and on a busy 2-core machine two
    # threads wait on each other (measured: up to 5x slower); one is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reduced_sweep()
    finally:
        torch.set_num_threads(threads)


def _reduced_sweep():
    results = {}
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        train, train_labels = spiral.make_spirals(spiral.N_TRAIN, generator=g)
        test, test_labels = spiral.make_spirals(4000, generator=g)
        for eta in SWEEP_ETAS:
            encoder, _, losses = spiral.train_ir(train, eta, iters=2000, seed=seed, progress=False)
            accuracy = spiral.transfer_accuracy(spiral.embed(encoder, train), train_labels,
                                                spiral.embed(encoder, test), test_labels)
            results[eta, seed] = (sum(losses[-100:]) / 100, accuracy)
    return results


def test_training_loss_rises_with_eta(reduced_sweep):
    log_k = math.log(spiral.NEGATIVES + 1)
    for seed in (0, 1):
        losses = [reduced_sweep[eta, seed][0] for eta in SWEEP_ETAS]
        assert all(a < b for a, b in zip(losses, losses[1:])), losses
        assert losses[0] < log_k - 1.5           # eta = 0: the views are easy to tell apart
        assert abs(losses[-1] - log_k) < 0.15    # eta = 5: next to nothing learned


def test_transfer_accuracy_is_chance_at_both_ends_and_higher_in_between(reduced_sweep):
    mean = {eta: sum(reduced_sweep[eta, seed][1] for seed in (0, 1)) / 2 for eta in SWEEP_ETAS}
    assert abs(mean[0.0] - 0.5) < 0.04
    assert abs(mean[5.0] - 0.5) < 0.04
    assert mean[1.0] > max(mean[0.0], mean[5.0]) + 0.03, mean


# ---------------------------------------------------------------------------
# The transfer probe
# ---------------------------------------------------------------------------
def test_probe_solves_separable_data_and_is_linear():
    g = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    features = centres[labels] + 0.3 * torch.randn(n, 2, generator=g)
    assert spiral.transfer_accuracy(features[:2000], labels[:2000], features[2000:], labels[2000:]) > 0.99
    # XOR cannot be done by a line: a linear probe stays near chance
    xor = torch.rand(n, 2, generator=g) * 2 - 1
    xor_labels = ((xor[:, 0] > 0) ^ (xor[:, 1] > 0)).long()
    assert spiral.transfer_accuracy(xor[:2000], xor_labels[:2000], xor[2000:], xor_labels[2000:]) < 0.6


def test_probe_reaches_the_optimum_of_the_logistic_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 2, generator=g)
    labels = (x @ torch.tensor([1.0, -2.0]) + 0.7 * torch.randn(3000, generator=g) > 0.3).long()
    weight, bias = spiral.fit_logistic_regression(x, labels, l2=1e-4)
    theta = torch.cat([weight, bias.reshape(1)]).requires_grad_()
    xb = torch.cat([x.double(), torch.ones(3000, 1, dtype=torch.float64)], 1)
    loss = F.binary_cross_entropy_with_logits(xb @ theta, labels.double()) + 0.5e-4 * (theta[:2] ** 2).sum()
    loss.backward()
    assert theta.grad.abs().max() < 1e-8


def test_probe_does_not_depend_on_the_representations_scale():
    # The eta = 5 puzzle: a nearly collapsed representation is still a (tiny)
    # feature map.  Our probe gives the same answer at any scale and offset.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 2, generator=g)
    labels = (x[:, 0] + 0.5 * torch.randn(4000, generator=g) > 0).long()
    accuracies = [spiral.transfer_accuracy(f[:2000], labels[:2000], f[2000:], labels[2000:])
                  for f in (x, x * 1e-3 + 5, x * 1e3)]
    assert max(accuracies) - min(accuracies) < 1e-9
    assert accuracies[0] > 0.75
    # a constant representation carries nothing: chance, not an error
    constant = torch.ones(4000, 2)
    assert abs(spiral.transfer_accuracy(constant[:2000], labels[:2000], constant[2000:], labels[2000:]) - 0.5) < 0.05


# ---------------------------------------------------------------------------
# Command line: errors before training, a tiny end-to-end run, --help
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--eta", "-1"], "eta"),
    (["--sweep", "0", "-0.5"], "eta"),
    (["--eta", "nan"], "eta"),
    (["--iters", "0"], "--iters"),
    (["--iters", "-5"], "--iters"),
    (["--negatives", "20000"], "--negatives"),
    (["--n-train", "1000", "--negatives", "1001"], "--negatives"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seeds", "0"], "--seeds"),
    (["--tau", "0"], "--tau"),
    (["--alpha", "1"], "--alpha"),
    (["--lr", "-0.1"], "--lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--turns", "0"], "--turns"),
    (["--threads", "0"], "--threads"),
    (["--warmup", "-1"], "--warmup"),
    (["--n-test", "1"], "--n-test"),
    (["--device", "nonsense"], "--device"),
    (["--out", "figure.txt"], "--out"),
])
def test_bad_arguments_fail_before_training(argv, message, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        spiral.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert time.perf_counter() - start < 5  # no training happened


def test_unwritable_output_path_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        spiral.main(["--out", str(blocker / "figure.png")])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        spiral.main(["--out", str(tmp_path)])  # a folder, not a file


def test_tiny_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "fig.png"
    results = spiral.main(["--sweep", "0", "0.4", "--seeds", "2", "--iters", "40", "--n-train", "512",
                           "--n-test", "512", "--negatives", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 10_000
    assert len(results) == 4 and {r["eta"] for r in results} == {0.0, 0.4}
    assert "transfer accuracy" in printed and "+-" in printed and "iter" in printed
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["losses"]) == 40


def test_help_runs():
    done = subprocess.run([sys.executable, "spiral.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--eta" in done.stdout and "--sweep" in done.stdout
