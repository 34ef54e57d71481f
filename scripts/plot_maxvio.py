#!/usr/bin/python3
"""Plots MaxVio_batch (top) and the training loss (bottom) against the step for every strategy in
a per-step CSV written by `moert train --csv`. Thin lines are the per-step values, thick lines
their moving average. Uses matplotlib's Agg backend: no display is needed.

usage: plot_maxvio.py STEPS.csv OUT.png [--floor X] [--window N]
"""

import argparse
import csv
import sys


def moving_average(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--floor", type=float, help="MaxVio_batch of a balanced random router")
    ap.add_argument("--window", type=int, default=50, help="moving-average window in steps")
    a = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        print(f"plot_maxvio: error: matplotlib is missing for {sys.executable} "
              "(Debian package python3-matplotlib)", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    try:
        with open(a.csv, newline="") as f:
            for row in csv.DictReader(f):
                r = runs.setdefault(row["strategy"], ([], [], []))
                r[0].append(int(row["step"]))
                r[1].append(float(row["max_vio_batch"]))
                r[2].append(float(row["train_loss"]))
    except (OSError, KeyError, ValueError) as e:
        print(f"plot_maxvio: error: {a.csv}: {e}", file=sys.stderr)
        return 1
    if not runs:
        print(f"plot_maxvio: error: {a.csv} holds no steps", file=sys.stderr)
        return 1

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for i, (name, (steps, vio, loss)) in enumerate(runs.items()):
        colour = f"C{i}"
        top.plot(steps, vio, color=colour, alpha=0.2, linewidth=0.6)
        top.plot(steps, moving_average(vio, a.window), color=colour, linewidth=1.8, label=name)
        bottom.plot(steps, moving_average(loss, a.window), color=colour, linewidth=1.5, label=name)
    if a.floor is not None:
        top.axhline(a.floor, color="grey", linestyle="--", linewidth=1,
                    label=f"balanced random router ({a.floor:.3f})")
    top.set_ylabel("MaxVio_batch")
    top.set_ylim(bottom=0)
    top.set_title("Load balance per training step (mean over MoE blocks)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"training loss (nats/char, {a.window}-step mean)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    lo = min(min(moving_average(r[2], a.window)[len(r[2]) // 10:]) for r in runs.values())
    hi = max(max(moving_average(r[2], a.window)[len(r[2]) // 10:]) for r in runs.values())
    bottom.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    fig.tight_layout()
    try:
        fig.savefig(a.png, dpi=110)
    except OSError as e:
        print(f"plot_maxvio: error: {a.png}: {e}", file=sys.stderr)
        return 1
    print(f"plot: {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
