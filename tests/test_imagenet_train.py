"""Tests for imagenet_train.py (Section 5.3 / Figure 2 / Appendix D trainer), all on the CPU.

Every run trains ResNet-18 at 32x32 on a generated ImageFolder of a few dozen images, so that
the whole file stays well inside its 3-minute share on a 2-core machine.  Training runs go
through imagenet_train.main(argv) in-process where possible (no interpreter start-up); the
things only a real process can show (--help, SIGTERM, torchrun with two ranks) use subprocesses.
"""

import datetime
import gc
import gzip
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys

import numpy as np
import plot_figure2
import pytest
import torch
from torchvision import transforms

import imagenet_train as it
from local_agg import run_kmeans
from memory_bank import MemoryBank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 12, 4
N_TRAIN = N_CLASSES * TRAIN_PER_CLASS  # 48 bank rows


@pytest.fixture(autouse=True)
def one_thread():
    """ResNet-18 on 32x32 images is faster on one thread than on two busy ones; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return it.make_toy_imagefolder(
        str(tmp_path_factory.mktemp("toy")),
        N_CLASSES,
        TRAIN_PER_CLASS,
        VAL_PER_CLASS,
        size=32,
        seed=0,
    )


def argv(data, out, algo="ir", epochs=1, batch=16, *extra):
    return [
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--algo",
        algo,
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--knn-k",
        "5",
        "--workers",
        "0",
        "--log-every",
        "1000",
        "--k-background",
        "16",
        "--kmeans-k",
        "4",
        "--n-kmeans",
        "2",
        *extra,
    ]


def rows(out, kind):
    return [r for r in it.read_log(os.path.join(out, "log.jsonl")) if r.get("kind") == kind]


def load_ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"))


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


# -----------------------------------------------------------------------------
# End-to-end: one epoch of each algorithm.
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["ir", "ball", "ann", "la"])
def test_one_epoch_of_each_algorithm(data, tmp_path, algo):
    out = tmp_path / algo
    extra = ["--la-warmup-epochs", "0"] if algo == "la" else []
    extra += ["--eval-linear", "--linear-epochs", "5"] if algo == "ir" else []
    it.main(argv(data, out, algo, 1, 16, *extra))
    (epoch,) = rows(out, "epoch")
    assert epoch["epoch"] == 1 and epoch["algo"] == algo and epoch["step"] == N_TRAIN // 16
    assert (
        math.isfinite(epoch["train_loss"])
        and 0.0 <= epoch["knn_top1"] <= 1.0
        and epoch["images_per_s"] > 0
    )
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 0, N_TRAIN // 16)
    bank = ckpt["bank"]["vectors"]
    # Every one of the 48 rows received its Eq. 7 update (a row never updated keeps its start),
    # and rows stay unit vectors.
    initial = MemoryBank(N_TRAIN, 128, seed=0).vectors
    assert bool((bank != initial).any(dim=1).all())
    assert torch.allclose(bank.norm(dim=1), torch.ones(N_TRAIN), atol=1e-5)
    if algo == "la":
        labels = ckpt["cluster_labels"]
        assert labels.shape == (2, N_TRAIN) and int(labels.min()) >= 0 and int(labels.max()) < 4
        # Epoch 1's labels are the k-means of the bank as it stood at the epoch start (random rows).
        assert torch.equal(labels, run_kmeans(initial, 4, 2, seed=0, verbose=False))
    if algo == "ir":
        (lin,) = rows(out, "linear")
        # 4 classes: "top-5" = top-4 = every class, so it must be 1; top-1 is a real fraction of 16.
        assert lin["linear_top5"] == 1.0 and 0.0 <= lin["linear_top1"] <= 1.0
        assert abs(lin["linear_top1"] * 16 - round(lin["linear_top1"] * 16)) < 1e-9


def test_model_output_is_unit_norm_fp32_even_under_autocast():
    model = it.ResNetEmbedding(128).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = model(x)
        raw = model.net(
            x
        )  # the bare torchvision ResNet: not unit norm -- the pitfall the head guards against
    assert z.shape == (3, 128) and z.dtype == torch.float32 and z16.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(z16.norm(dim=1), torch.ones(3), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-2)
    assert model.features(x).shape == (3, 512)


# -----------------------------------------------------------------------------
# Views (Figure 2b lesions).
# -----------------------------------------------------------------------------
AUG_TYPES = {
    "crop": transforms.RandomResizedCrop,
    "gray": transforms.RandomGrayscale,
    "jitter": transforms.ColorJitter,
    "flip": transforms.RandomHorizontalFlip,
}


@pytest.mark.parametrize("lesion", [None, "crop", "gray", "jitter", "flip", "aug"])
def test_lesion_flags_remove_exactly_their_augmentation(data, tmp_path, lesion):
    flags = [] if lesion is None else [f"--no-{lesion}"]
    args = it.build_parser().parse_args(
        argv(data, tmp_path / "x", "ir", 1, 16, *flags, "--no-image-check")
    )
    train_set, _, _ = it.load_datasets(args)
    ops = train_set.transform.transforms
    present = {name for name, cls in AUG_TYPES.items() if any(isinstance(t, cls) for t in ops)}
    expected = (
        set(AUG_TYPES)
        if lesion is None
        else (set() if lesion == "aug" else set(AUG_TYPES) - {lesion})
    )
    assert present == expected
    # A view is drawn from (seed, epoch, i) alone: the same key gives the same view whatever the
    # global RNG holds; another epoch gives another view, unless there is no augmentation.
    torch.manual_seed(0)
    a = train_set[(0, 0)][0]
    torch.manual_seed(1)
    b, c = train_set[(0, 0)][0], train_set[(1, 0)][0]
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8  # workers send uint8 (item 10)
    assert torch.equal(a, b)
    assert torch.equal(a, c) == (lesion == "aug")  # no augmentation = one single view per image


def test_test_view_is_resize_then_center_crop():
    tf = it.test_transform(224)
    assert [type(t) for t in tf.transforms[:2]] == [transforms.Resize, transforms.CenterCrop]
    assert tf.transforms[0].size == 256 and tf.transforms[1].size == (224, 224)


# -----------------------------------------------------------------------------
# Evaluation pieces.
# -----------------------------------------------------------------------------
def test_knn_votes_are_weighted_by_exp_similarity_over_tau():
    # One neighbour of class 0 at cos 0.99, two of class 1 at cos 0.30: a plain majority says 1,
    # the exp(cos / 0.07) weights (e^14.1 vs 2 e^4.3) say 0.  With tau = 10 the weights are nearly
    # equal and the majority wins.
    bank = torch.tensor(
        [
            [0.99, math.sqrt(1 - 0.99**2), 0.0],
            [0.30, 0.0, math.sqrt(1 - 0.09)],
            [0.30, 0.0, -math.sqrt(1 - 0.09)],
            [-1.0, 0.0, 0.0],
        ]
    )
    labels = torch.tensor([0, 1, 1, 0])
    z = torch.tensor([[1.0, 0.0, 0.0]])
    assert it.knn_predict(z, bank, labels, 2, k=3, tau=0.07).item() == 0
    assert it.knn_predict(z, bank, labels, 2, k=3, tau=10.0).item() == 1


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    ytr, yva = torch.arange(5).repeat(40), torch.arange(5).repeat(10)
    xtr = centers[ytr] + torch.randn(200, 16, generator=g)
    xva = centers[yva] + torch.randn(50, 16, generator=g)
    top1, top5 = it.linear_probe(xtr, ytr, xva, yva, 5, epochs=20, lr=0.1)
    assert top1 >= 0.95 and top5 == 1.0
    # and it is not trivially 1: shuffled training labels give chance-level top-1
    top1_shuffled, _ = it.linear_probe(
        xtr, ytr[torch.randperm(200, generator=g)], xva, yva, 5, epochs=20, lr=0.1
    )
    assert top1_shuffled < 0.6


@pytest.mark.parametrize(
    "n,world,batch", [(45, 2, 4), (48, 2, 4), (7, 3, 2), (50, 3, 5), (11, 4, 1)]
)
def test_padded_mask_leaves_every_index_updated_exactly_once(n, world, batch):
    """DistributedSampler repeats up to world-1 indices; the mask drops exactly those repeats."""
    kept, dropped = [], 0
    for rank in range(world):
        sampler = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=3
        )
        sampler.set_epoch(5)
        local = list(sampler)
        for start in range(0, len(local), batch):
            chunk = torch.tensor(local[start : start + batch])
            mask = it.padded_mask(start, len(chunk), rank, world, n)
            kept += chunk[~mask].tolist()
            dropped += int(mask.sum())
    assert sorted(kept) == list(range(n))
    assert dropped == math.ceil(n / world) * world - n


# -----------------------------------------------------------------------------
# LA: clustering each epoch, warm-up, --init-from; resume is exact.
# -----------------------------------------------------------------------------
def test_resume_continues_at_the_right_epoch_and_matches_an_uninterrupted_run(data, tmp_path):
    """LA with 1 warm-up epoch of IR.  Run A: 3 epochs straight.  Run B: 1 epoch, resume to 2,
    resume to 3.  B must hold exactly A's bank, model and cluster labels; epoch 2's labels must be
    the k-means of the bank that epoch 1 left (seed + 1000 * epoch)."""
    la = ["--la-warmup-epochs", "1"]
    it.main(argv(data, tmp_path / "A", "la", 3, 16, *la))
    b = tmp_path / "B"
    it.main(argv(data, b, "la", 1, 16, *la))
    after_1 = load_ckpt(b)
    assert (after_1["epoch"], after_1["step"], after_1["cluster_labels"]) == (
        1,
        3,
        None,
    )  # warm-up: IR, no k-means
    it.main(argv(data, b, "la", 2, 16, *la, "--resume"))
    after_2 = load_ckpt(b)
    assert after_2["epoch"] == 2 and after_2["step"] == 6
    expected = run_kmeans(after_1["bank"]["vectors"], 4, 2, seed=1000, verbose=False)
    assert torch.equal(after_2["cluster_labels"], expected)
    it.main(argv(data, b, "la", 3, 16, *la, "--resume"))
    final_a, final_b = load_ckpt(tmp_path / "A"), load_ckpt(b)
    assert final_b["epoch"] == 3 and final_b["step"] == 9
    assert torch.equal(final_a["bank"]["vectors"], final_b["bank"]["vectors"])
    assert torch.equal(final_a["cluster_labels"], final_b["cluster_labels"])
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    assert [r["epoch"] for r in rows(b, "epoch")] == [1, 2, 3]
    assert [r["algo"] for r in rows(b, "epoch")] == ["ir", "la", "la"]
    losses_a = [r["train_loss"] for r in rows(tmp_path / "A", "epoch")]
    assert [r["train_loss"] for r in rows(b, "epoch")] == pytest.approx(losses_a)


def test_la_init_from_ir_checkpoint_clusters_the_ir_bank(data, tmp_path):
    it.main(argv(data, tmp_path / "ir", "ir", 1, 16))
    ir = load_ckpt(tmp_path / "ir")
    it.main(
        argv(data, tmp_path / "la", "la", 1, 16, "--init-from", str(tmp_path / "ir" / "ckpt.pt"))
    )
    la = load_ckpt(tmp_path / "la")
    assert rows(tmp_path / "la", "config")[0]["la_warmup_epochs"] == 0
    assert [r["algo"] for r in rows(tmp_path / "la", "epoch")] == ["la"]
    # LA's first k-means ran on the bank IR left (App. D: LA starts from IR's model AND bank)
    assert torch.equal(
        la["cluster_labels"], run_kmeans(ir["bank"]["vectors"], 4, 2, seed=0, verbose=False)
    )


def test_lr_drops_twice_on_plateaus_then_stops(data, tmp_path):
    """--patience 1, --lr-factor 0.1: the kNN metric on 16 val images plateaus quickly; the LR goes
    0.03 -> 0.003 -> 0.0003 and training must stop at the next plateau (App. D), before --epochs."""
    out = tmp_path / "p"
    it.main(argv(data, out, "ir", 30, 16, "--patience", "1"))
    ep = rows(out, "epoch")
    lrs = sorted(set(r["lr"] for r in ep), reverse=True)
    assert lrs == pytest.approx([0.03, 0.003, 0.0003])
    assert len(ep) < 30 and load_ckpt(out)["finished"] and load_ckpt(out)["lr_drops"] == 3
    # each drop happens exactly `patience` epochs after the last best value
    best, bad, lr = -1.0, 0, 0.03
    for r in ep:
        assert r["lr"] == pytest.approx(lr)
        if r["knn_top1"] > best:
            best, bad = r["knn_top1"], 0
        else:
            bad += 1
            if bad > 1:
                lr, bad = lr * 0.1, 0


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    data, tmp_path, monkeypatch
):
    out = tmp_path / "nan"
    calls = []

    def nan_at_step_5(z, bank, idx, tau):  # the loss of step 5 is NaN
        calls.append(1)
        return it.ir_loss(z, bank, idx, tau=tau) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setitem(it.LOSSES, "ir", it.Loss(nan_at_step_5, (), False))
    with pytest.raises(FloatingPointError, match=r"step 5 \(epoch 2, batch 2/3\)"):
        it.main(argv(data, out, "ir", 3, 16))
    ckpt = load_ckpt(out)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and torch.isfinite(ckpt["bank"]["vectors"]).all()
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    assert [r["epoch"] for r in rows(out, "epoch")] == [1]


@pytest.fixture(scope="module")
def straight_ir(data, tmp_path_factory):
    """Two epochs of IR at batch 2 (24 steps each), uninterrupted, without workers."""
    out = tmp_path_factory.mktemp("straight") / "ir"
    torch.set_num_threads(1)
    it.main(argv(data, out, "ir", 2, 2))
    return load_ckpt(out)


def run_and_signal(cmd, trigger, sig):
    """Start cmd in a process group of its own; when a line of its output starts with `trigger`,
    send `sig` to the whole group, as SLURM's scancel and Ctrl-C do.  Returns (status, output)."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), start_new_session=True, **pipes)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(trigger):
                os.killpg(proc.pid, sig)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_workers_saves_and_resume_replays_the_run(
    data, tmp_path, straight_ir, sig
):
    """Items 2 and 8.  SIGTERM or SIGINT to the whole process group, DataLoader workers included,
    during epoch 2 of 2: exit 0 with a checkpoint at the stop.  Resumed with another number of
    workers, the run ends with exactly the bank and model of an uninterrupted run without workers:
    each view comes from (seed, epoch, i) alone."""
    out = tmp_path / "sig"
    flags = ["--workers", "2", "--log-every", "1"]
    cmd = [sys.executable, "imagenet_train.py"] + argv(data, out, "ir", 2, 2, *flags)
    status, text = run_and_signal(cmd, "epoch 2 step 3/24", sig)
    assert status == 0 and "Traceback" not in text, text
    assert f"stopped by {sig.name}" in text
    ckpt = load_ckpt(out)
    assert ckpt["epoch"] == 1 and 3 <= ckpt["batch_in_epoch"] < 24, text  # mid-epoch 2
    assert ckpt["step"] == 24 + ckpt["batch_in_epoch"]
    it.main(argv(data, out, "ir", 2, 2, "--resume", "--workers", "1"))
    resumed = load_ckpt(out)
    assert (resumed["epoch"], resumed["step"]) == (2, 48)
    assert torch.equal(resumed["bank"]["vectors"], straight_ir["bank"]["vectors"])
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight_ir["model"].items())
    assert [r["epoch"] for r in rows(out, "epoch")] == [1, 2]


def test_fp16_resumes_a_run_saved_without_fp16(ir_checkpoint, data, tmp_path, monkeypatch):
    """Item 5: a run saved with a disabled GradScaler (state {}) resumed with an enabled one, as
    --precision fp16 (or auto on a GPU without bf16) does; the CPU's scaler stands in for CUDA's."""
    out = tmp_path / "ir"
    shutil.copytree(ir_checkpoint, out)
    assert load_ckpt(out)["scaler"] == {}
    monkeypatch.setattr(it, "make_scaler", lambda precision: torch.amp.GradScaler("cpu"))
    it.main(argv(data, out, "ir", 2, 16, "--resume"))
    ckpt = load_ckpt(out)
    assert ckpt["epoch"] == 2 and ckpt["scaler"]["scale"] > 0


def test_modes_threads_and_memory_format(data, tmp_path, monkeypatch):
    """Items 9 and 11: cudnn.benchmark on unless --deterministic (which turns deterministic
    kernels on); --threads sets torch's threads; the kNN evaluation's inputs are in the
    training's memory format (channels_last on a GPU, forced here on the CPU)."""
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    monkeypatch.setattr(it, "memory_format_for", lambda device: torch.channels_last)
    seen, forward = set(), it.ResNetEmbedding.forward

    def spy(model, x):
        seen.add((model.training, x.is_contiguous(memory_format=torch.channels_last)))
        return forward(model, x)

    monkeypatch.setattr(it.ResNetEmbedding, "forward", spy)
    try:
        it.main(argv(data, tmp_path / "a", "ir", 1, 16, "--threads", "2"))
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 2
        assert seen == {(True, True), (False, True)}  # training and kNN inputs: channels_last
        it.main(argv(data, tmp_path / "b", "ir", 1, 16, "--deterministic"))
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])


def test_batches_cross_as_uint8_and_the_device_normalises(data, tmp_path):
    """Item 10: a worker sends uint8 views; to_device_input gives ImageNet-normalised float32."""
    args = it.build_parser().parse_args(argv(data, tmp_path, "ir", 1, 16, "--no-image-check"))
    train_set, _, _ = it.load_datasets(args)
    keys = [(0, i) for i in range(4)]
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, sampler=keys, num_workers=1)
    images, _, idx = next(iter(loader))
    assert (
        images.dtype == torch.uint8
        and images.shape == (4, 3, 32, 32)
        and idx.tolist() == [0, 1, 2, 3]
    )
    x = it.to_device_input(images, torch.device("cpu"))
    ref = transforms.Normalize(it.IMAGENET_MEAN, it.IMAGENET_STD)(images.float() / 255)
    assert x.dtype == torch.float32 and torch.allclose(x, ref, atol=1e-5)


def test_faiss_is_imported_only_where_k_means_runs():
    """Item 11: importing the trainer (an IR run) does not load faiss."""
    code = "import sys, imagenet_train; assert 'faiss' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_srun_variables_stand_in_for_torchrun_and_collectives_wait_30_minutes(monkeypatch):
    """Items 6 and 11: launched by srun alone (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, no RANK)
    each process is one rank of the run, or a one-line error says what is missing; a rank waits
    30 minutes in a collective, not hours."""
    calls = []
    monkeypatch.setattr(
        it.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw))
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(it.UserError, match="srun .* MASTER_ADDR / MASTER_PORT"):
        it.setup_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert it.setup_distributed("cpu") == (True, 3, 1, 4, torch.device("cpu"))
    timeout = datetime.timedelta(minutes=30)
    assert calls == [("gloo", dict(rank=3, world_size=4, timeout=timeout))]


# -----------------------------------------------------------------------------
# Two processes (gloo): under torchrun, and as srun starts them.  A spy script wraps the trainer:
# it records each rank's Eq. 7 updates, k-means calls, DDP options and gathered features, and can
# make rank 0's checkpoint write fail.
# -----------------------------------------------------------------------------
SPY = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import imagenet_train as it, memory_bank
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
spy = dict(kmeans=[], counts=None, gathered=[], ddp=None)
update, kmeans = memory_bank.MemoryBank.update, it.run_kmeans
ddp, gather = it.DDP, it.gather_to_rank0

def spy_kmeans(*args, **kw):
    spy["kmeans"].append((kw["clusterings"], kw["threads"]))
    return kmeans(*args, **kw)

def counting_update(bank, indices, vectors, alpha, renormalize=True):
    spy["bank"] = bank
    if spy["counts"] is None:
        spy["counts"] = torch.zeros(bank.size, dtype=torch.long)
    kept = indices[indices >= 0]
    spy["counts"].index_add_(0, kept, torch.ones_like(kept))
    return update(bank, indices, vectors, alpha, renormalize)

def spy_gather(*args):
    out = gather(*args)
    spy["gathered"].append(None if out is None else tuple(out.shape))
    return out

def full_disk(state, path):
    raise OSError(28, "No space left on device")

memory_bank.MemoryBank.update = counting_update
it.run_kmeans = spy_kmeans
it.DDP = lambda *a, **k: spy.update(ddp=k) or ddp(*a, **k)
it.gather_to_rank0 = spy_gather
if os.environ.get("FAIL_SAVE_ON_RANK_0") and rank == 0:
    it.save_checkpoint = full_disk
status = it.command_line(sys.argv[1:])
spy["vectors"] = spy.pop("bank").vectors
torch.save(spy, os.path.join(os.environ["SPY_DIR"], f"rank{{rank}}.pt"))
sys.exit(status)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    port = str(free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master-port",
        port,
        *args,
    ]


def test_torchrun_two_ranks_share_k_means_and_keep_identical_banks(data, tmp_path):
    """Items 1, 3 and 11.  45 train images over 2 ranks: DistributedSampler pads to 46, per rank
    23 = 5 batches of 4 and one of 3.  LA with H = 3: rank 0 runs clusterings 0 and 2, rank 1
    runs 1, each on its share of the cores; banks stay identical and each row gets exactly one
    Eq. 7 update per epoch (the padding repeat is marked -1); DDP does not broadcast buffers
    every forward; the linear probe's features are gathered on rank 0 only."""
    odd = tmp_path / "odd"
    shutil.copytree(data, odd)
    for c in range(3):
        os.remove(os.path.join(odd, "train", f"class_{c:02d}", f"train_{c}_000.png"))
    out, spies = tmp_path / "ddp", tmp_path / "spies"
    spies.mkdir()
    (tmp_path / "spy.py").write_text(SPY.format(repo=REPO))
    flags = ["--la-warmup-epochs", "1", "--n-kmeans", "3", "--eval-linear", "--linear-epochs", "2"]
    cmd = torchrun(str(tmp_path / "spy.py"), *argv(odd, out, "la", 2, 8, *flags))
    env = dict(subprocess_env(), SPY_DIR=str(spies))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    spy0, spy1 = (torch.load(spies / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert spy0["vectors"].shape == (45, 128) and torch.equal(spy0["vectors"], spy1["vectors"])
    assert torch.equal(spy0["counts"] + spy1["counts"], torch.full((45,), 2))  # 2 epochs
    cores = max(1, len(os.sched_getaffinity(0)) // 2)
    assert spy0["kmeans"] == [([0, 2], cores)] and spy1["kmeans"] == [([1], cores)]
    assert spy0["ddp"]["broadcast_buffers"] is False and spy1["ddp"]["broadcast_buffers"] is False
    assert (
        spy0["gathered"] == [(45, 512), (45,), (16, 512), (16,)] and spy1["gathered"] == [None] * 4
    )
    ckpt = load_ckpt(out)
    assert torch.equal(ckpt["bank"]["vectors"], spy0["vectors"])
    assert (ckpt["epoch"], ckpt["step"]) == (2, 12)  # 6 steps per epoch on each rank
    labels = ckpt["cluster_labels"]  # each clustering from one rank, joined on both
    assert labels.shape == (3, 45) and int(labels.min()) >= 0 and int(labels.max()) < 4
    assert [r["world_size"] for r in rows(out, "config")] == [2]
    assert [r["algo"] for r in rows(out, "epoch")] == ["ir", "la"]
    assert len(rows(out, "linear")) == 1


def test_torchrun_ranks_stop_within_steps_of_a_signal(data, tmp_path):
    """Item 7: SIGTERM to torchrun's process group (as SLURM sends it) after step 6 of 12 in
    epoch 2, with progress checks only every 6 steps: the ranks agree to stop after the next step
    or two, not at the next check (step 12), and save there."""
    out = tmp_path / "stop"
    cmd = torchrun("imagenet_train.py", *argv(data, out, "ir", 2, 4, "--log-every", "6"))
    _, text = run_and_signal(cmd, "epoch 2 step 6/12", signal.SIGTERM)
    assert "stopped by SIGTERM" in text, text
    ckpt = load_ckpt(out)
    assert ckpt["epoch"] == 1 and 6 < ckpt["batch_in_epoch"] < 12, text


def test_srun_launch_and_a_rank_0_failure_ends_every_rank(data, tmp_path):
    """Items 6 and 11: two processes started as srun starts them (SLURM_* variables, no RANK) train
    as one run; when rank 0 alone fails to write its checkpoint, rank 1 fails too, at once, rather
    than wait in its next collective."""
    (tmp_path / "spy.py").write_text(SPY.format(repo=REPO))
    port, out = str(free_port()), tmp_path / "out"
    procs = []
    for rank in range(2):
        slurm = dict(SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        spy = dict(FAIL_SAVE_ON_RANK_0="1", SPY_DIR=str(tmp_path))
        env = dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **slurm, **spy)
        cmd = [sys.executable, str(tmp_path / "spy.py"), *argv(data, out, "ir", 2, 16)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        (out0, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0 and "No space left on device" in err0, err0[-2000:]
    assert procs[1].returncode != 0 and "rank 0 failed: [Errno 28] No space left" in err1, err1[
        -2000:
    ]
    assert "epoch 1 done" in out0 and rows(out, "config")[0]["world_size"] == 2


# -----------------------------------------------------------------------------
# Fashion-MNIST through --dataset, and the small-image stem.
# -----------------------------------------------------------------------------
def write_idx_gz(folder, prefix, images, labels):
    """Two of the four files of the Debian package dataset-fashion-mnist, in its gzip IDX format."""
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_flag_reads_the_packaged_gzip_files_and_trains(tmp_path, monkeypatch, capsys):
    """--dataset fashion-mnist reads gzip IDX files, as the Debian package installs them, through
    torchvision (decompressed into a cache); two epochs of IR train on 40 tiny images with the
    small stem.  A folder without the files is a one-line error naming both ways to get them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng, data = np.random.default_rng(0), tmp_path / "fmnist"
    data.mkdir()
    written = {}
    for prefix, n in (("train", 40), ("t10k", 12)):
        labels, images = np.arange(n) % 4, rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, :, 7 * c : 7 * c + 7] += 150  # class c: a bright vertical band at 7c
        write_idx_gz(data, prefix, images, labels)
        written[prefix] = images
    out, flags = tmp_path / "out", ["--dataset", "fashion-mnist", "--stem", "small"]
    it.main(argv(data, out, "ir", 2, 8, *flags))
    epochs, (cfg,) = rows(out, "epoch"), rows(out, "config")
    assert [r["epoch"] for r in epochs] == [1, 2] and all(
        math.isfinite(r["train_loss"]) for r in epochs
    )
    assert (cfg["num_train"], cfg["num_val"], cfg["num_classes"], cfg["stem"]) == (
        40,
        12,
        10,
        "small",
    )
    assert load_ckpt(out)["bank"]["vectors"].shape == (40, 128)
    args = it.build_parser().parse_args(argv(data, out, "ir", 1, 8, *flags))
    train, _, val = it.load_datasets(args)
    assert torch.equal(train.data, torch.from_numpy(written["train"].astype(np.uint8)))
    assert val.targets.tolist() == (np.arange(12) % 4).tolist()
    assert train[(0, 3)][0].shape == (3, 32, 32) and train[(0, 3)][0].dtype == torch.uint8
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert it.command_line(argv(empty, tmp_path / "o2", "ir", 1, 8, *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Fashion-MNIST files" in err
    assert "apt-get install dataset-fashion-mnist" in err and "download=True" in err


def test_subset_flags_keep_the_same_balanced_images_for_every_seed(tmp_path, monkeypatch, capsys):
    """--train-subset / --val-subset keep n / 10 images of each class, drawn with seed 0 whatever
    --seed is (one split for every run of the miniature); the bank has one row per kept image; a
    size that is not a multiple of the classes, or too large, is one line naming the flag."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data, rng = tmp_path / "fmnist", np.random.default_rng(1)
    data.mkdir()
    for prefix, n in (("train", 60), ("t10k", 30)):
        images = rng.integers(0, 255, (n, 28, 28))
        images[:, 0, 0] = np.arange(n)  # pixel (0, 0) names the original row
        write_idx_gz(data, prefix, images, np.arange(n) % 10)
    flags = ["--dataset", "fashion-mnist", "--train-subset", "20", "--val-subset", "10"]
    kept = {}
    for seed in ("0", "1"):
        args = it.build_parser().parse_args(
            argv(data, tmp_path / "o", "ir", 1, 8, *flags, "--seed", seed)
        )
        train, train_eval, val = it.load_datasets(args)
        assert torch.equal(train.targets.bincount(minlength=10), torch.full((10,), 2))
        assert torch.equal(val.targets.bincount(minlength=10), torch.ones(10, dtype=torch.long))
        assert torch.equal(train_eval.data, train.data)  # the probe reads the same images
        original = train.data[:, 0, 0].long()
        assert torch.equal(train.targets, original % 10) and len(original.unique()) == 20
        kept[seed] = (original, val.data[:, 0, 0])
    assert all(torch.equal(a, b) for a, b in zip(kept["0"], kept["1"], strict=True))
    out = tmp_path / "out"
    it.main(argv(data, out, "ir", 1, 8, *flags))
    assert rows(out, "config")[0]["num_train"] == 20 and rows(out, "config")[0]["num_val"] == 10
    assert load_ckpt(out)["bank"]["vectors"].shape == (20, 128)
    for flag, value, most in (("--train-subset", "25", 60), ("--val-subset", "40", 30)):
        bad = [*flags, flag, value]
        assert it.command_line(argv(data, tmp_path / f"o{value}", "ir", 1, 8, *bad)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} must be a multiple of the 10 classes" in err
        assert f"at most {most}, got {value}" in err


def test_subset_of_an_image_folder_renumbers_its_samples(tmp_path):
    root = it.make_toy_imagefolder(tmp_path / "d", num_classes=4, train_per_class=5)
    train, _ = it.image_folders(str(root), None, None)
    keep = it.balanced_subset(train.targets, 8, 4, torch.Generator().manual_seed(0))
    chosen = [train.samples[i] for i in keep]
    it.keep_rows(train, keep)
    assert train.samples == train.imgs == chosen and len(train) == 8
    assert train.targets == [t for _, t in chosen] and sorted(train.targets) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_small_stem_keeps_a_32_px_image_at_32x32_into_layer1():
    sizes = {}
    for stem in ("imagenet", "small"):
        model = it.ResNetEmbedding(16, stem).eval()
        hook = lambda m, i, o, stem=stem: sizes.__setitem__(stem, tuple(o.shape[-2:]))  # noqa: E731
        model.net.layer1.register_forward_hook(hook)
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert sizes == {"imagenet": (8, 8), "small": (32, 32)}


# -----------------------------------------------------------------------------
# Bad input: clear errors before training.
# -----------------------------------------------------------------------------
def _remove_class(root, split, name):
    shutil.rmtree(os.path.join(root, split, name))


BAD_DATA = {
    "missing folder": (lambda root: shutil.rmtree(root), r"--data .*folder not found"),
    "no val": (lambda root: shutil.rmtree(os.path.join(root, "val")), r"has no val/ folder"),
    "empty train": (
        lambda root: [
            _remove_class(root, "train", c) for c in os.listdir(os.path.join(root, "train"))
        ],
        r"train is empty",
    ),
    "class mismatch": (
        lambda root: _remove_class(root, "val", "class_03"),
        r"class folders differ: only in train \['class_03'\]",
    ),
    "class without images": (
        lambda root: [
            os.remove(os.path.join(root, "val", "class_02", f))
            for f in os.listdir(os.path.join(root, "val", "class_02"))
        ],
        r"--data: .*class_02",
    ),
    "unreadable image": (
        lambda root: open(os.path.join(root, "train", "class_01", "broken.png"), "wb").write(
            b"junk"
        ),
        r"unreadable image .*class_01/broken\.png",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_folder_errors_before_training(data, tmp_path, case):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    damage, message = BAD_DATA[case]
    damage(str(root))
    with pytest.raises(ValueError, match=message):
        it.main(argv(root, tmp_path / "out", "ir", 1, 16))
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


BAD_FLAGS = {
    "batch larger than dataset": (
        ["--batch-size", "64"],
        r"--batch-size 64 is larger than the train set \(48",
    ),
    "init-from with ir": (["--init-from", "x.pt"], r"--init-from .* does not apply to --algo ir"),
    "k-background > N": (
        ["--algo", "ball", "--k-background", "49"],
        r"--k-background 49 must be <= N = 48",
    ),
    "kmeans-k > N": (["--algo", "la", "--kmeans-k", "100"], r"--kmeans-k 100 must be <= N = 48"),
    "knn-k > N": (["--knn-k", "200"], r"--knn-k 200 must be <= N = 48"),
    "alpha 1": (["--alpha", "1.0"], r"--alpha must be in \[0, 1\)"),
    "warm-up and init-from": (
        ["--algo", "la", "--init-from", "x.pt", "--la-warmup-epochs", "3"],
        r"--init-from replaces the IR warm-up",
    ),
    "resume without checkpoint": (["--resume"], r"--resume: no checkpoint"),
    "fp16 on cpu": (["--precision", "fp16"], r"--precision fp16 is for CUDA"),
    "last batch of one at 32px": (["--batch-size", "47"], r"last batch would hold one image"),
    "k-close >= k-background": (
        ["--algo", "ann", "--k-close", "16"],
        r"--k-close must be in \[0, --k-background=16\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_error_before_training(data, tmp_path, case):
    extra, message = BAD_FLAGS[case]
    with pytest.raises(ValueError, match=message):
        it.main(
            argv(data, tmp_path / "out", "ir", 1, 16) + extra
        )  # later flags override the defaults
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_existing_checkpoint_needs_resume_and_init_from_needs_an_ir_checkpoint(data, tmp_path):
    it.main(argv(data, tmp_path / "ball", "ball", 1, 16))
    with pytest.raises(ValueError, match=r"already holds ckpt.pt: pass --resume"):
        it.main(argv(data, tmp_path / "ball", "ball", 1, 16))
    with pytest.raises(ValueError, match=r"need an IR checkpoint .* got --algo ball"):
        it.main(
            argv(
                data,
                tmp_path / "la",
                "la",
                1,
                16,
                "--init-from",
                str(tmp_path / "ball" / "ckpt.pt"),
            )
        )
    with pytest.raises(ValueError, match=r"--data is required"):
        it.main(["--algo", "ir"])


# -----------------------------------------------------------------------------
# --help; Figure 2 (tests/plot_figure2.py).
# -----------------------------------------------------------------------------
def test_help_lists_the_paper_flags():
    res = subprocess.run(
        [sys.executable, "imagenet_train.py", "--help"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for flag in (
        "--algo",
        "--tau",
        "--alpha",
        "--k-background",
        "--kmeans-k",
        "--n-kmeans",
        "--init-from",
        "--la-warmup-epochs",
        "--no-crop",
        "--no-gray",
        "--no-jitter",
        "--no-flip",
        "--no-aug",
        "--eval-linear",
        "--resume",
        "App. D",
        "Eq. 7",
    ):
        assert flag in res.stdout, flag


def test_plot_groups_runs_into_figure_2_panels(tmp_path):
    def log(name, algo, alpha=0.5, lesion=None, knn=0.3, linear=None):
        cfg = dict(kind="config", algo=algo, alpha=alpha, no_aug=lesion == "aug")
        for k in ("crop", "gray", "jitter", "flip"):
            cfg[f"no_{k}"] = lesion == k
        lines = [
            cfg,
            dict(kind="epoch", epoch=1, knn_top1=knn / 2),
            dict(kind="epoch", epoch=2, knn_top1=knn),
        ]
        if linear is not None:
            lines.append(dict(kind="linear", linear_top1=linear, linear_top5=min(1.0, 2 * linear)))
        path = tmp_path / name / "log.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return str(path)

    paths = [
        log("ir", "ir", knn=0.30, linear=0.40),
        log("la", "la", knn=0.50, linear=0.55),
        log("ir_nocrop", "ir", lesion="crop", knn=0.10),
        log("ir_a0", "ir", alpha=0.0, knn=0.31),
        log("ir_none", "ir", lesion="aug", knn=0.02),
    ]
    out = tmp_path / "fig.png"
    panels = plot_figure2.plot_logs(paths, str(out))
    assert out.stat().st_size > 10_000
    a, b, c = (panels[t] for t in sorted(panels))
    assert [x[0] for x in a] == [
        "ir",
        "ir a=0.0",
        "la",
    ]  # all views; alpha shown when not App. D's 0.5
    assert [x[0] for x in b] == ["all", "all", "no crop", "none"]
    assert [x[0] for x in c] == ["0", "0.5"]
    assert a[2][1:] == (0.50, 0.55)  # best knn_top1, linear_top1 of LA
    assert math.isnan(c[0][2])  # no linear probe in that run: nan, never the kNN number
    with pytest.raises(ValueError, match="no config row"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(dict(kind="epoch", epoch=1, knn_top1=0.1)) + "\n")
        plot_figure2.plot_logs([str(bad)], str(out))


# -----------------------------------------------------------------------------
# User errors on the command line: one line, exit status 2, no traceback.
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ir_checkpoint(data, tmp_path_factory):
    """One epoch of IR on the 48 toy images: a real checkpoint to resume or start from."""
    out = tmp_path_factory.mktemp("ir_run") / "ir"
    torch.set_num_threads(1)
    it.main(argv(data, out, "ir", 1, 16))
    return out


def _truncated_png(root):
    """A PNG whose header is intact (it passes the start-up check) but whose pixels are cut off."""
    path = os.path.join(root, "train", "class_02", "train_2_000.png")
    with open(path, "rb") as f:
        head = f.read(120)
    with open(path, "wb") as f:
        f.write(head)
    return path


USER_ERRORS = {  # name: (how to break things, extra argv, regex the one line must match)
    "flag type": (None, ["--batch-size", "x"], r"argument --batch-size: invalid int value: 'x'"),
    "flag choice": (None, ["--algo", "sim"], r"argument --algo: invalid choice: 'sim'"),
    "flag range": (None, ["--alpha", "1.0"], r"--alpha must be in \[0, 1\)"),
    "missing data": (
        lambda root, ckpt: shutil.rmtree(root),
        [],
        r"--data '.*/d': folder not found",
    ),
    "empty data": (
        lambda root, ckpt: [
            shutil.rmtree(os.path.join(root, "train")),
            os.mkdir(os.path.join(root, "train")),
        ],
        [],
        r"--data: .*/d/train is empty",
    ),
    "corrupt image": (
        lambda root, ckpt: open(os.path.join(root, "val", "class_01", "bad.png"), "wb").write(
            b"junk"
        ),
        [],
        r"--data: unreadable image .*/d/val/class_01/bad\.png",
    ),
    "image that does not decode": (
        lambda root, ckpt: _truncated_png(root),
        [],
        r"--data: unreadable image .*/d/train/class_02/train_2_000\.png .*truncated",
    ),
    "image that does not decode, in a worker": (
        lambda root, ckpt: _truncated_png(root),
        ["--workers", "1"],
        r"--data: unreadable image .*/d/train/class_02/train_2_000\.png",
    ),
    "size that does not fit": (
        None,
        ["--knn-k", "200"],
        r"--knn-k 200 must be <= N = 48 train images",
    ),
    "unwritable out-dir": (
        None,
        ["--out-dir", os.path.join(REPO, "README.md", "run")],
        r"--out-dir '.*README\.md/run' is not a writable folder",
    ),
    "nothing to resume": (None, ["--resume"], r"--resume: no checkpoint at .*/out/ckpt\.pt"),
    "resume another run": (
        lambda root, ckpt: shutil.copytree(ckpt, os.path.join(os.path.dirname(root), "out")),
        ["--resume", "--algo", "ball"],
        r"--resume: .*/out/ckpt\.pt is another run's checkpoint: it has --algo ir; this run has "
        r"--algo ball",
    ),
    "corrupt checkpoint": (
        lambda root, ckpt: (
            os.makedirs(os.path.join(os.path.dirname(root), "out")),
            open(os.path.join(os.path.dirname(root), "out", "ckpt.pt"), "wb").write(
                b"not a checkpoint"
            ),
        ),
        ["--resume"],
        r"--resume: cannot read .*/out/ckpt\.pt \(",
    ),
    "init-from missing": (
        None,
        ["--algo", "la", "--init-from", "/nonexistent/ckpt.pt"],
        r"--init-from: no checkpoint at /nonexistent/ckpt\.pt",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_with_exit_status_2(
    data, ir_checkpoint, tmp_path, capsys, monkeypatch, case
):
    damage, extra, message = USER_ERRORS[case]
    # After a worker's exception, torch's DataLoader waits this long (5 s) for the worker to exit
    # it is collected; shorten it here so the wait does not land in the test time.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2, raising=False)
    root = tmp_path / "d"
    shutil.copytree(data, root)
    if damage:
        damage(str(root), str(ir_checkpoint))
    capsys.readouterr()
    assert it.command_line(argv(root, tmp_path / "out", "ir", 1, 16) + extra) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("imagenet_train.py: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    if case not in ("resume another run", "corrupt checkpoint"):
        assert not os.path.exists(tmp_path / "out" / "ckpt.pt")
    # No worker outlives the run: they ignore SIGTERM, so one left to multiprocessing's exit
    # handler would hang the process at exit.
    assert not [p for p in multiprocessing.active_children() if p.daemon and p.is_alive()]
    gc.collect()  # the failed run's DataLoader workers, while the short wait is in place


def test_plot_script_help_and_errors_are_one_line(tmp_path, capsys):
    script = os.path.join(REPO, "tests", "plot_figure2.py")
    res = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)  # fmt: skip
    assert res.returncode == 0 and "--paper" in res.stdout and "--out" in res.stdout, res.stderr
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"kind": "config"}\nnot json\n')
    for paths, message in (
        ([str(tmp_path / "missing.jsonl")], r"error: cannot read .*missing\.jsonl"),
        ([str(bad)], r"error: .*log\.jsonl line 2 is not JSON"),
    ):
        assert plot_figure2.main([*paths, "--out", str(tmp_path / "f.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
    good = tmp_path / "run" / "log.jsonl"
    good.parent.mkdir()
    good.write_text('{"kind": "config", "algo": "ir", "alpha": 0.5}\n')
    assert plot_figure2.main([str(good), "--paper", "--out", str(tmp_path / "f.png")]) == 0


def test_command_line_process_exits_2_without_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    res = subprocess.run(
        [sys.executable, "imagenet_train.py", "--data", str(tmp_path / "none"), "--device", "cpu"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert (
        res.stderr == f"imagenet_train.py: error: --data '{tmp_path / 'none'}': folder not found\n"
    )
    # A ValueError that is not a UserError is a bug: command_line lets it through with a traceback.
    monkeypatch.setattr(
        it, "check_args", lambda args, world: (_ for _ in ()).throw(ValueError("a bug"))
    )
    with pytest.raises(ValueError, match="a bug"):
        it.command_line(["--data", str(tmp_path), "--device", "cpu"])


# -----------------------------------------------------------------------------
# Defaults that depend on the data adapt and say so; typed values do not.
# -----------------------------------------------------------------------------
def test_largest_fitting_batch():
    assert it.largest_fitting_batch(48, 1, 32, 256) == 48
    assert it.largest_fitting_batch(1000, 1, 224, 256) == 256
    assert (
        it.largest_fitting_batch(45, 2, 32, 256) == 42
    )  # 44 would leave each rank a last batch of one
    assert it.largest_fitting_batch(45, 2, 64, 256) == 44  # from 64 px on, a batch of one is fine
    assert (
        it.largest_fitting_batch(7, 8, 32, 256) == 8
    )  # fewer images than ranks: check_args says so


def test_data_sized_defaults_fit_a_small_train_set_and_say_so(data, tmp_path, capsys, monkeypatch):
    warned = []
    monkeypatch.setattr(it, "warn_if_kmeans_on_cpu", lambda *a, **k: warned.append((a, k)) or False)
    out = tmp_path / "la"
    it.main(
        [
            "--data",
            str(data),
            "--out-dir",
            str(out),
            "--algo",
            "la",
            "--la-warmup-epochs",
            "0",
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--n-kmeans",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("defaults lowered")]
    for flag, app_d in (
        ("--batch-size", 256),
        ("--k-background", 4096),
        ("--kmeans-k", 30000),
        ("--knn-k", 200),
    ):
        assert f"{flag} 48 (App. D: {app_d})" in line
    assert "LA trains as BALL" in line  # 48 clusters of 48 images: C_i = {i}, Theorem 5.4
    (cfg,) = rows(out, "config")
    assert (cfg["batch_size"], cfg["k_background"], cfg["kmeans_k"], cfg["knn_k"]) == (
        48,
        48,
        48,
        48,
    )
    assert cfg["defaults_note"] == line
    assert rows(out, "epoch")[0]["step"] == 1  # one batch of all 48 images
    # the trainer asked, once, whether LA's k-means will run on the CPU beside a GPU bank
    assert len(warned) == 1 and warned[0][0] == (torch.device("cpu"), 48, 48, 2)


def test_kmeans_warning_names_the_job_for_la_on_a_gpu(monkeypatch):
    import local_agg

    monkeypatch.setattr(local_agg, "_WARNED_KMEANS_ON_CPU", False)
    monkeypatch.setattr(
        local_agg, "faiss_has_gpu", lambda: False
    )  # as with faiss-cpu, whatever is installed
    parser = it.build_parser()
    la, ir = (
        parser.parse_args(["--algo", "la", "--kmeans-k", "30000"]),
        parser.parse_args(["--algo", "ir"]),
    )
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert not it.kmeans_device_warning(ir, cuda, it.IMAGENET_TRAIN_SIZE)
    assert not it.kmeans_device_warning(la, torch.device("cpu"), it.IMAGENET_TRAIN_SIZE)
    with pytest.warns(
        RuntimeWarning,
        match=r"k-means on the CPU: .*10 clustering\(s\) of N=1,281,167 rows into "
        r"30,000 clusters.*faiss-gpu",
    ):
        assert it.kmeans_device_warning(la, cuda, it.IMAGENET_TRAIN_SIZE)
    assert not it.kmeans_device_warning(la, cuda, it.IMAGENET_TRAIN_SIZE)  # once per process


# -----------------------------------------------------------------------------
# The loop: host checks every --log-every steps; a readable step.
# -----------------------------------------------------------------------------
def test_host_checks_happen_every_log_every_steps_and_before_each_save(data, tmp_path, monkeypatch):
    calls = []
    real = it.check_finite
    monkeypatch.setattr(it, "check_finite", lambda run: calls.append(run.step) or real(run))
    it.main(argv(data, tmp_path / "x", "ir", 2, 8, "--log-every", "4"))  # 6 steps per epoch
    # steps 4 and 6 (the epoch's last) in the loop, then once more before the epoch's checkpoint
    assert calls == [4, 6, 6, 10, 12, 12]


def test_training_stages_are_named_and_the_step_fits_a_screen():
    for stage in (it.set_up, it.resume, it.train, it.end_of_epoch, it.after_training, it.main):
        assert stage.__doc__
    for function, most in ((it.train_step, 30), (it.train, 45), (it.main, 35)):
        assert len(inspect.getsource(function).splitlines()) <= most, function.__name__


# -----------------------------------------------------------------------------
# tests/plot_figure2.py: Figure 2's panels as accuracy-per-epoch curves.
# -----------------------------------------------------------------------------
def test_plot_draws_accuracy_per_epoch_with_linear_and_paper_markers_apart(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))

    def log(name, algo, knn, init_epoch=0, linear=None):
        cfg = dict(kind="config", algo=algo, alpha=0.5, init_epoch=init_epoch)
        lines = [cfg] + [dict(kind="epoch", epoch=e + 1, knn_top1=v) for e, v in enumerate(knn)]
        if linear is not None:
            lines.append(dict(kind="linear", linear_top1=linear, linear_top5=1.0))
        path = tmp_path / name / "log.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return str(path)

    paths = [
        log("ir_init", "ir", [0.01, 0.05]),
        log("la", "la", [0.10, 0.20, 0.25], init_epoch=2, linear=0.4),
    ]
    plot_figure2.plot_logs(paths, str(tmp_path / "f.png"), paper=True)
    (fig,) = figures
    ax_a = fig.axes[0]
    curves = {line.get_label(): line for line in ax_a.lines if line.get_linestyle() == "-"}
    la = curves["la (la)"]
    assert list(la.get_xdata()) == [3, 4, 5] and list(la.get_ydata()) == [
        0.10,
        0.20,
        0.25,
    ]  # starts after IR
    assert list(curves["ir (ir_init)"].get_xdata()) == [1, 2]
    stars = [line for line in ax_a.lines if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [
        ([5], [0.4])
    ]  # linear: apart, at its epoch
    hollow = [
        (line.get_xdata()[0], line.get_ydata()[0])
        for line in ax_a.lines
        if line.get_marker() == "o"
    ]
    assert hollow == [(e, acc) for _, e, acc in plot_figure2.PAPER_FIGURE2["a"]]
    assert any("read off" in t.get_text() for t in ax_a.get_legend().get_texts())
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 3
