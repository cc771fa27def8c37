"""The memory bank of Instance Discrimination and Local Aggregation: Eq. 7 and Eq. 9.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in
Unsupervised Representation Learning", Section 5.3.

What the bank is
----------------
IR (Eq. 6) needs E(v(x_j, a))^T M[j] for all N training images j.  Re-encoding
all N images every step is impossible, so the bank M ([N, d]) stores one
vector per image and is refreshed only for the images of the current batch:

    Eq. 7:   M[i] <- alpha * M[i] + (1 - alpha) * E(v(x_i, a))

Unrolled over the epochs (each image is seen once per epoch), the row is a
weighted sum of the views seen so far, newest first (Eq. 9):

    M[i] = sum_j alpha^(j-1) E(v(x_i, a_j))     (up to the factor (1 - alpha))

so M[i] "remembers" about n_alpha views.  `python memory_bank.py` prints the
weights, several definitions of n_alpha, and what re-normalization does to them.

Re-normalization (not in the paper's Eq. 7)
-------------------------------------------
The reference implementations (lemniscate.pytorch, the Local Aggregation code)
L2-normalize the row after every Eq. 7 step, so every row stays on the unit
sphere and M[i]^T z is a cosine.  The paper's Eq. 7 and Eq. 9 omit this.  It
changes Eq. 9: each step multiplies the whole row by c = 1/||alpha M[i] + (1-alpha) v|| >= 1,
and since old views are multiplied by c once per later step, they decay like
(alpha * c)^(j-1) instead of alpha^(j-1).  When successive views agree
(v close to M[i]) c is about 1 and Eq. 9 holds; when they are unrelated
(orthogonal) c = 1/sqrt(alpha^2 + (1-alpha)^2) and the memory gets much longer
(alpha = 0.9 then decays like 0.994 per epoch, not 0.9).  The demo measures it.
"""

import argparse
import math
import numbers
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


class MemoryBank:
    """A non-trainable [N, d] buffer of unit vectors, one row per training image.

    MemoryBank(size, dim, device=None, seed=0)
        size: N, the number of training images (rows); dim: d, the embedding size.
        Rows start i.i.d. uniform on the unit sphere (a normalized Gaussian),
        drawn on the CPU from `seed` so every process / device gets the same bank.

    .vectors is the buffer itself ([N, d] float32, requires_grad False): pass it
    to the losses in instance_disc.py / local_agg.py as `bank`.  Methods never
    replace it (update and load_state_dict write into it), so a reference to
    .vectors taken earlier stays valid.
    """

    def __init__(self, size, dim, device=None, seed=0):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(
                f"size (N, the number of bank rows) must be an integer >= 1, got {size!r}"
            )
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"dim (d, the embedding size) must be an integer >= 1, got {dim!r}")
        self.size, self.dim, self.seed = int(size), int(dim), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        # A normalized standard Gaussian is uniform on the sphere S^(d-1).
        vectors = torch.randn(self.size, self.dim, generator=generator)
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        self.vectors = vectors.to(device) if device is not None else vectors
        self.num_updates = 0  # update() calls so far; part of the checkpoint

    @torch.no_grad()
    def update(self, indices, vectors, alpha, renormalize=True):
        """Eq. 7 for the rows `indices`, then re-normalization: M[i] <- alpha M[i] + (1-alpha) v.

        indices [B]: each image's row; -1 marks a padding row (no update).  Best left on the CPU,
            where the DataLoader puts them: they are read on the host only.
        vectors [B, d]: the embeddings E(v(x_i, a)) the loss saw, unit rows (checked on the CPU).
        alpha in [0, 1): 0 stores the newest view (Appendix D: 0.5).
        renormalize: True, as the reference code does (rows stay unit vectors); False, the literal
            Eq. 7, whose rows leave the sphere (for studying Eq. 9 only).
        Under torch.distributed every rank applies every rank's rows, rank 0's first; an index
        that occurs more than once gets Eq. 7 once per occurrence, in order.
        """
        _check_update(self, indices, vectors, alpha, renormalize)
        for rows, new in _rounds(self, indices, vectors):  # all ranks' rows, duplicates in turn
            # Eq. 7: M[i] <- alpha*M[i] + (1-alpha)*E(v(x_i, a))
            mixed = alpha * self.vectors[rows] + (1.0 - alpha) * new  # gather and mix
            if renormalize:  # not in the paper's Eq. 7; the reference code re-normalizes
                mixed = F.normalize(mixed, dim=1)
            self.vectors.index_copy_(0, rows, mixed)  # write (rows are unique within a round)
        self.num_updates += 1

    # ------------------------------------------------------------------
    # Neighbour queries (no copy of the bank).
    # ------------------------------------------------------------------
    def similarities(self, z):
        """z @ M^T: [B, d] -> [B, N].  Cosine similarities when z has unit rows (bank rows do).

        Uses the transposed view of the buffer, so the bank is not copied; z is
        cast to the bank's dtype.  Gradients flow to z, never to the bank.
        """
        if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be a tensor [B, d] with d = {self.dim}, got {z!r:.80}")
        return z.to(self.vectors.dtype) @ self.vectors.T

    def topk(self, z, k):
        """The k bank rows nearest to each row of z by cosine: (values, indices), [B, k], sorted."""
        if isinstance(k, bool) or int(k) != k or not (1 <= k <= self.size):
            raise ValueError(f"k must be an integer in [1, N] = [1, {self.size}], got {k!r}")
        return torch.topk(self.similarities(z), int(k), dim=1, largest=True, sorted=True)

    # ------------------------------------------------------------------
    # Checkpointing and devices.
    # ------------------------------------------------------------------
    def state_dict(self):
        """The complete state: the rows themselves plus the bookkeeping.

        Without the bank in the checkpoint a resumed run would restart from
        random rows (and its first epoch of IR would be against noise).
        """
        return {
            "vectors": self.vectors.detach().to("cpu", copy=True),  # a snapshot, device-independent
            "size": self.size,
            "dim": self.dim,
            "seed": self.seed,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state):
        """Restore a state_dict() in place (keeps this bank's device and the .vectors object)."""
        missing = {"vectors", "size", "dim"} - set(state)
        if missing:
            raise ValueError(
                f"state is missing keys {sorted(missing)}; expected a MemoryBank.state_dict()"
            )
        vectors = state["vectors"]
        shape = (self.size, self.dim)
        if (state["size"], state["dim"]) != shape or tuple(vectors.shape) != shape:
            raise ValueError(
                f"state holds a bank of shape {tuple(vectors.shape)} "
                f"(size={state['size']}, dim={state['dim']}), "
                f"this bank is [{self.size}, {self.dim}]"
            )
        if not torch.isfinite(vectors).all():
            raise ValueError("state['vectors'] contains NaN or inf")
        self.vectors.copy_(vectors.to(device=self.vectors.device, dtype=self.vectors.dtype))
        self.seed = int(state.get("seed", self.seed))
        self.num_updates = int(state.get("num_updates", 0))

    def to(self, device):
        """Move the buffer to `device` (like nn.Module.to); returns self."""
        self.vectors = self.vectors.to(device)
        return self

    def __repr__(self):
        where = f"device={self.vectors.device}, dtype={self.vectors.dtype}"
        return f"MemoryBank(size={self.size}, dim={self.dim}, {where})"


# ----------------------------------------------------------------------
# Eq. 9 in closed form: the weight of the j-th most recent view.
# ----------------------------------------------------------------------
def view_weights(alpha, num_views):
    """Normalized Eq. 9 weights of the num_views most recent views, newest first: [num_views].

    After many updates M[i] = (1-alpha) * sum_j alpha^(j-1) v_j (before any
    re-normalization), so view j carries the fraction (1-alpha) alpha^(j-1) of
    the total weight (these fractions sum to 1).  alpha = 0: [1, 0, 0, ...].
    """
    j = torch.arange(num_views, dtype=torch.float64)
    return (1.0 - alpha) * torch.as_tensor(alpha, dtype=torch.float64) ** j


def n_alpha(alpha, mass=0.99):
    """Eq. 9's n_alpha: the fewest most-recent views that hold `mass` of the total weight.

    sum_{j<=n} (1-alpha) alpha^(j-1) = 1 - alpha^n >= mass  <=>  n >= log(1-mass)/log(alpha).
    alpha = 0 gives 1 (the paper: "if alpha = 0, then n_alpha = 1").
    With mass = 1 - 1/e this is the usual time constant ceil(-1/ln alpha).
    """
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if not (0.0 < mass < 1.0):
        raise ValueError(f"mass must be in (0, 1), got {mass}")
    if alpha == 0.0:
        return 1
    # The small slack stops 1 - alpha^n landing a rounding error below `mass` at an exact integer.
    return max(1, math.ceil(math.log(1.0 - mass) / math.log(alpha) - 1e-9))


def renormalized_decay(alpha, cos=0.0):
    """Per-update decay of an old view's weight once rows are re-normalized.

    If every new view v has cosine `cos` with the current (unit) row, each
    re-normalization multiplies the row by
    c = 1/sqrt(alpha^2 + (1-alpha)^2 + 2 alpha (1-alpha) cos),
    so older views decay by alpha*c per update instead of alpha (exact for
    cos = 0, i.e. mutually orthogonal views; cos = 1 gives back alpha).
    """
    return alpha / math.sqrt(alpha * alpha + (1 - alpha) ** 2 + 2 * alpha * (1 - alpha) * cos)


# ----------------------------------------------------------------------
# Helpers of MemoryBank.update.
# ----------------------------------------------------------------------
def _check_update(bank, indices, vectors, alpha, renormalize):
    """update()'s argument checks; the unit-norm check reads values, so it runs on the CPU only."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < 1:
        raise ValueError(f"alpha (the Eq. 7 update rate) must be a float in [0, 1), got {alpha!r}")
    if not torch.is_tensor(indices) or indices.dim() != 1 or indices.is_floating_point():
        raise ValueError(f"indices must be a 1-D integer tensor [B], got {indices!r:.80}")
    if not torch.is_tensor(vectors) or vectors.shape != (len(indices), bank.dim):
        raise ValueError(
            f"vectors must be [B, d] = [{len(indices)}, {bank.dim}], got {vectors!r:.80}"
        )
    if not vectors.is_floating_point():
        raise ValueError(f"vectors must be floating point, got dtype {vectors.dtype}")
    if renormalize and vectors.device.type == "cpu" and len(vectors):
        norms = vectors.detach().norm(dim=1)
        if not ((norms - 1).abs() <= 1e-2).all():  # 1e-2: unit rows rounded to bf16 pass
            raise ValueError(
                f"vectors must be unit rows (F.normalize(z, dim=1)), as Eq. 6's cosines and the "
                f"losses assume; got norms {norms.min():.4g}..{norms.max():.4g}"
            )


def _rounds(bank, indices, vectors):
    """(rows, vectors) to write, round by round: every rank's batch, padding (-1) left out, and
    duplicates split so that round r holds the r-th occurrence of each index.

    torch.distributed: every rank passes the same B (the trainer pads with -1), so one all_gather
    of known size per tensor suffices and no size is read off the device; the indices stay on the
    CPU under gloo (or "cpu:gloo,cuda:nccl").  An index out of range raises on every rank.
    The usual batch (one process, no padding, no duplicates) is one round, passed through.
    """
    indices = indices.to("cpu", torch.long)
    vectors = vectors.detach()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, on_cpu = dist.get_world_size(), "gloo" in str(dist.get_backend())
        idx = indices if on_cpu else indices.to(vectors.device)
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        all_vec = [torch.empty_like(vectors) for _ in range(world)]
        dist.all_gather(all_idx, idx)
        dist.all_gather(all_vec, vectors)
        indices, vectors = torch.cat(all_idx).cpu(), torch.cat(all_vec)
    if indices.numel() and (indices.min() < -1 or indices.max() >= bank.size):
        raise IndexError(f"indices must lie in [0, N) = [0, {bank.size}) or be -1 (padding)")
    vectors = vectors.to(bank.vectors.device, bank.vectors.dtype, non_blocking=True)
    kept = (indices >= 0).nonzero()[:, 0]  # on the CPU: no wait for the GPU
    if len(kept) < len(indices):
        indices, vectors = indices[kept], vectors[kept.to(vectors.device, non_blocking=True)]
    # Occurrence rank: how many earlier entries hold the same index ([7, 3, 7, 7] -> [0, 0, 1, 2]).
    # A stable sort keeps equal indices in order; the rank is the distance to its run's start.
    sorted_indices, order = torch.sort(indices, stable=True)
    position = torch.arange(len(indices))
    run_start = torch.ones_like(sorted_indices, dtype=torch.bool)
    run_start[1:] = sorted_indices[1:] != sorted_indices[:-1]
    occurrence = torch.empty_like(position)
    occurrence[order] = position - torch.cummax(torch.where(run_start, position, 0), dim=0).values
    num_rounds = int(occurrence.max()) + 1 if len(indices) else 0
    for round_ in range(num_rounds):
        rows, new = indices, vectors
        if num_rounds > 1:  # round r: the r-th occurrence of every index, in batch order
            at = (occurrence == round_).nonzero()[:, 0]
            rows, new = indices[at], vectors[at.to(vectors.device, non_blocking=True)]
        yield rows.to(vectors.device, non_blocking=True), new


# ----------------------------------------------------------------------
# Demo: Eq. 9 made visible.
# ----------------------------------------------------------------------
def _measure_weights(alpha, num_updates, renormalize):
    """Feed one bank row the orthonormal views e_1, ..., e_T and read off its coordinates.

    With orthonormal views the row's coordinate on e_t is exactly the weight of
    the t-th view, so this measures Eq. 9 (and the re-normalized version) by
    running MemoryBank.update itself.  Returns (weights newest first, weight of the initial row).
    """
    bank = MemoryBank(1, num_updates + 1)
    bank.vectors.zero_()
    bank.vectors[0, 0] = 1.0  # the initial row, e_0
    views = torch.eye(num_updates + 1)[1:]  # e_1 .. e_T, orthogonal to e_0 and each other
    for view in views:
        bank.update(torch.tensor([0]), view[None], alpha, renormalize=renormalize)
    row = bank.vectors[0].double()
    return row[1:].flip(0), float(row[0])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Eq. 9 made visible: how the memory bank (Eq. 7) weighs the views of an image "
        "over epochs, the effective number of views n_alpha, and what re-normalization changes."
    )
    parser.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.9, 0.99],
        help="bank update rates alpha of Eq. 7 to tabulate (each in [0, 1); the paper's "
        "ImageNet runs use 0.5, Appendix D)",
    )
    parser.add_argument(
        "--mass",
        type=float,
        default=0.99,
        help="n_alpha = the fewest most-recent views holding this fraction of the Eq. 9 weight",
    )
    parser.add_argument(
        "--views", type=int, default=5, help="how many of the most recent views' weights to print"
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=2000,
        help="Eq. 7 updates (epochs) fed to one bank row when measuring the weights",
    )
    parser.add_argument(
        "--dim", type=int, default=128, help="d, the embedding size, for the alpha = 0 check"
    )
    args = parser.parse_args(argv)
    for alpha in args.alphas:
        if not (0.0 <= alpha < 1.0):
            parser.error(f"--alphas must lie in [0, 1), got {alpha}")
    if not (0.0 < args.mass < 1.0):
        parser.error(f"--mass must lie in (0, 1), got {args.mass}")
    if args.views < 1 or args.updates < args.views or args.dim < 1:
        parser.error("need --views >= 1, --updates >= --views and --dim >= 1")
    start = time.time()

    print(
        "Eq. 9: after many epochs M[i] = (1-alpha) * sum_j alpha^(j-1) E(v(x_i, a_j)), "
        "view j = j-th most recent."
    )
    print(
        "n_alpha(q) = fewest recent views holding a fraction q of the weight "
        "= ceil(log(1-q)/log alpha);"
    )
    print(
        "ESS = (sum w)^2 / sum w^2 = (1+alpha)/(1-alpha) (Kish's effective sample size), "
        "for comparison.\n"
    )
    head = " ".join(f"w{j + 1:<6}" for j in range(args.views))
    print(
        f"{'alpha':>6} | {head}| n_alpha({args.mass:g}) | n_alpha(1-1/e) | ESS     "
        f"| renorm decay | renorm n_alpha({args.mass:g}) | measured renorm decay"
    )
    for alpha in args.alphas:
        weights = view_weights(alpha, args.views)
        paper_weights, _ = _measure_weights(alpha, args.updates, renormalize=False)
        # The literal Eq. 7 run must reproduce the closed form (it is the same recursion).
        assert torch.allclose(paper_weights[: args.views], weights, atol=1e-6), (
            paper_weights[:5],
            weights,
        )
        renorm_weights, _ = _measure_weights(alpha, args.updates, renormalize=True)
        decay = renormalized_decay(alpha)
        measured = float(renorm_weights[1] / renorm_weights[0]) if alpha > 0 else 0.0
        n_renorm = n_alpha(decay, args.mass) if decay < 1 else math.inf
        ess = (1 + alpha) / (1 - alpha)
        cells = " ".join(f"{w:<7.4f}" for w in weights.tolist())
        print(
            f"{alpha:>6g} | {cells}| {n_alpha(alpha, args.mass):>13d} | "
            f"{n_alpha(alpha, 1 - 1 / math.e):>14d} "
            f"| {ess:<7.1f} | {decay:<12.5f} | {n_renorm:>20} | {measured:.5f}"
        )

    print(
        "\nrenorm decay: with re-normalization and mutually orthogonal views (cosine 0) old views "
        "decay by"
    )
    print(
        "alpha / sqrt(alpha^2 + (1-alpha)^2) per update, not alpha; n_alpha grows accordingly.  "
        "With views"
    )
    print(
        "that agree (cosine c) the factor is smaller; e.g. alpha = 0.9:",
        ", ".join(f"cos {c:g} -> {renormalized_decay(0.9, c):.4f}" for c in (0.0, 0.5, 0.9, 0.99)),
    )

    # alpha = 0: the bank row is exactly the newest view (normalized).  Eq. 9 with n_alpha = 1.
    generator = torch.Generator().manual_seed(0)
    bank = MemoryBank(10, args.dim, seed=1)
    last = None
    for _ in range(3):  # three "epochs" of views for rows 0..9
        views = torch.nn.functional.normalize(torch.randn(10, args.dim, generator=generator), dim=1)
        bank.update(torch.arange(10), views, alpha=0.0)
        last = views
    diff = float((bank.vectors - last).abs().max())
    print(
        f"\nalpha = 0: max |M - (newest views)| over 10 rows after 3 updates = {diff:.1e} "
        f"(the bank stores exactly the last view; earlier views have weight 0)"
    )
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
