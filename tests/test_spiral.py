"""Checks for spiral.py (Sec. 4.3, Figure 1): views, IR, the probe, the figure, the CLI."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import spiral
from infonce import infonce_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # spiral.py's own default (THREADS = 1): the tensors are small, and two threads on a busy
    # machine wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(spiral.THREADS)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# Data and views
# ---------------------------------------------------------------------------
def test_views_are_x_plus_uniform_0_eta_per_coordinate():
    eta, n = 0.4, 200_000
    x = torch.tensor([[0.3, -0.7]]).expand(n, 2)
    noise = spiral.sample_views(x, eta, torch.Generator().manual_seed(0)) - x
    # support [0, eta] (not centred, as Sec. 4.3 prints it), for both coordinates
    assert noise.min() >= 0 and noise.max() <= eta + 1e-6
    assert noise.min() < 0.001 and noise.max() > eta - 0.001
    # U(0, eta): mean eta/2, variance eta^2/12, within 5 standard errors
    se_mean = eta / math.sqrt(12 * n)
    assert torch.allclose(
        noise.mean(0).double(),
        torch.tensor([eta / 2, eta / 2], dtype=torch.float64),
        atol=5 * se_mean,
    )
    assert torch.allclose(
        noise.double().var(0), torch.full((2,), eta * eta / 12, dtype=torch.float64), rtol=0.02
    )
    counts = torch.histc(noise[:, 0], bins=10, min=0, max=eta)  # flat
    assert (counts / n - 0.1).abs().max() < 0.005
    assert abs(torch.corrcoef(noise.T)[0, 1].item()) < 0.01  # independent coordinates


def test_eta_zero_is_the_privileged_view_and_negative_eta_fails():
    x = torch.randn(10, 2)
    assert torch.equal(spiral.sample_views(x, 0.0), x)
    with pytest.raises(ValueError, match="eta"):
        spiral.sample_views(x, -0.1)


def test_geometry_is_figure_1a():
    # Figure 1a, scaled to an outer radius of 1: one turn from radius 0.2 to
    # 1.0, i.e. the curve r = (2 theta + pi) / (5 pi), theta in [0, 2 pi];
    # the second spiral is the first rotated by 180 degrees.
    assert (spiral.INNER_RADIUS, spiral.OUTER_RADIUS, spiral.TURNS) == (0.2, 1.0, 1.0)
    points, labels = spiral.make_spirals(20_000, generator=torch.Generator().manual_seed(3))
    again, labels_again = spiral.make_spirals(20_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(points, again) and torch.equal(labels, labels_again)
    assert (labels == 0).sum() == (labels == 1).sum() == 10_000
    radius = points.norm(dim=1)
    assert 0.2 - 1e-6 <= radius.min() < 0.201 and 0.999 < radius.max() <= 1.0 + 1e-6
    for label, sign in ((0, 1.0), (1, -1.0)):
        p = sign * points[labels == label].double()
        r = p.norm(dim=1)
        theta = (5 * math.pi * r - math.pi) / 2  # where the curve has radius r
        on_curve = torch.stack([r * theta.cos(), r * theta.sin()], 1)
        assert (on_curve - p).norm(dim=1).max() < 1e-5
    # uniform in angle (and so in radius): each tenth of the turn holds a tenth of the points
    counts = torch.histc(radius, bins=10, min=0.2, max=1.0)
    assert (counts / len(radius) - 0.1).abs().max() < 0.01
    # along any ray from the centre the arms alternate 0.4 apart (the text's
    # "border of identifiability" at eta = 0.4): compare points at the same angle
    angle = torch.atan2(points[:, 1], points[:, 0]).double()
    a0, r0 = angle[labels == 0][:500], radius[labels == 0][:500].double()
    a1, r1 = angle[labels == 1], radius[labels == 1].double()
    same_ray = (a0[:, None] - a1[None, :]).remainder(2 * math.pi).sub(
        math.pi
    ).abs() > math.pi - 0.003
    gaps = (r0[:, None] - r1[None, :]).abs()[same_ray]
    assert len(gaps) > 500
    assert (gaps - 0.4).abs().max() < 0.01


def test_raw_coordinates_are_at_chance_for_a_linear_probe():
    # Uniform in angle over whole turns: a linear probe on (x, y) scores 0.5,
    # so chance really is the floor, as Sec. 4.3 assumes.
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        train, train_labels = spiral.make_spirals(spiral.N_TRAIN, generator=g)
        test, test_labels = spiral.make_spirals(spiral.N_TEST, generator=g)
        assert abs(spiral.transfer_accuracy(train, train_labels, test, test_labels) - 0.5) < 0.02


def test_the_earlier_geometry_stays_reachable():
    points, labels = spiral.make_spirals(
        4000, inner_radius=0.5, outer_radius=1.5, generator=torch.Generator().manual_seed(0)
    )
    radius = points.norm(dim=1)
    assert 0.5 - 1e-6 <= radius.min() < 0.51 and 1.49 < radius.max() <= 1.5 + 1e-6
    with pytest.raises(ValueError, match="inner_radius"):
        spiral.make_spirals(10, inner_radius=1.0, outer_radius=1.0)


def test_shared_view_fraction_marks_eta_04_as_the_border():
    # Sec. 4.2 / 4.3: views stay identifiable up to eta = 0.25; from eta = 0.4
    # on, every point's view set meets the other spiral's.
    points, labels = spiral.make_spirals(8000, generator=torch.Generator().manual_seed(0))
    fractions = {
        eta: spiral.shared_view_fraction(points, labels, eta) for eta in (0.0, 0.25, 0.3, 0.4, 1.0)
    }
    assert fractions[0.0] == fractions[0.25] == 0.0
    assert 0.3 < fractions[0.3] < 0.9
    assert fractions[0.4] > 0.99 and fractions[1.0] == 1.0


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
    for b in range(8):
        assert torch.allclose(scores[b, 0], z[b] @ bank[idx[b]] / 0.1)
        for j in (0, 17, 29):
            assert torch.allclose(scores[b, 1 + j], z[b] @ bank[negative_idx[j]] / 0.1)


def test_bank_update_is_eq7_renormalized_and_touches_only_its_rows():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(20, 2, generator=g), dim=1)
    before = bank.clone()
    idx = torch.tensor([3, 7, 11])
    z = F.normalize(torch.randn(3, 2, generator=g), dim=1)
    spiral.update_bank_(bank, idx, z, alpha=0.5)
    mixed = 0.5 * before[idx] + 0.5 * z
    torch.testing.assert_close(bank[idx], mixed / mixed.norm(dim=1, keepdim=True))
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(bank[untouched], before[untouched])
    spiral.update_bank_(bank, idx, z, alpha=0.0)  # alpha = 0: the bank holds the latest view
    torch.testing.assert_close(bank[idx], z)


@pytest.mark.parametrize("tau, expected", [(1.0, 7.554), (0.07, 6.081)])
def test_loss_floor_matches_monte_carlo(tau, expected):
    # Bank spread evenly on the circle, every view embedded exactly on its own
    # entry: the loss the best 2-D embedding reaches.  Figure 1c flattens near
    # 7.57 at low noise, which is the tau = 1 floor, not the tau = 0.07 one.
    negatives, n = 4096, 100_000
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(n, (512,), generator=g)
    losses = [
        infonce_loss(
            spiral.ir_scores(bank[idx], bank, idx, torch.randint(n, (negatives,), generator=g), tau)
        )
        for _ in range(8)
    ]
    floor = spiral.loss_floor(negatives, tau)
    assert abs(torch.stack(losses).mean().item() - floor) < 0.01
    assert abs(floor - expected) < 0.001
    assert floor < math.log(negatives + 1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def test_encoder_is_five_linear_layers_128_wide_with_a_2d_output():
    encoder = spiral.make_encoder()
    linears = [m for m in encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2, 128),
        (128, 128),
        (128, 128),
        (128, 128),
        (128, 2),
    ]
    # He init (the default): the untrained encoder already spreads directions;
    # PyTorch's own init (--init default) maps every point to nearly one direction
    points, _ = spiral.make_spirals(4000, generator=torch.Generator().manual_seed(0))
    spreads = {}
    for init in ("he", "default"):
        spreads[init] = []
        for seed in range(5):
            torch.manual_seed(seed)
            output = spiral.encode(spiral.make_encoder(init=init), points)
            spreads[init].append(F.normalize(output, dim=1).std(0).norm().item())
    assert sum(spreads["he"]) / 5 > 0.4 and max(spreads["default"]) < 0.15
    assert all(h > 2 * d for h, d in zip(spreads["he"], spreads["default"], strict=True))


def test_short_run_lowers_the_loss_and_calls_the_probe_after_every_epoch():
    points, _ = spiral.make_spirals(2048, generator=torch.Generator().manual_seed(0))
    calls = []
    encoder, bank, losses = spiral.train_ir(
        points,
        0.4,
        iters=330,
        negatives=512,
        seed=0,
        progress=False,
        after_epoch=lambda *a: calls.append(a),
    )
    log_k, floor = math.log(513), spiral.loss_floor(512, 1.0)
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16  # one epoch = 16 steps
    assert last < first - 0.2 and last < log_k - 0.5 and last > floor - 0.05
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(2048))
    # 330 steps = 20 whole epochs of 16 (and 10 steps of a 21st, not probed)
    assert [c[0] for c in calls] == list(range(1, 21))
    assert all(c[1] is encoder for c in calls)
    assert calls[4][2] == pytest.approx(sum(losses[64:80]) / 16)


def test_training_is_reproducible_by_seed():
    points, _ = spiral.make_spirals(512, generator=torch.Generator().manual_seed(0))
    runs = [
        spiral.train_ir(points, 0.2, iters=20, negatives=128, seed=s, progress=False)[2]
        for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_progress_lines_report_step_loss_rate_and_time_left(capsys):
    points, _ = spiral.make_spirals(512, generator=torch.Generator().manual_seed(0))
    spiral.train_ir(points, 0.2, iters=10, negatives=64, progress=True, label="[x] ")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[x] step     10/10  loss ")
    assert "it/s" in line and "s left" in line


# ---------------------------------------------------------------------------
# The transfer probe and the collapse rule
# ---------------------------------------------------------------------------
def test_probe_solves_separable_data_and_is_linear():
    g = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    features = centres[labels] + 0.3 * torch.randn(n, 2, generator=g)
    assert (
        spiral.transfer_accuracy(features[:2000], labels[:2000], features[2000:], labels[2000:])
        > 0.99
    )
    xor = torch.rand(n, 2, generator=g) * 2 - 1  # XOR cannot be done by a line
    xor_labels = ((xor[:, 0] > 0) ^ (xor[:, 1] > 0)).long()
    assert (
        spiral.transfer_accuracy(xor[:2000], xor_labels[:2000], xor[2000:], xor_labels[2000:]) < 0.6
    )


def test_probe_reaches_the_optimum_of_the_logistic_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 2, generator=g)
    labels = (x @ torch.tensor([1.0, -2.0]) + 0.7 * torch.randn(3000, generator=g) > 0.3).long()
    weight, bias = spiral.fit_logistic_regression(x, labels, l2=1e-4)
    theta = torch.cat([weight, bias.reshape(1)]).requires_grad_()
    xb = torch.cat([x.double(), torch.ones(3000, 1, dtype=torch.float64)], 1)
    loss = (
        F.binary_cross_entropy_with_logits(xb @ theta, labels.double())
        + 0.5e-4 * (theta[:2] ** 2).sum()
    )
    loss.backward()
    assert theta.grad.abs().max() < 1e-8


def test_probe_does_not_depend_on_the_features_scale_or_offset():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 2, generator=g)
    labels = (x[:, 0] + 0.5 * torch.randn(4000, generator=g) > 0).long()
    accuracies = [
        spiral.transfer_accuracy(f[:2000], labels[:2000], f[2000:], labels[2000:])
        for f in (x, x * 1e-3 + 5, x * 1e3)
    ]
    assert max(accuracies) - min(accuracies) < 1e-9
    assert accuracies[0] > 0.75


def _spiral_data(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return spiral.make_spirals(n, generator=g) + spiral.make_spirals(n, generator=g)


def test_both_readings_are_invariant_to_rescaling_the_encoder_output():
    data = _spiral_data()
    torch.manual_seed(0)
    encoder = spiral.make_encoder()
    results = []
    for scale in (1.0, 1e-3, 1e3):
        scaled = spiral.make_encoder()
        scaled.load_state_dict(encoder.state_dict())
        with torch.no_grad():
            scaled[-1].weight.mul_(scale)
            scaled[-1].bias.mul_(scale)
        results.append(spiral.evaluate(scaled, *data, information=1.0))
    for key in ("raw", "normalized"):
        assert results[0][key] == results[1][key] == results[2][key], key
    # the untrained map reads something, and the two readings differ: not a constant answer
    assert results[0]["raw"] != 0.5 and results[0]["raw"] != results[0]["normalized"]


def test_a_representation_that_learned_nothing_scores_chance():
    # The collapse rule: when log K - loss (the InfoNCE estimate of what two
    # views share) is below MIN_INFORMATION, both readings report chance and
    # the probe's own answer is kept beside them.
    data = _spiral_data()
    torch.manual_seed(1)
    encoder = spiral.make_encoder()
    low = spiral.evaluate(encoder, *data, information=spiral.MIN_INFORMATION / 2)
    high = spiral.evaluate(encoder, *data, information=spiral.MIN_INFORMATION * 2)
    assert low["collapsed"] and not high["collapsed"]
    assert low["raw"] == low["normalized"] == 0.5
    assert (low["raw_fit"], low["normalized_fit"]) == (high["raw"], high["normalized"])
    assert high["raw"] == high["raw_fit"] != 0.5
    # loss above log K (information < 0, e.g. the first steps) counts as nothing learned too
    assert spiral.evaluate(encoder, *data, information=-0.2)["raw"] == 0.5


# ---------------------------------------------------------------------------
# Figure 1's claims in a reduced configuration (see the comment below)
# ---------------------------------------------------------------------------
# The paper's data, negatives, optimiser, network and tau = 1, 1,500
# iterations (15 epochs) instead of 10k, seeds 0 and 1, eta = 0, 0.4, 1, 5.
# With the learning rate constant, these runs are the first 15 epochs of the
# README's 5-seed sweep.  What they assert held at epoch 15 for every one of
# seeds 0-4 there (the mean-of-two check: for every pair of them), and still
# holds after 100 epochs:
#   * the loss rises with eta (Fig. 1c): per seed, eta 0 < 0.4 < 1 < 5
#     (smallest gap 0.035 nats);
#   * eta = 0 sits on the 2-D floor (7.555-7.561 against 7.554);
#   * eta = 5 stays at log K: log K - loss 0.009-0.017, under MIN_INFORMATION
#     (0.03), so both readings report chance;
#   * eta = 0 is at chance in both readings (0.458-0.525);
#   * the normalised reading at eta = 1 beats eta = 0 (mean of the two seeds;
#     0.065 for the worst pair of seeds at epoch 15, 0.11 over 5 seeds at
#     epoch 100).
# What is not asserted, because it did not hold across seeds: any peak of the
# raw-output accuracy, and the paper's 0.70 at eta = 0.4 (README).
GUARD_ETAS, GUARD_SEEDS, GUARD_ITERS = (0.0, 0.4, 1.0, 5.0), (0, 1), 1500


@pytest.fixture(scope="module")
def reduced_sweep():
    results = {}
    steps_per_epoch = spiral.N_TRAIN // spiral.BATCH_SIZE
    for seed in GUARD_SEEDS:
        g = torch.Generator().manual_seed(seed)
        data = spiral.make_spirals(spiral.N_TRAIN, generator=g) + spiral.make_spirals(
            spiral.N_TEST, generator=g
        )
        for eta in GUARD_ETAS:
            encoder, _, losses = spiral.train_ir(
                data[0], eta, iters=GUARD_ITERS, seed=seed, progress=False
            )
            loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
            result = spiral.evaluate(
                encoder, *data, information=math.log(spiral.NEGATIVES + 1) - loss
            )
            results[eta, seed] = dict(result, loss=loss)
    return results


def test_reduced_sweep_loss_rises_with_eta_from_the_floor_to_log_k(reduced_sweep):
    log_k, floor = math.log(spiral.NEGATIVES + 1), spiral.loss_floor(spiral.NEGATIVES, spiral.TAU)
    for seed in GUARD_SEEDS:
        losses = [reduced_sweep[eta, seed]["loss"] for eta in GUARD_ETAS]
        assert all(a < b for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
        assert floor - 0.005 < losses[0] < floor + 0.02
        assert 0 < log_k - losses[-1] < spiral.MIN_INFORMATION


def test_reduced_sweep_accuracy_at_chance_at_both_ends_and_above_it_normalized_at_eta_1(
    reduced_sweep,
):
    for seed in GUARD_SEEDS:
        at_5 = reduced_sweep[5.0, seed]
        assert at_5["collapsed"] and at_5["raw"] == at_5["normalized"] == 0.5
        assert abs(reduced_sweep[0.0, seed]["raw"] - 0.5) < 0.05
        assert abs(reduced_sweep[0.0, seed]["normalized"] - 0.5) < 0.05
        assert not reduced_sweep[1.0, seed]["collapsed"]
    normalized = {
        eta: sum(reduced_sweep[eta, s]["normalized"] for s in GUARD_SEEDS) / 2 for eta in GUARD_ETAS
    }
    assert normalized[1.0] > normalized[0.0] + 0.05, normalized


# ---------------------------------------------------------------------------
# Command line: errors before training, a tiny end-to-end run with the figure, --help
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--eta", "-1"], "--eta"),
        (["--sweep", "0", "-0.5"], "--sweep"),
        (["--eta", "nan"], "--eta"),
        (["--eta", "abc"], "--eta"),
        (["--iters", "0"], "--iters"),
        (["--negatives", "20000"], "--negatives"),
        (["--n-train", "1000", "--negatives", "1001"], "--negatives"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seeds", "0"], "--seeds"),
        (["--tau", "0"], "--tau"),
        (["--alpha", "1"], "--alpha"),
        (["--lr", "-0.1"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--turns", "0"], "--turns"),
        (["--inner-radius", "-0.1"], "--inner-radius"),
        (["--outer-radius", "0.2"], "--outer-radius"),
        (["--threads", "0"], "--threads"),
        (["--n-test", "1"], "--n-test"),
        (["--device", "nonsense"], "--device"),
        (["--out", "figure.txt"], "--out"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_fail_before_training_as_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        spiral.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "step" not in captured.out  # no training started
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spiral.py: error:") and flag in lines[0], (
        captured.err
    )


def test_bad_argument_from_the_shell_is_one_line_and_status_2():
    done = subprocess.run(
        [sys.executable, "spiral.py", "--eta", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stdout == "" and len(done.stderr.strip().splitlines()) == 1 and "--eta" in done.stderr
    )


def test_a_default_that_does_not_fit_the_data_adapts_and_says_so(tmp_path, capsys):
    # --negatives left at its default (4096) with 256 training points: use 256, and say so;
    # a typed value that does not fit stays an error (test_bad_arguments_... above).
    argv = ["--n-train", "256", "--n-test", "256", "--iters", "8", "--batch-size", "32"]
    results = spiral.main(argv + ["--out", str(tmp_path / "fig.png")])
    printed = capsys.readouterr().out
    assert "--negatives" in printed.splitlines()[0] and "using 256" in printed.splitlines()[0]
    assert "K = 256 + 1" in printed and len(results[0]["losses"]) == 8


def test_unwritable_paths_fail_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for argv, flag in (
        (["--out", str(blocker / "figure.png")], "--out"),
        (["--out", str(tmp_path)], "--out"),
        (["--results", str(tmp_path)], "--results"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            spiral.main(argv)
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err


def test_tiny_sweep_end_to_end_saves_resumes_and_draws_every_panel(tmp_path, capsys):
    out, saved = tmp_path / "fig.png", tmp_path / "runs.pt"
    argv = [
        "--sweep",
        "0",
        "0.4",
        "--seeds",
        "2",
        "--iters",
        "40",
        "--n-train",
        "256",
        "--n-test",
        "256",
        "--negatives",
        "64",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--results",
        str(saved),
    ]
    results = spiral.main(argv)
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 10_000
    assert len(results) == 4 and {r["eta"] for r in results} == {0.0, 0.4}
    assert "transfer accuracy" in printed and "+-" in printed and "step" in printed
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["losses"]) == 40
        assert r["curves"]["epoch"] == [1, 2, 3, 4, 5]  # 40 steps of 32 over 256 points: 5 epochs
    # a second call with the same settings loads the runs instead of training
    again = spiral.main(argv)
    printed = capsys.readouterr().out
    assert "[saved]" in printed and "step " not in printed
    assert [r["losses"] for r in again] == [r["losses"] for r in results]
    # ... and refuses, before training, to mix in runs made with other settings
    with pytest.raises(SystemExit) as exit_info:
        spiral.main(argv + ["--tau", "0.5"])
    assert exit_info.value.code == 2
    assert "--results" in capsys.readouterr().err
    # Figure 1's panels: (a) views and (b) representations, one small multiple
    # per eta; (c) loss, (d) accuracy per epoch, (e) final accuracy against eta
    fig = spiral.plot_figure1(results, [0.0, 0.4], spiral.build_parser().parse_args(argv), str(out))
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith("noise: ") and "acc" not in t for t in titles) == 2  # (a)
    assert sum(t.startswith("noise: ") and "acc" in t for t in titles) == 2  # (b)
    for panel in (
        "(c) training loss",
        "(d) transfer accuracy after every epoch",
        "(e) final accuracy",
    ):
        assert sum(t.startswith(panel) for t in titles) == 1, titles
    loss_panel = next(ax for ax in fig.axes if ax.get_title().startswith("(c)"))
    assert len(loss_panel.lines[0].get_xdata()) == 40  # every iteration
    accuracy_panel = next(ax for ax in fig.axes if ax.get_title().startswith("(d)"))
    assert list(accuracy_panel.lines[0].get_xdata()) == [1, 2, 3, 4, 5]  # every epoch


def test_help_explains_the_flags():
    done = subprocess.run(
        [sys.executable, "spiral.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for flag in ("--eta", "--sweep", "--tau", "--inner-radius", "--outer-radius", "--results"):
        assert flag in done.stdout
    assert "Figure 1" in done.stdout and "Eq. 5" in done.stdout and "Eq. 7" in done.stdout
