"""Scaling over GPUs: K inference servers and M data-parallel learners on G GPUs, async and sync modes.

    python benchmarks/scaling.py --gpus 1,2,4 --seconds 60          # a 4-GPU host, default settings
    python benchmarks/scaling.py --gpus 1,2,4 --seconds 90 -- --policy.preset base   # a GPU-sized policy
    python benchmarks/scaling.py --gpus 1,2 --device cpu --seconds 30 --env-workers-per-gpu 1 \
        --step-cost-ms 0 -- --policy.hidden 64                       # smoke test on a CPU-only machine

For every GPU count G (default 1, 2, 4, 8, capped to the GPUs torch sees) and every mode, the real entry
script runs for --seconds with learning on and evaluation off, on the built-in task (tabletop2d) with a
LIBERO-like heavy-tailed step cost (lognormal, mean --step-cost-ms, plus --reset-cost-ms per reset).

Placement ("colocated", the default): K = M = G; GPU g runs `inference_g` and learner rank g, and
--env-workers-per-gpu x G env workers (CPU processes) are assigned round-robin to the servers.
"split" (G even): inference servers on the first G/2 GPUs, learner ranks on the other G/2.
The work per GPU is held fixed (weak scaling): env workers per GPU, and --segments-per-update-per-gpu x G
segments per update (each learner rank trains on the same share), so env steps/s per GPU should stay flat
as G grows (linear scaling), or rise (super-linear).

Busy fractions are measured inside our processes: useful time over wall time, where useful is the
batched forward with its copies (inference) or forward + backward + optimiser step with its all-reduces,
synchronised (learner), averaged over the steady part of the run and over processes. Rates are over the
steady part too (after the first env step plus a warm-up). Ends with a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from throughput import ROOT, hardware


def placement(gpus: int, how: str, device: str) -> tuple[int, list[str], list[str]]:
    """(processes per role, inference devices, learner devices) for G GPUs (or G CPU process pairs)."""
    if device == "cpu":
        return gpus, ["cpu"] * gpus, ["cpu"] * gpus
    if how == "split" and gpus >= 2:
        half = gpus // 2
        return half, [f"cuda:{g}" for g in range(half)], [f"cuda:{g}" for g in range(half, 2 * half)]
    return gpus, [f"cuda:{g}" for g in range(gpus)], [f"cuda:{g}" for g in range(gpus)]


def run_one(args, gpus: int, mode: str, run_dir: Path) -> dict:
    per_role, inference, learner = placement(gpus, args.placement, args.device)
    cmd = [sys.executable, str(ROOT / "accerl.py"), "--no-task-defaults", "--mode", mode, "--task", "tabletop2d",
           "--run-dir", str(run_dir),
           "--num-env-workers", str(args.env_workers_per_gpu * gpus), "--envs-per-worker", str(args.envs_per_worker),
           "--num-inference-servers", str(per_role), "--inference-devices", *inference,
           "--num-learners", str(per_role), "--learner-devices", *learner, "--device", args.device,
           "--segments-per-update", str(args.segments_per_update_per_gpu * gpus),
           "--total-env-steps", str(10**12), "--max-seconds", str(args.seconds), "--num-eval-workers", "0",
           "--final-eval-episodes", "0", "--eval-every-updates", "0", "--step-cost-ms", str(args.step_cost_ms),
           "--step-cost-kind", args.step_cost_kind, "--env-options", json.dumps({"reset_cost_ms": args.reset_cost_ms}),
           "--log-every-s", "30", "--checkpoint-every-updates", "0",
           *(["--policy.image-size", str(args.image_size)] if args.image_size else []), *args.extra]
    print(f"# G={gpus} {mode}: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.seconds + 600)
    row = {"gpus": gpus, "mode": mode, "inference_servers": per_role, "learners": per_role,
           "inference_devices": inference, "learner_devices": learner}
    if result.returncode != 0 or not (run_dir / "summary.json").exists():
        print(f"# G={gpus} {mode} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", flush=True)
        return {**row, "error": result.stderr[-3000:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    rate = summary["steady_env_steps_per_s"]
    return {**row, "env_steps_per_s": rate, "env_steps_per_s_per_gpu": rate / gpus if rate else None,
            "learner_samples_per_s": summary["learner_samples_per_s"],
            "learner_busy_fraction": summary["learner_busy_fraction"],
            "inference_busy_fraction": summary["inference_busy_fraction"], "updates": summary["updates"],
            "card": "cpu" if args.device == "cpu" else summary["versions"]["cuda"]}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | mode | env steps/s | env steps/s per GPU | per-GPU scaling | learner samples/s | "
             "learner busy | inference busy | updates | card |", "|" + "---|" * 10]
    # per-GPU scaling: env steps/s per GPU over that of the same mode's smallest G (1.0 = linear)
    base = {r["mode"]: r.get("env_steps_per_s_per_gpu") for r in rows if r["gpus"] == min(x["gpus"] for x in rows)}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['mode']} | failed | | | | | | | |")
            continue
        per_gpu, ref = r["env_steps_per_s_per_gpu"], base.get(r["mode"])
        lines.append(f"| {r['gpus']} | {r['mode']} | {_fmt(r['env_steps_per_s'], '.1f')} | {_fmt(per_gpu, '.1f')} | "
                     f"{_fmt(per_gpu / ref if per_gpu and ref else None, '.2f')} | "
                     f"{_fmt(r['learner_samples_per_s'], '.1f')} | {_fmt(r['learner_busy_fraction'], '.1%')} | "
                     f"{_fmt(r['inference_busy_fraction'], '.1%')} | {r['updates']} | {r['card']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts, comma-separated (capped to the GPUs visible); "
                        "with --device cpu: inference server / learner rank pairs, all on the CPU")
    parser.add_argument("--modes", nargs="+", default=["async", "sync"], choices=["async", "sync"])
    parser.add_argument("--seconds", type=float, default=60.0, help="wall clock per run (startup included)")
    parser.add_argument("--env-workers-per-gpu", type=int, default=14)
    parser.add_argument("--envs-per-worker", type=int, default=1)
    parser.add_argument("--step-cost-ms", type=float, default=20.0, help="mean heavy-tailed env step cost")
    parser.add_argument("--step-cost-kind", default="sleep", choices=["sleep", "spin"])
    parser.add_argument("--reset-cost-ms", type=float, default=300.0)
    parser.add_argument("--segments-per-update-per-gpu", type=int, default=4, help="async super batch per GPU")
    parser.add_argument("--placement", default="colocated", choices=["colocated", "split"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: GPUs; cpu: a smoke test")
    parser.add_argument("--image-size", type=int, default=None, help="default: the policy's (128 px; presets' own)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("extra", nargs="*", help="more accerl.py options after --, e.g. -- --policy.hidden 512")
    args = parser.parse_args()

    requested = sorted({int(g) for g in args.gpus.split(",")})
    skipped = []
    if args.device != "cpu":
        import torch

        visible = torch.cuda.device_count()
        if visible == 0:
            raise SystemExit("scaling: torch sees no GPU; use --device cpu for a smoke test")
        skipped = [{"gpus": g, "why": f"only {visible} GPU(s) visible"} for g in requested if g > visible]
        requested = [g for g in requested if g <= visible]
        if args.placement == "split":
            skipped += [{"gpus": g, "why": "split placement needs an even GPU count"} for g in requested if g % 2]
            requested = [g for g in requested if g % 2 == 0]
    for s in skipped:
        print(f"# skipped G={s['gpus']}: {s['why']}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gpus in requested:
            for mode in args.modes:
                rows.append(run_one(args, gpus, mode, Path(tmp) / f"g{gpus}_{mode}"))
                print("# " + json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
    print()
    print(table(rows))
    result = {"benchmark": "scaling", "task": "tabletop2d", "placement": args.placement, "device": args.device,
              "seconds_per_run": args.seconds, "env_workers_per_gpu": args.env_workers_per_gpu,
              "envs_per_worker": args.envs_per_worker, "step_cost_ms": args.step_cost_ms,
              "step_cost_kind": args.step_cost_kind, "reset_cost_ms": args.reset_cost_ms,
              "segments_per_update_per_gpu": args.segments_per_update_per_gpu, "extra": args.extra,
              "runs": [{k: v for k, v in r.items() if k != "error"} | ({"failed": True} if "error" in r else {})
                       for r in rows],
              "skipped": skipped, "hardware": hardware()}
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
