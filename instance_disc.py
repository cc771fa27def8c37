"""Instance Discrimination and its neighbourhood variants (Sec. 5.3: Eq. 6, Theorem 5.1,
Definitions 5.2 and 5.3, Corollary 5.3.1).

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning".

The idea.  Every training image i has a row M[i] of a memory bank (memory_bank.py, Eq. 7).  A view
z = E(v(x_i, a)) of image i should pick out its own row among the N rows:

    p(j | x, M) = exp(z^T M[j] / tau) / sum_{k=1..N} exp(z^T M[k] / tau)        (Eq. 6)

IR (`ir_loss`) maximizes log p(i | x, M).  Theorem 5.1 reads it as InfoNCE (Eq. 2) whose negatives
are the other bank rows: I^NCE over all N rows = log N - ir_loss, and `ir_nce_loss` is InfoNCE
with K - 1 negatives drawn uniformly from the other N - 1 rows.  BALL and ANN keep only the rows
near the image: B_i, the k_background rows nearest to z (or to M[i]), and C_i, the closest of them.

    BALL (Def. 5.2):  log p(i | x, M) / p(B_i | x, M)
    ANN  (Def. 5.3):  log p(i | x, M) / p(B_i \\ C_i | x, M)

The softmax's sum over all N rows divides numerator and denominator alike and cancels (Corollary
5.3.1), so with s_k = z^T M[k] / tau each loss is a logsumexp over its denominator set D minus s_i;
log |D| - loss is VINCE's Eq. 4 value.

Conventions shared by every loss here and by local_agg.la_loss:
    z [B, d]     unit rows (F.normalize(z, dim=1)); bank [N, d] unit rows, e.g. MemoryBank.vectors;
    idx [B]      each image's row i; tau > 0, the temperature (Appendix D: 0.07).
    Losses are minimized (loss = -objective), averaged over the batch; gradients reach z only.
    Arithmetic is float32 (float64 if z or the bank is), with autocast off: exp(1 / 0.07) = 1.6e6
    overflows fp16, so nothing is exponentiated outside a logsumexp or a cross-entropy.
    The losses check shapes and arguments only; unit rows and indices in range are the caller's
    (MemoryBank.update checks its indices), so on a GPU no loss makes the host wait.

Each loss is a plain function of tensors; the last line of its docstring names what to copy with it.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The losses, in the paper's order.
# ----------------------------------------------------------------------------------------------
def ir_loss(z, bank, idx, tau=0.07):
    """IR, Eq. 6: -log p(i | x, M) over all N rows, the batch mean.

    loss = logsumexp_j (z^T M[j] / tau) - z^T M[i] / tau: the cross-entropy of the [B, N] logits
    with target i.  Theorem 5.1: log N - ir_loss is InfoNCE with K = N.

    To copy: ir_loss, _check
    """
    dt = _check(z, bank, idx, tau)
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return F.cross_entropy((z.to(dt) / tau) @ bank.detach().to(dt).T, idx.to(bank.device))


def ir_nce_loss(z, bank, idx, tau=0.07, num_negatives=4096, generator=None):
    """IR with sampled negatives (Theorem 5.1): InfoNCE, Eq. 2, with K = num_negatives + 1.

    loss = logsumexp(s_i, s_n1, ..., s_n(K-1)) - s_i with s_j = z^T M[j] / tau.  The negatives are
    uniform over the other N - 1 rows, never i: the proof of Theorem 5.1 draws them from
    p(x_{j != i}).  (Alias sampling over all N draws i itself with chance 1 - (1 - 1/N)^(K-1).)
    generator: optional torch.Generator for the draw.

    To copy: ir_nce_loss, _check, sample_negatives
    """
    dt = _check(z, bank, idx, tau)
    q, bank, idx = z.to(dt) / tau, bank.detach().to(dt), idx.to(bank.device)
    negatives = sample_negatives(idx, len(bank), num_negatives, generator).to(bank.device)
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        logits = q @ bank.T  # [B, N]; gathering K of them is cheaper than B*K rows of the bank
    scores = logits.gather(1, torch.cat([idx[:, None], negatives], dim=1))  # [B, K], i first
    return F.cross_entropy(scores, torch.zeros_like(idx))


def ball_loss(z, bank, idx, tau=0.07, k_background=4096, neighbours_of="z", add_positive=True):
    """BALL, Definition 5.2: -log p(i | x, M) / p(B_i | x, M).

    B_i: the k_background rows nearest to z (neighbours_of="z", as the Local Aggregation code does)
    or to M[i] ("bank", the paper's wording; one more [B, N] product).
    loss = logsumexp_{k in D_i} s_k - s_i (Corollary 5.3.1), s_k = z^T M[k] / tau, over
      add_positive=True:  D_i = B_i plus i where B_i misses it (VINCE's form: loss >= 0);
      add_positive=False: D_i = B_i, the literal definition (unbounded below if i misses B_i).
    With k_background = N this is IR (Eq. 6).

    To copy: ball_loss, _check, BackgroundLogits
    """
    dt = _check(z, bank, idx, tau)
    q, bank, idx = z.to(dt) / tau, bank.detach().to(dt), idx.to(bank.device)
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        background, b_i = BackgroundLogits.apply(q, bank, idx, k_background, neighbours_of)
    positive = (q * bank[idx]).sum(dim=1)  # [B]: s_i
    # i counted once: its term is added where B_i misses it (logaddexp(a, -inf) = a)
    add_i = add_positive & ~(b_i == idx[:, None]).any(dim=1)
    log_b = background.logsumexp(dim=1).logaddexp(positive.masked_fill(~add_i, -math.inf))
    return (log_b - positive).mean()  # log p(B_i | x, M) - log p(i | x, M)


def ann_loss(
    z, bank, idx, tau=0.07, k_background=4096, k_close=None, neighbours_of="z", add_positive=True
):
    """ANN, Definition 5.3: -log p(i | x, M) / p(B_i \\ C_i | x, M).

    B_i: the k_background rows nearest to z (neighbours_of="z") or to M[i] ("bank").
    The close set C_i (Example 2: a negative must not be too similar) is removed from B_i:
      k_close int: the k_close members of B_i nearest to B_i's anchor, so B_i \\ C_i holds the
        ranks k_close+1 .. k_background (default None: k_background // 10);
      k_close LongTensor [B, c]: C_i itself, bank rows per image, padded with -1.
    add_positive=True: i is counted once in the denominator, inside C_i or not (the paper
    does not say whether i belongs to C_i); False: exactly B_i \\ C_i (empty: loss -inf).

    To copy: ann_loss, _check, BackgroundLogits
    """
    dt = _check(z, bank, idx, tau)
    k_close = k_background // 10 if k_close is None else k_close
    if not (len(k_close) == len(idx) if torch.is_tensor(k_close) else 0 <= k_close < k_background):
        raise ValueError(f"k_close must be in [0, k_background) or [B, c], got {k_close!r:.40}")
    q, bank, idx = z.to(dt) / tau, bank.detach().to(dt), idx.to(bank.device)
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        background, b_i = BackgroundLogits.apply(q, bank, idx, k_background, neighbours_of)
        with torch.no_grad():  # C_i as a [B, k] mask over B_i
            if torch.is_tensor(k_close):  # a row-wise isin; the stride N + 1 keeps -1 unmatched
                rows = torch.arange(len(idx), device=bank.device)[:, None] * (len(bank) + 1)
                close = torch.isin(b_i + rows, k_close.to(bank.device) + rows)
            else:  # the k_close members of B_i most similar to its anchor (z or M[i])
                near = background if neighbours_of == "z" else (bank[idx] @ bank.T).gather(1, b_i)
                close = torch.zeros_like(b_i, dtype=torch.bool)
                close.scatter_(1, near.topk(k_close, dim=1, sorted=False)[1], True)
            close |= (b_i == idx[:, None]) & add_positive  # i leaves; added once below
    positive = (q * bank[idx]).sum(dim=1)  # [B]: s_i
    # log p(D_i | x, M) + log Z, D_i = B_i \ C_i with i counted once (add_positive) or not
    log_annulus = background.masked_fill(close, -math.inf).logsumexp(dim=1)
    log_d = log_annulus.logaddexp(positive) if add_positive else log_annulus
    return (log_d - positive).mean()


# ----------------------------------------------------------------------------------------------
# Helpers of the losses.
# ----------------------------------------------------------------------------------------------
def _check(z, bank, idx, tau):
    """z [B, d], bank [N, d], idx [B] integers and tau > 0, else a ValueError naming them.
    Returns the dtype to compute in: float32, or float64 if z or the bank is."""
    if bank.shape[1:] != z.shape[1:] or idx.shape != z.shape[:1] or idx.is_floating_point():
        raise ValueError(f"z [B,d], bank [N,d], int idx [B]: {z.shape} {bank.shape} {idx.shape}")
    if not 0 < tau < math.inf:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.promote_types(torch.result_type(z, bank), torch.float32)


def sample_negatives(idx, num_items, num_negatives, generator=None):
    """[B] -> [B, num_negatives]: i.i.d. uniform over the num_items - 1 rows other than idx.

    Draws r in [0, N - 2] and shifts r >= idx up by one.  On the generator's device (idx's if None).
    """
    if num_items < 2:
        raise ValueError(f"num_items (N) must be >= 2 to leave a negative, got {num_items}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    device = idx.device if generator is None else generator.device
    r = torch.randint(num_items - 1, (len(idx), num_negatives), generator=generator, device=device)
    return r + (r >= idx.to(device)[:, None])


class BackgroundLogits(torch.autograd.Function):
    """background, b_i = BackgroundLogits.apply(q, bank, idx, k, neighbours_of): B_i = the k bank
    rows nearest to q ("z") or to bank[idx] ("bank"), as indices [B, k], and
    background[b, j] = q[b] . bank[b_i[b, j]].  The backward reaches q through those k rows only
    (an embedding_bag), not through a dense [B, N] gradient times the whole bank."""

    @staticmethod
    def forward(ctx, q, bank, idx, k, neighbours_of):
        if not 0 < k <= len(bank):
            raise ValueError(f"k_background must be in [1, N = {len(bank)}], got {k}")
        if neighbours_of not in ("z", "bank"):
            raise ValueError(f'neighbours_of must be "z" or "bank", got {neighbours_of!r}')
        logits = q @ bank.T  # [B, N]: with B_i around z, the one product of the loss
        near = logits if neighbours_of == "z" else bank[idx] @ bank.T
        values, b_i = near.topk(k, sorted=False)  # B_i: [B, k] indices
        ctx.save_for_backward(b_i, bank)  # embedding_bag's (input, weight), in that order
        return (values if near is logits else logits.gather(1, b_i)), b_i

    @staticmethod
    def backward(ctx, grad, _):  # to q through the k rows of B_i only
        return F.embedding_bag(*ctx.saved_tensors, per_sample_weights=grad, mode="sum"), *[None] * 4


# ----------------------------------------------------------------------------------------------
# Demo: the four losses on a synthetic bank, and the checks of Section 5.3.
# ----------------------------------------------------------------------------------------------
def make_synthetic_bank(num_items, dim, num_clusters, spread, generator):
    """A clustered unit-norm bank [N, d] (so neighbourhoods mean something), each row's cluster."""
    centres = F.normalize(torch.randn(num_clusters, dim, generator=generator), dim=1)
    labels = torch.randint(0, num_clusters, (num_items,), generator=generator)
    bank = centres[labels] + spread * torch.randn(num_items, dim, generator=generator) / dim**0.5
    return F.normalize(bank, dim=1), labels


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Section 5.3 on a synthetic memory bank: IR (Eq. 6), IR with sampled negatives "
        "(Theorem 5.1), Ball (Def. 5.2) and Annulus (Def. 5.3) Discrimination, with numerical "
        "checks of "
        "Theorem 5.1 and of the cancellation in Corollary 5.3.1."
    )
    parser.add_argument(
        "--num-items", type=int, default=20000, help="N, the size of the training set / memory bank"
    )
    parser.add_argument(
        "--dim", type=int, default=128, help="d, the embedding size (Appendix D: 128)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="B, images per step (Appendix D: 256)"
    )
    parser.add_argument(
        "--tau", type=float, default=0.07, help="temperature tau of Eq. 6 (Appendix D: 0.07)"
    )
    parser.add_argument(
        "--k-background",
        type=int,
        default=4096,
        help="|B_i|, the background neighbours of Def. 5.2/5.3 (Appendix D: 4096)",
    )
    parser.add_argument(
        "--k-close",
        type=int,
        default=None,
        help="|C_i| for ANN, the nearest part of B_i left out (default: k_background // 10)",
    )
    parser.add_argument(
        "--num-negatives",
        type=int,
        default=4096,
        help="uniform negatives for IR-NCE, i.e. InfoNCE with K = num_negatives + 1",
    )
    parser.add_argument(
        "--neighbours-of",
        choices=["z", "bank"],
        default="z",
        help='anchor of B_i: "z" = the current embedding (LA code), "bank" = M[i] (paper text)',
    )
    parser.add_argument(
        "--view-noise",
        type=float,
        default=1.0,
        help="how far the current view z lies from its stored entry M[i] (noise scale)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the synthetic bank and views"
    )
    args = parser.parse_args(argv)
    if args.num_items < 2 or args.dim < 1 or not (1 <= args.batch_size <= args.num_items):
        parser.error("need --num-items >= 2, --dim >= 1 and 1 <= --batch-size <= --num-items")
    if not (1 <= args.k_background <= args.num_items):
        parser.error(f"--k-background must lie in [1, --num-items] = [1, {args.num_items}]")
    if args.tau <= 0:
        parser.error("--tau must be > 0")
    if args.k_close is not None and not (0 <= args.k_close < args.k_background):
        parser.error(f"--k-close must lie in [0, --k-background) = [0, {args.k_background})")
    if args.num_negatives < 1:
        parser.error("--num-negatives must be >= 1")

    generator = torch.Generator().manual_seed(args.seed)
    bank, _ = make_synthetic_bank(
        args.num_items,
        args.dim,
        num_clusters=max(1, args.num_items // 100),
        spread=1.0,
        generator=generator,
    )
    idx = torch.randperm(args.num_items, generator=generator)[: args.batch_size]
    noise = (
        args.view_noise
        * torch.randn(args.batch_size, args.dim, generator=generator)
        / math.sqrt(args.dim)
    )
    z = F.normalize(bank[idx] + noise, dim=1)  # a "view" of image i near its entry M[i]
    print(
        f"synthetic bank N={args.num_items}, d={args.dim}, B={args.batch_size}, tau={args.tau}, "
        f"|B_i|={args.k_background}, B_i around {args.neighbours_of!r}\n"
    )

    k_close = args.k_close if args.k_close is not None else args.k_background // 10
    other = "bank" if args.neighbours_of == "z" else "z"
    ir_loss(z, bank, idx, args.tau)  # warm-up, so the first timing is not the allocator's
    rows = [
        ("IR (Eq. 6)", lambda: ir_loss(z, bank, idx, args.tau), args.num_items),
        (
            f"IR-NCE, K={args.num_negatives + 1}",
            lambda: ir_nce_loss(
                z, bank, idx, args.tau, args.num_negatives, torch.Generator().manual_seed(1)
            ),
            args.num_negatives + 1,
        ),
        (
            "BALL (Def. 5.2)",
            lambda: ball_loss(z, bank, idx, args.tau, args.k_background, args.neighbours_of),
            args.k_background,
        ),
        (
            f"BALL, B_i around {other!r}",
            lambda: ball_loss(z, bank, idx, args.tau, args.k_background, other),
            args.k_background,
        ),
        (
            f"ANN (Def. 5.3), |C_i|={k_close}",
            lambda: ann_loss(
                z, bank, idx, args.tau, args.k_background, k_close, neighbours_of=args.neighbours_of
            ),
            args.k_background - k_close,
        ),
    ]
    print(
        f"{'loss':<28} | {'value':>8} | {'K (denominator size)':>20} | {'log K - loss':>12} | "
        f"{'forward ms':>10}"
    )
    for name, fn, size in rows:
        start = time.perf_counter()
        value = float(fn())
        ms = 1000 * (time.perf_counter() - start)
        print(
            f"{name:<28} | {value:8.4f} | {size:>20} | {math.log(size) - value:12.4f} | {ms:10.1f}"
        )
    print(
        "(log K - loss is the InfoNCE / VINCE estimate of Eq. 2 / Eq. 4, at most log K; "
        "for BALL/ANN K counts the positive once more if B_i misses it)"
    )

    # Theorem 5.1: IR = InfoNCE over all N entries, up to the constant log N.
    import infonce  # only for the check; the losses need nothing but torch

    with torch.no_grad():
        s = z @ bank.T / args.tau
        positive = s.gather(1, idx[:, None])
        others = s.masked_fill(F.one_hot(idx, args.num_items).bool(), -math.inf)
        others = others.sort(dim=1).values[
            :, 1:
        ]  # drop the masked positive: N - 1 negatives per row
        nce = float(infonce.infonce_bound(torch.cat([positive, others], dim=1)))
    ir = float(ir_loss(z, bank, idx, args.tau))
    print(
        f"\nTheorem 5.1: infonce.infonce_bound over all N = {nce:.6f};  log N - ir_loss = "
        f"{math.log(args.num_items) - ir:.6f};  "
        f"difference {abs(nce - (math.log(args.num_items) - ir)):.1e}"
    )

    # Corollary 5.3.1: log p(i)/p(B_i) from the full-softmax probabilities equals the direct form
    # over B_i.
    with torch.no_grad():
        s64 = (z.double() @ bank.double().T) / args.tau
        log_p = torch.log_softmax(s64, dim=1)  # log p(j | x, M), normalized over all N
        if args.neighbours_of == "z":
            neighbours = torch.topk(s64, args.k_background, dim=1).indices
        else:
            neighbours = torch.topk(
                bank.double()[idx] @ bank.double().T, args.k_background, dim=1
            ).indices
        in_ball = torch.zeros_like(s64, dtype=torch.bool).scatter_(1, neighbours, True)
        in_ball[torch.arange(args.batch_size), idx] = (
            True  # D_i = B_i with the positive counted once
        )
        via_probabilities = (
            log_p.gather(1, idx[:, None])[:, 0]
            - torch.log(log_p.exp().masked_fill(~in_ball, 0.0).sum(dim=1))
        ).mean()
    direct = -float(
        ball_loss(z.double(), bank.double(), idx, args.tau, args.k_background, args.neighbours_of)
    )
    print(
        f"Corollary 5.3.1: mean log p(i)/p(B_i) from full-softmax probabilities = "
        f"{float(via_probabilities):.6f}; "
        f"direct form over B_i = {direct:.6f} (the 1/sum over N cancels)"
    )

    # The fp16 pitfall: exp(dot / tau) overflows half precision, log space does not.
    naive = torch.exp((z.half() @ bank.half().T) / args.tau)
    half = float(ir_loss(F.normalize(z.half(), dim=1), bank.half(), idx, args.tau))
    print(
        f"fp16: naive exp(z.M/tau) has {int(torch.isinf(naive).sum())} inf entries of "
        f"{naive.numel()}; "
        f"ir_loss on fp16 inputs = {half:.4f} (fp32: {ir:.4f})"
    )


if __name__ == "__main__":
    main()
