"""Instance Discrimination and its neighbourhood variants: Eq. 6, Theorem 5.1, Definitions 5.2 and 5.3.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 5.3.

Every loss here is a plain function of tensors that needs only torch (copy it
together with the small private helpers above it: `_check_inputs`,
`_full_precision`, `_LogSumExp`, `_SelectedLogits`, and `_background_set`
for BALL / ANN):

    z    [B, d]  the encoder outputs E(v(x_i, a)) for one view of each image,
                 L2-normalized (checked: a ValueError otherwise);
    bank [N, d]  the memory bank M (e.g. MemoryBank.vectors), unit rows (not
                 checked: that would cost as much as the loss); keep it in
                 float32 (MemoryBank does): a half-precision bank is upcast,
                 i.e. copied, on every call;
    idx  [B]     each image's dataset index i, in [0, N) (IndexError otherwise);
    tau          the temperature of Eq. 6.

All losses are MINIMIZED: they are the negated objectives, loss = -L.  They
work in log space in float32 (float64 if given float64; autocast is switched
off inside, see `_full_precision`): exp(z^T M[j] / tau) is
never formed, so fp16 / bf16 inputs at tau = 0.07 stay finite (exp(1/0.07) =
1.6e6 would overflow fp16's 65504).  Gradients reach z only: the bank is a
buffer refreshed by Eq. 7 (memory_bank.py), so it is detached here.

Cost: each loss builds one [B, N] tensor, the similarities z M^T / tau (the
matmul is the work floor); everything else (top-k, masks, the positive) lives
on [B] or [B, k] slices.  IR needs all N similarities in its backward pass.
IR-NCE, BALL and ANN use only k of them per row, so their similarities are
computed without autograd, the [B, N] matrix is freed right after the top-k /
gather, and the backward pass touches only the k chosen bank rows
(`_SelectedLogits`: O(B k d) work, no [B, N] gradient, no second matmul).

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
import contextlib
import functools
import math
import numbers
import time

import torch


# ----------------------------------------------------------------------
# Argument checks (one host sync for all data-dependent checks).
# ----------------------------------------------------------------------
def _check_inputs(z, bank, idx, tau):
    """Validate the common arguments; return (z, bank detached, both float32 or float64; idx as int64)."""
    if not torch.is_tensor(z) or z.dim() != 2 or not z.dtype.is_floating_point:
        raise ValueError(f"z must be a floating-point tensor [B, d], got {_describe(z)}")
    if not torch.is_tensor(bank) or bank.dim() != 2 or not bank.dtype.is_floating_point:
        raise ValueError(f"bank must be a floating-point tensor [N, d] (e.g. MemoryBank.vectors), got {_describe(bank)}")
    if z.shape[0] < 1 or bank.shape[0] < 1:
        raise ValueError(f"need B >= 1 rows in z and N >= 1 rows in bank, got z {tuple(z.shape)}, bank {tuple(bank.shape)}")
    if z.shape[1] != bank.shape[1]:
        raise ValueError(f"z [B, d] and bank [N, d] must share d, got z {tuple(z.shape)} and bank {tuple(bank.shape)}")
    if (not torch.is_tensor(idx) or idx.dim() != 1 or idx.shape[0] != z.shape[0]
            or idx.dtype.is_floating_point or idx.dtype == torch.bool):
        raise ValueError(f"idx must be a 1-D integer tensor [B] = [{z.shape[0]}], got {_describe(idx)}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (0.0 < float(tau) < math.inf):
        raise ValueError(f"tau (the temperature of Eq. 6) must be a finite number > 0, got {tau!r}")
    # fp16 / bf16 are upcast to float32 (float64 inputs stay float64); a no-op for float32.
    dtype = torch.float64 if torch.float64 in (z.dtype, bank.dtype) else torch.float32
    z32 = z.to(dtype)
    bank32 = bank.detach().to(dtype)  # the bank is a buffer: no gradient ever flows into it
    idx = idx.to(device=bank.device, dtype=torch.long)
    # One host round trip for the data-dependent checks.
    with torch.no_grad():
        norms = z32.norm(dim=1)
        low, high, idx_low, idx_high = torch.stack(
            [norms.min().double(), norms.max().double(), idx.min().double(), idx.max().double()]
        ).tolist()
    # The check catches a forgotten F.normalize (norms far from 1) but accepts unit
    # vectors rounded to bf16 (8 mantissa bits: norms off by up to ~4e-3), also
    # after they are upcast to float32 -- what a mixed-precision encoder hands over.
    tolerance = 1e-2
    if not (abs(low - 1.0) <= tolerance and abs(high - 1.0) <= tolerance):
        raise ValueError(
            f"z must be L2-normalized along dim 1 (row norms within {tolerance:g} of 1), got norms in "
            f"[{low:.4g}, {high:.4g}]; use torch.nn.functional.normalize(z, dim=1)"
        )
    if idx_low < 0 or idx_high >= bank.shape[0]:
        raise IndexError(f"idx must lie in [0, N) = [0, {bank.shape[0]}), got values in [{int(idx_low)}, {int(idx_high)}]")
    return z32, bank32, idx


def _check_count(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _describe(x):
    return f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__


def _full_precision(loss_fn):
    """Run a loss with autocast switched off, so its matmuls and logsumexps stay in float32.

    A trainer using torch.autocast (mixed precision) would otherwise get the
    [B, N] similarities in fp16 / bf16: at tau = 0.07 the logits reach 14.3,
    where bf16 resolves only steps of 0.06.  Inputs of any dtype are still
    accepted; they are upcast inside.
    """

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        with _no_autocast():
            return loss_fn(*args, **kwargs)

    return wrapper


def _no_autocast():
    """A context that disables autocast on CUDA and on the CPU (also used in the backward passes below)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
    stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
    return stack


class _SelectedLogits(torch.autograd.Function):
    """logits[b, j] = q[b] . bank[cols[b, j]] for chosen columns, reusing values already computed.

    forward(q [B, d], bank [N, d], cols [B, k], values [B, k]) returns `values`
    (taken from a no-grad q @ bank.T, so nothing is recomputed) and records
    that they depend on q.  backward: grad_q[b] = sum_j grad[b, j] bank[cols[b, j]],
    an embedding_bag over the k chosen rows: O(B k d) work.  Differentiating
    `(q @ bank.T).topk(k)` with plain autograd would instead keep the [B, N]
    product alive, scatter the gradient into a dense [B, N] zero tensor and
    run a second [B, N] x [N, d] matmul.  The bank gets no gradient (a buffer).
    """

    @staticmethod
    def forward(ctx, q, bank, cols, values):
        ctx.save_for_backward(bank, cols)
        return values

    @staticmethod
    def backward(ctx, grad):
        bank, cols = ctx.saved_tensors
        with _no_autocast():
            grad_q = torch.nn.functional.embedding_bag(cols, bank, per_sample_weights=grad.to(bank.dtype), mode="sum")
        return grad_q, None, None, None


class _LogSumExp(torch.autograd.Function):
    """torch.logsumexp(x, dim=1) for x [B, k] (entries may be -inf), with a leaner pass: -> [B].

    Same value and gradient as torch.logsumexp, computed through the fused
    softmax kernel (on one CPU thread about 6x faster forward + backward at
    [256, 4096], measured; torch.logsumexp's backward re-derives the softmax
    in three separate passes):
      forward:  p = softmax(x), logsumexp = max_j x_j - log max_j p_j, exact
                because the largest probability is exp(max - logsumexp) >= 1/k
                and never underflows;
      backward: grad_x = grad * p, the saved softmax.
    A row of only -inf (an empty set) gives -inf and a zero gradient.
    """

    @staticmethod
    def forward(ctx, x):
        largest = x.amax(dim=1)  # [B]
        probabilities = torch.softmax(x, dim=1)  # [B, k]
        log_sum = largest - torch.log(probabilities.amax(dim=1))
        empty = torch.isneginf(largest)
        if bool(empty.any()):  # softmax of an all -inf row is NaN: define the empty sum as 0
            probabilities = probabilities.masked_fill(empty[:, None], 0.0)
            log_sum = log_sum.masked_fill(empty, -math.inf)
        ctx.save_for_backward(probabilities)
        return log_sum

    @staticmethod
    def backward(ctx, grad):
        (probabilities,) = ctx.saved_tensors
        return grad[:, None] * probabilities


class _LogSumExpSimilarities(torch.autograd.Function):
    """logsumexp_j q[b] . bank[j] for every row b: [B, d], [N, d] -> [B].

    The same value and gradient as autograd through torch.logsumexp(q @ bank.T,
    dim=1), computed like `_LogSumExp` (p = softmax(q bank^T), which is Eq. 6's
    p(j | x, M); logsumexp = max - log max p) with a backward that needs no new
    [B, N] tensor: grad_q = grad * (p @ bank).  Measured on a CPU at N = 100k:
    forward + backward about 15% faster than autograd through logsumexp.
    """

    @staticmethod
    def forward(ctx, q, bank):
        logits = q @ bank.T  # [B, N]
        largest = logits.amax(dim=1)  # [B]
        probabilities = torch.softmax(logits, dim=1)  # [B, N]
        del logits  # only p is kept for the backward pass
        log_partition = largest - torch.log(probabilities.amax(dim=1))
        ctx.save_for_backward(probabilities, bank)
        return log_partition

    @staticmethod
    def backward(ctx, grad):
        probabilities, bank = ctx.saved_tensors
        with _no_autocast():
            return grad[:, None] * (probabilities @ bank), None


# ----------------------------------------------------------------------
# Eq. 6: Instance Discrimination over all N entries.
# ----------------------------------------------------------------------
@_full_precision
def ir_loss(z, bank, idx, tau=0.07):
    """-log p(i | x, M), Eq. 6, averaged over the batch.  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B], tau > 0.
        p(i | x, M) = exp(z^T M[i] / tau) / sum_{j=1..N} exp(z^T M[j] / tau)
        loss = logsumexp_j (z^T M[j] / tau) - z^T M[i] / tau
    The paper (Sec. 5.3): "InfoNCE and VINCE only require a LOGSUMEXP"; it is
    computed stably (`_LogSumExpSimilarities`: max - log of the largest
    softmax probability; nothing is exponentiated without subtracting the
    row maximum first).  Same value as lemniscate.pytorch's full-softmax IR
    (LinearAverage + CrossEntropyLoss).  Theorem 5.1: log N - ir_loss is
    InfoNCE (Eq. 2) with K = N, the positive plus all N - 1 other entries.
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    q = z / tau  # scaling the [B, d] query, not the [B, N] product, saves a pass over N
    log_partition = _LogSumExpSimilarities.apply(q, bank)  # [B]: logsumexp_j z^T M[j] / tau over all N
    positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau from the [B, d] rows
    return (log_partition - positive).mean()


# ----------------------------------------------------------------------
# Theorem 5.1 made concrete: the same objective with sampled negatives.
# ----------------------------------------------------------------------
def sample_negatives(idx, num_items, num_negatives, generator=None):
    """Uniform negatives for each row: [B] -> LongTensor [B, num_negatives], never equal to idx.

    Each entry is drawn i.i.d. uniformly from the N - 1 indices other than the
    row's own idx: draw r in {0, ..., N-2} and shift r >= idx up by one.  The
    positive is excluded because Theorem 5.1's proof samples the negatives from
    p(x_{j != i}) = prod_{j != i} p(x_j); alias sampling over all N (lemniscate,
    LA's IR) occasionally draws i itself, which then sits in the denominator
    twice and is pushed away from itself.  The chance that a row draws itself
    at least once is 1 - (1 - 1/N)^K: 0.3% at ImageNet (N = 1.28M, K = 4096),
    but 8% for N = 50,000 and almost surely for small toy banks.
    Draws are with replacement (i.i.d., as InfoNCE assumes), so num_negatives
    may exceed N - 1.  `generator` (optional) makes the draw reproducible; the
    result lives on the generator's device (idx's device if no generator).
    """
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items < 2:
        raise ValueError(f"num_items (N) must be an integer >= 2 to have a negative, got {num_items!r}")
    _check_count(num_negatives, "num_negatives", 1, 2**31 - 1)
    device = generator.device if generator is not None else idx.device
    idx = idx.to(device=device, dtype=torch.long)
    draw = torch.randint(0, num_items - 1, (idx.shape[0], num_negatives), generator=generator, device=device)
    return draw.add_(draw >= idx[:, None])  # shift past the positive: uniform over the other N - 1


@_full_precision
def ir_nce_loss(z, bank, idx, tau=0.07, num_negatives=4096, generator=None):
    """Eq. 6 with num_negatives uniformly sampled negatives: InfoNCE with K = num_negatives + 1.

    z [B, d] (unit rows), bank [N, d] (N >= 2), idx [B].  Returns a scalar:
        loss = logsumexp(s_i, s_{n_1}, ..., s_{n_K-1}) - s_i,   s_j = z^T M[j] / tau,
    negatives n drawn by `sample_negatives` (uniform over the other N - 1
    entries, never i itself; see there why).  log K - loss is Eq. 2's InfoNCE
    estimate with the training set as the marginal, the form Theorem 5.1 reads
    IR as.  The sampled denominator has expectation exp(s_i) +
    num_negatives / (N-1) * sum_{j != i} exp(s_j), so with num_negatives = N-1
    it is IR's denominator on average (and E[ir_nce_loss] <= ir_loss, by
    Jensen).  The reference IR code instead trains the binary NCE loss of
    lemniscate (P(data) vs P(noise) with a fixed Z); that is a different
    objective, not reproduced here.

    The negatives' similarities are gathered from the [B, N] product (the same
    work floor as the other losses) and differentiated through the K-1 sampled
    rows only.  Computing them from the gathered rows bank[negatives] instead
    ([B, K, d]) would need B*K*d rather than B*N*d multiply-adds but B*K*d*4
    bytes (537 MB for B=256, K=4096, d=128).
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    if bank.shape[0] < 2:
        raise ValueError(f"ir_nce_loss needs a bank with N >= 2 entries to draw negatives from, got N = {bank.shape[0]}")
    negatives = sample_negatives(idx, bank.shape[0], num_negatives, generator).to(bank.device)  # [B, K-1]
    q = z / tau  # scaling the [B, d] query, not the [B, N] product
    with torch.no_grad():
        values = (q.detach() @ bank.T).gather(1, negatives)  # the [B, N] product is freed at once
    negative = _SelectedLogits.apply(q, bank, negatives, values)  # [B, K-1], gradient to z only
    positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau
    # log(exp(s_i) + sum_n exp(s_n)): the K terms of Eq. 2's sum, the positive first.
    log_denominator = torch.logaddexp(positive, _LogSumExp.apply(negative))
    return (log_denominator - positive).mean()


# ----------------------------------------------------------------------
# Definitions 5.2 and 5.3: negatives from a neighbourhood of the image.
# ----------------------------------------------------------------------
def _background_set(q, bank, idx, k_background, neighbours_of):
    """The background set B_i of Definitions 5.2 / 5.3, and the logits to its members.

    q = z / tau [B, d].  Returns (neighbours [B, k]: bank indices of B_i,
    background [B, k]: q . M[k] for k in B_i, differentiable w.r.t. q,
    closeness [B, k]: the similarity that ranked them, z . M[k] or M[i] . M[k]).

    neighbours_of = "z": B_i = the k entries nearest to the current embedding z
        (what the Local Aggregation code, TensorFlow and PyTorch, does: top-k of
        z M^T).  One [B, N] product serves both the search and the loss.
    neighbours_of = "bank": B_i = the k entries nearest to M[i], as the paper's
        text (Sec. 5.3) defines it.  Needs a second [B, N] product (one at a
        time, so the peak memory is unchanged, but twice the matmul time).
        M[i] is its own nearest entry, so i is always in B_i here; with "z", i
        is in B_i only if M[i] is among z's k nearest, typical once training
        has aligned z with M[i] but not at the start.
    The two coincide when z = M[i]; they differ by how far the current view has
    moved from the stored average of past views (Eq. 9).
    """
    with torch.no_grad():  # [B, N] products only inside here; each is freed as soon as it is used
        if neighbours_of == "z":
            values, neighbours = torch.topk(q.detach() @ bank.T, k_background, dim=1, sorted=False)
            closeness = values
        elif neighbours_of == "bank":
            closeness, neighbours = torch.topk(bank[idx] @ bank.T, k_background, dim=1, sorted=False)
            values = (q.detach() @ bank.T).gather(1, neighbours)
        else:
            raise ValueError(f'neighbours_of must be "z" (LA code) or "bank" (the paper\'s M[i]), got {neighbours_of!r}')
    background = _SelectedLogits.apply(q, bank, neighbours, values)  # [B, k], gradient to z only
    return neighbours, background, closeness


@_full_precision
def ball_loss(z, bank, idx, tau=0.07, k_background=4096, neighbours_of="z", include_positive=True):
    """Ball Discrimination, Definition 5.2: loss = -log p(i | x, M) / p(B_i | x, M).  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B]; k_background = |B_i| in [1, N]
    (Appendix D: 4096); neighbours_of "z" or "bank" (see `_background_set`).

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
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    k_background = _check_count(k_background, "k_background", 1, bank.shape[0])
    q = z / tau
    neighbours, background, _ = _background_set(q, bank, idx, k_background, neighbours_of)
    positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau
    log_background = _LogSumExp.apply(background)  # [B]: log sum_{k in B_i} exp(z^T M[k] / tau)
    if include_positive:
        # Count i once: add its term only in rows whose B_i misses it.
        in_background = (neighbours == idx[:, None]).any(dim=1)  # [B]
        log_background = torch.where(in_background, log_background, torch.logaddexp(log_background, positive))
    return (log_background - positive).mean()


@_full_precision
def ann_loss(z, bank, idx, tau=0.07, k_background=4096, k_close=None, close_set=None, neighbours_of="z",
             include_positive=True):
    """Annulus Discrimination, Definition 5.3: loss = -log p(i | x, M) / p(B_i \\ C_i | x, M).  Returns a scalar.

    z [B, d] (unit rows), bank [N, d], idx [B]; B_i as in `ball_loss`.
    The close set C_i, removed from the denominator (Example 2: accept a
    negative only between a lower and an upper similarity), is either
      - k_close: the k_close entries of B_i nearest to the same anchor that
        defines B_i (z or M[i]), so B_i \\ C_i is the annulus of ranks
        k_close+1 .. k_background.  Default (k_close=None, no close_set):
        k_background // 10, the inner tenth, like the default inner fraction of
        the authors' later ring code; or
      - close_set: LongTensor [B, c] of bank indices per row (pad with -1), e.g.
        the members of i's clusters; then k_close must stay None.
    The paper does not say whether i belongs to C_i.  With include_positive =
    True (default) the positive is counted once in the denominator in any case
    (the VINCE form, as in `ball_loss`), so loss >= 0.  With False the
    denominator is exactly B_i \\ C_i, i included only if it lies in the
    annulus; an empty annulus then raises ValueError (log of 0).
    k_close = 0 gives ball_loss.
    """
    z, bank, idx = _check_inputs(z, bank, idx, tau)
    k_background = _check_count(k_background, "k_background", 1, bank.shape[0])
    if close_set is not None and k_close is not None:
        raise ValueError("give either k_close (the nearest entries of B_i) or close_set (explicit C_i), not both")
    if close_set is None:
        k_close = k_background // 10 if k_close is None else k_close
        k_close = _check_count(k_close, "k_close", 0, k_background - 1)  # keep at least one entry in the annulus
    else:
        if (not torch.is_tensor(close_set) or close_set.dim() != 2 or close_set.shape[0] != z.shape[0]
                or close_set.dtype.is_floating_point or close_set.dtype == torch.bool):
            raise ValueError(f"close_set must be an integer tensor [B, c] = [{z.shape[0]}, c] (pad with -1), "
                             f"got {_describe(close_set)}")
        if close_set.numel() and (int(close_set.min()) < -1 or int(close_set.max()) >= bank.shape[0]):
            raise IndexError(f"close_set entries must lie in [0, N) = [0, {bank.shape[0]}) or be -1 (padding)")

    q = z / tau
    neighbours, background, closeness = _background_set(q, bank, idx, k_background, neighbours_of)
    positive = (q * bank[idx]).sum(dim=1)  # [B]: z^T M[i] / tau
    with torch.no_grad():
        if close_set is None:
            # C_i = the k_close entries of B_i ranked highest by the anchor: a top-k on the [B, k] slice.
            close = torch.zeros_like(neighbours, dtype=torch.bool)
            if k_close > 0:
                close.scatter_(1, torch.topk(closeness, k_close, dim=1, sorted=False).indices, True)
        elif close_set.shape[1] == 0:
            close = torch.zeros_like(neighbours, dtype=torch.bool)
        else:
            # Membership of each neighbour in the row's close set: binary search in the sorted set.
            members = torch.sort(close_set.to(neighbours.device, torch.long), dim=1).values  # [B, c]
            where = torch.searchsorted(members, neighbours).clamp_max(members.shape[1] - 1)  # [B, k]
            close = members.gather(1, where) == neighbours
    if include_positive:
        # Take i out of the annulus wherever it is, then add its term once to every row.
        drop = close | (neighbours == idx[:, None])  # [B, k]
        log_annulus = _LogSumExp.apply(background.masked_fill(drop, -math.inf))  # -inf if all dropped
        log_denominator = torch.logaddexp(log_annulus, positive)
    else:
        if not bool((~close).any(dim=1).all()):
            raise ValueError("B_i \\ C_i is empty for some row (close_set covers all of B_i); "
                             "use include_positive=True or a smaller close set")
        log_denominator = _LogSumExp.apply(background.masked_fill(close, -math.inf))
    return (log_denominator - positive).mean()


# ----------------------------------------------------------------------
# Demo: the four losses on a synthetic bank, and the checks of Section 5.3.
# ----------------------------------------------------------------------
def make_synthetic_bank(num_items, dim, num_clusters, spread, generator):
    """A clustered unit-norm bank [N, d] (so neighbourhoods mean something) and each row's cluster [N]."""
    centres = torch.nn.functional.normalize(torch.randn(num_clusters, dim, generator=generator), dim=1)
    labels = torch.randint(0, num_clusters, (num_items,), generator=generator)
    bank = centres[labels] + spread * torch.randn(num_items, dim, generator=generator) / math.sqrt(dim)
    return torch.nn.functional.normalize(bank, dim=1), labels


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Section 5.3 on a synthetic memory bank: IR (Eq. 6), IR with sampled negatives "
        "(Theorem 5.1), Ball (Def. 5.2) and Annulus (Def. 5.3) Discrimination, with numerical checks of "
        "Theorem 5.1 and of the cancellation in Corollary 5.3.1."
    )
    parser.add_argument("--num-items", type=int, default=20000, help="N, the size of the training set / memory bank")
    parser.add_argument("--dim", type=int, default=128, help="d, the embedding size (Appendix D: 128)")
    parser.add_argument("--batch-size", type=int, default=256, help="B, images per step (Appendix D: 256)")
    parser.add_argument("--tau", type=float, default=0.07, help="temperature tau of Eq. 6 (Appendix D: 0.07)")
    parser.add_argument("--k-background", type=int, default=4096,
                        help="|B_i|, the background neighbours of Def. 5.2/5.3 (Appendix D: 4096)")
    parser.add_argument("--k-close", type=int, default=None,
                        help="|C_i| for ANN, the nearest part of B_i left out (default: k_background // 10)")
    parser.add_argument("--num-negatives", type=int, default=4096,
                        help="uniform negatives for IR-NCE, i.e. InfoNCE with K = num_negatives + 1")
    parser.add_argument("--neighbours-of", choices=["z", "bank"], default="z",
                        help='anchor of B_i: "z" = the current embedding (LA code), "bank" = M[i] (paper text)')
    parser.add_argument("--view-noise", type=float, default=1.0,
                        help="how far the current view z lies from its stored entry M[i] (noise scale)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic bank and views")
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
    bank, _ = make_synthetic_bank(args.num_items, args.dim, num_clusters=max(1, args.num_items // 100),
                                  spread=1.0, generator=generator)
    idx = torch.randperm(args.num_items, generator=generator)[: args.batch_size]
    noise = args.view_noise * torch.randn(args.batch_size, args.dim, generator=generator) / math.sqrt(args.dim)
    z = torch.nn.functional.normalize(bank[idx] + noise, dim=1)  # a "view" of image i near its entry M[i]
    print(f"synthetic bank N={args.num_items}, d={args.dim}, B={args.batch_size}, tau={args.tau}, "
          f"|B_i|={args.k_background}, B_i around {args.neighbours_of!r}\n")

    k_close = args.k_close if args.k_close is not None else args.k_background // 10
    other = "bank" if args.neighbours_of == "z" else "z"
    ir_loss(z, bank, idx, args.tau)  # warm-up, so the first timing is not the allocator's
    rows = [
        ("IR (Eq. 6)", lambda: ir_loss(z, bank, idx, args.tau), args.num_items),
        (f"IR-NCE, K={args.num_negatives + 1}",
         lambda: ir_nce_loss(z, bank, idx, args.tau, args.num_negatives, torch.Generator().manual_seed(1)),
         args.num_negatives + 1),
        ("BALL (Def. 5.2)", lambda: ball_loss(z, bank, idx, args.tau, args.k_background, args.neighbours_of),
         args.k_background),
        (f"BALL, B_i around {other!r}", lambda: ball_loss(z, bank, idx, args.tau, args.k_background, other),
         args.k_background),
        (f"ANN (Def. 5.3), |C_i|={k_close}",
         lambda: ann_loss(z, bank, idx, args.tau, args.k_background, k_close, neighbours_of=args.neighbours_of),
         args.k_background - k_close),
    ]
    print(f"{'loss':<28} | {'value':>8} | {'K (denominator size)':>20} | {'log K - loss':>12} | {'forward ms':>10}")
    for name, fn, size in rows:
        start = time.perf_counter()
        value = float(fn())
        ms = 1000 * (time.perf_counter() - start)
        print(f"{name:<28} | {value:8.4f} | {size:>20} | {math.log(size) - value:12.4f} | {ms:10.1f}")
    print("(log K - loss is the InfoNCE / VINCE estimate of Eq. 2 / Eq. 4, at most log K; "
          "for BALL/ANN K counts the positive once more if B_i misses it)")

    # Theorem 5.1: IR = InfoNCE over all N entries, up to the constant log N.
    import infonce  # only for the check; the losses need nothing but torch

    with torch.no_grad():
        s = z @ bank.T / args.tau
        positive = s.gather(1, idx[:, None])
        others = s.masked_fill(torch.nn.functional.one_hot(idx, args.num_items).bool(), -math.inf)
        others = others.sort(dim=1).values[:, 1:]  # drop the masked positive: N - 1 negatives per row
        nce = float(infonce.infonce_bound(torch.cat([positive, others], dim=1)))
    ir = float(ir_loss(z, bank, idx, args.tau))
    print(f"\nTheorem 5.1: infonce.infonce_bound over all N = {nce:.6f};  log N - ir_loss = "
          f"{math.log(args.num_items) - ir:.6f};  difference {abs(nce - (math.log(args.num_items) - ir)):.1e}")

    # Corollary 5.3.1: log p(i)/p(B_i) from the full-softmax probabilities equals the direct form over B_i.
    with torch.no_grad():
        s64 = (z.double() @ bank.double().T) / args.tau
        log_p = torch.log_softmax(s64, dim=1)  # log p(j | x, M), normalized over all N
        if args.neighbours_of == "z":
            neighbours = torch.topk(s64, args.k_background, dim=1).indices
        else:
            neighbours = torch.topk(bank.double()[idx] @ bank.double().T, args.k_background, dim=1).indices
        in_ball = torch.zeros_like(s64, dtype=torch.bool).scatter_(1, neighbours, True)
        in_ball[torch.arange(args.batch_size), idx] = True  # D_i = B_i with the positive counted once
        via_probabilities = (log_p.gather(1, idx[:, None])[:, 0]
                             - torch.log(log_p.exp().masked_fill(~in_ball, 0.0).sum(dim=1))).mean()
    direct = -float(ball_loss(z.double(), bank.double(), idx, args.tau, args.k_background, args.neighbours_of))
    print(f"Corollary 5.3.1: mean log p(i)/p(B_i) from full-softmax probabilities = {float(via_probabilities):.6f}; "
          f"direct form over B_i = {direct:.6f} (the 1/sum over N cancels)")

    # The fp16 pitfall: exp(dot / tau) overflows half precision, log space does not.
    naive = torch.exp((z.half() @ bank.half().T) / args.tau)
    half = float(ir_loss(torch.nn.functional.normalize(z.half(), dim=1), bank.half(), idx, args.tau))
    print(f"fp16: naive exp(z.M/tau) has {int(torch.isinf(naive).sum())} inf entries of {naive.numel()}; "
          f"ir_loss on fp16 inputs = {half:.4f} (fp32: {ir:.4f})")


if __name__ == "__main__":
    main()
