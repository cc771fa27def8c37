"""The double-spiral toy: the choice of views decides what InfoNCE learns (Sec. 4.3, Figure 1).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 4 (4.1 notation, 4.2 properties
of a good view, 4.3 the toy example) and Figure 1.

    python spiral.py                        # a one-minute demo (a short sweep; prints a table, saves a figure)
    python spiral.py --eta 0.4              # the paper's best setting, full length: progress, transfer accuracy
    python spiral.py --sweep                # Figure 1: eta = 0, 0.1, 0.25, 0.4, 0.5, 1, 2.5, 5
    python spiral.py --sweep --seeds 5 --results out/sweep5.pt  # the README's table (resumable)

The experiment (Sec. 4.3):
  * data: points on two interleaved spirals in 2-D, one spiral per class.  No
    label is used in training.
  * views (Sec. 4.1): v(x, a) = x + (eps_x, eps_y), eps ~ U(0, eta) per
    coordinate.  eta = 0 leaves only the privileged view x itself (Sec. 4.2).
  * encoder: a 5-layer MLP with 128 hidden units and a 2-D output, so the
    representation can be drawn (Figure 1b).
  * objective: Instance Discrimination (IR, Sec. 5.3, Eq. 6) on the toy:
    InfoNCE (Eq. 5) between the current view of x_i and the memory-bank entry
    of x_i (Eq. 7), against 4096 negatives drawn from the bank, through
    infonce.infonce_loss (log K when nothing is learned).
  * optimisation: torch.optim.SGD, momentum 0.9, weight decay 1e-5, batch 128,
    lr 0.03, 10k iterations = 100 epochs, hence 12,800 training points.
  * transfer (Sec. 4.3): logistic regression on the frozen representation of
    the clean points predicts the spiral; its accuracy on held-out points,
    after every epoch (Figure 1d), is the quality of the representation.

What Figure 1 fixes that the text does not (each read off the paper's own
renders, ../shared/paper_figures/; tests/test_spiral.py checks the numbers):
  * Geometry (Fig. 1a, noise 0).  One whole turn per spiral, the inner end at
    a fifth of the outer radius, the second spiral the first rotated by 180
    degrees.  Scaled to an outer radius of 1: radius 0.2 -> 1.0, so along any
    ray the arms alternate 0.4 apart, the text's "border of identifiability"
    at eta = 0.4.  (The text's "one spinning clockwise and one counter-
    clockwise" cannot be literal: a mirrored Archimedean arm crosses the other
    every half turn.  The figure's arms are a 180-degree rotation apart.)
  * Temperature (Fig. 1c).  The low-noise losses flatten near 7.57 nats.  The
    best a 2-D unit-norm embedding can do is log(1 + 4096 i0e(1 / tau))
    (loss_floor): 7.55 at tau = 1, 6.08 at IR's usual tau = 0.07.  So tau = 1.
  * Noise grid (Fig. 1a, 1d): eta = 0, 0.1, 0.25, 0.4, 0.5, 1, 2.5, 5.
  * Representation (Fig. 1b): the raw 2-D encoder output (curves and lines,
    not points on a circle), while the loss sees it L2-normalised.

Choices nothing in the paper fixes, and why:
  * Spacing along the spiral: uniform in angle.  Then a linear probe on the
    raw (x, y) scores 0.50 (tested), so "chance (0.5)", as Sec. 4.3 calls it,
    is the floor and anything above it is what the encoder added.  Uniform in
    arc length gives 0.65 on the raw (x, y), and theta = sqrt(u) 2 pi (the
    usual generator of this shape) gives 0.75: a probe on the input alone
    would beat most of Figure 1d.
  * Number of points: 12,800 training points (10k iterations of 128 are
    "100 epochs", Sec. 4.3) and as many held-out points.
  * Negatives: 4096 indices drawn uniformly from the training set at every
    step and shared by the batch.  Each row's negatives are still the
    q(x_{2:K} | x_1) = uniform of Eq. 5; sharing costs one gather instead of
    128, and is what makes a step 3x cheaper than drawing per row
    (tests/bench_spiral.py).
  * Initialisation: He init and a bank filled by the untrained encoder (see
    make_encoder and train_ir); with PyTorch's default init and IR's random
    bank, 2 of 6 seeds froze at log K (measured on the earlier setup,
    tau = 0.07).  --init default gives PyTorch's init, as an ablation.
  * The transfer protocol (transfer_accuracy, evaluate): logistic regression
    fitted to convergence on standardised features, so that it reads the
    representation and not its scale; both the raw output (headline: it is
    what Figure 1b draws and calls the representation) and the normalised
    output (what the loss sees) are probed; a run whose loss sits at log K
    (less than MIN_INFORMATION nats below it) has learned nothing and scores
    chance.

The README has the 5-seed results beside the paper's, and says what
reproduced (the losses of Figure 1c) and what did not (0.70 at eta = 0.4).
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from infonce import infonce_loss

# ---------------------------------------------------------------------------
# The paper's settings (Sec. 4.3 and Figure 1); the command line changes each.
# ---------------------------------------------------------------------------
ETAS = (0.0, 0.1, 0.25, 0.4, 0.5, 1.0, 2.5, 5.0)  # Figure 1a / 1d
N_TRAIN = 12_800  # 10k iterations of batch 128 = 100 epochs (Sec. 4.3)
N_TEST = 12_800  # held-out points for the transfer task
ITERS = 10_000
BATCH_SIZE = 128
NEGATIVES = 4096  # "4096 negative samples drawn from the training dataset": K - 1 in Eq. 5
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-5
TAU = 1.0  # read off Figure 1c (see the module docstring); IR's usual value is 0.07
ALPHA = 0.5  # Eq. 7 bank update rate, IR's default
INNER_RADIUS, OUTER_RADIUS, TURNS = 0.2, 1.0, 1.0  # Figure 1a
# Final test accuracies read off Figure 1d (one run per eta; the curves are noisy).
PAPER_ACCURACY = {
    0.0: 0.435,
    0.1: 0.61,
    0.25: 0.575,
    0.4: 0.70,
    0.5: 0.475,
    1.0: 0.49,
    2.5: 0.485,
    5.0: 0.515,
}
# Below this many nats of log K - loss the objective learned nothing and the
# probe reports chance; see evaluate().  Measured over 5 seeds x 100 epochs at
# the defaults: at eta = 5, log K - loss never exceeded 0.021; at eta = 2.5 it
# never fell below 0.051 after the 4th epoch.  0.03 sits between the two.
MIN_INFORMATION = 0.03
# The earlier setup of this file, kept reachable as an ablation:
#   --inner-radius 0.5 --outer-radius 1.5 --tau 0.07 --sweep 0 0.1 0.2 0.4 1 2 5
# One CPU thread by default.  Measured on a 2-core machine, one step took
# 2.4 ms with 2 threads and 3.0 ms with 1 when it was nearly idle, but with
# another job running, 2 threads fell to 40 it/s (25 ms a step) while 1
# thread kept 245 it/s: the two threads wait on each other.
THREADS = 1
# No arguments at all run this short demo (seconds to a minute on 2 cores):
DEMO_ARGV = ["--sweep", "0", "0.4", "1", "5", "--iters", "1500", "--n-test", "4000"]


# ---------------------------------------------------------------------------
# Data and views (Sec. 4.1, 4.3)
# ---------------------------------------------------------------------------
def make_spirals(
    n, inner_radius=INNER_RADIUS, outer_radius=OUTER_RADIUS, turns=TURNS, generator=None
):
    """Two interleaved Archimedean spirals, one per class (Figure 1a).

    Returns points [n, 2] (float32) and labels [n] (int64: 0, 1, 0, 1, ...).
    Spiral 0 runs from radius inner_radius at angle 0 to outer_radius at
    angle 2 pi turns, the radius growing in step with the angle; each point's
    position along it is uniform in angle (see the module docstring).
    Spiral 1 is spiral 0 rotated by 180 degrees, so along any ray from the
    centre the arms alternate (outer - inner) / (2 turns) apart: 0.4 here.
    """
    _check_int("n", n, low=2)
    _check_positive("turns", turns)
    if not 0 <= inner_radius < outer_radius:
        raise ValueError(
            f"need 0 <= inner_radius < outer_radius, got {inner_radius} and {outer_radius}"
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

    As printed, the noise is not centred: a view sits eta / 2 to the upper
    right of x on average.  Kept as written; the encoder learns on shifted
    inputs, and the transfer task encodes the clean x.  eta = 0 returns the
    privileged view x itself (Sec. 4.2).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (eta = 0 is the privileged view alone), got {eta}")
    noise = torch.rand(points.shape, generator=generator).to(points.device)
    return points + eta * noise


def shared_view_fraction(points, labels, eta):
    """Sec. 4.2 identifiability, measured: the fraction of points x whose view set v_x meets the other spiral's.

    v_x is the square [x, x + eta]^2, and two such squares meet exactly when
    the points are closer than eta in the max-norm.  points [n, 2], labels [n].
    """
    a, b = points[labels == 0], points[labels == 1]
    gap_ab = torch.cdist(a, b, p=float("inf")).min(dim=1).values
    gap_ba = torch.cdist(b, a, p=float("inf")).min(dim=1).values
    return (torch.cat([gap_ab, gap_ba]) < eta).double().mean().item()


# ---------------------------------------------------------------------------
# Encoder (Sec. 4.3): 5 linear layers, 128 hidden units, 2-D output
# ---------------------------------------------------------------------------
def make_encoder(hidden=128, layers=5, init="he"):
    """MLP 2 -> 128 -> 128 -> 128 -> 128 -> 2 with ReLUs, He-initialised (init="default": PyTorch's own).

    PyTorch's default Linear init shrinks the signal by about sqrt(6) per ReLU
    layer, so the untrained network maps every input to nearly the same
    direction, right next to IR's collapsed fixed point (every embedding
    equal, loss = log K, zero gradient).  He init keeps the signal's scale.
    """
    sizes = [2] + [hidden] * (layers - 1) + [2]
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
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
    """The representation of Figure 1b: the raw 2-D encoder output, [n, 2] -> [n, 2] (on the CPU)."""
    device = next(encoder.parameters()).device
    return encoder(points.to(device)).cpu()


# ---------------------------------------------------------------------------
# IR on the toy (Eqs. 5-7; memory_bank.py and instance_disc.py hold the full versions)
# ---------------------------------------------------------------------------
def ir_scores(z, bank, idx, negative_idx, tau):
    """Critic values f = z . M / tau for infonce_loss: [B, 1 + K] with the positive in column 0.

    z: [B, 2] unit embeddings of the current views v(x_i, a); bank: [N, 2]
    unit rows; idx: [B] the rows of x_i in the bank (they hold earlier views
    v(x_i, b): Eq. 5's positive pair); negative_idx: [K] bank rows drawn
    uniformly from the training set, shared by the batch (a negative may be
    x_i itself, as in IR).
    """
    positive = (z * bank[idx]).sum(dim=1, keepdim=True)  # [B, 1]
    negative = z @ bank[negative_idx].T  # [B, K]
    return torch.cat([positive, negative], dim=1) / tau


@torch.no_grad()
def update_bank_(bank, idx, z, alpha):
    """Eq. 7, in place: M[i] <- alpha * M[i] + (1 - alpha) * z_i, then back onto the unit circle.

    Eq. 7 as printed has no re-normalisation; IR's implementation has it, and
    the critic z . M / tau assumes unit rows (a mix of two unit vectors is
    shorter than 1).  This file keeps its own [N, 2] tensor so that it imports
    nothing that comes later in the paper.
    """
    bank[idx] = F.normalize(alpha * bank[idx] + (1 - alpha) * z, dim=1)


def loss_floor(negatives, tau):
    """The lowest expected IR loss of any 2-D unit embedding: bank uniform on the circle, views exact.

    With the positive score 1 / tau and K - 1 negatives at uniform angles,
        E[loss] ~= log(1 + (K - 1) E[exp((cos(theta) - 1) / tau)]) = log(1 + (K - 1) i0e(1 / tau)),
    since E[exp(cos(theta) / tau)] = I0(1 / tau) and i0e(x) = I0(x) exp(-x).
    At K - 1 = 4096: 7.554 for tau = 1 (Figure 1c flattens at about 7.57),
    6.081 for tau = 0.07.  Tested against a Monte Carlo estimate.
    """
    _check_int("negatives", negatives, low=1)
    _check_positive("tau", tau)
    i0e = torch.special.i0e(torch.tensor(1.0 / tau, dtype=torch.float64)).item()
    return math.log1p(negatives * i0e)


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
    """Sec. 4.3: train the encoder with IR on views of `points` [N, 2] (no labels).

    Returns (encoder, bank [N, 2], losses): losses holds every step's
    infonce_loss (log K when nothing is learned, K = negatives + 1).
    after_epoch(epoch, encoder, epoch_loss), if given, runs after every full
    pass over the data (the transfer probe of Figure 1d) with the epoch's mean
    loss; a string it returns is added to the progress line.  Progress (step,
    loss, rate, time left) is printed every ~2 s if `progress`.
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
    with (
        torch.no_grad()
    ):  # the bank starts as the untrained encoder's embedding of one view per point
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
        negative_idx = torch.randint(n, (negatives,), generator=generator).to(
            device
        )  # x_2..x_K ~ uniform

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


def check_training_settings(
    n, eta, iters, batch_size, negatives, lr, momentum, weight_decay, tau, alpha
):
    """Raise ValueError naming the setting (and its command-line flag) if it is out of range."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(
            f"eta (--eta / --sweep) must be a finite number >= 0 "
            f"(eta = 0 is the privileged view alone), got {eta}"
        )
    _check_int("iters (--iters)", iters, low=1)
    _check_int(
        "batch_size (--batch-size)",
        batch_size,
        low=1,
        high=n,
        high_name="the number of training points",
    )
    _check_int(
        "negatives (--negatives)",
        negatives,
        low=1,
        high=n,
        high_name="the number of training points",
    )
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
            f"alpha (--alpha) must be in [0, 1) (Eq. 7; 0 = the bank holds the latest view), got {alpha}"
        )


# ---------------------------------------------------------------------------
# The transfer task (Sec. 4.3): logistic regression on the frozen representation
# ---------------------------------------------------------------------------
def fit_logistic_regression(features, labels, l2=1e-4, max_steps=100):
    """Plain logistic regression, fitted to convergence by Newton's method.

    features: [n, d]; labels: [n] in {0, 1}.  Minimises
        mean_i log(1 + exp(-y_i (w . x_i + b))) + l2 / 2 * |w|^2    (y_i = +-1)
    and returns (weight [d], bias []) in float64.  The tiny ridge only keeps the
    optimum finite when the classes are separable; the bias is not penalised.
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
        hessian += 1e-12 * torch.eye(
            len(theta), dtype=torch.float64
        )  # a constant feature: keep it solvable
        step = torch.linalg.solve(hessian, gradient)
        theta -= step
        if step.abs().max() < 1e-10:
            break
    return theta[:-1], theta[-1]


def transfer_accuracy(train_features, train_labels, test_features, test_labels, l2=1e-4):
    """Test accuracy of a linear probe fitted on the training features (Sec. 4.3's transfer task).

    Standardise each feature with the training set's mean and std, fit
    logistic regression to convergence, report the fraction of test points on
    the right side of its line.  A converged, nearly unpenalised fit does not
    care how the features are scaled or shifted, and standardising makes the
    small ridge scale-free too: the answer depends on the representation, not
    on its units (tested).  A probe stopped early, or penalised on the raw
    scale (e.g. scikit-learn's default C = 1), would instead call a squeezed
    representation "chance" and a spread-out one informative.
    """
    mean, std = train_features.mean(0), train_features.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays 0
    weight, bias = fit_logistic_regression((train_features - mean) / std, train_labels, l2=l2)
    predictions = (((test_features - mean) / std).double() @ weight + bias > 0).long()
    return (predictions == test_labels).double().mean().item()


def evaluate(encoder, train_points, train_labels, test_points, test_labels, information):
    """The transfer task, both readings, with the collapse rule: a dict.

    raw: the probe on the encoder's 2-D output, as Figure 1b draws it (the
    headline number); normalized: on the L2-normalised output, as the loss
    sees it.  Both are invariant to rescaling the output (transfer_accuracy).
    information: log K minus the training loss over the last epoch, the
    InfoNCE estimate (Eq. 2) of what two views of a point share.  Below
    MIN_INFORMATION nats the objective has learned nothing (the loss sits at
    log K), and both readings score chance (the majority class: 0.5 on these
    balanced spirals) whatever the fit says: what a probe finds in such an
    output is the residue of the random initial map, not something the views
    taught (README: at eta = 5 the fit alone reads 0.56 from the normalised
    output, 0.50 from the raw one, over 5 seeds).  The rule
    reads the loss, which sees only the output's direction, so it keeps the
    scale invariance.  raw_fit / normalized_fit are the probe's own answers,
    reported beside the rule.
    """
    train_raw, test_raw = encode(encoder, train_points), encode(encoder, test_points)
    majority = int(train_labels.double().mean() >= 0.5)  # the best constant guess
    chance = (test_labels == majority).double().mean().item()
    result = {"information": information, "collapsed": information < MIN_INFORMATION}
    for name, transform in (("raw", lambda f: f), ("normalized", lambda f: F.normalize(f, dim=1))):
        result[name + "_fit"] = transfer_accuracy(
            transform(train_raw), train_labels, transform(test_raw), test_labels
        )
        result[name] = chance if result["collapsed"] else result[name + "_fit"]
    return result


# ---------------------------------------------------------------------------
# One setting end to end, and Figure 1
# ---------------------------------------------------------------------------
def run_setting(eta, seed, args, label="", progress=True):
    """Data for this seed, IR training at this eta with the probe after every epoch: a dict of results."""
    generator = torch.Generator().manual_seed(seed)
    geometry = (args.inner_radius, args.outer_radius, args.turns)
    train_points, train_labels = make_spirals(args.n_train, *geometry, generator=generator)
    test_points, test_labels = make_spirals(args.n_test, *geometry, generator=generator)
    data = (train_points, train_labels, test_points, test_labels)
    log_k = math.log(args.negatives + 1)
    keys = ("raw", "normalized", "raw_fit", "normalized_fit", "information")
    curves = {key: [] for key in ("epoch",) + keys}
    probe_seconds = [0.0]

    def after_epoch(
        epoch, encoder, epoch_loss
    ):  # Figure 1d: the transfer accuracy after every epoch
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
    last_epoch = losses[
        -(args.n_train // args.batch_size) :
    ]  # the last epoch (or all of a shorter run)
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
        # a linear probe on the raw (x, y) coordinates: the reference "chance" for this geometry
        "input_accuracy": transfer_accuracy(train_points, train_labels, test_points, test_labels),
        "test_points": test_points,
        "test_labels": test_labels,
        "test_output": encode(encoder, test_points),
    }


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    std = values.std().item() if len(values) > 1 else 0.0
    return values.mean().item(), std


def plot_figure1(results, etas, args, path):
    """Figure 1 as the paper lays it out, from run_setting results: (a) views, (b) representations,
    (c) loss over iterations, (d) test accuracy after every epoch, (e) final accuracy against eta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in results})
    shown = {
        r["eta"]: r for r in results if r["seed"] == seeds[0]
    }  # (a)-(d): one run per eta, as the paper
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
                ax.scatter(
                    drawn[labels == c, 0],
                    drawn[labels == c, 1],
                    s=1,
                    c=spiral_colours[c],
                    rasterized=True,
                )
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
        curve = shown[eta]["curves"]
        ax.plot(
            curve["epoch"],
            curve["raw"],
            color=colours[eta],
            lw=2.2 if eta == 0.4 else 1,
            label=f"noise={eta:g}",
        )
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
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            fmt=fmt,
            capsize=3,
            ms=4,
            label=f"{name}, mean +- std, {len(seeds)} seed(s)",
        )
    paper = [(x, PAPER_ACCURACY[eta]) for x, eta in zip(xs, etas) if eta in PAPER_ACCURACY]
    if paper:
        ax.plot(*zip(*paper), "r*", ms=10, label="paper, Figure 1d (one run)")
    ax.axhline(0.5, ls=":", c="gray", lw=1)
    ax.set_xticks(xs, [f"{e:g}" for e in etas])
    ax.set_xlabel("eta (view noise)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0.35, 1.0)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("(e) final accuracy against noise", fontsize=9)
    fig.suptitle(
        f"Figure 1 (Sec. 4.3): IR on two spirals, views v(x) = x + U(0, eta)^2, tau = {args.tau:g}, "
        f"{args.iters} iterations",
        fontsize=11,
    )
    fig.savefig(path, dpi=60, bbox_inches="tight")
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _check_int(name, value, low, high=None, high_name=None):
    if (
        isinstance(value, bool)
        or int(value) != value
        or value < low
        or (high is not None and value > high)
    ):
        limit = f"between {low} and {high} ({high_name})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {limit}, got {value}")


def _check_positive(name, value):
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(
        prog="spiral.py",
        description="Sec. 4.3 / Figure 1: IR (InfoNCE with a memory bank) on two spirals, views "
        "v(x) = x + U(0, eta)^2, transfer = a linear probe predicting the spiral. "
        f"With no arguments: a short demo, the same as  {' '.join(DEMO_ARGV)}.",
    )
    p.add_argument(
        "--eta",
        type=float,
        default=0.4,
        help="view noise of Sec. 4.1: each coordinate of x gets U(0, eta) added (0 = the privileged "
        "view x alone); default 0.4, the paper's best",
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
        help="repeat every eta over this many seeds; report mean and std",
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
        help="training points, both spirals together, no labels used (default 12,800: 100 epochs "
        "of 128 in 10k iterations)",
    )
    p.add_argument(
        "--n-test", type=int, default=N_TEST, help="held-out points for the transfer task"
    )
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch size (paper: 128)")
    p.add_argument(
        "--negatives",
        type=int,
        default=NEGATIVES,
        help="negatives per step drawn from the memory bank, K - 1 in Eq. 5 (paper: 4096)",
    )
    p.add_argument("--lr", type=float, default=LR, help="SGD learning rate (paper: 0.03)")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD momentum (paper: 0.9)")
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
        help="memory bank update rate alpha of Eq. 7 (IR: 0.5)",
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
        help="turns of each spiral (Figure 1a: 1; whole turns keep a probe on the raw (x, y) at chance)",
    )
    p.add_argument(
        "--init",
        choices=("he", "default"),
        default="he",
        help="initial weights of the encoder: he (Kaiming, zero biases; the default) or PyTorch's "
        "default Linear init (the paper does not say)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="figure path (default out/spiral_eta<eta>.png, or out/figure1_spiral.png with --sweep)",
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="PATH",
        help="save every finished run here (torch.save); runs already saved with the same settings "
        "are loaded, not retrained, so an interrupted sweep resumes",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="CPU threads for torch (default 1: the tensors are small, and on a busy machine two "
        "threads wait on each other)",
    )
    return p


def check_args(args):
    """Every check that can fail, before any training: raises ValueError naming the flag."""
    etas = (
        list(ETAS)
        if args.sweep is not None and len(args.sweep) == 0
        else (args.sweep or [args.eta])
    )
    _check_int("--seeds", args.seeds, low=1)
    _check_int("--n-train", args.n_train, low=2)
    _check_int("--n-test", args.n_test, low=2)
    _check_int("--threads", args.threads, low=1)
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
        args.out = os.path.join(
            "out", "figure1_spiral.png" if args.sweep is not None else f"spiral_eta{etas[0]:g}.png"
        )
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
        raise ValueError(
            f"{flag} {path!r}: cannot create the folder {folder!r} ({error.strerror})"
        ) from None
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path!r} is not writable")


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
        f"IR on two spirals (radius {args.inner_radius:g} to {args.outer_radius:g}, {args.turns:g} turn(s)): "
        f"{args.n_train} training points, K = {args.negatives} + 1 (log K = {log_k:.3f}), tau = {args.tau:g}, "
        f"alpha = {args.alpha:g}, {args.iters} iterations; etas {[f'{e:g}' for e in etas]}, seeds {seeds}"
    )

    results = []
    total = len(etas) * len(seeds)
    for i, (seed, eta) in enumerate([(s, e) for s in seeds for e in etas]):
        label = f"[{i + 1}/{total}] eta={eta:g} seed={seed}  "
        r = saved.get((eta, seed)) or run_setting(eta, seed, args, label=label)
        print(
            f"{label}final loss {r['final_loss']:.3f} (log K = {log_k:.3f}), transfer accuracy "
            f"{r['accuracy']:.3f} (normalized {r['accuracy_normalized']:.3f}"
            f"{', loss at log K: chance' if r['collapsed'] else ''})  ({r['seconds']:.1f} s, of which probe "
            f"{r['probe_seconds']:.1f} s over {len(r['curves']['epoch'])} epochs){'  [saved]' if (eta, seed) in saved else ''}",
            flush=True,
        )
        results.append(r)
        saved[eta, seed] = r
        if args.results is not None:
            settings = {name: getattr(args, name) for name in SETTINGS}
            torch.save({"settings": settings, "runs": list(saved.values())}, args.results)

    print()
    sample = make_spirals(
        4000, args.inner_radius, args.outer_radius, args.turns, torch.Generator().manual_seed(0)
    )
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
            f"{eta:>5g} | {shared_view_fraction(*sample, eta):12.2f} | {loss[0]:7.3f} +- {loss[1]:5.3f} | "
            f"{raw[0]:6.3f} +- {raw[1]:5.3f} | {normalized[0]:6.3f} +- {normalized[1]:5.3f} | "
            f"{sum(r['collapsed'] for r in runs):>4}/{len(runs):<3} | {paper}"
        )
    print(
        "(views shared: fraction of points whose views can also be views of the other spiral, Sec. 4.2; "
        "accuracy: linear probe on the raw 2-D output, mean +- std over seeds)"
    )
    print(
        f"linear probe on the raw (x, y) coordinates: {mean_std([r['input_accuracy'] for r in results])[0]:.3f} "
        f"(chance for this geometry); log K = {log_k:.3f} (nothing learned); "
        f"loss_floor = {loss_floor(args.negatives, args.tau):.3f} (the best any 2-D embedding can do)"
    )
    plot_figure1(results, etas, args, args.out)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
