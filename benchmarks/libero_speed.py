"""LIBERO env speed and memory: LIBERO's stock env vs envs.libero.LiberoEnv, one process each.

    python benchmarks/libero_speed.py                      # libero_10 task 0, 128 px, ~50 s
    python benchmarks/libero_speed.py --compare docs/libero_render_side_by_side.png

Every configuration runs in a fresh subprocess (one env process at a time), so its resident memory is
its own: "rss_gb" at the end of the run and "peak_rss_gb" (ru_maxrss). Random actions, uniform in
[-1, 1]; an episode that ends is reset (not timed: resets are 0.4 s here vs 2-2.6 s stock).
- stock: LIBERO's OffScreenRenderEnv as OpenVLA builds it (both 128 px cameras, robosuite renders both
  at every step, all observables, hard_reset=True, full textures). "env_steps_per_s" = rendered steps/s.
- ours_policy: LiberoEnv defaults, agent view only, step_chunk of 8 rendering only the chunk's last
  step (what the policy sees). "env_steps_per_s" counts physics steps; "frames_per_s" = rendered frames.
- ours_every_step: the same, render_every_step=True (every step's frame rendered: world-model data).
- ours_wrist (--wrist): ours_policy with the wrist camera too (two frames per chunk).
The last line is JSON with everything, including speedup = ours_policy / stock env steps/s.
--compare renders one fixed initial state with the stock env and with ours (same MuJoCo state) and
writes stock | ours side by side (both in OpenVLA's orientation), printing the pixel differences for
full textures (max_texture_size=0) and for the default cap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_stock(suite: str, task: int, size: int, seconds: float) -> dict:
    import envs.libero as L  # sets MUJOCO_GL / LIBERO config before libero is imported
    import numpy as np
    from libero.libero.envs import OffScreenRenderEnv

    name = L._suite_task_names(suite)[task]
    t0 = time.perf_counter()
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(L.libero_root(), "bddl_files", suite, f"{name}.bddl"),
                             camera_heights=size, camera_widths=size)
    env.seed(0)
    env.reset()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    steps, busy, start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        _, _, done, _ = env.step(rng.uniform(-1, 1, 7))
        busy += time.perf_counter() - t
        steps += 1
        if done:
            env.reset()
    out = {"env_steps_per_s": steps / busy, "frames_per_s": 2 * steps / busy, "cameras": 2, "build_s": build_s,
           "rss_gb": _rss_gb(), "peak_rss_gb": _peak_rss_gb(), "torch_imported": "torch" in sys.modules}
    env.close()
    return out


def run_ours(suite: str, task: int, size: int, seconds: float, every_step: bool, wrist: bool) -> dict:
    import numpy as np

    from envs.libero import LiberoEnv

    t0 = time.perf_counter()
    env = LiberoEnv(suite, image_size=size, seed=0, wrist_camera=wrist, only_task=task,
                    render_every_step=every_step)
    env.reset()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    steps, chunks, busy, start = 0, 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (8, 7)))
        busy += time.perf_counter() - t
        steps += info["env_steps"]
        chunks += 1
        if terminated or truncated:
            env.reset()
    frames = (steps if every_step else chunks) + (chunks if wrist else 0)
    out = {"env_steps_per_s": steps / busy, "frames_per_s": frames / busy, "cameras": 2 if wrist else 1,
           "build_s": build_s, "rss_gb": _rss_gb(), "peak_rss_gb": _peak_rss_gb(),
           "torch_imported": "torch" in sys.modules}
    env.close()
    return out


def compare(suite: str, task: int, size: int, path: str) -> dict:
    """Same MuJoCo state rendered by the stock env and by ours; writes stock | ours to `path`."""
    import envs.libero as L
    import numpy as np
    from libero.libero.envs import OffScreenRenderEnv
    from PIL import Image

    name = L._suite_task_names(suite)[task]
    state = L.load_init_states(suite, name)[0]
    ours = {}
    for cap in (0, L.LiberoOptions.max_texture_size):  # ours first: see envs.libero.set_mujoco_asset_cache
        env = L.LiberoEnv(suite, image_size=size, seed=0, only_task=task, init_states="fixed",
                          init_state_index=0, max_texture_size=cap)
        env.reset()
        env.sim.sim.set_state_from_flattened(state)
        env.sim.sim.forward()
        ours[cap] = env._observe()["image"]
        env.close()
    stock = OffScreenRenderEnv(bddl_file_name=os.path.join(L.libero_root(), "bddl_files", suite, f"{name}.bddl"),
                               camera_heights=size, camera_widths=size)
    stock.seed(0)
    stock.reset()
    obs = stock.set_init_state(state)
    stock_image = obs["agentview_image"][::-1, ::-1]  # OpenVLA's get_libero_image orientation
    stock.close()
    out = {}
    for cap, image in ours.items():
        diff = np.abs(image.astype(np.int16) - stock_image.astype(np.int16))
        out[f"cap_{cap}"] = {"max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean())}
    ours = ours[L.LiberoOptions.max_texture_size]
    Image.fromarray(np.concatenate([stock_image, np.full((size, 4, 3), 255, np.uint8), ours], axis=1)).save(path)
    out["png"] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="libero_10", help="suite, optionally /<task index> (default task 0)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed stepping per configuration")
    parser.add_argument("--wrist", action="store_true", help="also time ours with the wrist camera")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--compare", metavar="PNG", help="write the stock | ours side-by-side image")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    suite, _, index = args.task.partition("/")
    task = int(index or 0)

    if args._child:  # one configuration in this fresh process
        if args._child == "stock":
            result = run_stock(suite, task, args.size, args.seconds)
        elif args._child == "compare":
            result = compare(suite, task, args.size, args.compare)
        else:
            result = run_ours(suite, task, args.size, args.seconds, every_step=args._child == "ours_every_step",
                              wrist=args._child == "ours_wrist")
        print("RESULT " + json.dumps(result))
        return

    configs = ([] if args.skip_stock else ["stock"]) + ["ours_policy", "ours_every_step"]
    configs += ["ours_wrist"] if args.wrist else []
    configs += ["compare"] if args.compare else []
    results = {}
    for config in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--task", args.task, "--size", str(args.size),
               "--seconds", str(args.seconds), "--_child", config]
        if config == "compare":
            cmd += ["--compare", args.compare]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{config} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[config] = json.loads(lines[-1][len("RESULT "):])
        r = results[config]
        if config == "compare":
            print(f"{config:16s} " + ", ".join(f"{k}: {v}" for k, v in r.items()))
        else:
            print(f"{config:16s} {r['env_steps_per_s']:6.1f} env steps/s  {r['frames_per_s']:6.1f} frames/s  "
                  f"({r['cameras']} camera(s))  rss {r['rss_gb']:.2f} GB  peak {r['peak_rss_gb']:.2f} GB  "
                  f"build+reset {r['build_s']:.1f} s", flush=True)
    summary = {"task": f"{suite}/{task}", "size": args.size, "cpu_count": os.cpu_count(), **results}
    try:
        import mujoco
        import robosuite

        summary["versions"] = {"mujoco": mujoco.__version__, "robosuite": robosuite.__version__}
    except ImportError:
        pass
    if "stock" in results:
        summary["speedup_env_steps"] = results["ours_policy"]["env_steps_per_s"] / results["stock"]["env_steps_per_s"]
        summary["speedup_every_step"] = (results["ours_every_step"]["env_steps_per_s"]
                                         / results["stock"]["env_steps_per_s"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
