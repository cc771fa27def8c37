"""Train IR, BALL, ANN or LA on an ImageFolder (ImageNet) and measure it the way Figure 2 does.

Paper: Wu, Zhuang, Yamins, Goodman (2020), "On the Importance of Views in Unsupervised
Representation Learning", Section 5.3, Figure 2 and Appendix D.  Figure 2 compares (a) IR, BALL,
ANN and LA, all continued from 10 epochs of IR, (b) IR with its view set cut down, (c) IR with other
bank update rates alpha (Eq. 7).  Each setting is a flag; Appendix D's values are the defaults.

    python imagenet_train.py --data $D --epochs 10 --out-dir runs/ir_init           # shared start
    cp -r runs/ir_init runs/ir && python imagenet_train.py --data $D --resume --out-dir runs/ir
    python imagenet_train.py --data $D --algo la --init-from runs/ir_init/ckpt.pt --out-dir runs/la
    python imagenet_train.py --data $D --no-gray --no-jitter --no-flip --out-dir runs/crop   # 2b
    python imagenet_train.py --data $D --alpha 0.9 --out-dir runs/m0.9                       # 2c
    python tests/plot_figure2.py runs/*/log.jsonl --paper --out fig2.png       # the figure
    torchrun --nproc_per_node 8 imagenet_train.py ...    # or srun: see setup_distributed
    python imagenet_train.py                             # the demo: each algorithm, CPU, ~30 s

SIGTERM or Ctrl-C saves OUT_DIR/ckpt.pt after the current step; --resume continues it exactly.
Two accuracies, never confused: knn_top1 (every epoch: weighted 200-NN of Wu et al. 2018 on val/
against the bank; drives the LR rule) and linear_top1/5 (--eval-linear: a linear probe on frozen
features, Figure 2's "transfer task").  Class labels serve only these two.  A mistake in the
flags or the data is a UserError: one line `imagenet_train.py: error: ...`, exit status 2.
"""

import argparse
import copy
import datetime
import gzip
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

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
from local_agg import la_loss, run_kmeans, warn_if_kmeans_on_cpu
from memory_bank import MemoryBank

# -----------------------------------------------------------------------------
# Settings.  Appendix D's values are the defaults: (flag, type | choices | bool, default, allowed
# range, help).  The data-sized ones (APP_D_DATA_SIZED), left unset, take min(App. D, what fits).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN_STD = (IMAGENET_MEAN, IMAGENET_STD)
IMAGENET_TRAIN_SIZE = 1_281_167  # bank rows for ImageNet-1k's train split
SPLITS, AUGMENTATIONS = ("train", "val"), ("crop", "gray", "jitter", "flip")
APP_D_DATA_SIZED = {"batch_size": 256, "k_background": 4096, "kmeans_k": 30000, "knn_k": 200}
# fmt: off
SETTINGS = [
    ("--data", str, None, None, "ImageFolder root: train/CLASS/*.jpg and val/CLASS/*.jpg "
     "(--dataset fashion-mnist: default /usr/share/datasets/fashion-mnist)"),
    ("--dataset", ("imagefolder", "fashion-mnist"), "imagefolder", None, "--data: an ImageFolder, "
     "or Fashion-MNIST's .gz files (dataset-fashion-mnist) or torchvision's FashionMNIST/raw/"),
    ("--train-subset", int, None, ">= 1", "train on N images, N / classes of each (drawn with "
     "seed 0, the same for every --seed): Fig. 2 in miniature on a CPU (default: all)"),
    ("--val-subset", int, None, ">= 1", "evaluate on N val images, class-balanced (default: all)"),
    ("--out-dir", str, "runs/default", None, "where ckpt.pt and log.jsonl go (rank 0 writes)"),
    ("--algo", ("ir", "ball", "ann", "la"), "ir", None, "ir: Eq. 6, the whole bank; ball: Def. "
     "5.2 (negatives: background set B_i); ann: Def. 5.3 (B_i minus close set C_i); la: Eq. 8"),
    ("--tau", float, 0.07, "> 0", "temperature tau of Eq. 6 (App. D)"),
    ("--alpha", float, 0.5, "[0, 1)", "bank update rate alpha of Eq. 7 (App. D's t, Fig. 2c's m)"),
    ("--dim", int, 128, ">= 1", "representation dimension d: ResNet-18 'classes' (App. D)"),
    ("--k-background", int, None, ">= 1", "|B_i| of BALL/ANN/LA (default: App. D's 4096, or N)"),
    ("--k-close", int, None, ">= 0", "ANN: |C_i| (default: ann_loss's k_background // 10)"),
    ("--neighbours-of", ("z", "bank"), "z", None, "B_i: bank rows nearest to z (LA code) or M[i]"),
    ("--kmeans-k", int, None, ">= 1", "LA: clusters per k-means (default: App. D's 30000, or N)"),
    ("--n-kmeans", int, 10, ">= 1", "LA: k-means runs H; C_i = union of i's clusters (App. D)"),
    ("--init-from", str, None, None, "BALL/ANN/LA: start from this IR checkpoint (Fig. 2a)"),
    ("--la-warmup-epochs", int, None, ">= 0", "LA, no --init-from: IR epochs first (default 10)"),
    ("--lr", float, 0.03, "> 0", "SGD learning rate (App. D)"),
    ("--momentum", float, 0.9, "[0, 1)", "SGD momentum (App. D)"),
    ("--weight-decay", float, 1e-4, ">= 0", "SGD weight decay (App. D)"),
    ("--batch-size", int, None, ">= 1", "GLOBAL batch (default: App. D's 256, or N)"),
    ("--patience", int, 10, ">= 1", "epochs without better val knn_top1 before an LR drop"),
    ("--lr-factor", float, 0.1, "(0, 1)", "LR multiplier at each drop (App. D: 10x)"),
    ("--lr-drops", int, 2, ">= 0", "LR drops before the next plateau ends training (App. D)"),
    ("--epochs", int, 200, ">= 1", "hard cap on epochs (the plateau rule usually stops first)"),
    ("--image-size", int, 224, ">= 32", "training crop side (App. D); test: resize x256/224, crop"),
    ("--crop-min-scale", float, 0.2, "(0, 1]", "smallest area fraction of RandomResizedCrop"),
    ("--jitter", float, 0.4, ">= 0", "ColorJitter strength (App. D: 0.4)"),
    ("--no-crop", bool, False, None, "Fig. 2b lesion: no random resized crop"),
    ("--no-gray", bool, False, None, "Fig. 2b lesion: no random grayscale"),
    ("--no-jitter", bool, False, None, "Fig. 2b lesion: no color jitter"),
    ("--no-flip", bool, False, None, "Fig. 2b lesion: no horizontal flip"),
    ("--no-aug", bool, False, None, "Fig. 2b: no augmentation at all (one view per image)"),
    ("--stem", ("imagenet", "small"), "imagenet", None, "ResNet-18 stem: ImageNet's 7x7/2 conv and "
     "max-pool, or small: a 3x3/1 conv, no max-pool (CIFAR's, for 32-64 px images)"),
    ("--knn-k", int, None, ">= 1", "kNN neighbours (default: Wu et al.'s 200, or N)"),
    ("--knn-tau", float, 0.07, "> 0", "kNN vote weight exp(cos/knn_tau)"),
    ("--eval-linear", bool, False, None, "after training, a linear probe on frozen features"),
    ("--linear-features", ("pool", "embedding"), "pool", None, "probe input: 512-d pool, 128-d z"),
    ("--linear-epochs", int, 30, ">= 1", "epochs of the linear probe"),
    ("--linear-lr", float, 0.1, "> 0", "linear probe SGD learning rate (cosine decay)"),
    ("--device", str, "auto", None, "auto | cpu | cuda (each torchrun rank takes cuda:LOCAL_RANK)"),
    ("--precision", ("auto", "bf16", "fp16", "fp32"), "auto", None, "CUDA autocast: auto = bf16, "
     "else fp16 (+GradScaler); fp32 on the CPU; the losses are fp32 always"),
    ("--workers", int, 8, ">= 0", "DataLoader processes per rank"),
    ("--threads", int, 1, ">= 1", "torch CPU threads per process (1: fastest on busy cores)"),
    ("--seed", int, 0, None, "seed of model, bank, sampler, views and k-means"),
    ("--resume", bool, False, None, "continue OUT_DIR/ckpt.pt exactly"),
    ("--log-every", int, 50, ">= 1", "steps between progress lines (each waits for the device)"),
    ("--no-image-check", bool, False, None, "skip opening every image header before training"),
    ("--deterministic", bool, False, None, "deterministic kernels, no cudnn.benchmark (on CUDA "
     "also export CUBLAS_WORKSPACE_CONFIG=:4096:8)"),
    ("--timeout-min", float, 30.0, "> 0", "minutes a rank waits in a collective before failing"),
]
# fmt: on

# -----------------------------------------------------------------------------
# The losses.  fn(z, bank, idx[, cluster_labels], tau=, **extra) is the loss to minimise; `extra`
# names the flags passed on when set; `kmeans`: needs Eq. 8's cluster labels, new every epoch.
# Adding a loss: a row here and its flags in SETTINGS.
Loss = namedtuple("Loss", "fn extra kmeans")
LOSSES = {
    "ir": Loss(ir_loss, (), False),  # Eq. 6 over all N bank rows
    "ball": Loss(ball_loss, ("k_background", "neighbours_of"), False),  # Definition 5.2
    "ann": Loss(ann_loss, ("k_background", "neighbours_of", "k_close"), False),  # Definition 5.3
    "la": Loss(la_loss, ("k_background", "neighbours_of"), True),  # Eq. 8
}


class UserError(ValueError):
    """A mistake in the flags or the data: one line and exit status 2 on the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"{message} (see --help)")


def build_parser():
    p = _Parser(description="IR, BALL, ANN, LA (Section 5.3, Fig. 2, App. D); no arguments: a demo")
    for flag, kind, default, _, text in SETTINGS:
        text += "" if default is None else f" (default: {default})"
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            typed = dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
            p.add_argument(flag, default=default, help=text, **typed)
    return p


def in_range(value, allowed):
    """value against '> 0', '>= 1', '[0, 1)', '(0, 1]', ...: the form the error message prints."""
    if allowed[0] in "[(":
        lo, hi = (float(x) for x in allowed[1:-1].split(","))
        above = lo <= value if allowed[0] == "[" else lo < value
        return above and (value <= hi if allowed[-1] == "]" else value < hi)
    op, bound = allowed.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_args(args, world, n_train=None):
    """Impossible or contradictory flags, before anything is built; given n_train (the bank rows),
    typed values that do not fit the data (unset ones were fitted by fit_defaults_to_data)."""
    for flag, _, _, allowed, _ in SETTINGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if allowed and value is not None and not in_range(value, allowed):
            raise UserError(f"{flag} must be {'in ' * (allowed[0] in '[(')}{allowed}, got {value}")
    a, loss, n = args, LOSSES[args.algo], f"N = {n_train} train images"
    sized = n_train is not None
    # fmt: off
    rules = [
        (a.batch_size is None or a.batch_size % world == 0, f"--batch-size {a.batch_size} is the "
         f"global batch and must be divisible by the world size {world}"),
        (a.k_close is None or a.k_background is None or a.k_close < a.k_background,
         f"--k-close must be in [0, --k-background={a.k_background}), got {a.k_close}"),
        (a.k_close is None or "k_close" in loss.extra, "--k-close only applies to --algo ann"),
        (a.la_warmup_epochs is None or loss.kmeans, "--la-warmup-epochs only applies to --algo la"),
        (a.init_from is None or a.algo != "ir", "--init-from starts BALL, ANN or LA from an IR "
         "checkpoint; it does not apply to --algo ir (continue an IR run with --resume)"),
        (not (a.init_from and a.resume), "--init-from and --resume exclude each other"),
        (not (a.init_from and a.la_warmup_epochs), "--init-from replaces the IR warm-up; do not "
         "also pass --la-warmup-epochs > 0"),
        (not sized or n_train >= world, f"--data: {n_train} train images cannot be split over "
         f"{world} processes"),
        (not sized or a.batch_size <= n_train, f"--batch-size {a.batch_size} is larger than the "
         f"train set ({n_train} images)"),
        (not sized or "k_background" not in loss.extra or a.k_background <= n_train,
         f"--k-background {a.k_background} must be <= {n}"),
        (not sized or not loss.kmeans or a.kmeans_k <= n_train,
         f"--kmeans-k {a.kmeans_k} must be <= {n}"),
        (not sized or a.knn_k <= n_train, f"--knn-k {a.knn_k} must be <= {n}"),
        # BatchNorm cannot normalise one value per channel: a last batch of ONE image with a 1x1
        # conv5 map (below 64 px) would crash at the end of epoch 1.
        (not sized or a.image_size >= 64 or -(-n_train // world) % (a.batch_size // world) != 1,
         f"--batch-size {a.batch_size}: each rank's last batch would hold one image, which "
         f"BatchNorm rejects at --image-size {a.image_size} < 64; pick another batch size"),
    ]
    # fmt: on
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def largest_fitting_batch(n_train, world, image_size, cap):
    """The largest global batch <= cap that the data allows: <= N, divisible by the world size,
    and (below 64 px) never leaving a rank a last batch of one image (see check_args)."""
    for batch in range(min(cap, n_train) // world * world, 0, -world):
        if image_size >= 64 or math.ceil(n_train / world) % (batch // world) != 1:
            return batch
    return world


def fit_defaults_to_data(args, n_train, world):
    """Give each unset data-sized flag its App. D value, lowered to fit N train images; return the
    line saying which of those --algo uses were lowered (None if none)."""
    loss, cap = LOSSES[args.algo], APP_D_DATA_SIZED["batch_size"]
    largest = {"batch_size": largest_fitting_batch(n_train, world, args.image_size, cap)}
    used = {"batch_size", "knn_k", *loss.extra} | ({"kmeans_k"} if loss.kmeans else set())
    lowered = []
    for name, app_d in APP_D_DATA_SIZED.items():
        if getattr(args, name) is None:
            setattr(args, name, min(app_d, largest.get(name, n_train)))
            if getattr(args, name) < app_d and name in used:
                flag = "--" + name.replace("_", "-")
                lowered.append(f"{flag} {getattr(args, name)} (App. D: {app_d})")
    if loss.kmeans and args.kmeans_k == n_train and any(s[2:8] == "kmeans" for s in lowered):
        lowered.append("so every image is its own cluster and LA trains as BALL (Thm. 5.4)")
    text = f"defaults lowered to fit the {n_train} train images (pass a flag to choose): "
    return text + ", ".join(lowered) if lowered else None


# -----------------------------------------------------------------------------
# Data: the views v(x, a) and the loaders.  Workers send uint8; the device normalises.
def train_transform(image_size, crop=True, gray=True, jitter=True, flip=True,
                    crop_min_scale=0.2, jitter_strength=0.4):  # fmt: skip
    """The view set of IR and LA (Section 5.3, App. D): random resized crop, random grayscale
    (p=0.2), color jitter, horizontal flip; each flag off is a lesion of Figure 2b, all off leaves
    one view (resize, center crop).  PIL image -> uint8 tensor [3, H, W]."""
    s, fixed = jitter_strength, [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    ops = [transforms.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0))] if crop else fixed
    ops += [transforms.RandomGrayscale(p=0.2)] if gray else []
    ops += [transforms.ColorJitter(s, s, s, min(s, 0.5))] if jitter else []  # hue <= 0.5
    ops += [transforms.RandomHorizontalFlip()] if flip else []
    return transforms.Compose(ops + [transforms.PILToTensor()])


def test_transform(image_size):
    """App. D: resize the shorter side to 256, center crop 224 (scaled by image_size / 224)."""
    resize = transforms.Resize(round(image_size * 256 / 224))
    return transforms.Compose([resize, transforms.CenterCrop(image_size), transforms.PILToTensor()])


def to_device_input(images, device, mem_fmt=torch.contiguous_format):
    """uint8 [B, 3, H, W] from the loader -> the network's input, ImageNet-normalised float on
    `device`: a quarter of float32's bytes cross from the workers, and the device normalises."""
    if device not in _MEAN_STD:  # once per device: a host-to-device copy waits for the device
        _MEAN_STD[device] = [torch.tensor(v, device=device)[:, None, None] * 255 for v in MEAN_STD]
    mean, std = _MEAN_STD[device]
    x = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=mem_fmt)


_MEAN_STD = {}


class Views:
    """A dataset's item for key i or (epoch, i): (view, target, i), i being the row M[i] of Eq. 6-7.
    For (epoch, i) the view's randomness comes from (view_seed, epoch, i) alone, so a resumed run
    sees the same views with any number of workers."""

    view_seed = 0

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        image, target = self.image(index)
        if epoch is None:
            return self.transform(image), target, index
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's RNG
            torch.manual_seed(hash((self.view_seed, epoch, index)))  # int hashes: same everywhere
            return self.transform(image), target, index


class IndexedImageFolder(Views, ImageFolder):
    """ImageFolder sorts its files: every rank and restart numbers the images alike."""

    def image(self, index):
        path, target = self.samples[index]
        return open_image(path), target


class IndexedFashionMNIST(Views, torchvision.datasets.FashionMNIST):
    """Fashion-MNIST through torchvision, which reads ROOT/FashionMNIST/raw/ (uncompressed IDX)."""

    raw_folder = property(lambda self: os.path.join(self.root, "FashionMNIST", "raw"))

    def image(self, index):  # 28x28 grayscale as RGB: the views and the network take 3 channels
        return Image.fromarray(self.data[index].numpy()).convert("RGB"), int(self.targets[index])


def fashion_mnist_root(data):
    """torchvision's root for --data: the folder itself if it holds FashionMNIST/raw/ (torchvision's
    download=True made it), else a cache to which the four .gz files there (the Debian package
    dataset-fashion-mnist, in /usr/share/datasets/fashion-mnist) are decompressed once."""
    if os.path.isdir(os.path.join(data, "FashionMNIST", "raw")):
        return data
    parts = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    names = [f"{p}-ubyte" for p in parts]
    if not all(os.path.isfile(os.path.join(data, n + ".gz")) for n in names):
        apt = "apt-get install dataset-fashion-mnist (--data /usr/share/datasets/fashion-mnist)"
        tv = "torchvision.datasets.FashionMNIST(ROOT, download=True) (--data ROOT)"
        raise UserError(f"--data {data!r}: no Fashion-MNIST files ({names[0]}.gz and three more); "
                        f"get them with {apt} or {tv}")  # fmt: skip
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    root = os.path.join(cache, "imagenet_train", os.path.abspath(data).strip("/").replace("/", "_"))
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in names:
        if not os.path.isfile(os.path.join(raw, name)):  # write beside, then rename: ranks may race
            tmp = os.path.join(raw, f"{name}.{os.getpid()}")
            with gzip.open(os.path.join(data, name + ".gz")) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, os.path.join(raw, name))
    return root


class EpochSampler(DistributedSampler):
    """This rank's share of an epoch as (epoch, i) keys, less its first `skip` (resume)."""

    skip = 0

    def __iter__(self):
        return ((self.epoch, i) for i in list(super().__iter__())[self.skip :])


def ignore_stop_signals(_worker_id):
    """DataLoader workers ignore SIGTERM and SIGINT: SLURM, torchrun and Ctrl-C signal the whole
    process group, and the main process alone decides how to stop (it saves, then ends them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_datasets(args):
    """Check --data (UserErrors naming the path) and return (train, train_eval, val): train with
    random views, train_eval (the same images, test view) for the linear probe, val."""
    keep = {k: not (getattr(args, f"no_{k}") or args.no_aug) for k in AUGMENTATIONS}
    views = train_transform(args.image_size, **keep, crop_min_scale=args.crop_min_scale,
                            jitter_strength=args.jitter)  # fmt: skip
    test = test_transform(args.image_size)
    if args.dataset == "fashion-mnist":
        root = fashion_mnist_root(args.data)
        train, val = (IndexedFashionMNIST(root, t, tf) for t, tf in ((True, views), (False, test)))
    else:
        train, val = image_folders(args.data, views, test)
    g = torch.Generator().manual_seed(0)  # train first, then val: one split for every --seed
    for dataset, n, flag in ((train, args.train_subset, "--train-subset"),
                             (val, args.val_subset, "--val-subset")):  # fmt: skip
        if n is not None:
            keep_rows(dataset, balanced_subset(dataset.targets, n, len(dataset.classes), g, flag))
    train.view_seed, train_eval = args.seed, copy.copy(train)  # same file list, no second scan
    train_eval.transform = val.transform
    return train, train_eval, val


def balanced_subset(labels, n, num_classes, generator, flag="n"):
    """n indices, n / num_classes of each class, drawn without replacement; sorted."""
    labels, per = torch.as_tensor(labels), n // num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    if n % num_classes or per > counts.min():
        raise UserError(f"{flag} must be a multiple of the {num_classes} classes and at most "
                        f"{num_classes * counts.min().item()}, got {n}")  # fmt: skip
    rows = [(labels == c).nonzero().flatten() for c in range(num_classes)]
    picks = [r[torch.randperm(len(r), generator=generator)[:per]] for r in rows]
    return torch.cat(picks).sort().values


def keep_rows(dataset, keep):
    """Keep only the rows `keep` of a FashionMNIST or ImageFolder dataset (renumbered 0..n-1)."""
    if hasattr(dataset, "samples"):
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in keep]
        dataset.targets = [t for _, t in dataset.samples]
    else:
        dataset.data, dataset.targets = dataset.data[keep], dataset.targets[keep]


def image_folders(root, views, test):
    """train/ and val/ of an ImageFolder root; a UserError names what is missing or differs."""
    if not os.path.isdir(root):
        raise UserError(f"--data {root!r}: folder not found")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"--data {root!r} has no {split}/ folder (expected {split}/CLASS/*)")
    t, v = (sorted(e.name for e in os.scandir(os.path.join(root, s)) if e.is_dir()) for s in SPLITS)
    if not t:
        raise UserError(f"--data: {os.path.join(root, 'train')} is empty (no class folders)")
    if t != v:
        only_t, only_v = sorted(set(t) - set(v)), sorted(set(v) - set(t))
        differ = f"only in train {only_t[:5]}, only in val {only_v[:5]}"
        raise UserError(f"--data: train/ and val/ class folders differ: {differ}")
    try:
        train = IndexedImageFolder(os.path.join(root, "train"), transform=views)
        val = IndexedImageFolder(os.path.join(root, "val"), transform=test)
    except FileNotFoundError as err:  # a class folder without any image file
        raise UserError(f"--data: {err}") from err
    return train, val


def open_image(path, decode=True):
    """An RGB image, or with decode=False a check of its header only: a UserError names a file
    that PIL cannot open (set_up checks every header before training) or decode."""
    try:
        image = Image.open(path)
        return image.convert("RGB") if decode else image.close()
    except Exception as err:
        raise UserError(f"--data: unreadable image {path} ({type(err).__name__}: {err})") from err


# -----------------------------------------------------------------------------
# Model: ResNet-18 "with 128 classes" (App. D), output L2-normalised.
class ResNetEmbedding(nn.Module):
    """E(v(x, a)) of Eq. 6: torchvision's ResNet-18 from scratch with `dim` outputs, L2-normalised.
    Not optional: bank rows are unit vectors and exp(z.M/tau) needs cosines; an unnormalised model
    trains but its kNN never improves (MemoryBank.update refuses non-unit z on the CPU)."""

    def __init__(self, dim=128, stem="imagenet"):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=dim)
        if stem == "small":  # 3x3 stride-1 conv, no max-pool: a 32-px image is 32x32 in layer1
            self.net.conv1, self.net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()

    def features(self, x):
        """512-d globally pooled conv5 features, the linear probe's input."""
        n = self.net
        x = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        # fp32 z even under autocast: a row normalised in bf16 is only within ~4e-3 of unit norm,
        # and Eq. 7 writes z into the fp32 bank.  (A cast of a [B, 128] tensor: free.)
        return F.normalize(self.net.fc(self.features(x)).float(), dim=1)


def resolve_precision(flag, device):
    if device.type != "cuda" and flag in ("bf16", "fp16"):
        raise UserError(f"--precision {flag} is for CUDA; on {device.type} use fp32 (or auto)")
    if device.type != "cuda" or flag != "auto":
        return "fp32" if device.type != "cuda" else flag
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def memory_format_for(device):
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def make_scaler(precision):
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


# -----------------------------------------------------------------------------
# The state of a run, declared once.  set_up fills it, the loop updates it; checkpoint() saves the
# model, SGD, LR rule, scaler, bank, cluster labels and the PROGRESS fields.
PROGRESS = "epoch batch_in_epoch step best_knn lr_drops finished warmup init_epoch".split()


class Run:
    def __init__(self, args, device, precision, raw_model, optimizer, bank):
        self.args, self.device, self.precision = args, device, precision  # fp32 | bf16 | fp16
        self.raw_model = self.model = raw_model  # model: DDP(raw_model) under torchrun
        self.optimizer, self.scaler, self.bank = optimizer, make_scaler(precision), bank
        self.mem_fmt = memory_format_for(device)
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        self.amp_ctx = torch.autocast("cuda", dtype=half, enabled=precision != "fp32")
        self.phase, self.cluster_labels = args.algo, None  # this epoch's loss; Eq. 8's [H, N]
        self.ddp, self.rank, self.world = False, 0, 1  # set_up: distributed
        self.n_train = self.num_classes = self.local_batch = self.steps_in_epoch = 0  # set_up: data
        self.train_set = self.train_eval_set = self.val_set = self.sampler = self.loader_kw = None
        self.train_loader = self.val_loader = self.train_labels = self.scheduler = None
        self.ckpt_path = self.log_path = self.defaults_note = None
        self.stop = {"signal": None}  # set by catch_stop_signals
        # the first step whose loss was not finite, kept on the device (0: none so far)
        self.nonfinite_at = torch.zeros((), dtype=torch.long, device=device)
        # PROGRESS, saved: completed epochs, batches done in the current one, steps, App. D's LR
        # rule, LA's IR warm-up epochs, and the IR epochs an --init-from run continues.
        self.epoch = self.batch_in_epoch = self.step = self.lr_drops = 0
        self.best_knn, self.finished, self.warmup, self.init_epoch = -1.0, False, 0, 0

    master = property(lambda self: self.rank == 0)


def build_step_state(args, device, num_rows, precision):
    """What one train_step needs: model E, SGD, bank of num_rows rows, identical on every rank."""
    torch.manual_seed(args.seed)
    model = ResNetEmbedding(args.dim, args.stem).to(device, memory_format=memory_format_for(device))
    sgd = torch.optim.SGD(model.parameters(), args.lr, args.momentum, 0, args.weight_decay)
    bank = MemoryBank(num_rows, args.dim, device, args.seed)
    return Run(args, device, precision, model, sgd, bank)


# -----------------------------------------------------------------------------
# The step and the epoch loop.
def train_step(run, images, idx, bank_idx=None):
    """z = E(v(x_i, a)); the loss against the bank as it stood BEFORE this step (M[i] holds views
    of earlier epochs); backward and SGD (DDP averages gradients); Eq. 7 for the rows bank_idx
    (default idx; -1: padding).  images: to_device_input's; idx [B] on the CPU.  Nothing waits for
    the device (fp16's GradScaler aside): a non-finite loss is noted in run.nonfinite_at."""
    loss_def, args = LOSSES[run.phase], run.args
    with run.amp_ctx:
        z = run.model(images)  # fp32 unit rows
    extra = {k: getattr(args, k) for k in loss_def.extra if getattr(args, k) is not None}
    labels = (run.cluster_labels,) if loss_def.kmeans else ()
    loss = loss_def.fn(z, run.bank.vectors, idx, *labels, tau=args.tau, **extra)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # Eq. 7: M[i] <- alpha * M[i] + (1 - alpha) * z, re-normalised; every rank applies all rows.
    run.bank.update(idx if bank_idx is None else bank_idx, z.detach(), args.alpha)
    run.step += 1
    ok = torch.isfinite(loss) | (run.nonfinite_at > 0)  # torch.where: an `if` would wait
    run.nonfinite_at = torch.where(ok, run.nonfinite_at, run.step)
    return loss.detach()


def train(run):
    """App. D's epochs: k-means at the start (LA), train_step per batch, then knn_top1, the LR
    plateau rule and a checkpoint.  Returns False if a stop signal ended it (after saving)."""
    args = run.args
    while not run.finished and run.epoch < args.epochs:
        run.phase = "ir" if run.epoch < run.warmup else args.algo  # LA's IR warm-up (App. D)
        if LOSSES[run.phase].kmeans and (run.cluster_labels is None or run.batch_in_epoch == 0):
            run.cluster_labels = cluster_bank(run)  # Eq. 8's C_i, fixed for the epoch
        run.sampler.set_epoch(run.epoch)
        run.sampler.skip = run.batch_in_epoch * run.local_batch
        run.steps_in_epoch = math.ceil(len(run.sampler) / run.local_batch)
        meter = dict(loss=torch.zeros((), device=run.device), steps=0, images=0, t0=time.time())
        for b, (images, _, idx) in enumerate(run.train_loader, start=run.batch_in_epoch):
            images = to_device_input(images, run.device, run.mem_fmt)
            pad = padded_mask(b * run.local_batch, len(idx), run.rank, run.world, run.n_train)
            try:
                loss = train_step(run, images, idx, idx.masked_fill(pad, -1))
            except Exception:  # NaN weights make the next loss refuse z: name the first bad step
                check_finite(run)
                raise
            meter.update(loss=meter["loss"] + loss, steps=meter["steps"] + 1)
            meter["images"] += len(idx)
            run.batch_in_epoch = b + 1
            stopping, last = stop_requested(run), b + 1 == run.steps_in_epoch
            if (b + 1) % args.log_every == 0 or last or stopping:
                check_finite(run)  # waits for the device
                log_progress(run, loss, meter)
            if stopping and not last:
                return checkpoint(run, stopped=True)
        end_of_epoch(run, meter)
        if not checkpoint(run, stopped=stop_requested(run)):
            return False
    return True


def log_progress(run, loss, meter):
    dt, b, steps = time.time() - meter["t0"], run.batch_in_epoch, run.steps_in_epoch
    lr, left = run.optimizer.param_groups[0]["lr"], dt / meter["steps"] * (steps - b)
    if run.master:
        print(f"epoch {run.epoch + 1} step {b}/{steps} (global {run.step}) | {run.phase} loss "
              f"{loss.item():.4f} | lr {lr:.2e} | {meter['images'] * run.world / dt:.1f} img/s | "
              f"epoch left {left:.0f}s", flush=True)  # fmt: skip


def cluster_bank(run):
    """Eq. 8's close sets: H = --n-kmeans k-means of the bank as it stands.  Rank r runs clusterings
    h = r, r+W, ... (seed + h wherever h runs, so W does not change the labels); a row is -1 on
    the ranks that did not run it, and a MAX all-reduce joins them."""
    args, t0, mine = run.args, time.time(), list(range(run.rank, run.args.n_kmeans, run.world))
    labels = torch.full((args.n_kmeans, run.n_train), -1, dtype=torch.long)
    # faiss threads: this process's share of the cores it may use (torchrun sets OMP to 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed = args.seed + 1000 * run.epoch

    def work():
        if mine:
            kw = dict(verbose=run.master, clusterings=mine, threads=threads)
            labels[mine] = run_kmeans(run.bank.vectors, args.kmeans_k, args.n_kmeans, seed, **kw)

    everywhere(run, work)  # a faiss failure on one rank is an error on all
    labels = labels.to(run.device)
    if run.ddp:
        dist.all_reduce(labels, op=dist.ReduceOp.MAX)
    if run.master:
        where = f"{run.world} process(es), {threads} threads each"
        print(f"epoch {run.epoch + 1}: {args.n_kmeans} k-means of {args.kmeans_k} clusters on "
              f"{where}, {time.time() - t0:.1f}s", flush=True)  # fmt: skip
    return labels


def end_of_epoch(run, meter):
    """Mean loss and images/s over the ranks, val knn_top1 against the bank, App. D's LR rule."""
    totals = torch.stack([meter["loss"], torch.tensor(float(meter["images"]), device=run.device)])
    if run.ddp:
        dist.all_reduce(totals)
        for buf in run.raw_model.buffers():  # BatchNorm statistics: evaluate and save rank 0's
            dist.broadcast(buf, src=0)
    train_s, knn = time.time() - meter["t0"], knn_top1(run)
    lr_used = run.optimizer.param_groups[0]["lr"]
    if run.epoch >= run.warmup:  # the rule starts with the algorithm itself, not LA's warm-up
        run.scheduler.step(knn)
        if run.optimizer.param_groups[0]["lr"] < lr_used:
            run.lr_drops += 1
            run.finished = run.lr_drops > run.args.lr_drops  # App. D: two drops, then stop
    run.best_knn, run.epoch, run.batch_in_epoch = max(run.best_knn, knn), run.epoch + 1, 0
    loss, ips = totals[0].item() / max(1, meter["steps"] * run.world), totals[1].item() / train_s
    row = dict(kind="epoch", epoch=run.epoch, step=run.step, algo=run.phase, train_loss=loss,
               lr=lr_used, knn_top1=knn, best_knn_top1=run.best_knn, images_per_s=ips,
               epoch_s=train_s)  # fmt: skip
    everywhere(run, lambda: append_log(run.log_path, row), master_only=True)
    if run.master:
        done = " | learning converged: stopping (App. D)" if run.finished else ""
        print(f"epoch {run.epoch} done | {run.phase} train loss {loss:.4f} | val knn_top1 "
              f"{100 * knn:.2f}% (best {100 * run.best_knn:.2f}%) | {ips:.1f} img/s{done}",
              flush=True)  # fmt: skip


# -----------------------------------------------------------------------------
# Distributed: launch; padding; failures and stop signals reach every rank.
def setup_distributed(device_flag, timeout_min=30.0):
    """torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; `srun` alone sets SLURM_PROCID, SLURM_LOCALID,
    SLURM_NTASKS, used when RANK is absent (export MASTER_ADDR and MASTER_PORT then).  Neither:
    one process.  Returns (ddp, rank, local_rank, world, device)."""
    env, names = os.environ, ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise UserError("launched by srun with SLURM_NTASKS > 1 but MASTER_ADDR / MASTER_PORT "
                            "are not set: export them, or start one torchrun per node")  # fmt: skip
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    flag = auto if device_flag == "auto" else device_flag
    if flag not in ("cpu", "cuda") and not flag.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, got {flag!r}")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: CUDA is not available here (use --device cpu)")
    if not all(n in env for n in names):
        return False, 0, 0, 1, torch.device(flag)
    rank, local_rank, world = (int(env[n]) for n in names)
    device = torch.device("cpu")
    if flag.startswith("cuda"):  # srun --gpus-per-task=1 shows each task one GPU
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # A rank that waits longer than this in a collective fails: 30 minutes, well above a step or
    # one rank's share of LA's k-means, far below a hang of hours.
    timeout = datetime.timedelta(minutes=timeout_min)
    # CPU tensors (the bank's indices, the stop flag) go over gloo: no wait for the GPU.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return True, rank, local_rank, world, device


def padded_mask(first_local_position, count, rank, world, n):
    """Which of this rank's next `count` samples are DistributedSampler's padding (it deals rank r
    positions r, r+W, ... of a list padded with repeats to a multiple of W): they train, but train
    marks them -1 for MemoryBank.update, so each row gets one Eq. 7 update per epoch."""
    return (rank + (first_local_position + torch.arange(count)) * world) >= n


def everywhere(run, work, master_only=False):
    """work() (on rank 0 only if master_only); an exception on any rank is raised on every rank,
    where it would otherwise leave the others waiting in their next collective until the timeout."""
    error = None
    if run.master or not master_only:
        try:
            work()
        except Exception as err:
            error = err
    if run.ddp:
        errors = [None] * run.world
        dist.all_gather_object(errors, error and (isinstance(error, UserError), str(error)))
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed and error is None:
            r, (user, text) = failed[0]
            raise UserError(text) if user else RuntimeError(f"rank {r} failed: {text}")
    if error is not None:
        raise error


def catch_stop_signals(stop):
    """SIGTERM and SIGINT set stop["signal"]; the loop saves after the current step and exits 0.
    SIGTERM never kills (SLURM and torchrun may send it twice); a second Ctrl-C does."""

    def request_stop(signum, _frame):
        if signum == signal.SIGINT and stop["signal"] == "SIGINT":
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    if threading.current_thread() is not threading.main_thread():  # handlers live there only
        return {}
    return {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}


def stop_requested(run):
    """Read every step: has a stop signal reached any rank?  Under DDP one all-reduce of one integer
    on the CPU (gloo), which never waits for the device; all ranks stop after the same step."""
    flag = torch.tensor([int(run.stop["signal"] is not None)])
    if run.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def check_finite(run):
    """Wait for the device; raise FloatingPointError naming the first step (over all ranks) whose
    loss was not finite, before anything is saved."""
    first = torch.where(run.nonfinite_at > 0, run.nonfinite_at, 2**62)
    if run.ddp:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first) != 2**62:
        bad, start = int(first), run.step - run.batch_in_epoch
        raise FloatingPointError(f"non-finite loss at step {bad} (epoch {run.epoch + 1}, batch "
                                 f"{bad - start}/{run.steps_in_epoch}); nothing saved: "
                                 f"{run.ckpt_path} is the last good checkpoint")  # fmt: skip


# -----------------------------------------------------------------------------
# Evaluation: weighted kNN against the bank (every epoch), linear probe (--eval-linear).
def knn_predict(z, bank_vectors, train_labels, num_classes, k=200, tau=0.07):
    """Weighted kNN (Wu et al. 2018): the k bank rows most similar to z vote for their class with
    weight exp(cos / tau).  z [B, d], bank [N, d], labels [N] -> predicted class [B]."""
    sims, nbrs = (z.float() @ bank_vectors.float().T).topk(k, dim=1)
    votes = torch.zeros(z.shape[0], num_classes, device=z.device)
    return votes.scatter_add_(1, train_labels[nbrs], (sims / tau).exp()).argmax(dim=1)


@torch.no_grad()
def knn_top1(run):
    """knn_top1 on val/: each rank its share, the counts summed over the ranks."""
    run.raw_model.eval()
    counts = torch.zeros(2, device=run.device)  # correct, total
    for images, targets, _ in run.val_loader:
        with run.amp_ctx:
            z = run.raw_model(to_device_input(images, run.device, run.mem_fmt))
        vote = (run.train_labels, run.num_classes, run.args.knn_k, run.args.knn_tau)
        pred = knn_predict(z, run.bank.vectors, *vote)
        counts[0] += (pred == targets.to(run.device)).sum()
        counts[1] += len(targets)
    run.raw_model.train()
    if run.ddp:
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


@torch.no_grad()
def extract(run, dataset, use_pool):
    """Frozen features and labels of `dataset`.  Rank r encodes images r, r+W, ...; rank 0 gets
    them all (rank after rank), the other ranks None."""
    run.raw_model.eval()
    shares = [range(r, len(dataset), run.world) for r in range(run.world)]
    loader = DataLoader(Subset(dataset, shares[run.rank]), run.local_batch, **run.loader_kw)
    feats, labels = [], []
    for images, targets, _ in loader:
        x = to_device_input(images, run.device, run.mem_fmt)
        with run.amp_ctx:
            feats.append((run.raw_model.features(x) if use_pool else run.raw_model(x)).float())
        labels.append(targets.to(run.device))
    run.raw_model.train()
    return [gather_to_rank0(torch.cat(t), [len(s) for s in shares], run) for t in (feats, labels)]


def gather_to_rank0(x, sizes, run):
    """Each rank's rows (sizes[r] of them) concatenated on rank 0; None on the others."""
    if not run.ddp:
        return x
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x),) + x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes] if run.master else None
    dist.gather(padded, parts, dst=0)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]) if run.master else None


def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs, lr, seed=0, batch_size=256):
    """Softmax regression on frozen, standardised features -> (linear_top1, linear_top5).
    Simplification: the features come once from the test view, not re-augmented every epoch."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    clf = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
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
        hit = clf(val_x).topk(min(5, num_classes), dim=1).indices == val_y[:, None]
    return hit[:, 0].float().mean().item(), hit.any(dim=1).float().mean().item()


def after_training(run):
    """The plateau message; the linear probe (--eval-linear), fitted on rank 0."""
    args = run.args
    if run.finished and run.master:
        print(f"training has finished: the val knn_top1 plateaued after {args.lr_drops} LR drops "
              f"(App. D); best knn_top1 {100 * run.best_knn:.2f}%", flush=True)  # fmt: skip
    if not args.eval_linear:  # rank 0's BatchNorm statistics are everywhere (end_of_epoch)
        return
    pool = args.linear_features == "pool"
    (tx, ty), (vx, vy) = extract(run, run.train_eval_set, pool), extract(run, run.val_set, pool)
    if run.master:
        fit = (run.num_classes, args.linear_epochs, args.linear_lr, args.seed)
        top1, top5 = linear_probe(tx, ty, vx, vy, *fit)
        row = dict(kind="linear", epoch=run.epoch, features=args.linear_features, linear_top1=top1)
        append_log(run.log_path, dict(row, linear_top5=top5))
        print(f"linear probe on frozen {args.linear_features} features: linear_top1 "
              f"{100 * top1:.2f}% linear_top5 {100 * top5:.2f}% (val)", flush=True)  # fmt: skip


# -----------------------------------------------------------------------------
# Checkpoints and logs.
def checkpoint(run, stopped=False):
    """check_finite, then rank 0 writes OUT_DIR/ckpt.pt (an error there reaches every rank).
    Returns not stopped."""
    check_finite(run)
    if not bool(torch.isfinite(run.bank.vectors).all()):
        raise FloatingPointError(f"non-finite memory bank after step {run.step}; nothing saved")
    state = {k: getattr(run, k) for k in PROGRESS}
    state |= {p: getattr(run, p).state_dict() for p in ("optimizer", "scheduler", "scaler", "bank")}
    state.update(model=run.raw_model.state_dict(), cluster_labels=run.cluster_labels,
                 args=vars(run.args), num_train=run.n_train, classes=run.train_set.classes,
                 world_size=run.world)  # fmt: skip
    everywhere(run, lambda: save_checkpoint(state, run.ckpt_path), master_only=True)
    if stopped and run.master:
        by = run.stop["signal"] or "a signal on another rank"
        print(f"stopped by {by} after step {run.step} (epoch {run.epoch + 1}, batch "
              f"{run.batch_in_epoch}/{run.steps_in_epoch}); saved "
              f"{run.ckpt_path}; continue with --resume", flush=True)  # fmt: skip
    return not stopped


def save_checkpoint(state, path):
    """Atomic: write beside, then rename, so a kill mid-write leaves the last good checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, flag, device):
    if not os.path.isfile(path):
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # truncated, not a torch file: the file is at fault, not the code
        raise UserError(f"{flag}: cannot read {path} ({type(err).__name__}: {err})") from err
    keys = {"model", "bank", "args", "num_train", "epoch"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
        raise UserError(f"{flag}: {path} is not a checkpoint written by imagenet_train.py")
    return ckpt


def append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Set-up, resume, main.
def set_up(args, ddp, rank, world, device):
    """--out-dir, the data (every bad-input error is raised here, before training), data-sized
    defaults, model, SGD, the LR rule, bank and loaders: the Run."""
    ranks = SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0)  # no Run yet
    everywhere(ranks, lambda: check_out_dir(args), master_only=True)
    train_set, train_eval_set, val_set = load_datasets(args)
    if args.dataset == "imagefolder" and not args.no_image_check:  # each rank its share
        paths = [p for p, _ in train_set.samples + val_set.samples][rank::world]
        with ThreadPoolExecutor(16) as pool:  # header reads wait on the disk, not the CPU
            everywhere(ranks, lambda: list(pool.map(lambda p: open_image(p, False), paths)))
    n_train = len(train_set)
    note = fit_defaults_to_data(args, n_train, world)
    check_args(args, world, n_train)
    if rank == 0 and note:
        print(note, flush=True)
    if rank == 0:
        kmeans_device_warning(args, device, n_train)
    run = build_step_state(args, device, n_train, resolve_precision(args.precision, device))
    local_batch = args.batch_size // world
    sampler = EpochSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=False)
    workers = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    loader_kw = dict(workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    # App. D drops the LR "once learning converged, defined as no improvement in validation loss
    # for 10 epochs".  Val images have no bank row, so no loss; like the IR/LA code we watch val
    # knn_top1 (mode "max").  The third plateau stops training.
    plateau = dict(factor=args.lr_factor, patience=args.patience, threshold=0, threshold_mode="abs")
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(run.optimizer, "max", **plateau)
    val_share = Subset(val_set, range(rank, len(val_set), world))  # each val image counted once
    la_warmup = 10 if args.la_warmup_epochs is None else args.la_warmup_epochs  # App. D
    vars(run).update(
        ddp=ddp, rank=rank, world=world, n_train=n_train, num_classes=len(train_set.classes),
        local_batch=local_batch, train_set=train_set, train_eval_set=train_eval_set,
        val_set=val_set, sampler=sampler, loader_kw=loader_kw, defaults_note=note,
        train_labels=torch.as_tensor(train_set.targets).to(device),  # kNN evaluation ONLY
        # drop_last=False: the last, smaller batch updates its bank rows too (each M[i] once)
        train_loader=DataLoader(train_set, local_batch, sampler=sampler, **loader_kw),
        val_loader=DataLoader(val_share, local_batch, **loader_kw),
        warmup=la_warmup if LOSSES[args.algo].kmeans and not args.init_from else 0,
        ckpt_path=os.path.join(args.out_dir, "ckpt.pt"),
        log_path=os.path.join(args.out_dir, "log.jsonl"),
    )  # fmt: skip
    return run


def check_out_dir(args):
    """Create --out-dir and prove it writable now, not at the first checkpoint an epoch later;
    a new run does not overwrite a checkpoint."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as err:
        why = f"is not a writable folder ({err.strerror or err})"
        raise UserError(f"--out-dir {args.out_dir!r} {why}") from err
    if not args.resume and os.path.exists(os.path.join(args.out_dir, "ckpt.pt")):
        raise UserError(f"--out-dir {args.out_dir} already holds ckpt.pt: pass --resume to "
                        "continue it, or choose another --out-dir")  # fmt: skip


def kmeans_device_warning(args, device, num_points):
    """LA on a GPU with a faiss without GPU support: say at start, once, that k-means runs on the
    CPU, and how big it is.  True if it warned."""
    size = (num_points, args.kmeans_k, args.n_kmeans)
    return LOSSES[args.algo].kmeans and warn_if_kmeans_on_cpu(device, *size, dim=args.dim)


def check_same_run(ckpt, run):
    """--resume continues the same run: algorithm, model size, clusterings, train set, ranks."""
    args, saved = run.args, ckpt["args"]
    names = ["algo", "dim"] + (["kmeans_k", "n_kmeans"] if LOSSES[args.algo].kmeans else [])
    differ = [n for n in names if saved.get(n) != getattr(args, n)]
    then = [f"--{n.replace('_', '-')} {saved.get(n)}" for n in differ]
    now = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in differ]
    if ckpt["num_train"] != run.n_train or ckpt.get("classes") != run.train_set.classes:
        then.append(f"{ckpt['num_train']} train images in {len(ckpt.get('classes') or [])} classes")
        now.append(f"{run.n_train} in {run.num_classes}")
    if then:
        raise UserError(f"--resume: {run.ckpt_path} is another run's checkpoint: it has "
                        f"{', '.join(then)}; this run has {', '.join(now)}")  # fmt: skip
    if ckpt["batch_in_epoch"] and ckpt["world_size"] != run.world:
        raise UserError(f"--resume: {run.ckpt_path} was saved mid-epoch by {ckpt['world_size']} "
                        "processes; resume with as many (they split the data)")  # fmt: skip


def resume(run):
    """Continue this run's checkpoint (--resume: every rank reads it; a failure on one reaches all)
    or start BALL / ANN / LA from an IR checkpoint (--init-from, App. D, Fig. 2a); wrap the model
    for DDP; write a new run's config row."""
    args, ckpt = run.args, {}
    path, flag = (run.ckpt_path, "--resume") if args.resume else (args.init_from, "--init-from")
    if path:  # they exclude each other (check_args)
        everywhere(run, lambda: ckpt.update(load_checkpoint(path, flag, run.device)))
    if args.resume:
        check_same_run(ckpt, run)
        run.raw_model.load_state_dict(ckpt["model"])
        for part in ("optimizer", "scheduler", "bank") + ("scaler",) * bool(ckpt["scaler"]):
            getattr(run, part).load_state_dict(ckpt[part])  # a scaler saved disabled (no fp16): {}
        labels = ckpt["cluster_labels"]
        run.cluster_labels = None if labels is None else labels.to(run.device)
        vars(run).update({k: ckpt[k] for k in PROGRESS})
        if run.master:
            print(f"resumed {run.ckpt_path}: epoch {run.epoch} batch {run.batch_in_epoch} step "
                  f"{run.step} best knn_top1 {run.best_knn:.4f}", flush=True)  # fmt: skip
    if args.init_from:
        got = (ckpt["args"]["algo"], ckpt["num_train"], ckpt["args"]["dim"])
        if got != ("ir", run.n_train, args.dim):
            need = f"need an IR checkpoint of these {run.n_train} images with --dim {args.dim}"
            got = f"--algo {got[0]} on {got[1]} images with --dim {got[2]}"
            raise UserError(f"--init-from {args.init_from}: {need}, got {got}")
        run.raw_model.load_state_dict(ckpt["model"])  # App. D: "initialize ResNet and the memory
        run.bank.load_state_dict(ckpt["bank"])  # bank using 10 epochs of IR"
        run.init_epoch = ckpt["epoch"]
    if run.ddp:  # no buffer broadcast on every forward: end_of_epoch broadcasts rank 0's BN stats
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.model = DDP(run.raw_model, device_ids=ids, broadcast_buffers=False)
    if not args.resume:
        row = dict(vars(args), kind="config", world_size=run.world, num_train=run.n_train,
                   num_val=len(run.val_set), num_classes=run.num_classes, precision=run.precision,
                   la_warmup_epochs=run.warmup, init_epoch=run.init_epoch,
                   defaults_note=run.defaults_note)  # fmt: skip
        everywhere(run, lambda: append_log(run.log_path, row), master_only=True)


def main(argv=None):
    """The demo (no arguments) or training: set_up, resume, train, after_training.  A
    mistake in the flags or data raises UserError (command_line: one line, exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser().parse_args(argv)
    if args.data is None and args.dataset == "fashion-mnist":
        args.data = "/usr/share/datasets/fashion-mnist"  # the Debian package dataset-fashion-mnist
    if args.data is None:
        raise UserError("--data is required (an ImageFolder root with train/ and val/)")
    check_args(args, 1)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = not args.deterministic
    # warn_only: CUDA has no deterministic AdaptiveAvgPool2d backward, whose 1x1 output adds one
    # term per input, so its atomics cannot reorder a sum.
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    ddp, rank, _, world, device = setup_distributed(args.device, args.timeout_min)
    old_handlers = {}
    try:
        check_args(args, world)
        run = set_up(args, ddp, rank, world, device)
        resume(run)
        old_handlers = catch_stop_signals(run.stop)
        if train(run):
            after_training(run)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if ddp:
            dist.destroy_process_group()


def command_line(argv=None):
    """main(), a UserError printed as one line on stderr with exit status 2 (tagged with its rank
    under torchrun)."""
    try:
        main(argv)
    except UserError as err:
        text = str(err).strip()
        if "Original Traceback" in text:  # raised in a DataLoader worker: ours is the last line
            text = text.splitlines()[-1].split("UserError: ", 1)[-1]
        tag = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        text = f"imagenet_train.py: error: {tag}{' '.join(text.split())}"
        print(text, file=sys.stderr, flush=True)
        return 2
    finally:
        end_stray_workers()
    return 0


def end_stray_workers():
    """Workers ignore SIGTERM (ignore_stop_signals).  One whose DataLoader iterator an exception's
    traceback still holds would outlive main(), and multiprocessing's exit handler, which ends
    daemonic children with SIGTERM, would then wait for it forever: end such workers here."""
    for worker in multiprocessing.active_children():
        if worker.daemon:  # DataLoader workers; torchrun and mp.spawn children are not daemonic
            worker.kill()
            worker.join()


# -----------------------------------------------------------------------------
# The demo (no arguments) and its generated images.
def make_toy_imagefolder(root, num_classes=4, train_per_class=12, val_per_class=4, size=32, seed=0):
    """A tiny ImageFolder of PNGs (demo, tests, smoke runs).  Class c: stripes at angle c*180/C
    degrees; phase, frequency, colours and noise vary per image: the class is a matter of shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            os.makedirs(os.path.join(root, split, f"class_{c:02d}"), exist_ok=True)
            for j in range(count):
                freq, phase = rng.uniform(2.5, 4.5), rng.uniform(0, 2 * np.pi)
                wave = np.cos(angle) * xx + np.sin(angle) * yy
                stripes = np.sin(2 * np.pi * freq * wave + phase)
                img = np.where(stripes[..., None] > 0, rng.uniform(0, 1, 3), rng.uniform(0, 1, 3))
                img = np.clip(img + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)
                path = os.path.join(root, split, f"class_{c:02d}", f"{split}_{c}_{j:03d}.png")
                Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return root


def demo(epochs=6):
    """IR, BALL, ANN and LA, 6 CPU epochs each on 64 generated 32x32 images (about a minute)."""
    flags = f"--device cpu --image-size 32 --batch-size 8 --epochs {epochs} --k-background 32 "
    flags += "--knn-k 10 --workers 0 --log-every 1000 --eval-linear"
    la = "--la-warmup-epochs 2 --kmeans-k 8 --n-kmeans 2"
    table = [f"algo | loss ep1 | loss ep{epochs} | best kNN top-1 | linear top-1 | images/s"]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_toy_imagefolder(os.path.join(tmp, "data"), 4, 16, 8)
        for algo, loss in LOSSES.items():
            out = os.path.join(tmp, algo)
            run = ["--data", data, "--out-dir", out, "--algo", algo] + flags.split()
            main(run + la.split() * loss.kmeans)
            rows = read_log(os.path.join(out, "log.jsonl"))
            ep, lin = ([r for r in rows if r.get("kind") == k] for k in ("epoch", "linear"))
            best, ips = max(r["knn_top1"] for r in ep), sum(r["images_per_s"] for r in ep) / len(ep)
            l0, l1, top1 = ep[0]["train_loss"], ep[-1]["train_loss"], lin[-1]["linear_top1"]
            table.append(
                f"{algo:4s} | {l0:8.3f} | {l1:8.3f} | {best:14.1%} | {top1:12.1%} | {ips:8.1f}"
            )
    print(f"\ndemo: 4 classes x 16 train / 8 val generated 32x32 images, {epochs} CPU epochs each:")
    print("\n".join(table))
    print("chance: 25% (4 classes, 32 val images); LA's first 2 epochs are IR (its warm-up);")
    print("losses of different algorithms differ in scale.  Toy data: the pipeline, not Fig. 2.")


if __name__ == "__main__":
    sys.exit(command_line())
