"""Local Aggregation (LA): the Eq. 8 loss and its close sets from k-means (Sec. 5.3, Appendix D).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning", Section 5.3 (Eq. 8, Theorem 5.4, Corollary 5.4.1) and Appendix D.  LA
itself is Zhuang, Zhai and Yamins (2019), reference [26] of the paper.

    L^LA(x_i, M) = log p(C_i ∩ B_i | x_i, M) / p(B_i | x_i, M)          (Eq. 8)
    p(I | x, M)  = sum_{j in I} p(j | x, M),   p(j | x, M) from Eq. 6

B_i, the background set: the k_background bank rows nearest to the current embedding z (the paper
says: nearest to M[i]; see `neighbours_of`).  C_i, the close set: the rows that share i's cluster
in at least one of H k-means clusterings of the bank (Appendix D: H = 10 clusterings with different
seeds, 30,000 clusters each, for ImageNet's 1,281,167 images).  LA pulls a view towards its
clusters' members inside its neighbourhood; with C_i = {i} it is BALL (Theorem 5.4).

In this file: la_loss (Eq. 8), then run_kmeans (Appendix D's clusterings, with faiss, on the GPU
where faiss has one), then the demo, `python local_agg.py`.

The published LA code (TensorFlow, and its PyTorch port) computes the same ratio with
p(j | x) = exp(z . M[j] / tau) / Z for a fixed constant Z; Z cancels in Eq. 8.  la_loss sums
probabilities normalized over B_i (exp of logits minus their logsumexp, never above 1) and takes
-log(ratio), not -log(ratio + 1e-7): a difference of at most 1e-7 / ratio.
The one real difference is `add_positive`, which matters only when i is not among the
k_background rows nearest to z.  (The TF code starts every clustering as labels = arange(N), i.e.
C_i = {i}: until its first k-means, LA trains as BALL, as Theorem 5.4 says.)
"""

import argparse
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# faiss is imported where it clusters, so `from local_agg import la_loss` works without faiss.
from instance_disc import (
    BackgroundLogits,
    _check,
    ann_loss,
    ball_loss,
    ir_loss,
    make_synthetic_bank,
)


# ----------------------------------------------------------------------------------------------
# Eq. 8: the Local Aggregation loss.
# ----------------------------------------------------------------------------------------------
def la_loss(
    z, bank, idx, cluster_labels, tau=0.07, k_background=4096, neighbours_of="z", add_positive=True
):
    """Local Aggregation, Eq. 8: -log p(C_i ∩ B_i | x, M) / p(B_i | x, M).

    z [B, d] unit rows, bank [N, d] unit rows, idx [B] each image's row, tau > 0.
    B_i: the k_background rows nearest to z (neighbours_of="z", the LA code) or to M[i] ("bank").
    cluster_labels [H, N]: cluster ids from H k-means clusterings of the bank, on its device; C_i
    holds the rows that share i's cluster in at least one clustering.
    add_positive=True: i joins B_i where B_i misses it (i is in C_i), so the ratio is never 0
    and C_i = {i} gives BALL (Theorem 5.4).  False: the LA code's sets; an empty C_i ∩ B_i
    then gets the LA code's -log(1e-7), without gradient.
    Returns the batch mean; every quantity is per image, so a one-row batch gives that image's loss.

    To copy: la_loss, _check, BackgroundLogits
    """
    dt = _check(z, bank, idx, tau)
    if cluster_labels.shape[1:] != bank.shape[:1] or cluster_labels.device != bank.device:
        raise ValueError(f"cluster_labels must be [H, N] on {bank.device}: {cluster_labels!r:.60}")
    q, bank, idx = z.to(dt) / tau, bank.detach().to(dt), idx.to(bank.device)
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        background, b_i = BackgroundLogits.apply(q, bank, idx, k_background, neighbours_of)
    with torch.no_grad():  # C_i ∩ B_i as a [B, k] mask: i's cluster-mates in any clustering
        close = torch.zeros_like(b_i, dtype=torch.bool)
        for labels in cluster_labels:  # [N], one clustering
            close |= labels.expand(len(idx), -1).gather(1, b_i) == labels[idx][:, None]
    add_i = add_positive & ~(b_i == idx[:, None]).any(dim=1)  # i joins B_i where B_i misses it
    positive = (q * bank[idx]).sum(dim=1).masked_fill(~add_i, -math.inf)
    log_b = background.logsumexp(dim=1).logaddexp(positive)  # log p(B_i | x, M) + log Z
    # Eq. 8's ratio p(C_i ∩ B_i | x, M) / p(B_i | x, M): Eq. 6's normalizer Z cancels.
    ratio = ((background - log_b[:, None]).exp() * close).sum(dim=1) + (positive - log_b).exp()
    return -torch.where(ratio > 0, ratio, 1e-7).log().mean()  # empty C_i ∩ B_i: the LA code's


# ----------------------------------------------------------------------------------------------
# Appendix D: H k-means clusterings of the memory bank, with faiss.
# ----------------------------------------------------------------------------------------------
def run_kmeans(
    bank,
    num_clusters,
    num_clusterings=10,
    seed=0,
    niter=20,
    max_points_per_centroid=None,
    verbose=True,
    return_objectives=False,
    clusterings=None,
    threads=None,
):
    """H = num_clusterings k-means clusterings of the bank rows (Appendix D): LongTensor [H, N] on
    the CPU, row h the cluster id in [0, num_clusters) of every row under clustering h.

    bank [N, d] (any device, float).  Clustering h uses seed + h (Appendix D: "different
    initializations"), wherever it runs: `clusterings` picks which of the H to run (rank r of W
    runs h = r, r + W, ...), and the result has one row per entry, in that order.
    L2 k-means on the raw rows, niter iterations, as the LA code.  max_points_per_centroid: faiss
    silently subsamples to 256 points per centroid; None uses every row (ceil(N / K)).
    threads: faiss's CPU threads for this call (default: its setting, which follows
    OMP_NUM_THREADS).  return_objectives: also the final k-means objective of each clustering.
    With a GPU build of faiss the assignment index lives on the GPU; a bank on a GPU clustered by
    faiss-cpu warns once (warn_if_kmeans_on_cpu).
    """
    if not torch.is_tensor(bank) or bank.dim() != 2 or not bank.is_floating_point():
        raise ValueError(
            f"bank must be a 2-D float tensor [N, d], got "
            f"{tuple(bank.shape) if torch.is_tensor(bank) else type(bank).__name__}"
        )
    n, d = bank.shape
    if int(num_clusters) != num_clusters or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an integer in [1, N={n}], got {num_clusters}")
    if int(num_clusterings) != num_clusterings or num_clusterings < 1:
        raise ValueError(f"num_clusterings must be an integer >= 1, got {num_clusterings}")
    which = list(range(num_clusterings)) if clusterings is None else [int(h) for h in clusterings]
    if any(not 0 <= h < num_clusterings for h in which):
        raise ValueError(f"clusterings must lie in [0, {num_clusterings}), got {which}")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads}")
    if int(niter) != niter or niter < 1:
        raise ValueError(f"niter must be an integer >= 1, got {niter}")
    if max_points_per_centroid is None:
        max_points_per_centroid = -(-n // num_clusters)  # ceil(N / K): no subsampling
    elif int(max_points_per_centroid) != max_points_per_centroid or max_points_per_centroid < 1:
        raise ValueError(
            f"max_points_per_centroid must be None or an integer >= 1, "
            f"got {max_points_per_centroid}"
        )

    try:
        import faiss
    except ImportError:
        raise ImportError(
            "run_kmeans needs faiss: pip install faiss-cpu (or a GPU build of faiss, see the "
            "README); la_loss itself does not"
        ) from None
    warn_if_kmeans_on_cpu(bank.device, n, int(num_clusters), int(num_clusterings), int(niter), d)
    # faiss wants a C-contiguous float32 numpy array on the CPU (one N x d copy).
    x = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
    use_gpu = faiss_has_gpu()
    gpu_device = bank.device.index if (bank.is_cuda and bank.device.index is not None) else 0

    labels = torch.empty(len(which), n, dtype=torch.long)
    objectives = []
    start = time.perf_counter()
    threads_before = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(int(threads))
    for row, h in enumerate(which):
        kmeans = faiss.Kmeans(
            d,
            int(num_clusters),
            niter=int(niter),
            seed=int(seed) + h,
            max_points_per_centroid=int(max_points_per_centroid),
            verbose=False,
        )
        if use_gpu:
            config = faiss.GpuIndexFlatConfig()
            config.device = gpu_device
            config.useFloat16 = False  # exact distances, as the LA code
            kmeans.index = faiss.GpuIndexFlatL2(faiss_gpu_resources(gpu_device), d, config)
        kmeans.train(x)
        objective = float(kmeans.obj[-1])  # Kmeans.obj: the objective after each iteration
        objectives.append(objective)
        _, assignment = kmeans.assign(x)  # nearest final centroid of every row
        labels[row] = torch.from_numpy(assignment.astype(np.int64))
        if verbose:
            elapsed = time.perf_counter() - start
            left = elapsed / (row + 1) * (len(which) - row - 1)
            print(
                f"k-means {row + 1}/{len(which)} (h = {h}): N={n} K={num_clusters} "
                f"seed={int(seed) + h} objective {kmeans.obj[0]:.4g} -> {objective:.4g} in "
                f"{len(kmeans.obj)} iterations, "
                f"{elapsed / (row + 1):.2f} s/clustering, ~{left:.1f} s left "
                f"({'GPU' if use_gpu else 'CPU'} faiss, {faiss.omp_get_max_threads()} threads)",
                flush=True,
            )
    faiss.omp_set_num_threads(threads_before)
    if return_objectives:
        return labels, objectives
    return labels


def faiss_has_gpu():
    """True if faiss has GPU support and sees a GPU (False for faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# One faiss.StandardGpuResources per GPU, made once and reused by every clustering: each one
# reserves its own scratch memory beside PyTorch's allocator (call .setTempMemory(bytes) on it
# before clustering to give faiss less).
_FAISS_GPU_RESOURCES = {}


def faiss_gpu_resources(device=0):
    """The single faiss.StandardGpuResources of GPU `device` (created on first use)."""
    import faiss

    if device not in _FAISS_GPU_RESOURCES:
        _FAISS_GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _FAISS_GPU_RESOURCES[device]


# A bank on a GPU with faiss-cpu installed would be clustered on the CPU: at Appendix D's size,
# 2 N K d niter H = 2e15 flops per epoch.  Nothing falls back silently: the first such call warns.
_WARNED_KMEANS_ON_CPU = False


def kmeans_on_cpu_message(num_points, num_clusters, num_clusterings, niter=20, dim=128):
    """The one-line warning for k-means that runs on the CPU beside a GPU bank."""
    flops = 2.0 * num_points * num_clusters * dim * niter * num_clusterings
    return (
        f"k-means on the CPU: the bank is on the GPU but this faiss build has no GPU support, so "
        f"{num_clusterings} clustering(s) of N={num_points:,} rows into {num_clusters:,} clusters "
        f"({flops:.2g} flops) will run on the CPU each time; install a GPU build of faiss in "
        f"place of faiss-cpu (README, 'On a GPU': pip uninstall -y faiss-cpu && "
        f"pip install faiss-gpu)"
    )


def warn_if_kmeans_on_cpu(device, num_points, num_clusters, num_clusterings, niter=20, dim=128):
    """Warn once per process when a bank on `device` (a GPU) would be clustered on the CPU because
    faiss has no GPU.  Returns True if it warned now."""
    global _WARNED_KMEANS_ON_CPU
    if torch.device(device).type == "cpu" or faiss_has_gpu() or _WARNED_KMEANS_ON_CPU:
        return False
    _WARNED_KMEANS_ON_CPU = True
    message = kmeans_on_cpu_message(num_points, num_clusters, num_clusterings, niter, dim)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return True


# ----------------------------------------------------------------------------------------------
# Demo: k-means on a synthetic clustered bank, C_i, and the losses side by side.
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Local Aggregation (Sec. 5.3, Eq. 8, Appendix D) on a synthetic clustered "
        "memory bank: H k-means clusterings give the close sets C_i; IR (Eq. 6), BALL (Def. 5.2), "
        "ANN (Def. 5.3) and LA "
        "(Eq. 8) side by side, with the checks of Theorem 5.4 and Corollary 5.4.1."
    )
    parser.add_argument(
        "--num-items", type=int, default=8000, help="N, images = memory bank entries"
    )
    parser.add_argument("--dim", type=int, default=32, help="d, embedding size (Appendix D: 128)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=40,
        help="hidden classes the synthetic bank is drawn around (ImageNet: 1000)",
    )
    parser.add_argument(
        "--spread", type=float, default=1.0, help="spread of each class around its centre"
    )
    parser.add_argument(
        "--num-clusters",
        type=int,
        default=160,
        help="k-means clusters per clustering (Appendix D: 30,000 for 1.28M images, "
        "more clusters than classes)",
    )
    parser.add_argument(
        "--num-clusterings",
        type=int,
        default=10,
        help="H, k-means runs with seeds seed+h (Appendix D: 10)",
    )
    parser.add_argument(
        "--k-background",
        type=int,
        default=1024,
        help="|B_i|, background neighbours (Appendix D: 4096 of 1.28M)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="B, images per step (Appendix D: 256)"
    )
    parser.add_argument(
        "--tau", type=float, default=0.07, help="temperature of Eq. 6 (Appendix D: 0.07)"
    )
    parser.add_argument(
        "--view-noise",
        type=float,
        default=0.5,
        help="how far today's view z lies from the stored entry M[i]",
    )
    parser.add_argument(
        "--neighbours-of",
        choices=["z", "bank"],
        default="z",
        help='anchor of B_i: "z", the current embedding (LA code), or "bank", M[i] (paper)',
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data and of the first clustering"
    )
    args = parser.parse_args(argv)
    if args.num_items < 2 or args.dim < 1 or args.num_classes < 1:
        parser.error("need --num-items >= 2, --dim >= 1, --num-classes >= 1")
    if not 1 <= args.num_clusters <= args.num_items:
        parser.error(f"--num-clusters must lie in [1, --num-items] = [1, {args.num_items}]")
    if not 1 <= args.k_background <= args.num_items:
        parser.error(f"--k-background must lie in [1, --num-items] = [1, {args.num_items}]")
    if not 1 <= args.batch_size <= args.num_items:
        parser.error(f"--batch-size must lie in [1, --num-items] = [1, {args.num_items}]")
    if args.num_clusterings < 1 or args.tau <= 0:
        parser.error("need --num-clusterings >= 1 and --tau > 0")

    generator = torch.Generator().manual_seed(args.seed)
    bank, classes = make_synthetic_bank(
        args.num_items, args.dim, args.num_classes, args.spread, generator
    )
    idx = torch.randperm(args.num_items, generator=generator)[: args.batch_size]
    noise = (
        args.view_noise
        * torch.randn(args.batch_size, args.dim, generator=generator)
        / math.sqrt(args.dim)
    )
    z = F.normalize(bank[idx] + noise, dim=1)  # today's view of image i, near M[i]
    n, k, b = args.num_items, args.k_background, args.batch_size
    print(
        f"synthetic bank: N={n} unit vectors in d={args.dim} around {args.num_classes} hidden "
        f"classes; "
        f"B={b}, tau={args.tau}, |B_i|={k} around {args.neighbours_of!r}\n"
    )

    # -- Appendix D: H clusterings with different seeds.  They are tiny: one faiss thread, so
    #    faiss's OpenMP pool does not spin against torch's.
    labels, objectives = run_kmeans(
        bank,
        args.num_clusters,
        args.num_clusterings,
        seed=args.seed,
        return_objectives=True,
        threads=1,
    )

    # -- C_i for the batch (a dense [B, N] mask is fine in a demo, not in the loss).
    same = torch.zeros(b, n, dtype=torch.bool)
    for h, labels_h in enumerate(labels):
        same |= labels_h[idx].unsqueeze(1) == labels_h.unsqueeze(0)
        if h == 0:
            first = same.clone()
    background = (
        (z @ bank.T).topk(k, dim=1).indices
        if args.neighbours_of == "z"
        else (bank[idx] @ bank.T).topk(k, dim=1).indices
    )
    in_both = same.gather(1, background)
    purity = ((classes.unsqueeze(0) == classes[idx].unsqueeze(1)) & same).sum(1) / same.sum(1)
    print("\nclose sets C_i over the batch (mean [min, max]):")
    for name, values in (
        ("|C_i|, 1 clustering", first.sum(1)),
        (f"|C_i|, union of H={len(labels)}", same.sum(1)),
        ("|C_i ∩ B_i|", in_both.sum(1)),
        ("share of C_i in i's hidden class", purity),
    ):
        values = values.float()
        print(f"  {name:34s} {values.mean():8.2f}  [{values.min():.2f}, {values.max():.2f}]")

    # -- The losses side by side (all minimised; L = -loss is the paper's objective).
    singletons = torch.arange(n).unsqueeze(0)
    close_set = torch.full((b, int(same.sum(1).max())), -1, dtype=torch.long)  # C_i padded with -1
    for row in range(b):
        members = torch.nonzero(same[row]).flatten()
        close_set[row, : len(members)] = members
    anchor = args.neighbours_of
    rows = [
        ("IR (Eq. 6)", "{i}", "all N entries", ir_loss(z, bank, idx, args.tau)),
        (
            "BALL (Def. 5.2)",
            "{i}",
            "B_i",
            ball_loss(z, bank, idx, args.tau, k, neighbours_of=anchor),
        ),
        (
            "ANN (Def. 5.3)",
            "{i}",
            "B_i \\ C_i, plus i",
            ann_loss(z, bank, idx, args.tau, k, k_close=close_set, neighbours_of=anchor),
        ),
        (
            "LA-SIMPLE (Thm. 5.4)",
            "C_i ∩ B_i, C_i = {i}",
            "B_i",
            la_loss(z, bank, idx, singletons, args.tau, k, neighbours_of=anchor),
        ),
        (
            "LA (Eq. 8), H = 1",
            "C_i ∩ B_i, 1 clustering",
            "B_i",
            la_loss(z, bank, idx, labels[:1], args.tau, k, neighbours_of=anchor),
        ),
        (
            f"LA (Eq. 8), H = {len(labels)}",
            f"C_i ∩ B_i, {len(labels)} clusterings",
            "B_i",
            la_loss(z, bank, idx, labels, args.tau, k, neighbours_of=anchor),
        ),
    ]
    print("\n| loss (minimised; -L) | numerator set | denominator set | value |\n|---|---|---|---|")
    for name, numerator, denominator, value in rows:
        print(f"| {name} | {numerator} | {denominator} | {float(value):.4f} |")
    print("(B_i includes i itself wherever it is not among the nearest; ANN uses the k-means C_i.)")

    # -- Theorem 5.4 and Corollary 5.4.1, computed.
    ball = ball_loss(z.double(), bank.double(), idx, args.tau, k, neighbours_of=anchor)
    simple = la_loss(z.double(), bank.double(), idx, singletons, args.tau, k, neighbours_of=anchor)
    print(f"\nTheorem 5.4: LA with C_i = {{i}} minus BALL (float64) = {float(simple - ball):.2e}")

    def objective_per_image(close_labels):  # L = -la_loss of each image alone, [B]
        rows = range(len(idx))
        return torch.stack(
            [-la_loss(z[[r]], bank, idx[[r]], close_labels, args.tau, k, anchor) for r in rows]
        ).double()

    per_la, per_simple = objective_per_image(labels), objective_per_image(singletons)
    size = in_both.sum(1).double() + (~(background == idx.unsqueeze(1)).any(1)).double()
    print(
        f"Corollary 5.4.1, per image (L = objective):\n"
        f"  L^LA >= L^LA-SIMPLE (holds always, since i is in C_i ∩ B_i):  "
        f"{int((per_la >= per_simple - 1e-6).sum())}/{b} images\n"
        f"  L^LA <= L^LA-SIMPLE (the proof's literal claim):               "
        f"{int((per_la <= per_simple + 1e-6).sum())}/{b} images (only where C_i ∩ B_i = {{i}})\n"
        f"  L^LA - log|C_i ∩ B_i| <= L^LA-SIMPLE (the proof's mean form):  "
        f"{int((per_la - size.log() <= per_simple + 1e-6).sum())}/{b} images "
        f"(holds iff p(i|x) >= the mean p(k|x) over C_i ∩ B_i)"
    )


if __name__ == "__main__":
    main()
