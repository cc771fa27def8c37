"""Tests for memory_bank.py: Eq. 7 (+ re-normalization), Eq. 9, duplicates, checkpoints,
distributed."""

import io
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import memory_bank
from memory_bank import MemoryBank, n_alpha, renormalized_decay, view_weights


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------
def test_init_rows_are_unit_vectors_spread_over_the_sphere():
    bank = MemoryBank(20000, 3, seed=0)
    assert bank.vectors.shape == (20000, 3) and bank.vectors.dtype == torch.float32
    assert bank.size == 20000 and bank.dim == 3
    assert not bank.vectors.requires_grad
    torch.testing.assert_close(bank.vectors.norm(dim=1), torch.ones(20000))
    # Uniform on the sphere: mean ~ 0 (std of each coordinate's mean = 1/sqrt(3 * 20000) ~ 0.004),
    # second moment ~ I/d.  A cube-then-normalize init would still pass the mean but
    # favours the corners; the covariance check below is loose on purpose.
    assert bank.vectors.mean(0).abs().max() < 0.02
    cov = bank.vectors.T @ bank.vectors / 20000
    torch.testing.assert_close(cov, torch.eye(3) / 3, atol=0.02, rtol=0)


def test_init_is_reproducible_from_the_seed():
    assert torch.equal(MemoryBank(50, 8, seed=3).vectors, MemoryBank(50, 8, seed=3).vectors)
    assert not torch.equal(MemoryBank(50, 8, seed=3).vectors, MemoryBank(50, 8, seed=4).vectors)


@pytest.mark.parametrize("size, dim", [(0, 4), (-1, 4), (4, 0), (2.5, 4), (True, 4)])
def test_init_rejects_bad_sizes(size, dim):
    with pytest.raises(ValueError, match="size|dim"):
        MemoryBank(size, dim)


# ----------------------------------------------------------------------
# Eq. 7
# ----------------------------------------------------------------------
def test_update_is_eq7_then_renormalization_and_touches_only_its_rows():
    bank = MemoryBank(10, 6, seed=0)
    before = bank.vectors.clone()
    idx = torch.tensor([2, 7, 4])
    v = unit(3, 6, seed=1)
    bank.update(idx, v, alpha=0.5)
    expected = 0.5 * before[idx] + 0.5 * v  # Eq. 7
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(bank.vectors[idx], expected)
    others = torch.tensor([i for i in range(10) if i not in (2, 7, 4)])
    assert torch.equal(bank.vectors[others], before[others])
    torch.testing.assert_close(bank.vectors.norm(dim=1), torch.ones(10))
    assert bank.num_updates == 1


def test_update_without_renormalization_is_the_literal_eq7():
    bank = MemoryBank(5, 4, seed=0)
    before = bank.vectors.clone()
    v = 3.0 * unit(2, 4, seed=2)  # deliberately not unit: Eq. 7 mixes them as given
    bank.update(torch.tensor([0, 3]), v, alpha=0.9, renormalize=False)
    torch.testing.assert_close(bank.vectors[[0, 3]], 0.9 * before[[0, 3]] + 0.1 * v)


def test_alpha_zero_stores_exactly_the_last_view():
    bank = MemoryBank(8, 16, seed=0)
    for step in range(3):
        v = unit(8, 16, seed=10 + step)
        bank.update(torch.arange(8), v, alpha=0.0)
    assert torch.equal(bank.vectors, v / v.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    bank = MemoryBank(4, 3)
    before = bank.vectors.clone()
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\)"):
        bank.update(torch.tensor([0]), unit(1, 3, 0), alpha)
    assert torch.equal(bank.vectors, before)


@pytest.mark.parametrize("bad", [-2, 4, 100])
def test_out_of_range_index_raises_index_error_naming_the_range(bad):
    bank = MemoryBank(4, 3)
    before = bank.vectors.clone()
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        bank.update(torch.tensor([0, bad]), unit(2, 3, 0), 0.5)
    assert torch.equal(bank.vectors, before)  # nothing half-applied


def test_bad_shapes_and_dtypes_are_rejected():
    bank = MemoryBank(6, 3)
    with pytest.raises(ValueError, match="vectors"):
        bank.update(torch.tensor([0, 1]), unit(2, 4, 0), 0.5)  # wrong d
    with pytest.raises(ValueError, match="vectors"):
        bank.update(torch.tensor([0, 1]), unit(3, 3, 0), 0.5)  # B mismatch
    with pytest.raises(ValueError, match="indices"):
        bank.update(torch.tensor([0.0, 1.0]), unit(2, 3, 0), 0.5)  # float indices
    with pytest.raises(ValueError, match="indices"):
        bank.update(torch.tensor([[0, 1]]), unit(2, 3, 0), 0.5)  # 2-D indices
    with pytest.raises(ValueError, match="floating"):
        bank.update(torch.tensor([0, 1]), torch.ones(2, 3, dtype=torch.long), 0.5)


def test_non_unit_vectors_are_rejected_on_the_cpu():
    # The losses assume unit z (Eq. 6's dot products are cosines); the bank, which takes the
    # trainer's z every step, checks it (on the CPU: on a GPU the check would wait for the device).
    bank = MemoryBank(6, 3)
    before = bank.vectors.clone()
    with pytest.raises(ValueError, match=r"unit rows \(F.normalize"):
        bank.update(torch.tensor([0, 1]), 2 * unit(2, 3, 0), 0.5)
    assert torch.equal(bank.vectors, before)
    bank.update(torch.tensor([0, 1]), unit(2, 3, 0).bfloat16(), 0.5)  # rounded unit rows pass
    bank.update(torch.tensor([0]), 2 * unit(1, 3, 0), 0.5, renormalize=False)  # literal Eq. 7


def test_update_detaches_and_casts_its_inputs():
    bank = MemoryBank(6, 3)
    v = unit(2, 3, 0).double().requires_grad_()
    bank.update(torch.tensor([1, 2], dtype=torch.int32), v, 0.5)
    assert bank.vectors.dtype == torch.float32 and not bank.vectors.requires_grad


def test_duplicates_are_applied_in_order_like_consecutive_steps():
    idx = torch.tensor([3, 1, 3, 3, 1, 0])
    v = unit(6, 5, seed=7)
    batched = MemoryBank(5, 5, seed=1)
    batched.update(idx, v, alpha=0.5)
    one_by_one = MemoryBank(5, 5, seed=1)
    for b in range(6):
        one_by_one.update(idx[b : b + 1], v[b : b + 1], alpha=0.5)
    torch.testing.assert_close(batched.vectors, one_by_one.vectors, rtol=0, atol=1e-6)
    # Order matters (so the rule is not "average the duplicates"): reversing the batch differs.
    reversed_ = MemoryBank(5, 5, seed=1)
    reversed_.update(idx.flip(0), v.flip(0), alpha=0.5)
    assert (reversed_.vectors[3] - batched.vectors[3]).abs().max() > 1e-3
    # And it is deterministic.
    again = MemoryBank(5, 5, seed=1)
    again.update(idx, v, alpha=0.5)
    assert torch.equal(again.vectors, batched.vectors)


def test_no_communication_without_torch_distributed(monkeypatch):
    assert not dist.is_initialized()

    def boom(*args, **kwargs):
        raise AssertionError("update() communicated although torch.distributed is not initialized")

    monkeypatch.setattr(dist, "all_gather", boom)
    bank = MemoryBank(4, 3)
    bank.update(torch.tensor([1]), unit(1, 3, 0), 0.5)


# ----------------------------------------------------------------------
# Neighbour queries
# ----------------------------------------------------------------------
def test_similarities_and_topk_match_brute_force():
    bank = MemoryBank(200, 16, seed=0)
    z = unit(7, 16, seed=5)
    sims = bank.similarities(z)
    torch.testing.assert_close(sims, z @ bank.vectors.T)
    values, indices = bank.topk(z, 10)
    order = torch.argsort(sims, dim=1, descending=True)[:, :10]
    assert torch.equal(indices, order)
    torch.testing.assert_close(values, sims.gather(1, order))
    # A half-precision query is cast to the bank's dtype rather than failing.
    assert bank.similarities(z.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"k must be .*\[1, N\] = \[1, 200\]"):
        bank.topk(z, 201)
    with pytest.raises(ValueError, match="z must be"):
        bank.similarities(unit(7, 15, seed=5))


def test_similarities_send_gradients_to_z_only():
    bank = MemoryBank(30, 4)
    z = unit(3, 4, 0).requires_grad_()
    bank.similarities(z).sum().backward()
    torch.testing.assert_close(z.grad, bank.vectors.sum(0).expand(3, 4))
    assert bank.vectors.grad is None


# ----------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------
def test_state_dict_roundtrip_resumes_exactly():
    idx_a, v_a = torch.tensor([0, 5, 9]), unit(3, 8, 1)
    idx_b, v_b = torch.tensor([5, 2]), unit(2, 8, 2)

    straight = MemoryBank(12, 8, seed=0)
    straight.update(idx_a, v_a, 0.5)
    straight.update(idx_b, v_b, 0.5)

    first = MemoryBank(12, 8, seed=0)
    first.update(idx_a, v_a, 0.5)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.update(idx_b, v_b, 0.5)  # later changes do not leak into the saved state

    resumed = MemoryBank(12, 8, seed=123)  # a different random init, as a fresh process would have
    held = resumed.vectors
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.vectors is held  # loaded in place: references handed out earlier stay valid
    assert resumed.num_updates == 1 and resumed.seed == 0
    resumed.update(idx_b, v_b, 0.5)
    assert torch.equal(resumed.vectors, straight.vectors)
    assert resumed.num_updates == straight.num_updates == 2


def test_load_state_dict_rejects_mismatched_or_broken_states():
    bank = MemoryBank(12, 8)
    with pytest.raises(ValueError, match="shape"):
        bank.load_state_dict(MemoryBank(11, 8).state_dict())
    broken = MemoryBank(12, 8).state_dict()
    broken["vectors"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bank.load_state_dict(broken)
    with pytest.raises(ValueError, match="missing"):
        bank.load_state_dict({"vectors": bank.vectors})


def test_to_returns_self_and_moves_the_buffer():
    bank = MemoryBank(3, 2)
    assert bank.to("cpu") is bank and bank.vectors.device.type == "cpu"


# ----------------------------------------------------------------------
# Eq. 9
# ----------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99])
def test_eq9_weights_are_what_repeated_eq7_produces(alpha):
    # Independent of the closed form: run the literal Eq. 7 on one row with orthonormal
    # views and read each view's weight off its coordinate.
    steps = 30
    bank = MemoryBank(1, steps + 1)
    bank.vectors.zero_()
    bank.vectors[0, 0] = 1.0
    for t in range(1, steps + 1):
        bank.update(torch.tensor([0]), torch.eye(steps + 1)[t : t + 1], alpha, renormalize=False)
    newest_first = bank.vectors[0, 1:].double().flip(0)
    torch.testing.assert_close(newest_first[:10], view_weights(alpha, 10), atol=1e-6, rtol=1e-5)
    assert abs(float(bank.vectors[0, 0]) - alpha**steps) < 1e-6  # what is left of the random init


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("mass", [0.99, 1 - 1 / math.e])
def test_n_alpha_is_the_smallest_count_holding_the_mass(alpha, mass):
    n = n_alpha(alpha, mass)
    held = lambda k: float(view_weights(alpha, k).sum())  # noqa: E731
    assert held(n) >= mass - 1e-12
    assert n == 1 or held(n - 1) < mass


def test_n_alpha_known_values():
    assert [n_alpha(a) for a in (0.0, 0.5, 0.9, 0.99)] == [1, 7, 44, 459]
    with pytest.raises(ValueError, match="alpha"):
        n_alpha(1.0)


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_renormalization_slows_the_decay_as_predicted(alpha):
    # Orthonormal views: the ratio of consecutive weights is alpha / sqrt(alpha^2 + (1-alpha)^2).
    steps = 12
    bank = MemoryBank(1, steps + 1)
    bank.vectors.zero_()
    bank.vectors[0, 0] = 1.0
    for t in range(1, steps + 1):
        bank.update(torch.tensor([0]), torch.eye(steps + 1)[t : t + 1], alpha)
    w = bank.vectors[0, 1:].double().flip(0)
    ratios = w[1:6] / w[:5]
    torch.testing.assert_close(
        ratios, torch.full((5,), renormalized_decay(alpha), dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert renormalized_decay(alpha) > alpha
    assert renormalized_decay(alpha, cos=1.0) == pytest.approx(alpha)


def test_demo_runs_and_prints_the_table(capsys):
    memory_bank.main(["--updates", "60", "--dim", "8"])
    out = capsys.readouterr().out
    assert "n_alpha(0.99)" in out and "alpha = 0" in out
    rows = [
        line
        for line in out.splitlines()
        if line.strip().startswith(("0 |", "0.5 |", "0.9 |", "0.99 |"))
    ]
    assert len(rows) == 4
    with pytest.raises(SystemExit):
        memory_bank.main(["--alphas", "1.0"])


# ----------------------------------------------------------------------
# torch.distributed: two real gloo processes on the CPU, uneven batches.
# ----------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each rank's batch has the same size B = 5, as the trainer's sampler makes it: a duplicate inside
# rank 0, index 4 on both ranks, and two padding rows (-1) on rank 1.
_RANK_INDICES = [torch.tensor([4, 0, 9, 4, 2]), torch.tensor([7, 4, 1, -1, -1])]


def _rank_vectors(rank):
    return unit(len(_RANK_INDICES[rank]), 6, seed=100 + rank)


def _distributed_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shapes = []  # every collective update() makes, and the shapes it sends
    real_all_gather = dist.all_gather

    def recording_all_gather(outputs, tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return real_all_gather(outputs, tensor, *args, **kwargs)

    dist.all_gather = recording_all_gather
    try:
        bank = MemoryBank(12, 6, seed=0)
        bank.update(_RANK_INDICES[rank], _rank_vectors(rank), alpha=0.5)
        one_row = torch.tensor([_RANK_INDICES[0][0].item() if rank == 0 else -1])
        bank.update(one_row, _rank_vectors(rank)[:1], alpha=0.5)  # rank 1 sends only padding
        # A bad index on ONE rank must raise on every rank (not leave the others hanging).
        bad = torch.tensor([0]) if rank == 0 else torch.tensor([12])
        raised = False
        try:
            bank.update(bad, unit(1, 6, seed=rank), alpha=0.5)
        except IndexError:
            raised = True
        torch.save(
            {"vectors": bank.vectors, "raised": raised, "shapes": shapes},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.all_gather = real_all_gather
        dist.destroy_process_group()


def test_distributed_updates_keep_every_rank_identical():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_distributed_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    assert torch.equal(results[0]["vectors"], results[1]["vectors"])
    assert results[0]["raised"] and results[1]["raised"]
    # Identical also to one process applying rank 0's batch then rank 1's (the documented order),
    # padding rows left out.
    reference = MemoryBank(12, 6, seed=0)
    reference.update(torch.cat(_RANK_INDICES), torch.cat([_rank_vectors(0), _rank_vectors(1)]), 0.5)
    reference.update(_RANK_INDICES[0][:1], _rank_vectors(0)[:1], alpha=0.5)
    assert torch.equal(results[0]["vectors"], reference.vectors)
    # ... and not what rank 0 alone would have produced.
    alone = MemoryBank(12, 6, seed=0)
    alone.update(_RANK_INDICES[0], _rank_vectors(0), alpha=0.5)
    assert not torch.equal(alone.vectors, reference.vectors)


def test_distributed_update_sends_fixed_sizes_and_never_a_batch_size():
    """Two all_gathers per update, of the batch's own shapes: no exchange of batch sizes first,
    whose values the host would have to read off the device under NCCL."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_distributed_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        shapes = [torch.load(os.path.join(out_dir, f"rank{r}.pt"))["shapes"] for r in range(2)]
    per_update = [(5,), (5, 6)], [(1,), (1, 6)], [(1,), (1, 6)]
    assert shapes[0] == shapes[1] == [s for update in per_update for s in update]


def test_padding_rows_get_no_update():
    bank = MemoryBank(6, 3, seed=0)
    before = bank.vectors.clone()
    bank.update(torch.tensor([-1, 2, -1]), unit(3, 3, 0), 0.5)
    changed = (bank.vectors != before).any(dim=1)
    assert changed.tolist() == [False, False, True, False, False, False]
    expected = torch.nn.functional.normalize(0.5 * before[2] + 0.5 * unit(3, 3, 0)[1], dim=0)
    assert torch.allclose(bank.vectors[2], expected, atol=1e-6)


def test_empty_batch_changes_nothing():
    bank = MemoryBank(5, 3)
    before = bank.vectors.clone()
    bank.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), 0.5)
    assert torch.equal(bank.vectors, before)
