"""Check a GPU machine, and this code on it, in one run before a long ImageNet training.

    python tests/cuda_check.py                 # a CUDA machine: sized for under 5 minutes on one H200
    python tests/cuda_check.py --device cpu    # the same sequence at tiny sizes, under 2 minutes (CI runs it)
    python tests/cuda_check.py --only train    # rerun the checks whose names start with "train"

It prints one JSON line per check on stdout, {"check": NAME, "status": "pass" | "fail" | "n/a", ...},
and a last "summary" line; the exit status is 1 if a check that ran failed, else 0.  "n/a" marks a
check that cannot run on this device (e.g. the host-synchronisation checks on the CPU): it is neither
passed nor failed.  What the trainer prints goes to --out DIR/trainer_output.log (or is dropped),
so stdout holds only the JSON lines.  The checks, in order:

  environment        versions, the GPU, and which faiss build k-means will use (GPU or CPU)
  agree LOSS         ir_loss, ir_nce_loss, ball_loss, ann_loss, la_loss, infonce_loss and
                     MemoryBank.update on the device -- fp32, and under bf16 and fp16 autocast with
                     fp32 inputs and with half inputs -- against the CPU's fp32 value and gradient
                     (for half inputs: of the same rounded inputs, so what is checked is that the
                     loss computes in fp32, not the rounding of its inputs)
  no_sync LOSS       each loss's forward + backward, MemoryBank.update, and the trainer's whole
                     train_step, inside torch.cuda.set_sync_debug_mode("error"): which still make
                     the host wait for the GPU (a failing check, reported, not a crash)
  train ALGO PREC    a few hundred steps of each algorithm through imagenet_train.main on generated
                     images, AMP bf16 and fp16, channels_last: finite losses that fall, a finite model,
                     a unit-norm bank, the checkpoint and the log rows
  resume             SIGTERM in the middle of epoch 2, then --resume: the same bank and weights as an
                     uninterrupted run (bit-identical on the CPU; on the GPU within the spread that
                     non-deterministic kernels leave between two uninterrupted runs, reported)
  torchrun           torchrun --nproc_per_node 1 over NCCL (gloo on the CPU): LA's warm-up epoch,
                     then an LA epoch whose cluster labels are broadcast
  benchmark          imagenet_train.py --benchmark: IR and LA images/s at 224 px, batch 256, a
                     1,281,167-row bank; peak GPU memory; one k-means of 1,000 clusters with the faiss
                     build named, and Appendix D's 10 x 30,000 per epoch extrapolated from it

On a GPU machine that cannot reach a package index (the project's lent H200 has Python 3.12 and
torch, but no faiss): fetch the faiss-cpu wheel beforehand (18 MB, one abi3 wheel for any
Python >= 3.10) into the git-ignored folder .whl/, carry that folder, install it offline first:

    pip download --no-deps --only-binary=:all: --python-version 3.12 faiss-cpu -d .whl   # here
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 tests/cuda_check.py --out $OUT

Carry .whl/ with the working tree (18 MB of the 64 MiB a run may take), give the command a
6-minute limit so that a second run still fits in 15 minutes of device time with the start-up, and
read $OUT/cuda_check.jsonl and $OUT/trainer_output.log afterwards.  (The GPU faiss wheel is 135 MB,
more than such a machine can be sent, so there k-means runs on faiss-cpu's 16 threads and the
benchmark line says so.)  The 5 minutes are an estimate from the sizes: this script has not yet run
on a GPU.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import imagenet_train as it  # noqa: E402
from infonce import infonce_loss  # noqa: E402
from instance_disc import ann_loss, ball_loss, ir_loss, ir_nce_loss  # noqa: E402
from local_agg import la_loss  # noqa: E402
from memory_bank import MemoryBank  # noqa: E402

# Sizes per device.  cuda: the losses at a 100k-row bank and App. D's batch and |B_i|; 256 training
# steps of each algorithm at 64 px (4 epochs of 64, so 4 checkpoints); the benchmark at ImageNet's
# size.  cpu: the same, tiny.  Estimated GPU time, from the sizes: agree and no_sync ~20 s, train
# 8 x ~8 s, resume ~30 s, torchrun ~20 s, benchmark ~60 s (two x 205 steps of batch 256 at 224 px
# and a 1.28M x 1,000 k-means on faiss-cpu's 16 threads), start-up ~15 s: about 3.5 minutes.
SIZES = {
    "cuda": dict(
        rows=100_000,
        batch=256,
        dim=128,
        k_background=4096,
        clusterings=10,
        clusters=1000,
        negatives=4096,
        image_size=64,
        per_class=512,
        val_per_class=32,
        train_batch=32,
        epochs=4,
        workers=4,
        train_k_background=256,
        train_kmeans_k=32,
        resume_per_class=256,
        resume_batch=16,
        bench=[
            "--image-size",
            "224",
            "--batch-size",
            "256",
            "--bench-bank",
            "1281167",
            "--bench-steps",
            "200",
            "--kmeans-k",
            "1000",
        ],
    ),
    "cpu": dict(
        rows=2000,
        batch=32,
        dim=32,
        k_background=256,
        clusterings=3,
        clusters=20,
        negatives=256,
        image_size=32,
        per_class=8,
        val_per_class=2,
        train_batch=8,
        epochs=1,
        workers=0,
        train_k_background=16,
        train_kmeans_k=4,
        resume_per_class=12,
        resume_batch=4,
        bench=[
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--bench-bank",
            "300",
            "--bench-steps",
            "2",
            "--kmeans-k",
            "5",
            "--k-background",
            "16",
        ],
    ),
}
TAU = 0.07


class NotApplicable(Exception):
    """Raised by a check that cannot run on this device; reported as status "n/a"."""


# -----------------------------------------------------------------------------
# The losses, each as f(x, fixed) with x the tensor that gets a gradient.
# -----------------------------------------------------------------------------
def loss_cases(size):
    """{name: (function(x, fixed, generator), which input is x)}.  x is z [B, d] for the bank losses
    and the score matrix [B, K] for infonce_loss; `fixed` holds the bank, idx, cluster labels."""
    k, negatives = size["k_background"], size["negatives"]
    return {
        "ir_loss": (lambda x, f, g: ir_loss(x, f["bank"], f["idx"], tau=TAU), "z"),
        "ir_nce_loss": (
            lambda x, f, g: ir_nce_loss(
                x, f["bank"], f["idx"], tau=TAU, num_negatives=negatives, generator=g
            ),
            "z",
        ),
        "ball_loss": (
            lambda x, f, g: ball_loss(x, f["bank"], f["idx"], tau=TAU, k_background=k),
            "z",
        ),
        "ann_loss": (
            lambda x, f, g: ann_loss(x, f["bank"], f["idx"], tau=TAU, k_background=k),
            "z",
        ),
        "la_loss": (
            lambda x, f, g: la_loss(x, f["bank"], f["idx"], f["labels"], tau=TAU, k_background=k),
            "z",
        ),
        "infonce_loss": (lambda x, f, g: infonce_loss(x), "scores"),
    }


def make_inputs(size, seed=0):
    """Unit z and bank rows, batch indices, H random clusterings, and InfoNCE scores (CPU, fp32)."""
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(size["rows"], size["dim"], generator=g), dim=1)
    idx = torch.randperm(size["rows"], generator=g)[: size["batch"]]
    z = F.normalize(bank[idx] + 0.5 * torch.randn(size["batch"], size["dim"], generator=g), dim=1)
    labels = torch.randint(0, size["clusters"], (size["clusterings"], size["rows"]), generator=g)
    negatives = torch.randint(0, size["rows"], (size["negatives"],), generator=g)
    scores = torch.cat([(z * bank[idx]).sum(1, keepdim=True), z @ bank[negatives].T], dim=1) / TAU
    return dict(z=z, scores=scores), dict(bank=bank, idx=idx, labels=labels)


def loss_and_grad(fn, x, fixed, device, dtype=None, autocast=None, seed=0):
    """fn's value and d value / d x on `device`, x cast to `dtype`, optionally under autocast."""
    x = x.to(device=device, dtype=dtype or x.dtype).detach().requires_grad_(True)
    fixed = {k: v.to(device) for k, v in fixed.items()}
    g = torch.Generator().manual_seed(
        seed
    )  # ir_nce_loss: the same negatives on every device (drawn on the CPU)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        loss = fn(x, fixed, g)
    loss.backward()
    return (
        loss.detach().double().cpu(),
        x.grad.double().cpu(),
        str(loss.dtype).replace("torch.", ""),
    )


def relative_errors(got, ref):
    (value, grad, _), (ref_value, ref_grad, _) = got, ref
    return (
        float((value - ref_value).abs() / max(1.0, float(ref_value.abs()))),
        float((grad - ref_grad).abs().max() / (ref_grad.abs().max() + 1e-12)),
    )


def check_agree(fn, which, inputs, fixed, device):
    """One loss on `device` in five modes against the CPU fp32 reference."""
    cpu = torch.device("cpu")
    x32 = inputs[which]
    modes, ok, reference = {}, True, None
    for mode, dtype, autocast in (
        ("fp32", None, None),
        ("bf16 autocast", None, torch.bfloat16),
        ("fp16 autocast", None, torch.float16),
        ("bf16 inputs", torch.bfloat16, torch.bfloat16),
        ("fp16 inputs", torch.float16, torch.float16),
    ):
        # the reference sees the same (rounded) inputs, in fp32 on the CPU, without autocast
        x_ref = x32 if dtype is None else x32.to(dtype).float()
        ref = loss_and_grad(fn, x_ref, fixed, cpu)
        reference = reference if reference is not None else round(float(ref[0]), 6)
        got = loss_and_grad(fn, x32, fixed, device, dtype=dtype, autocast=autocast)
        value_err, grad_err = relative_errors(got, ref)
        # fp32 arithmetic in another order: 1e-4.  A half-precision input's gradient comes back in
        # that dtype (8 or 11 mantissa bits), hence the looser gradient tolerance there.
        grad_tol = {None: 1e-3, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        passed = value_err <= 1e-4 and grad_err <= grad_tol and math.isfinite(float(got[0]))
        ok &= passed
        modes[mode] = dict(
            value=round(float(got[0]), 6),
            value_rel_err=float(f"{value_err:.2e}"),
            grad_rel_err=float(f"{grad_err:.2e}"),
            loss_dtype=got[2],
            ok=passed,
        )
    return ok, dict(cpu_fp32_value=reference, modes=modes)


def check_bank_agree(size, device):
    """MemoryBank.update (Eq. 7 + re-normalisation) on the device vs the CPU, duplicates included."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(size["rows"], generator=g)[: size["batch"]]
    idx = torch.cat([idx, idx[:4]])  # four rows updated twice: Eq. 7 applied once per occurrence
    vectors = F.normalize(torch.randn(len(idx), size["dim"], generator=g), dim=1)
    modes, ok = {}, True
    for mode, dtype in (
        ("fp32", None),
        ("bf16 vectors", torch.bfloat16),
        ("fp16 vectors", torch.float16),
    ):
        v = vectors if dtype is None else vectors.to(dtype)
        ref, dev = (
            MemoryBank(size["rows"], size["dim"], seed=2),
            MemoryBank(size["rows"], size["dim"], device=device, seed=2),
        )
        ref.update(idx, v.float(), 0.5)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            dev.update(idx.to(device), v.to(device), 0.5)
        err = float((dev.vectors.cpu() - ref.vectors).abs().max())
        passed = err <= 1e-5 and dev.vectors.dtype == torch.float32
        ok &= passed
        modes[mode] = dict(
            max_abs_err=float(f"{err:.2e}"), bank_dtype=str(dev.vectors.dtype), ok=passed
        )
    return ok, dict(modes=modes)


# -----------------------------------------------------------------------------
# Host synchronisation (CUDA only).
# -----------------------------------------------------------------------------
def first_sync(call):
    """None if call() ran without making the host wait for the GPU, else the first line of the error
    that torch.cuda.set_sync_debug_mode("error") raised.  call() runs once before, outside the debug
    mode, so that one-time set-up (cuBLAS handles, allocator growth, cuDNN autotuning) is not counted."""
    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        return None
    except RuntimeError as err:
        return str(err).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def check_no_sync_loss(fn, which, inputs, fixed, device):
    if device.type != "cuda":
        raise NotApplicable("torch.cuda.set_sync_debug_mode needs a CUDA device")
    x0 = inputs[which].to(device)
    fixed = {k: v.to(device) for k, v in fixed.items()}

    def call():
        x = x0.detach().requires_grad_(True)
        fn(x, fixed, None).backward()  # ir_nce_loss: generator None, negatives drawn on the GPU

    error = first_sync(call)
    return error is None, dict(synchronized=error is not None, error=error)


def check_no_sync_bank(size, device):
    if device.type != "cuda":
        raise NotApplicable("torch.cuda.set_sync_debug_mode needs a CUDA device")
    bank = MemoryBank(size["rows"], size["dim"], device=device)
    # Unique, as in a one-process batch, and on the CPU, where the DataLoader yields them: the
    # update reads the indices on the host (duplicate rounds), which is free for CPU indices.
    idx = torch.randperm(size["rows"])[: size["batch"]]
    z = F.normalize(torch.randn(size["batch"], size["dim"], device=device), dim=1)
    error = first_sync(lambda: bank.update(idx, z, 0.5))
    return error is None, dict(synchronized=error is not None, error=error)


def check_no_sync_step(algo, size, device):
    """The trainer's own train_step (forward under bf16 autocast, loss, backward, SGD, Eq. 7)."""
    if device.type != "cuda":
        raise NotApplicable("torch.cuda.set_sync_debug_mode needs a CUDA device")
    args = it.build_parser().parse_args(
        ["--algo", algo, "--k-background", str(size["train_k_background"])]
    )
    run = it.build_step_state(args, device, size["rows"], it.resolve_precision("auto", device))
    run.cluster_labels = torch.randint(
        0, size["clusters"], (size["clusterings"], size["rows"]), device=device
    )
    images = torch.randn(
        size["train_batch"], 3, size["image_size"], size["image_size"], device=device
    )
    images = images.contiguous(memory_format=run.mem_fmt)
    idx = torch.randperm(size["rows"])[
        : size["train_batch"]
    ]  # on the CPU, as the DataLoader yields it
    error = first_sync(lambda: it.train_step(run, images, idx))
    return error is None, dict(precision=run.precision, synchronized=error is not None, error=error)


# -----------------------------------------------------------------------------
# The trainer end to end.
# -----------------------------------------------------------------------------
def train_argv(data, out, algo, size, device, precision, epochs, batch, workers):
    argv = [
        "--data",
        data,
        "--out-dir",
        out,
        "--algo",
        algo,
        "--device",
        device.type,
        "--precision",
        precision,
        "--image-size",
        str(size["image_size"]),
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--workers",
        str(workers),
        "--knn-k",
        "10",
        "--k-background",
        str(size["train_k_background"]),
        "--log-every",
        "1000",
    ]
    if algo == "la":
        argv += [
            "--kmeans-k",
            str(size["train_kmeans_k"]),
            "--n-kmeans",
            "3",
            "--la-warmup-epochs",
            "1",
        ]
    return argv


def check_train(algo, precision, size, device, data, work, log):
    if device.type != "cuda" and precision != "fp32":
        raise NotApplicable("autocast training (bf16 / fp16) is for CUDA; the CPU trains in fp32")
    out = os.path.join(work, f"train_{algo}_{precision}")
    epochs = size["epochs"] + (1 if algo == "la" else 0)  # LA: one warm-up epoch of IR first
    with contextlib.redirect_stdout(log):
        it.main(
            train_argv(
                data,
                out,
                algo,
                size,
                device,
                precision,
                epochs,
                size["train_batch"],
                size["workers"],
            )
        )
    rows = it.read_log(os.path.join(out, "log.jsonl"))
    cfg = next(r for r in rows if r.get("kind") == "config")
    epoch_rows = [r for r in rows if r.get("kind") == "epoch"]
    own = [r["train_loss"] for r in epoch_rows if r["algo"] == algo]  # the algorithm's own epochs
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu")
    bank = ckpt["bank"]["vectors"]
    steps_per_epoch = math.ceil(4 * size["per_class"] / size["train_batch"])
    checks = dict(
        epochs_logged=len(epoch_rows) == epochs,
        steps=ckpt["step"] == epochs * steps_per_epoch,
        losses_finite=all(math.isfinite(r["train_loss"]) for r in epoch_rows),
        loss_fell=own[-1] < own[0] if len(own) >= 2 else None,
        model_finite=all(
            bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point()
        ),
        bank_unit_norm=bool(torch.allclose(bank.norm(dim=1), torch.ones(len(bank)), atol=1e-3)),
        precision=cfg["precision"] == precision,
        memory_format=cfg["memory_format"]
        == ("channels_last" if device.type == "cuda" else "contiguous"),
    )
    ok = all(v is not False for v in checks.values())
    return ok, dict(
        checks=checks,
        steps=ckpt["step"],
        train_loss=[round(r["train_loss"], 4) for r in epoch_rows],
        knn_top1=[round(r["knn_top1"], 4) for r in epoch_rows],
        images_per_s=round(sum(r["images_per_s"] for r in epoch_rows) / len(epoch_rows), 1),
    )


def subprocess_env(device):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    )
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def check_resume(size, device, work, log):
    """A real process, SIGTERM in epoch 2 of 2; --resume in this process; an uninterrupted run."""
    data = it.make_toy_imagefolder(
        os.path.join(work, "resume_data"),
        4,
        size["resume_per_class"],
        2,
        size=size["image_size"],
        seed=1,
    )
    precision = "bf16" if device.type == "cuda" else "fp32"
    steps = math.ceil(4 * size["resume_per_class"] / size["resume_batch"])

    def argv(out):  # --workers 0: the augmentation RNG is in the checkpoint (README: exact resume)
        return train_argv(
            data, os.path.join(work, out), "ir", size, device, precision, 2, size["resume_batch"], 0
        ) + ["--log-every", "1"]

    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "imagenet_train.py")] + argv("resumed"),
        cwd=REPO,
        env=subprocess_env(device),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(
            f"epoch 2 step 1/{steps} "
        ):  # the signal lands with the rest of epoch 2 to go
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    log.write(text)
    saved = torch.load(os.path.join(work, "resumed", "ckpt.pt"), map_location="cpu")
    stopped_at = (saved["epoch"], saved["batch_in_epoch"])
    with contextlib.redirect_stdout(log):
        it.main(argv("resumed") + ["--resume"])
        it.main(argv("straight"))
        if (
            device.type == "cuda"
        ):  # a second uninterrupted run: how far non-deterministic kernels alone move
            it.main(argv("straight_again"))
    load = {
        name: torch.load(os.path.join(work, name, "ckpt.pt"), map_location="cpu")
        for name in ("resumed", "straight", "straight_again")
        if os.path.exists(os.path.join(work, name, "ckpt.pt"))
    }

    def differences(a, b):
        bank = float((a["bank"]["vectors"] - b["bank"]["vectors"]).abs().max())
        model = max(
            float((a["model"][k].float() - b["model"][k].float()).abs().max())
            for k in b["model"]
            if b["model"][k].is_floating_point()
        )
        return bank, model

    bank_diff, model_diff = differences(load["resumed"], load["straight"])
    noise = (
        differences(load["straight_again"], load["straight"])[0]
        if "straight_again" in load
        else 0.0
    )
    identical = bank_diff == 0 and model_diff == 0
    # A resume that replays other views, or skips or repeats a batch, moves the bank rows it touches by
    # ~0.1-1.  On the GPU, non-deterministic kernels (cuDNN weight gradients, atomics) move two
    # uninterrupted runs apart too; the resumed run may differ by as much, within a margin.
    limit = 0.0 if device.type == "cpu" else max(0.05, 4 * noise)
    ok = (
        proc.returncode == 0
        and "stopped by SIGTERM" in text
        and stopped_at[0] == 1
        and 0 < stopped_at[1] < steps
        and load["resumed"]["step"] == load["straight"]["step"] == 2 * steps
        and bank_diff <= limit
        and (identical or device.type == "cuda")
    )
    return ok, dict(
        stopped_at_epoch_batch=list(stopped_at),
        steps=load["resumed"]["step"],
        bit_identical=identical,
        bank_max_abs_diff=float(f"{bank_diff:.3g}"),
        model_max_abs_diff=float(f"{model_diff:.3g}"),
        two_uninterrupted_runs_bank_diff=float(f"{noise:.3g}") if device.type == "cuda" else None,
        rule="bit-identical" if device.type == "cpu" else f"bank within {limit:.3g}",
        output_tail=None if ok else text[-1500:],
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_torchrun(size, device, data, work):
    out = os.path.join(work, "torchrun")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master-port",
        str(free_port()),
        os.path.join(REPO, "imagenet_train.py"),
    ] + train_argv(
        data,
        out,
        "la",
        size,
        device,
        "auto" if device.type == "cuda" else "fp32",
        2,
        size["train_batch"],
        size["workers"],
    )
    res = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(device), capture_output=True, text=True, timeout=300
    )
    rows = (
        it.read_log(os.path.join(out, "log.jsonl"))
        if os.path.exists(os.path.join(out, "log.jsonl"))
        else []
    )
    cfg = next((r for r in rows if r.get("kind") == "config"), {})
    algos = [r["algo"] for r in rows if r.get("kind") == "epoch"]
    backend = "nccl" if device.type == "cuda" else "gloo"
    ok = (
        res.returncode == 0
        and cfg.get("backend") == backend
        and cfg.get("world_size") == 1
        and algos == ["ir", "la"]
    )
    return ok, dict(
        returncode=res.returncode,
        backend=cfg.get("backend"),
        epochs=algos,
        output_tail=None if ok else (res.stdout + res.stderr)[-1500:],
    )


def check_benchmark(size, device, log):
    with contextlib.redirect_stdout(log):
        rows = it.main(["--benchmark", "--device", device.type] + size["bench"])
    ok = [r["algo"] for r in rows] == ["ir", "la"] and all(
        r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows
    )
    return ok, dict(rows=rows)


def check_environment(device):
    import faiss
    import torchvision
    from local_agg import faiss_has_gpu

    info = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cuda=torch.version.cuda,
        faiss=faiss.__version__,
        faiss_gpu=faiss_has_gpu(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
    return True, info


# -----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(
        description="One-shot check of a GPU machine for imagenet_train.py "
        "(JSON line per check; exit 1 if a check that ran failed)."
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the same sequence at tiny sizes",
    )
    p.add_argument("--out", default=None, help="folder for cuda_check.jsonl and trainer_output.log")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="run only the checks whose names start with one of these (environment always runs)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "cuda_check.py: error: --device cuda: CUDA is not available here (use --device cpu)",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest and immune to busy cores
    size = SIZES[device.type]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = open(os.path.join(args.out, "cuda_check.jsonl"), "w") if args.out else None
    log = open(os.path.join(args.out, "trainer_output.log"), "w") if args.out else io.StringIO()
    failed, ran, start = [], 0, time.time()

    def report(name, check, *check_args):
        nonlocal ran
        if args.only and name != "environment" and not any(name.startswith(o) for o in args.only):
            return
        t0 = time.time()
        try:
            ok, detail = check(*check_args)
            status = "pass" if ok else "fail"
        except NotApplicable as why:
            status, detail = "n/a", dict(reason=str(why))
        except Exception as err:  # a check that crashes is a failing check; the rest still run
            status, detail = (
                "fail",
                dict(error=f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"),
            )
            traceback.print_exc()
        if status != "n/a":
            ran += 1
        if status == "fail":
            failed.append(name)
        line = json.dumps(
            dict(check=name, status=status, seconds=round(time.time() - t0, 2), **detail)
        )
        print(line, flush=True)
        if results:
            results.write(line + "\n")
            results.flush()
        if not isinstance(log, io.StringIO):
            log.flush()
        gc.collect()

    report("environment", check_environment, device)
    inputs, fixed = make_inputs(size)
    cases = loss_cases(size)
    for name, (fn, which) in cases.items():
        report(f"agree {name}", check_agree, fn, which, inputs, fixed, device)
    report("agree MemoryBank.update", check_bank_agree, size, device)
    for name, (fn, which) in cases.items():
        report(f"no_sync {name}", check_no_sync_loss, fn, which, inputs, fixed, device)
    report("no_sync MemoryBank.update", check_no_sync_bank, size, device)
    for algo in ("ir", "ball", "ann", "la"):
        report(f"no_sync train_step {algo}", check_no_sync_step, algo, size, device)
    with tempfile.TemporaryDirectory() as work:
        data = it.make_toy_imagefolder(
            os.path.join(work, "data"),
            4,
            size["per_class"],
            size["val_per_class"],
            size=size["image_size"],
            seed=0,
        )
        for precision in ("fp32", "bf16", "fp16"):
            if device.type == "cuda" and precision == "fp32":
                continue  # the GPU trains under autocast; fp32 training is the CPU's
            for algo in ("ir", "ball", "ann", "la"):
                report(
                    f"train {algo} {precision}",
                    check_train,
                    algo,
                    precision,
                    size,
                    device,
                    data,
                    work,
                    log,
                )
        report("resume", check_resume, size, device, work, log)
        report("torchrun", check_torchrun, size, device, data, work)
        report("benchmark", check_benchmark, size, device, log)
    summary = dict(
        check="summary",
        status="fail" if failed else "pass",
        ran=ran,
        failed=failed,
        seconds=round(time.time() - start, 1),
        device=str(device),
    )
    print(json.dumps(summary), flush=True)
    if results:
        results.write(json.dumps(summary) + "\n")
        results.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
