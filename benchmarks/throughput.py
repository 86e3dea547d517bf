"""Async vs sync throughput on the same task, policy and worker count, plus the env-only ceiling.

    python benchmarks/throughput.py --seconds 60 --num-env-workers 2
    python benchmarks/throughput.py --seconds 120 --num-env-workers 14 --envs-per-worker 1 \
        --step-cost-ms 20 --device cuda        # the GPU machine, LIBERO-like heavy-tailed step cost

Each mode runs the real entry script (learning on, evaluation off) in its own process tree for
`--seconds` (sync: `--sync-seconds`); async's rate is measured over the steady part of the run (after the
first env step plus a warm-up), sync's over whole collect + train rounds (first update to last) where the
run held two or more (give it the time: a round with a large learner is long). The ceiling runs the same
envs in the same number of processes with random actions and no model: what the simulators alone can do.
`--when-learner-behind drop-oldest` lets async's env workers overwrite the oldest full segment instead of
waiting for the learner (the paper's bounded replay); `async_trained_fraction` then says how much of what
async collected the learner trained on. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ceiling_worker(rank, task, image_size, envs_per_worker, options, seconds, chunk_len, out_q):
    import torch

    from envs import make_env

    torch.set_num_threads(1)
    envs = [make_env(task, image_size=image_size, seed=1000 * rank + i, **options) for i in range(envs_per_worker)]
    for env in envs:
        env.reset()
    rng = np.random.default_rng(rank)
    start, steps = time.perf_counter(), 0
    warm = start + min(5.0, seconds / 5)
    counted_from, counted = None, 0
    while time.perf_counter() - start < seconds:
        for env in envs:
            _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (chunk_len, 7)))
            steps += info["env_steps"]
            if counted_from is None and time.perf_counter() >= warm:
                counted_from = time.perf_counter()
            if counted_from is not None:
                counted += info["env_steps"]
            if terminated or truncated:
                env.reset()
    out_q.put((counted, time.perf_counter() - (counted_from or start)))
    for env in envs:
        env.close()


def env_ceiling(args) -> float:
    """Env steps/s of the same envs stepping random actions in the same number of processes."""
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    seconds = args.ceiling_seconds or args.seconds
    options = json.loads(args.env_options)
    if args.task.startswith("tabletop2d"):
        options.update(step_cost_ms=args.step_cost_ms, step_cost_kind=args.step_cost_kind)
    procs = [ctx.Process(target=_ceiling_worker, args=(r, args.task, args.image_size, args.envs_per_worker, options,
                                                       seconds, 8, out_q)) for r in range(args.num_env_workers)]
    for p in procs:
        p.start()
    results = [out_q.get(timeout=seconds + 600) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(steps / elapsed for steps, elapsed in results))


def pipeline_rate(args, mode: str, run_dir: Path) -> dict:
    seconds = args.sync_seconds if mode == "sync" else args.seconds
    # the plain defaults (the tiny SigLIP VLA at --image-size), as every recorded figure used
    cmd = [sys.executable, str(ROOT / "accerl.py"), "--no-task-defaults", "--mode", mode, "--task", args.task,
           "--run-dir", str(run_dir),
           "--num-env-workers", str(args.num_env_workers), "--envs-per-worker", str(args.envs_per_worker),
           "--total-env-steps", str(10**12), "--max-seconds", str(seconds), "--num-eval-workers", "0",
           "--final-eval-episodes", "0", "--eval-every-updates", "0", "--device", args.device,
           "--step-cost-ms", str(args.step_cost_ms), "--step-cost-kind", args.step_cost_kind,
           "--env-options", args.env_options, "--policy.image-size", str(args.image_size),
           "--log-every-s", "30", "--checkpoint-every-updates", "0", *args.extra]
    if mode == "async":
        cmd += ["--when-learner-behind", args.when_learner_behind]
    print(f"# {mode}: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        info["gpus"] = torch.cuda.device_count()
    except ImportError:
        info["gpu"] = "unknown"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tabletop2d")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall clock per mode")
    parser.add_argument("--sync-seconds", type=float, default=None,
                        help="wall clock of sync (default --seconds): long enough for several collect + train rounds")
    parser.add_argument("--ceiling-seconds", type=float, default=None,
                        help="wall clock of the env-only ceiling (default --seconds; it has no start-up to amortise)")
    parser.add_argument("--num-env-workers", type=int, default=2)
    parser.add_argument("--envs-per-worker", type=int, default=2)
    parser.add_argument("--step-cost-ms", type=float, default=0.0, help="tabletop2d: mean heavy-tailed step cost")
    parser.add_argument("--step-cost-kind", default="sleep", choices=["sleep", "spin"])
    parser.add_argument("--env-options", default="{}")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", nargs="+", default=["async", "sync"])
    parser.add_argument("--when-learner-behind", default="wait", choices=["wait", "drop-oldest"],
                        help="async only: accerl.py's --when-learner-behind (sync trains on every segment)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("extra", nargs="*", help="more accerl.py options after --, e.g. -- --policy.hidden 512")
    args = parser.parse_args()
    args.sync_seconds = args.sync_seconds or args.seconds

    result = {"task": args.task, "num_env_workers": args.num_env_workers, "envs_per_worker": args.envs_per_worker,
              "step_cost_ms": args.step_cost_ms, "seconds_per_mode": args.seconds,
              "when_learner_behind": args.when_learner_behind, "extra": args.extra}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            summary = pipeline_rate(args, mode, Path(tmp) / mode)
            # sync alternates collection and training: its rate is over whole rounds (first update to last) when
            # the run held at least two, else over the steady window like async's (a partial round biases it)
            rounds = summary.get("env_steps_per_s_between_updates") if mode == "sync" else None
            result[f"{mode}_env_steps_per_s"] = rounds or summary["steady_env_steps_per_s"]
            result[f"{mode}_steady_window_env_steps_per_s"] = summary["steady_env_steps_per_s"]
            result[f"{mode}_learner_samples_per_s"] = summary.get("learner_samples_per_s")
            result[f"{mode}_updates"] = summary["updates"]
            # the share of collected chunk steps the learner trained on (drop-oldest overwrites the rest)
            run_args = json.loads((Path(tmp) / mode / "args.json").read_text())["workers"]
            trained = summary["updates"] * run_args["segments_per_update"] * run_args["segment_len"]
            result[f"{mode}_dropped_segments"] = summary["dropped_segments"]
            result[f"{mode}_trained_fraction"] = trained / max(summary["chunk_step"], 1)
            print(f"{mode}: {result[f'{mode}_env_steps_per_s']:.1f} env steps/s, {summary['updates']} updates, "
                  f"learner {summary.get('learner_samples_per_s') or 0:.1f} samples/s", flush=True)
    ceiling = env_ceiling(args)
    print(f"env-only ceiling: {ceiling:.1f} env steps/s", flush=True)
    result["ceiling_env_steps_per_s"] = ceiling
    if "async_env_steps_per_s" in result and "sync_env_steps_per_s" in result:
        result["ratio"] = result["async_env_steps_per_s"] / max(result["sync_env_steps_per_s"], 1e-9)
    if "async_env_steps_per_s" in result:
        result["ceiling_fraction"] = result["async_env_steps_per_s"] / max(ceiling, 1e-9)
    result["hardware"] = hardware()
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
