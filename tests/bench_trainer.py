"""What one training view and one training step of imagenet_train.py cost (App. D's settings).

    python tests/bench_trainer.py                    # both parts, tiny step sizes: under a minute
    python tests/bench_trainer.py --part pipeline    # the data pipeline only, per CPU core
    python tests/bench_trainer.py --part step --device cuda    # App. D's step sizes on a GPU

Part 1, the pipeline.  App. D's training view is RandomResizedCrop to 224, RandomGrayscale(p=0.2),
ColorJitter (0.4 for brightness, contrast, saturation and hue, as in the IR and LA code), random
horizontal flip, ImageNet normalization.  The JPEG is generated here: 500x375 (ImageNet's most
common size), quality 90, with a 1/f spectrum so that it compresses like a photograph (~110 kB,
ImageNet's mean file size).  One thread (one DataLoader worker = one core).  Each path is timed
stage by stage over the same sequence of random views; a stage's figure is its mean per view in the
best of --rounds rounds (other processes on the machine only ever add time).  The paths:

  pil          PIL decode, PIL transforms, ToTensor + Normalize (float32 out: the old trainer)
  pil-uint8    the same, PILToTensor (uint8 out, normalized on the device: the trainer now)
  v2           torchvision.io.decode_jpeg and transforms.v2 on uint8 tensors
  mixed        decode_jpeg, v2's crop on the tensor, then PIL for grayscale, jitter and flip

(torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec; they are timed here
because they are what torchvision offers today.)  With the same torch seed every path draws the same
view (tests/test_cuda_check.py checks it), so a path's time is the same distribution's cost.

PIL's draft mode (decode at 1/2, 1/4, 1/8 in the DCT) keeps the distribution of views only when the
crop is drawn on the full-size image and the reduced crop box still has >= --image-size pixels on
each side (then the resize still only shrinks).  The benchmark prints how often that happens.

Part 2, the step: the trainer's own build_step_state, to_device_input and train_step (IR and LA by
default: the loss against the bank, SGD, Eq. 7) on a synthetic pinned uint8 batch, as the loader
hands it over; channels_last, cudnn.benchmark and autocast on CUDA.  It prints images/s, the peak
GPU memory, and for LA one k-means with App. D's per-epoch k-means extrapolated from it.
tests/cuda_check.py runs this part on a GPU and holds IR to a floor.
"""

import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import imagenet_train as it  # noqa: E402
from local_agg import faiss_has_gpu, run_kmeans  # noqa: E402

JITTER = 0.4  # App. D says "random color jitter"; 0.4 for all four is the IR / LA code's setting
TARGET_MS = 4.0


# -----------------------------------------------------------------------------
# Part 1: the training view, per stage.
# -----------------------------------------------------------------------------
def make_jpeg(width=500, height=375, quality=90, seed=0):
    """A photograph-like JPEG: each channel has a 1/f^1.1 amplitude spectrum (natural images are
    close to 1/f), the channels correlated, so the file size and the decode cost are ImageNet's."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    shape = (height, width // 2 + 1)
    shared = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    channels = []
    for _ in range(3):
        own = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        x = np.fft.irfft2((shared + 0.5 * own) / f**1.1, s=(height, width))
        channels.append((x - x.mean()) / x.std())
    pixels = np.clip(np.stack(channels, -1) * 50 + 128, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def pil_decode(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def tensor_decode(data):
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def pipelines(size, min_scale=0.2):
    """{path: [(stage, function), ...]}: App. D's view, stage by stage, in the trainer's order."""
    jitter = (JITTER, JITTER, JITTER, min(JITTER, 0.5))
    normalize = T.Compose([T.ToTensor(), T.Normalize(it.IMAGENET_MEAN, it.IMAGENET_STD)])
    pil = [
        ("crop", T.RandomResizedCrop(size, scale=(min_scale, 1.0))),
        ("gray", T.RandomGrayscale(p=0.2)),
        ("jitter", T.ColorJitter(*jitter)),
        ("flip", T.RandomHorizontalFlip()),
    ]
    tensor = [
        ("crop", v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)),
        ("gray", v2.RandomGrayscale(p=0.2)),
        ("jitter", v2.ColorJitter(*jitter)),
        ("flip", v2.RandomHorizontalFlip()),
    ]
    return {
        "pil": [("decode", pil_decode)] + pil + [("to tensor", normalize)],
        "pil-uint8": [("decode", pil_decode)] + pil + [("to tensor", T.PILToTensor())],
        "v2": [("decode", tensor_decode)] + tensor,
        "mixed": [("decode", tensor_decode), tensor[0], ("to PIL", v2.ToPILImage())]
        + pil[1:]
        + [("to tensor", T.PILToTensor())],
    }


def time_stages(paths, data, views, rounds):
    """{path: {stage: mean ms per view}}, each stage's best round, and each path's last output.
    The paths take turns within a round, so a busy spell on the machine hits all of them; view j of
    every round and every path is drawn from torch seed j, so all paths see the same views."""
    best = {path: {name: math.inf for name, _ in stages} for path, stages in paths.items()}
    out = {}
    for _ in range(rounds):
        for path, stages in paths.items():
            spent = dict.fromkeys(best[path], 0.0)
            for j in range(views):
                torch.manual_seed(j)
                x = data
                for name, fn in stages:
                    t0 = time.perf_counter()
                    x = fn(x)
                    spent[name] += time.perf_counter() - t0
            best[path] = {k: min(best[path][k], 1e3 * spent[k] / views) for k in spent}
            out[path] = x
    return best, out


def draft_applicable(width, height, size, min_scale, samples=20000):
    """Fraction of App. D's crops (drawn on the full-size image) whose box keeps >= size pixels on
    each side after PIL's smallest draft reduction (1/2): the only crops that draft would speed up
    without changing the view."""
    crop = T.RandomResizedCrop(size, scale=(min_scale, 1.0))
    image = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    hits = 0
    for _ in range(samples):
        _, _, h, w = crop.get_params(image, crop.scale, crop.ratio)
        hits += min(h, w) >= 2 * size
    return hits / samples


def bench_pipeline(args):
    torch.set_num_threads(1)
    data = make_jpeg(seed=args.seed)
    print(
        f"pipeline: one core (torch threads 1), {args.views} views x best of {args.rounds} rounds, "
        f"500x375 JPEG of {len(data) / 1e3:.0f} kB at quality 90 -> {args.image_size} px"
    )
    columns = ["decode", "crop", "to PIL", "gray", "jitter", "flip", "to tensor"]
    print(f"{'path':<10}" + "".join(f"{c:>10}" for c in columns) + f"{'total ms':>10}{'img/s':>8}")
    paths = pipelines(args.image_size, args.crop_min_scale)
    # and the trainer's own view (imagenet_train.train_transform) after the decode its workers do
    view = it.train_transform(args.image_size, crop_min_scale=args.crop_min_scale)
    ms, out = time_stages({**paths, "trainer": [("decode", pil_decode), ("view", view)]}, data,
                          args.views, args.rounds)  # fmt: skip
    own_ms = ms.pop("trainer")
    totals = {}
    for path in paths:
        assert tuple(out[path].shape) == (3, args.image_size, args.image_size), out[path].shape
        totals[path] = sum(ms[path].values())
        cells = "".join(f"{ms[path][c]:>10.2f}" if c in ms[path] else f"{'-':>10}" for c in columns)
        print(
            f"{path:<10}{cells}{totals[path]:>10.2f}{1e3 / totals[path]:>8.0f}   {out[path].dtype}"
        )
    # The jitter's four parts, at the view size, each on a PIL image and on a uint8 tensor.
    torch.manual_seed(0)
    view_pil = T.RandomResizedCrop(args.image_size)(pil_decode(data))
    view_tensor = T.PILToTensor()(view_pil)
    parts = {
        "brightness": lambda x: T.functional.adjust_brightness(x, 1.2),
        "contrast": lambda x: T.functional.adjust_contrast(x, 1.2),
        "saturation": lambda x: T.functional.adjust_saturation(x, 1.2),
        "hue": lambda x: T.functional.adjust_hue(x, 0.2),
    }
    pil_ms = time_stages({"p": list(parts.items())}, view_pil, args.views, args.rounds)[0]["p"]
    tensor_ms = time_stages({"t": list(parts.items())}, view_tensor, args.views, args.rounds)[0][
        "t"
    ]
    cells = [f"{name} {pil_ms[name]:.2f} / {tensor_ms[name]:.2f}" for name in parts]
    print("jitter's parts, ms per view, PIL / uint8 tensor: " + ", ".join(cells))

    def decode_half(d):  # PIL draft: the DCT decodes at 1/2 scale
        im = Image.open(io.BytesIO(d))
        im.draft("RGB", (im.width // 2, im.height // 2))
        return im.convert("RGB")

    half_ms = time_stages({"h": [("decode", decode_half)]}, data, args.views, args.rounds)[0]
    share = draft_applicable(500, 375, args.image_size, args.crop_min_scale)
    print(
        f"PIL draft: decode at 1/2 takes {half_ms['h']['decode']:.2f} ms, but {100 * share:.1f}% "
        "of "
        f"App. D's crops of a 500x375 image keep >= {args.image_size} px per side at 1/2; the rest "
        "would lose resolution (a different view), so draft is not used"
    )
    print(
        f"imagenet_train.train_transform after a PIL decode: {sum(own_ms.values()):.2f} ms per view"
    )
    cpu_only = sum(v for k, v in ms["mixed"].items() if k in ("decode", "crop"))
    print(
        f"without grayscale and jitter (were they done per sample on the GPU): decode + crop "
        f"{cpu_only:.2f} ms = {1e3 / cpu_only:.0f} images/s per core"
    )
    best = min(totals, key=totals.get)
    per_core = 1e3 / totals[best]
    print(
        f"fastest: {best}, {totals[best]:.2f} ms per view = {per_core:.0f} images/s per core "
        f"(target {TARGET_MS} ms: {'met' if totals[best] <= TARGET_MS else 'NOT met'}; "
        f"today's pil path here {totals['pil']:.2f} ms, {totals['pil'] / totals[best]:.2f}x)"
    )
    print(
        f"at this rate (if the cores are this fast): 15 loader cores of a 16-core one-GPU machine "
        f"~ {15 * per_core:,.0f} images/s against an estimated 8,000-12,000 of ResNet-18 bf16 on "
        f"an H200; an 8-GPU node needs ~{8 * 10_000 / per_core:,.0f} cores to feed 10,000 "
        "images/s per GPU"
    )
    return totals


# -----------------------------------------------------------------------------
# Part 2: the trainer's own step (build_step_state, train_step) on synthetic batches.
# -----------------------------------------------------------------------------
def trainer_args(algo, args, rows):
    """The trainer's parsed flags for one algorithm at the benchmark's sizes."""
    k_background = min(args.k_background, rows)
    argv = ["--algo", algo, "--batch-size", str(args.batch_size), "--precision", args.precision,
            "--image-size", str(args.image_size), "--k-background", str(k_background),
            "--kmeans-k", str(args.kmeans_k), "--seed", "0"]  # fmt: skip
    return it.build_parser().parse_args(argv)


def bench_step(args):
    """Images/s of train_step for each algorithm in args.algos: a pinned uint8 batch (what the
    loader hands over) copied, normalized on the device and stepped, --steps timed steps after
    --warmup.  For LA, one k-means of --kmeans-k clusters of the bank first, and App. D's
    10 x 30,000 clusterings of 1,281,167 rows scaled from it (linear in rows x clusters x
    clusterings: the assignment step).  Returns one dict per algorithm; with --json, prints them
    as JSON lines."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # as training sets it (without --deterministic)
    precision = it.resolve_precision(args.precision, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    if device.type == "cuda":
        images = images.pin_memory()  # as the DataLoader's pin_memory=True hands it over
    rows = []
    for algo in args.algos:
        run = it.build_step_state(trainer_args(algo, args, args.bank), device, args.bank, precision)
        kmeans_s = None
        if algo == "la":
            sync()
            t0 = time.perf_counter()
            labels = run_kmeans(run.bank.vectors, args.kmeans_k, num_clusterings=1, verbose=False)
            run.cluster_labels = labels.to(device)
            sync()
            kmeans_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(1)
        batches = [
            torch.randperm(args.bank, generator=g)[: args.batch_size]
            for _ in range(args.warmup + args.steps)
        ]
        for idx in batches[: args.warmup]:  # cudnn.benchmark tunes its kernels here
            it.train_step(run, it.to_device_input(images, run.device, run.mem_fmt), idx)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for idx in batches[args.warmup :]:
            loss = it.train_step(run, it.to_device_input(images, run.device, run.mem_fmt), idx)
        loss = float(loss)  # waits for the last step
        seconds = time.perf_counter() - t0
        row = dict(
            algo=algo, device=str(device), precision=precision, image_size=args.image_size,
            batch_size=args.batch_size, bank_rows=args.bank, steps=args.steps,
            images_per_s=round(args.steps * args.batch_size / seconds, 1),
            step_ms=round(1e3 * seconds / args.steps, 2), loss=round(loss, 4),
            peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            gpu=torch.cuda.get_device_name(device) if cuda else None,
        )  # fmt: skip
        if kmeans_s is not None:
            scale = (it.IMAGENET_TRAIN_SIZE / args.bank) * (30_000 / args.kmeans_k) * 10
            row.update(kmeans_clusters=args.kmeans_k, kmeans_s=round(kmeans_s, 3),
                       kmeans_faiss=faiss_build(), kmeans_app_d_epoch_s=round(kmeans_s * scale, 1),
                       kmeans_app_d_epoch_s_is=f"extrapolated x{scale:.4g} from one")  # fmt: skip
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            peak = (
                f", peak GPU memory {row['peak_gpu_mem_gib']} GiB" if device.type == "cuda" else ""
            )
            print(f"step: {algo} {precision} on {device.type}, batch {args.batch_size} at "
                  f"{args.image_size} px, bank {args.bank:,}: {row['images_per_s']:,} images/s "
                  f"({row['step_ms']} ms/step){peak}")  # fmt: skip
            if kmeans_s is not None:
                print(f"  k-means, {args.kmeans_k} clusters of {args.bank:,} rows: "
                      f"{kmeans_s:.2f} s on {row['kmeans_faiss']}; App. D's per epoch, "
                      f"extrapolated: ~{row['kmeans_app_d_epoch_s']:,} s")  # fmt: skip
        rows.append(row)
        del run
    return rows


def faiss_build():
    """Which faiss k-means runs on: 'faiss 1.x, GPU' or 'faiss 1.x, CPU, 16 threads'."""
    import faiss

    where = "GPU" if faiss_has_gpu() else f"CPU, {faiss.omp_get_max_threads()} threads"
    return f"faiss {faiss.__version__}, {where}"


# The step part's sizes when a flag is left out: App. D's on CUDA, tiny on the CPU (seconds).
STEP_DEFAULTS = {
    "cuda": dict(batch_size=256, step_image_size=224, bank=1_281_167, steps=100, warmup=10,
                 k_background=4096, kmeans_k=1000),
    "cpu": dict(batch_size=8, step_image_size=64, bank=2000, steps=3, warmup=1, k_background=256,
                kmeans_k=20),
}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--part", choices=["pipeline", "step", "both"], default="both", help="what to measure")
    a("--image-size", type=int, default=224, help="side of the view (App. D: 224)")
    a(
        "--crop-min-scale",
        type=float,
        default=0.2,
        help="RandomResizedCrop's smallest area (App. D: 0.2)",
    )
    a("--views", type=int, default=100, help="views per round in the pipeline part")
    a(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the pipeline part; each stage keeps its best",
    )
    a("--seed", type=int, default=0, help="seed of the generated JPEG")
    a("--device", default="cpu", choices=["cpu", "cuda"], help="device of the step part")
    a(
        "--algos",
        nargs="+",
        default=["ir", "la"],
        choices=["ir", "ball", "ann", "la"],
        help="step part's losses",
    )
    a(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="as the trainer's flag",
    )
    a("--batch-size", type=int, help="step batch (default: 256 on CUDA, 8 on the CPU)")
    a("--step-image-size", type=int, help="step's image side (default: 224 on CUDA, 64 on the CPU)")
    a(
        "--bank",
        type=int,
        help="bank rows N (default: ImageNet's 1,281,167 on CUDA, 2,000 on the CPU)",
    )
    a("--steps", type=int, help="timed steps per algorithm (default: 100 on CUDA, 3 on the CPU)")
    a("--warmup", type=int, help="untimed steps first, where cudnn.benchmark tunes (10 / 1)")
    a(
        "--k-background",
        type=int,
        help="|B_i| of BALL / ANN / LA (default: 4096 on CUDA, 256 on the CPU)",
    )
    a(
        "--kmeans-k",
        type=int,
        help="clusters of LA's measured k-means (default: 1000 on CUDA, 20 on the CPU)",
    )
    a("--threads", type=int, default=1, help="torch threads of a CPU step")
    a("--json", action="store_true", help="step part: one JSON line per algorithm")
    args = p.parse_args(argv)
    for name, value in STEP_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag, value, low in (("--image-size", args.image_size, 8), ("--views", args.views, 1),
                             ("--rounds", args.rounds, 1), ("--batch-size", args.batch_size, 1),
                             ("--step-image-size", args.step_image_size, 32),
                             ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--k-background", args.k_background, 1),
                             ("--kmeans-k", args.kmeans_k, 1),
                             ("--threads", args.threads, 1)):  # fmt: skip
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.crop_min_scale <= 1:
        p.error(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")
    if args.bank < max(args.batch_size, args.kmeans_k):
        p.error(f"--bank must be >= --batch-size and --kmeans-k, got {args.bank}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.part in ("pipeline", "both"):
        bench_pipeline(args)
    if args.part in ("step", "both"):
        return bench_step(argparse.Namespace(**{**vars(args), "image_size": args.step_image_size}))


if __name__ == "__main__":
    main()
