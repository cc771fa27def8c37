"""Speed of spiral.py (Sec. 4.3) against a straightforward implementation, timed in one process.

Not a test (its name does not start with test_): run it and read the ratios.

    python tests/bench_spiral.py              # the paper run (eta 0.4, 10k steps) vs baselines
    python tests/bench_spiral.py --sweep      # + the eight-eta sweep of Figure 1, one seed
    python tests/bench_spiral.py --iters 2000 # shorter (same per-step ratio, start-up weighs more)

The paper run is spiral.main(["--eta", "0.4"]): data, 10k IR steps with the
transfer probe after every epoch, the final probe and the figure.  The
baselines do the same experiment the plain way, in this process, with the
same probe after every epoch (spiral.evaluate) and no figure:
  * straightforward: per step, fresh views, and for every row its own 4096
    negatives (Eq. 5 draws x_2..x_K for each x_1; IR's reference code draws a
    [B, K] index tensor the same way), scored with a batched matmul;
    torch.optim.SGD.
  * shared negatives: the same, but one draw of 4096 negatives per step
    shared by the batch, as spiral.py does.  Its ratio to spiral.py shows
    what is left once that one choice is made equal (nothing else is
    different in the loop).
Quote the ratios: absolute times differ up to 5x between machines of the same
kind, and the load average printed at the start and end says whether other
jobs shared the cores.
"""

import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import spiral  # noqa: E402
from infonce import infonce_loss  # noqa: E402


def baseline_run(eta, iters, per_row_negatives, seed=0):
    """The paper run written the plain way; returns the final transfer accuracy (raw output)."""
    n, batch, k = spiral.N_TRAIN, spiral.BATCH_SIZE, spiral.NEGATIVES
    g = torch.Generator().manual_seed(seed)
    train, train_labels = spiral.make_spirals(n, generator=g)
    test, test_labels = spiral.make_spirals(spiral.N_TEST, generator=g)
    torch.manual_seed(seed)
    encoder = spiral.make_encoder()
    optimizer = torch.optim.SGD(
        encoder.parameters(),
        lr=spiral.LR,
        momentum=spiral.MOMENTUM,
        weight_decay=spiral.WEIGHT_DECAY,
    )
    with torch.no_grad():
        bank = F.normalize(encoder(train + eta * torch.rand(n, 2)), dim=1)
    steps_per_epoch, epoch_losses = n // batch, []
    for it in range(iters):
        if it % steps_per_epoch == 0:
            order = torch.randperm(n)
        idx = order[it % steps_per_epoch * batch : (it % steps_per_epoch + 1) * batch]
        z = F.normalize(encoder(train[idx] + eta * torch.rand(batch, 2)), dim=1)
        positive = (z * bank[idx]).sum(1, keepdim=True)
        if per_row_negatives:
            negatives = bank[torch.randint(n, (batch, k))]  # [B, K, 2]
            negative = torch.bmm(negatives, z.unsqueeze(2)).squeeze(2)  # [B, K]
        else:
            negative = z @ bank[torch.randint(n, (k,))].T
        loss = infonce_loss(torch.cat([positive, negative], 1) / spiral.TAU)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            bank[idx] = F.normalize(spiral.ALPHA * bank[idx] + (1 - spiral.ALPHA) * z, dim=1)
        epoch_losses.append(loss.item())
        if it % steps_per_epoch == steps_per_epoch - 1:
            information = math.log(k + 1) - sum(epoch_losses) / len(epoch_losses)
            result = spiral.evaluate(encoder, train, train_labels, test, test_labels, information)
            epoch_losses = []
    return result["raw"]


def probe_cost(repeats=20):
    """Seconds for one spiral.evaluate (both readings) at the paper's sizes: one epoch's probe."""
    g = torch.Generator().manual_seed(0)
    train, train_labels = spiral.make_spirals(spiral.N_TRAIN, generator=g)
    test, test_labels = spiral.make_spirals(spiral.N_TEST, generator=g)
    encoder = spiral.make_encoder()
    spiral.evaluate(encoder, train, train_labels, test, test_labels, information=1.0)
    start = time.perf_counter()
    for _ in range(repeats):
        spiral.evaluate(encoder, train, train_labels, test, test_labels, information=1.0)
    return (time.perf_counter() - start) / repeats


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def quiet_main(argv):
    """spiral.main with its progress lines swallowed; returns its results."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return spiral.main(argv)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--iters",
        type=int,
        default=spiral.ITERS,
        help="iterations per run (default: the paper's 10k)",
    )
    p.add_argument(
        "--sweep", action="store_true", help="also time the eight-eta sweep of Figure 1 (one seed)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=spiral.THREADS,
        help="torch threads (default: spiral.py's, 1)",
    )
    args = p.parse_args()
    steps_per_epoch = spiral.N_TRAIN // spiral.BATCH_SIZE
    if args.iters < steps_per_epoch:  # the baselines report the probe after the last whole epoch
        p.error(f"--iters must be at least one epoch ({steps_per_epoch}), got {args.iters}")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {args.threads} thread(s), load "
        f"average at the start {os.getloadavg()[0]:.2f} (above ~0.5: other jobs share the cores)"
    )
    out = tempfile.mkdtemp()
    # Creating the first torch.optim optimizer imports torch._dynamo: do it once here, so that
    # whichever run comes first is not charged for it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    per_epoch = probe_cost()
    epochs = args.iters // steps_per_epoch
    print(
        f"transfer probe (spiral.evaluate, both readings, {spiral.N_TRAIN} + {spiral.N_TEST} "
        f"points): {1e3 * per_epoch:.1f} ms per epoch, {per_epoch * epochs:.1f} s over {epochs} "
        f"epochs"
    )

    paper_argv = ["--eta", "0.4", "--iters", str(args.iters), "--threads", str(args.threads)]
    paper_argv += ["--out", os.path.join(out, "eta0.4.png")]
    runs = [
        ("python spiral.py --eta 0.4", lambda: quiet_main(paper_argv)[0]["accuracy"]),
        ("straightforward (per-row negatives)", lambda: baseline_run(0.4, args.iters, True)),
        ("shared negatives, drawn per step", lambda: baseline_run(0.4, args.iters, False)),
    ]
    times = {}
    title = f"run (eta = 0.4, {args.iters} iterations)"
    print(f"\n{title:42s} {'wall s':>8} {'cpu s':>8} {'accuracy':>9}")
    for name, fn in runs:
        wall, cpu, accuracy = timed(fn)
        times[name] = wall
        print(f"{name:42s} {wall:8.1f} {cpu:8.1f} {accuracy:9.3f}", flush=True)
    ours = times[runs[0][0]]
    print(
        f"\nratio spiral.py / straightforward:   {ours / times[runs[1][0]]:.2f}x  (target <= 0.8x)"
    )
    print(f"ratio spiral.py / shared negatives:  {ours / times[runs[2][0]]:.2f}x")

    if args.sweep:
        sweep_argv = ["--sweep", "--threads", str(args.threads)]
        sweep_argv += ["--out", os.path.join(out, "sweep.png")]
        wall, cpu, results = timed(lambda: quiet_main(sweep_argv))
        print(
            f"\npython spiral.py --sweep (eight etas, one seed, 10k iterations each): "
            f"{wall:.0f} s wall, {cpu:.0f} s cpu (target under 600 s on a 2-core machine)"
        )
        print("  " + "  ".join(f"eta {r['eta']:g}: {r['accuracy']:.3f}" for r in results))
    log_k = math.log(spiral.NEGATIVES + 1)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; log K = {log_k:.3f}")


if __name__ == "__main__":
    main()
