"""Several runs' greedy-success curves (the JSON line that benchmarks/checkpoint_curve.py prints last) in one PNG.

    python benchmarks/plot_curves.py out_a.txt:"lr 3e-5" out_b.txt:"lr 1e-4" out_c.txt:"lr 1e-4, cont.":b \
        --title "libero_spatial/0" --out docs/curves.png

Each argument is FILE:LABEL[:AFTER]. FILE holds checkpoint_curve.py's output (its last JSON line is read).
AFTER names an earlier argument's label letter (a, b, c... in argument order) that this run continued from
(a new run started from that run's last checkpoint): its env steps and seconds are shifted by that run's last
point, and its baseline point (the warm start re-scored) is drawn at the junction. The last line printed is
one JSON object: each label's points as drawn.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path


def read_rows(path: str) -> list[dict]:
    lines = [line for line in Path(path).read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"plot_curves: no JSON line in {path} (give checkpoint_curve.py's output)")
    return json.loads(lines[-1])["rows"]


def draw(curves: list[tuple[str, list[dict]]], title: str, out: str) -> None:
    """Greedy success against env steps (left) and the learner's wall clock (right), one line per (label, rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for label, rows in curves:
        left.plot([r["env_steps"] / 1000 for r in rows], [r["success"] for r in rows], "o-", label=label)
        timed = [r for r in rows if r["seconds"] is not None]
        right.plot([r["seconds"] / 60 for r in timed], [r["success"] for r in timed], "o-", label=label)
    left.set_xlabel("env steps (k)")
    left.set_ylabel("greedy success")
    right.set_xlabel("wall clock (min, learner)")
    for ax in (left, right):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"-> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="FILE:LABEL[:AFTER]")
    parser.add_argument("--title", default="greedy success per checkpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    curves: dict[str, tuple[str, list[dict]]] = {}
    for letter, spec in zip(string.ascii_lowercase, args.runs):
        path, label, *after = spec.split(":")
        rows = read_rows(path)
        if after:
            if after[0] not in curves:
                raise SystemExit(f"plot_curves: {spec} continues '{after[0]}', which is not an earlier argument")
            last = curves[after[0]][1][-1]
            rows = [dict(r, env_steps=r["env_steps"] + last["env_steps"],
                         seconds=None if r["seconds"] is None else r["seconds"] + last["seconds"]) for r in rows]
        curves[letter] = (label, rows)

    draw(list(curves.values()), args.title, args.out)
    print(json.dumps({label: rows for label, rows in curves.values()}))


if __name__ == "__main__":
    main()
