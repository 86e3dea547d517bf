"""Run several accerl configurations side by side, each pinned to its own pair of CPU cores (taskset),
so that hyperparameter comparisons on a many-core machine see the same 2-core budget as a laptop.

    python benchmarks/parallel_cpu_runs.py --seconds 420 --out-dir /tmp/sweep \
        --config base= --config lr1e-3="--policy-lr 1e-3" --config mb2="--num-minibatches 2"

Prints, per configuration, the greedy-success history (env steps, wall seconds, success) and writes
<out-dir>/<name>.log and <out-dir>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = re.compile(r"^(\d\d):(\d\d):(\d\d) \[main\] eval round \d+: success ([\d.]+) over (\d+) episodes "
                  r"\(policy version (\d+), env step ([\d,]+)\)")


def parse(log: str) -> list[dict]:
    points, start = [], None
    for line in log.splitlines():
        stamp = re.match(r"^(\d\d):(\d\d):(\d\d) ", line)
        if stamp and start is None:
            start = int(stamp[1]) * 3600 + int(stamp[2]) * 60 + int(stamp[3])
        m = EVAL.match(line)
        if m:
            t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
            points.append({"wall_s": (t - start) % 86400, "success": float(m[4]), "episodes": int(m[5]),
                           "update": int(m[6]), "env_steps": int(m[7].replace(",", ""))})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="name=extra accerl options")
    parser.add_argument("--seconds", type=float, default=420)
    parser.add_argument("--cores-per-run", type=int, default=2)
    parser.add_argument("--first-core", type=int, default=0, help="pin runs to cores from here on (leave the "
                        "others to another job)")
    parser.add_argument("--out-dir", default="/tmp/sweep")
    parser.add_argument("--common", default="", help="options given to every configuration")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for i, spec in enumerate(args.config):
        name, _, extra = spec.partition("=")
        first = args.first_core + i * args.cores_per_run
        cores = ",".join(str(c) for c in range(first, first + args.cores_per_run))
        cmd = ["taskset", "-c", cores, sys.executable, str(ROOT / "accerl.py"), "--device", "cpu",
               "--max-seconds", str(args.seconds), "--total-env-steps", str(10**9), "--run-dir", str(out / name),
               "--log-every-s", "60", *shlex.split(args.common), *shlex.split(extra)]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, OMP_NUM_THREADS="1")), log)
        print(f"{name}: cores {cores}: {' '.join(shlex.quote(c) for c in cmd[3:])}", flush=True)
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
    results = {}
    for name in procs:
        text = (out / f"{name}.log").read_text()
        results[name] = parse(text)
        curve = " ".join(f"{p['success']:.2f}@{p['wall_s'] / 60:.1f}m" for p in results[name])
        print(f"{name}: {curve}", flush=True)
        if "Traceback" in text:
            print(f"{name}: FAILED\n{text[-2000:]}", flush=True)
    (out / "sweep.json").write_text(json.dumps(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
