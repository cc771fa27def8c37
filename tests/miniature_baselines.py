"""Baselines and step rates for Figure 2 in miniature on Fashion-MNIST.

Figure 2 of the paper compares views (panel b), losses (a) and the bank's update rate alpha (c)
by the weighted kNN of Wu et al. (2018) on learned features.  Before a miniature of it means
anything, two questions need numbers on the same data split and the same kNN protocol:

  * What does a representation have to beat?  (a) the pixels, raw and standardized per pixel
    (the weighted kNN's exp(cos / tau) hardly ranks the crowded cosines of all-positive vectors),
    (b) a randomly initialized ResNet-18 of the trainer's shape (ImageNet stem), (c) the same with
    the small-image stem (3x3 stride-1 first convolution, no max-pool), and (d) supervised
    ceilings: a linear probe on the pixels and, with --sup-epochs, a ResNet-18 trained on labels.
  * What does a training step cost on one CPU thread?  (--throughput: ResNet-18, IR loss of
    Eq. 6 against a memory bank of Eq. 7, for each image size, stem and batch size.)

The protocol of every row: features L2-normalized, the n_test queries vote with their k nearest
memory rows (cosine), each neighbour with weight exp(cos / tau) (k = 200, tau = 0.07, as the
trainer's monitor); 1-NN is printed beside it.  Memory: a class-balanced subset of the 60,000
training images; queries: a class-balanced subset of the 10,000 test images; both seeded.
Labels are only used for this evaluation (and to train the supervised ceiling).

Data: the four IDX files of the Debian package dataset-fashion-mnist, read through
torchvision.datasets.FashionMNIST (never downloaded here).  Run from the repository root:

    python tests/miniature_baselines.py                 # the baseline table
    python tests/miniature_baselines.py --throughput    # the step-rate table
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for imagenet_train, instance_disc, memory_bank

import imagenet_train  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# The data.
# ----------------------------------------------------------------------------------------------
def fashion_mnist(source_dir, train):
    """Fashion-MNIST's training (train=True, 60,000) or test (10,000) split as a torchvision
    dataset: .data uint8 [N, 28, 28], .targets int64 [N].  The files are found (and decompressed
    once) as the trainer's --dataset fashion-mnist finds them; nothing is downloaded."""
    root = imagenet_train.fashion_mnist_root(
        source_dir
    )  # UserError, one line, if files are missing
    return torchvision.datasets.FashionMNIST(root, train=train, download=False)


# The trainer's --train-subset / --val-subset draw (train first, then test, one generator): with
# --seed 0 the table's memory and queries are the miniature runs' train and val images.
balanced_subset = imagenet_train.balanced_subset


# ----------------------------------------------------------------------------------------------
# The kNN protocol (Wu et al. 2018), the same for every row of the table.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def weighted_knn(query, memory, memory_labels, num_classes, k=200, tau=0.07, chunk=1024):
    """Weighted kNN: the k memory rows with the highest cosine to a query vote for their class
    with weight exp(cos / tau); also 1-NN.  query [Q, d], memory [N, d], labels [N] ->
    (weighted predictions [Q], 1-NN predictions [Q]).  Rows are L2-normalized here."""
    if query.dim() != 2 or memory.dim() != 2 or query.shape[1] != memory.shape[1]:
        raise ValueError(f"query [Q, d] and memory [N, d], got {query.shape}, {memory.shape}")
    if not 1 <= k <= len(memory):
        raise ValueError(f"k must be in [1, N] = [1, {len(memory)}], got {k}")
    memory = F.normalize(memory.float(), dim=1)
    weighted, nearest = [], []
    for q in F.normalize(query.float(), dim=1).split(chunk):
        sims, nbrs = (q @ memory.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(
            1, memory_labels[nbrs], (sims / tau).exp()
        )
        weighted.append(votes.argmax(dim=1))
        nearest.append(memory_labels[nbrs[:, 0]])
    return torch.cat(weighted), torch.cat(nearest)


# ----------------------------------------------------------------------------------------------
# The networks: the trainer's ResNet-18 with 128 outputs, either stem.
# ----------------------------------------------------------------------------------------------
def resnet18(stem, dim=128):
    """The trainer's model: torchvision's ResNet-18, `dim` L2-normalized outputs, either stem."""
    return imagenet_train.ResNetEmbedding(dim, stem)


def trained(path):
    """The model of a checkpoint written by imagenet_train.py, and a name for its row."""
    ckpt = imagenet_train.load_checkpoint(path, "--checkpoint", "cpu")
    model = resnet18(ckpt["args"].get("stem", "imagenet"), ckpt["args"]["dim"])
    model.load_state_dict(ckpt["model"])
    return model, f"{ckpt['args']['algo']} epoch {ckpt['epoch']} ({path})"


def to_network_input(images, image_size, center_crop):
    """uint8 [N, 28, 28] -> float [N, 3, S, S]: the gray channel three times, resized to S
    (bilinear), ImageNet-normalized.  center_crop: the trainer's evaluation view, resize to
    round(S * 256 / 224) then the central S x S (it cuts ~1/8 of the border); else resize to S."""
    x = images.unsqueeze(1).float().div(255)
    if center_crop:
        x = TF.center_crop(TF.resize(x, round(image_size * 256 / 224), antialias=True), image_size)
    elif image_size != x.shape[-1]:
        x = TF.resize(x, [image_size, image_size], antialias=True)
    x = x.expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


@torch.no_grad()
def encode(net, x, batch, label):
    """(128-d outputs, 512-d pooled features) of x in eval mode, with a progress line."""
    net.eval()
    outs, feats, t0 = [], [], time.time()
    for i, xb in enumerate(x.split(batch)):
        f = net.features(xb)  # 512-d pooled conv5 features
        feats.append(f)
        outs.append(net.net.fc(f))  # the 128-d output before its L2 norm (the kNN normalizes)
        done = min((i + 1) * batch, len(x))
        rate = done / (time.time() - t0)
        print(
            f"\r  {label}: {done}/{len(x)} images, {rate:.0f} img/s, "
            f"{(len(x) - done) / rate:.0f} s left   ",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return torch.cat(outs), torch.cat(feats)


# ----------------------------------------------------------------------------------------------
# Supervised ceilings.
# ----------------------------------------------------------------------------------------------
def linear_probe(train_x, train_y, test_x, num_classes, iters=100, weight_decay=1e-4):
    """Softmax regression on per-pixel standardized inputs, full-batch L-BFGS: test predictions."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    layer = nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(train_x), train_y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return layer(test_x).argmax(dim=1)


def train_supervised(net, x, y, epochs, batch, lr, generator):
    """Cross-entropy training of net (its fc replaced by a 10-way head), SGD with momentum and a
    cosine schedule, random horizontal flips; returns the head.  Prints a line per epoch."""
    head = nn.Linear(512, 10)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for rows in order[: len(x) // batch * batch].split(batch):
            xb = x[rows]
            flip = torch.rand(len(rows), generator=generator) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(head(net.features(xb)), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        rate = step * batch / (time.time() - t0)
        left = (steps - step) * batch / rate
        print(
            f"  supervised epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, "
            f"{rate:.0f} img/s, {left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )
    return head


# ----------------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------------
def baselines(args):
    train = fashion_mnist(args.data, train=True)
    test = fashion_mnist(args.data, train=False)
    g = torch.Generator().manual_seed(args.seed)
    tr = balanced_subset(train.targets, args.n_train, 10, g)
    te = balanced_subset(test.targets, args.n_test, 10, g)
    train_img, train_y = train.data[tr], train.targets[tr]
    test_img, test_y = test.data[te], test.targets[te]
    print(
        f"Fashion-MNIST: memory {len(tr)} training images, queries {len(te)} test images "
        f"(class-balanced, seed {args.seed}); weighted {args.knn_k}-NN, tau {args.knn_tau}"
    )
    rows = []

    def knn_row(name, train_f, test_f, t0, other=""):  # seconds since t0, encoding included
        w, n1 = weighted_knn(test_f, train_f, train_y, 10, args.knn_k, args.knn_tau)
        acc = [(p == test_y).float().mean().item() * 100 for p in (w, n1)]
        rows.append(
            (name, train_f.shape[1], f"{acc[0]:.1f}", f"{acc[1]:.1f}", other, time.time() - t0)
        )
        print(f"  {name}: {acc[0]:.1f}%", file=sys.stderr)

    t0 = time.time()  # (a) raw pixels
    knn_row("raw pixels", train_img.flatten(1).float(), test_img.flatten(1).float(), t0)
    t0 = time.time()  # (a') the pixels standardized per pixel (training-subset mean and std)
    pixels = train_img.flatten(1).float()
    mean, std = pixels.mean(0), pixels.std(0) + 1e-6
    knn_row("standardized pixels", (pixels - mean) / std, (test_img.flatten(1) - mean) / std, t0)

    x_train, x_test = (
        to_network_input(i, args.image_size, not args.plain_resize) for i in (train_img, test_img)
    )
    for stem in args.stems:  # (b), (c) a random network of the trainer's shape
        torch.manual_seed(args.seed)
        net, t0 = resnet18(stem), time.time()
        z_train, f_train = encode(net, x_train, 256, f"random {stem} stem, memory")
        z_test, f_test = encode(net, x_test, 256, f"random {stem} stem, queries")
        knn_row(f"random ResNet-18, {stem} stem, output", z_train, z_test, t0)
        knn_row(f"random ResNet-18, {stem} stem, pooled", f_train, f_test, t0)

    for path in args.checkpoint:  # learned: clean features of a trained network, same protocol
        net, name = trained(path)
        t0 = time.time()
        z_train, f_train = encode(net, x_train, 256, f"{name}, memory")
        z_test, f_test = encode(net, x_test, 256, f"{name}, queries")
        knn_row(f"{name}, output", z_train, z_test, t0)
        knn_row(f"{name}, pooled", f_train, f_test, t0)

    t0 = time.time()  # (d) supervised: a linear probe on the pixels
    pred = linear_probe(train_img.flatten(1).float(), train_y, test_img.flatten(1).float(), 10)
    acc = (pred == test_y).float().mean().item() * 100
    rows.append(("linear probe on raw pixels", 784, "", "", f"{acc:.1f}", time.time() - t0))

    if args.sup_epochs:  # (d) supervised ResNet-18, ImageNet stem: kNN on its pooled features
        torch.manual_seed(args.seed)
        net, t0 = resnet18("imagenet"), time.time()
        head = train_supervised(net, x_train, train_y, args.sup_epochs, 128, 0.1, g)
        _, f_train = encode(net, x_train, 256, "supervised, memory")
        _, f_test = encode(net, x_test, 256, "supervised, queries")
        acc = (head(f_test).argmax(dim=1) == test_y).float().mean().item() * 100
        name = f"supervised ResNet-18 ({args.sup_epochs} ep), pooled"
        knn_row(name, f_train, f_test, t0, other=f"{acc:.1f}")

    print_table(
        ["feature", "dim", f"w{args.knn_k}-NN %", "1-NN %", "probe/head %", "seconds"],
        [r[:5] + (f"{r[5]:.0f}",) for r in rows],
    )
    print(
        f"Network input: {args.image_size} px, "
        f"{'plain resize' if args.plain_resize else 'the trainer eval view (resize, center crop)'}"
        f"; seconds: wall time, {torch.get_num_threads()} thread(s), encoding (training) included."
    )


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


# ----------------------------------------------------------------------------------------------
# Step rates: forward + backward + SGD + Eq. 7 update, one thread.
# ----------------------------------------------------------------------------------------------
def throughput(args):
    from instance_disc import ir_loss  # noqa: E402 (the repository's Eq. 6)
    from memory_bank import MemoryBank  # noqa: E402 (the repository's Eq. 7)

    rows = []
    for size in args.sizes:
        for stem in args.stems:
            for batch in args.batches:
                torch.manual_seed(0)
                net = resnet18(stem).train()
                bank = MemoryBank(args.n_train, 128, seed=0)
                opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
                x = torch.randn(batch, 3, size, size)
                idx = torch.randperm(args.n_train)[:batch]
                times = []
                for _ in range(args.steps + 1):  # the first step warms up, untimed
                    t0 = time.perf_counter()
                    z = net(x)
                    loss = ir_loss(z, bank.vectors, idx, 0.07)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bank.update(idx, z.detach(), 0.5)
                    times.append(time.perf_counter() - t0)
                with torch.no_grad():  # evaluation: forward only, eval mode
                    net.eval()
                    t0 = time.perf_counter()
                    net(x)
                    fwd = batch / (time.perf_counter() - t0)
                step = sorted(times[1:])[len(times[1:]) // 2]  # the median step
                rows.append((size, stem, batch, f"{batch / step:.0f}", f"{step:.2f}", f"{fwd:.0f}"))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print_table(["size", "stem", "batch", "train img/s", "s/step", "eval img/s"], rows)
    for size in args.sizes:
        print(f"views: {augment_rate(size):.0f} img/s, Sec. 5.3 view set, 28-px PIL -> {size} px")
    print(
        f"ResNet-18 (128-d), IR over a {args.n_train}-row bank, SGD; median of {args.steps} "
        f"steps after one warm-up; {torch.get_num_threads()} thread(s); no data loading."
    )


def augment_rate(size, n=2000):
    """Images/s of the IR/LA view set (Sec. 5.3, App. D) on 28-px RGB PIL images, one thread:
    random resized crop (scale 0.2-1), grayscale (p 0.2), color jitter 0.4, flip, to a tensor."""
    from PIL import Image
    from torchvision import transforms

    views = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.RandomGrayscale(0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4), transforms.RandomHorizontalFlip(),
        transforms.PILToTensor()])  # fmt: skip
    image = Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()).convert(
        "RGB"
    )
    t0 = time.perf_counter()
    for _ in range(n):
        views(image)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Figure 2 in miniature: kNN baselines on Fashion-MNIST (raw pixels,"
        " random ResNet-18 with either stem, supervised ceilings), or ResNet-18 step rates "
        "(--throughput). Every kNN row: L2-normalized features, weighted k-NN (Wu et al. 2018).",
    )
    p.add_argument(
        "--data",
        default=FASHION_MNIST_DIR,
        help="folder with the four .gz IDX files (default: %(default)s)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=10000,
        help="kNN memory: a class-balanced subset of the 60,000 training images, a "
        "multiple of 10 in [10, 60000] (default: %(default)s)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=2000,
        help="queries: a class-balanced subset of the 10,000 test images, a multiple "
        "of 10 in [10, 10000] (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="subsets and network initialization")
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="network input size S in [16, 224] (default: %(default)s)",
    )
    p.add_argument(
        "--plain-resize",
        action="store_true",
        help="resize the 28-px image to S; default: the trainer's evaluation view "
        "(resize to S*256/224, center crop S)",
    )
    p.add_argument(
        "--stems",
        nargs="+",
        default=["imagenet", "small"],
        choices=["imagenet", "small"],
        help="ResNet-18 stems: imagenet (7x7 stride-2 conv, max-pool) and/or small "
        "(3x3 stride-1 conv, no max-pool)",
    )
    p.add_argument(
        "--knn-k",
        type=int,
        default=None,
        help="k of the weighted kNN, in [1, n-train] (default: 200, or n-train if less)",
    )
    p.add_argument(
        "--knn-tau",
        type=float,
        default=0.07,
        help="temperature tau > 0 of the kNN weights exp(cos / tau) (default: %(default)s)",
    )
    p.add_argument(
        "--sup-epochs",
        type=int,
        default=0,
        help="the supervised ceiling: train ResNet-18 (ImageNet stem) on the memory "
        "subset for this many epochs, then kNN on its pooled features; 0 skips it "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        help="also rows for trained networks: ckpt.pt files of imagenet_train.py (--dataset "
        "fashion-mnist), read on clean images like the random networks",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads, >= 1 (default: 1)")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="instead of the table: images/s of a training step (IR loss, Eq. 6; "
        "bank update, Eq. 7) for every --sizes x --stems x --batches",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[28, 32],
        help="--throughput image sizes, each in [16, 224] (default: 28 32)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[128, 256],
        help="--throughput batch sizes, each >= 1 (default: 128 256)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="--throughput timed steps per setting, >= 1 (default: %(default)s)",
    )
    a = p.parse_args(argv)
    checks = [
        (
            a.n_train % 10 == 0 and 10 <= a.n_train <= 60000,
            "--n-train",
            "a multiple of 10 in [10, 60000]",
        ),
        (
            a.n_test % 10 == 0 and 10 <= a.n_test <= 10000,
            "--n-test",
            "a multiple of 10 in [10, 10000]",
        ),
        (16 <= a.image_size <= 224, "--image-size", "in [16, 224]"),
        (
            a.knn_k is None or 1 <= a.knn_k <= a.n_train,
            "--knn-k",
            f"in [1, --n-train] = [1, {a.n_train}]",
        ),
        (a.knn_tau > 0 and math.isfinite(a.knn_tau), "--knn-tau", "> 0"),
        (a.sup_epochs >= 0, "--sup-epochs", ">= 0"),
        (a.threads >= 1, "--threads", ">= 1"),
        (all(16 <= s <= 224 for s in a.sizes), "--sizes", "each in [16, 224]"),
        (all(b >= 1 for b in a.batches), "--batches", "each >= 1"),
        (a.steps >= 1, "--steps", ">= 1"),
    ]
    for ok, flag, allowed in checks:
        if not ok:
            got = getattr(a, flag[2:].replace("-", "_"))
            p.exit(2, f"{p.prog}: error: {flag} must be {allowed}, got {got}\n")
    if a.knn_k is None:  # default adapts, says so
        a.knn_k = min(200, a.n_train)
        if a.knn_k < 200:
            print(f"--knn-k: 200 > --n-train, using k = {a.knn_k}", file=sys.stderr)
    return a


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.throughput:
        return throughput(args)
    try:
        baselines(args)
    except imagenet_train.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
