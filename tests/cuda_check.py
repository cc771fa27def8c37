"""Check a GPU machine, and this code on it, in one run before a long ImageNet training.

    python tests/cuda_check.py                 # a CUDA machine: about 4 minutes on one H200
    python tests/cuda_check.py --device cpu    # the same sequence at tiny sizes (CI runs it)
    python tests/cuda_check.py --only train    # rerun the checks whose names start with "train"

It prints one JSON line per check on stdout, {"check": NAME, "status": "pass" | "fail" | "n/a",
...}, and a last "summary" line; the exit status is 1 if a check that ran failed, else 0.  "n/a"
marks a check that cannot run here (the host-synchronisation checks on the CPU, the 2-GPU check on
one GPU): neither passed nor failed.  What the trainer prints goes to --out DIR/trainer_output.log
(or is dropped), so stdout holds only the JSON lines.  Training, resume, torchrun, ddp and the
benchmark each run in fresh processes, so a CUDA error in one cannot poison the checks after it.

  environment        versions, the GPU, and which faiss build k-means will use (GPU or CPU)
  agree LOSS         ir_loss, ir_nce_loss, ball_loss, ann_loss, la_loss, infonce_loss and
                     MemoryBank.update on the device -- fp32, and under bf16 and fp16 autocast with
                     fp32 inputs and with half inputs -- against the CPU's fp32 value and gradient
  no_sync LOSS       each loss's forward + backward, MemoryBank.update, and the trainer's whole step
                     (to_device_input + train_step) inside torch.cuda.set_sync_debug_mode("error")
  train ALGO PREC    each algorithm through imagenet_train.py on generated images: bf16, and fp16
                     with its GradScaler (CUDA), fp32 (CPU): finite losses that fall, finite
                     weights, a unit-norm bank, the checkpoint and the log rows
  resume             SIGTERM in epoch 2, then --resume, against an uninterrupted run, both with
                     --deterministic (CUBLAS_WORKSPACE_CONFIG=:4096:8 on CUDA): identical weights
                     and bank
  resume fp16        a bf16 run resumed with --precision fp16 (its empty GradScaler state): one more
                     epoch, with a GradScaler that ran (CUDA)
  torchrun           torchrun --nproc_per_node 1: LA's warm-up epoch, then an LA epoch
  ddp                torchrun --nproc_per_node 2, the trainer's process group (NCCL for CUDA tensors
                     on >= 2 GPUs; gloo on the CPU): after steps on different data the ranks hold
                     identical banks and weights, exactly every rank's rows were written (sampler
                     padding skipped), and (CUDA) the step made no host synchronisation
  benchmark          tests/bench_trainer.py --part step: IR and LA images/s at 224 px, batch 256,
                     bf16, a 1,281,167-row bank, peak GPU memory, one k-means; fails below IR_FLOOR
                     images/s on an H100 or H200

On a GPU machine that cannot reach a package index (Python 3.12 and torch, but no faiss): fetch the
faiss-cpu wheel beforehand (one abi3 wheel for any Python >= 3.10) into the git-ignored folder
.whl/, carry that folder, and install it offline first:

    pip download --no-deps --only-binary=:all: --python-version 3.12 faiss-cpu -d .whl   # here
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 tests/cuda_check.py --out $OUT

The 4 minutes are an estimate from the sizes: this script has not yet run on a GPU.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
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
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import imagenet_train as it  # noqa: E402
from infonce import infonce_loss  # noqa: E402
from instance_disc import ann_loss, ball_loss, ir_loss, ir_nce_loss  # noqa: E402
from local_agg import la_loss  # noqa: E402
from memory_bank import MemoryBank  # noqa: E402

# The floor for IR at 224 px, batch 256, bf16, a 1,281,167-row bank, on an H200; an H100 (the
# same chip, slower memory) is held to it too.  Other GPUs: reported, not judged.
IR_FLOOR = 4000
FLOOR_GPUS = ("H100", "H200")
# Sizes per device.  cuda: the losses at a 100k-row bank and App. D's batch and |B_i|; 4 epochs of
# 64 px training (4 checkpoints); the benchmark at ImageNet's size.  cpu: the same, tiny.
# fmt: off
SIZES = {
    "cuda": dict(rows=100_000, batch=256, dim=128, k_background=4096, clusterings=10, clusters=1000,
                 negatives=4096, image_size=64, per_class=512, val_per_class=32, train_batch=32,
                 epochs=4, workers=4, train_k_background=256, train_kmeans_k=32,
                 resume_per_class=128, resume_batch=16, resume_workers=2, ddp_steps=6,
                 train_algos=("ir", "ball", "ann", "la"),
                 bench=["--batch-size", "256", "--step-image-size", "224", "--bank", "1281167",
                        "--steps", "100", "--warmup", "10", "--kmeans-k", "1000"]),
    "cpu": dict(rows=2000, batch=32, dim=32, k_background=256, clusterings=3, clusters=20,
                negatives=256, image_size=32, per_class=8, val_per_class=2, train_batch=8, epochs=1,
                workers=0, train_k_background=16, train_kmeans_k=4, resume_per_class=12,
                resume_batch=4, resume_workers=0, ddp_steps=3, train_algos=("ir", "la"),
                bench=["--batch-size", "4", "--step-image-size", "32", "--bank", "300",
                       "--steps", "2", "--warmup", "1", "--kmeans-k", "5", "--k-background", "16"]),
}
# fmt: on
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
    """MemoryBank.update (Eq. 7 + re-normalisation) on the device vs the CPU, with duplicates."""
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
    mode, so that one-time set-up (cuBLAS handles, allocator growth, cuDNN tuning) is not
    counted."""
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
    """The trainer's whole step: a pinned uint8 batch through to_device_input, then train_step
    (forward under autocast, loss, backward, SGD, Eq. 7)."""
    if device.type != "cuda":
        raise NotApplicable("torch.cuda.set_sync_debug_mode needs a CUDA device")
    argv = ["--algo", algo, "--k-background", str(size["train_k_background"])]
    run = it.build_step_state(
        it.build_parser().parse_args(argv),
        device,
        size["rows"],
        it.resolve_precision("bf16", device),
    )
    run.cluster_labels = torch.randint(
        0, size["clusters"], (size["clusterings"], size["rows"]), device=device
    )
    shape = (size["train_batch"], 3, size["image_size"], size["image_size"])
    images = torch.randint(0, 256, shape, dtype=torch.uint8).pin_memory()  # as the loader pins it
    idx = torch.randperm(size["rows"])[: size["train_batch"]]  # on the CPU, as the loader yields it

    def step():
        it.train_step(run, it.to_device_input(images, device, run.mem_fmt), idx)

    error = first_sync(step)
    return error is None, dict(precision=run.precision, synchronized=error is not None, error=error)


# -----------------------------------------------------------------------------
# The trainer end to end, each run in its own process.
# -----------------------------------------------------------------------------
def subprocess_env(device, deterministic=False):
    paths = (REPO, os.environ.get("PYTHONPATH"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # tiny runs; on CUDA, k-means on faiss-cpu gets every core
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's condition for deterministic results
    return env


def run_process(cmd, device, log, timeout=600, deterministic=False):
    """Run cmd to its end; its output goes to the log.  Returns (exit status, output)."""
    res = subprocess.run(
        cmd,
        cwd=REPO,
        env=subprocess_env(device, deterministic),
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.write(f"$ {' '.join(cmd)}\n{res.stdout}\n")
    return res.returncode, res.stdout


def trainer(argv):
    return [sys.executable, os.path.join(REPO, "imagenet_train.py")] + argv


def train_argv(data, out, algo, size, device, precision, epochs, batch, workers):
    # fmt: off
    argv = ["--data", data, "--out-dir", out, "--algo", algo, "--device", device.type,
            "--precision", precision, "--image-size", str(size["image_size"]),
            "--batch-size", str(batch), "--epochs", str(epochs), "--workers", str(workers),
            "--knn-k", "10", "--k-background", str(size["train_k_background"]),
            "--log-every", "1000"]
    if algo == "la":  # one IR warm-up epoch, then k-means every epoch
        argv += ["--kmeans-k", str(size["train_kmeans_k"]), "--n-kmeans", "3",
                 "--la-warmup-epochs", "1"]
    # fmt: on
    return argv


def check_train(algo, precision, size, device, data, work, log):
    if device.type != "cuda" and precision != "fp32":
        raise NotApplicable("autocast training (bf16 / fp16) is for CUDA; the CPU trains in fp32")
    if algo not in size["train_algos"]:  # the CPU mode's time limit; they run on CUDA
        raise NotApplicable(
            "the CPU mode trains IR and LA only (tests/test_imagenet_train.py runs all)"
        )
    out = os.path.join(work, f"train_{algo}_{precision}")
    epochs = size["epochs"] + (1 if algo == "la" else 0)  # LA: one warm-up epoch of IR first
    argv = train_argv(
        data, out, algo, size, device, precision, epochs, size["train_batch"], size["workers"]
    )
    status, output = run_process(trainer(argv), device, log)
    if status != 0:
        return False, dict(returncode=status, output_tail=output[-1500:])
    rows = it.read_log(os.path.join(out, "log.jsonl"))
    cfg = next(r for r in rows if r.get("kind") == "config")
    epoch_rows = [r for r in rows if r.get("kind") == "epoch"]
    own = [r["train_loss"] for r in epoch_rows if r["algo"] == algo]  # the algorithm's own epochs
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu")
    bank = ckpt["bank"]["vectors"]
    steps_per_epoch = math.ceil(4 * size["per_class"] / size["train_batch"])
    floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
    checks = dict(
        epochs_logged=len(epoch_rows) == epochs,
        steps=ckpt["step"] == epochs * steps_per_epoch,
        losses_finite=all(math.isfinite(r["train_loss"]) for r in epoch_rows),
        loss_fell=own[-1] < own[0] if len(own) >= 2 else None,
        model_finite=all(bool(torch.isfinite(v).all()) for v in floats),
        bank_unit_norm=bool(torch.allclose(bank.norm(dim=1), torch.ones(len(bank)), atol=1e-3)),
        precision=cfg["precision"] == precision,
        # fp16: the GradScaler ran (its state holds a scale); otherwise it was disabled (empty)
        grad_scaler=bool(ckpt["scaler"]) == (precision == "fp16"),
    )
    ok = all(v is not False for v in checks.values())
    return ok, dict(
        checks=checks,
        steps=ckpt["step"],
        train_loss=[round(r["train_loss"], 4) for r in epoch_rows],
        knn_top1=[round(r["knn_top1"], 4) for r in epoch_rows],
        images_per_s=round(sum(r["images_per_s"] for r in epoch_rows) / len(epoch_rows), 1),
        grad_scale=ckpt["scaler"].get("scale") if ckpt["scaler"] else None,
    )


def check_resume(size, device, work, log):
    """SIGTERM in epoch 2 of 2, then --resume, against an uninterrupted run: three processes, all
    with --deterministic (on CUDA and CUBLAS_WORKSPACE_CONFIG), so the weights must be identical."""
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

    def argv(out):
        return train_argv(
            data,
            os.path.join(work, out),
            "ir",
            size,
            device,
            precision,
            2,
            size["resume_batch"],
            size["resume_workers"],
        ) + ["--log-every", "1", "--deterministic"]

    proc = subprocess.Popen(
        trainer(argv("resumed")),
        cwd=REPO,
        env=subprocess_env(device, True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"epoch 2 step 1/{steps} "):  # the signal lands with epoch 2 to go
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    log.write(text)
    saved = torch.load(os.path.join(work, "resumed", "ckpt.pt"), map_location="cpu")
    stopped_at = (saved["epoch"], saved["batch_in_epoch"])
    resumed_status, resumed_out = run_process(
        trainer(argv("resumed") + ["--resume"]), device, log, deterministic=True
    )
    straight_status, straight_out = run_process(
        trainer(argv("straight")), device, log, deterministic=True
    )
    if resumed_status or straight_status:
        return False, dict(
            resumed_returncode=resumed_status,
            straight_returncode=straight_status,
            output_tail=(resumed_out + straight_out)[-1500:],
        )
    a, b = (
        torch.load(os.path.join(work, n, "ckpt.pt"), map_location="cpu")
        for n in ("resumed", "straight")
    )
    bank_diff = float((a["bank"]["vectors"] - b["bank"]["vectors"]).abs().max())
    model_diff = max(
        float((a["model"][k].float() - b["model"][k].float()).abs().max())
        for k in b["model"]
        if b["model"][k].is_floating_point()
    )
    identical = bank_diff == 0 and model_diff == 0
    ok = (
        proc.returncode == 0
        and "stopped by SIGTERM" in text
        and stopped_at[0] == 1
        and 0 < stopped_at[1] < steps
        and a["step"] == b["step"] == 2 * steps
        and identical
    )
    return ok, dict(
        stopped_at_epoch_batch=list(stopped_at),
        steps=a["step"],
        identical=identical,
        bank_max_abs_diff=float(f"{bank_diff:.3g}"),
        model_max_abs_diff=float(f"{model_diff:.3g}"),
        output_tail=None if ok else text[-1500:],
    )


def check_resume_fp16(size, device, data, work, log):
    """A bf16 run (its GradScaler disabled, saved empty) resumed with --precision
    fp16, as `auto` would on a GPU without bf16: one more epoch, with a working GradScaler."""
    if device.type != "cuda":
        raise NotApplicable("fp16 is for CUDA")
    src, out = os.path.join(work, "train_ir_bf16"), os.path.join(work, "resume_fp16")
    if not os.path.exists(os.path.join(src, "ckpt.pt")):
        return False, dict(error="needs the checkpoint of 'train ir bf16', which did not finish")
    shutil.copytree(src, out)
    epochs = size["epochs"] + 1
    argv = train_argv(data, out, "ir", size, device, "fp16", epochs, size["train_batch"],
                      size["workers"]) + ["--resume"]  # fmt: skip
    status, output = run_process(trainer(argv), device, log)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu") if status == 0 else {}
    ok = (status == 0 and ckpt["epoch"] == epochs and bool(ckpt["scaler"])
          and all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values()
                  if v.is_floating_point()))  # fmt: skip
    return ok, dict(returncode=status, epoch=ckpt.get("epoch"),
                    grad_scale=ckpt["scaler"].get("scale") if ckpt.get("scaler") else None,
                    output_tail=None if ok else output[-1500:])  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script_argv):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master-port",
        str(free_port()),
    ] + script_argv


def check_torchrun(size, device, data, work, log):
    out = os.path.join(work, "torchrun")
    precision = "auto" if device.type == "cuda" else "fp32"
    argv = train_argv(
        data, out, "la", size, device, precision, 2, size["train_batch"], size["workers"]
    )
    status, output = run_process(
        torchrun(1, [os.path.join(REPO, "imagenet_train.py")] + argv), device, log
    )
    log_path = os.path.join(out, "log.jsonl")
    rows = it.read_log(log_path) if os.path.exists(log_path) else []
    cfg = next((r for r in rows if r.get("kind") == "config"), {})
    algos = [r["algo"] for r in rows if r.get("kind") == "epoch"]
    ok = status == 0 and cfg.get("world_size") == 1 and algos == ["ir", "la"]
    return ok, dict(
        returncode=status,
        world_size=cfg.get("world_size"),
        epochs=algos,
        output_tail=None if ok else output[-1500:],
    )


def ddp_worker(out_path, device_flag):
    """One rank of the ddp check (started by torchrun through --ddp-worker).  IR then LA, each a few
    steps of the trainer's own train_step on this rank's own images and rows; in the last step the
    last rank marks two rows as DistributedSampler padding (-1), which no rank may write.  On CUDA
    the steps after the first two run under set_sync_debug_mode("error").  Rank 0 writes the
    result."""
    ddp, rank, _, world, device = it.setup_distributed(device_flag, timeout_min=3.0)
    size, cuda = SIZES[device.type], device.type == "cuda"
    result = {}
    for algo in ("ir", "la"):
        argv = [
            "--algo",
            algo,
            "--k-background",
            str(size["train_k_background"]),
            "--precision",
            "bf16" if cuda else "fp32",
        ]
        args = it.build_parser().parse_args(argv)
        run = it.build_step_state(
            args, device, size["rows"], it.resolve_precision(args.precision, device)
        )
        run.ddp, run.rank, run.world = True, rank, world
        run.model = DDP(
            run.raw_model, device_ids=[device.index] if cuda else None, broadcast_buffers=False
        )  # as the trainer wraps it
        shared = torch.Generator().manual_seed(7)  # the same on every rank
        run.cluster_labels = torch.randint(
            0, size["clusters"], (size["clusterings"], size["rows"]), generator=shared
        ).to(device)
        b, steps = size["train_batch"], size["ddp_steps"]
        order = torch.randperm(size["rows"], generator=shared)[: steps * world * b].view(
            steps, world, b
        )
        padding = order[-1, -1, -2:]  # rows the last rank's last batch marks -1
        own = torch.Generator().manual_seed(100 + rank)  # this rank's images
        shape = (b, 3, size["image_size"], size["image_size"])
        sync_error = None
        for k in range(steps):
            images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=own)
            images = images.pin_memory() if cuda else images
            watch = cuda and k >= 2  # the first steps build DDP's buckets and tune cuDNN
            if watch:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                idx = order[k, rank]
                bank_idx = idx.clone()
                if k == steps - 1 and rank == world - 1:
                    bank_idx[-2:] = -1
                x = it.to_device_input(images, device, run.mem_fmt)
                it.train_step(run, x, idx, bank_idx)
            except RuntimeError as err:
                if not watch:
                    raise
                sync_error = str(err).strip().splitlines()[0]
                break  # both ranks stop at the same call: the code path is the same
            finally:
                if watch:
                    torch.cuda.set_sync_debug_mode(0)
        params = torch.cat([p.detach().float().flatten() for p in run.raw_model.parameters()])
        row = {}
        for name, mine in (("bank", run.bank.vectors), ("weights", params)):
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            row[f"{name}_max_abs_diff_across_ranks"] = max(
                float((t - every[0]).abs().max()) for t in every
            )
        start = MemoryBank(size["rows"], args.dim, seed=args.seed).vectors
        moved = (run.bank.vectors.cpu() - start).abs().amax(dim=1) > 0
        # Eq. 7 wrote exactly the rows of every rank's batches, padding left out, on every rank
        written = torch.zeros_like(moved)
        written[order.flatten()] = True
        written[padding] = False
        row["rows_written_are_all_ranks_rows"] = bool((moved == written).all())
        row["sync_error"] = sync_error
        result[algo] = row
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(world=world, backend=dist.get_backend(), **result), f)
    dist.destroy_process_group()


def check_ddp(size, device, work, log):
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise NotApplicable(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    out = os.path.join(work, "ddp.json")
    status, output = run_process(
        torchrun(2, [os.path.abspath(__file__), "--device", device.type, "--ddp-worker", out]),
        device,
        log,
        timeout=300,  # the ranks' collective timeout is 3 minutes
    )
    if status != 0 or not os.path.exists(out):
        return False, dict(returncode=status, output_tail=output[-1500:])
    with open(out) as f:
        got = json.load(f)
    return judge_ddp(got), got


def judge_ddp(got):
    """Identical banks and weights on both ranks, every rank's rows written, no host sync."""
    return got["world"] == 2 and all(
        r["bank_max_abs_diff_across_ranks"] == 0
        and r["weights_max_abs_diff_across_ranks"] == 0
        and r["rows_written_are_all_ranks_rows"]
        and r["sync_error"] is None
        for r in (got["ir"], got["la"])
    )


def check_benchmark(size, device, log):
    precision = "bf16" if device.type == "cuda" else "fp32"
    # fmt: off
    cmd = [sys.executable, os.path.join(REPO, "tests", "bench_trainer.py"), "--part", "step",
           "--json", "--device", device.type, "--algos", "ir", "la", "--precision", precision]
    # fmt: on
    status, output = run_process(cmd + size["bench"], device, log)
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    if status != 0 or [r["algo"] for r in rows] != ["ir", "la"]:
        return False, dict(returncode=status, output_tail=output[-1500:])
    return judge_benchmark(rows)


def judge_benchmark(rows):
    """(ok, detail): finite losses and rates; IR at or above IR_FLOOR images/s where the floor
    applies (an H100 or H200, 224 px, batch 256, bf16, ImageNet's bank)."""
    ir = rows[0]
    judged = any(g in (ir["gpu"] or "") for g in FLOOR_GPUS) and (
        ir["image_size"],
        ir["batch_size"],
        ir["precision"],
        ir["bank_rows"],
    ) == (224, 256, "bf16", it.IMAGENET_TRAIN_SIZE)
    finite = all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    floor_ok = ir["images_per_s"] >= IR_FLOOR if judged else None
    return finite and floor_ok is not False, dict(
        ir_floor=IR_FLOOR if judged else "n/a: judged on an H100 / H200 at App. D's sizes only",
        ir_floor_met=floor_ok,
        ir_peak_gpu_mem_gib=ir["peak_gpu_mem_gib"],
        rows=rows,
    )


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
            gpus=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return True, info


# -----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(
        description="One-shot check of a GPU machine for imagenet_train.py "
        "(a JSON line per check; exit 1 if a check that ran failed)."
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
    p.add_argument("--ddp-worker", metavar="JSON", help=argparse.SUPPRESS)  # the ddp check's ranks
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
    if args.ddp_worker:
        return ddp_worker(args.ddp_worker, args.device)
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
            status = "fail"
            detail = dict(error=f"{type(err).__name__}: {str(err).strip().splitlines()[0]}")
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
    for algo in it.LOSSES:
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
            for algo in it.LOSSES:
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
        report("resume fp16", check_resume_fp16, size, device, data, work, log)
        report("torchrun", check_torchrun, size, device, data, work, log)
        report("ddp", check_ddp, size, device, work, log)
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
