"""Greedy success of every checkpoint of a run, under the evaluation protocol, as a curve (PNG + table).

    python accerl.py --task libero_spatial/0 --init-policy SFT --checkpoint-every-updates 10 --keep-checkpoints 100 \
        --num-eval-workers 0 --final-eval-episodes 0 --run-dir runs/R           # train, no evaluation inside
    python benchmarks/checkpoint_curve.py runs/R --baseline SFT --eval-workers 14 --out docs/curve.png [-- OPTS]

Each checkpoint under <run>/checkpoints is scored by `accerl.py --eval-only --checkpoint` (greedy, every task x
--episodes-per-task; LIBERO: the suite's fixed initial states) into <run>/eval/update_N (skipped when already
there, so an interrupted call resumes); `--baseline DIR` also scores a saved policy (the warm start) as the
point at 0 env steps. Evaluating afterwards, with every core, is faster and cleaner than evaluation rounds
inside a run (they share cores and the GPU with training and mix policy versions). The task, cameras and env
options are the run's own. Time is the learner's seconds since it started (a resumed run continues the count).
OPTS: more accerl.py options for every evaluation (e.g. --mode serial). Prints a table and one JSON line.
The evaluations run in this process one after the other (torch and transformers are imported once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evaluate(run: Path, name: str, source: list[str], env: dict, args) -> dict:
    out = run / "eval" / name
    if not (out / "eval_results.json").is_file():
        import accerl

        cmd = ["--eval-only", *source, "--task", env["task"],
               "--env-options", json.dumps(json.loads(env.get("env_options") or "{}")),
               "--num-eval-workers", str(args.eval_workers), "--eval-episodes-per-task", str(args.episodes_per_task),
               "--seed", str(args.seed), "--run-dir", str(out),
               *(["--wrist-camera"] if env.get("wrist_camera") else []), *args.extra]
        print("# accerl.py " + " ".join(cmd), flush=True)
        code = accerl.main(accerl.cli_with_preset(accerl.Args, cmd))
        if code != 0:
            raise SystemExit(f"checkpoint_curve: evaluating {name} failed (exit code {code}; its log is above)")
    return json.loads((out / "eval_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory with checkpoints/")
    parser.add_argument("--baseline", default=None, help="a saved policy (the run's --init-policy) scored at step 0")
    parser.add_argument("--eval-workers", type=int, default=2)
    parser.add_argument("--episodes-per-task", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="PNG: success vs env steps and vs seconds")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]  # more accerl.py options after --, e.g. -- --mode serial
    run = Path(args.run)
    checkpoints = sorted(p for p in (run / "checkpoints").glob("update_*") if (p / "meta.json").is_file())
    if not checkpoints:
        raise SystemExit(f"checkpoint_curve: no complete checkpoint under {run}/checkpoints")
    env = json.loads((checkpoints[0] / "meta.json").read_text())["args"]["env"]
    rows = []
    if args.baseline:
        result = evaluate(run, "baseline", ["--init-policy", args.baseline], env, args)
        rows.append({"update": 0, "env_steps": 0, "seconds": 0.0, "success": result["success_rate"],
                     "episodes": result["episodes"], "source": args.baseline})
    for path in checkpoints:
        meta = json.loads((path / "meta.json").read_text())
        result = evaluate(run, path.name, ["--checkpoint", str(path)], env, args)
        rows.append({"update": int(meta["update"]), "env_steps": int(meta["counters"]["global_env_step"]),
                     "seconds": meta.get("learner_seconds"), "success": result["success_rate"],
                     "episodes": result["episodes"], "source": str(path)})
    print(f"\n{env['task']}: greedy success per checkpoint ({args.episodes_per_task} episodes per task)\n")
    print("| update | env steps | seconds | greedy success | episodes |\n|---|---|---|---|---|")
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {r['update']} | {r['env_steps']:,} | {seconds} | {100 * r['success']:.1f} % | {r['episodes']} |")
    if args.out:
        from plot_curves import draw  # benchmarks/, this script's directory

        print()
        draw([(run.name, rows)], f"{env['task']}: greedy success of each checkpoint ({run.name})", args.out)
    print(json.dumps({"run": str(run), "task": env["task"], "rows": rows}))


if __name__ == "__main__":
    main()
