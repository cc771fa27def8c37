"""Train IR, BALL, ANN or LA on an ImageFolder (ImageNet) and measure it the way Figure 2 does.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning", Section 5.3 ("ImageNet Experiments"), Figure 2 and Appendix D.

Figure 2 compares (a) IR vs BALL vs ANN vs LA, all continued from 10 epochs of IR, (b) IR with its
view set cut down to one augmentation or none, and (c) IR with different memory-bank update rates
alpha (Eq. 7).  Every setting of those three panels is a flag of this script; Appendix D's values
are the defaults.

    # Figure 2a: 10 epochs of IR, the shared start; then IR continued, and BALL, ANN, LA from it
    python imagenet_train.py --data /imagenet --algo ir --epochs 10 --out-dir runs/ir_init
    cp -r runs/ir_init runs/ir && python imagenet_train.py --data /imagenet --resume --out-dir runs/ir
    python imagenet_train.py --data /imagenet --algo la --init-from runs/ir_init/ckpt.pt --out-dir runs/la
    #   (the same with --algo ball and --algo ann; 8 GPUs: torchrun --nproc_per_node 8 imagenet_train.py ...)
    # Figure 2b: one augmentation kept (here the crop), or none
    python imagenet_train.py --data /imagenet --no-gray --no-jitter --no-flip --out-dir runs/ir_crop
    python imagenet_train.py --data /imagenet --no-aug --out-dir runs/ir_none
    # Figure 2c: bank update rate alpha ("m" in the figure); runs/ir is alpha = 0.5
    python imagenet_train.py --data /imagenet --alpha 0.9 --out-dir runs/ir_m0.9
    # the three panels from the epoch logs, with the values read off the paper's figure as markers
    python imagenet_train.py --plot runs/*/log.jsonl --plot-paper --plot-out fig2.png
    # stop/continue: SIGTERM or Ctrl-C saves runs/x/ckpt.pt; then
    python imagenet_train.py --data /imagenet --out-dir runs/x --resume
    # CPU smoke run on a tiny folder (OMP_NUM_THREADS=1 is fastest for 32x32 images, and on busy
    # cores more threads can be 10x slower), and the no-argument demo on generated images
    OMP_NUM_THREADS=1 python imagenet_train.py --data tiny --device cpu --image-size 32 \
        --batch-size 32 --knn-k 10 --workers 0 --k-background 64 --kmeans-k 8 --n-kmeans 2
    python imagenet_train.py
    # GPU benchmark: synthetic 224x224 batches, 200 steps of IR and of LA, a 1,281,167-row bank,
    # one k-means of 30,000 clusters; prints images/s, peak GPU memory, k-means seconds
    python imagenet_train.py --benchmark --device cuda
    # before a long run, check the machine (every loss on the GPU, AMP, resume, torchrun, speed)
    python tests/cuda_check.py

Two accuracies, never to be confused (both are logged under their own names):
  knn_top1     weighted k-nearest-neighbour top-1 on val/ against the memory bank (Wu et al. 2018:
               k=200 neighbours, each votes exp(cos/tau) for its class).  Cheap; every epoch; drives
               the learning-rate schedule.
  linear_top1  / linear_top5: a linear classifier trained on frozen features (--eval-linear), the
               "transfer task of ImageNet classification" that Figure 2 plots.
Class labels (from the folder names) are used only by these two evaluations, never by training.

How the code is laid out: arguments and their checks; data; model; distributed helpers; the loss of
one step; evaluation; checkpoints, logs and --plot; --benchmark; the demo; then training in four
named stages -- set_up, resume, train_one_epoch (whose inner loop is train_step), end_of_epoch --
and main(), which strings them together.  A mistake in the flags or the data is a UserError: one
line `imagenet_train.py: error: ...` and exit status 2 on the command line, no traceback.
"""

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from instance_disc import ann_loss, ball_loss, ir_loss
from local_agg import faiss_has_gpu, la_loss, run_kmeans, warn_if_kmeans_on_cpu
from memory_bank import MemoryBank

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_TRAIN_SIZE = 1_281_167  # rows of the bank for the full ImageNet-1k train split
# Appendix D's values of the flags whose value can exceed a small train set of N images.  Left unset,
# each takes min(its App. D value, the largest value that fits the data), and the run says so.
APP_D_DATA_SIZED = {"batch_size": 256, "k_background": 4096, "kmeans_k": 30000, "knn_k": 200}


class UserError(ValueError):
    """A mistake in the flags or the data.  The command line prints it as ONE line,
    `imagenet_train.py: error: ...`, and exits with status 2 (argparse's convention); called as a
    function (main(argv), the tests) it is an ordinary ValueError.  Everything else that goes wrong
    is a bug or a diverged run and keeps its traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the whole usage block (30 lines) before its one-line message.
        raise UserError(f"{message} (see --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those flags explain their default
        return action.help if action.default is None else super()._get_help_string(action)


# -----------------------------------------------------------------------------
# Arguments: Appendix D's values are the defaults.
# -----------------------------------------------------------------------------
def build_parser():
    p = _ArgumentParser(
        description="IR / BALL / ANN / LA on an ImageFolder (Section 5.3, Figure 2, Appendix D). "
        "Run with no arguments for a 1-minute CPU demo on generated images.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a(
        "--data",
        default=None,
        help="ImageFolder root holding train/CLASS/*.jpg and val/CLASS/*.jpg; "
        "class folders give the labels used only by kNN / linear evaluation",
    )
    a("--out-dir", default="runs/default", help="where ckpt.pt and log.jsonl go (rank 0 writes)")
    # --- objective (Section 5.3) ---
    a(
        "--algo",
        choices=["ir", "ball", "ann", "la"],
        default="ir",
        help="ir: Eq. 6 over the whole bank; ball: Def. 5.2 (negatives = background set B_i); "
        "ann: Def. 5.3 (B_i minus close set C_i); la: Eq. 8 (C_i from k-means)",
    )
    a("--tau", type=float, default=0.07, help="temperature tau of Eq. 6 (App. D: 0.07)")
    a(
        "--alpha",
        type=float,
        default=0.5,
        help="memory bank update rate alpha of Eq. 7, in [0, 1) "
        "(App. D calls it t, Fig. 2c calls it m; 0 = the bank keeps only last epoch's view)",
    )
    a(
        "--dim",
        type=int,
        default=128,
        help="representation dimension d: ResNet-18 'classes' (App. D)",
    )
    a(
        "--k-background",
        type=int,
        default=None,
        help="|B_i|: nearest bank entries forming the background "
        "set of BALL / ANN / LA (default: App. D's 4096, or N if the train set has fewer images)",
    )
    a(
        "--k-close",
        type=int,
        default=None,
        help="ANN only: size of the close set C_i removed from B_i "
        "(default: instance_disc.ann_loss's, k_background // 10)",
    )
    a(
        "--neighbours-of",
        choices=["z", "bank"],
        default="z",
        help="BALL/ANN/LA: B_i = nearest bank rows to "
        "the current embedding z (LA code) or to M[i] (the paper's wording in Sec. 5.3; one more matmul)",
    )
    a(
        "--kmeans-k",
        type=int,
        default=None,
        help="LA: clusters per k-means (default: App. D's 30000, or N if "
        "the train set has fewer images)",
    )
    a(
        "--n-kmeans",
        type=int,
        default=10,
        help="LA: k-means runs with different seeds; C_i = union of i's clusters (App. D: 10)",
    )
    a(
        "--init-from",
        default=None,
        help="BALL / ANN / LA: start model and bank from this IR checkpoint "
        "(Fig. 2a: all three continue 10 epochs of IR; App. D: LA starts from 10 epochs of IR); "
        "excludes --la-warmup-epochs",
    )
    a(
        "--la-warmup-epochs",
        type=int,
        default=None,
        help="LA without --init-from: epochs of IR before switching to LA (default: 10, App. D)",
    )
    # --- optimisation (Appendix D) ---
    a("--lr", type=float, default=0.03, help="SGD learning rate (App. D: 0.03)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (App. D: 0.9)")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay (App. D: 1e-4)")
    a(
        "--batch-size",
        type=int,
        default=None,
        help="GLOBAL batch size, split evenly over the ranks (default: "
        "App. D's 256, or the largest that fits a smaller train set)",
    )
    a(
        "--patience",
        type=int,
        default=10,
        help="epochs without a better val knn_top1 before the LR drops "
        "(App. D: 10; Fig. 2b runs: 10)",
    )
    a("--lr-factor", type=float, default=0.1, help="LR multiplier at each drop (App. D: 10x)")
    a(
        "--lr-drops",
        type=int,
        default=2,
        help="LR drops before the next plateau ends training (App. D: 2)",
    )
    a(
        "--epochs",
        type=int,
        default=200,
        help="hard cap on epochs (the plateau rule usually stops first)",
    )
    # --- views (Figure 2b lesions) ---
    a(
        "--image-size",
        type=int,
        default=224,
        help="training crop side (App. D: 224); test: resize side*256/224 then center crop",
    )
    a(
        "--crop-min-scale",
        type=float,
        default=0.2,
        help="smallest area fraction of RandomResizedCrop",
    )
    a(
        "--jitter",
        type=float,
        default=0.4,
        help="ColorJitter strength for brightness/contrast/saturation/hue",
    )
    a(
        "--no-crop",
        action="store_true",
        help="Fig. 2b lesion: no random resized crop (resize + center crop)",
    )
    a("--no-gray", action="store_true", help="Fig. 2b lesion: no random grayscale")
    a("--no-jitter", action="store_true", help="Fig. 2b lesion: no color jitter")
    a("--no-flip", action="store_true", help="Fig. 2b lesion: no horizontal flip")
    a("--no-aug", action="store_true", help="Fig. 2b: no augmentation at all (the 2%% run)")
    # --- evaluation ---
    a(
        "--knn-k",
        type=int,
        default=None,
        help="neighbours of the weighted kNN evaluation (default: Wu et al.'s "
        "200, or N if the train set has fewer images)",
    )
    a("--knn-tau", type=float, default=0.07, help="kNN vote weight exp(cos/knn_tau)")
    a(
        "--eval-linear",
        action="store_true",
        help="after training, fit a linear classifier on frozen "
        "features and report linear_top1 / linear_top5 (the transfer accuracy Figure 2's text describes)",
    )
    a(
        "--linear-features",
        choices=["pool", "embedding"],
        default="pool",
        help="frozen features for the linear probe: 512-d pooled conv5 or the 128-d embedding",
    )
    a("--linear-epochs", type=int, default=30, help="epochs of the linear probe")
    a("--linear-lr", type=float, default=0.1, help="linear probe SGD learning rate (cosine decay)")
    # --- system ---
    a(
        "--device",
        default="auto",
        help="auto | cpu | cuda (under torchrun each rank takes cuda:LOCAL_RANK)",
    )
    a(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="CUDA autocast dtype; auto = bf16 where supported else fp16 (+GradScaler); fp32 on CPU. "
        "Losses are always fp32.",
    )
    a("--workers", type=int, default=8, help="DataLoader worker processes per rank (persistent)")
    a("--seed", type=int, default=0, help="seed for model, bank, sampler and k-means")
    a(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/ckpt.pt (model, optimizer, LR state, "
        "bank, cluster labels, epoch, step, best metric)",
    )
    a(
        "--log-every",
        type=int,
        default=50,
        help="steps between progress lines; also how often the loop "
        "waits for the GPU to check for a non-finite loss and (under torchrun) for a stop signal",
    )
    a(
        "--no-image-check",
        action="store_true",
        help="skip opening every image header before training",
    )
    # --- outputs other than training ---
    a(
        "--plot",
        nargs="+",
        default=None,
        metavar="LOG",
        help="draw Figure 2's three panels (accuracy per "
        "epoch) from these log.jsonl files (no training)",
    )
    a("--plot-out", default="fig2.png", help="image written by --plot")
    a(
        "--plot-paper",
        action="store_true",
        help="--plot: also mark the values read off the paper's Figure 2",
    )
    a(
        "--benchmark",
        action="store_true",
        help="time 200 synthetic steps of IR and of LA with a full "
        "ImageNet-sized bank and one k-means (for the GPU; no data needed)",
    )
    a("--bench-steps", type=int, default=200, help="timed steps per algorithm in --benchmark")
    a("--bench-bank", type=int, default=IMAGENET_TRAIN_SIZE, help="bank rows in --benchmark")
    # --- test hooks ---
    a(
        "--debug-bank-dump",
        default=None,
        help="each rank writes its final bank and the number of Eq. 7 "
        "updates of every row (this process's epochs) to DIR/bank_rank{R}.pt",
    )
    a(
        "--debug-nan-step",
        type=int,
        default=None,
        help="make the loss NaN at this global step (tests)",
    )
    return p


def check_args(args, world_size):
    """Reject impossible or contradictory flags before anything is built (a UserError naming the flag).
    The data-sized flags (APP_D_DATA_SIZED) are checked here only when given; check_sizes checks them
    against the train set once it is known."""

    def need(ok, msg):
        if not ok:
            raise UserError(msg)

    def given(name):
        return getattr(args, name) is not None

    need(args.tau > 0, f"--tau must be > 0, got {args.tau}")
    need(0.0 <= args.alpha < 1.0, f"--alpha must be in [0, 1) (Eq. 7), got {args.alpha}")
    need(args.dim >= 1, f"--dim must be >= 1, got {args.dim}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(0.0 <= args.momentum < 1.0, f"--momentum must be in [0, 1), got {args.momentum}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(
        not given("batch_size") or args.batch_size >= 1,
        f"--batch-size must be >= 1, got {args.batch_size}",
    )
    need(
        not given("batch_size") or args.batch_size % world_size == 0,
        f"--batch-size {args.batch_size} is "
        f"the global batch and must be divisible by the world size {world_size}",
    )
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.patience >= 1, f"--patience must be >= 1, got {args.patience}")
    need(0.0 < args.lr_factor < 1.0, f"--lr-factor must be in (0, 1), got {args.lr_factor}")
    need(args.lr_drops >= 0, f"--lr-drops must be >= 0, got {args.lr_drops}")
    need(
        args.image_size >= 32,
        f"--image-size must be >= 32 (ResNet-18 downsamples 32x), got {args.image_size}",
    )
    need(
        0.0 < args.crop_min_scale <= 1.0,
        f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}",
    )
    need(args.jitter >= 0, f"--jitter must be >= 0, got {args.jitter}")
    need(
        not given("k_background") or args.k_background >= 1,
        f"--k-background must be >= 1, got {args.k_background}",
    )
    need(args.k_close is None or args.k_close >= 0, f"--k-close must be >= 0, got {args.k_close}")
    need(
        args.k_close is None or not given("k_background") or args.k_close < args.k_background,
        f"--k-close must be in [0, --k-background={args.k_background}), got {args.k_close}",
    )
    need(args.k_close is None or args.algo == "ann", "--k-close only applies to --algo ann")
    need(
        not given("kmeans_k") or args.kmeans_k >= 1, f"--kmeans-k must be >= 1, got {args.kmeans_k}"
    )
    need(args.n_kmeans >= 1, f"--n-kmeans must be >= 1, got {args.n_kmeans}")
    need(not given("knn_k") or args.knn_k >= 1, f"--knn-k must be >= 1, got {args.knn_k}")
    need(args.knn_tau > 0, f"--knn-tau must be > 0, got {args.knn_tau}")
    need(args.linear_epochs >= 1, f"--linear-epochs must be >= 1, got {args.linear_epochs}")
    need(args.linear_lr > 0, f"--linear-lr must be > 0, got {args.linear_lr}")
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    need(args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}")
    need(args.bench_steps >= 1, f"--bench-steps must be >= 1, got {args.bench_steps}")
    need(args.bench_bank >= 2, f"--bench-bank must be >= 2, got {args.bench_bank}")
    need(
        args.init_from is None or args.algo != "ir",
        "--init-from starts BALL, ANN or LA from an IR "
        "checkpoint; it does not apply to --algo ir (continue an IR run with --resume)",
    )
    need(
        not (args.init_from and args.resume),
        "--init-from and --resume exclude each other "
        "(--resume continues this run's own checkpoint)",
    )
    need(
        args.la_warmup_epochs is None or args.algo == "la",
        "--la-warmup-epochs only applies to --algo la",
    )
    need(
        not (args.init_from and args.la_warmup_epochs),
        "--init-from replaces the IR warm-up; do not also pass --la-warmup-epochs > 0",
    )
    need(
        args.la_warmup_epochs is None or args.la_warmup_epochs >= 0,
        f"--la-warmup-epochs must be >= 0, got {args.la_warmup_epochs}",
    )


def largest_fitting_batch(n_train, world_size, image_size, cap):
    """The largest global batch <= cap that the data allows: at most N, divisible by the world size,
    and (below 64 px) never leaving a rank a last batch of one image (see check_sizes)."""
    for batch in range(min(cap, n_train) // world_size * world_size, 0, -world_size):
        if image_size >= 64 or math.ceil(n_train / world_size) % (batch // world_size) != 1:
            return batch
    return world_size


def fit_defaults_to_data(args, n_train, world_size, algos=None):
    """Give every data-sized flag the user left unset (None) its App. D value, lowered to the largest
    value that fits N train images.  Returns the one line saying what was lowered for the algorithms
    `algos` (default: --algo) would use, or None if nothing was."""
    algos = algos or (args.algo,)
    largest = dict(
        batch_size=largest_fitting_batch(
            n_train, world_size, args.image_size, APP_D_DATA_SIZED["batch_size"]
        ),
        k_background=n_train,
        kmeans_k=n_train,
        knn_k=n_train,
    )
    used = (
        {"batch_size", "knn_k"}
        | ({"k_background"} if set(algos) - {"ir"} else set())
        | ({"kmeans_k"} if "la" in algos else set())
    )
    lowered = []
    for name, app_d in APP_D_DATA_SIZED.items():
        if getattr(args, name) is None:
            setattr(args, name, min(app_d, largest[name]))
            if getattr(args, name) < app_d and name in used:
                lowered.append(
                    f"--{name.replace('_', '-')} {getattr(args, name)} (App. D: {app_d})"
                )
    if not lowered:
        return None
    if any(text.startswith("--kmeans-k") for text in lowered) and args.kmeans_k == n_train:
        lowered.append("so every image is its own cluster and LA trains as BALL (Thm. 5.4)")
    return (
        f"defaults lowered to fit the {n_train} train images (pass a flag to choose): "
        + ", ".join(lowered)
    )


def check_sizes(args, n_train, world_size):
    """Flags that depend on the train set size N (the number of bank rows); values the user typed that
    do not fit are errors (defaults were fitted by fit_defaults_to_data)."""
    if n_train < world_size:
        raise UserError(
            f"--data: {n_train} train images cannot be split over {world_size} processes"
        )
    if args.batch_size > n_train:
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the train set ({n_train} images)"
        )
    if args.algo in ("ball", "ann", "la") and args.k_background > n_train:
        raise UserError(f"--k-background {args.k_background} must be <= N = {n_train} train images")
    if args.k_close is not None and args.k_close >= args.k_background:
        raise UserError(
            f"--k-close must be in [0, --k-background={args.k_background}), got {args.k_close}"
        )
    if args.algo == "la" and args.kmeans_k > n_train:
        raise UserError(f"--kmeans-k {args.kmeans_k} must be <= N = {n_train} train images")
    if args.knn_k > n_train:
        raise UserError(f"--knn-k {args.knn_k} must be <= N = {n_train} train images")
    # BatchNorm cannot normalise one value per channel: a last batch of ONE image with a 1x1 conv5 map
    # (image side < 64) crashes in training mode.  Say so now rather than at the end of epoch 1.
    local_n, local_b = math.ceil(n_train / world_size), args.batch_size // world_size
    if args.image_size < 64 and local_n % local_b == 1:
        raise UserError(
            f"--batch-size {args.batch_size}: each rank's last batch would hold one image, which "
            f"BatchNorm rejects at --image-size {args.image_size} < 64; pick another batch size"
        )


def check_out_dir(path):
    """Create --out-dir and prove it writable now, not at the first checkpoint an epoch later."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(
            f"--out-dir {path!r} is not a writable folder ({err.strerror or err})"
        ) from err


# -----------------------------------------------------------------------------
# Data: ImageFolder that also returns the index i of M[i]; views = augmentations.
# -----------------------------------------------------------------------------
def train_transform(
    image_size,
    crop=True,
    gray=True,
    jitter=True,
    flip=True,
    crop_min_scale=0.2,
    jitter_strength=0.4,
):
    """The view set v_x of IR / LA (Section 5.3 and App. D): random resized crop to image_size,
    random grayscale p=0.2, color jitter, horizontal flip, ImageNet normalisation.  Each flag off
    is one lesion of Figure 2b; all off leaves a deterministic resize + center crop (one view)."""
    ops = []
    if crop:
        ops.append(transforms.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0)))
    else:  # same pixels as the test view: resize then center crop, no randomness
        ops += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if gray:
        ops.append(transforms.RandomGrayscale(p=0.2))
    if jitter:
        s = jitter_strength
        ops.append(
            transforms.ColorJitter(s, s, s, min(s, 0.5))
        )  # hue is capped at 0.5 by torchvision
    if flip:
        ops.append(transforms.RandomHorizontalFlip())
    ops += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(ops)


def test_transform(image_size):
    """App. D: resize to 256, center crop 224, normalise; scaled by image_size/224 for small runs.
    (The paper writes "256 by 256"; like its references we resize the SHORTER side to 256.)"""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class IndexedImageFolder(ImageFolder):
    """ImageFolder returning (image, target, index): `index` is i in M[i] (Eq. 6-7).  ImageFolder sorts
    its files, so every rank and every restart numbers the images identically.  `target` (the class
    folder) is handed on only to the evaluations; the training loop throws it away."""

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (
            Exception
        ) as err:  # a file whose header passed the check but whose pixels do not decode
            raise UserError(
                f"--data: unreadable image {path} ({type(err).__name__}: {err})"
            ) from err
        return self.transform(image), target, index


def _class_folders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def load_datasets(args, rank=0, world_size=1):
    """Check --data before training (UserErrors naming the path) and return (train, train_eval, val)
    datasets: train with random views, train_eval (the same files, test view) for the linear probe, val."""
    root = args.data
    if not os.path.isdir(root):
        raise UserError(f"--data {root!r}: folder not found")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(
                f"--data {root!r} has no {split}/ folder (expected {split}/CLASS/IMAGE files)"
            )
    train_classes = _class_folders(os.path.join(root, "train"))
    val_classes = _class_folders(os.path.join(root, "val"))
    if not train_classes:
        raise UserError(f"--data: {os.path.join(root, 'train')} is empty (no class folders)")
    if train_classes != val_classes:
        only_t, only_v = (
            sorted(set(train_classes) - set(val_classes)),
            sorted(set(val_classes) - set(train_classes)),
        )
        raise UserError(
            f"--data: train/ and val/ class folders differ: only in train {only_t[:5]}, "
            f"only in val {only_v[:5]} ({len(only_t)} and {len(only_v)} in all)"
        )
    views = dict(
        crop=not (args.no_crop or args.no_aug),
        gray=not (args.no_gray or args.no_aug),
        jitter=not (args.no_jitter or args.no_aug),
        flip=not (args.no_flip or args.no_aug),
    )
    sets = []
    for split, tf in (
        (
            "train",
            train_transform(
                args.image_size,
                crop_min_scale=args.crop_min_scale,
                jitter_strength=args.jitter,
                **views,
            ),
        ),
        ("val", test_transform(args.image_size)),
    ):
        try:
            sets.append(IndexedImageFolder(os.path.join(root, split), transform=tf))
        except FileNotFoundError as err:  # a class folder without any image file
            raise UserError(f"--data: {err}") from err
    train_eval = copy.copy(sets[0])  # same file list (no second scan of 1.28M files), test view
    train_eval.transform = test_transform(args.image_size)
    sets.insert(1, train_eval)
    if not args.no_image_check:
        # Open every header (cheap: no decode) so a broken file stops us now, named, not mid-epoch.
        # Each rank checks its share; the first bad name is shared so that every rank raises the same error.
        paths = [p for p, _ in sets[0].samples + sets[2].samples][rank::world_size]

        def bad(path):
            try:
                with Image.open(path) as im:
                    im.size
                return None
            except Exception as err:
                return f"{path} ({type(err).__name__}: {err})"

        with ThreadPoolExecutor(16) as pool:
            found = next((b for b in pool.map(bad, paths) if b), None)
        if dist.is_initialized():
            gathered = [None] * world_size
            dist.all_gather_object(gathered, found)
            found = next((b for b in gathered if b), None)
        if found:
            raise UserError(f"--data: unreadable image {found}")
    return sets[0], sets[1], sets[2]


def make_toy_imagefolder(root, num_classes=4, train_per_class=12, val_per_class=4, size=32, seed=0):
    """Write a tiny ImageFolder of PNGs for the demo, tests and CPU smoke runs.  Class c is a stripe
    pattern at angle c*180/num_classes degrees; phase, frequency, colour and noise vary per image, so
    the class is a matter of shape, not of mean colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(root, split, f"class_{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for j in range(count):
                freq, phase = rng.uniform(2.5, 4.5), rng.uniform(0, 2 * np.pi)
                stripes = np.sin(
                    2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase
                )
                colour_a, colour_b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
                img = np.where(
                    stripes[..., None] > 0, colour_a, colour_b
                ) + 0.1 * rng.standard_normal((size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{split}_{c}_{j:03d}.png")
                )
    return root


# -----------------------------------------------------------------------------
# Model: ResNet-18 "with 128 classes" (App. D), output L2-normalised.
# -----------------------------------------------------------------------------
class ResNetEmbedding(nn.Module):
    """E(v(x, a)) of Eq. 6: torchvision ResNet-18 from scratch whose final layer has `dim` outputs,
    followed by L2 normalisation.  The normalisation is not optional: the bank rows are unit vectors
    (Eq. 7 re-normalises), Eq. 6's dot products are cosines only for unit z, and an unnormalised
    output makes exp(z.M/tau) meaningless -- such a model trains but its kNN never improves.  (The
    losses of instance_disc.py / local_agg.py refuse non-unit z with a ValueError.)"""

    def __init__(self, dim=128):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=dim)

    def features(self, x):
        """512-d globally pooled conv5 features (input of the 128-d layer), for the linear probe."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        # .float(): under autocast the head's output is bf16/fp16.  The losses would cope (they compute
        # in fp32 whatever z's dtype), but the trainer itself needs fp32 z: normalised in bf16 a row's
        # norm is only within ~4e-3 of 1, Eq. 7 writes z into the fp32 bank, and the kNN monitor
        # scores z against that bank.  The cast is of a [B, 128] tensor: free.
        return F.normalize(self.net.fc(self.features(x)).float(), dim=1)


# -----------------------------------------------------------------------------
# Distributed helpers.
# -----------------------------------------------------------------------------
def setup_distributed(device_flag):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them we are one process and use no comm."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_flag}: CUDA is not available here (use --device cpu)")
    if device_flag not in ("cpu", "cuda") and not device_flag.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device_flag!r}")
    if not ddp:
        return False, 0, 0, 1, torch.device(device_flag)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_flag.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # Long timeout: during LA's re-clustering the other ranks wait in a broadcast while rank 0 runs
    # 10 k-means of 30,000 clusters on faiss-cpu, which can take far longer than the default 10 minutes.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    return True, rank, local_rank, world, device


def padded_mask(first_local_position, count, rank, world_size, n):
    """Which of this rank's next `count` samples are DistributedSampler padding.

    DistributedSampler(drop_last=False) pads the shuffled index list to a multiple of world_size by
    repeating its first entries, then gives rank r the global positions r, r+W, r+2W, ...  Positions
    >= n are the repeats.  We still train on them (a valid view of a real image) but leave them out
    of the bank update, so every M[i] gets exactly one Eq. 7 update per epoch, as in one process."""
    local = first_local_position + torch.arange(count)
    return (rank + local * world_size) >= n


def kept_positions(run, first_local_position, count):
    """Positions in this batch whose bank rows get their Eq. 7 update: None (all of them) except in a
    batch holding DistributedSampler padding.  Worked out on the CPU from counts alone, so the step
    needs no boolean-mask indexing on the GPU (which would wait for the GPU to learn the size)."""
    if not run.ddp:
        return None
    padded = padded_mask(first_local_position, count, run.rank, run.world, run.n_train)
    return (~padded).nonzero().squeeze(1) if padded.any() else None  # on the CPU, like idx


class _SkipFirst:
    """Sampler wrapper that drops the first `skip` indices of the next epoch (mid-epoch resume)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip


def all_gather_rows(x):
    """Concatenate [n_r, ...] tensors from every rank (n_r may differ); identity in one process."""
    if not dist.is_initialized():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


# -----------------------------------------------------------------------------
# The per-step objective, shared by training and --benchmark.
# -----------------------------------------------------------------------------
def forward_loss(model, images, idx, algo, bank, cluster_labels, args, amp_ctx):
    """z = E(v(x_i, a)) for the batch, and the loss to MINIMISE (= minus the paper's objective).
    Only the network runs under autocast; z arrives as fp32 unit vectors and every loss is fp32."""
    with amp_ctx:
        z = model(images)
    if algo == "ir":  # Eq. 6 over all N bank rows
        loss = ir_loss(z, bank.vectors, idx, tau=args.tau)
    elif algo == "ball":  # Definition 5.2
        loss = ball_loss(
            z,
            bank.vectors,
            idx,
            tau=args.tau,
            k_background=args.k_background,
            neighbours_of=args.neighbours_of,
        )
    elif algo == "ann":  # Definition 5.3
        extra = {} if args.k_close is None else {"k_close": args.k_close}
        loss = ann_loss(
            z,
            bank.vectors,
            idx,
            tau=args.tau,
            k_background=args.k_background,
            neighbours_of=args.neighbours_of,
            **extra,
        )
    else:  # Eq. 8
        loss = la_loss(
            z,
            bank.vectors,
            idx,
            cluster_labels,
            tau=args.tau,
            k_background=args.k_background,
            neighbours_of=args.neighbours_of,
        )
    return z, loss


def resolve_precision(flag, device):
    if device.type != "cuda":
        if flag in ("bf16", "fp16"):
            raise UserError(f"--precision {flag} is for CUDA; on {device.type} use fp32 (or auto)")
        return "fp32"
    if flag == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return flag


def autocast_context(precision):
    """The network's forward runs under this; the losses then compute in fp32 (see forward_loss)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def kmeans_device_warning(args, device, num_points):
    """LA (and its IR warm-up) on a GPU with a faiss that has no GPU support: say at start, once, that
    every epoch's k-means will run on the CPU and how big it is (local_agg.warn_if_kmeans_on_cpu,
    which run_kmeans would otherwise only say after the warm-up epochs).  True if it warned."""
    if args.algo != "la":
        return False
    return warn_if_kmeans_on_cpu(device, num_points, args.kmeans_k, args.n_kmeans, dim=args.dim)


def build_step_state(args, device, num_rows, precision):
    """What one training step needs (train_step): the model E, SGD, the GradScaler (fp16 only), the
    bank M of num_rows rows.  Shared by training (set_up adds the data around it) and --benchmark."""
    mem_fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed)  # identical initial model and bank on every rank
    raw_model = ResNetEmbedding(args.dim).to(device, memory_format=mem_fmt)
    optimizer = torch.optim.SGD(
        raw_model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    return SimpleNamespace(
        args=args,
        device=device,
        precision=precision,
        amp_ctx=autocast_context(precision),
        mem_fmt=mem_fmt,
        raw_model=raw_model,
        model=raw_model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
        bank=MemoryBank(num_rows, args.dim, device=device, seed=args.seed),
        phase=args.algo,
        cluster_labels=None,
        update_counts=None,
        global_step=0,
        nonfinite_at=torch.zeros((), dtype=torch.long, device=device),
    )  # first step with a NaN/inf loss; 0: none


def train_step(run, images, idx, keep=None):
    """One step: z = E(v(x_i, a)), the loss against the bank as it stood BEFORE this step (so M[i]
    holds views of earlier epochs), backward + SGD (DDP averages the gradients), then Eq. 7.

    Nothing here waits for the GPU.  The loss stays a device tensor, and a non-finite loss is only
    noted on the device, in run.nonfinite_at; check_in reads it every --log-every steps and before
    every checkpoint, so a NaN never reaches a saved file.  (fp16 is the exception: GradScaler reads
    its inf check on the host every step.)  idx: the dataset indices [B] on the CPU, as the DataLoader
    yields them (MemoryBank.update reads them on the host).  keep: see kept_positions."""
    args = run.args
    z, loss = forward_loss(
        run.model, images, idx, run.phase, run.bank, run.cluster_labels, args, run.amp_ctx
    )
    if args.debug_nan_step is not None and run.global_step + 1 == args.debug_nan_step:
        loss = loss * float("nan")  # test hook
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    z = z.detach()
    if keep is not None:  # leave DistributedSampler's padding repeats out of Eq. 7 (marked -1)
        idx = torch.full_like(idx, -1).index_copy_(0, keep, idx[keep])
    # Eq. 7, then re-normalise; all-gathered over ranks inside.  idx stays on the CPU, where the
    # DataLoader put it: the update reads it on the host, which on a GPU bank is then free.
    run.bank.update(idx, z, args.alpha)
    if run.update_counts is not None:  # test hook: Eq. 7 updates per row, summed over ranks
        written = all_gather_rows(idx.to(run.update_counts.device))
        written = written[written >= 0]  # padding rows (-1) get no update
        run.update_counts.index_add_(0, written, torch.ones_like(written))
    run.global_step += 1
    # torch.where, not an `if`: an `if` on a GPU value would make the host wait for it.
    run.nonfinite_at = torch.where(
        torch.isfinite(loss) | (run.nonfinite_at > 0), run.nonfinite_at, run.global_step
    )
    return loss.detach()


# -----------------------------------------------------------------------------
# Evaluation: weighted kNN against the bank (every epoch) and a linear probe (--eval-linear).
# -----------------------------------------------------------------------------
def knn_predict(z, bank_vectors, train_labels, num_classes, k=200, tau=0.07):
    """Weighted kNN of Wu et al. (2018): the k bank rows most cosine-similar to z vote for their
    class with weight exp(cos/tau).  z [B, d] unit rows, bank_vectors [N, d], train_labels [N] ->
    predicted class [B]."""
    sims, nbrs = (z.float() @ bank_vectors.float().T).topk(k, dim=1)  # [B, k]
    votes = torch.zeros(z.shape[0], num_classes, device=z.device)
    votes.scatter_add_(1, train_labels[nbrs], (sims / tau).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_top1(model, loader, bank_vectors, train_labels, num_classes, k, tau, device, amp_ctx):
    """knn_top1 on the val loader (each rank its own share, counts summed over ranks)."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, total
    for images, targets, _ in loader:
        images = images.to(device, non_blocking=True)
        with amp_ctx:
            z = model(images)
        pred = knn_predict(z, bank_vectors, train_labels, num_classes, k, tau)
        counts += torch.stack(
            [(pred.cpu() == targets).sum().float(), torch.tensor(float(len(targets)))]
        ).to(device)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


@torch.no_grad()
def extract(model, loader, use_pool, device, amp_ctx):
    model.eval()
    feats, labels = [], []
    for images, targets, _ in loader:
        with amp_ctx:
            f = model.features(images.to(device)) if use_pool else model(images.to(device))
        feats.append(f.float())
        labels.append(targets.to(device))
    model.train()
    return all_gather_rows(torch.cat(feats)), all_gather_rows(torch.cat(labels))


def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs, lr, seed=0, batch_size=256):
    """Fit softmax regression on frozen, standardised features; return (linear_top1, linear_top5).

    Simplification (say it where numbers are reported): features are extracted ONCE from the test
    view, not re-augmented every epoch as in the IR/LA papers' linear evaluation."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    clf = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for chunk in torch.randperm(len(train_x), generator=g).to(train_x.device).split(batch_size):
            loss = F.cross_entropy(clf(train_x[chunk]), train_y[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        top = clf(val_x).topk(min(5, num_classes), dim=1).indices
    hit = top == val_y[:, None]
    return hit[:, 0].float().mean().item(), hit.any(dim=1).float().mean().item()


# -----------------------------------------------------------------------------
# Checkpoints and logs.
# -----------------------------------------------------------------------------
def save_checkpoint(state, path):
    """Atomic: write a temporary file in the same folder, then rename over the old checkpoint, so a
    crash or a kill mid-write leaves the previous good checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag, device):
    """torch.load a checkpoint of this script, or a UserError naming `flag` and the path."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device)
    except (
        Exception
    ) as err:  # truncated, not a torch file, ...: the file, not the code, is at fault
        raise UserError(
            f"{flag}: cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    if not isinstance(ckpt, dict) or not {"model", "bank", "args", "num_train", "epoch"} <= set(
        ckpt
    ):
        raise UserError(f"{flag}: {path} is not a checkpoint written by imagenet_train.py")
    return ckpt


def append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path):
    """The rows of a log.jsonl; a UserError naming the file (and line) if it cannot be read."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as err:
        raise UserError(f"--plot: cannot read {path} ({err.strerror or err})") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"--plot: {path} line {number} is not JSON ({err.msg})") from err
    return rows


# -----------------------------------------------------------------------------
# --plot: Figure 2's three panels, accuracy per epoch, one curve per run.
# -----------------------------------------------------------------------------
# Values read off the paper's Figure 2 by eye (../shared/paper_figures/figure2.png and its README;
# the paper prints no table): (label in the figure, last epoch drawn, test accuracy there).  Read to
# about +-0.005 in accuracy and +-2 epochs.  The paper does not say which accuracy it plots (the
# authors' code validates by kNN against the bank), so these are marked "read off", never matched.
PAPER_FIGURE2 = {
    "a": [
        ("IR (init.)", 9, 0.082),
        ("IR (cont.)", 79, 0.234),
        ("BALL", 79, 0.26),
        ("ANN", 78, 0.272),
        ("LA", 79, 0.286),
    ],
    "b": [
        ("IR (all)", 85, 0.24),
        ("IR (crop)", 96, 0.167),
        ("IR (flip)", 44, 0.022),
        ("IR (None)", 23, 0.02),
        ("IR (grayscale)", 22, 0.013),
    ],
    "c": [
        ("IR (m=0)", 95, 0.245),
        ("IR (m=0.1)", 99, 0.247),
        ("IR (m=0.3)", 99, 0.247),
        ("IR (m=0.5)", 86, 0.24),
        ("IR (m=0.7)", 99, 0.23),
        ("IR (m=0.9)", 99, 0.198),
    ],
}


def view_name(cfg):
    """'all', 'none', 'crop only' (Figure 2b's 'IR (crop)'), or the lesions, e.g. 'no crop'."""
    if cfg.get("no_aug"):
        return "none"
    off = [k for k in ("crop", "gray", "jitter", "flip") if cfg.get(f"no_{k}")]
    if len(off) == 3:
        return f"{({'crop', 'gray', 'jitter', 'flip'} - set(off)).pop()} only"
    return "all" if not off else "no " + "+".join(off)


def plot_logs(paths, out_path, paper=False):
    """Figure 2 from log.jsonl files, drawn as the paper draws it: test accuracy per epoch, one curve
    per run, in three panels: (a) the algorithms with all views, (b) IR by view set, (c) IR with all
    views by bank update rate alpha.  A run started with --init-from is shifted right by its IR start's
    epochs, as BALL/ANN/LA start at epoch 10 in Fig. 2a.

    Two accuracies, kept apart: each curve is knn_top1 per epoch; a run's linear_top1 (--eval-linear,
    measured once, after training) is a separate star at its last epoch.  paper=True adds the values
    read off the paper's figure (PAPER_FIGURE2) as hollow grey markers, labelled as such.
    Returns {panel title: [(run label, best knn_top1, linear_top1 or nan)]}, also printed as a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in paths:
        rows = read_log(path)
        cfg = next((r for r in rows if r.get("kind") == "config"), None)
        if cfg is None:
            raise UserError(f"--plot: {path} has no config row; is it a log.jsonl of this script?")
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        lin = [r for r in rows if r.get("kind") == "linear"]
        runs.append(
            dict(
                cfg=cfg,
                epochs=epochs,
                shift=cfg.get("init_epoch") or 0,
                knn=max((r["knn_top1"] for r in epochs), default=float("nan")),
                linear=lin[-1]["linear_top1"] if lin else float("nan"),
                name=os.path.basename(os.path.dirname(os.path.abspath(path))),
            )
        )
    panels = [  # (title, which runs, label); the paper's settings: alpha 0.5 (App. D), all views
        (
            "(a) algorithm (all views)",
            lambda c: view_name(c) == "all",
            lambda c: c["algo"] + ("" if c["alpha"] == 0.5 else f" a={c['alpha']}"),
        ),
        ("(b) IR view set", lambda c: c["algo"] == "ir", view_name),
        (
            "(c) IR memory update rate alpha (m)",
            lambda c: c["algo"] == "ir" and view_name(c) == "all",
            lambda c: f"{c['alpha']:g}",
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    plotted = {}
    for ax, (title, keep, label), key in zip(axes, panels, "abc"):
        chosen = sorted((r for r in runs if keep(r["cfg"])), key=lambda r: label(r["cfg"]))
        plotted[title] = [(label(r["cfg"]), r["knn"], r["linear"]) for r in chosen]
        for r in chosen:
            x = [e["epoch"] + r["shift"] for e in r["epochs"]]
            (line,) = ax.plot(
                x,
                [e["knn_top1"] for e in r["epochs"]],
                lw=1.3,
                label=f"{label(r['cfg'])} ({r['name']})",
            )
            if not math.isnan(r["linear"]):
                ax.plot(
                    [x[-1] if x else r["shift"]], [r["linear"]], "*", ms=12, color=line.get_color()
                )
        if paper:
            for name, epoch, acc in PAPER_FIGURE2[key]:
                ax.plot([epoch], [acc], "o", mfc="none", mec="0.35", ms=7)
                ax.annotate(
                    name,
                    (epoch, acc),
                    xytext=(4, 2),
                    textcoords="offset points",
                    fontsize=7,
                    color="0.35",
                )
        if not chosen:
            ax.text(0.5, 0.5, "no runs of this kind", ha="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="epoch", ylabel="top-1 accuracy (val)")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            plt.Line2D([], [], ls="-", color="k", label="kNN top-1 per epoch (curves)"),
            plt.Line2D(
                [], [], ls="", marker="*", ms=10, color="k", label="linear top-1, frozen features"
            ),
        ]
        if paper:
            handles.append(
                plt.Line2D(
                    [],
                    [],
                    ls="",
                    marker="o",
                    mfc="none",
                    mec="0.35",
                    label="read off the paper's Fig. 2",
                )
            )
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    print(f"{'panel':36s} | {'run':22s} | best kNN top-1 | linear top-1")
    for title, entries in plotted.items():
        for run_label, knn, lin in entries:
            print(f"{title:36s} | {run_label:22s} | {knn:14.4f} | {lin:12.4f}")
    print(f"wrote {out_path}")
    return plotted


# -----------------------------------------------------------------------------
# --benchmark: the real training step on synthetic data (meant for one GPU).
# -----------------------------------------------------------------------------
def faiss_build():
    """Which faiss k-means runs on: 'faiss 1.15.1, GPU' or 'faiss 1.15.1, CPU, 16 threads'."""
    where = "GPU" if faiss_has_gpu() else f"CPU, {faiss.omp_get_max_threads()} threads"
    return f"faiss {faiss.__version__}, {where}"


def benchmark(args, device):
    """Time args.bench_steps steps (train_step, the trainer's own) of IR and of LA: batch --batch-size,
    --image-size images, a bank of --bench-bank rows, and one k-means of --kmeans-k clusters over that
    bank.  Prints one JSON line per algorithm: images/s, peak GPU memory, k-means seconds and the
    faiss build, and Appendix D's k-means work per epoch (10 clusterings of 1,281,167 rows into
    30,000 clusters) scaled from the measured one, linearly in rows x clusters x clusterings (the
    assignment step's cost); it is labelled extrapolated unless measured at that size."""
    precision = resolve_precision(args.precision, device)
    note = fit_defaults_to_data(args, args.bench_bank, 1, algos=("ir", "la"))
    if note:
        print(note, flush=True)
    for flag, value in (("--k-background", args.k_background), ("--kmeans-k", args.kmeans_k)):
        if value > args.bench_bank:
            raise UserError(f"{flag} {value} must be <= --bench-bank {args.bench_bank}")
    run = build_step_state(args, device, args.bench_bank, precision)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=run.mem_fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for algo in ("ir", "la"):
        run.phase, kmeans_s = algo, None
        if algo == "la":
            sync()
            t0 = time.time()
            run.cluster_labels = run_kmeans(
                run.bank.vectors, args.kmeans_k, num_clusterings=1, seed=args.seed, verbose=False
            ).to(device)
            sync()
            kmeans_s = time.time() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = 5
        for step in range(warmup + args.bench_steps):
            if step == warmup:
                sync()
                t0 = time.time()
            loss = train_step(
                run, images, torch.randint(args.bench_bank, (args.batch_size,))
            )  # idx on the CPU
        sync()
        dt = time.time() - t0
        row = dict(
            algo=algo,
            device=str(device),
            precision=precision,
            image_size=args.image_size,
            batch_size=args.batch_size,
            bank_rows=args.bench_bank,
            steps=args.bench_steps,
            images_per_s=round(args.bench_steps * args.batch_size / dt, 1),
            step_ms=round(1000 * dt / args.bench_steps, 2),
            loss=round(loss.item(), 4),
            peak_gpu_mem_gib=(
                round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda"
                else None
            ),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            kmeans_clusters=None,
            kmeans_s=None,
            kmeans_faiss=None,
        )
        if algo == "la":
            scale = (
                (IMAGENET_TRAIN_SIZE / args.bench_bank)
                * (APP_D_DATA_SIZED["kmeans_k"] / args.kmeans_k)
                * 10
            )
            row.update(
                kmeans_clusters=args.kmeans_k,
                kmeans_s=round(kmeans_s, 3),
                kmeans_faiss=faiss_build(),
                kmeans_app_d_epoch_s=round(kmeans_s * scale, 1),
                kmeans_app_d_epoch_s_is="measured x10 clusterings"
                if scale == 10
                else f"extrapolated x{scale:.4g} from the measured clustering",
            )
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


# -----------------------------------------------------------------------------
# Demo (no arguments): the four algorithms for a few epochs on generated images.
# -----------------------------------------------------------------------------
def demo():
    """IR, BALL, ANN and LA for 6 CPU epochs each on 64 generated 32x32 images (about a minute)."""
    torch.set_num_threads(
        1
    )  # tiny images: one thread is as fast as several, and immune to busy cores
    epochs = 6
    with tempfile.TemporaryDirectory() as tmp:
        data = make_toy_imagefolder(
            os.path.join(tmp, "data"), num_classes=4, train_per_class=16, val_per_class=8
        )
        print(
            f"demo: 4 classes x 16 train / 8 val generated 32x32 images; {epochs} CPU epochs per algorithm\n"
        )
        table = []
        for algo in ("ir", "ball", "ann", "la"):
            out = os.path.join(tmp, algo)
            extra = (
                ["--la-warmup-epochs", "2", "--kmeans-k", "8", "--n-kmeans", "2"]
                if algo == "la"
                else []
            )
            main(
                [
                    "--data",
                    data,
                    "--out-dir",
                    out,
                    "--algo",
                    algo,
                    "--device",
                    "cpu",
                    "--image-size",
                    "32",
                    "--batch-size",
                    "8",
                    "--epochs",
                    str(epochs),
                    "--k-background",
                    "32",
                    "--knn-k",
                    "10",
                    "--workers",
                    "0",
                    "--log-every",
                    "1000",
                    "--eval-linear",
                ]
                + extra
            )
            rows = read_log(os.path.join(out, "log.jsonl"))
            ep = [r for r in rows if r.get("kind") == "epoch"]
            lin = [r for r in rows if r.get("kind") == "linear"][-1]
            table.append(
                (
                    algo,
                    ep[0]["train_loss"],
                    ep[-1]["train_loss"],
                    max(r["knn_top1"] for r in ep),
                    lin["linear_top1"],
                    sum(r["images_per_s"] for r in ep) / len(ep),
                )
            )
        print(
            f"\nalgo | loss ep1 | loss ep{epochs} | best kNN top-1 (val) | linear top-1 (val) | images/s"
        )
        for algo, l0, l1, knn, lin, ips in table:
            print(
                f"{algo:4s} | {l0:8.3f} | {l1:8.3f} | {100 * knn:19.1f}% | {100 * lin:17.1f}% | {ips:8.1f}"
            )
        print(
            "chance = 25% (4 classes, 32 val images).  LA's first 2 epochs are IR (its warm-up).  Losses of\n"
            "different algorithms are on different scales.  Toy data: this shows the pipeline, not Figure 2."
        )


# -----------------------------------------------------------------------------
# Training, in four named stages: set_up, resume, train_one_epoch (train_step inside), end_of_epoch.
# Every rank runs the same stages in the same order and, holding the same bank, takes the same
# decisions: epoch start (LA after its warm-up): k-means of the bank as it stands (rank 0), labels
# broadcast, C_i fixed for the epoch; each step: train_step; every --log-every steps: check_in;
# epoch end: knn_top1 on val against the bank, LR plateau rule, log row, checkpoint.
# -----------------------------------------------------------------------------
NO_STEP = 2**62  # "no non-finite loss yet" in check_in's all-reduce


def set_up(args, ddp, rank, local_rank, world, device):
    """Stage 1: --out-dir, the data (every bad-input error is raised here, before any training), the
    data-sized defaults, the model, SGD, the LR plateau rule, the bank and the loaders.  Returns `run`,
    the namespace the later stages read and update; a checkpoint is a snapshot of it."""
    master = rank == 0
    precision = resolve_precision(args.precision, device)
    if master:
        check_out_dir(args.out_dir)
    train_set, train_eval_set, val_set = load_datasets(args, rank, world)
    n_train = len(train_set)
    note = fit_defaults_to_data(args, n_train, world)
    check_sizes(args, n_train, world)
    if master and note:
        print(note, flush=True)
    if master:
        kmeans_device_warning(args, device, n_train)
    torch.backends.cudnn.benchmark = True
    run = build_step_state(args, device, n_train, precision)
    local_batch = args.batch_size // world
    sampler = _SkipFirst(
        DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=False
        )
    )
    # The loaders get their own generator (worker seeds) so that creating an iterator -- at a
    # mid-epoch resume, say -- does not consume the global RNG that the augmentations draw from.
    loader_kw = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed + rank),
    )
    # App. D: "dropped twice by a factor of 10 once learning converged, defined as no improvement in
    # validation loss for 10 epochs".  Validation images have no bank row, so their loss is undefined;
    # like the IR/LA code we watch val knn_top1 (mode="max").  Third plateau = stop.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        run.optimizer,
        mode="max",
        factor=args.lr_factor,
        patience=args.patience,
        threshold=0.0,
        threshold_mode="abs",
    )
    vars(run).update(
        ddp=ddp,
        rank=rank,
        local_rank=local_rank,
        world=world,
        master=master,
        n_train=n_train,
        train_set=train_set,
        train_eval_set=train_eval_set,
        val_set=val_set,
        num_classes=len(train_set.classes),
        train_labels=torch.tensor(train_set.targets, device=device),  # for kNN evaluation ONLY
        local_batch=local_batch,
        sampler=sampler,
        loader_kw=loader_kw,
        scheduler=scheduler,
        # drop_last=False: the last, smaller batch still updates its bank rows (every M[i] once per epoch)
        train_loader=DataLoader(
            train_set, batch_size=local_batch, sampler=sampler, drop_last=False, **loader_kw
        ),
        # evaluation: rank r takes images r, r+W, ... -- no padding, so every val image counts exactly once
        val_loader=DataLoader(
            Subset(val_set, range(rank, len(val_set), world)), batch_size=local_batch, **loader_kw
        ),
        update_counts=torch.zeros(n_train, dtype=torch.long, device=device)
        if args.debug_bank_dump
        else None,
        epoch=0,
        batch_in_epoch=0,
        best_knn=-1.0,
        lr_drops=0,
        finished=False,
        init_epoch=0,
        warmup=0
        if args.algo != "la" or args.init_from
        else (10 if args.la_warmup_epochs is None else args.la_warmup_epochs),
        ckpt_path=os.path.join(args.out_dir, "ckpt.pt"),
        log_path=os.path.join(args.out_dir, "log.jsonl"),
        stop={"signal": None},
        epoch_start_step=0,
        steps_in_epoch=0,
        defaults_note=note,
    )
    return run


def check_same_run(ckpt, run):
    """--resume continues the same run: same algorithm, model size, clusterings and train set."""
    args, saved = run.args, ckpt["args"]
    names = ["algo", "dim"] + (["kmeans_k", "n_kmeans"] if args.algo == "la" else [])
    then = [
        f"--{n.replace('_', '-')} {saved.get(n)}" for n in names if saved.get(n) != getattr(args, n)
    ]
    now = [
        f"--{n.replace('_', '-')} {getattr(args, n)}"
        for n in names
        if saved.get(n) != getattr(args, n)
    ]
    if ckpt["num_train"] != run.n_train or ckpt.get("classes") != run.train_set.classes:
        then.append(f"{ckpt['num_train']} train images in {len(ckpt.get('classes') or [])} classes")
        now.append(f"{run.n_train} in {run.num_classes}")
    if then:
        raise UserError(
            f"--resume: {run.ckpt_path} is another run's checkpoint: it has {', '.join(then)}; "
            f"this run has {', '.join(now)}"
        )
    if ckpt["batch_in_epoch"] and ckpt["world_size"] != run.world:
        raise UserError(
            f"--resume: {run.ckpt_path} was saved mid-epoch by {ckpt['world_size']} processes; the "
            f"sampler's split depends on it, so resume with {ckpt['world_size']}, not {run.world}"
        )


def resume(run):
    """Stage 2: continue this run's own checkpoint (--resume), or start BALL / ANN / LA from an IR
    checkpoint (--init-from, App. D and Fig. 2a); seed the augmentations; wrap the model for DDP;
    write the config row of a new run's log."""
    args, rng_states = run.args, None
    if args.resume:
        ckpt = load_checkpoint(run.ckpt_path, "--resume", run.device)
        check_same_run(ckpt, run)
        run.raw_model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.bank.load_state_dict(ckpt["bank"])
        if ckpt["cluster_labels"] is not None:
            run.cluster_labels = ckpt["cluster_labels"].to(run.device)
        run.epoch, run.batch_in_epoch, run.global_step = (
            ckpt["epoch"],
            ckpt["batch_in_epoch"],
            ckpt["step"],
        )
        run.best_knn, run.lr_drops, run.finished = (
            ckpt["best_knn_top1"],
            ckpt["lr_drops"],
            ckpt["finished"],
        )
        run.warmup, run.init_epoch = ckpt["warmup"], ckpt.get("init_epoch", 0)
        rng_states = ckpt["rng_states"] if len(ckpt["rng_states"]) == run.world else None
        if run.master:
            print(
                f"resumed {run.ckpt_path}: epoch {run.epoch} batch {run.batch_in_epoch} step {run.global_step} "
                f"best knn_top1 {run.best_knn:.4f}",
                flush=True,
            )
    elif os.path.exists(run.ckpt_path):
        raise UserError(
            f"--out-dir {args.out_dir} already holds ckpt.pt: pass --resume to continue it, "
            "or choose another --out-dir"
        )
    if args.init_from:
        ckpt = load_checkpoint(args.init_from, "--init-from", run.device)
        got = (ckpt["args"]["algo"], ckpt["num_train"], ckpt["args"]["dim"])
        if got != ("ir", run.n_train, args.dim):
            raise UserError(
                f"--init-from {args.init_from}: need an IR checkpoint of these {run.n_train} images "
                f"with --dim {args.dim}, got --algo {got[0]} on {got[1]} images with --dim {got[2]}"
            )
        run.raw_model.load_state_dict(
            ckpt["model"]
        )  # App. D: "initialize ResNet and the memory bank
        run.bank.load_state_dict(ckpt["bank"])  #  using 10 epochs of IR"
        run.init_epoch = ckpt["epoch"]  # --plot starts this run's curve there (Fig. 2a)
    # Different augmentation randomness per rank; on resume, each rank's exact generator state.
    torch.manual_seed(args.seed + 1 + run.rank)
    if rng_states is not None:
        torch.set_rng_state(rng_states[run.rank].cpu())
    if run.ddp:
        run.model = DDP(
            run.raw_model, device_ids=[run.local_rank] if run.device.type == "cuda" else None
        )
    if run.master and not args.resume:
        append_log(
            run.log_path,
            dict(
                vars(args),
                kind="config",
                world_size=run.world,
                num_train=run.n_train,
                num_val=len(run.val_set),
                num_classes=run.num_classes,
                precision=run.precision,
                la_warmup_epochs=run.warmup,
                init_epoch=run.init_epoch,
                backend=dist.get_backend() if run.ddp else None,
                memory_format="channels_last"
                if run.mem_fmt == torch.channels_last
                else "contiguous",
                defaults_note=run.defaults_note,
            ),
        )


def catch_stop_signals(stop):
    """SIGTERM / SIGINT only set stop["signal"]: the loop finishes its step, saves at the next check_in
    and exits 0.  A second signal acts normally.  Returns the old handlers, for main to restore."""
    old = {}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, old[signum])

    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, request_stop)
    return old


def check_in(run):
    """The loop's host synchronisation -- every --log-every steps, at each epoch's last step, and before
    every checkpoint -- agreed over the ranks by one all-reduce: raise FloatingPointError if a loss was
    non-finite since the start (train_step notes the first such step on the device), before anything
    is saved; return True if a stop signal reached any rank."""
    flags = torch.stack(
        [
            torch.where(run.nonfinite_at > 0, -run.nonfinite_at, -NO_STEP),
            torch.tensor(int(run.stop["signal"] is not None), device=run.device),
        ]
    )
    if run.ddp:
        dist.all_reduce(
            flags, op=dist.ReduceOp.MAX
        )  # the earliest non-finite step; a signal on any rank
    minus_first_bad, stopping = flags.tolist()
    if minus_first_bad != -NO_STEP:
        bad = -minus_first_bad
        raise FloatingPointError(
            f"non-finite loss at step {bad} (epoch {run.epoch + 1}, batch "
            f"{bad - run.epoch_start_step}/{run.steps_in_epoch}); nothing saved: the last "
            f"good checkpoint {run.ckpt_path} is left as it was"
        )
    return bool(stopping)


def checkpoint(run):
    """check_in, then save `run` to OUT_DIR/ckpt.pt (rank 0 writes).  Every rank's augmentation RNG
    goes in, so that a resume replays the same views.  Returns check_in's stop flag."""
    stopping = check_in(run)
    if not bool(torch.isfinite(run.bank.vectors).all()):
        raise FloatingPointError(
            f"non-finite memory bank after step {run.global_step}; nothing saved: the "
            f"last good checkpoint {run.ckpt_path} is left as it was"
        )
    gathered = [None] * run.world
    if run.ddp:
        dist.all_gather_object(gathered, torch.get_rng_state())
    else:
        gathered = [torch.get_rng_state()]
    if run.master:
        save_checkpoint(
            dict(
                model=run.raw_model.state_dict(),
                optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict(),
                scaler=run.scaler.state_dict(),
                bank=run.bank.state_dict(),
                cluster_labels=None if run.cluster_labels is None else run.cluster_labels.cpu(),
                epoch=run.epoch,
                batch_in_epoch=run.batch_in_epoch,
                step=run.global_step,
                best_knn_top1=run.best_knn,
                lr_drops=run.lr_drops,
                finished=run.finished,
                warmup=run.warmup,
                init_epoch=run.init_epoch,
                rng_states=gathered,
                num_train=run.n_train,
                classes=run.train_set.classes,
                world_size=run.world,
                args=vars(run.args),
            ),
            run.ckpt_path,
        )
    return stopping


def cluster_bank(run):
    """Eq. 8's close sets for this epoch: C_i = the rows sharing a cluster with i in any of --n-kmeans
    k-means clusterings of the bank as it stands (rank 0 clusters, the labels are broadcast)."""
    args, t0 = run.args, time.time()
    if run.master:
        labels = run_kmeans(
            run.bank.vectors,
            args.kmeans_k,
            args.n_kmeans,
            seed=args.seed + 1000 * run.epoch,
            verbose=True,
        )
        run.cluster_labels = labels.to(
            device=run.device, dtype=torch.long
        )  # la_loss: on the bank's device
    else:
        run.cluster_labels = torch.empty(
            args.n_kmeans, run.n_train, dtype=torch.long, device=run.device
        )
    if run.ddp:
        dist.broadcast(run.cluster_labels, src=0)
    if run.master:
        print(
            f"epoch {run.epoch + 1}: {args.n_kmeans} k-means of {args.kmeans_k} clusters in "
            f"{time.time() - t0:.1f}s",
            flush=True,
        )


def train_one_epoch(run):
    """Stage 3: one epoch of train_step, or what is left of it after a mid-epoch resume.  Returns
    False if a stop signal ended it early (a mid-epoch checkpoint is saved), True at its end."""
    args, device = run.args, run.device
    run.phase = "ir" if run.epoch < run.warmup else args.algo  # LA's own IR warm-up (App. D)
    if run.phase == "la" and (run.cluster_labels is None or run.batch_in_epoch == 0):
        cluster_bank(run)
    run.sampler.sampler.set_epoch(run.epoch)
    run.sampler.skip = run.batch_in_epoch * run.local_batch
    run.steps_in_epoch = math.ceil(len(run.sampler.sampler) / run.local_batch)
    run.epoch_start_step = run.global_step - run.batch_in_epoch
    run.loss_sum, run.steps_run, run.images_seen = torch.zeros((), device=device), 0, 0
    run.t_epoch = t_last = time.time()
    first_batch, seen_since_log = run.batch_in_epoch, 0
    for b, (images, _, idx) in enumerate(
        run.train_loader, start=run.batch_in_epoch
    ):  # class labels unused
        images = images.to(device, non_blocking=True, memory_format=run.mem_fmt)
        keep = kept_positions(run, b * run.local_batch, len(idx))
        try:
            loss = train_step(
                run, images, idx, keep
            )  # idx on the CPU: each loss moves it to the bank's device
        except (
            Exception
        ):  # after an unnoticed non-finite loss, NaN weights make a loss refuse its z:
            check_in(run)  # report the first non-finite step instead, if there was one
            raise
        run.loss_sum += loss
        run.steps_run += 1
        run.images_seen += len(idx)
        seen_since_log += len(idx)
        last = b + 1 == run.steps_in_epoch
        # In one process a signal is a Python flag, free to look at every step; under torchrun the
        # ranks must agree, which costs a collective, so they look every --log-every steps.
        if (b + 1) % args.log_every == 0 or last or (not run.ddp and run.stop["signal"]):
            stopping = check_in(run)  # waits for the GPU; raises on a non-finite loss
            if run.master:
                now = time.time()
                per_step = (now - run.t_epoch) / (b + 1 - first_batch)
                print(
                    f"epoch {run.epoch + 1} step {b + 1}/{run.steps_in_epoch} (global {run.global_step}) | "
                    f"{run.phase} loss {loss.item():.4f} | lr {run.optimizer.param_groups[0]['lr']:.2e} | "
                    f"{seen_since_log * run.world / (now - t_last):.1f} img/s | epoch left "
                    f"{per_step * (run.steps_in_epoch - b - 1):.0f}s",
                    flush=True,
                )
                t_last, seen_since_log = now, 0
            if stopping and not last:  # (at the last step, end_of_epoch saves and stops)
                run.batch_in_epoch = b + 1
                checkpoint(run)
                if run.master:
                    print(
                        f"stopped by {run.stop['signal'] or 'a signal on another rank'} after step "
                        f"{run.global_step} (epoch {run.epoch + 1}, batch {b + 1}/{run.steps_in_epoch}); saved "
                        f"{run.ckpt_path}; continue with --resume",
                        flush=True,
                    )
                return False
    return True


def end_of_epoch(run):
    """Stage 4: the epoch's mean loss and images/s over all ranks, val knn_top1 against the bank, the
    LR plateau rule (App. D), the log row and the checkpoint.  Returns False if a stop signal came."""
    args = run.args
    train_s = time.time() - run.t_epoch
    totals = torch.stack([run.loss_sum, torch.tensor(float(run.images_seen), device=run.device)])
    if run.ddp:
        dist.all_reduce(totals)
        for buf in run.raw_model.buffers():  # BN running stats: evaluate (and save) rank 0's
            dist.broadcast(buf, src=0)
    mean_loss = totals[0].item() / max(
        1, run.steps_run * run.world
    )  # every rank ran steps_run steps
    images_per_s = totals[1].item() / max(train_s, 1e-9)  # all ranks together, training only
    knn = knn_top1(
        run.raw_model,
        run.val_loader,
        run.bank.vectors,
        run.train_labels,
        run.num_classes,
        args.knn_k,
        args.knn_tau,
        run.device,
        run.amp_ctx,
    )
    lr_used = run.optimizer.param_groups[0]["lr"]
    if (
        run.epoch >= run.warmup
    ):  # the LR rule starts with the algorithm itself, not during LA's warm-up
        run.scheduler.step(knn)
        if run.optimizer.param_groups[0]["lr"] < lr_used:
            run.lr_drops += 1
            run.finished = (
                run.lr_drops > args.lr_drops
            )  # App. D: two drops, then stop at the next plateau
    run.best_knn = max(run.best_knn, knn)
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    if run.master:
        append_log(
            run.log_path,
            dict(
                kind="epoch",
                epoch=run.epoch,
                step=run.global_step,
                algo=run.phase,
                train_loss=mean_loss,
                lr=lr_used,
                knn_top1=knn,
                best_knn_top1=run.best_knn,
                images_per_s=images_per_s,
                epoch_s=time.time() - run.t_epoch,
            ),
        )
        print(
            f"epoch {run.epoch} done | {run.phase} train loss {mean_loss:.4f} | val knn_top1 {100 * knn:.2f}% "
            f"(best {100 * run.best_knn:.2f}%) | {images_per_s:.1f} img/s"
            + (" | learning converged: stopping (App. D)" if run.finished else ""),
            flush=True,
        )
    if checkpoint(run):
        if run.master:
            print(
                f"stopped by {run.stop['signal'] or 'a signal on another rank'} after epoch {run.epoch}; saved "
                f"{run.ckpt_path}; continue with --resume",
                flush=True,
            )
        return False
    return True


def after_training(run):
    """The plateau message, the linear probe (--eval-linear) and the test hook's bank dump."""
    args = run.args
    if run.finished and run.master:
        print(
            f"training has finished: the val knn_top1 plateaued after {args.lr_drops} LR drops (App. D); "
            f"best knn_top1 {100 * run.best_knn:.2f}%",
            flush=True,
        )
    if args.eval_linear:
        if run.ddp:
            for buf in run.raw_model.buffers():
                dist.broadcast(buf, src=0)
        use_pool = args.linear_features == "pool"
        tr = DataLoader(
            Subset(run.train_eval_set, range(run.rank, run.n_train, run.world)),
            batch_size=run.local_batch,
            **run.loader_kw,
        )
        train_x, train_y = extract(run.raw_model, tr, use_pool, run.device, run.amp_ctx)
        val_x, val_y = extract(run.raw_model, run.val_loader, use_pool, run.device, run.amp_ctx)
        if run.master:
            top1, top5 = linear_probe(
                train_x,
                train_y,
                val_x,
                val_y,
                run.num_classes,
                args.linear_epochs,
                args.linear_lr,
                seed=args.seed,
            )
            append_log(
                run.log_path,
                dict(
                    kind="linear",
                    epoch=run.epoch,
                    features=args.linear_features,
                    linear_top1=top1,
                    linear_top5=top5,
                ),
            )
            print(
                f"linear probe on frozen {args.linear_features} features: linear_top1 {100 * top1:.2f}% "
                f"linear_top5 {100 * top5:.2f}% (val)",
                flush=True,
            )
    if args.debug_bank_dump:
        os.makedirs(args.debug_bank_dump, exist_ok=True)
        torch.save(
            dict(vectors=run.bank.vectors.cpu(), update_counts=run.update_counts.cpu()),
            os.path.join(args.debug_bank_dump, f"bank_rank{run.rank}.pt"),
        )


def main(argv=None):
    """The demo (no arguments), --plot, --benchmark, or training: set_up, resume, then train_one_epoch
    and end_of_epoch until App. D's plateau rule or --epochs ends it, then after_training.  A mistake
    in the flags or data raises UserError; command_line() turns it into one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser().parse_args(argv)
    if args.plot:
        return plot_logs(args.plot, args.plot_out, paper=args.plot_paper)
    if args.data is None and not args.benchmark:
        raise UserError(
            "--data is required (an ImageFolder root with train/ and val/); "
            "run with no arguments for a CPU demo on generated images"
        )
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    old_handlers = {}
    try:
        check_args(args, world)
        if args.benchmark:
            return benchmark(args, device)
        run = set_up(args, ddp, rank, local_rank, world, device)
        resume(run)
        old_handlers = catch_stop_signals(run.stop)
        while not run.finished and run.epoch < args.epochs:
            if not train_one_epoch(run) or not end_of_epoch(run):
                return None  # a stop signal: the checkpoint is saved, --resume continues
        after_training(run)
        return None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if ddp:
            dist.destroy_process_group()


def _one_line(err):
    text = str(err).strip()
    if (
        "Original Traceback" in text
    ):  # raised in a DataLoader worker: our message is the traceback's last line
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return " ".join(text.split())


def command_line(argv=None):
    """`python imagenet_train.py ...`: main(), with a UserError printed as one line on stderr and exit
    status 2, no traceback.  Under torchrun every rank that fails says so, tagged with its rank."""
    try:
        main(argv)
    except UserError as err:
        tag = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"imagenet_train.py: error: {tag}{_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
