"""Speed and memory of the Section 5.3 losses at (part of) ImageNet scale.

    python tests/bench_losses.py --threads 1           # N in {10k, 100k}, ~1.5 min
    python tests/bench_losses.py --sizes 10000 --skip-kmeans

Timing: each loss step is paired with a floor call made right next to it
(same machine load), and both wall time and process CPU time are reported.
With --threads 1 on a shared machine, read the CPU time: it counts work done,
not time spent waiting for a core.

A benchmark, not a test (its name does not start with test_): it prints
figures and asserts nothing.

One *training step* of a loss = z = normalize(raw) -> loss forward ->
backward to raw -> MemoryBank.update(idx, z, alpha=0.5) (Eq. 7), with the
ImageNet shapes of Appendix D: B = 256, d = 128, |B_i| = k_background = 4096,
H = 10 clusterings, and about N / 42.7 clusters per clustering (ImageNet:
30,000 clusters for 1,281,167 images).  Bank size N varies.

The *work floor* is what any loss that looks at every bank entry and picks
B_i must do: one z @ bank.T matmul plus one top-k (unsorted) of each row.
Target: every loss within 1.2x of it.  (IR and IR-NCE need no top-k, so
their ratio can be below 1.)

Pieces: the CPU time of the parts a step is made of (the matmul, the top-k,
the embedding_bag backward over the B*k chosen rows, ANN's second top-k, LA's
label gathers), so the x-floor ratios can be read as sums of them.  One more
piece is what plain autograd through the top-k would do instead of
instance_disc.BackgroundLogits: scatter the [B, k] gradient into a dense
[B, N] zero tensor and multiply it by the whole bank.

Memory: from the torch profiler's allocation events (profile_memory=True),
the peak that torch allocates during one step, and the peak of everything
except the [B, N] fp32 similarities (one live [B, N] block is subtracted
wherever one is live), in units of one [B, k_background] fp32 tensor.  The
target for LA: at most H of them.

faiss k-means: one clustering of N = 100k rows (d = 128) into 1,000 clusters,
20 iterations, every row used (no subsampling), as run_kmeans does.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instance_disc import ann_loss, ball_loss, ir_loss, ir_nce_loss  # noqa: E402
from local_agg import faiss_has_gpu, la_loss, run_kmeans  # noqa: E402
from memory_bank import MemoryBank  # noqa: E402

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument(
    "--sizes",
    type=int,
    nargs="+",
    default=[10_000, 100_000],
    help="bank sizes N to measure (ImageNet: 1,281,167)",
)
parser.add_argument(
    "--batch-size", type=int, default=256, help="B, images per step (Appendix D: 256)"
)
parser.add_argument("--dim", type=int, default=128, help="d, embedding size (Appendix D: 128)")
parser.add_argument("--k-background", type=int, default=4096, help="|B_i| (Appendix D: 4096)")
parser.add_argument("--num-negatives", type=int, default=4096, help="IR-NCE's sampled negatives")
parser.add_argument(
    "--clusterings", type=int, default=10, help="H, k-means runs for LA's C_i (Appendix D: 10)"
)
parser.add_argument(
    "--repeats", type=int, default=5, help="timed steps per loss (the median is reported)"
)
parser.add_argument("--tau", type=float, default=0.07, help="temperature (Appendix D: 0.07)")
parser.add_argument(
    "--alpha", type=float, default=0.5, help="bank update rate of Eq. 7 (Appendix D: 0.5)"
)
parser.add_argument(
    "--kmeans-n", type=int, default=100_000, help="rows for the faiss k-means timing"
)
parser.add_argument(
    "--kmeans-k", type=int, default=1000, help="clusters for the faiss k-means timing"
)
parser.add_argument("--skip-kmeans", action="store_true", help="do not time faiss k-means")
parser.add_argument("--skip-memory", action="store_true", help="do not profile memory")
parser.add_argument(
    "--skip-parts",
    action="store_true",
    help="do not time the pieces (matmul, top-k, B_i backward, ANN's second top-k) separately",
)
parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="torch (and faiss) CPU threads; default: torch's default. On a shared machine "
    "1 thread gives steadier figures (busy OpenMP pools stall on every small op)",
)


def clock(fn):
    """(wall seconds, CPU seconds of this process) for one call of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_ms(floor_fn, step_fn, repeats):
    """Alternate floor and step calls so both see the same machine load; return
    medians in ms: (floor wall, floor cpu, step wall, step cpu)."""
    floor_fn(), step_fn()  # warm-up: allocator, thread pools
    samples = [clock(floor_fn) + clock(step_fn) for _ in range(repeats)]
    return tuple(1e3 * statistics.median(column) for column in zip(*samples, strict=True))


def peak_allocated_bytes(fn, similarities_bytes):
    """(peak, peak beyond the similarities) of torch's CPU allocations during fn().

    From the profiler's '[memory]' events, in time order: 'Total Allocated'
    is the running total, 'Bytes' the signed size, 'Addr' the block.  The
    second figure subtracts one live [B, N] block (the similarities) from
    the running total wherever one is live, so it is the peak of everything
    ELSE, whether it coincides with the similarities or comes after them."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    if not events:
        return 0, 0
    events.sort(key=lambda e: e["ts"])
    baseline = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    live_similarity_blocks = set()
    peak = peak_beyond = 0
    for e in events:
        a = e["args"]
        if abs(a["Bytes"]) == similarities_bytes:
            (live_similarity_blocks.add if a["Bytes"] > 0 else live_similarity_blocks.discard)(
                a["Addr"]
            )
        total = a["Total Allocated"] - baseline
        peak = max(peak, total)
        peak_beyond = max(
            peak_beyond, total - similarities_bytes * min(1, len(live_similarity_blocks))
        )
    return peak, peak_beyond


def parts_ms(bank_vectors, raw, idx, labels, tau, k, k_close, repeats):
    """CPU ms (median) of the pieces a step is made of, so the x-floor ratios
    can be read as sums: the floor is the first two; every B_i loss adds the
    embedding_bag backward over its B*k chosen rows (instance_disc.
    BackgroundLogits); ANN adds a top-k of k_close out of the [B, k] slice; LA
    adds the label gathers, timed as la_loss's forward with all H clusterings
    minus with the first one only (the real code, H-1 clusterings' worth).
    The dense backward is what autograd through the top-k would cost instead
    of the embedding_bag."""
    z = F.normalize(raw.detach(), dim=1)
    with torch.no_grad():
        q = raw.detach()
        similarities = q @ bank_vectors.T
        values, neighbours = similarities.topk(k, dim=1, sorted=False)
        weights = torch.randn_like(values)
        pieces = {
            "z @ bank.T": lambda: q @ bank_vectors.T,
            "top-k (unsorted) of [B, N]": lambda: similarities.topk(k, dim=1, sorted=False),
            "top-k (sorted) of [B, N]": lambda: similarities.topk(k, dim=1, sorted=True),
            "B_i backward: embedding_bag over B*k rows": lambda: F.embedding_bag(
                neighbours, bank_vectors, per_sample_weights=weights, mode="sum"
            ),
            "B_i backward by plain autograd: dense [B, N] gradient @ bank": lambda: (
                torch.zeros_like(similarities).scatter_(1, neighbours, weights) @ bank_vectors
            ),
            f"ANN's C_i: top-{k_close} of [B, k]": lambda: values.topk(
                k_close, dim=1, sorted=False
            ),
        }
        out = {}
        for name, fn in pieces.items():
            fn()
            out[name] = 1e3 * statistics.median(clock(fn)[1] for _ in range(repeats))
        all_h, first_only = (
            (lambda: la_loss(z, bank_vectors, idx, labels, tau, k)),
            (lambda: la_loss(z, bank_vectors, idx, labels[:1], tau, k)),
        )
        all_h(), first_only()
        differences = [
            clock(all_h)[1] - clock(first_only)[1] for _ in range(2 * repeats)
        ]  # paired, like the steps
        out[
            f"LA's C_i: labels of {labels.shape[0] - 1} more clusterings "
            f"(la_loss H={labels.shape[0]} - H=1)"
        ] = 1e3 * statistics.median(differences)
    return out


def measure(n, args, rows, memory_rows, part_rows):
    """Steps, pieces and memory of every loss at bank size n, added to the three tables."""
    b, d, k, h = args.batch_size, args.dim, args.k_background, args.clusterings
    bank = MemoryBank(n, d, seed=0)
    num_clusters = max(2, round(n * 30_000 / 1_281_167))
    labels = torch.randint(0, num_clusters, (h, n))
    raw = torch.randn(b, d, requires_grad=True)
    idx = torch.randperm(n)[:b]

    def floor():
        with torch.no_grad():
            (raw.detach() @ bank.vectors.T).topk(k, dim=1, sorted=False)

    losses = {
        "IR (Eq. 6)": lambda z: ir_loss(z, bank.vectors, idx, args.tau),
        "IR-NCE": lambda z: ir_nce_loss(z, bank.vectors, idx, args.tau, args.num_negatives),
        "BALL (Def. 5.2)": lambda z: ball_loss(z, bank.vectors, idx, args.tau, k),
        "ANN (Def. 5.3)": lambda z: ann_loss(z, bank.vectors, idx, args.tau, k),
        "LA (Eq. 8)": lambda z: la_loss(z, bank.vectors, idx, labels, args.tau, k),
    }

    def step(loss_fn):
        def run():
            raw.grad = None
            z = F.normalize(raw, dim=1)
            loss_fn(z).backward()
            bank.update(idx, z.detach(), args.alpha)

        return run

    floors_cpu = []
    for name, loss_fn in losses.items():
        floor_wall, floor_cpu, wall, cpu = paired_ms(floor, step(loss_fn), args.repeats)
        floors_cpu.append(floor_cpu)
        rows.setdefault(name, {})[n] = (wall, wall / floor_wall, cpu, cpu / floor_cpu)
        print(
            f"N={n}: {name}: wall {wall:.1f} ms = {wall / floor_wall:.2f} x floor "
            f"({floor_wall:.1f} ms); "
            f"CPU {cpu:.1f} ms = {cpu / floor_cpu:.2f} x floor ({floor_cpu:.1f} ms)",
            flush=True,
        )
    floor_cpu = statistics.median(floors_cpu)
    rows.setdefault("floor: z @ bank.T + topk", {})[n] = (float("nan"), 1.0, floor_cpu, 1.0)
    if not args.skip_parts:
        for name, ms in parts_ms(
            bank.vectors, raw, idx, labels, args.tau, k, k // 10, args.repeats
        ).items():
            part_rows.setdefault(name, {})[n] = ms

    if not args.skip_memory:
        for name, loss_fn in losses.items():
            peak, beyond = peak_allocated_bytes(step(loss_fn), b * n * 4)
            memory_rows.append((n, name, peak, beyond / (b * k * 4)))


def main(args):
    torch.manual_seed(0)
    if args.threads is not None:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    b, d, k, h = args.batch_size, args.dim, args.k_background, args.clusterings
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={b} d={d} "
        f"k_background={k} "
        f"H={h} repeats={args.repeats} (medians)"
    )
    print("Timings on a shared machine are noisy; compare ratios taken in the same run.\n")

    rows, memory_rows, part_rows = {}, [], {}
    for n in args.sizes:
        measure(n, args, rows, memory_rows, part_rows)

    # ---- tables ----------------------------------------------------------
    # CPU time (time.process_time) is the figure to read on a shared machine
    # with --threads 1: it counts the work done, not the time spent waiting for
    # a core.  The x-floor ratios pair each step with a floor call made right
    # next to it.
    sizes = args.sizes
    floor_name = "floor: z @ bank.T + topk"
    rows = {floor_name: rows.pop(floor_name), **rows}
    print(
        "\n| step (forward + backward + bank update) | "
        + " | ".join(f"N={n:,}: CPU ms (x floor)" for n in sizes)
        + (f" | CPU time N={sizes[-1]:,} / N={sizes[0]:,} |" if len(sizes) > 1 else " |")
    )
    print("|---|" + "---|" * len(sizes) + ("---|" if len(sizes) > 1 else ""))
    for name, by_n in rows.items():
        cells = " | ".join(f"{by_n[n][2]:.1f} ({by_n[n][3]:.2f}x)" for n in sizes)
        scale = f" | {by_n[sizes[-1]][2] / by_n[sizes[0]][2]:.1f}x |" if len(sizes) > 1 else " |"
        print(f"| {name} | {cells}{scale}")

    if part_rows:
        print("\n| piece (CPU ms, one call) | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for name, by_n in part_rows.items():
            print(f"| {name} | " + " | ".join(f"{by_n[n]:.1f}" for n in sizes) + " |")

    if memory_rows:
        print(
            f"\n| N | loss | peak allocated during a step (MiB) | "
            f"peak of all but the [B,N] similarities, "
            f"in [B,k]={b}x{k} fp32 tensors |"
        )
        print("|---|---|---|---|")
        for n, name, peak, in_bk in memory_rows:
            print(f"| {n:,} | {name} | {peak / 2**20:.1f} | {in_bk:.1f} |")
        print(
            f"(target for LA: at most H = {h} [B,k] tensors beyond the similarities; "
            f"[B,N] fp32 = {b * sizes[-1] * 4 / 2**20:.0f} MiB at N={sizes[-1]:,}, "
            f"[B,k] fp32 = {b * k * 4 / 2**20:.0f} MiB)"
        )

    if not args.skip_kmeans:
        x = F.normalize(torch.randn(args.kmeans_n, d), dim=1)
        start, start_cpu = time.perf_counter(), time.process_time()
        _, objectives = run_kmeans(
            x, args.kmeans_k, num_clusterings=1, seed=0, verbose=False, return_objectives=True
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        print(
            f"\nfaiss k-means ({'GPU' if faiss_has_gpu() else 'CPU'}): N={args.kmeans_n:,} d={d} "
            f"K={args.kmeans_k:,}, 20 iterations, all rows used: {seconds:.1f} s wall, "
            f"{cpu_seconds:.1f} s CPU "
            f"per clustering (x{h} clusterings = {h * seconds:.0f} s wall per re-clustering); "
            f"final objective (Kmeans.obj[-1]) {objectives[0]:.4g}"
        )


if __name__ == "__main__":
    main(parser.parse_args())
