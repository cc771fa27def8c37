#!/usr/bin/env bash
# Figure 2 in miniature: IR, BALL, ANN, LA, the view lesions and the bank rate alpha on Fashion-MNIST
# (apt-get install dataset-fashion-mnist), ResNet-18 at 32 px on a CPU.  Each panel is one command:
#   bash tests/miniature_figure2.sh a 0      # panel (a), seed 0: IR 10 epochs, then IR/BALL/ANN/LA 20 more
#   bash tests/miniature_figure2.sh b        # panel (b): crop only, flip only, none; 30 epochs each
#   bash tests/miniature_figure2.sh c        # panel (c): alpha 0 and 0.9; 30 epochs each
# Two lanes on a 2-core machine (109 minutes of wall time when measured):
#   (bash tests/miniature_figure2.sh a 0; bash tests/miniature_figure2.sh b crop; bash tests/miniature_figure2.sh c 0) &
#   (bash tests/miniature_figure2.sh a 1; bash tests/miniature_figure2.sh b flip none; bash tests/miniature_figure2.sh c 0.9) &
# Panel (b)'s "all" and panel (c)'s alpha 0.5 are panel (a)'s IR of seed 0.  Then:
#   python tests/plot_figure2.py $OUT/{a_seed?/{ir,ball,ann,la},[bc]/*}/log.jsonl --out fig2.png
#   python tests/miniature_baselines.py --checkpoint $OUT/*/*/ckpt.pt   # clean-feature kNN rows
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/mini}
# 10,000 train images (1,000 per class) and 2,000 test images, the same for every seed; App. D's
# 4096 background neighbours and 30,000 clusters scale with N: 1,024 (one class's worth) and 250
# (40 images per cluster, App. D: 43).
COMMON=(--dataset fashion-mnist --train-subset 10000 --val-subset 2000 --image-size 32
        --batch-size 128 --workers 0 --threads 1 --log-every 20)
BACKGROUND=(--k-background 1024 --kmeans-k 250)
train() { python imagenet_train.py "${COMMON[@]}" "$@"; }

case "${1:-}" in
a)  s=${2:?seed}; d=$OUT/a_seed$s
    train --seed "$s" --epochs 10 --out-dir "$d/ir_init"           # the shared start (App. D)
    rm -rf "$d/ir" && cp -r "$d/ir_init" "$d/ir"
    train --seed "$s" --epochs 30 --resume --out-dir "$d/ir"        # IR continued
    for algo in ball ann la; do
        train --seed "$s" --algo "$algo" "${BACKGROUND[@]}" --epochs 20 \
              --init-from "$d/ir_init/ckpt.pt" --out-dir "$d/$algo"
    done ;;
b)  shift; [ $# -gt 0 ] || set -- crop flip none
    for lesion in "$@"; do
        case $lesion in
        crop) flags=(--no-gray --no-jitter --no-flip) ;;
        flip) flags=(--no-crop --no-gray --no-jitter) ;;
        none) flags=(--no-aug) ;;
        *) echo "panel b: crop, flip or none, got $lesion" >&2; exit 2 ;;
        esac
        train --seed 0 --epochs 30 "${flags[@]}" --out-dir "$OUT/b/ir_$lesion"
    done ;;
c)  shift; [ $# -gt 0 ] || set -- 0 0.9
    for alpha in "$@"; do
        train --seed 0 --epochs 30 --alpha "$alpha" --out-dir "$OUT/c/ir_alpha$alpha"
    done ;;
*)  echo "usage: $0 a SEED | b [crop flip none] | c [ALPHA ...]" >&2; exit 2 ;;
esac
