"""Figure 2 of the paper from imagenet_train.py's log.jsonl files: three panels of val accuracy
per epoch, one curve per run.

    python tests/plot_figure2.py runs/*/log.jsonl --paper --out fig2.png

(a) algorithm, all views; (b) IR's view set (Fig. 2b lesions); (c) IR's bank update rate alpha
(Eq. 7, the paper's m).  Curves: knn_top1 per epoch; a star: the run's linear_top1 (frozen
features), at its last epoch.  A run started --init-from is shifted right by its IR start's
epochs, as in Fig. 2a.  --paper adds the values read off the paper's figure as hollow markers.
A log that cannot be read: one line, exit status 2.
"""

import argparse
import json
import math
import os
import sys

# Read off the paper's Figure 2 by eye (no table in the paper): (label, last epoch drawn, accuracy
# there), to about +-0.005 and +-2 epochs.  The paper does not say which accuracy it plots, so these
# are drawn as "read off", never matched.
# fmt: off
PAPER_FIGURE2 = {
    "a": [("IR (init.)", 9, 0.082), ("IR (cont.)", 79, 0.234), ("BALL", 79, 0.26),
          ("ANN", 78, 0.272), ("LA", 79, 0.286)],
    "b": [("IR (all)", 85, 0.24), ("IR (crop)", 96, 0.167), ("IR (flip)", 44, 0.022),
          ("IR (None)", 23, 0.02), ("IR (grayscale)", 22, 0.013)],
    "c": [("IR (m=0)", 95, 0.245), ("IR (m=0.1)", 99, 0.247), ("IR (m=0.3)", 99, 0.247),
          ("IR (m=0.5)", 86, 0.24), ("IR (m=0.7)", 99, 0.23), ("IR (m=0.9)", 99, 0.198)],
}
# fmt: on


class LogError(ValueError):
    """A log that cannot be read: one line and exit status 2 on the command line."""


def view_name(cfg):
    """'all', 'none', 'crop only' (Figure 2b's 'IR (crop)'), or the lesions, e.g. 'no crop'."""
    augs = ("crop", "gray", "jitter", "flip")
    off = [k for k in augs if cfg.get(f"no_{k}")]
    if cfg.get("no_aug"):
        return "none"
    if len(off) == 3:
        return f"{(set(augs) - set(off)).pop()} only"
    return "no " + "+".join(off) if off else "all"


PANELS = [  # (title, which runs, label); the paper's settings are alpha 0.5 (App. D) and all views
    ("(a) algorithm (all views)", lambda c: view_name(c) == "all",
     lambda c: c["algo"] + ("" if c["alpha"] == 0.5 else f" a={c['alpha']}")),
    ("(b) IR view set", lambda c: c["algo"] == "ir", view_name),
    ("(c) IR memory update rate alpha (m)", lambda c: c["algo"] == "ir" and view_name(c) == "all",
     lambda c: f"{c['alpha']:g}"),
]  # fmt: skip


def seed_tag(cfg):
    """', seed S' for a run whose --seed is not 0: runs repeated over seeds stay apart."""
    return f", seed {cfg['seed']}" if cfg.get("seed") else ""


def read_run(path):
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as err:
        raise LogError(f"cannot read {path} ({err.strerror or err})") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            raise LogError(f"{path} line {number} is not JSON ({err.msg})") from err
    cfg = next((r for r in rows if r.get("kind") == "config"), None)
    if cfg is None:
        raise LogError(f"{path} has no config row; is it a log.jsonl of imagenet_train.py?")
    epochs, lin = ([r for r in rows if r.get("kind") == k] for k in ("epoch", "linear"))
    knn = max((r["knn_top1"] for r in epochs), default=float("nan"))
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    linear = lin[-1]["linear_top1"] if lin else float("nan")
    shift = cfg.get("init_epoch") or 0
    return dict(cfg=cfg, epochs=epochs, shift=shift, knn=knn, linear=linear, name=name)


def plot_logs(paths, out_path, paper=False):
    """Draw the PANELS from log.jsonl files into out_path; paper=True adds PAPER_FIGURE2.
    Returns {panel: [(label, best knn_top1, linear_top1 or nan)]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, plotted, lines = [read_run(path) for path in paths], {}, []
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for ax, (title, keep, label), key in zip(axes, PANELS, "abc", strict=True):
        chosen = sorted((r for r in runs if keep(r["cfg"])), key=lambda r, f=label: f(r["cfg"]))
        plotted[title] = []
        for r in chosen:
            x = [e["epoch"] + r["shift"] for e in r["epochs"]]
            y = [e["knn_top1"] for e in r["epochs"]]
            run_label = label(r["cfg"]) + seed_tag(r["cfg"])
            plotted[title].append((run_label, r["knn"], r["linear"]))
            text = f"{run_label} ({r['name']})"
            last = f"epoch {x[-1]} {y[-1]:.4f}" if x else "none"
            lines.append(f"{key} {text:30s} knn_top1 best {r['knn']:.4f}, last: {last}; "
                         f"linear_top1 {r['linear']:.4f}")  # fmt: skip
            (line,) = ax.plot(x, y, lw=1.3, label=text)
            if not math.isnan(r["linear"]):
                end = x[-1] if x else r["shift"]
                ax.plot([end], [r["linear"]], "*", ms=12, color=line.get_color())
        for name, epoch, acc in PAPER_FIGURE2[key] if paper else []:
            ax.plot([epoch], [acc], "o", mfc="none", mec="0.35", ms=7)
            ax.annotate(name, (epoch, acc), xytext=(4, 2), textcoords="offset points", fontsize=7)
        ax.set(title=title, xlabel="epoch", ylabel="top-1 accuracy (val)")
        keys = [
            ("-", "", "kNN top-1 per epoch (curves)"),
            ("", "*", "linear top-1, frozen features"),
        ]
        keys += [("", "o", "read off the paper's Fig. 2")] * paper
        legend = [plt.Line2D([], [], ls=ls, marker=m, color="k", mfc="none", label=t)
                  for ls, m, t in keys]  # fmt: skip
        ax.legend(handles=ax.get_legend_handles_labels()[0] + legend, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    print("\n".join(lines + [f"wrote {out_path}"]))
    return plotted


def main(argv=None):
    """Parse the command line and plot; a LogError is one line on stderr and exit status 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", metavar="LOG", help="log.jsonl files of imagenet_train.py")
    p.add_argument("--out", default="fig2.png", help="image to write (default: fig2.png)")
    p.add_argument("--paper", action="store_true", help="mark the values read off the paper")
    args = p.parse_args(argv)
    try:
        plot_logs(args.logs, args.out, args.paper)
    except LogError as err:
        print(f"plot_figure2.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
