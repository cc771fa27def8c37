"""Train IR, BALL, ANN or LA on an ImageFolder (ImageNet) and measure it the way Figure 2 does.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning", Section 5.3 ("ImageNet Experiments"), Figure 2 and Appendix D.

Figure 2 compares (a) IR vs BALL vs ANN vs LA, (b) IR with augmentations lesioned, and
(c) IR with different memory-bank update rates alpha (Eq. 7).  Every setting of those three
panels is a flag of this script; Appendix D's values are the defaults.

    # one GPU (or CPU) -- no torchrun needed
    python imagenet_train.py --data /imagenet --algo ir --out-dir runs/ir
    # 8 GPUs on one node; multi-node: add --nnodes/--node-rank/--master-addr as usual
    torchrun --nproc_per_node 8 imagenet_train.py --data /imagenet --algo la \
        --init-from runs/ir/ckpt.pt --out-dir runs/la
    # Figure 2b lesions / 2c sweep
    python imagenet_train.py --data /imagenet --no-crop --out-dir runs/ir_nocrop
    python imagenet_train.py --data /imagenet --alpha 0.0 --out-dir runs/ir_alpha0
    # stop/continue: SIGTERM or Ctrl-C saves runs/x/ckpt.pt; then
    python imagenet_train.py --data /imagenet --out-dir runs/x --resume
    # Figure-2-style charts from the epoch logs
    python imagenet_train.py --plot runs/*/log.jsonl --plot-out fig2.png
    # CPU smoke run on a tiny folder (OMP_NUM_THREADS=1 is fastest for 32x32 images, and on busy
    # cores more threads can be 10x slower), and the no-argument demo on generated images
    OMP_NUM_THREADS=1 python imagenet_train.py --data tiny --device cpu --image-size 32 \
        --batch-size 32 --knn-k 10 --workers 0 --k-background 64 --kmeans-k 8 --n-kmeans 2
    python imagenet_train.py
    # GPU benchmark: synthetic 224x224 batches, 200 steps of IR and of LA, a 1,281,167-row bank,
    # one k-means of 30,000 clusters; prints images/s, peak GPU memory, k-means seconds
    python imagenet_train.py --benchmark --device cuda

Two accuracies, never to be confused (both are logged under their own names):
  knn_top1     weighted k-nearest-neighbour top-1 on val/ against the memory bank (Wu et al. 2018:
               k=200 neighbours, each votes exp(cos/tau) for its class).  Cheap; every epoch; drives
               the learning-rate schedule.
  linear_top1  / linear_top5: a linear classifier trained on frozen features (--eval-linear), the
               "transfer task of ImageNet classification" that Figure 2 plots.
Class labels (from the folder names) are used only by these two evaluations, never by training.
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
from local_agg import la_loss, run_kmeans
from memory_bank import MemoryBank

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_TRAIN_SIZE = 1_281_167  # rows of the bank for the full ImageNet-1k train split


# -----------------------------------------------------------------------------
# Arguments: Appendix D's values are the defaults.
# -----------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        description="IR / BALL / ANN / LA on an ImageFolder (Section 5.3, Figure 2, Appendix D). "
        "Run with no arguments for a 1-minute CPU demo on generated images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="ImageFolder root holding train/CLASS/*.jpg and val/CLASS/*.jpg; "
      "class folders give the labels used only by kNN / linear evaluation")
    a("--out-dir", default="runs/default", help="where ckpt.pt and log.jsonl go (rank 0 writes)")
    # --- objective (Section 5.3) ---
    a("--algo", choices=["ir", "ball", "ann", "la"], default="ir",
      help="ir: Eq. 6 over the whole bank; ball: Def. 5.2 (negatives = background set B_i); "
      "ann: Def. 5.3 (B_i minus close set C_i); la: Eq. 8 (C_i from k-means)")
    a("--tau", type=float, default=0.07, help="temperature tau of Eq. 6 (App. D: 0.07)")
    a("--alpha", type=float, default=0.5, help="memory bank update rate alpha of Eq. 7, in [0, 1) "
      "(App. D calls it t, Fig. 2c calls it m; 0 = the bank keeps only last epoch's view)")
    a("--dim", type=int, default=128, help="representation dimension d: ResNet-18 'classes' (App. D)")
    a("--k-background", type=int, default=4096, help="|B_i|: nearest bank entries forming the background "
      "set of BALL / ANN / LA (App. D: 4096)")
    a("--k-close", type=int, default=None, help="ANN only: size of the close set C_i removed from B_i "
      "(None: instance_disc.ann_loss's default, k_background // 10)")
    a("--neighbours-of", choices=["z", "bank"], default="z", help="BALL/ANN/LA: B_i = nearest bank rows to "
      "the current embedding z (LA code) or to M[i] (the paper's wording in Sec. 5.3; one more matmul)")
    a("--kmeans-k", type=int, default=30000, help="LA: clusters per k-means (App. D: 30000)")
    a("--n-kmeans", type=int, default=10, help="LA: k-means runs with different seeds; C_i = union of "
      "i's clusters (App. D: 10)")
    a("--init-from", default=None, help="LA: start model and bank from this IR checkpoint (App. D: LA "
      "starts from 10 epochs of IR); excludes --la-warmup-epochs")
    a("--la-warmup-epochs", type=int, default=None, help="LA without --init-from: epochs of IR before "
      "switching to LA (None: 10, App. D)")
    # --- optimisation (Appendix D) ---
    a("--lr", type=float, default=0.03, help="SGD learning rate (App. D: 0.03)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (App. D: 0.9)")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay (App. D: 1e-4)")
    a("--batch-size", type=int, default=256, help="GLOBAL batch size, split evenly over the ranks (App. D: 256)")
    a("--patience", type=int, default=10, help="epochs without a better val knn_top1 before the LR drops "
      "(App. D: 10; Fig. 2b runs: 10)")
    a("--lr-factor", type=float, default=0.1, help="LR multiplier at each drop (App. D: 10x)")
    a("--lr-drops", type=int, default=2, help="LR drops before the next plateau ends training (App. D: 2)")
    a("--epochs", type=int, default=200, help="hard cap on epochs (the plateau rule usually stops first)")
    # --- views (Figure 2b lesions) ---
    a("--image-size", type=int, default=224, help="training crop side (App. D: 224); test: resize "
      "side*256/224 then center crop")
    a("--crop-min-scale", type=float, default=0.2, help="smallest area fraction of RandomResizedCrop")
    a("--jitter", type=float, default=0.4, help="ColorJitter strength for brightness/contrast/saturation/hue")
    a("--no-crop", action="store_true", help="Fig. 2b lesion: no random resized crop (resize + center crop)")
    a("--no-gray", action="store_true", help="Fig. 2b lesion: no random grayscale")
    a("--no-jitter", action="store_true", help="Fig. 2b lesion: no color jitter")
    a("--no-flip", action="store_true", help="Fig. 2b lesion: no horizontal flip")
    a("--no-aug", action="store_true", help="Fig. 2b: no augmentation at all (the 2%% run)")
    # --- evaluation ---
    a("--knn-k", type=int, default=200, help="neighbours of the weighted kNN evaluation (Wu et al.: 200)")
    a("--knn-tau", type=float, default=0.07, help="kNN vote weight exp(cos/knn_tau)")
    a("--eval-linear", action="store_true", help="after training, fit a linear classifier on frozen "
      "features and report linear_top1 / linear_top5 (what Figure 2 plots)")
    a("--linear-features", choices=["pool", "embedding"], default="pool",
      help="frozen features for the linear probe: 512-d pooled conv5 or the 128-d embedding")
    a("--linear-epochs", type=int, default=30, help="epochs of the linear probe")
    a("--linear-lr", type=float, default=0.1, help="linear probe SGD learning rate (cosine decay)")
    # --- system ---
    a("--device", default="auto", help="auto | cpu | cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
      help="CUDA autocast dtype; auto = bf16 where supported else fp16 (+GradScaler); fp32 on CPU. "
      "Losses are always fp32.")
    a("--workers", type=int, default=8, help="DataLoader worker processes per rank (persistent)")
    a("--seed", type=int, default=0, help="seed for model, bank, sampler and k-means")
    a("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt (model, optimizer, LR state, "
      "bank, cluster labels, epoch, step, best metric)")
    a("--log-every", type=int, default=50, help="steps between progress lines")
    a("--no-image-check", action="store_true", help="skip opening every image header before training")
    # --- outputs other than training ---
    a("--plot", nargs="+", default=None, metavar="LOG", help="draw Figure-2-style charts from these "
      "log.jsonl files (no training)")
    a("--plot-out", default="fig2.png", help="image written by --plot")
    a("--benchmark", action="store_true", help="time 200 synthetic steps of IR and of LA with a full "
      "ImageNet-sized bank and one k-means (for the GPU; no data needed)")
    a("--bench-steps", type=int, default=200, help="timed steps per algorithm in --benchmark")
    a("--bench-bank", type=int, default=IMAGENET_TRAIN_SIZE, help="bank rows in --benchmark")
    # --- test hooks ---
    a("--debug-bank-dump", default=None, help="each rank writes its final bank and the number of Eq. 7 "
      "updates of every row (this process's epochs) to DIR/bank_rank{R}.pt")
    a("--debug-nan-step", type=int, default=None, help="make the loss NaN at this global step (tests)")
    return p


def check_args(args, world_size):
    """Reject impossible or contradictory flags before anything is built (ValueError naming the flag)."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(args.tau > 0, f"--tau must be > 0, got {args.tau}")
    need(0.0 <= args.alpha < 1.0, f"--alpha must be in [0, 1) (Eq. 7), got {args.alpha}")
    need(args.dim >= 1, f"--dim must be >= 1, got {args.dim}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(0.0 <= args.momentum < 1.0, f"--momentum must be in [0, 1), got {args.momentum}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.batch_size % world_size == 0, f"--batch-size {args.batch_size} is the global batch and must "
         f"be divisible by the world size {world_size}")
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.patience >= 1, f"--patience must be >= 1, got {args.patience}")
    need(0.0 < args.lr_factor < 1.0, f"--lr-factor must be in (0, 1), got {args.lr_factor}")
    need(args.lr_drops >= 0, f"--lr-drops must be >= 0, got {args.lr_drops}")
    need(args.image_size >= 32, f"--image-size must be >= 32 (ResNet-18 downsamples 32x), got {args.image_size}")
    need(0.0 < args.crop_min_scale <= 1.0, f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")
    need(args.jitter >= 0, f"--jitter must be >= 0, got {args.jitter}")
    need(args.k_background >= 1, f"--k-background must be >= 1, got {args.k_background}")
    need(args.k_close is None or 0 <= args.k_close < args.k_background,
         f"--k-close must be in [0, --k-background={args.k_background}), got {args.k_close}")
    need(args.k_close is None or args.algo == "ann", "--k-close only applies to --algo ann")
    need(args.kmeans_k >= 1, f"--kmeans-k must be >= 1, got {args.kmeans_k}")
    need(args.n_kmeans >= 1, f"--n-kmeans must be >= 1, got {args.n_kmeans}")
    need(args.knn_k >= 1, f"--knn-k must be >= 1, got {args.knn_k}")
    need(args.knn_tau > 0, f"--knn-tau must be > 0, got {args.knn_tau}")
    need(args.linear_epochs >= 1, f"--linear-epochs must be >= 1, got {args.linear_epochs}")
    need(args.linear_lr > 0, f"--linear-lr must be > 0, got {args.linear_lr}")
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    need(args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}")
    need(args.bench_steps >= 1, f"--bench-steps must be >= 1, got {args.bench_steps}")
    need(args.init_from is None or args.algo == "la",
         f"--init-from starts LA from an IR checkpoint; it does not apply to --algo {args.algo}")
    need(not (args.init_from and args.resume), "--init-from and --resume exclude each other "
         "(--resume continues this run's own checkpoint)")
    need(args.la_warmup_epochs is None or args.algo == "la", "--la-warmup-epochs only applies to --algo la")
    need(not (args.init_from and args.la_warmup_epochs), "--init-from replaces the IR warm-up; "
         "do not also pass --la-warmup-epochs > 0")
    need(args.la_warmup_epochs is None or args.la_warmup_epochs >= 0,
         f"--la-warmup-epochs must be >= 0, got {args.la_warmup_epochs}")


def check_sizes(args, n_train, world_size):
    """Flags that depend on the train set size N (the number of bank rows)."""
    if args.batch_size > n_train:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the train set ({n_train} images)")
    if args.algo in ("ball", "ann", "la") and args.k_background > n_train:
        raise ValueError(f"--k-background {args.k_background} must be <= N = {n_train} train images")
    if args.algo == "la" and args.kmeans_k > n_train:
        raise ValueError(f"--kmeans-k {args.kmeans_k} must be <= N = {n_train} train images")
    if args.knn_k > n_train:
        raise ValueError(f"--knn-k {args.knn_k} must be <= N = {n_train} train images")
    # BatchNorm cannot normalise one value per channel: a last batch of ONE image with a 1x1 conv5 map
    # (image side < 64) crashes in training mode.  Say so now rather than at the end of epoch 1.
    local_n, local_b = math.ceil(n_train / world_size), args.batch_size // world_size
    if args.image_size < 64 and local_n % local_b == 1:
        raise ValueError(f"--batch-size {args.batch_size}: each rank's last batch would hold one image, which "
                         f"BatchNorm rejects at --image-size {args.image_size} < 64; pick another batch size")


# -----------------------------------------------------------------------------
# Data: ImageFolder that also returns the index i of M[i]; views = augmentations.
# -----------------------------------------------------------------------------
def train_transform(image_size, crop=True, gray=True, jitter=True, flip=True, crop_min_scale=0.2,
                    jitter_strength=0.4):
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
        ops.append(transforms.ColorJitter(s, s, s, min(s, 0.5)))  # hue is capped at 0.5 by torchvision
    if flip:
        ops.append(transforms.RandomHorizontalFlip())
    ops += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(ops)


def test_transform(image_size):
    """App. D: resize to 256, center crop 224, normalise; scaled by image_size/224 for small runs.
    (The paper writes "256 by 256"; like its references we resize the SHORTER side to 256.)"""
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                               transforms.CenterCrop(image_size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class IndexedImageFolder(ImageFolder):
    """ImageFolder returning (image, target, index): `index` is i in M[i] (Eq. 6-7).  ImageFolder sorts
    its files, so every rank and every restart numbers the images identically.  `target` (the class
    folder) is handed on only to the evaluations; the training loop throws it away."""

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as err:  # a file that passed the header check but does not decode
            raise RuntimeError(f"unreadable image {path}: {err}") from err
        return self.transform(image), target, index


def _class_folders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def load_datasets(args, rank=0, world_size=1):
    """Check --data before training (clear ValueErrors) and return (train, train_eval, val) datasets:
    train with random views, train_eval (the same files, test view) for the linear probe, val."""
    root = args.data
    if not os.path.isdir(root):
        raise ValueError(f"--data {root!r}: folder not found")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"--data {root!r} has no {split}/ folder (expected {split}/CLASS/IMAGE files)")
    train_classes = _class_folders(os.path.join(root, "train"))
    val_classes = _class_folders(os.path.join(root, "val"))
    if not train_classes:
        raise ValueError(f"--data: {os.path.join(root, 'train')} is empty (no class folders)")
    if train_classes != val_classes:
        only_t, only_v = sorted(set(train_classes) - set(val_classes)), sorted(set(val_classes) - set(train_classes))
        raise ValueError(f"--data: train/ and val/ class folders differ: only in train {only_t[:5]}, "
                         f"only in val {only_v[:5]} ({len(only_t)} and {len(only_v)} in all)")
    views = dict(crop=not (args.no_crop or args.no_aug), gray=not (args.no_gray or args.no_aug),
                 jitter=not (args.no_jitter or args.no_aug), flip=not (args.no_flip or args.no_aug))
    sets = []
    for split, tf in (("train", train_transform(args.image_size, crop_min_scale=args.crop_min_scale,
                                                 jitter_strength=args.jitter, **views)),
                      ("val", test_transform(args.image_size))):
        try:
            sets.append(IndexedImageFolder(os.path.join(root, split), transform=tf))
        except FileNotFoundError as err:  # a class folder without any image file
            raise ValueError(f"--data: {err}") from err
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
            raise ValueError(f"--data: unreadable image {found}")
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
                stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
                colour_a, colour_b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
                img = np.where(stripes[..., None] > 0, colour_a, colour_b) + 0.1 * rng.standard_normal((size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{split}_{c}_{j:03d}.png"))
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
        # .float(): under autocast the head runs in bf16/fp16; normalise and score in fp32 (z.M/tau
        # with tau = 0.07 spans e^{+-14}, beyond what fp16 can hold after exp).
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
        raise ValueError(f"--device {device_flag}: CUDA is not available here (use --device cpu)")
    if device_flag not in ("cpu", "cuda") and not device_flag.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device_flag!r}")
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


def any_rank(flags, device):
    """Element-wise OR of boolean flags over all ranks, so that every rank takes the same branch."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def padded_mask(first_local_position, count, rank, world_size, n):
    """Which of this rank's next `count` samples are DistributedSampler padding.

    DistributedSampler(drop_last=False) pads the shuffled index list to a multiple of world_size by
    repeating its first entries, then gives rank r the global positions r, r+W, r+2W, ...  Positions
    >= n are the repeats.  We still train on them (a valid view of a real image) but leave them out
    of the bank update, so every M[i] gets exactly one Eq. 7 update per epoch, as in one process."""
    local = first_local_position + torch.arange(count)
    return (rank + local * world_size) >= n


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
        loss = ball_loss(z, bank.vectors, idx, tau=args.tau, k_background=args.k_background,
                         neighbours_of=args.neighbours_of)
    elif algo == "ann":  # Definition 5.3
        extra = {} if args.k_close is None else {"k_close": args.k_close}
        loss = ann_loss(z, bank.vectors, idx, tau=args.tau, k_background=args.k_background,
                        neighbours_of=args.neighbours_of, **extra)
    else:  # Eq. 8
        loss = la_loss(z, bank.vectors, idx, cluster_labels, tau=args.tau, k_background=args.k_background,
                       neighbours_of=args.neighbours_of)
    return z, loss


def resolve_precision(flag, device):
    if device.type != "cuda":
        if flag in ("bf16", "fp16"):
            raise ValueError(f"--precision {flag} is for CUDA; on {device.type} use fp32 (or auto)")
        return "fp32"
    if flag == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return flag


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
        counts += torch.stack([(pred.cpu() == targets).sum().float(), torch.tensor(float(len(targets)))]).to(device)
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


def append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def view_name(cfg):
    """'all', 'none', or the lesioned augmentations, e.g. 'no crop' (Figure 2b's x-axis)."""
    if cfg.get("no_aug"):
        return "none"
    off = [k for k in ("crop", "gray", "jitter", "flip") if cfg.get(f"no_{k}")]
    return "all" if not off else "no " + "+".join(off)


def plot_logs(paths, out_path):
    """Figure-2-style charts from log.jsonl files: (a) algorithms, (b) view-set lesions (IR),
    (c) IR vs alpha, (d) knn_top1 learning curves.  Bars show knn_top1 (best epoch) and linear_top1
    side by side in different colours: they are different numbers and are labelled as such.
    Returns {panel title: [(x label, knn_top1, linear_top1 or nan)]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for path in paths:
        rows = read_log(path)
        cfg = next((r for r in rows if r.get("kind") == "config"), None)
        if cfg is None:
            raise ValueError(f"--plot: {path} has no config row; is it a log.jsonl of this script?")
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        lin = [r for r in rows if r.get("kind") == "linear"]
        runs.append(dict(cfg=cfg, epochs=epochs, knn=max((r["knn_top1"] for r in epochs), default=float("nan")),
                         linear=lin[-1]["linear_top1"] if lin else float("nan"), name=os.path.dirname(path) or path))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    panels = [
        ("(a) algorithm (all views)", lambda c: view_name(c) == "all", lambda c: c["algo"] +
         ("" if c["alpha"] == 0.5 else f" a={c['alpha']}")),
        ("(b) IR view set (lesions)", lambda c: c["algo"] == "ir", view_name),
        ("(c) IR memory update alpha", lambda c: c["algo"] == "ir" and view_name(c) == "all",
         lambda c: f"{c['alpha']:g}"),
    ]
    plotted = {}  # panel title -> [(x label, knn_top1, linear_top1)], returned for tests and scripts
    for ax, (title, keep, label) in zip(axes, panels):
        chosen = sorted((r for r in runs if keep(r["cfg"])), key=lambda r: label(r["cfg"]))
        plotted[title] = [(label(r["cfg"]), r["knn"], r["linear"]) for r in chosen]
        x = np.arange(len(chosen))
        ax.bar(x - 0.2, [100 * r["knn"] for r in chosen], 0.4, label="kNN top-1 (val, weighted k-NN)")
        ax.bar(x + 0.2, [100 * r["linear"] for r in chosen], 0.4, label="linear top-1 (val, frozen features)")
        ax.set_xticks(x, [label(r["cfg"]) for r in chosen], rotation=20)
        ax.set_title(title)
        ax.set_ylabel("top-1 accuracy (%)")
        if not chosen:
            ax.text(0.5, 0.5, "no runs of this kind", ha="center", transform=ax.transAxes)
    axes[0].legend(fontsize=8)
    for r in runs:
        axes[3].plot([e["epoch"] for e in r["epochs"]], [100 * e["knn_top1"] for e in r["epochs"]],
                     marker=".", label=f"{r['cfg']['algo']} {view_name(r['cfg'])} a={r['cfg']['alpha']:g}")
    axes[3].set(title="(d) kNN top-1 per epoch", xlabel="epoch", ylabel="kNN top-1 accuracy (%)")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return plotted


# -----------------------------------------------------------------------------
# --benchmark: the real training step on synthetic data (meant for one GPU).
# -----------------------------------------------------------------------------
def benchmark(args, device):
    """Time args.bench_steps steps of IR and of LA (batch --batch-size, --image-size images, bank of
    --bench-bank rows) and one k-means of --kmeans-k clusters over that bank.  Prints one JSON line
    per algorithm: images/s, peak GPU memory, k-means seconds."""
    precision = resolve_precision(args.precision, device)
    amp_ctx = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
               if precision != "fp32" else contextlib.nullcontext())
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed)
    model = ResNetEmbedding(args.dim).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    bank = MemoryBank(args.bench_bank, args.dim, device=device, seed=args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results, labels = [], None
    for algo in ("ir", "la"):
        kmeans_s = None
        if algo == "la":
            sync()
            t0 = time.time()
            labels = run_kmeans(bank.vectors, args.kmeans_k, num_clusterings=1, seed=args.seed, verbose=False)
            labels = labels.to(device)
            sync()
            kmeans_s = time.time() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = 5
        for step in range(warmup + args.bench_steps):
            if step == warmup:
                sync()
                t0 = time.time()
            idx = torch.randint(args.bench_bank, (args.batch_size,), device=device)
            z, loss = forward_loss(model, images, idx, algo, bank, labels, args, amp_ctx)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            bank.update(idx, z.detach(), args.alpha)
        sync()
        dt = time.time() - t0
        row = dict(algo=algo, device=str(device), precision=precision, image_size=args.image_size,
                   batch_size=args.batch_size, bank_rows=args.bench_bank, steps=args.bench_steps,
                   images_per_s=round(args.bench_steps * args.batch_size / dt, 1),
                   step_ms=round(1000 * dt / args.bench_steps, 2), loss=round(loss.item(), 4),
                   peak_gpu_mem_gib=(round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                     if device.type == "cuda" else None),
                   kmeans_clusters=args.kmeans_k if algo == "la" else None,
                   kmeans_s=None if kmeans_s is None else round(kmeans_s, 2))
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


# -----------------------------------------------------------------------------
# Demo (no arguments): the four algorithms for a few epochs on generated images.
# -----------------------------------------------------------------------------
def demo():
    """IR, BALL, ANN and LA for 6 CPU epochs each on 64 generated 32x32 images (about a minute)."""
    torch.set_num_threads(1)  # tiny images: one thread is as fast as several, and immune to busy cores
    epochs = 6
    with tempfile.TemporaryDirectory() as tmp:
        data = make_toy_imagefolder(os.path.join(tmp, "data"), num_classes=4, train_per_class=16, val_per_class=8)
        print(f"demo: 4 classes x 16 train / 8 val generated 32x32 images; {epochs} CPU epochs per algorithm\n")
        table = []
        for algo in ("ir", "ball", "ann", "la"):
            out = os.path.join(tmp, algo)
            extra = ["--la-warmup-epochs", "2", "--kmeans-k", "8", "--n-kmeans", "2"] if algo == "la" else []
            main(["--data", data, "--out-dir", out, "--algo", algo, "--device", "cpu", "--image-size", "32",
                  "--batch-size", "8", "--epochs", str(epochs), "--k-background", "32", "--knn-k", "10",
                  "--workers", "0", "--log-every", "1000", "--eval-linear"] + extra)
            rows = read_log(os.path.join(out, "log.jsonl"))
            ep = [r for r in rows if r.get("kind") == "epoch"]
            lin = [r for r in rows if r.get("kind") == "linear"][-1]
            table.append((algo, ep[0]["train_loss"], ep[-1]["train_loss"], max(r["knn_top1"] for r in ep),
                          lin["linear_top1"], sum(r["images_per_s"] for r in ep) / len(ep)))
        print(f"\nalgo | loss ep1 | loss ep{epochs} | best kNN top-1 (val) | linear top-1 (val) | images/s")
        for algo, l0, l1, knn, lin, ips in table:
            print(f"{algo:4s} | {l0:8.3f} | {l1:8.3f} | {100 * knn:19.1f}% | {100 * lin:17.1f}% | {ips:8.1f}")
        print("chance = 25% (4 classes, 32 val images).  LA's first 2 epochs are IR (its warm-up).  Losses of\n"
              "different algorithms are on different scales.  Toy data: this shows the pipeline, not Figure 2.")


# -----------------------------------------------------------------------------
# Training.
# -----------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser().parse_args(argv)
    if args.plot:
        return plot_logs(args.plot, args.plot_out)
    if args.data is None and not args.benchmark:
        raise ValueError("--data is required (an ImageFolder root with train/ and val/); "
                         "run with no arguments for a CPU demo on generated images")
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    master = rank == 0
    old_handlers = {}
    try:
        check_args(args, world)
        precision = resolve_precision(args.precision, device)
        if args.benchmark:
            return benchmark(args, device)
        amp_ctx = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                   if precision != "fp32" else contextlib.nullcontext())
        mem_fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        torch.backends.cudnn.benchmark = True

        # ---- data (all bad-input errors are raised here, before any training) ----
        train_set, train_eval_set, val_set = load_datasets(args, rank, world)
        n_train, num_classes = len(train_set), len(train_set.classes)
        check_sizes(args, n_train, world)
        local_batch = args.batch_size // world
        train_labels = torch.tensor(train_set.targets, device=device)  # for kNN evaluation ONLY
        sampler = _SkipFirst(DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                seed=args.seed, drop_last=False))
        # The loaders get their own generator (worker seeds) so that creating an iterator -- at a
        # mid-epoch resume, say -- does not consume the global RNG that the augmentations draw from.
        loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                         persistent_workers=args.workers > 0,
                         generator=torch.Generator().manual_seed(args.seed + rank))
        # drop_last=False: the last, smaller batch still updates its bank rows (every M[i] once per epoch)
        train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, drop_last=False, **loader_kw)
        # evaluation: rank r takes images r, r+W, ... -- no padding, so every val image counts exactly once
        val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=local_batch, **loader_kw)

        # ---- model, optimiser, LR plateau rule, bank ----
        torch.manual_seed(args.seed)  # identical initial model and bank on every rank
        raw_model = ResNetEmbedding(args.dim).to(device, memory_format=mem_fmt)
        optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        # App. D: "dropped twice by a factor of 10 once learning converged, defined as no improvement in
        # validation loss for 10 epochs".  The paper says validation LOSS; we follow the issue and the
        # IR/LA practice of watching val knn_top1 (mode="max").  Third plateau = stop.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_factor,
                                                               patience=args.patience, threshold=0.0,
                                                               threshold_mode="abs")
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        bank = MemoryBank(n_train, args.dim, device=device, seed=args.seed)
        cluster_labels = None  # LA: [n_kmeans, N] cluster id of every bank row, from this epoch's k-means
        update_counts = torch.zeros(n_train, dtype=torch.long, device=device) if args.debug_bank_dump else None
        epoch, batch_in_epoch, global_step, best_knn, lr_drops, finished = 0, 0, 0, -1.0, 0, False
        warmup = 0 if args.algo != "la" or args.init_from else (10 if args.la_warmup_epochs is None
                                                                  else args.la_warmup_epochs)
        os.makedirs(args.out_dir, exist_ok=True)
        ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
        rng_states = None
        if args.resume:
            if not os.path.exists(ckpt_path):
                raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
            ckpt = torch.load(ckpt_path, map_location=device)
            if ckpt["num_train"] != n_train or ckpt["args"]["algo"] != args.algo:
                raise ValueError(f"--resume: {ckpt_path} was trained with --algo {ckpt['args']['algo']} on "
                                 f"{ckpt['num_train']} images; now --algo {args.algo} on {n_train}")
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            bank.load_state_dict(ckpt["bank"])
            if ckpt["cluster_labels"] is not None:
                cluster_labels = ckpt["cluster_labels"].to(device)
            epoch, batch_in_epoch, global_step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
            best_knn, lr_drops = ckpt["best_knn_top1"], ckpt["lr_drops"]
            finished, warmup = ckpt["finished"], ckpt["warmup"]
            if batch_in_epoch and ckpt["world_size"] != world:
                raise ValueError(f"--resume: {ckpt_path} was saved mid-epoch by {ckpt['world_size']} processes; "
                                 f"the sampler's split depends on it, so resume with {ckpt['world_size']}, not {world}")
            rng_states = ckpt["rng_states"] if len(ckpt["rng_states"]) == world else None
            if master:
                print(f"resumed {ckpt_path}: epoch {epoch} batch {batch_in_epoch} step {global_step} "
                      f"best knn_top1 {best_knn:.4f}", flush=True)
        elif os.path.exists(ckpt_path):
            raise ValueError(f"--out-dir {args.out_dir} already holds ckpt.pt: pass --resume to continue it, "
                             "or choose another --out-dir")
        if args.init_from:
            ckpt = torch.load(args.init_from, map_location=device)
            if ckpt["args"]["algo"] != "ir" or ckpt["num_train"] != n_train:
                raise ValueError(f"--init-from {args.init_from}: need an IR checkpoint of these {n_train} "
                                 f"images, got --algo {ckpt['args']['algo']} on {ckpt['num_train']}")
            raw_model.load_state_dict(ckpt["model"])  # App. D: "initialize ResNet and the memory bank
            bank.load_state_dict(ckpt["bank"])        #  using 10 epochs of IR"
        # Different augmentation randomness per rank; on resume, each rank's exact generator state.
        torch.manual_seed(args.seed + 1 + rank)
        if rng_states is not None:
            torch.set_rng_state(rng_states[rank].cpu())
        model = DDP(raw_model, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else raw_model
        if master and not args.resume:
            append_log(log_path, dict(vars(args), kind="config", world_size=world, num_train=n_train,
                                      num_val=len(val_set), num_classes=num_classes, precision=precision,
                                      la_warmup_epochs=warmup))

        # ---- SIGTERM / SIGINT: finish the current step, save, exit 0.  A second signal acts normally. ----
        stop = {"signal": None}

        def request_stop(signum, _frame):
            stop["signal"] = signal.Signals(signum).name
            signal.signal(signum, old_handlers[signum])

        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for s in (signal.SIGTERM, signal.SIGINT):
                old_handlers[s] = signal.signal(s, request_stop)

        def checkpoint(epoch_now, batch_now):
            gathered = [None] * world  # every rank's augmentation RNG, so a resume replays the same views
            if ddp:
                dist.all_gather_object(gathered, torch.get_rng_state())
            else:
                gathered = [torch.get_rng_state()]
            if master:
                save_checkpoint(dict(
                    model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), bank=bank.state_dict(),
                    cluster_labels=None if cluster_labels is None else cluster_labels.cpu(),
                    epoch=epoch_now, batch_in_epoch=batch_now, step=global_step, best_knn_top1=best_knn,
                    lr_drops=lr_drops, finished=finished, warmup=warmup, rng_states=gathered,
                    num_train=n_train, classes=train_set.classes, world_size=world, args=vars(args)), ckpt_path)

        # ---- the loop -------------------------------------------------------------------------------
        # Order, identical on every rank (all ranks hold the same bank, so they take the same decisions):
        #   epoch start (LA only, after warm-up): k-means on the bank as it stands (rank 0), labels
        #       broadcast; C_i for the whole epoch comes from these labels.
        #   each step: (1) z = E(v(x_i, a)) for the local batch; (2) loss against the bank BEFORE this
        #       step's update, so M[i] holds views of earlier epochs, not the current one; (3) one flag
        #       exchange (non-finite loss? stop signal?); (4) backward + SGD step (DDP averages grads);
        #       (5) bank.update: Eq. 7 with z.detach(), all-gathered inside MemoryBank so every rank
        #       applies the same rows in the same order.
        #   epoch end: knn_top1 on val against the bank, LR plateau rule, log, checkpoint.
        while not finished and epoch < args.epochs:
            phase = "ir" if epoch < warmup else args.algo  # LA's own IR warm-up (App. D)
            if phase == "la" and (cluster_labels is None or batch_in_epoch == 0):
                # Eq. 8's close set C_i = rows sharing a cluster with i in any of n_kmeans clusterings.
                t0 = time.time()
                if master:
                    cluster_labels = run_kmeans(bank.vectors, args.kmeans_k, args.n_kmeans,
                                                seed=args.seed + 1000 * epoch, verbose=True)
                    cluster_labels = cluster_labels.to(device=device, dtype=torch.long)  # la_loss: bank's device
                else:
                    cluster_labels = torch.empty(args.n_kmeans, n_train, dtype=torch.long, device=device)
                if ddp:
                    dist.broadcast(cluster_labels, src=0)
                if master:
                    print(f"epoch {epoch + 1}: {args.n_kmeans} k-means of {args.kmeans_k} clusters "
                          f"in {time.time() - t0:.1f}s", flush=True)
            sampler.sampler.set_epoch(epoch)
            sampler.skip = batch_in_epoch * local_batch
            steps_in_epoch = math.ceil(len(sampler.sampler) / local_batch)
            loss_sum, loss_count = torch.zeros((), device=device), 0
            t_epoch = t_last = time.time()
            seen_since_log, images_seen, first_batch = 0, 0, batch_in_epoch
            for b, (images, _, idx) in enumerate(train_loader, start=batch_in_epoch):  # class labels unused
                images = images.to(device, non_blocking=True, memory_format=mem_fmt)
                idx_dev = idx.to(device, non_blocking=True)
                z, loss = forward_loss(model, images, idx_dev, phase, bank, cluster_labels, args, amp_ctx)
                if args.debug_nan_step is not None and global_step + 1 == args.debug_nan_step:
                    loss = loss * float("nan")
                # One host sync per step (loss.item()): the price of every rank stopping at the same step.
                nonfinite, stopping = any_rank([not math.isfinite(loss.item()), stop["signal"] is not None], device)
                if nonfinite:
                    raise FloatingPointError(f"non-finite loss at step {global_step + 1} (epoch {epoch + 1}, "
                                             f"batch {b + 1}/{steps_in_epoch}); nothing saved: the last good "
                                             f"checkpoint {ckpt_path} is left as it was")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                keep = ~padded_mask(b * local_batch, len(idx), rank, world, n_train).to(device)
                bank.update(idx_dev[keep], z.detach()[keep], args.alpha)  # Eq. 7, then re-normalise
                if update_counts is not None:  # test hook: Eq. 7 updates per row, summed over ranks
                    written = all_gather_rows(idx_dev[keep])
                    update_counts.index_add_(0, written, torch.ones_like(written))
                global_step += 1
                loss_sum += loss.detach()
                loss_count += 1
                seen_since_log += len(idx)
                images_seen += len(idx)
                if master and ((b + 1) % args.log_every == 0 or b + 1 == steps_in_epoch):
                    now = time.time()
                    per_step = (now - t_epoch) / (b + 1 - first_batch)
                    print(f"epoch {epoch + 1} step {b + 1}/{steps_in_epoch} (global {global_step}) | {phase} loss "
                          f"{loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                          f"{seen_since_log * world / (now - t_last):.1f} img/s | epoch left "
                          f"{per_step * (steps_in_epoch - b - 1):.0f}s", flush=True)
                    t_last, seen_since_log = now, 0
                if stopping:
                    batch_in_epoch = b + 1
                    checkpoint(epoch, batch_in_epoch)
                    if master:
                        print(f"stopped by {stop['signal'] or 'a signal on another rank'} after step {global_step}"
                              f" (epoch {epoch + 1}, batch {batch_in_epoch}/{steps_in_epoch}); saved {ckpt_path}; "
                              "continue with --resume", flush=True)
                    return None
            train_s = time.time() - t_epoch
            totals = torch.stack([loss_sum, torch.tensor(float(images_seen), device=device)])
            if ddp:
                dist.all_reduce(totals)
                for buf in raw_model.buffers():  # BN running stats: evaluate (and save) rank 0's
                    dist.broadcast(buf, src=0)
            mean_loss = totals[0].item() / max(1, loss_count * world)  # every rank ran loss_count steps
            images_per_s = totals[1].item() / max(train_s, 1e-9)  # all ranks together, training only
            knn = knn_top1(raw_model, val_loader, bank.vectors, train_labels, num_classes, args.knn_k,
                           args.knn_tau, device, amp_ctx)
            lr_used = optimizer.param_groups[0]["lr"]
            if epoch >= warmup:  # the LR rule starts with the algorithm itself, not during LA's warm-up
                scheduler.step(knn)
                if optimizer.param_groups[0]["lr"] < lr_used:
                    lr_drops += 1
                    finished = lr_drops > args.lr_drops  # App. D: two drops, then stop at the next plateau
            best_knn = max(best_knn, knn)
            epoch, batch_in_epoch = epoch + 1, 0
            if master:
                append_log(log_path, dict(kind="epoch", epoch=epoch, step=global_step, algo=phase,
                                          train_loss=mean_loss, lr=lr_used, knn_top1=knn, best_knn_top1=best_knn,
                                          images_per_s=images_per_s, epoch_s=time.time() - t_epoch))
                print(f"epoch {epoch} done | {phase} train loss {mean_loss:.4f} | val knn_top1 {100 * knn:.2f}% "
                      f"(best {100 * best_knn:.2f}%) | {images_per_s:.1f} img/s"
                      + (" | learning converged: stopping (App. D)" if finished else ""), flush=True)
            checkpoint(epoch, 0)
            if any_rank([stop["signal"] is not None], device)[0]:
                if master:
                    print(f"stopped by {stop['signal']} after epoch {epoch}; saved {ckpt_path}; continue with "
                          "--resume", flush=True)
                return None

        if finished and master:
            print(f"training has finished: the val knn_top1 plateaued after {args.lr_drops} LR drops (App. D); "
                  f"best knn_top1 {100 * best_knn:.2f}%", flush=True)

        # ---- after training ----
        if args.eval_linear:
            if ddp:
                for buf in raw_model.buffers():
                    dist.broadcast(buf, src=0)
            use_pool = args.linear_features == "pool"
            tr = DataLoader(Subset(train_eval_set, range(rank, n_train, world)), batch_size=local_batch, **loader_kw)
            train_x, train_y = extract(raw_model, tr, use_pool, device, amp_ctx)
            val_x, val_y = extract(raw_model, val_loader, use_pool, device, amp_ctx)
            if master:
                top1, top5 = linear_probe(train_x, train_y, val_x, val_y, num_classes, args.linear_epochs,
                                          args.linear_lr, seed=args.seed)
                append_log(log_path, dict(kind="linear", epoch=epoch, features=args.linear_features,
                                          linear_top1=top1, linear_top5=top5))
                print(f"linear probe on frozen {args.linear_features} features: linear_top1 {100 * top1:.2f}% "
                      f"linear_top5 {100 * top5:.2f}% (val)", flush=True)
        if args.debug_bank_dump:
            os.makedirs(args.debug_bank_dump, exist_ok=True)
            torch.save(dict(vectors=bank.vectors.cpu(), update_counts=update_counts.cpu()),
                       os.path.join(args.debug_bank_dump, f"bank_rank{rank}.pt"))
        return None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
