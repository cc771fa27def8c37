"""Speed of spiral.py (Sec. 4.3): the targets are 10k iterations <= 15 s and the 7-eta sweep <= 2 min
on a 2-core CPU.  Not a test (its name does not start with test_): run it and read the figures.

    python tests/bench_spiral.py              # per-step cost, split into parts; 1 vs 2 threads
    python tests/bench_spiral.py --full       # + the paper-length run `python spiral.py --eta 0.4`
    python tests/bench_spiral.py --sweep      # + the default seven-eta sweep (one seed)

Wall time is what a reader waits; process CPU time is also printed because
it is steadier when other jobs share the machine (with 1 thread, CPU time ~
wall time on an idle machine).  The load average is printed so a noisy
measurement can be recognised as one.
"""

import argparse
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import spiral  # noqa: E402
from infonce import infonce_loss  # noqa: E402


def clocks():
    return time.perf_counter(), time.process_time()


def since(start):
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def train_rate(points, iters, threads):
    """ms per iteration of spiral.train_ir (wall, cpu)."""
    torch.set_num_threads(threads)
    spiral.train_ir(points, 0.4, iters=50, progress=False)  # warm up allocator and kernels
    start = clocks()
    spiral.train_ir(points, 0.4, iters=iters, progress=False)
    wall, cpu = since(start)
    return 1e3 * wall / iters, 1e3 * cpu / iters


def parts(points, iters, threads):
    """Mean ms per step of each part of the IR step, at the paper's sizes."""
    torch.set_num_threads(threads)
    spiral._keep_freed_memory()
    n, batch, k = len(points), spiral.BATCH_SIZE, spiral.NEGATIVES
    encoder = spiral.make_encoder()
    params, buffers = list(encoder.parameters()), [None] * len(list(encoder.parameters()))
    bank = F.normalize(torch.randn(n, 2), dim=1)
    scores_fixed = torch.randn(batch, k + 1)
    timings = {}

    def timed(name, fn):
        for _ in range(20):
            fn()
        start = clocks()
        for _ in range(iters):
            fn()
        wall, cpu = since(start)
        timings[name] = (1e3 * wall / iters, 1e3 * cpu / iters)

    def mlp():
        for p in params:
            p.grad = None
        F.normalize(encoder(points[:batch]), dim=1).sum().backward()

    def scores():
        z = F.normalize(torch.randn(batch, 2), dim=1).requires_grad_()
        spiral.ir_scores(z, bank, torch.randint(n, (batch,)), torch.randint(n, (k,)), 0.07).sum().backward()

    def scores_matmul():
        z = F.normalize(torch.randn(batch, 2), dim=1).requires_grad_()
        idx, neg = torch.randint(n, (batch,)), torch.randint(n, (k,))
        torch.cat([(z * bank[idx]).sum(1, keepdim=True), z @ bank[neg].T], 1).div(0.07).sum().backward()

    def loss_infonce():
        infonce_loss(scores_fixed.clone().requires_grad_()).backward()

    timed("encoder forward+backward (B=128)", mlp)
    timed("sgd_step_ (SGD, momentum)", lambda: spiral.sgd_step_(params, buffers, 0.03, 0.9, 1e-5))
    timed("ir_scores forward+backward", scores)
    timed("  same with a matmul (inner size 2)", scores_matmul)
    timed("infonce_loss forward+backward", loss_infonce)
    return timings


def run_cli(argv):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "spiral.py"] + argv, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return seconds, done.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=1000, help="iterations per timing of train_ir")
    p.add_argument("--full", action="store_true", help="also time `python spiral.py --eta 0.4` (10k iterations)")
    p.add_argument("--sweep", action="store_true", help="also time `python spiral.py --sweep` (7 etas, one seed)")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          f"(above ~0.5 the machine is shared and the figures are inflated)")
    points, _ = spiral.make_spirals(spiral.N_TRAIN, generator=torch.Generator().manual_seed(0))

    print("\nParts of one IR step at the paper's sizes (ms; wall / cpu):")
    for threads in (1, 2):
        for name, (wall, cpu) in parts(points, 200, threads).items():
            print(f"  {threads} thread(s)  {name:38s} {wall:6.3f} / {cpu:6.3f}")

    print(f"\nWhole training step, spiral.train_ir over {args.iters} iterations "
          f"(ms/it wall / cpu -> seconds for the paper's 10k iterations):")
    for threads in (1, 2):
        wall, cpu = train_rate(points, args.iters, threads)
        print(f"  {threads} thread(s)  {wall:6.3f} / {cpu:6.3f}  -> {wall * 10:5.1f} s")

    if args.full:
        seconds, out = run_cli(["--eta", "0.4", "--out", os.path.join("out", "bench_eta0.4.png")])
        print(f"\npython spiral.py --eta 0.4: {seconds:.1f} s wall in all (target 15 s)")
        print("  " + [line for line in out.splitlines() if line.startswith("[") and "final loss" in line][-1])
    if args.sweep:
        seconds, out = run_cli(["--sweep", "--out", os.path.join("out", "bench_sweep.png")])
        print(f"\npython spiral.py --sweep: {seconds:.1f} s wall in all (target 120 s)")
        print("\n".join("  " + line for line in out.splitlines() if "|" in line))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; log K = {math.log(spiral.NEGATIVES + 1):.3f}")


if __name__ == "__main__":
    main()
