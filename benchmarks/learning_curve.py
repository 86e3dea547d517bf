"""Plot greedy success against env steps and wall clock for one or more runs (from their tensorboard logs).

    python benchmarks/learning_curve.py runs/A runs/B --labels async sync --out docs/learning_curve.png

Prints, per run, the first wall-clock time and env step at which greedy success reached --threshold (with
--sustain K: the first of K evaluations in a row that all reach it, so that one lucky round of a few dozen
episodes does not count), and a JSON line with the curves' points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def load_curve(run_dir: str, tag: str = "eval/success_rate") -> list[dict]:
    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags()["scalars"]:
        raise SystemExit(f"{run_dir}: no {tag} scalars (was evaluation on?)")
    events = ea.Scalars(tag)
    start = min(e.wall_time for t in ea.Tags()["scalars"] for e in ea.Scalars(t)[:1])
    return [{"env_steps": e.step, "wall_s": e.wall_time - start, "success": e.value} for e in events]


def first_reached(curve: list[dict], threshold: float, sustain: int = 1) -> dict | None:
    """The first point that starts `sustain` consecutive points with success >= threshold (None: never)."""
    for i in range(len(curve) - sustain + 1):
        if all(p["success"] >= threshold for p in curve[i:i + sustain]):
            return curve[i]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--sustain", type=int, default=1, help="evaluations in a row that must reach --threshold")
    parser.add_argument("--title", default="greedy success (eval/success_rate)")
    parser.add_argument("--out", default="docs/learning_curve.png")
    parser.add_argument("--log-x", action="store_true",
                        help="env steps on a log axis (arms whose real env steps differ by orders of magnitude)")
    args = parser.parse_args()
    labels = args.labels or [Path(r).name for r in args.runs]
    fig, (ax_steps, ax_wall) = plt.subplots(1, 2, figsize=(10, 3.8))
    result = {}
    for run, label in zip(args.runs, labels):
        curve = load_curve(run)
        reached = first_reached(curve, args.threshold, args.sustain)
        result[label] = {"curve": curve, "reached": reached}
        if reached:
            print(f"{label}: success {reached['success']:.2f} >= {args.threshold} at {reached['wall_s'] / 60:.1f} min, "
                  f"{reached['env_steps']:,} env steps")
        else:
            print(f"{label}: never reached {args.threshold}; best {max(p['success'] for p in curve):.2f}")
        ax_steps.plot([p["env_steps"] for p in curve], [p["success"] for p in curve], marker="o", ms=3, label=label)
        ax_wall.plot([p["wall_s"] / 60 for p in curve], [p["success"] for p in curve], marker="o", ms=3, label=label)
    if args.log_x:
        ax_steps.set_xscale("log")
    ax_steps.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    for ax, xlabel in ((ax_steps, "env steps"), (ax_wall, "wall clock (min)")):
        ax.axhline(args.threshold, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greedy success")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=1 + len(args.runs) // 5)
    fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
