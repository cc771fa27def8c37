"""Instance Discrimination and its neighbourhood variants: Eq. 6, Theorem 5.1, Definitions 5.2 and 5.3.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 5.3.

Every loss here is a plain function of tensors.  The last line of its
docstring names what to copy with it; tests/test_copyable.py copies exactly
that into a namespace holding only torch, math and F and checks that the copy
gives the same value and gradient.  The arguments:

    z    [B, d]  the encoder outputs E(v(x_i, a)) for one view of each image,
                 L2-normalized;
    bank [N, d]  the memory bank M (e.g. MemoryBank.vectors), unit rows (not
                 checked: that would cost as much as the loss);
    idx  [B]     each image's dataset index i, in [0, N);
    tau          the temperature of Eq. 6.

All losses are MINIMIZED: they are the negated objectives, loss = -L.
Gradients reach z only: the bank is a buffer refreshed by Eq. 7
(memory_bank.py), so it is detached here.

Precision, one rule for every loss here and for local_agg.la_loss: the
arithmetic is float32 whatever the inputs are (float64 if z or the bank is
float64).  fp16 / bf16 inputs are upcast inside and autocast is switched off
inside, so a mixed-precision trainer gets the float32 loss and gradient, and
exp(z^T M[j] / tau) is never formed (exp(1/0.07) = 1.6e6 would overflow
fp16's 65504): everything is a logsumexp or a cross-entropy.

Checks: shapes, dtypes, tau and the counts raise a ValueError naming the
argument, on any device.  The checks that read values (unit rows of z, idx in
[0, N) as an IndexError, close_set in range, a non-empty annulus) run for CPU
tensors only: on a GPU they would make the host wait for the device at every
step.  There an index out of range trips the indexing kernel's own
device-side assert, and a non-unit z goes unnoticed.

Cost: each loss builds one [B, N] tensor, the similarities z M^T / tau (the
matmul is the work floor).  IR needs all N of them in its backward pass, and
so does IR-NCE here (autograd through a gather: simple, and within the
benchmark's budget).  BALL, ANN and LA pick B_i with one top-k and
differentiate through the k chosen bank rows only (`BackgroundLogits`).

The constants between the code and the paper
--------------------------------------------
- IR (Eq. 6): loss = -log p(i | x, M).  Theorem 5.1 (proof, first line):
  I^NCE over all N entries = E[L^IR] + log N, i.e. I^NCE = log N - ir_loss.
- IR-NCE: InfoNCE (Eq. 2) with K = num_negatives + 1: I^NCE = log K - ir_nce_loss.
- BALL / ANN (Definitions 5.2, 5.3; Corollary 5.3.1): the 1/sum_{j<=N} of p(.|x, M)
  cancels between numerator and denominator, leaving
  loss = log sum_{k in D_i} exp(s_k) - s_i, s_k = z^T M[k] / tau, over the
  denominator set D_i (B_i, or B_i \\ C_i; see `include_positive`).  VINCE's
  Eq. 4 value is then log |D_i| - loss.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------
# Eq. 6: Instance Discrimination over all N entries.
# ----------------------------------------------------------------------
def ir_loss(z, bank, idx, tau=0.07):
    """-log p(i | x, M), Eq. 6, averaged over the batch.  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B], tau > 0.
        p(i | x, M) = exp(z^T M[i] / tau) / sum_{j=1..N} exp(z^T M[j] / tau)
        loss = logsumexp_j (z^T M[j] / tau) - z^T M[i] / tau
    i.e. the cross-entropy of the [B, N] logits with target i, as in
    lemniscate.pytorch's full-softmax IR (LinearAverage + CrossEntropyLoss).
    Theorem 5.1: log N - ir_loss is InfoNCE (Eq. 2) with K = N, the positive
    plus all N - 1 other entries.  Checks and precision: module docstring.

    To copy: ir_loss
    """
    describe = lambda x: f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__  # noqa: E731
    if not (torch.is_tensor(z) and z.dim() == 2 and z.is_floating_point() and len(z) > 0):
        raise ValueError(f"z must be a floating-point tensor [B, d] with B >= 1, got {describe(z)}")
    if not (
        torch.is_tensor(bank)
        and bank.dim() == 2
        and bank.is_floating_point()
        and bank.shape[1] == z.shape[1]
    ):
        raise ValueError(
            f"bank must be a floating-point tensor [N, d] (e.g. MemoryBank.vectors) and z [B, d] "
            f"and bank must share d, got z {describe(z)}, bank {describe(bank)}"
        )
    if not (
        torch.is_tensor(idx)
        and idx.shape == z.shape[:1]
        and not idx.is_floating_point()
        and idx.dtype != torch.bool
    ):
        raise ValueError(f"idx must be a 1-D integer tensor [B] = [{len(z)}], got {describe(idx)}")
    if isinstance(tau, bool) or not 0 < tau < math.inf:
        raise ValueError(f"tau (the temperature of Eq. 6) must be a finite number > 0, got {tau!r}")
    if (
        z.device.type == "cpu"
    ):  # checks that read values: CPU only (on a GPU the host would wait for them)
        norms = z.detach().norm(dim=1)
        if not (
            (norms - 1).abs() <= 1e-2
        ).all():  # within 1e-2 of 1: unit rows rounded to bf16 pass
            raise ValueError(
                f"z must be L2-normalized (F.normalize(z, dim=1)), got norms {norms.min():.4g}..{norms.max():.4g}"
            )
        if len(bank) == 0 or idx.min() < 0 or idx.max() >= len(bank):
            raise IndexError(
                f"idx must lie in [0, N) = [0, {len(bank)}), got {idx.min()} .. {idx.max()}"
            )
    dtype = torch.float64 if torch.float64 in (z.dtype, bank.dtype) else torch.float32
    z, bank, idx = (
        z.to(dtype),
        bank.detach().to(dtype),
        idx.to(bank.device, torch.long, non_blocking=bank.is_cuda),
    )
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        logits = (
            z / tau
        ) @ bank.T  # [B, N]: Eq. 6's exponents z^T M[j] / tau (dividing z, not the [B, N] product)
        return F.cross_entropy(logits, idx)  # mean of logsumexp_j logits[b, j] - logits[b, i]


def _check_inputs(z, bank, idx, tau):
    """ir_loss's checks, for the other losses: z and detached bank in float32 (float64), idx int64."""
    describe = lambda x: f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__  # noqa: E731
    if not (torch.is_tensor(z) and z.dim() == 2 and z.is_floating_point() and len(z) > 0):
        raise ValueError(f"z must be a floating-point tensor [B, d] with B >= 1, got {describe(z)}")
    if not (
        torch.is_tensor(bank)
        and bank.dim() == 2
        and bank.is_floating_point()
        and bank.shape[1] == z.shape[1]
    ):
        raise ValueError(
            f"bank must be a floating-point tensor [N, d] (e.g. MemoryBank.vectors) and z [B, d] "
            f"and bank must share d, got z {describe(z)}, bank {describe(bank)}"
        )
    if not (
        torch.is_tensor(idx)
        and idx.shape == z.shape[:1]
        and not idx.is_floating_point()
        and idx.dtype != torch.bool
    ):
        raise ValueError(f"idx must be a 1-D integer tensor [B] = [{len(z)}], got {describe(idx)}")
    if isinstance(tau, bool) or not 0 < tau < math.inf:
        raise ValueError(f"tau (the temperature of Eq. 6) must be a finite number > 0, got {tau!r}")
    if (
        z.device.type == "cpu"
    ):  # checks that read values: CPU only (on a GPU the host would wait for them)
        norms = z.detach().norm(dim=1)
        if not (
            (norms - 1).abs() <= 1e-2
        ).all():  # within 1e-2 of 1: unit rows rounded to bf16 pass
            raise ValueError(
                f"z must be L2-normalized (F.normalize(z, dim=1)), got norms {norms.min():.4g}..{norms.max():.4g}"
            )
        if len(bank) == 0 or idx.min() < 0 or idx.max() >= len(bank):
            raise IndexError(
                f"idx must lie in [0, N) = [0, {len(bank)}), got {idx.min()} .. {idx.max()}"
            )
    dtype = torch.float64 if torch.float64 in (z.dtype, bank.dtype) else torch.float32
    return (
        z.to(dtype),
        bank.detach().to(dtype),
        idx.to(bank.device, torch.long, non_blocking=bank.is_cuda),
    )


# ----------------------------------------------------------------------
# Theorem 5.1 made concrete: the same objective with sampled negatives.
# ----------------------------------------------------------------------
def sample_negatives(idx, num_items, num_negatives, generator=None):
    """Uniform negatives for each row: [B] -> LongTensor [B, num_negatives], never equal to idx.

    Each entry is drawn i.i.d. uniformly from the N - 1 indices other than the
    row's own idx: draw r in {0, ..., N-2} and shift r >= idx up by one (why
    not i itself: see ir_nce_loss).  With replacement (i.i.d., as InfoNCE
    assumes), so num_negatives may exceed N - 1.  `generator` (optional) makes
    the draw reproducible; the result lives on the generator's device (idx's
    device if no generator).
    """
    if isinstance(num_items, bool) or num_items != int(num_items) or num_items < 2:
        raise ValueError(
            f"num_items (N) must be an integer >= 2 to have a negative, got {num_items!r}"
        )
    if (
        isinstance(num_negatives, bool)
        or num_negatives != int(num_negatives)
        or not 1 <= num_negatives < 2**31
    ):
        raise ValueError(
            f"num_negatives must be an integer in [1, {2**31 - 1}], got {num_negatives!r}"
        )
    device = generator.device if generator is not None else idx.device
    idx = idx.to(device, torch.long)
    draw = torch.randint(
        0, int(num_items) - 1, (len(idx), int(num_negatives)), generator=generator, device=device
    )
    return draw + (draw >= idx[:, None])  # shift past the positive: uniform over the other N - 1


def ir_nce_loss(z, bank, idx, tau=0.07, num_negatives=4096, generator=None):
    """Eq. 6 with num_negatives uniformly sampled negatives: InfoNCE with K = num_negatives + 1.

    z [B, d] (unit rows), bank [N, d] (N >= 2), idx [B].  Returns a scalar:
        loss = logsumexp(s_i, s_{n_1}, ..., s_{n_K-1}) - s_i,   s_j = z^T M[j] / tau,
    negatives n drawn by `sample_negatives`, uniform over the other N - 1
    entries, never i itself: Theorem 5.1's proof samples the negatives from
    p(x_{j != i}) = prod_{j != i} p(x_j); alias sampling over all N (lemniscate,
    LA's IR) occasionally draws i itself, which then sits in the denominator
    twice and is pushed away from itself.  The chance that a row draws itself
    at least once is 1 - (1 - 1/N)^K: 0.3% at ImageNet (N = 1.28M, K = 4096),
    but 8% for N = 50,000 and almost surely for small toy banks.
    log K - loss is Eq. 2's InfoNCE
    estimate with the training set as the marginal, the form Theorem 5.1 reads
    IR as.  The sampled denominator has expectation exp(s_i) +
    num_negatives / (N-1) * sum_{j != i} exp(s_j), so with num_negatives = N-1
    it is IR's denominator on average (and E[ir_nce_loss] <= ir_loss, by
    Jensen).  The reference IR code instead trains the binary NCE loss of
    lemniscate (P(data) vs P(noise) with a fixed Z); that is a different
    objective, not reproduced here.  The K scores are gathered from the
    [B, N] logits (cheaper than B*K*d for the rows bank[negatives]: 537 MB at
    B = 256, K = 4096, d = 128).  Checks and precision: module docstring; a
    generator on another device than z costs a copy that waits for the GPU.

    To copy: ir_nce_loss, _check_inputs, sample_negatives
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    if len(bank) < 2:
        raise ValueError(
            f"ir_nce_loss needs a bank with N >= 2 entries to draw negatives from, got N = {len(bank)}"
        )
    negatives = sample_negatives(idx, len(bank), num_negatives, generator).to(
        bank.device
    )  # [B, K-1]
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        logits = (z / tau) @ bank.T  # [B, N]: z^T M[j] / tau
        scores = logits.gather(
            1, torch.cat([idx[:, None], negatives], dim=1)
        )  # [B, K], the positive in column 0
        return F.cross_entropy(scores, torch.zeros_like(idx))  # = infonce.infonce_loss(scores)


# ----------------------------------------------------------------------
# Definitions 5.2 and 5.3: negatives from a neighbourhood of the image.
# ----------------------------------------------------------------------
class BackgroundLogits(torch.autograd.Function):
    """logits, neighbours = BackgroundLogits.apply(q, bank, k, anchor=None): B_i, the k rows of bank nearest to
    anchor [B, d] (None: to q), and logits[b, j] = q[b] . bank[neighbours[b, j]].  The backward goes through those
    k rows only (embedding_bag); autograd through topk would multiply a dense [B, N] gradient by the whole bank
    (tests/bench_losses.py, N = 100k, one idle CPU thread: 24 ms, not 76 ms).  No gradient to bank."""

    @staticmethod
    def forward(ctx, q, bank, k, anchor=None):
        if anchor is None:
            logits, neighbours = (q @ bank.T).topk(k, dim=1, sorted=False)
        else:
            neighbours = (anchor @ bank.T).topk(k, dim=1, sorted=False).indices
            logits = (q @ bank.T).gather(1, neighbours)
        ctx.save_for_backward(bank, neighbours)
        return logits, neighbours

    @staticmethod
    def backward(ctx, grad_logits, grad_neighbours):
        bank, neighbours = ctx.saved_tensors
        return (
            F.embedding_bag(neighbours, bank, per_sample_weights=grad_logits, mode="sum"),
            None,
            None,
            None,
        )


def ball_loss(z, bank, idx, tau=0.07, k_background=4096, neighbours_of="z", include_positive=True):
    """Ball Discrimination, Definition 5.2: loss = -log p(i | x, M) / p(B_i | x, M).  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B]; k_background = |B_i| in [1, N]
    (Appendix D: 4096).  B_i is the k_background entries nearest to
      neighbours_of = "z": the current embedding z (what the Local Aggregation
        code, TensorFlow and PyTorch, does: one [B, N] product serves both the
        search and the loss), or
      neighbours_of = "bank": M[i], as the paper's text (Sec. 5.3) defines it
        (a second [B, N] product).  M[i] is its own nearest entry, so i is
        always in B_i then; with "z" only once z has moved close to M[i].
    By Corollary 5.3.1 the softmax normalizer over all N cancels, so
        loss = logsumexp_{k in D_i} (z^T M[k] / tau) - z^T M[i] / tau.
    include_positive = True (default): D_i = B_i with i counted exactly once
        (added if B_i misses it, never twice).  This is the VINCE form of the
        corollary's proof, where the positive y_1 is one of the K terms of the
        sum; loss >= 0 and log |D_i| - loss <= log |D_i|.  The authors' own
        ball/ring code likewise puts the positive into the denominator
        explicitly (though it can count it twice).
    include_positive = False: D_i = B_i exactly, the literal Definition 5.2 and
        the Local Aggregation code's set; i counts only if it is among the k
        nearest.  If it is not, p(i)/p(B_i) can exceed 1 and the loss is
        negative and unbounded below.  With i in B_i this equals the LA code's
        loss for C_i = {i} (Theorem 5.4), whose fixed constant Z cancels.
    With k_background = N and include_positive, ball_loss = ir_loss.
    Checks and precision: module docstring.

    To copy: ball_loss, _check_inputs, BackgroundLogits
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
            f'neighbours_of must be "z" (LA code) or "bank" (the paper\'s M[i]), got {neighbours_of!r}'
        )
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        q = z / tau
        anchor = None if neighbours_of == "z" else bank[idx]
        background, neighbours = BackgroundLogits.apply(
            q, bank, int(k_background), anchor
        )  # [B, k]: z^T M[k] / tau
        positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau
        log_background = torch.logsumexp(
            background, dim=1
        )  # log sum_{k in B_i} exp(z^T M[k] / tau)
        if (
            include_positive
        ):  # count i once: add its term where B_i misses it (logaddexp(a, -inf) = a)
            log_background = torch.logaddexp(
                log_background,
                positive.masked_fill((neighbours == idx[:, None]).any(dim=1), -math.inf),
            )
        return (log_background - positive).mean()


def ann_loss(
    z,
    bank,
    idx,
    tau=0.07,
    k_background=4096,
    k_close=None,
    close_set=None,
    neighbours_of="z",
    include_positive=True,
):
    """Annulus Discrimination, Definition 5.3: loss = -log p(i | x, M) / p(B_i \\ C_i | x, M).  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B]; B_i as in `ball_loss`.
    The close set C_i, removed from the denominator (Example 2: accept a
    negative only between a lower and an upper similarity), is either
      - k_close: the k_close entries of B_i nearest to the same anchor that
        defines B_i (z or M[i]; "bank" costs one more [B, N] product), so
        B_i \\ C_i is the annulus of ranks k_close+1 .. k_background.  Default
        (k_close=None, no close_set): k_background // 10, the inner tenth,
        like the default inner fraction of the authors' later ring code; or
      - close_set: LongTensor [B, c] of bank indices per row (pad with -1), e.g.
        the members of i's clusters; then k_close must stay None.
    The paper does not say whether i belongs to C_i.  With include_positive =
    True (default) the positive is counted once in the denominator in any case
    (the VINCE form, as in `ball_loss`), so loss >= 0.  With False the
    denominator is exactly B_i \\ C_i, i included only if it lies in the
    annulus; an empty annulus then raises ValueError (log of 0) on the CPU
    and gives an infinite loss elsewhere.  k_close = 0 gives ball_loss.
    Checks and precision: module docstring.

    To copy: ann_loss, _check_inputs, BackgroundLogits
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
            f'neighbours_of must be "z" (LA code) or "bank" (the paper\'s M[i]), got {neighbours_of!r}'
        )
    if close_set is not None and k_close is not None:
        raise ValueError(
            "give either k_close (the nearest entries of B_i) or close_set (explicit C_i), not both"
        )
    if close_set is None:
        k_close = k_background // 10 if k_close is None else k_close
        if isinstance(k_close, bool) or k_close != int(k_close) or not 0 <= k_close < k_background:
            raise ValueError(
                f"k_close must be an integer in [0, {k_background - 1}], got {k_close!r}"
            )
    elif not (
        torch.is_tensor(close_set)
        and close_set.dim() == 2
        and close_set.shape[0] == len(z)
        and not close_set.is_floating_point()
        and close_set.dtype != torch.bool
    ):
        raise ValueError(
            f"close_set must be an integer tensor [B, c] = [{len(z)}, c] (pad with -1), got "
            f"{tuple(close_set.shape) if torch.is_tensor(close_set) else type(close_set).__name__}"
        )
    elif (
        close_set.device.type == "cpu"
        and close_set.numel()
        and (close_set.min() < -1 or close_set.max() >= len(bank))
    ):
        raise IndexError(
            f"close_set entries must lie in [0, N) = [0, {len(bank)}) or be -1 (padding)"
        )
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        q = z / tau
        anchor = None if neighbours_of == "z" else bank[idx]
        background, neighbours = BackgroundLogits.apply(
            q, bank, int(k_background), anchor
        )  # [B, k]: z^T M[k] / tau
        positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau
        with torch.no_grad():
            if (
                close_set is None
            ):  # C_i: the k_close members of B_i nearest to B_i's anchor (a top-k of [B, k])
                closeness = (
                    background if anchor is None else (anchor @ bank.T).gather(1, neighbours)
                )
                close = torch.zeros_like(neighbours, dtype=torch.bool)
                close.scatter_(1, closeness.topk(int(k_close), dim=1, sorted=False).indices, True)
            else:  # C_i given: look each member of B_i up in the row's sorted close set (-1 pads never match)
                members = F.pad(
                    close_set.to(neighbours.device, torch.long, non_blocking=neighbours.is_cuda),
                    (0, 1),
                    value=-1,
                )
                members = members.sort(dim=1).values
                close = members.gather(
                    1, torch.searchsorted(members, neighbours).clamp_max(members.shape[1] - 1)
                )
                close = close == neighbours
            if (
                include_positive
            ):  # take i out of the annulus wherever it is; its term is added once below
                close |= neighbours == idx[:, None]
            elif z.device.type == "cpu" and close.all(dim=1).any():
                raise ValueError(
                    "B_i \\ C_i is empty for some row (close_set covers all of B_i); "
                    "use include_positive=True or a smaller close set"
                )
        log_annulus = torch.logsumexp(
            background.masked_fill(close, -math.inf), dim=1
        )  # log p(B_i \ C_i) + log Z
        if include_positive:
            log_annulus = torch.logaddexp(log_annulus, positive)
        return (log_annulus - positive).mean()


# ----------------------------------------------------------------------
# Demo: the four losses on a synthetic bank, and the checks of Section 5.3.
# ----------------------------------------------------------------------
def make_synthetic_bank(num_items, dim, num_clusters, spread, generator):
    """A clustered unit-norm bank [N, d] (so neighbourhoods mean something) and each row's cluster [N]."""
    centres = torch.nn.functional.normalize(
        torch.randn(num_clusters, dim, generator=generator), dim=1
    )
    labels = torch.randint(0, num_clusters, (num_items,), generator=generator)
    bank = centres[labels] + spread * torch.randn(num_items, dim, generator=generator) / math.sqrt(
        dim
    )
    return torch.nn.functional.normalize(bank, dim=1), labels


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Section 5.3 on a synthetic memory bank: IR (Eq. 6), IR with sampled negatives "
        "(Theorem 5.1), Ball (Def. 5.2) and Annulus (Def. 5.3) Discrimination, with numerical checks of "
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
    z = torch.nn.functional.normalize(
        bank[idx] + noise, dim=1
    )  # a "view" of image i near its entry M[i]
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
        f"{'loss':<28} | {'value':>8} | {'K (denominator size)':>20} | {'log K - loss':>12} | {'forward ms':>10}"
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
        others = s.masked_fill(torch.nn.functional.one_hot(idx, args.num_items).bool(), -math.inf)
        others = others.sort(dim=1).values[
            :, 1:
        ]  # drop the masked positive: N - 1 negatives per row
        nce = float(infonce.infonce_bound(torch.cat([positive, others], dim=1)))
    ir = float(ir_loss(z, bank, idx, args.tau))
    print(
        f"\nTheorem 5.1: infonce.infonce_bound over all N = {nce:.6f};  log N - ir_loss = "
        f"{math.log(args.num_items) - ir:.6f};  difference {abs(nce - (math.log(args.num_items) - ir)):.1e}"
    )

    # Corollary 5.3.1: log p(i)/p(B_i) from the full-softmax probabilities equals the direct form over B_i.
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
        f"Corollary 5.3.1: mean log p(i)/p(B_i) from full-softmax probabilities = {float(via_probabilities):.6f}; "
        f"direct form over B_i = {direct:.6f} (the 1/sum over N cancels)"
    )

    # The fp16 pitfall: exp(dot / tau) overflows half precision, log space does not.
    naive = torch.exp((z.half() @ bank.half().T) / args.tau)
    half = float(
        ir_loss(torch.nn.functional.normalize(z.half(), dim=1), bank.half(), idx, args.tau)
    )
    print(
        f"fp16: naive exp(z.M/tau) has {int(torch.isinf(naive).sum())} inf entries of {naive.numel()}; "
        f"ir_loss on fp16 inputs = {half:.4f} (fp32: {ir:.4f})"
    )


if __name__ == "__main__":
    main()
