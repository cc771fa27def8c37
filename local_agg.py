"""Local Aggregation (LA): k-means close neighbours and the Eq. 8 loss.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 5.3 (Eq. 6-8, Definition 5.2,
Theorem 5.4, Corollary 5.4.1) and Appendix D.  LA itself is Zhuang, Zhai and
Yamins (2019), reference [26] of the paper.

    L^LA(x_i, M) = log p(C_i ∩ B_i | x_i, M) / p(B_i | x_i, M)          (Eq. 8)
    p(I | x, M)  = sum_{j in I} p(j | x, M),   p(j | x, M) from Eq. 6

B_i, the *background* set: the k_background bank entries closest (cosine) to
the current embedding (the paper says: closest to M[i]; see `neighbours_of`).
C_i, the *close* set: every bank entry that shares i's cluster in at least one
of H k-means clusterings of the bank (Appendix D: H = 10 runs with different
seeds, 30,000 clusters each, on ImageNet's 1,281,167 images).

What is in this file, top to bottom:
  run_kmeans(bank, num_clusters, num_clusterings=10, seed=0) -> [H, N] labels
  la_loss(z, bank, idx, cluster_labels, tau=0.07, k_background=4096) -> loss
  main(): `python local_agg.py` clusters a synthetic bank and prints IR, BALL,
          ANN and LA side by side.

Every loss here is MINIMISED: la_loss = -mean_i L^LA(x_i, M).

How this matches the published LA code (read for facts, not copied)
--------------------------------------------------------------------
The authors' TensorFlow code (neuroailab/LocalAggregation) and PyTorch port
(neuroailab/LocalAggregation-Pytorch) compute, for each image of the batch:
  * all dot products z @ M^T of the *current* embedding z with the bank, and
    B_i = the k = 4096 largest of them (top_k, unsorted).  The image's own
    entry i is NOT added if it is not among them;
  * p(j | x) = exp(z . M[j] / tau) / Z with a FIXED constant
    Z = 2876934.2 / 1281167 * N instead of the true partition sum; Z cancels
    exactly in the ratio of Eq. 8, so it never changes the loss value here;
  * the numerator sums p(j | x) over the background entries j whose cluster
    label equals i's label in ANY of the H clusterings (a logical OR over
    clusterings of per-clustering equality masks, each [B, k]);
  * loss = -mean log(ratio + 1e-7).
This file computes the same ratio in log space (masked logsumexp), without
the 1e-7: the two differ by log(1 + 1e-7 / ratio) <= 1e-7 / ratio, which is
below 4.1e-4 whenever ratio >= 1/4096 (C_i ∩ B_i holding at least an average
background entry's share).  The one real difference is the `include_positive`
choice below, which only matters when the image's own entry is not among z's
k_background nearest entries.  (A curiosity that Theorem 5.4 explains: the TF
code initialises every clustering to labels = arange(N), i.e. C_i = {i}, so
until its first k-means LA trains exactly as BALL.)
"""

import argparse
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# faiss is imported inside the functions that cluster (run_kmeans and its GPU helpers), so
# `from local_agg import la_loss` works where faiss is not installed.
from instance_disc import (
    BackgroundLogits,
    _check_inputs,
    ann_loss,
    ball_loss,
    ir_loss,
    make_synthetic_bank,
)

# ---------------------------------------------------------------------------
# Appendix D: H k-means clusterings of the memory bank, with faiss.
# ---------------------------------------------------------------------------
# faiss on a GPU allocates its own memory beside PyTorch's caching allocator
# (torch.cuda.memory_allocated() does not see it).  A faiss.StandardGpuResources
# object, on first use on a device, reserves
#   * a temporary-memory stack of 1.5 GiB on GPUs with more than 8 GiB of
#     memory (1 GiB on <= 8 GiB GPUs, 512 MiB on <= 4 GiB GPUs),
#   * 256 MiB of pinned host memory for CPU <-> GPU copies,
#   * streams and a cuBLAS handle,
# and keeps them until it is destroyed.  Creating a new one per clustering (as
# the LA PyTorch code does in its run_kmeans, and as faiss.Kmeans(gpu=True)
# does through index_cpu_to_all_gpus) repeats that reservation and its set-up
# time every call.  We create ONE per device, the first time it is needed, and
# reuse it for every clustering of every epoch.  To give faiss less memory,
# call faiss_gpu_resources(device).setTempMemory(num_bytes) before clustering.
# The index itself holds only the centroids: num_clusters * d * 4 bytes
# (30,000 x 128 floats = 15 MiB for the ImageNet setting).
_FAISS_GPU_RESOURCES = {}


def faiss_gpu_resources(device=0):
    """The single faiss.StandardGpuResources of GPU `device` (created once)."""
    import faiss

    if device not in _FAISS_GPU_RESOURCES:
        _FAISS_GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _FAISS_GPU_RESOURCES[device]


def faiss_has_gpu():
    """True if faiss is installed with GPU support and sees a GPU; False for faiss-cpu or no faiss."""
    try:
        import faiss
    except ImportError:
        return False
    # faiss-cpu builds have neither GPU classes nor GPUs; get_num_gpus() is 0.
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# A GPU user who installed requirements.txt has faiss-cpu: the bank lives on
# the GPU, but k-means would run on the CPU.  At Appendix D's size (10
# clusterings of 1,281,167 rows into 30,000 clusters, 20 iterations) that is
# 2 * N * K * d * iterations * H = 1.97e15 flops of distance computations per
# epoch, tens of minutes even on 16 cores.  Nothing falls back silently: the
# first such call warns, naming the job and the fix.
_WARNED_KMEANS_ON_CPU = False


def kmeans_on_cpu_message(num_points, num_clusters, num_clusterings, niter=20, dim=128):
    """The one-line warning for k-means that runs on the CPU beside a GPU bank."""
    flops = 2.0 * num_points * num_clusters * dim * niter * num_clusterings
    return (
        f"k-means on the CPU: the bank is on the GPU but this faiss build has no GPU support, so "
        f"{num_clusterings} clustering(s) of N={num_points:,} rows into {num_clusters:,} clusters "
        f"({flops:.2g} flops) will run on the CPU each time; install a GPU build of faiss in place of "
        f"faiss-cpu (README, 'On a GPU': pip uninstall -y faiss-cpu && pip install faiss-gpu)"
    )


def warn_if_kmeans_on_cpu(device, num_points, num_clusters, num_clusterings, niter=20, dim=128):
    """Warn once per process when a bank on `device` (a GPU) would be clustered
    on the CPU because faiss has no GPU.  Returns True if it warned now."""
    global _WARNED_KMEANS_ON_CPU
    if torch.device(device).type == "cpu" or faiss_has_gpu() or _WARNED_KMEANS_ON_CPU:
        return False
    _WARNED_KMEANS_ON_CPU = True
    warnings.warn(
        kmeans_on_cpu_message(num_points, num_clusters, num_clusterings, niter, dim),
        RuntimeWarning,
        stacklevel=3,
    )
    return True


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
    """H = num_clusterings k-means clusterings of the bank rows (Appendix D).

    bank: [N, d] tensor (any device/float dtype; e.g. MemoryBank.vectors).
    Returns a LongTensor [H, N] on the CPU: row h holds the cluster id in
    [0, num_clusters) of every bank entry under clustering h.
    clusterings: which of the H clusterings to run (default: all); the result
    then has one row per entry, in that order.  Clustering h always uses seed
    + h, so spreading the H clusterings over several processes (rank r runs
    h = r, r + W, ...) gives the same labels as one process running all H.
    threads: faiss's CPU threads for this call (default: faiss's setting,
    which follows OMP_NUM_THREADS; torchrun sets that to 1).  With
    return_objectives=True, also a list of H floats: faiss's k-means objective
    (sum over points of the squared L2 distance to the assigned centroid) at
    its last iteration, read from `Kmeans.obj` (see below).

    Choices, and why:
      * seed + h for clustering h: Appendix D uses "10 kNN with different
        initializations" (the LA code: seed 1234 + h).  Same seed, same labels.
      * L2 k-means on the raw rows, not spherical k-means, niter = 20: as the
        LA code does.  (For unit rows, L2 and cosine assignment differ only
        through the centroids' norms.)
      * max_points_per_centroid: faiss SUBSAMPLES the training set to
        256 * num_clusters points by default, silently: with 30,000 clusters
        that is 7.68M >= 1.28M, so ImageNet's setting is NOT subsampled, but
        with 1,000 clusters on 1.28M points only 256k points would be used to
        fit the centroids (subsampling starts once N > 256 * num_clusters).  None (default)
        sets it to ceil(N / num_clusters), so every row is used (the LA code
        uses 10,000,000 for the same purpose).  Pass a number to subsample on
        purpose.  All N rows are assigned to the final centroids either way.
      * faiss also warns when N < 39 * num_clusters (min_points_per_centroid);
        ImageNet with 30,000 clusters has 42.7 points per centroid.
      * GPU: when faiss reports GPUs, the assignment index lives on the GPU,
        built on the one StandardGpuResources per device (see above).
        Otherwise the CPU index (IndexFlatL2) is used; a bank on a GPU then
        triggers one RuntimeWarning per process (warn_if_kmeans_on_cpu).
      * CPU threads: faiss and torch each run an OpenMP thread pool whose idle
        threads spin.  On a busy machine the two pools fight: `python
        local_agg.py` (10 clusterings of 8000 x 32 points) took 5-17 s there,
        0.3 s with OMP_WAIT_POLICY=PASSIVE set in the environment before
        Python starts, 1.4 s with faiss.omp_set_num_threads(1).
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
        # faiss >= 1.7 keeps the per-iteration objective as the numpy array
        # `Kmeans.obj` (and more detail in `Kmeans.iteration_stats`, a list of
        # dicts with 'obj', 'time', 'imbalance_factor', ...).  The C++
        # `Clustering.obj` vector that older code (the LA PyTorch code among
        # it) read is gone: in faiss 1.15 Clustering has only iteration_stats.
        objective = float(kmeans.obj[-1])
        objectives.append(objective)
        _, assignment = kmeans.assign(x)  # nearest final centroid of every row
        labels[row] = torch.from_numpy(assignment.astype(np.int64))
        if verbose:
            elapsed = time.perf_counter() - start
            left = elapsed / (row + 1) * (len(which) - row - 1)
            print(
                f"k-means {row + 1}/{len(which)} (h = {h}): N={n} K={num_clusters} seed={int(seed) + h} "
                f"objective {kmeans.obj[0]:.4g} -> {objective:.4g} in {len(kmeans.obj)} iterations, "
                f"{elapsed / (row + 1):.2f} s/clustering, ~{left:.1f} s left "
                f"({'GPU' if use_gpu else 'CPU'} faiss, {faiss.omp_get_max_threads()} threads)",
                flush=True,
            )
    faiss.omp_set_num_threads(threads_before)
    if return_objectives:
        return labels, objectives
    return labels


# ---------------------------------------------------------------------------
# Eq. 8: the Local Aggregation loss.
# ---------------------------------------------------------------------------
def la_loss(
    z,
    bank,
    idx,
    cluster_labels,
    tau=0.07,
    k_background=4096,
    neighbours_of="z",
    include_positive=True,
    reduction="mean",
):
    """Local Aggregation loss, -log p(C_i ∩ B_i | x_i, M) / p(B_i | x_i, M) (Eq. 8).

    z               [B, d] L2-normalized embeddings of one view of each image.
    bank            [N, d] memory bank (e.g. MemoryBank.vectors), unit rows.
    idx             [B] integer tensor, each image's index into the bank, in [0, N).
    cluster_labels  [H, N] integer tensor from run_kmeans (on the bank's device):
                    C_i = {j : labels[h, j] == labels[h, i] for some h}.
                    Any integer dtype; ids are only compared for equality.
    tau             temperature of Eq. 6 (Appendix D: 0.07).
    k_background    |B_i| (Appendix D: 4096).
    neighbours_of   "z" (default): B_i = the k_background entries nearest to z,
                    as the LA code does.  "bank": nearest to M[i], the paper's
                    wording in Sec. 5.3.  They differ because M[i] averages
                    older views (Eq. 9) while z is today's view; "bank" costs a
                    second [B, N] matmul.
    include_positive
                    True (default): B_i also contains i itself when i is not
                    among the k_background nearest (the same convention as
                    instance_disc.ball_loss).  Eq. 8 defines p(I | x) for sets
                    I containing i, and Theorem 5.4 (C_i = {i} gives BALL)
                    needs i in B_i; it also keeps C_i ∩ B_i non-empty, so the
                    loss is always finite.  When i IS among the nearest, the
                    normal case once z resembles M[i], it changes nothing.
                    False: exactly the LA code's sets; a row whose C_i ∩ B_i is
                    empty then gets the LA code's value -log(1e-7) = 16.12, a
                    constant with no gradient.
    reduction       "mean" -> scalar; "none" -> [B] per-image losses.

    The ratio is a logsumexp over the masked numerator minus a logsumexp over
    B_i: no epsilon inside a log, no exp().  Memory: the [B, N] similarities
    (freed right after the top-k) plus a few [B, k_background] tensors; no
    [B, N] mask.  Gradients flow to z only.  Checks and precision: as for
    instance_disc's losses (its module docstring); cluster_labels is checked
    for shape, dtype and device only.

    To copy: la_loss, _check_inputs, BackgroundLogits
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    if (
        isinstance(k_background, bool)
        or k_background != int(k_background)
        or not 1 <= k_background <= len(bank)
    ):
        raise ValueError(
            f"k_background must be an integer in [1, {len(bank)}], got {k_background!r}"
        )
    if neighbours_of not in ("z", "bank"):
        raise ValueError(
            f"neighbours_of must be 'z' (LA code) or 'bank' (paper), got {neighbours_of!r}"
        )
    if not (
        torch.is_tensor(cluster_labels)
        and cluster_labels.dim() == 2
        and len(cluster_labels) >= 1
        and cluster_labels.shape[1] == len(bank)
        and not cluster_labels.is_floating_point()
        and cluster_labels.dtype != torch.bool
    ):
        raise ValueError(
            f"cluster_labels must be an integer tensor [H, N] with H >= 1 and N={len(bank)} (run_kmeans "
            f"output), got {getattr(cluster_labels, 'shape', type(cluster_labels).__name__)}"
        )
    if cluster_labels.device != bank.device:
        raise ValueError(
            f"cluster_labels must be on the bank's device {bank.device}, got {cluster_labels.device}: "
            f"move them once per clustering, e.g. labels.to(bank.device)"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        q = z / tau
        anchor = None if neighbours_of == "z" else bank[idx]
        background, neighbours = BackgroundLogits.apply(
            q, bank, int(k_background), anchor
        )  # B_i, z^T M[k] / tau
        with (
            torch.no_grad()
        ):  # C_i ∩ B_i: members of B_i in one of i's clusters, in any of the H clusterings
            close = torch.zeros_like(neighbours, dtype=torch.bool)
            for labels in (
                cluster_labels
            ):  # [N]: one clustering's cluster ids; gather: each row's B_i members' ids
                close |= labels.expand(len(idx), -1).gather(1, neighbours) == labels[idx].unsqueeze(
                    1
                )
        # Eq. 8 in log space.  Eq. 6's partition sum over all N (or the LA code's fixed Z)
        # divides numerator and denominator alike and cancels, so it is never computed.
        log_background = torch.logsumexp(background, dim=1)  # log p(B_i) + log Z
        log_close = torch.logsumexp(
            background.masked_fill(~close, -math.inf), dim=1
        )  # log p(C_i ∩ B_i) + log Z
        if (
            include_positive
        ):  # where B_i misses i, add i's term to both (it is in C_i); logaddexp(a, -inf) = a
            positive = (
                (q * bank[idx])
                .sum(dim=1)
                .masked_fill((neighbours == idx[:, None]).any(dim=1), -math.inf)
            )
            log_background = torch.logaddexp(log_background, positive)
            log_close = torch.logaddexp(log_close, positive)
        per_image = log_background - log_close  # -L^LA(x_i), >= 0
        if not include_positive:  # an empty C_i ∩ B_i: the LA code's -log(0 + 1e-7), no gradient
            per_image = torch.where(
                close.any(dim=1), per_image, torch.full_like(per_image, -math.log(1e-7))
            )
        return per_image.mean() if reduction == "mean" else per_image


# ---------------------------------------------------------------------------
# Demo: k-means on a synthetic clustered bank, C_i, and the losses side by side.
# ---------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Local Aggregation (Sec. 5.3, Eq. 8, Appendix D) on a synthetic clustered memory bank: "
        "H k-means clusterings give the close sets C_i; IR (Eq. 6), BALL (Def. 5.2), ANN (Def. 5.3) and LA "
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
        f"synthetic bank: N={n} unit vectors in d={args.dim} around {args.num_classes} hidden classes; "
        f"B={b}, tau={args.tau}, |B_i|={k} around {args.neighbours_of!r}\n"
    )

    # -- Appendix D: H clusterings with different seeds.  These are tiny, so
    #    one faiss thread is fastest (see the CPU-threads note in run_kmeans).
    import faiss

    faiss.omp_set_num_threads(1)
    labels, objectives = run_kmeans(
        bank, args.num_clusters, args.num_clusterings, seed=args.seed, return_objectives=True
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
            ann_loss(z, bank, idx, args.tau, k, close_set=close_set, neighbours_of=anchor),
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
    per_la = -la_loss(
        z, bank, idx, labels, args.tau, k, neighbours_of=anchor, reduction="none"
    ).double()
    per_simple = -la_loss(
        z, bank, idx, singletons, args.tau, k, neighbours_of=anchor, reduction="none"
    ).double()
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
