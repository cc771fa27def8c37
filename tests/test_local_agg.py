"""Checks for local_agg.py: run_kmeans (Appendix D) and la_loss (Eq. 8,
Theorem 5.4, Corollary 5.4.1).

The references below are written densely and in float64 on purpose (they
build [B, N] masks, which la_loss must not), so they are independent of the
code under test.
"""

import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from instance_disc import ball_loss
from local_agg import la_loss, run_kmeans

TAU = 0.07


@pytest.fixture(autouse=True, scope="module")
def single_threaded_faiss():
    """faiss and torch each keep an OpenMP thread pool; on a busy 2-core
    machine the two pools' spinning threads made a 800 x 8 k-means take
    2.5 s instead of 2 ms.  The tests' problems are tiny, so run faiss on one
    thread here and restore the setting afterwards."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------
# Synthetic data: a bank of unit vectors around a few class centres, and a
# batch of fresh noisy "views" of some of its entries.
# ---------------------------------------------------------------------------
def clustered_bank(n=600, d=16, classes=12, spread=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, d, generator=g), dim=1)
    truth = torch.randint(0, classes, (n,), generator=g)
    bank = F.normalize(
        centres[truth] + spread * torch.randn(n, d, generator=g) / math.sqrt(d), dim=1
    )
    return bank, truth


def views_of(bank, batch=24, noise=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(bank.shape[0], generator=g)[:batch]
    z = F.normalize(bank[idx] + noise * torch.randn(batch, bank.shape[1], generator=g), dim=1)
    return z, idx


@pytest.fixture(scope="module")
def data():
    bank, truth = clustered_bank()
    labels = run_kmeans(bank, 12, num_clusterings=3, seed=0, verbose=False)
    z, idx = views_of(bank)
    return bank, truth, labels, z, idx


def per_image(z, bank, idx, labels, *args, **kwargs):
    """The [B] per-image losses: la_loss of each image alone (Eq. 8 is computed row by row)."""
    rows = [
        la_loss(z[b : b + 1], bank, idx[b : b + 1], labels, *args, **kwargs)
        for b in range(len(idx))
    ]
    return torch.stack(rows)


def test_la_loss_is_the_mean_of_the_per_image_losses(data):
    bank, _, labels, z, idx = data
    for k, add_positive in ((5, False), (40, True), (300, True)):
        mean = la_loss(z, bank, idx, labels, k_background=k, add_positive=add_positive)
        rows = per_image(z, bank, idx, labels, k_background=k, add_positive=add_positive)
        torch.testing.assert_close(mean, rows.mean())


def la_code_reference(z, bank, idx, labels, tau, k):
    """The published LA code's formula, densely, in float64: B_i = top-k of
    z . M (i not forced in), p = exp(s / tau) / Z with its fixed Z, numerator
    over the background entries sharing i's label in any clustering, and
    -log(ratio + 1e-7)."""
    z, bank = z.double(), bank.double()
    n = bank.shape[0]
    background_sim, background = (z @ bank.T).topk(k, dim=1)
    p = torch.exp(background_sim / tau) / (2876934.2 / 1281167 * n)
    close = (labels[:, background] == labels[:, idx].unsqueeze(2)).any(dim=0)  # [B, k]
    ratio = (p * close).sum(dim=1) / p.sum(dim=1)
    return -torch.log(ratio + 1e-7)


def dense_ball(z, bank, idx, tau, k):
    """-log p(i | x) / p(B_i | x) with B_i = top-k of z . M, plus i (float64)."""
    s = z.double() @ bank.double().T / tau  # [B, N]
    in_ball = torch.zeros_like(s, dtype=torch.bool)
    in_ball.scatter_(1, s.topk(k, dim=1).indices, True)
    in_ball[torch.arange(len(idx)), idx] = True
    return s.masked_fill(~in_ball, -math.inf).logsumexp(dim=1) - s[torch.arange(len(idx)), idx]


def close_in_background_count(z, bank, idx, labels, k):
    """|C_i ∩ B_i| for B_i = top-k of z . M plus i."""
    background = (z.double() @ bank.double().T).topk(k, dim=1).indices
    close = (labels[:, background] == labels[:, idx].unsqueeze(2)).any(dim=0)
    i_missing = ~(background == idx.unsqueeze(1)).any(dim=1)
    return close.sum(dim=1) + i_missing


# ---------------------------------------------------------------------------
# run_kmeans
# ---------------------------------------------------------------------------
def test_run_kmeans_shape_range_and_seeds():
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(800, 8, generator=g), dim=1)  # no cluster structure
    labels = run_kmeans(bank, 10, num_clusterings=3, seed=5, verbose=False)
    assert labels.shape == (3, 800) and labels.dtype == torch.long
    assert int(labels.min()) >= 0 and int(labels.max()) < 10
    # Deterministic per seed, and clustering h uses seed + h (Appendix D:
    # different initialisations per clustering).
    assert torch.equal(labels, run_kmeans(bank, 10, num_clusterings=3, seed=5, verbose=False))
    assert torch.equal(labels[1:], run_kmeans(bank, 10, num_clusterings=2, seed=6, verbose=False))
    # Different seeds give different PARTITIONS (not just renamed ids).
    together = [(row.unsqueeze(0) == row.unsqueeze(1)) for row in labels]  # co-membership
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together[1], together[2])


def test_run_kmeans_finds_planted_clusters():
    # Over-clustering (more clusters than classes), as LA does (30,000 > 1,000
    # ImageNet classes): every found cluster should sit inside one class.
    bank, truth = clustered_bank(n=1200, d=16, classes=6, spread=0.2, seed=4)
    labels = run_kmeans(bank, 12, num_clusterings=2, seed=0, verbose=False)
    for row in labels:
        # purity: each found cluster is dominated by one planted class
        majority = sum(int(torch.bincount(truth[row == c]).max()) for c in row.unique())
        assert majority / len(truth) > 0.9


def test_run_kmeans_uses_every_point_and_reports_objective():
    """faiss subsamples to 256 points per centroid by default; run_kmeans must
    not.  The objective faiss reports (Kmeans.obj[-1]) is the squared error
    over the points it trained on, so it covers all N only without
    subsampling: it must then be >= the within-cluster sum of squares of the
    returned labels (the centroids that minimise it are the label means, and a
    final assignment step can only lower it further)."""
    g = torch.Generator().manual_seed(7)
    bank = F.normalize(torch.randn(3000, 8, generator=g), dim=1)
    x = bank.double()

    def within_cluster_ss(row):
        return sum(float(((x[row == c] - x[row == c].mean(0)) ** 2).sum()) for c in row.unique())

    labels, objectives = run_kmeans(
        bank, 4, num_clusterings=1, verbose=False, return_objectives=True
    )
    full = within_cluster_ss(labels[0])
    assert full <= objectives[0] * (1 + 1e-4)
    assert objectives[0] < 1.05 * full
    # Faiss's default (256 points per centroid = 1024 of 3000) fits and
    # reports on a third of the points only.
    labels_sub, objectives_sub = run_kmeans(
        bank,
        4,
        num_clusterings=1,
        verbose=False,
        max_points_per_centroid=256,
        return_objectives=True,
    )
    assert objectives_sub[0] < 0.5 * within_cluster_ss(labels_sub[0])


def test_run_kmeans_bad_inputs():
    bank = F.normalize(torch.randn(50, 4), dim=1)
    with pytest.raises(ValueError, match="num_clusters"):
        run_kmeans(bank, 51, verbose=False)
    with pytest.raises(ValueError, match="num_clusters"):
        run_kmeans(bank, 0, verbose=False)
    with pytest.raises(ValueError, match="num_clusterings"):
        run_kmeans(bank, 5, num_clusterings=0, verbose=False)
    with pytest.raises(ValueError, match="bank"):
        run_kmeans(bank[0], 5, verbose=False)
    with pytest.raises(ValueError, match="max_points_per_centroid"):
        run_kmeans(bank, 5, max_points_per_centroid=0, verbose=False)


def test_kmeans_of_a_gpu_bank_without_gpu_faiss_warns_once(monkeypatch):
    """A bank on a GPU with a faiss that has no GPU: the first clustering warns,
    naming N, the clusters, the clusterings and the install fix; later ones do
    not repeat it; a CPU bank never warns."""
    import warnings

    import local_agg

    monkeypatch.setattr(local_agg, "faiss_has_gpu", lambda: False)
    monkeypatch.setattr(local_agg, "_WARNED_KMEANS_ON_CPU", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not local_agg.warn_if_kmeans_on_cpu("cpu", 1_281_167, 30_000, 10)
        assert local_agg.warn_if_kmeans_on_cpu(torch.device("cuda", 1), 1_281_167, 30_000, 10)
        assert not local_agg.warn_if_kmeans_on_cpu("cuda", 1_281_167, 30_000, 10)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    text = str(caught[0].message)
    for part in ("N=1,281,167", "30,000 clusters", "10 clustering", "CPU", "faiss-gpu"):
        assert part in text, part
    # 2 * N * K * d * iterations * H at Appendix D's size, d = 128, 20 iterations.
    assert "2e+15" in text

    # With a GPU faiss nothing is said.
    monkeypatch.setattr(local_agg, "faiss_has_gpu", lambda: True)
    monkeypatch.setattr(local_agg, "_WARNED_KMEANS_ON_CPU", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not local_agg.warn_if_kmeans_on_cpu("cuda", 100, 10, 1)
    assert not caught


def test_run_kmeans_passes_its_job_to_the_cpu_warning(monkeypatch):
    import local_agg

    seen = []
    monkeypatch.setattr(local_agg, "warn_if_kmeans_on_cpu", lambda *a: seen.append(a))
    bank = F.normalize(torch.randn(60, 4), dim=1)
    run_kmeans(bank, 5, num_clusterings=2, niter=3, verbose=False)
    assert seen == [(torch.device("cpu"), 60, 5, 2, 3, 4)]


# ---------------------------------------------------------------------------
# la_loss: fidelity to the LA code, and Eq. 8 itself
# ---------------------------------------------------------------------------
def test_la_loss_matches_the_published_la_formula(data):
    bank, _, labels, z, idx = data
    for k in (5, 40, 300):
        expected = la_code_reference(z, bank, idx, labels, TAU, k)
        got = per_image(z, bank, idx, labels, k_background=k, add_positive=False)
        # equal up to the LA code's 1e-7 inside the log: |diff| <= 1e-7 / ratio
        assert torch.allclose(got.double(), expected, atol=1e-5, rtol=0)
        # Here every image's own entry is among the k nearest of its view, so
        # adding i to B_i changes nothing.
        assert torch.equal(got, per_image(z, bank, idx, labels, k_background=k))


def test_add_positive_when_i_is_outside_the_background():
    """Row 0's view points away from its own bank entry and i is alone in its
    cluster: the LA code gives -log(1e-7) (no gradient); add_positive=True
    gives BALL's value with i added to B_i (Eq. 8 needs i in the set)."""
    bank, _ = clustered_bank(n=300, seed=2)
    z, idx = views_of(bank, batch=6, seed=3)
    z = z.clone()
    z[0] = -bank[idx[0]]  # far from M[i]
    labels = torch.arange(300).unsqueeze(0).repeat(2, 1)  # C_i = {i}
    k = 20
    code = per_image(z, bank, idx, labels, k_background=k, add_positive=False)
    assert code[0].item() == pytest.approx(-math.log(1e-7))
    ours = per_image(z, bank, idx, labels, k_background=k)
    assert torch.allclose(ours.double(), dense_ball(z, bank, idx, TAU, k), atol=1e-5)
    assert torch.isfinite(ours).all() and ours[0] > 20  # large but finite
    # no gradient from the LA code's constant row
    z_leaf = z.clone().requires_grad_()
    per_image(z_leaf, bank, idx, labels, k_background=k, add_positive=False)[0].backward()
    assert torch.count_nonzero(z_leaf.grad) == 0


def test_theorem_5_4_singleton_close_sets_give_ball(data):
    """Theorem 5.4: with C_i = {i} (one 'cluster' per entry: labels = arange),
    LA-SIMPLE equals BALL, -log p(i | x) / p(B_i | x), for every image."""
    bank, _, _, z, idx = data
    singletons = torch.arange(bank.shape[0]).unsqueeze(0)
    for k, neighbours_of in ((10, "z"), (100, "z"), (100, "bank")):
        got = per_image(z, bank, idx, singletons, k_background=k, neighbours_of=neighbours_of)
        if neighbours_of == "z":
            assert torch.allclose(got.double(), dense_ball(z, bank, idx, TAU, k), atol=1e-5)
        assert (got > 0).all()
    # H copies of the identity clustering are still C_i = {i}.
    assert torch.equal(
        la_loss(z, bank, idx, singletons, k_background=50),
        la_loss(z, bank, idx, singletons.repeat(4, 1), k_background=50),
    )


def test_theorem_5_4_against_instance_disc_ball_loss(data):
    """The same theorem against the project's BALL implementation, for both
    anchors of B_i, both conventions for i, and a view that lands far from its
    own entry (i outside z's nearest: BALL and LA both add it once)."""
    bank, _, _, z, idx = data
    singletons = torch.arange(bank.shape[0]).unsqueeze(0)
    far = z.clone()
    far[0] = -bank[idx[0]]
    for views, conventions in ((z, (True, False)), (far, (True,))):
        for neighbours_of in ("z", "bank"):
            for add_positive in conventions:
                for k in (7, 120):
                    la = la_loss(
                        views.double(),
                        bank.double(),
                        idx,
                        singletons,
                        TAU,
                        k,
                        neighbours_of=neighbours_of,
                        add_positive=add_positive,
                    )
                    ball = ball_loss(
                        views.double(),
                        bank.double(),
                        idx,
                        TAU,
                        k,
                        neighbours_of=neighbours_of,
                        add_positive=add_positive,
                    )
                    assert abs(float(la - ball)) < 1e-10, (neighbours_of, add_positive, k)
                    la32 = la_loss(
                        views,
                        bank,
                        idx,
                        singletons,
                        TAU,
                        k,
                        neighbours_of=neighbours_of,
                        add_positive=add_positive,
                    )
                    ball32 = ball_loss(
                        views,
                        bank,
                        idx,
                        TAU,
                        k,
                        neighbours_of=neighbours_of,
                        add_positive=add_positive,
                    )
                    assert abs(float(la32 - ball32)) < 1e-4


def test_close_set_is_the_union_over_clusterings(data):
    """Adding clusterings can only grow C_i, so each image's loss can only
    drop; C_i covering the whole bank gives p(C ∩ B) = p(B): loss 0."""
    bank, _, labels, z, idx = data
    previous = per_image(z, bank, idx, labels[:1], k_background=60)
    for h in (2, 3):
        current = per_image(z, bank, idx, labels[:h], k_background=60)
        assert (current <= previous + 1e-6).all()
        previous = current
    one_cluster = torch.zeros(1, bank.shape[0], dtype=torch.long)
    assert torch.allclose(
        la_loss(z, bank, idx, one_cluster, k_background=60), torch.tensor(0.0), atol=1e-6
    )
    assert torch.allclose(
        la_loss(z, bank, idx, torch.cat([labels, one_cluster]), k_background=60),
        torch.tensor(0.0),
        atol=1e-6,
    )


def test_corollary_5_4_1_which_inequality_holds(data):
    """Corollary 5.4.1's proof argues E[L^LA-SIMPLE] >= E[L^LA] (objectives).

    Literally, the opposite holds for every image: C_i ∩ B_i contains i and
    probabilities are >= 0, so p(C_i ∩ B_i | x) >= p(i | x) and
    L^LA >= L^LA-SIMPLE, i.e. la_loss <= BALL, strictly whenever C_i ∩ B_i has
    another member.  The proof's "∝" step replaces the sum over C_i ∩ B_i by
    its MEAN, dropping log |C_i ∩ B_i| (not a constant); the inequality it then
    argues, L^LA - log|C_i ∩ B_i| <= L^LA-SIMPLE, holds exactly when
    p(i | x) >= mean_{k in C_i ∩ B_i} p(k | x): true when the view is closest
    to its own entry (the noise heuristic), false otherwise.  And the
    corollary's conclusion I(X; X) >= E[L^LA] holds trivially: L^LA <= 0."""
    bank, _, labels, z, idx = data
    k = 80
    la = per_image(z, bank, idx, labels, k_background=k).double()
    simple = per_image(
        z, bank, idx, torch.arange(bank.shape[0]).unsqueeze(0), k_background=k
    ).double()
    size = close_in_background_count(z, bank, idx, labels, k).double()
    assert (la >= 0).all()  # L^LA <= 0 <= I(X; X)
    assert (la <= simple + 1e-6).all()  # L^LA >= L^LA-SIMPLE
    assert (la[size > 1] < simple[size > 1] - 1e-3).all()
    assert (size > 1).sum() >= len(idx) // 2
    # mean-normalised version: holds here, where each view is nearest its own entry
    assert ((z.double() @ bank.double().T).argmax(dim=1) == idx).all()
    assert (-la - torch.log(size) <= -simple + 1e-6).all()
    # ... and fails when the view sits on a cluster-mate j instead of on M[i]
    i = int(idx[0])
    mates = torch.nonzero((labels[:, i : i + 1] == labels).any(dim=0)).flatten()
    j = int(mates[mates != i][0])
    z_mate = bank[j : j + 1].clone()
    la_j = per_image(z_mate, bank, idx[:1], labels, k_background=k).double()
    simple_j = per_image(
        z_mate,
        bank,
        idx[:1],
        torch.arange(bank.shape[0]).unsqueeze(0),
        k_background=k,
    ).double()
    size_j = close_in_background_count(z_mate, bank, idx[:1], labels, k).double()
    assert (-la_j - torch.log(size_j) > -simple_j).all()


def test_cluster_ids_of_any_integer_dtype_and_size(data):
    """int32 or int16 labels give the same loss as int64 ones, and ids that do
    NOT fit int32 must not wrap: adding 2^32 to the ids of odd-numbered entries
    splits every cluster in two, which a blind int32 cast would silently undo."""
    bank, _, labels, z, idx = data
    expected = per_image(z, bank, idx, labels, k_background=60)
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(per_image(z, bank, idx, labels.to(dtype), k_background=60), expected)
    split = labels + 2**32 * (torch.arange(bank.shape[0]) % 2)
    got = per_image(z, bank, idx, split, k_background=60, add_positive=False)
    assert torch.allclose(
        got.double(), la_code_reference(z, bank, idx, split, TAU, 60), atol=1e-5, rtol=0
    )
    assert (got > expected + 1e-3).any()  # smaller C_i: larger loss somewhere


def test_autocast_does_not_lower_the_precision(data):
    """Under torch.autocast (a mixed-precision trainer) la_loss still computes
    its similarities and logsumexps in float32: same value and gradient."""
    bank, _, labels, z, idx = data
    plain = z.clone().requires_grad_()
    reference = la_loss(plain, bank, idx, labels, k_background=60)
    reference.backward()
    mixed = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = la_loss(mixed, bank, idx, labels, k_background=60)
        loss.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(mixed.grad, plain.grad)


def test_neighbours_of_bank_versus_z(data):
    bank, _, labels, z, idx = data
    exact_views = bank[idx]
    assert torch.equal(
        la_loss(exact_views, bank, idx, labels, k_background=30, neighbours_of="z"),
        la_loss(exact_views, bank, idx, labels, k_background=30, neighbours_of="bank"),
    )
    noisy, _ = views_of(bank, batch=24, noise=0.6, seed=1)
    by_z = per_image(noisy, bank, idx, labels, k_background=30, neighbours_of="z")
    by_m = per_image(noisy, bank, idx, labels, k_background=30, neighbours_of="bank")
    assert not torch.allclose(by_z, by_m)
    # With B_i around M[i], i itself is always in B_i: add_positive is moot.
    assert torch.equal(
        by_m,
        per_image(
            noisy,
            bank,
            idx,
            labels,
            k_background=30,
            neighbours_of="bank",
            add_positive=False,
        ),
    )


# ---------------------------------------------------------------------------
# Numerics, gradients, memory
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_finite(data, dtype):
    bank, _, labels, z, idx = data
    # The pitfall: exp(z . M / tau) at z . M = 1, tau = 0.07 is 1.6e6 > 65504.
    assert torch.isinf(torch.exp(torch.tensor(1.0 / TAU, dtype=torch.float16)))
    z_low = z.to(dtype).requires_grad_()
    bank_low = bank.to(dtype)
    loss = la_loss(z_low, bank_low, idx, labels, k_background=60)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert z_low.grad.dtype == dtype and torch.isfinite(z_low.grad).all()
    exact = la_loss(z_low.detach().float(), bank_low.float(), idx, labels, k_background=60)
    assert torch.allclose(loss, exact, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_z_only_and_matches_autograd(data):
    bank, _, labels, z, idx = data
    bank = bank.clone().requires_grad_()  # even if a caller forgets to detach
    z_leaf = z.clone().requires_grad_()
    la_loss(z_leaf, bank, idx, labels, k_background=50).backward()
    assert bank.grad is None
    assert z_leaf.grad is not None and z_leaf.grad.abs().sum() > 0
    # float64 gradcheck of the custom top-k backward (embedding_bag)
    z64 = z[:6].double().requires_grad_()
    bank64 = bank.detach().double()
    assert torch.autograd.gradcheck(
        lambda v: per_image(v, bank64, idx[:6], labels, k_background=40),
        (z64,),
        eps=1e-6,
        atol=1e-6,
    )


class _LargeTensors(TorchDispatchMode):
    """Records the shape of every op output whose memory holds at least `threshold` elements
    (a view such as labels.expand(B, N) allocates nothing and is not recorded)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.seen = threshold, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                torch.is_tensor(t)
                and t.untyped_storage().nbytes() >= self.threshold * t.element_size()
            ):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("neighbours_of,expected", [("z", 1), ("bank", 2)])
def test_only_the_similarities_are_batch_by_bank(neighbours_of, expected):
    """The one [B, N] tensor is z @ M^T (two of them, one after the other, for
    neighbours_of='bank'); no [B, N] mask, and none in the backward pass."""
    batch, n, d = 16, 4000, 8  # d < B: the bank itself stays below B * N
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, 40, (10, n), generator=g)
    z = F.normalize(torch.randn(batch, d, generator=g), dim=1).requires_grad_()
    idx = torch.randint(0, n, (batch,), generator=g)
    with _LargeTensors(batch * n) as record:
        la_loss(z, bank, idx, labels, k_background=100, neighbours_of=neighbours_of).backward()
    assert [shape for _, shape in record.seen] == [(batch, n)] * expected, record.seen


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------
def test_la_loss_bad_inputs(data):
    """One ValueError per argument check, naming the argument.  Unit rows of z and indices in
    range are the caller's (MemoryBank.update checks its indices); float cluster ids are compared
    for equality like integer ones, so they are not refused."""
    bank, _, labels, z, idx = data
    n = bank.shape[0]
    cases = [
        (dict(cluster_labels=labels[0]), "cluster_labels"),  # [N], not [H, N]
        (dict(cluster_labels=labels[:, :-1]), "cluster_labels"),  # [H, N-1]
        (dict(cluster_labels=labels.to("meta")), r"cluster_labels must be \[H, N\] on cpu"),
        (dict(k_background=n + 1), "k_background"),
        (dict(k_background=0), "k_background"),
        (dict(z=z[:, :-1]), r"z \[B,d\], bank \[N,d\]"),
        (dict(idx=idx[:-1]), r"int idx \[B\]"),
        (dict(idx=idx.float()), r"int idx \[B\]"),
        (dict(tau=0.0), "tau"),
        (dict(neighbours_of="memory"), "neighbours_of"),
    ]
    for change, message in cases:
        arguments = dict(z=z, bank=bank, idx=idx, cluster_labels=labels, k_background=10)
        arguments.update(change)
        with pytest.raises(ValueError, match=message):
            la_loss(**arguments)
    # Float ids give the same loss as the integer ones.
    same = la_loss(z, bank, idx, labels.double(), k_background=10)
    assert torch.equal(same, la_loss(z, bank, idx, labels, k_background=10))


# ---------------------------------------------------------------------------
# faiss is needed for clustering only
# ---------------------------------------------------------------------------
def test_la_loss_works_without_faiss(data):
    """In a fresh interpreter where `import faiss` fails (sys.modules['faiss'] = None),
    `from local_agg import la_loss` works and gives the same loss; faiss_has_gpu()
    says False, warn_if_kmeans_on_cpu still works, and only run_kmeans asks for faiss."""
    bank, _, labels, z, idx = data
    expected = per_image(z, bank, idx, labels, k_background=60)
    script = """
import sys, warnings
sys.modules["faiss"] = None                      # any `import faiss` now raises ImportError
import torch
from local_agg import faiss_has_gpu, la_loss, run_kmeans, warn_if_kmeans_on_cpu
z, bank, idx, labels = torch.load(sys.argv[1])
rows = [la_loss(z[[b]], bank, idx[[b]], labels, k_background=60) for b in range(len(idx))]
print(repr(torch.stack(rows).tolist()))
print(faiss_has_gpu())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(warn_if_kmeans_on_cpu("cuda", 1000, 10, 1), len(caught))
try:
    run_kmeans(bank, 5, verbose=False)
except ImportError as error:
    print("ImportError:", error)
"""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "inputs.pt"
        torch.save((z, bank, idx, labels), path)
        result = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    losses, has_gpu, warned, error = result.stdout.strip().splitlines()
    assert torch.equal(torch.tensor(eval(losses)), expected)
    assert has_gpu == "False"
    assert warned == "True 1"  # a GPU bank and no GPU faiss: the warning, once
    assert error.startswith("ImportError:") and "faiss" in error and "pip install" in error


def test_run_kmeans_spread_over_ranks_gives_the_labels_of_one_process():
    """Rank r of W runs clusterings h = r, r + W, ...; clustering h uses seed + h, wherever."""
    bank, _ = clustered_bank(n=300, d=8, classes=6)
    every = run_kmeans(bank, 6, num_clusterings=5, seed=3, verbose=False)
    for world in (2, 3):
        parts = {
            h: row
            for r in range(world)
            for h, row in zip(
                range(r, 5, world),
                run_kmeans(bank, 6, 5, seed=3, verbose=False, clusterings=range(r, 5, world)),
                strict=True,
            )
        }
        assert torch.equal(torch.stack([parts[h] for h in range(5)]), every)
    with pytest.raises(ValueError, match="clusterings"):
        run_kmeans(bank, 6, 5, clusterings=[5], verbose=False)


def test_run_kmeans_threads_apply_to_the_call_only():
    import faiss

    bank, _ = clustered_bank(n=200, d=8, classes=4)
    before = faiss.omp_get_max_threads()
    seen = []
    real_kmeans = faiss.Kmeans

    class Spy(real_kmeans):
        def train(self, x, *args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            return super().train(x, *args, **kwargs)

    faiss.Kmeans = Spy
    try:
        run_kmeans(bank, 4, 2, verbose=False, threads=2)
    finally:
        faiss.Kmeans = real_kmeans
    assert seen == [2, 2] and faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match="threads"):
        run_kmeans(bank, 4, 2, verbose=False, threads=0)
