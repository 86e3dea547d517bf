"""Summarise a run's tensorboard scalars: per tag the number of points, first, last, min, max and the step
of the last point, as a markdown table (for closing notes and RESULTS.md).

    python benchmarks/tb_summary.py runs/<run> [--tags perf/ losses/ charts/ eval/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def summarise(run_dir: str, prefixes: tuple[str, ...]) -> list[str]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    lines = ["| tag | points | first | last | min | max | last step |", "|---|---|---|---|---|---|---|"]
    for tag in sorted(accumulator.Tags()["scalars"]):
        if prefixes and not tag.startswith(prefixes):
            continue
        values = [event.value for event in accumulator.Scalars(tag)]
        last_step = accumulator.Scalars(tag)[-1].step
        lines.append(f"| {tag} | {len(values)} | {values[0]:.4g} | {values[-1]:.4g} | {min(values):.4g} | "
                     f"{max(values):.4g} | {last_step} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (or any folder holding events.out.tfevents files)")
    parser.add_argument("--tags", nargs="*", default=[], help="only tags starting with one of these")
    args = parser.parse_args()
    if not list(Path(args.run_dir).rglob("events.out.tfevents*")):
        raise SystemExit(f"no tensorboard event files under {args.run_dir}")
    print("\n".join(summarise(args.run_dir, tuple(args.tags))))


if __name__ == "__main__":
    main()
