"""The double-spiral toy: the choice of views decides what InfoNCE learns (Sec. 4.3, Figure 1).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 4 (4.1 notation, 4.2 properties
of a good view, 4.3 the toy example) and Figure 1.

    python spiral.py --eta 0.4            # the paper's best setting: train, probe, save a figure
    python spiral.py --sweep              # Figure 1: eta = 0, 0.1, 0.2, 0.4, 1, 2, 5
    python spiral.py --sweep --seeds 3    # ... with mean and standard deviation over 3 seeds

What happens (Sec. 4.3):
  * data: points on two interleaved spirals in 2-D, one spiral per class.  No
    label is used in training.
  * views (Sec. 4.1): v(x, a) = x + (eps_x, eps_y), eps ~ U(0, eta) per
    coordinate.  eta = 0 leaves only the privileged view x itself (Sec. 4.2).
  * encoder: a 5-layer MLP with 128 hidden units and a 2-D output, so the
    representation can be drawn.
  * objective: Instance Discrimination (IR, the paper's Sec. 5.3, Eq. 6), i.e.
    InfoNCE (Eq. 5) between the current view of x_i and the memory-bank entry
    of x_i (Eq. 7), against 4096 negatives drawn from the bank.  The loss is
    infonce.infonce_loss, which sits at log K when nothing is learned.
  * optimisation: SGD, momentum 0.9, weight decay 1e-5, batch 128, lr 0.03,
    10k iterations = 100 epochs of 12,800 points.
  * transfer (Sec. 4.3): a linear classifier (logistic regression) on the
    frozen 2-D representation of the clean points predicts the spiral; its
    accuracy on a held-out test set is the quality of the representation.

Choices the paper leaves open, and why they were made this way (the numbers
are in the README; tests/test_spiral.py checks the ones marked "tested"):
  * Geometry.  Each spiral makes one full turn, its radius growing from 0.5 to
    1.5; the second spiral is the first rotated by 180 degrees, so the arms are
    0.5 apart (radially) everywhere.  Two views of x differ from each other by
    less than eta per coordinate, so the view sets of the two spirals meet where
    the arms are closer than eta in the max-norm: nowhere for eta <= 0.3, at
    69% of the points for eta = 0.4, everywhere from eta = 0.5 on
    (shared_view_fraction, tested).  So eta = 0.4 is "on the border" of
    identifiability, as Sec. 4.3 puts it.  Points are uniform in angle over a
    whole turn, which makes a linear classifier on the raw (x, y) useless
    (accuracy 0.50, tested): chance is 0.5, as the paper assumes, and anything
    above it is what the encoder added.  (With spirals that start at the
    centre, or points uniform in arc length, the raw coordinates alone give a
    linear probe 0.6-0.75, which hides the effect of the views.)
    The paper's "one spinning clockwise and one counter-clockwise" cannot be
    literal: the mirror image of an Archimedean arm crosses it every half turn,
    so two interleaved arms that never cross are a 180-degree rotation apart.
  * Representation.  IR L2-normalises the embedding and the bank, so the 2-D
    representation lies on the unit circle: it is an angle.  Without the
    normalisation the critic z.m / tau is unbounded and training diverges (NaN).
  * Initialisation.  He (Kaiming) init for the ReLU layers, and the bank filled
    with the untrained encoder's embeddings of one round of views instead of
    IR's random vectors: with PyTorch's default init and a random bank, 2 of 6
    seeds got stuck at a constant output (loss pinned at log K) at eta = 0.
  * Learning rate.  The paper's constant 0.03 from the first step, by default.
    Its first steps blow the output's norm up by 10x to 10^4x, depending on the
    seed; the output is normalised, so its direction then learns at an
    effective rate lr / |output|^2, and that accident sets the pace of the rest
    of training (and in small settings can freeze it at log K).  --warmup 100
    (a linear ramp over the first epoch) tames this; over 3 seeds it raises
    the accuracy at eta = 1 (0.58 -> 0.61) and leaves eta = 0.4 at 0.54
    (README, "What we tried").
  * The transfer protocol: see transfer_accuracy().
"""

import argparse
import ctypes
import math
import os
import time

import torch
import torch.nn.functional as F

from infonce import infonce_loss

# ---------------------------------------------------------------------------
# The paper's settings (Sec. 4.3); the command line can change each of them.
# ---------------------------------------------------------------------------
ETAS = (0.0, 0.1, 0.2, 0.4, 1.0, 2.0, 5.0)  # Figure 1's noise levels
N_TRAIN = 12_800        # 10k iterations of batch 128 = 100 epochs (Sec. 4.3)
N_TEST = 12_800         # held-out points for the transfer task
ITERS = 10_000
BATCH_SIZE = 128
NEGATIVES = 4096        # K - 1 in Eq. 5: "4096 negative samples drawn from the training dataset"
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-5
WARMUP = 0              # iterations of linear learning-rate warmup (0 = the paper's constant lr; see the docstring)
TAU = 0.07              # IR's temperature (the paper does not restate it for the toy)
ALPHA = 0.5             # Eq. 7 bank update rate, IR's default
TURNS = 1.0
INNER_RADIUS = 0.5
ARM_SPACING = 0.5       # distance between the two spirals, see the module docstring
PAPER_BEST = (0.4, 0.70)  # Sec. 4.3: "reaching 0.70 on a held-out test set" at eta = 0.4


# ---------------------------------------------------------------------------
# Data and views (Sec. 4.1, 4.3)
# ---------------------------------------------------------------------------
def make_spirals(n, turns=TURNS, inner_radius=INNER_RADIUS, spacing=ARM_SPACING, generator=None):
    """Two interleaved Archimedean spirals, one per class.

    Returns points [n, 2] (float32) and labels [n] (int64, 0 or 1: n // 2 of
    one and n - n // 2 of the other, alternating).

    Spiral 0 is r = inner_radius + spacing * angle / pi, for an angle covering
    `turns` full turns; a point's radius is drawn uniformly, so its angle is
    uniform too.  The angle grows by 2 pi while the radius grows by 2 * spacing,
    and spiral 1 is spiral 0 rotated by pi, half a turn later: the arms are
    `spacing` apart (radially) everywhere.
    """
    _check_int("n", n, low=2)
    _check_positive("turns", turns)
    _check_positive("spacing", spacing)
    if not inner_radius >= 0:
        raise ValueError(f"inner_radius must be >= 0, got {inner_radius}")
    labels = torch.arange(n) % 2
    radius = inner_radius + 2 * spacing * turns * torch.rand(n, generator=generator)
    angle = math.pi * radius / spacing + math.pi * labels
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, labels


def sample_views(points, eta, generator=None):
    """v(x, a) = x + (eps_x, eps_y), eps ~ U(0, eta) per coordinate (Sec. 4.3): [n, 2] -> [n, 2].

    As the paper writes it the noise is not centred: a view is shifted by
    eta / 2 on average towards +x, +y.  Kept as written; the encoder simply
    learns on shifted inputs, and the transfer task encodes the clean x.
    eta = 0 returns the privileged view x itself (Sec. 4.2).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (eta = 0 is the privileged view alone), got {eta}")
    noise = torch.rand(points.shape, generator=generator).to(points.device)
    return points + eta * noise


# ---------------------------------------------------------------------------
# Encoder (Sec. 4.3): 5 linear layers, 128 hidden units, 2-D output
# ---------------------------------------------------------------------------
def make_encoder(hidden=128, layers=5):
    """MLP 2 -> 128 -> 128 -> 128 -> 128 -> 2 with ReLUs, He-initialised.

    PyTorch's default Linear init shrinks the signal by about sqrt(6) per ReLU
    layer, so the untrained network maps every input to nearly the same output
    (directions within a degree or so); IR then starts right next to its collapsed
    fixed point (every embedding equal, loss = log K, zero gradient), and some
    seeds never leave it.  He init keeps the signal's scale through the ReLUs.
    """
    sizes = [2] + [hidden] * (layers - 1) + [2]
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = torch.nn.Linear(fan_in, fan_out)
        torch.nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        torch.nn.init.zeros_(linear.bias)
        modules.append(linear)
        if i < layers - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


@torch.inference_mode()
def embed(encoder, points):
    """The representation: the encoder's output, L2-normalised as in IR: [n, 2] -> [n, 2] unit rows."""
    device = next(encoder.parameters()).device
    return F.normalize(encoder(points.to(device)), dim=1).cpu()


# ---------------------------------------------------------------------------
# IR with a small memory bank (Sec. 5.3, Eqs. 6-7; memory_bank.py has the full version)
# ---------------------------------------------------------------------------
def ir_scores(z, bank, idx, negative_idx, tau):
    """Critic values for infonce_loss: [B, 1 + K] with the positive in column 0.

    z: [B, 2] unit embeddings of the current views v(x_i, a); bank: [N, 2];
    idx: [B] the rows of x_i in the bank; negative_idx: [K] bank rows shared by
    the whole batch.  Column 0 is z_b . M[idx_b] / tau: the bank holds the
    embedding of earlier views v(x_i, b) (Eq. 5's positive pair); columns 1..K
    are z_b . M[j] / tau for the negatives j ~ uniform over the training set,
    the q(x_{2:K} | x_1) of Eq. 5 (a negative may be x_b itself, as in IR).

    Sharing one draw of negatives across the batch keeps every row's negatives
    uniform and turns 128 x 4096 gathers into 4096.
    """
    zt = z / tau
    positive = (zt * bank[idx]).sum(dim=1, keepdim=True)        # [B, 1]
    negatives = bank[negative_idx].T.contiguous()               # [2, K]
    # zt @ negatives, written out for the 2-D case: x*x' + y*y'.  A matmul
    # with an inner size of 2 is 2-4x slower on the CPU (forward + backward)
    # than these two passes (addcmul fuses the add and the second product).
    negative = torch.addcmul(zt[:, :1] * negatives[0], zt[:, 1:], negatives[1])  # [B, K]
    return torch.cat([positive, negative], dim=1)


@torch.no_grad()
def sgd_step_(params, momentum_buffers, lr, momentum, weight_decay):
    """One step of SGD with momentum and weight decay, in place (the paper's optimizer, Sec. 4.3).

    The same arithmetic as torch.optim.SGD with dampening 0 (tested to give
    bit-identical weights):  g <- grad + weight_decay * p;  buf <- momentum *
    buf + g (buf = g on the first step);  p <- p - lr * buf.  Written out
    because creating a torch.optim optimizer imports torch._dynamo, which
    takes about 1.2 s: a tenth of the whole paper-length run here.
    """
    for i, p in enumerate(params):
        g = p.grad.add(p, alpha=weight_decay)
        if momentum_buffers[i] is None:
            momentum_buffers[i] = g.clone()
        else:
            momentum_buffers[i].mul_(momentum).add_(g)
        p.add_(momentum_buffers[i], alpha=-lr)


@torch.no_grad()
def update_bank_(bank, idx, z, alpha):
    """Eq. 7, in place: M[i] <- alpha * M[i] + (1 - alpha) * z_i, then re-normalised to the unit circle.

    Eq. 7 as printed has no re-normalisation; IR's implementation has it, and
    the critic z . M[j] / tau assumes unit rows (a mix of two unit vectors is
    shorter than 1).  memory_bank.py holds the full bank; this file keeps its
    own [N, 2] tensor so that it imports nothing that comes later in the paper.
    """
    bank[idx] = F.normalize(alpha * bank[idx] + (1 - alpha) * z, dim=1)


def uniform_circle_loss(negatives, tau):
    """The IR loss of a perfect 2-D embedding: bank spread uniformly on the circle, positive exact.

    With the positive z.M[i] = 1 and K - 1 negatives at uniformly random angles,
        E[loss] ~= log(1 + (K - 1) E[exp((cos(theta) - 1) / tau)]) = log(1 + (K - 1) i0e(1 / tau)),
    since E[exp(cos(theta) / tau)] = I0(1 / tau) (modified Bessel function) and
    i0e(x) = I0(x) exp(-x).  At K - 1 = 4096, tau = 0.07 this is 6.08 nats: the
    loss an encoder with eta = 0 can reach, whatever it does with the spirals.
    """
    _check_int("negatives", negatives, low=1)
    _check_positive("tau", tau)
    i0e = torch.special.i0e(torch.tensor(1.0 / tau, dtype=torch.float64)).item()
    return math.log1p(negatives * i0e)


def shared_view_fraction(points, labels, eta):
    """Sec. 4.2 identifiability, measured: the fraction of points x whose view set v_x meets the other spiral's.

    v_x is the square [x, x + eta]^2, and two such squares meet exactly when
    the points are closer than eta in the max-norm.  points [n, 2], labels [n].
    """
    a, b = points[labels == 0], points[labels == 1]
    gap_ab = torch.cdist(a, b, p=float("inf")).min(dim=1).values  # each point's max-norm gap to the other spiral
    gap_ba = torch.cdist(b, a, p=float("inf")).min(dim=1).values
    return (torch.cat([gap_ab, gap_ba]) < eta).double().mean().item()


def _keep_freed_memory():
    # Each step allocates and frees a few [128, 4097] tensors (2 MB each).  By
    # default glibc hands such freed blocks back to the OS, so the next step
    # page-faults ~6 MB back in: ~40% of the step time here.  Raising the trim
    # and mmap thresholds keeps the memory in the process (Linux/glibc only;
    # elsewhere this does nothing).
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (glibc's maximum)
    except (OSError, AttributeError):
        pass


def check_training_settings(n, eta, iters, batch_size, negatives, lr, momentum, weight_decay, tau, alpha, warmup=0):
    """Raise ValueError naming the setting (and its command-line flag) if it is out of range."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta (--eta / --sweep) must be a finite number >= 0 "
                         f"(eta = 0 is the privileged view alone), got {eta}")
    _check_int("iters (--iters)", iters, low=1)
    _check_int("batch_size (--batch-size)", batch_size, low=1, high=n, high_name="the number of training points")
    _check_int("negatives (--negatives)", negatives, low=1, high=n, high_name="the number of training points")
    _check_positive("lr (--lr)", lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum (--momentum) must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay (--weight-decay) must be >= 0, got {weight_decay}")
    _check_positive("tau (--tau)", tau)
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha (--alpha) must be in [0, 1) (Eq. 7; 0 = the bank holds the latest view), got {alpha}")
    _check_int("warmup (--warmup)", warmup, low=0)


def train_ir(points, eta, iters=ITERS, batch_size=BATCH_SIZE, negatives=NEGATIVES, lr=LR,
             momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, tau=TAU, alpha=ALPHA, warmup=WARMUP, seed=0,
             device="cpu", progress=True, label=""):
    """Train the encoder with IR on views of `points` [N, 2] (no labels).

    Returns (encoder, bank [N, 2], losses): losses is the list of per-step
    infonce_loss values (log K when nothing is learned, K = negatives + 1).
    warmup > 0 ramps the learning rate linearly over that many iterations
    (0, the default, is the paper's constant rate; see the module docstring).
    Prints progress (iteration, loss, rate, time left) every ~2 s if `progress`.
    """
    n = points.shape[0]
    check_training_settings(n, eta, iters, batch_size, negatives, lr, momentum, weight_decay, tau, alpha, warmup)
    _keep_freed_memory()
    torch.manual_seed(seed)                       # the encoder's initial weights
    generator = torch.Generator().manual_seed(seed + 1)  # views, shuffling, negatives
    points = points.to(device)
    encoder = make_encoder().to(device)
    params = list(encoder.parameters())
    momentum_buffers = [None] * len(params)

    # The bank starts as the untrained encoder's embedding of one view of every
    # point, as if epoch 0 had been run without a gradient step.  IR starts it
    # at random vectors instead; here that gives a first loss near 20 nats whose
    # large gradients can leave the 2-D network with a constant output.
    with torch.no_grad():
        bank = F.normalize(encoder(sample_views(points, eta, generator)), dim=1)  # [N, 2]

    steps_per_epoch = n // batch_size
    losses = []
    start = last_print = time.perf_counter()
    for it in range(iters):
        step = it % steps_per_epoch
        if step == 0:
            # A new epoch: shuffle, and draw this epoch's views and negatives in
            # one go (a few big random draws instead of many small ones).
            order = torch.randperm(n, generator=generator).to(device)
            views = sample_views(points[order], eta, generator)   # v(x, a), a fresh a every epoch
            negative_idx = torch.randint(n, (steps_per_epoch, negatives), generator=generator).to(device)
        batch = slice(step * batch_size, (step + 1) * batch_size)
        idx = order[batch]

        # optional linear warmup (not in the paper), reaching lr at it = warmup - 1
        step_lr = lr * (it + 1) / warmup if it < warmup else lr
        z = F.normalize(encoder(views[batch]), dim=1)            # [B, 2] on the unit circle
        loss = infonce_loss(ir_scores(z, bank, idx, negative_idx[step], tau))
        for p in params:
            p.grad = None
        loss.backward()
        sgd_step_(params, momentum_buffers, step_lr, momentum, weight_decay)
        update_bank_(bank, idx, z.detach(), alpha)               # Eq. 7
        losses.append(loss.item())

        now = time.perf_counter()
        if progress and (now - last_print >= 2.0 or it + 1 == iters):
            rate = (it + 1) / (now - start)
            print(f"{label}iter {it + 1:>6}/{iters}  loss {losses[-1]:.3f}  "
                  f"{rate:,.0f} it/s  {(iters - it - 1) / rate:4.1f} s left", flush=True)
            last_print = now
    return encoder, bank, losses


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
        hessian += 1e-12 * torch.eye(len(theta), dtype=torch.float64)  # a constant feature: keep it solvable
        step = torch.linalg.solve(hessian, gradient)
        theta -= step
        if step.abs().max() < 1e-10:
            break
    return theta[:-1], theta[-1]


def standardize(train_features, *others):
    """z-score every column with the training features' mean and std (a constant column becomes 0)."""
    mean, std = train_features.mean(0), train_features.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(f - mean) / std for f in (train_features,) + others]


def transfer_accuracy(train_features, train_labels, test_features, test_labels, l2=1e-4):
    """Test accuracy of a linear probe fitted on the training features (Sec. 4.3's transfer task).

    The protocol: standardise the features with the training set's statistics,
    fit plain logistic regression to convergence (fit_logistic_regression),
    report the fraction of test points on the right side of its line.  A
    converged, (almost) unpenalised logistic regression does not care how the
    representation is scaled or shifted; standardising first makes the small
    ridge scale-free as well, so the accuracy is a property of the
    representation alone (tested: features * 1e-3 + 5 give the same answer).
    A probe that is stopped early, or penalised on the raw scale (e.g.
    scikit-learn's default C = 1 on unstandardised features), instead reads a
    nearly collapsed representation as "chance" and a spread-out one as
    informative, which is a statement about the scale, not about the spirals.
    """
    train_features, test_features = standardize(train_features, test_features)
    weight, bias = fit_logistic_regression(train_features, train_labels, l2=l2)
    predictions = (test_features.double() @ weight + bias > 0).long()
    return (predictions == test_labels).double().mean().item()


# ---------------------------------------------------------------------------
# One setting end to end, and Figure 1
# ---------------------------------------------------------------------------
def run_setting(eta, seed, args, label=""):
    """Data for this seed, IR training at this eta, the transfer accuracy: a dict of results."""
    generator = torch.Generator().manual_seed(seed)
    train_points, train_labels = make_spirals(args.n_train, args.turns, args.inner_radius, generator=generator)
    test_points, test_labels = make_spirals(args.n_test, args.turns, args.inner_radius, generator=generator)
    start = time.perf_counter()
    encoder, _, losses = train_ir(train_points, eta, iters=args.iters, batch_size=args.batch_size,
                                  negatives=args.negatives, lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, tau=args.tau, alpha=args.alpha,
                                  warmup=args.warmup, seed=seed, device=args.device, progress=True, label=label)
    seconds = time.perf_counter() - start
    test_embedding = embed(encoder, test_points)
    accuracy = transfer_accuracy(embed(encoder, train_points), train_labels, test_embedding, test_labels)
    last_epoch = losses[-min(len(losses), max(1, args.n_train // args.batch_size)):]
    return {
        "eta": eta, "seed": seed, "losses": losses, "final_loss": sum(last_epoch) / len(last_epoch),
        "accuracy": accuracy, "seconds": seconds,
        # a linear probe on the raw coordinates: the reference "chance" for this geometry
        "raw_accuracy": transfer_accuracy(train_points, train_labels, test_points, test_labels),
        "test_points": test_points, "test_labels": test_labels, "test_embedding": test_embedding,
    }


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    std = values.std().item() if len(values) > 1 else 0.0
    return values.mean().item(), std


def plot_figure1(results, etas, args, path):
    """Figure 1's four panels from a list of run_setting results; saved to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.cm.viridis(torch.linspace(0.0, 0.9, len(etas)).tolist())
    first_seed = min(r["seed"] for r in results)
    fig = plt.figure(figsize=(13, 6.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.2, 1.0], hspace=0.3, wspace=0.3)

    # (a) the data and the views of one point
    ax = fig.add_subplot(grid[0, 0])
    example = next(r for r in results if r["seed"] == first_seed)
    pts, lab = example["test_points"][:3000], example["test_labels"][:3000]
    ax.scatter(pts[lab == 0, 0], pts[lab == 0, 1], s=2, c="tab:red", rasterized=True, label="spiral 0")
    ax.scatter(pts[lab == 1, 0], pts[lab == 1, 1], s=2, c="tab:blue", rasterized=True, label="spiral 1")
    anchor = pts[lab == 0][pts[lab == 0].norm(dim=1).argsort()[len(pts) // 4]]
    for eta, colour in zip(etas, colours):
        if 0 < eta <= 1:  # the views of x fill the square [x, x + eta]^2
            ax.add_patch(plt.Rectangle(anchor.tolist(), eta, eta, fill=False, lw=1.5, ec=colour,
                                       label=f"views, eta={eta:g}"))
    ax.plot(*anchor.tolist(), "k*", ms=10)
    ax.set_aspect("equal")
    ax.set_xlim(-1.7, 1.9)
    ax.set_ylim(-1.7, 1.9)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    ax.set_title("(a) data and the views v(x) of one point x (*)", fontsize=9)

    # (c) training loss per epoch, averaged over seeds
    ax = fig.add_subplot(grid[0, 1])
    epoch = max(1, args.n_train // args.batch_size)
    for eta, colour in zip(etas, colours):
        runs = [torch.tensor(r["losses"]) for r in results if r["eta"] == eta]
        curve = torch.stack(runs).mean(0)
        usable = len(curve) // epoch * epoch
        if usable:
            smooth = curve[:usable].reshape(-1, epoch).mean(1)
            ax.plot(torch.arange(1, len(smooth) + 1) * epoch, smooth, color=colour, label=f"eta={eta:g}")
        else:
            ax.plot(torch.arange(1, len(curve) + 1), curve, color=colour, label=f"eta={eta:g}")
    ax.axhline(math.log(args.negatives + 1), ls="--", c="gray", lw=1)
    ax.text(0, math.log(args.negatives + 1) + 0.05, "log K: nothing learned", fontsize=7, color="gray")
    floor = uniform_circle_loss(args.negatives, args.tau)
    ax.axhline(floor, ls=":", c="gray", lw=1)
    ax.text(0, floor - 0.25, "uniform on the circle, views exact", fontsize=7, color="gray")
    ax.set_xlabel("iteration")
    ax.set_ylabel("InfoNCE loss (per epoch)")
    ax.legend(fontsize=7)
    ax.set_title("(c) training loss: more noise, less information", fontsize=9)

    # (d) transfer accuracy against eta
    ax = fig.add_subplot(grid[0, 2])
    stats = [mean_std([r["accuracy"] for r in results if r["eta"] == eta]) for eta in etas]
    raw_mean, _ = mean_std([r["raw_accuracy"] for r in results])
    xs = list(range(len(etas)))
    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o-", c="k", capsize=3,
                label=f"this code (mean +- std, {len({r['seed'] for r in results})} seed(s))")
    ax.axhline(raw_mean, ls="--", c="gray", lw=1, label=f"probe on raw (x, y): {raw_mean:.2f}")
    if PAPER_BEST[0] in etas:
        ax.plot(etas.index(PAPER_BEST[0]), PAPER_BEST[1], "r*", ms=12, label="paper, Sec. 4.3")
    ax.set_xticks(xs, [f"{e:g}" for e in etas])
    ax.set_xlabel("eta (view noise)")
    ax.set_ylabel("test accuracy of a linear probe")
    ax.set_ylim(0.35, 1.0)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("(d) transfer: which spiral? (linear)", fontsize=9)

    # (b) the learned representation of the test points, one panel per eta
    sub = grid[1, :].subgridspec(1, max(len(etas), 4), wspace=0.05)
    for k, (eta, colour) in enumerate(zip(etas, colours)):
        r = next(r for r in results if r["eta"] == eta and r["seed"] == first_seed)
        ax = fig.add_subplot(sub[0, k])
        # Each test point is drawn at its own distance from the centre and at
        # the DIRECTION the encoder gives it (the representation is an angle).
        # An encoder that kept the polar angle would redraw the spirals; one
        # that separates them puts red and blue in different directions.
        angle = torch.atan2(r["test_embedding"][:, 1], r["test_embedding"][:, 0])
        radius = r["test_points"].norm(dim=1)
        drawn = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)[:3000]
        lab = r["test_labels"][:3000]
        ax.scatter(drawn[lab == 0, 0], drawn[lab == 0, 1], s=1, c="tab:red", rasterized=True)
        ax.scatter(drawn[lab == 1, 0], drawn[lab == 1, 1], s=1, c="tab:blue", rasterized=True)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_title(f"eta={eta:g}: acc {r['accuracy']:.2f}", fontsize=8, color=colour)
        if k == 0:
            ax.set_ylabel("(b) representation\n(direction = embedding,\nradius = |x|)", fontsize=8)
    fig.suptitle("Figure 1 (Sec. 4.3) reproduced: IR on two spirals, views v(x) = x + U(0, eta)^2", fontsize=10)
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _check_int(name, value, low, high=None, high_name=None):
    if isinstance(value, bool) or int(value) != value or value < low or (high is not None and value > high):
        limit = f"between {low} and {high} ({high_name})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {limit}, got {value}")


def _check_positive(name, value):
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def build_parser():
    p = argparse.ArgumentParser(
        description="Sec. 4.3 / Figure 1: IR (InfoNCE with a memory bank) on two spirals, views "
                    "v(x) = x + U(0, eta)^2, transfer = linear probe predicting the spiral.")
    p.add_argument("--eta", type=float, default=0.4,
                   help="view noise: each coordinate gets U(0, eta) noise (0 = privileged view only); default 0.4")
    p.add_argument("--sweep", type=float, nargs="*", default=None, metavar="ETA",
                   help=f"train one model per eta and save the four-panel Figure 1 (no values: {' '.join(f'{e:g}' for e in ETAS)})")
    p.add_argument("--seeds", type=int, default=1, help="repeat each setting over this many seeds; report mean and std")
    p.add_argument("--seed", type=int, default=0, help="first seed (data, initial weights, views, negatives)")
    p.add_argument("--iters", type=int, default=ITERS, help="SGD iterations (paper: 10k = 100 epochs)")
    p.add_argument("--n-train", type=int, default=N_TRAIN, help="training points, both spirals together (no labels used)")
    p.add_argument("--n-test", type=int, default=N_TEST, help="held-out points for the transfer task")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch size (paper: 128)")
    p.add_argument("--negatives", type=int, default=NEGATIVES, help="negatives per step drawn from the bank, K - 1 in Eq. 5 (paper: 4096)")
    p.add_argument("--lr", type=float, default=LR, help="SGD learning rate (paper: 0.03)")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="weight decay (paper: 1e-5)")
    p.add_argument("--tau", type=float, default=TAU, help="temperature of the critic z.m / tau (IR: 0.07)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="memory bank update rate alpha of Eq. 7 (IR: 0.5)")
    p.add_argument("--warmup", type=int, default=WARMUP,
                   help=f"iterations of linear learning-rate warmup (not in the paper; 0 = constant lr from the start); default {WARMUP}")
    p.add_argument("--turns", type=float, default=TURNS, help="turns of each spiral (whole turns keep raw (x, y) at chance)")
    p.add_argument("--inner-radius", type=float, default=INNER_RADIUS, help="radius where the spirals start (they end 2 * 0.5 * turns further out)")
    p.add_argument("--out", default=None, help="figure path (default out/spiral_eta<eta>.png, or out/figure1_spiral.png with --sweep)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPU threads for torch (default min(2, cores): the tensors are small, more threads mostly wait)")
    return p


def check_args(args):
    """Every check that can fail, before any training: raises ValueError naming the flag."""
    etas = list(ETAS) if args.sweep is not None and len(args.sweep) == 0 else (args.sweep or [args.eta])
    _check_int("--seeds", args.seeds, low=1)
    _check_int("--n-train", args.n_train, low=2)
    _check_int("--n-test", args.n_test, low=2)
    _check_int("--threads", args.threads, low=1)
    _check_positive("--turns", args.turns)
    if not (math.isfinite(args.inner_radius) and args.inner_radius >= 0):
        raise ValueError(f"--inner-radius must be a finite number >= 0, got {args.inner_radius}")
    for eta in etas:
        check_training_settings(args.n_train, eta, args.iters, args.batch_size, args.negatives, args.lr,
                                args.momentum, args.weight_decay, args.tau, args.alpha, args.warmup)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (optionally cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.out is None:
        args.out = os.path.join("out", "figure1_spiral.png" if args.sweep is not None else f"spiral_eta{etas[0]:g}.png")
    _check_output_path(args.out)
    return etas


def _check_output_path(path):
    from matplotlib.backend_bases import FigureCanvasBase
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"--out {path!r}: the file name must end in an image format matplotlib "
                         f"writes ({', '.join('.' + f for f in sorted(formats))})")
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a directory; give a file name such as {os.path.join(path, 'spiral.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {path!r}: cannot create the folder {folder!r} ({error.strerror})") from None
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path!r} is not writable")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        etas = check_args(args)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seed, args.seed + args.seeds))
    log_k = math.log(args.negatives + 1)
    print(f"IR on two spirals: {args.n_train} training points, K = {args.negatives} + 1 (log K = {log_k:.3f}), "
          f"tau = {args.tau}, alpha = {args.alpha}, {args.iters} iterations; etas {etas}, seeds {seeds}")

    results = []
    total = len(etas) * len(seeds)
    for i, (eta, seed) in enumerate([(e, s) for s in seeds for e in etas]):
        label = f"[{i + 1}/{total}] eta={eta:g} seed={seed}  "
        r = run_setting(eta, seed, args, label=label)
        print(f"{label}final loss {r['final_loss']:.3f} (log K = {log_k:.3f}), "
              f"transfer accuracy {r['accuracy']:.3f}  ({r['seconds']:.1f} s)", flush=True)
        results.append(r)

    print()
    sample = results[0]["test_points"][:4000], results[0]["test_labels"][:4000]
    print(f"{'eta':>5} | {'views shared':>12} | {'final loss':>15} | {'transfer accuracy':>17}")
    for eta in etas:
        loss_mean, loss_std = mean_std([r["final_loss"] for r in results if r["eta"] == eta])
        acc_mean, acc_std = mean_std([r["accuracy"] for r in results if r["eta"] == eta])
        print(f"{eta:>5g} | {shared_view_fraction(*sample, eta):12.2f} | {loss_mean:7.3f} +- {loss_std:5.3f} | "
              f"{acc_mean:7.3f} +- {acc_std:5.3f}")
    print("(views shared: fraction of points whose views can also be views of the other spiral, Sec. 4.2)")
    raw_mean, raw_std = mean_std([r["raw_accuracy"] for r in results])
    print(f"linear probe on the raw (x, y) coordinates: {raw_mean:.3f} +- {raw_std:.3f} (chance for this geometry)")
    print(f"log K = {log_k:.3f} (nothing learned); uniform-circle floor = "
          f"{uniform_circle_loss(args.negatives, args.tau):.3f} (the best any 2-D embedding can do)")
    plot_figure1(results, etas, args, args.out)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
