"""The double spiral: which views InfoNCE sees decides what it learns (Sec. 4.3, Figure 1).

Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised Representation
Learning", Sec. 4.3 (a toy example) and Figure 1.

    python spiral.py                 # demo: eta = 0, 0.4, 1, 5 for 15 epochs, a table and a figure
    python spiral.py --eta 0.4       # the paper's best view, full length (10k iterations)
    python spiral.py --sweep         # Figure 1: eta = 0, 0.1, 0.25, 0.4, 0.5, 1, 2.5, 5
    python spiral.py --sweep --seeds 5 --results out/sweep5.pt    # the README's table, resumable

The idea.  Points x lie on two interleaved spirals; no label is used in training.  A view of x
is v(x, a) = x + (eps_x, eps_y) with eps ~ U(0, eta) per coordinate (Sec. 4.1).  eta = 0 leaves
the privileged view x alone; a larger eta lets two views of x share less (the bottleneck of
Sec. 4.2) until, past eta = 0.4 (the spacing of the arms), a view no longer says which spiral it
came from (identifiability).  An encoder trained with InfoNCE on pairs of views gives a 2-D
representation, and its quality is how well a linear probe on it tells the spirals apart.  The
paper's claim: an inverted U in eta, with 0.70 at eta = 0.4 and chance at both ends.

The paper's objects, in the order of this file:
  * data and views (make_spirals, sample_views): Figure 1a;
  * the encoder (make_encoder): a 5-layer MLP, 128 hidden units, 2-D output.  Figure 1b draws
    its raw output; the loss sees it L2-normalised;
  * the objective (ir_scores, update_bank_, train_ir): Instance Discrimination (Sec. 5.3,
    Eq. 6), i.e. InfoNCE (Eq. 5, infonce.infonce_loss) between the current view of x_i and its
    memory-bank entry (Eq. 7), against K - 1 = 4096 negatives drawn from the bank, with the
    critic f = z . M / tau.  SGD, momentum 0.9, weight decay 1e-5, batch 128, lr 0.03, 10k
    iterations = 100 epochs, hence 12,800 training points;
  * what is measured (evaluate): the training loss (Figure 1c; log K when nothing is learned)
    and, after every epoch, the test accuracy of logistic regression on the frozen
    representation (Figure 1d).

What Figure 1 fixes and the text does not (tests/test_spiral.py checks geometry and floor):
  * geometry (1a): one turn per spiral, radius 0.2 to 1, the second arm the first rotated by
    180 degrees, so along any ray the arms alternate 0.4 apart: the "border of identifiability".
    The text's "one clockwise, one counter-clockwise" cannot be literal: mirrored arms cross;
  * tau = 1 (1c): the low-noise losses flatten near 7.57 nats.  The best any 2-D unit embedding
    can do (loss_floor: bank uniform on the circle, views exact, K - 1 negatives) is
        E[loss] ~= log(1 + (K - 1) E[exp((cos theta - 1) / tau)]) = log(1 + (K - 1) i0e(1 / tau)),
    7.55 at tau = 1 and 6.08 at IR's usual tau = 0.07;
  * the eta grid (1a, 1d): 0, 0.1, 0.25, 0.4, 0.5, 1, 2.5, 5.

Choices the paper leaves open:
  * points uniform in angle: a linear probe on the raw (x, y) then scores 0.5, so Sec. 4.3's
    "chance" is the floor and anything above it is what the encoder added;
  * 4096 negatives drawn uniformly at every step and shared by the batch: each row's negatives
    still follow Eq. 5's uniform q, for one gather instead of 128;
  * He init and a bank filled by the untrained encoder (make_encoder says why);
  * the probe: logistic regression fitted to convergence on standardised features, so it reads
    the representation and not its scale, on the raw output (the headline: what Figure 1b draws)
    and on the normalised one.  Collapse rule: when log K - loss (InfoNCE's estimate, Eq. 2, of
    what two views share) is under MIN_INFORMATION nats, nothing was learned and both readings
    report chance.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from infonce import infonce_loss

# The paper's settings (Sec. 4.3, Figure 1); the command line changes each.
ETAS = (0.0, 0.1, 0.25, 0.4, 0.5, 1.0, 2.5, 5.0)  # Figure 1a / 1d
N_TRAIN = 12_800  # 10k iterations of batch 128 = 100 epochs
N_TEST = 12_800  # held-out points for the transfer task
ITERS = 10_000
BATCH_SIZE = 128
NEGATIVES = 4096  # "4096 negative samples drawn from the training dataset": K - 1 in Eq. 5
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-5
TAU = 1.0  # read off Figure 1c (module docstring); IR's usual value is 0.07
ALPHA = 0.5  # Eq. 7 bank update rate, IR's default
INNER_RADIUS, OUTER_RADIUS, TURNS = 0.2, 1.0, 1.0  # Figure 1a
# Final test accuracy at each eta, read off Figure 1d (one run per eta).
PAPER_ACCURACY = dict(zip(ETAS, (0.435, 0.61, 0.575, 0.70, 0.475, 0.49, 0.485, 0.515), strict=True))
# Nats of log K - loss below which the objective learned nothing (evaluate).  Over 5 seeds x 100
# epochs it never exceeded 0.021 at eta = 5, nor fell below 0.051 at eta = 2.5 after epoch 4.
MIN_INFORMATION = 0.03
# One CPU thread: the tensors are small, and two threads on a busy machine wait on each other.
THREADS = 1
# `python spiral.py` with no arguments runs this short sweep.
DEMO_ARGV = ["--sweep", "0", "0.4", "1", "5", "--iters", "1500", "--n-test", "4000"]


# ---------------------------------------------------------------------------
# Data and views (Sec. 4.1, 4.3; Figure 1a)
# ---------------------------------------------------------------------------
def make_spirals(
    n, inner_radius=INNER_RADIUS, outer_radius=OUTER_RADIUS, turns=TURNS, generator=None
):
    """Two interleaved Archimedean spirals, one per class (Figure 1a).

    Returns points [n, 2] (float32) and labels [n] (int64: 0, 1, 0, 1, ...).  Spiral 0 runs from
    inner_radius at angle 0 to outer_radius at angle 2 pi turns, uniform in angle; spiral 1 is
    spiral 0 rotated by 180 degrees, so along any ray the arms alternate
    (outer - inner) / (2 turns) apart: 0.4 here.
    """
    _check_int("n", n, low=2)
    _check_positive("turns", turns)
    if not 0 <= inner_radius < outer_radius:
        raise ValueError(
            f"need 0 <= inner_radius < outer_radius, got {inner_radius}, {outer_radius}"
        )
    labels = torch.arange(n) % 2
    t = torch.rand(n, generator=generator)  # position along the spiral, uniform in angle
    angle = 2 * math.pi * turns * t
    radius = inner_radius + (outer_radius - inner_radius) * t
    sign = 1.0 - 2.0 * labels  # spiral 1 = -spiral 0
    points = (sign * radius)[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return points, labels


def sample_views(points, eta, generator=None):
    """v(x, a) = x + (eps_x, eps_y), eps ~ U(0, eta) per coordinate (Sec. 4.3): [n, 2] -> [n, 2].

    Not centred, as printed.  eta = 0 returns the privileged view x itself (Sec. 4.2).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (eta = 0 is the privileged view alone), got {eta}")
    noise = torch.rand(points.shape, generator=generator).to(points.device)
    return points + eta * noise


def shared_view_fraction(points, labels, eta):
    """Sec. 4.2 identifiability: the fraction of points whose views v_x = [x, x + eta]^2 meet the
    other spiral's (two squares meet when their points are < eta apart in the max-norm)."""
    a, b = points[labels == 0], points[labels == 1]
    gap_ab = torch.cdist(a, b, p=float("inf")).min(dim=1).values
    gap_ba = torch.cdist(b, a, p=float("inf")).min(dim=1).values
    return (torch.cat([gap_ab, gap_ba]) < eta).double().mean().item()


# ---------------------------------------------------------------------------
# The encoder (Sec. 4.3): 5 linear layers, 128 hidden units, a 2-D output
# ---------------------------------------------------------------------------
def make_encoder(hidden=128, layers=5, init="he"):
    """MLP 2 -> 128 -> 128 -> 128 -> 128 -> 2 with ReLUs; init "he" (Kaiming) or "default".

    PyTorch's default Linear init shrinks the signal about sqrt(6)-fold per ReLU layer, so the
    untrained network maps every input to nearly one direction: next to IR's collapsed fixed
    point (every embedding equal, loss = log K, zero gradient).  He init keeps the scale.
    """
    sizes = [2] + [hidden] * (layers - 1) + [2]
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = torch.nn.Linear(fan_in, fan_out)
        if init == "he":
            torch.nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            torch.nn.init.zeros_(linear.bias)
        modules.append(linear)
        if i < layers - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


@torch.inference_mode()
def encode(encoder, points):
    """The representation of Figure 1b: the raw 2-D output, [n, 2] -> [n, 2] on the CPU."""
    device = next(encoder.parameters()).device
    return encoder(points.to(device)).cpu()


# ---------------------------------------------------------------------------
# The objective: IR, i.e. InfoNCE against a memory bank (Eqs. 5-7)
# ---------------------------------------------------------------------------
def ir_scores(z, bank, idx, negative_idx, tau):
    """Critic f = z . M / tau for infonce_loss: [B, K], the positive in column 0.  z [B, 2] and
    bank [N, 2] have unit rows; idx [B] are the rows of x_i; negative_idx [K - 1] is shared."""
    positive = (z * bank[idx]).sum(dim=1, keepdim=True)  # [B, 1]
    negative = z @ bank[negative_idx].T  # [B, K - 1]
    return torch.cat([positive, negative], dim=1) / tau


@torch.no_grad()
def update_bank_(bank, idx, z, alpha):
    """Eq. 7 in place, M[i] <- alpha M[i] + (1 - alpha) z_i: bank [N, 2], idx [B], z [B, 2]."""
    mixed = alpha * bank[idx] + (1 - alpha) * z
    # Back onto the unit circle: not in Eq. 7 as printed, but in IR's code, and f assumes it.
    bank[idx] = F.normalize(mixed, dim=1)


def train_ir(
    points,
    eta,
    iters=ITERS,
    batch_size=BATCH_SIZE,
    negatives=NEGATIVES,
    lr=LR,
    momentum=MOMENTUM,
    weight_decay=WEIGHT_DECAY,
    tau=TAU,
    alpha=ALPHA,
    seed=0,
    device="cpu",
    after_epoch=None,
    progress=True,
    label="",
    init="he",
):
    """Sec. 4.3: train the encoder with IR on views of points [N, 2] (no labels).

    Returns (encoder, bank [N, 2], losses), one infonce_loss per step (log K, K = negatives + 1,
    when nothing is learned).  after_epoch(epoch, encoder, epoch_loss) runs after every full
    pass (Figure 1d's probe); a string it returns joins the progress line, printed every ~2 s.
    """
    n = points.shape[0]
    check_training_settings(
        n, eta, iters, batch_size, negatives, lr, momentum, weight_decay, tau, alpha
    )
    torch.manual_seed(seed)  # initial weights
    generator = torch.Generator().manual_seed(seed + 1)  # views, order, negatives
    points = points.to(device)
    encoder = make_encoder(init=init).to(device)
    optimizer = torch.optim.SGD(
        encoder.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # The bank starts as the untrained encoder's embedding of one view per point.
    with torch.no_grad():
        bank = F.normalize(encoder(sample_views(points, eta, generator)), dim=1)  # [N, 2]

    steps_per_epoch = n // batch_size
    losses, note = [], ""
    start = last_print = time.perf_counter()
    for it in range(iters):
        step = it % steps_per_epoch
        if step == 0:
            order = torch.randperm(n, generator=generator).to(device)  # a new epoch
        idx = order[step * batch_size : (step + 1) * batch_size]
        views = sample_views(points[idx], eta, generator)  # v(x_i, a), a fresh a
        # x_2 .. x_K ~ uniform over the training set (Eq. 5's q), shared by the batch
        negative_idx = torch.randint(n, (negatives,), generator=generator).to(device)

        z = F.normalize(encoder(views), dim=1)  # unit 2-D embeddings
        loss = infonce_loss(ir_scores(z, bank, idx, negative_idx, tau))  # Eq. 5 / Eq. 6
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_bank_(bank, idx, z.detach(), alpha)  # Eq. 7
        losses.append(loss.item())

        if after_epoch is not None and step == steps_per_epoch - 1:
            epoch_loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
            note = after_epoch((it + 1) // steps_per_epoch, encoder, epoch_loss) or ""
        now = time.perf_counter()
        if progress and (now - last_print >= 2.0 or it + 1 == iters):
            rate = (it + 1) / (now - start)
            print(
                f"{label}step {it + 1:>6}/{iters}  loss {losses[-1]:.3f}  {rate:,.0f} it/s  "
                f"{(iters - it - 1) / rate:5.1f} s left  {note}".rstrip(),
                flush=True,
            )
            last_print = now
    return encoder, bank, losses


def loss_floor(negatives, tau):
    """The lowest expected IR loss of a 2-D unit embedding, log(1 + (K - 1) i0e(1 / tau)).

    negatives = K - 1.  Derivation: module docstring.
    """
    _check_int("negatives", negatives, low=1)
    _check_positive("tau", tau)
    i0e = torch.special.i0e(torch.tensor(1.0 / tau, dtype=torch.float64)).item()
    return math.log1p(negatives * i0e)


# ---------------------------------------------------------------------------
# What is measured (Sec. 4.3): a linear probe on the frozen representation
# ---------------------------------------------------------------------------
def transfer_accuracy(train_features, train_labels, test_features, test_labels, l2=1e-4):
    """Test accuracy of logistic regression fitted on [n, d] train features (Sec. 4.3).

    Features are standardised with the training mean and std, so that the converged fit and its
    small ridge depend on the representation, not on its units.
    """
    mean, std = train_features.mean(0), train_features.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays 0
    weight, bias = fit_logistic_regression((train_features - mean) / std, train_labels, l2=l2)
    predictions = (((test_features - mean) / std).double() @ weight + bias > 0).long()
    return (predictions == test_labels).double().mean().item()


def evaluate(encoder, train_points, train_labels, test_points, test_labels, information):
    """Figure 1d's probe on the raw output (the headline) and the normalised one: a dict.

    information = log K - training loss (Eq. 2's estimate).  Under MIN_INFORMATION the
    objective learned nothing: "raw" and "normalized" report chance (the majority class),
    and "raw_fit" / "normalized_fit" keep the probe's own answers.
    """
    train_raw, test_raw = encode(encoder, train_points), encode(encoder, test_points)
    majority = int(train_labels.double().mean() >= 0.5)  # the best constant guess
    chance = (test_labels == majority).double().mean().item()
    result = {"information": information, "collapsed": information < MIN_INFORMATION}
    readings = {
        "raw": (train_raw, test_raw),
        "normalized": (F.normalize(train_raw, dim=1), F.normalize(test_raw, dim=1)),
    }
    for name, (train_features, test_features) in readings.items():
        fit = transfer_accuracy(train_features, train_labels, test_features, test_labels)
        result[name + "_fit"] = fit
        result[name] = chance if result["collapsed"] else fit
    return result


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def fit_logistic_regression(features, labels, l2=1e-4, max_steps=100):
    """Logistic regression fitted to convergence by Newton's method, in float64.

    features [n, d], labels [n] in {0, 1}.  Minimises, with y_i = +-1,
        mean_i log(1 + exp(-y_i (w . x_i + b))) + l2 / 2 |w|^2
    and returns (w [d], b []).  The ridge keeps separable data finite; b is not penalised.
    """
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    y = labels.double()
    ridge = torch.full((x.shape[1],), float(l2), dtype=torch.float64)
    ridge[-1] = 0.0
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(max_steps):
        p = torch.sigmoid(x @ theta)
        gradient = x.T @ (p - y) / len(x) + ridge * theta
        hessian = (x * (p * (1 - p))[:, None]).T @ x / len(x) + torch.diag(ridge)
        # a constant feature: keep the system solvable
        hessian += 1e-12 * torch.eye(len(theta), dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        theta -= step
        if step.abs().max() < 1e-10:
            break
    return theta[:-1], theta[-1]


def check_training_settings(
    n, eta, iters, batch_size, negatives, lr, momentum, weight_decay, tau, alpha
):
    """Raise ValueError naming the setting (and its command-line flag) if it is out of range."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(
            f"eta (--eta / --sweep) must be a finite number >= 0 "
            f"(eta = 0 is the privileged view alone), got {eta}"
        )
    points = "the number of training points"
    _check_int("iters (--iters)", iters, low=1)
    _check_int("batch_size (--batch-size)", batch_size, low=1, high=n, high_name=points)
    _check_int("negatives (--negatives)", negatives, low=1, high=n, high_name=points)
    _check_positive("lr (--lr)", lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum (--momentum) must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(
            f"weight_decay (--weight-decay) must be a finite number >= 0, got {weight_decay}"
        )
    _check_positive("tau (--tau)", tau)
    if not 0 <= alpha < 1:
        raise ValueError(
            f"alpha (--alpha) must be in [0, 1) (Eq. 7; 0 = the latest view), got {alpha}"
        )


def _check_int(name, value, low, high=None, high_name=None):
    too_high = high is not None and value > high
    if isinstance(value, bool) or int(value) != value or value < low or too_high:
        limit = f"between {low} and {high} ({high_name})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {limit}, got {value}")


def _check_positive(name, value):
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    std = values.std().item() if len(values) > 1 else 0.0
    return values.mean().item(), std


# ---------------------------------------------------------------------------
# The demo: one setting end to end, then a sweep over eta and seeds
# ---------------------------------------------------------------------------
def run_setting(eta, seed, args, label="", progress=True):
    """Data for this seed, IR at this eta with the probe after every epoch: a dict of results."""
    generator = torch.Generator().manual_seed(seed)
    geometry = (args.inner_radius, args.outer_radius, args.turns)
    train_points, train_labels = make_spirals(args.n_train, *geometry, generator=generator)
    test_points, test_labels = make_spirals(args.n_test, *geometry, generator=generator)
    data = (train_points, train_labels, test_points, test_labels)
    log_k = math.log(args.negatives + 1)
    keys = ("raw", "normalized", "raw_fit", "normalized_fit", "information")
    curves = {key: [] for key in ("epoch",) + keys}
    probe_seconds = [0.0]

    def after_epoch(epoch, encoder, epoch_loss):  # Figure 1d: accuracy after every epoch
        start = time.perf_counter()
        result = evaluate(encoder, *data, information=log_k - epoch_loss)
        probe_seconds[0] += time.perf_counter() - start
        curves["epoch"].append(epoch)
        for key in keys:
            curves[key].append(result[key])
        return (
            f"epoch {epoch}: accuracy {result['raw']:.3f} (normalized {result['normalized']:.3f})"
        )

    start = time.perf_counter()
    encoder, _, losses = train_ir(
        train_points,
        eta,
        iters=args.iters,
        batch_size=args.batch_size,
        negatives=args.negatives,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        tau=args.tau,
        alpha=args.alpha,
        seed=seed,
        device=args.device,
        after_epoch=after_epoch,
        progress=progress,
        label=label,
        init=args.init,
    )
    seconds = time.perf_counter() - start
    last_epoch = losses[-(args.n_train // args.batch_size) :]  # or all of a shorter run
    final_loss = sum(last_epoch) / len(last_epoch)
    final = evaluate(encoder, *data, information=log_k - final_loss)
    return {
        "eta": eta,
        "seed": seed,
        "losses": losses,
        "final_loss": final_loss,
        "accuracy": final["raw"],
        "accuracy_normalized": final["normalized"],
        "accuracy_fit": final["raw_fit"],
        "accuracy_normalized_fit": final["normalized_fit"],
        "collapsed": final["collapsed"],
        "curves": curves,
        "encoder": encoder.cpu().state_dict(),
        "seconds": seconds,
        "probe_seconds": probe_seconds[0],
        # a linear probe on the raw (x, y) coordinates: "chance" for this geometry
        "input_accuracy": transfer_accuracy(train_points, train_labels, test_points, test_labels),
        "test_points": test_points,
        "test_labels": test_labels,
        "test_output": encode(encoder, test_points),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(
            f"Demo (a short sweep): python spiral.py {' '.join(DEMO_ARGV)}\n"
            f"The paper's run: python spiral.py --eta 0.4    Figure 1: python spiral.py --sweep\n"
        )
        argv = list(DEMO_ARGV)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        etas = check_args(args)
        saved = load_saved_runs(args)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seed, args.seed + args.seeds))
    log_k = math.log(args.negatives + 1)
    print(
        f"IR on two spirals (radius {args.inner_radius:g} to {args.outer_radius:g}, "
        f"{args.turns:g} turn(s)): {args.n_train} training points, K = {args.negatives} + 1 "
        f"(log K = {log_k:.3f}), tau = {args.tau:g}, alpha = {args.alpha:g}, {args.iters} "
        f"iterations; etas {[f'{e:g}' for e in etas]}, seeds {seeds}"
    )

    results = []
    total = len(etas) * len(seeds)
    for i, (seed, eta) in enumerate([(s, e) for s in seeds for e in etas]):
        label = f"[{i + 1}/{total}] eta={eta:g} seed={seed}  "
        r = saved.get((eta, seed)) or run_setting(eta, seed, args, label=label)
        chance = ", loss at log K: chance" if r["collapsed"] else ""
        reloaded = "  [saved]" if (eta, seed) in saved else ""
        print(
            f"{label}final loss {r['final_loss']:.3f} (log K = {log_k:.3f}), transfer accuracy "
            f"{r['accuracy']:.3f} (normalized {r['accuracy_normalized']:.3f}{chance})  "
            f"({r['seconds']:.1f} s, of which probe {r['probe_seconds']:.1f} s over "
            f"{len(r['curves']['epoch'])} epochs){reloaded}",
            flush=True,
        )
        results.append(r)
        saved[eta, seed] = r
        if args.results is not None:
            settings = {name: getattr(args, name) for name in SETTINGS}
            torch.save({"settings": settings, "runs": list(saved.values())}, args.results)

    print()
    geometry = (args.inner_radius, args.outer_radius, args.turns)
    sample = make_spirals(4000, *geometry, generator=torch.Generator().manual_seed(0))
    print(
        f"{'eta':>5} | {'views shared':>12} | {'final loss':>15} | {'accuracy (raw)':>15} | "
        f"{'(normalized)':>15} | at log K | paper"
    )
    for eta in etas:
        runs = [r for r in results if r["eta"] == eta]
        loss, raw, normalized = (
            mean_std([r[key] for r in runs])
            for key in ("final_loss", "accuracy", "accuracy_normalized")
        )
        paper = f"{PAPER_ACCURACY[eta]:.3f}" if eta in PAPER_ACCURACY else "-"
        print(
            f"{eta:>5g} | {shared_view_fraction(*sample, eta):12.2f} | "
            f"{loss[0]:6.3f} +- {loss[1]:5.3f} | {raw[0]:6.3f} +- {raw[1]:5.3f} | "
            f"{normalized[0]:6.3f} +- {normalized[1]:5.3f} | "
            f"{sum(r['collapsed'] for r in runs):>4}/{len(runs):<3} | {paper}"
        )
    print(
        "(views shared: fraction of points whose views can also be views of the other spiral, "
        "Sec. 4.2; accuracy: linear probe on the raw 2-D output, mean +- std over seeds)"
    )
    input_accuracy = mean_std([r["input_accuracy"] for r in results])[0]
    print(
        f"linear probe on the raw (x, y) coordinates: {input_accuracy:.3f} (chance for this "
        f"geometry); log K = {log_k:.3f} (nothing learned); loss_floor = "
        f"{loss_floor(args.negatives, args.tau):.3f} (the best any 2-D embedding can do)"
    )
    plot_figure1(results, etas, args, args.out)
    print(f"saved {args.out}")
    return results


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(
        prog="spiral.py",
        description="Sec. 4.3 / Figure 1: IR (InfoNCE, Eq. 5, with a memory bank, Eq. 7) on two "
        "spirals, views v(x) = x + U(0, eta)^2, transfer = a linear probe predicting the spiral. "
        f"With no arguments: a short demo, the same as  {' '.join(DEMO_ARGV)}.",
    )

    p.add_argument(
        "--eta",
        type=float,
        default=0.4,
        help="view noise (Sec. 4.3): each coordinate of x gets U(0, eta) added; >= 0 (0 = the "
        "privileged view x alone); default 0.4, the paper's best",
    )
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=None,
        metavar="ETA",
        help="train one model per eta and save Figure 1 (no values: Figure 1's "
        f"{' '.join(f'{e:g}' for e in ETAS)})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat every eta over this many seeds (>= 1); report mean and std",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="first seed (data, initial weights, views, negatives)"
    )
    p.add_argument(
        "--iters", type=int, default=ITERS, help="SGD iterations (paper: 10k = 100 epochs)"
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=N_TRAIN,
        help="training points x, both spirals, no labels used (default 12,800: 100 epochs of "
        "128 in 10k iterations)",
    )
    p.add_argument(
        "--n-test", type=int, default=N_TEST, help="held-out points for the transfer task"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size (paper: {BATCH_SIZE}; at most --n-train)",
    )
    p.add_argument(
        "--negatives",
        type=int,
        default=None,
        help=f"negatives per step drawn from the memory bank, K - 1 in Eq. 5 (paper: "
        f"{NEGATIVES}; at most --n-train)",
    )
    p.add_argument("--lr", type=float, default=LR, help="SGD learning rate (paper: 0.03)")
    p.add_argument(
        "--momentum", type=float, default=MOMENTUM, help="SGD momentum in [0, 1) (paper: 0.9)"
    )
    p.add_argument(
        "--weight-decay", type=float, default=WEIGHT_DECAY, help="SGD weight decay (paper: 1e-5)"
    )
    p.add_argument(
        "--tau",
        type=float,
        default=TAU,
        help="temperature of the critic z.M / tau (default 1, as Figure 1c's loss floor implies; "
        "IR uses 0.07)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=ALPHA,
        help="memory bank update rate alpha of Eq. 7, in [0, 1) (IR: 0.5)",
    )
    p.add_argument(
        "--inner-radius",
        type=float,
        default=INNER_RADIUS,
        help="radius where each spiral starts (Figure 1a: 0.2)",
    )
    p.add_argument(
        "--outer-radius",
        type=float,
        default=OUTER_RADIUS,
        help="radius where each spiral ends (Figure 1a: 1.0); the arms are (outer - inner) / "
        "(2 turns) apart",
    )
    p.add_argument(
        "--turns",
        type=float,
        default=TURNS,
        help="turns of each spiral (Figure 1a: 1; whole turns keep a probe on the raw (x, y) "
        "at chance)",
    )
    p.add_argument(
        "--init",
        choices=("he", "default"),
        default="he",
        help="initial weights of the encoder: he (Kaiming, zero biases; the default) or "
        "PyTorch's default Linear init (the paper does not say)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="figure path (default out/spiral_eta<eta>.png, or out/figure1_spiral.png with "
        "--sweep)",
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="PATH",
        help="save every finished run here (torch.save); runs already saved with the same "
        "settings are loaded, not retrained, so an interrupted sweep resumes",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="CPU threads for torch (default 1: the tensors are small)",
    )
    return p


def check_args(args):
    """Every check that can fail, before any training: raises ValueError naming the flag."""
    etas = list(ETAS) if args.sweep == [] else (args.sweep or [args.eta])
    _check_int("--seeds", args.seeds, low=1)
    _check_int("--n-train", args.n_train, low=2)
    _check_int("--n-test", args.n_test, low=2)
    _check_int("--threads", args.threads, low=1)
    for flag, name, default in (
        ("--batch-size", "batch_size", BATCH_SIZE),
        ("--negatives", "negatives", NEGATIVES),
    ):
        if getattr(args, name) is None:  # a default that does not fit the data adapts, and says so
            setattr(args, name, min(default, args.n_train))
            if default > args.n_train:
                print(f"{flag}: the default {default} exceeds --n-train; using {args.n_train}")
    _check_positive("--turns", args.turns)
    if not (math.isfinite(args.inner_radius) and args.inner_radius >= 0):
        raise ValueError(f"--inner-radius must be a finite number >= 0, got {args.inner_radius}")
    if not (math.isfinite(args.outer_radius) and args.outer_radius > args.inner_radius):
        raise ValueError(
            f"--outer-radius must be a finite number > --inner-radius ({args.inner_radius}), "
            f"got {args.outer_radius}"
        )
    for eta in etas:
        check_training_settings(
            args.n_train,
            eta,
            args.iters,
            args.batch_size,
            args.negatives,
            args.lr,
            args.momentum,
            args.weight_decay,
            args.tau,
            args.alpha,
        )
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (optionally cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.out is None:
        name = "figure1_spiral.png" if args.sweep is not None else f"spiral_eta{etas[0]:g}.png"
        args.out = os.path.join("out", name)
    _check_writable_file("--out", args.out, image=True)
    if args.results is not None:
        _check_writable_file("--results", args.results)
    return etas


def _check_writable_file(flag, path, image=False):
    if image:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if os.path.splitext(path)[1].lstrip(".").lower() not in formats:
            raise ValueError(
                f"{flag} {path!r}: the file name must end in an image format matplotlib "
                f"writes ({', '.join('.' + f for f in sorted(formats))})"
            )
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path!r}: cannot create {folder!r} ({error.strerror})") from None
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path!r} is not writable")


# The settings a run saved with --results must share with the call that reloads it.
SETTINGS = (
    "iters",
    "n_train",
    "n_test",
    "batch_size",
    "negatives",
    "lr",
    "momentum",
    "weight_decay",
    "tau",
    "alpha",
    "inner_radius",
    "outer_radius",
    "turns",
    "init",
)


def load_saved_runs(args):
    """Runs saved by an earlier call with --results and the same settings: {(eta, seed): result}."""
    if args.results is None or not os.path.exists(args.results):
        return {}
    try:
        saved = torch.load(args.results, weights_only=False)
        settings, runs = saved["settings"], saved["runs"]
    except Exception as error:  # not a file this program wrote
        raise ValueError(
            f"--results {args.results!r} cannot be read as saved runs ({error})"
        ) from None
    differ = {
        name: settings.get(name) for name in SETTINGS if settings.get(name) != getattr(args, name)
    }
    if differ:
        raise ValueError(
            f"--results {args.results!r} holds runs made with other settings ({differ}); "
            f"give another path or the same settings"
        )
    return {(r["eta"], r["seed"]): r for r in runs}


# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------
def plot_figure1(results, etas, args, path):
    """Figure 1's panels from run_setting results: (a) views, (b) representations, (c) loss over
    iterations, (d) test accuracy after every epoch, (e) final accuracy against eta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in results})
    shown = {r["eta"]: r for r in results if r["seed"] == seeds[0]}  # (a)-(d): one run per eta
    colours = {eta: plt.cm.tab10(i % 10) for i, eta in enumerate(etas)}
    spiral_colours = ("tab:red", "tab:blue")
    fig = plt.figure(figsize=(2.0 * max(len(etas), 6), 11))
    grid = fig.add_gridspec(3, 1, height_ratios=[1, 1, 1.6], hspace=0.35)
    rows = [grid[i].subgridspec(1, len(etas), wspace=0.08) for i in range(2)]
    generator = torch.Generator().manual_seed(0)
    for k, eta in enumerate(etas):
        r = shown[eta]
        points, labels = r["test_points"][:4000], r["test_labels"][:4000]
        for row, drawn, title in (
            (0, sample_views(points, eta, generator), f"noise: {eta:g}"),
            (1, r["test_output"][:4000], f"noise: {eta:g}, acc {r['accuracy']:.2f}"),
        ):
            ax = fig.add_subplot(rows[row][0, k])
            for c in (0, 1):
                xy = drawn[labels == c]
                ax.scatter(xy[:, 0], xy[:, 1], s=1, c=spiral_colours[c], rasterized=True)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
            if row == 0:
                ax.set_aspect("equal")
        if k == 0:
            fig.axes[-2].set_ylabel("(a) one view\nper point", fontsize=9)
            fig.axes[-1].set_ylabel("(b) raw encoder\noutput", fontsize=9)

    bottom = grid[2].subgridspec(1, 3, wspace=0.28)
    ax = fig.add_subplot(bottom[0, 0])  # (c) the InfoNCE loss at every iteration
    for eta in etas:
        ax.plot(shown[eta]["losses"], color=colours[eta], lw=0.6, label=f"noise={eta:g}")
    log_k, floor = math.log(args.negatives + 1), loss_floor(args.negatives, args.tau)
    ax.axhline(log_k, ls="--", c="gray", lw=1)
    ax.axhline(floor, ls=":", c="gray", lw=1)
    ax.text(0, log_k + 0.03, "log K: nothing learned", fontsize=7, color="gray")
    ax.text(0, floor - 0.12, "loss_floor: best 2-D embedding", fontsize=7, color="gray")
    ax.set_ylim(floor - 0.3, log_k + 0.6)
    ax.set_xlabel("iteration")
    ax.set_ylabel("InfoNCE")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"(c) training loss (seed {seeds[0]})", fontsize=9)

    ax = fig.add_subplot(bottom[0, 1])  # (d) test accuracy after every epoch
    for eta in etas:
        curve, width = shown[eta]["curves"], 2.2 if eta == 0.4 else 1
        ax.plot(curve["epoch"], curve["raw"], color=colours[eta], lw=width, label=f"noise={eta:g}")
    ax.axhline(0.5, ls=":", c="gray", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (linear probe, raw output)")
    ax.set_ylim(0.35, 1.0)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title(f"(d) transfer accuracy after every epoch (seed {seeds[0]})", fontsize=9)

    ax = fig.add_subplot(bottom[0, 2])  # (e) final accuracy against eta, over seeds
    xs = list(range(len(etas)))
    for key, name, fmt in (
        ("accuracy", "raw output (headline)", "o-k"),
        ("accuracy_normalized", "normalized output", "s--"),
    ):
        stats = [mean_std([r[key] for r in results if r["eta"] == eta]) for eta in etas]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        label = f"{name}, mean +- std, {len(seeds)} seed(s)"
        ax.errorbar(xs, means, yerr=stds, fmt=fmt, capsize=3, ms=4, label=label)
    paper = [
        (x, PAPER_ACCURACY[eta]) for x, eta in zip(xs, etas, strict=True) if eta in PAPER_ACCURACY
    ]
    if paper:
        ax.plot(*zip(*paper, strict=True), "r*", ms=10, label="paper, Figure 1d (one run)")
    ax.axhline(0.5, ls=":", c="gray", lw=1)
    ax.set_xticks(xs, [f"{e:g}" for e in etas])
    ax.set_xlabel("eta (view noise)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0.35, 1.0)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("(e) final accuracy against noise", fontsize=9)
    fig.suptitle(
        f"Figure 1 (Sec. 4.3): IR on two spirals, views v(x) = x + U(0, eta)^2, "
        f"tau = {args.tau:g}, {args.iters} iterations",
        fontsize=11,
    )
    fig.savefig(path, dpi=60, bbox_inches="tight")
    plt.close(fig)
    return fig


if __name__ == "__main__":
    main()
