"""Demonstrations in LIBERO's own HDF5 layout: a writer, a reader (ours and the official LIBERO files),
and the collection command for the built-in task family.

    python demos.py collect --task tabletop2d --episodes 50 --out demos/tabletop2d --workers 2 --noise 0.1
    python demos.py info demos/tabletop2d                 # per file: instruction, demos, steps, success

Layout (LIBERO's scripts/create_dataset.py, robomimic-style), one file per task, `<task-name>_demo.hdf5`:

    data                          attrs: env_name, env_args (JSON), problem_info (JSON: problem_name,
                                  domain_name, language_instruction), macros_image_convention, num_demos,
                                  total (steps over all demos); ours only: accerl (JSON, ACCERL_META)
    data/demo_<i>                 attrs: num_samples (T), init_state (= states[0], when states are given);
                                  ours only: success
        actions     (T, 7) float64    ours: the env's normalised actions; LIBERO: OSC_POSE controller units
        rewards     (T,)   uint8      1 at the last step of a successful demo
        dones       (T,)   uint8      1 at the last step
        states      (T, S) float64    simulator state before each step (only when given)
        robot_states (T, P) float32   ours: the env's proprio; LIBERO: gripper qpos, eef pos, eef quat
        obs/agentview_rgb   (T, H, W, 3) uint8  third-person camera, OpenGL convention (upside down)
        obs/eye_in_hand_rgb (T, H, W, 3) uint8  wrist camera (only when given)
        obs/ee_pos, ee_ori, gripper_states, joint_states   low-dim robot obs (those that are given)
        obs/proprio (T, P) float32    ours only: obs["proprio"] exactly as the env returned it

Step t pairs the observation *before* action t with action t. Our files are written that way; the
official files are not (`libero_obs_shift` below), which is one of four differences `read_demos` undoes:

1. Images. Official frames are robosuite's raw OpenGL readout (macros_image_convention "opengl"): the
   camera view upside down. Our envs return upright frames (envs/__init__.py); the LIBERO adapter by
   default in OpenVLA's orientation (the raw readout rotated 180 degrees = the camera view mirrored
   left-right, envs/libero.py `image_orientation`). The writer stores frames in the official convention
   too (so tools written for the official files read ours unchanged) and records the orientation its
   env returned; the reader gives frames back in that orientation ("openvla" for official files, the
   adapter's default), or in the one asked for.
2. Actions. Official actions are OSC_POSE commands; ours are the env's normalised actions (the ones RL
   samples). Dims 0-5 of official actions are normalised with OpenVLA's q01/q99 statistics of the suite
   (the inverse of `LiberoEnv.to_libero_action`); the gripper is already +1 close / -1 open.
3. Alignment. LIBERO's create_dataset.py steps the env and *then* records the observation, so its
   obs[t] is the observation after action t (LIBERO issue #54). The reader pairs obs[t] with action
   t + 1 (dropping the last frame and the first action) unless `libero_obs_shift=False`.
4. Extras. Official files have no `success` and no `proprio`: success comes from rewards (else dones),
   proprio = [ee_pos, ee_ori, gripper_states] (the LIBERO adapter's 8-D axis-angle proprio, OpenVLA-OFT's
   LIBERO state), else robot_states. The instruction of an official file is derived from its file name
   as the adapter derives it (`task.language`), so training prompts equal the env's.

Frames travel between processes only through files (style.md rule 5): a collection worker writes its
episodes to a shard file, the main process copies the shards' groups into the per-task file.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import h5py
import numpy as np
import tyro

from checkpoint import fsync_dir
from envs import env_spec, make_env, parse_task

ImageOrientation = Literal["camera", "openvla"]
"""How an env returned its frames: "camera" = the camera's true view, upright (tabletop2d; LIBERO with
image_orientation="camera"); "openvla" = that view mirrored left-right (the LIBERO adapter's default)."""
ACCERL_META = "accerl"
"""Attribute of `data` (JSON) that marks our files: format version, env task, task id, image
orientation and size, action space. Official LIBERO files lack it."""
FORMAT_VERSION = 1
IMAGE_CONVENTION = "opengl"
"""robosuite's macros.IMAGE_CONVENTION of the official files: frames stored upside down."""
DEMO_SEED_STREAM = 4
"""Seed path component of demonstration episodes; evaluation resets with seeds 0..N-1 (accerl.py), so
demo scenes never coincide with evaluation scenes."""


# ---------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------
def _stored_frames(images: np.ndarray, orientation: str) -> np.ndarray:
    """Env frames (T, H, W, 3) in `orientation` -> the OpenGL convention of the official files."""
    camera_view = images[:, :, ::-1] if orientation == "openvla" else images  # un-mirror OpenVLA frames
    return np.ascontiguousarray(camera_view[:, ::-1])  # upside down, as robosuite's raw readout


class DemoWriter:
    """Writes one task's demonstrations into one LIBERO-layout file, atomically: everything goes to a hidden
    temporary file next to `path`, which replaces `path` (os.replace) only in `close()`. A crash or an
    exception inside `with` leaves the previous file, never a half-written one.

        with DemoWriter("demos/pick_up_the_red_block_demo.hdf5", "pick up the red block") as writer:
            writer.add_episode(images, actions, proprio, success=True)
    """

    def __init__(self, path: str | Path, instruction: str, *, image_orientation: ImageOrientation = "camera",
                 env_name: str = "tabletop2d", task: str | None = None, task_id: int | None = None,
                 env_kwargs: dict | None = None, problem_name: str | None = None, compression: str | None = "gzip"):
        """`image_orientation`: how the frames passed to `add_episode` are oriented (the env's setting);
        `task` / `task_id` / `env_kwargs`: how to rebuild the env (make_env), recorded in env_args;
        `compression`: HDF5 filter of the frames ("gzip" is in every HDF5 build; None as the official files)."""
        if image_orientation not in ("camera", "openvla"):
            raise ValueError(f"image_orientation={image_orientation!r}: use 'camera' or 'openvla'")
        self.path = Path(path)
        self.instruction = instruction
        self.image_orientation = image_orientation
        self.compression = compression
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = h5py.File(self._tmp, "w")
        self._data = self._file.create_group("data")
        self.num_demos, self.total = 0, 0
        problem_name = problem_name or self.path.name.removesuffix(".hdf5").removesuffix("_demo")
        attrs = self._data.attrs
        attrs["env_name"] = env_name
        # robomimic's "type" is left out on purpose: robomimic cannot build these envs (make_env can).
        attrs["env_args"] = json.dumps({"env_name": env_name, "problem_name": problem_name, "task": task,
                                        "env_kwargs": env_kwargs or {}})
        attrs["problem_info"] = json.dumps({"problem_name": problem_name, "domain_name": env_name,
                                            "language_instruction": instruction})
        attrs["macros_image_convention"] = IMAGE_CONVENTION
        self._meta = {"format_version": FORMAT_VERSION, "task": task, "task_id": task_id,
                      "image_orientation": image_orientation, "image_size": None, "actions": "normalised"}

    def add_episode(self, images: np.ndarray, actions: np.ndarray, proprio: np.ndarray, success: bool,
                    wrist_images: np.ndarray | None = None, states: np.ndarray | None = None,
                    robot_obs: dict[str, np.ndarray] | None = None, terminated: bool | None = None) -> int:
        """Append one episode; returns its demo index. Row t of every array is step t: the observation
        before action t, and action t (normalised, (T, 7)). `robot_obs` adds LIBERO's low-dim obs keys
        (ee_pos, ee_ori, gripper_states, joint_states) for tools that read them. `terminated`: the env ended
        the episode after its last action (success or a failure such as tabletop2d's wrong grasp), rather
        than the time limit (default: success); stored as attribute "terminated" (ours; LIBERO's files have
        none, their episodes end on success)."""
        images = np.asarray(images)
        actions = np.asarray(actions, dtype=np.float64)
        proprio = np.asarray(proprio, dtype=np.float32)
        steps = len(actions)
        if steps < 1 or actions.ndim != 2:
            raise ValueError(f"actions must be (T >= 1, action_dim), got {actions.shape}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != steps or images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (T={steps}, H, W, 3), got {images.dtype} {images.shape}")
        if proprio.ndim != 2 or len(proprio) != steps:
            raise ValueError(f"proprio must be (T={steps}, P), got {proprio.shape}")
        if self._meta["image_size"] is None:
            self._meta["image_size"] = int(images.shape[1])
        elif images.shape[1] != self._meta["image_size"]:
            raise ValueError(f"images are {images.shape[1]} px, earlier episodes {self._meta['image_size']} px")
        demo = self._data.create_group(f"demo_{self.num_demos}")
        obs = demo.create_group("obs")
        self._frames(obs, "agentview_rgb", images)
        if wrist_images is not None:
            wrist_images = np.asarray(wrist_images)
            if wrist_images.shape != images.shape or wrist_images.dtype != np.uint8:
                raise ValueError(f"wrist_images must match images {images.shape}, got {wrist_images.shape}")
            self._frames(obs, "eye_in_hand_rgb", wrist_images)
        for key, value in (robot_obs or {}).items():
            if key not in ("ee_pos", "ee_ori", "gripper_states", "joint_states"):
                raise ValueError(f"robot_obs key {key!r}: use ee_pos, ee_ori, gripper_states, joint_states")
            obs.create_dataset(key, data=np.asarray(value, dtype=np.float64).reshape(steps, -1))
        obs.create_dataset("proprio", data=proprio)
        demo.create_dataset("actions", data=actions)
        ends = np.zeros(steps, dtype=np.uint8)
        ends[-1] = 1
        demo.create_dataset("dones", data=ends)
        demo.create_dataset("rewards", data=ends * np.uint8(bool(success)))
        demo.create_dataset("robot_states", data=proprio)
        if states is not None:
            states = np.asarray(states, dtype=np.float64).reshape(steps, -1)
            demo.create_dataset("states", data=states)
            demo.attrs["init_state"] = states[0]
        demo.attrs["num_samples"] = steps
        demo.attrs["success"] = bool(success)
        demo.attrs["terminated"] = bool(success if terminated is None else terminated)
        self.num_demos += 1
        self.total += steps
        return self.num_demos - 1

    def _frames(self, group: h5py.Group, name: str, images: np.ndarray) -> None:
        # One frame per HDF5 chunk: a reader that wants a few frames decompresses only those.
        group.create_dataset(name, data=_stored_frames(images, self.image_orientation),
                             chunks=(1, *images.shape[1:]) if self.compression else None,
                             compression=self.compression, compression_opts=1 if self.compression == "gzip" else None)

    def append_file(self, path: str | Path) -> int:
        """Copy every demo of another file written by DemoWriter for the same task (HDF5-level copy: frames
        never pass through Python). Returns the number of demos copied."""
        with h5py.File(path, "r") as source:
            meta = json.loads(_attr_str(source["data"].attrs[ACCERL_META]))
            if meta["image_orientation"] != self.image_orientation:
                raise ValueError(f"{path}: image_orientation {meta['image_orientation']} != {self.image_orientation}")
            if self._meta["image_size"] is None:
                self._meta["image_size"] = meta["image_size"]
            elif meta["image_size"] not in (None, self._meta["image_size"]):
                raise ValueError(f"{path}: {meta['image_size']} px images, this file has {self._meta['image_size']}")
            names = _demo_names(source["data"])
            for name in names:
                source.copy(source["data"][name], self._data, name=f"demo_{self.num_demos}")
                self.num_demos += 1
                self.total += int(source["data"][name].attrs["num_samples"])
        return len(names)

    def close(self) -> Path:
        """Finish the file and move it into place. Returns its path."""
        self._data.attrs["num_demos"] = self.num_demos
        self._data.attrs["total"] = self.total
        self._data.attrs[ACCERL_META] = json.dumps(self._meta)
        self._file.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; `path` keeps whatever it held before."""
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------
def _attr_str(value) -> str:
    """h5py returns str or bytes for string attributes, depending on how they were written."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _demo_names(data: h5py.Group) -> list[str]:
    """demo_0, demo_1, ... in numeric order (a plain sort puts demo_10 before demo_2)."""
    names = [name for name in data.keys() if re.fullmatch(r"demo_\d+", name)]
    return sorted(names, key=lambda name: int(name[5:]))


def demo_files(path: str | Path) -> list[Path]:
    """An .hdf5 file, or every .hdf5 file under a directory (recursively, sorted; hidden files skipped:
    they are unfinished temporary files)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no demonstration file or directory at {path}")
    return sorted(p for p in path.rglob("*.hdf5")
                  if not any(part.startswith(".") for part in p.relative_to(path).parts))


def _libero_suite(path: Path, data: h5py.Group) -> str | None:
    """The LIBERO suite of an official file: from its BDDL path (env_args / bddl_file_name), else from
    its directory (the official datasets unpack as <suite>/<task>_demo.hdf5)."""
    from envs.libero import SUITES

    candidates = []
    if "env_args" in data.attrs:
        candidates.append(str(json.loads(_attr_str(data.attrs["env_args"])).get("bddl_file", "")))
    if "bddl_file_name" in data.attrs:
        candidates.append(_attr_str(data.attrs["bddl_file_name"]))
    candidates.append(str(path.resolve().parent))
    for text in candidates:
        for part in reversed(re.split(r"[/\\]", text)):
            if part in SUITES:
                return part
    return None


def libero_to_normalised_actions(actions: np.ndarray, stats: str) -> np.ndarray:
    """LIBERO OSC_POSE commands (T, 7) -> the env's normalised actions: the inverse of
    `LiberoEnv.to_libero_action` (x = 2 (a - q01) / (q99 - q01) - 1 on dims 0-5, clipped to [-1, 1], as
    OpenVLA normalises; the gripper is LIBERO's +1 close / -1 open, which our > 0 = close keeps)."""
    from envs.libero import OPENVLA_ACTION_STATS

    q01, q99 = (np.asarray(v, dtype=np.float64) for v in OPENVLA_ACTION_STATS[stats])
    out = np.asarray(actions, dtype=np.float64).copy()
    out[:, :6] = np.clip(2.0 * (out[:, :6] - q01) / (q99 - q01) - 1.0, -1.0, 1.0)
    out[:, 6] = np.clip(out[:, 6], -1.0, 1.0)
    return out


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3), LANCZOS (as OpenVLA resizes its LIBERO frames)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.LANCZOS)) for f in frames])


def read_demos(path: str | Path, *, image_orientation: Literal["camera", "openvla", "stored"] | None = None,
               image_size: int | None = None, action_stats: str = "auto", only_successful: bool = False,
               wrist: bool = True, libero_obs_shift: bool = True) -> list[dict]:
    """Read every demo of a file or a directory of files (ours or the official LIBERO ones).

    Returns one dict per episode, step t = (observation before action t, action t):
        "images" uint8 (T, H, W, 3); "wrist_images" uint8 (T, H, W, 3) or None; "actions" float32 (T, 7),
        normalised; "proprio" float32 (T, P); "instruction" str; "success" bool; "task_id" int or None;
        "terminated" bool (the env ended it: success or a failure; files without the attribute: success);
        "source" "<file>:<demo>".
    `image_orientation`: None = the orientation of the env that recorded the file ("openvla" for the
    official files: the LIBERO adapter's default), "camera" / "openvla" as in `ImageOrientation`, "stored"
    = the file's array untouched. `image_size`: resize when the stored frames differ (prefer collecting at
    the policy's resolution: resized frames differ from frames rendered at that size).
    `action_stats` (official files only): "auto" (the suite's OpenVLA statistics, as the adapter), a suite
    name, "identity", or "raw" (controller units, no normalisation). `libero_obs_shift` (official files
    only): pair obs[t] with action t + 1 (see the module docstring, point 3).
    """
    episodes = []
    for file in demo_files(path):
        with h5py.File(file, "r") as f:
            episodes += _read_file(file, f, image_orientation, image_size, action_stats, only_successful, wrist,
                                   libero_obs_shift)
    return episodes


def _read_file(file: Path, f: h5py.File, image_orientation, image_size, action_stats, only_successful, wrist,
               libero_obs_shift) -> list[dict]:
    data = f["data"]
    ours = ACCERL_META in data.attrs
    meta = json.loads(_attr_str(data.attrs[ACCERL_META])) if ours else {}
    convention = _attr_str(data.attrs.get("macros_image_convention", "opengl"))  # robosuite's default
    orientation = image_orientation or meta.get("image_orientation") or _libero_default_orientation()
    instruction = _instruction(file, data, ours)
    stats = None
    if not ours and action_stats != "raw":
        from envs.libero import OPENVLA_ACTION_STATS

        stats = action_stats
        if stats == "auto":
            suite = _libero_suite(file, data)
            if suite is None:
                raise ValueError(f"{file}: cannot tell the LIBERO suite (for the action statistics); pass "
                                 "action_stats='<suite>', 'identity' or 'raw'")
            stats = suite if suite in OPENVLA_ACTION_STATS else "identity"  # as LiberoOptions "auto"
        if stats not in OPENVLA_ACTION_STATS:
            raise ValueError(f"action_stats={action_stats!r}: use 'auto', 'raw' or one of "
                             f"{sorted(OPENVLA_ACTION_STATS)}")
    shift = 1 if (not ours and libero_obs_shift) else 0
    episodes = []
    for name in _demo_names(data):
        demo = data[name]
        obs = demo["obs"]
        if "success" in demo.attrs:
            success = bool(demo.attrs["success"])
        elif "rewards" in demo:
            success = bool(np.max(demo["rewards"][()]) > 0)
        else:
            success = bool(demo["dones"][-1]) if "dones" in demo else True
        if only_successful and not success:
            continue
        actions = demo["actions"][()]
        if stats is not None:
            actions = libero_to_normalised_actions(actions, stats)
        steps = len(actions) - shift
        if steps < 1:
            continue  # a one-step official demo has no aligned pair
        frames = {"images": obs["agentview_rgb"]}
        if wrist and "eye_in_hand_rgb" in obs:
            frames["wrist_images"] = obs["eye_in_hand_rgb"]
        episode = {"wrist_images": None}
        for key, dataset in frames.items():
            images = dataset[:steps]  # obs[t] goes with action t + shift
            if image_orientation != "stored":
                if convention == "opengl":
                    images = images[:, ::-1]  # -> the camera's true view
                if orientation == "openvla":
                    images = images[:, :, ::-1]  # -> mirrored left-right, as the adapter returns it
            if image_size is not None and images.shape[1:3] != (image_size, image_size):
                images = _resize(images, image_size)
            episode[key] = np.ascontiguousarray(images)
        episode.update(actions=actions[shift:].astype(np.float32), proprio=_proprio(demo, obs)[:steps],
                       instruction=instruction, success=success, task_id=meta.get("task_id"),
                       terminated=bool(demo.attrs.get("terminated", success)), source=f"{file}:{name}")
        episodes.append(episode)
    return episodes


def _libero_default_orientation() -> str:
    from envs.libero import LiberoOptions

    return LiberoOptions().image_orientation


def _instruction(file: Path, data: h5py.Group, ours: bool) -> str:
    """Ours: problem_info's instruction (the env's own). Official: LIBERO's `task.language`, derived from
    the file name exactly as the adapter derives the env's instruction (the BDDL's language_instruction
    can differ in case), with problem_info as the fallback for renamed files."""
    if not ours and file.name.endswith("_demo.hdf5"):
        from envs.libero import _language

        return _language(file.name.removesuffix("_demo.hdf5"))
    text = json.loads(_attr_str(data.attrs["problem_info"]))["language_instruction"]
    if isinstance(text, list):  # some files store it as a list of pieces (get_dataset_info.py joins them)
        text = "".join(text)
    return text.strip().strip('"')


def _proprio(demo: h5py.Group, obs: h5py.Group) -> np.ndarray:
    if "proprio" in obs:
        return obs["proprio"][()].astype(np.float32)
    parts = [obs[key][()] for key in ("ee_pos", "ee_ori", "gripper_states") if key in obs]
    if len(parts) == 3:
        return np.concatenate(parts, axis=1).astype(np.float32)
    if "robot_states" in demo:
        return demo["robot_states"][()].astype(np.float32)
    return np.zeros((len(demo["actions"]), 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# Collection: the scripted experts (tabletop2d, LIBERO) in worker processes
# ---------------------------------------------------------------------------------------------------
@dataclass
class Collect:
    """Record a scripted expert (tabletop2d: envs.tabletop2d.expert_chunk; LIBERO: envs.libero_experts)
    into one file per task."""

    task: str = "tabletop2d"
    """Task family ('/<i>' pins one task): tabletop2d or a LIBERO suite (the tasks envs/libero_experts.py
    supports; the official datasets read through `read_demos` too)."""
    episodes: int = 50
    """Episodes run per task (LIBERO ships 50 demos per task)."""
    out: str = "demos/tabletop2d"
    """Output directory; one `<task-name>_demo.hdf5` per task."""
    workers: int = 2
    """Collection processes (spawned; each builds its own env)."""
    noise: float = 0.0
    """Std of Gaussian noise on the expert's x, y and gripper actions (normalised units; LIBERO: on the
    translation dims, a third of it on the rotation dims). The noisy
    actions are the ones executed and stored: at 0.1 the expert's action stays the mode, and the
    visited states spread beyond the expert's straight line (less compounding error in the clone)."""
    seed: int = 1
    """Episode k of task t resets with a seed derived from (seed, t, k): the same demos whatever --workers."""
    image_size: int = 128
    """Frame side in pixels: collect at the policy's resolution (PolicyConfig.image_size, 128 by default)."""
    chunk_len: int = 8
    """The expert plans this many steps open-loop, then re-plans: as the policy acts (PolicyConfig.chunk_len)."""
    wrist_camera: bool = False
    """Also record the wrist camera (obs/eye_in_hand_rgb)."""
    env_options: str = "{}"
    """Env options as JSON, e.g. '{"layout": "free"}' (see envs/tabletop2d.py)."""
    keep_failures: bool = False
    """Also write failed episodes (success=0, rewards 0). LIBERO's files hold successes only."""


@dataclass
class Info:
    """Summarise demonstration files: instruction, demos, steps, success, frame shape, action range."""

    path: Annotated[str, tyro.conf.Positional]
    """An .hdf5 file or a directory of them."""


def task_file_name(instruction: str) -> str:
    """LIBERO's file naming, `<task-name>_demo.hdf5`, with the task name spelled from the instruction
    (LIBERO's task names are their instructions with underscores)."""
    return re.sub(r"[^a-z0-9]+", "_", instruction.lower()).strip("_") + "_demo.hdf5"


def episode_seeds(seed: int, task_id: int, episode: int) -> tuple[int, int]:
    """(env reset seed, expert noise seed) of one demo episode."""
    env_seed, noise_seed = np.random.SeedSequence([seed, DEMO_SEED_STREAM, task_id, episode]).generate_state(2)
    return int(env_seed), int(noise_seed)


def _tabletop2d_state(env) -> np.ndarray:
    """Privileged state before a step (stored as `states`): [ee x, ee y, gripper closed, object x, y (K x 2)]."""
    return np.concatenate([env.ee_xy, [float(env.gripper_closed)], env.object_xy.ravel()])


def _expert(env, noise: float, rng: np.random.Generator):
    """The scripted expert of the env's current episode (call after reset), as (expert chunk_len -> (chunk_len,
    7) normalised actions, privileged state () -> (S,) stored as `states`)."""
    if env.spec.name.startswith("libero_"):
        from envs.libero_experts import LiberoExpert

        # states: the flattened MuJoCo state (time, qpos, qvel), as in LIBERO's own files
        return LiberoExpert(env, noise=noise, rng=rng).chunk, lambda: env.sim.sim.get_state().flatten()
    from envs.tabletop2d import expert_chunk

    return (lambda chunk_len: expert_chunk(env, chunk_len=chunk_len, noise=noise, rng=rng),
            lambda: _tabletop2d_state(env))


def run_expert_episode(env, task_id: int, env_seed: int, noise_seed: int, chunk_len: int, noise: float) -> dict:
    """One expert episode, recording the observation before every step (step_chunk would render only
    the chunk's last frame). The expert re-plans every `chunk_len` steps, as the policy acts."""
    rng = np.random.default_rng(noise_seed)
    obs = env.reset(task_id=task_id, seed=env_seed)
    expert_chunk, expert_state = _expert(env, noise, rng)
    record: dict[str, list] = {"images": [], "wrist_images": [], "proprio": [], "actions": [], "states": []}
    info, done = {"success": False}, False
    while not done:
        for action in expert_chunk(chunk_len):
            record["images"].append(obs["image"])
            if "wrist" in obs:
                record["wrist_images"].append(obs["wrist"])
            record["proprio"].append(obs["proprio"])
            record["states"].append(expert_state())
            record["actions"].append(action)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if done:
                break
    episode = {key: np.stack(value) for key, value in record.items() if value}
    episode["success"] = bool(info["success"])
    episode["terminated"] = bool(terminated)
    return episode


def _collect_job(cfg: Collect, task_id: int, first: int, count: int, shard: str) -> dict:
    """Worker process: episodes first..first+count-1 of one task into a shard file; returns small stats."""
    family, _ = parse_task(cfg.task)
    options = json.loads(cfg.env_options)
    env = make_env(family, image_size=cfg.image_size, seed=0, wrist_camera=cfg.wrist_camera, **options)
    instruction = env.spec.instructions[task_id]
    successes, lengths = [], []
    with DemoWriter(shard, instruction, task=f"{family}/{task_id}", task_id=task_id, env_name=family,
                    env_kwargs=_env_kwargs(cfg), image_orientation=_image_orientation(cfg)) as writer:
        for k in range(first, first + count):
            episode = run_expert_episode(env, task_id, *episode_seeds(cfg.seed, task_id, k), cfg.chunk_len, cfg.noise)
            successes.append(episode["success"])
            lengths.append(len(episode["actions"]))
            if episode["success"] or cfg.keep_failures:
                proprio = episode["proprio"]
                if family.startswith("libero_"):  # [eef pos, axis-angle, finger qpos] (envs/libero.py)
                    robot_obs = {"ee_pos": proprio[:, :3], "ee_ori": proprio[:, 3:6],
                                 "gripper_states": proprio[:, 6:8]}
                else:
                    ee_pos = np.concatenate([proprio[:, :2], np.zeros((len(proprio), 1))], axis=1)  # table z=0
                    robot_obs = {"ee_pos": ee_pos, "gripper_states": proprio[:, 2:3]}
                writer.add_episode(episode["images"], episode["actions"], proprio, episode["success"],
                                   wrist_images=episode.get("wrist_images"), states=episode["states"],
                                   robot_obs=robot_obs, terminated=episode["terminated"])
    env.close()
    return {"task_id": task_id, "first": first, "shard": shard, "successes": successes, "lengths": lengths}


def _image_orientation(cfg: Collect) -> str:
    """How the collecting env returns its frames (LIBERO's `image_orientation` option; tabletop2d: camera)."""
    if not parse_task(cfg.task)[0].startswith("libero_"):
        return "camera"
    return json.loads(cfg.env_options).get("image_orientation") or _libero_default_orientation()


def _env_kwargs(cfg: Collect) -> dict:
    return {"image_size": cfg.image_size, "wrist_camera": cfg.wrist_camera, **json.loads(cfg.env_options)}


def collect(cfg: Collect) -> dict:
    """Run the expert in `cfg.workers` spawned processes and write one file per task. Returns the
    per-task summary (also written to <out>/collect_summary.json)."""
    family, pinned = parse_task(cfg.task)
    if family != "tabletop2d" and not family.startswith("libero_"):
        raise SystemExit(f"demos collect: no scripted expert for {family!r}")
    if cfg.episodes < 1 or cfg.workers < 1 or cfg.chunk_len < 1:
        raise SystemExit("demos collect: --episodes, --workers and --chunk-len must be >= 1")
    spec = env_spec(cfg.task, image_size=cfg.image_size, wrist_camera=cfg.wrist_camera, **json.loads(cfg.env_options))
    tasks = [pinned] if pinned is not None else list(range(spec.num_tasks))
    if family.startswith("libero_"):
        from envs.libero_experts import unsupported_reason

        unsupported = {t: why for t in tasks if (why := unsupported_reason(family, t))}
        if unsupported:
            raise SystemExit(f"demos collect: the scripted LIBERO expert cannot do {family} task(s) {unsupported}; "
                             f"pin a supported one with --task {family}/<i> (python -m envs.libero_experts --suite "
                             f"{family} lists them); the official datasets read through read_demos")
    out = Path(cfg.out)
    shards = out / f".shards_{os.getpid()}"
    shards.mkdir(parents=True, exist_ok=True)
    # Slices small enough that every worker stays busy, large enough that a job outlasts its env build.
    per_job = max(1, min(25, math.ceil(cfg.episodes * len(tasks) / (4 * cfg.workers))))
    jobs = [(cfg, t, first, min(per_job, cfg.episodes - first), str(shards / f"task{t}_{first:06d}.hdf5"))
            for t in tasks for first in range(0, cfg.episodes, per_job)]
    start = time.time()
    results = []
    try:
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            for result in pool.starmap(_collect_job, jobs, chunksize=1):
                results.append(result)
        summary = {"task": cfg.task, "episodes_per_task": cfg.episodes, "noise": cfg.noise, "seed": cfg.seed,
                   "image_size": cfg.image_size, "seconds": round(time.time() - start, 2), "tasks": {}}
        for t in tasks:
            mine = sorted((r for r in results if r["task_id"] == t), key=lambda r: r["first"])
            path = out / task_file_name(spec.instructions[t])
            with DemoWriter(path, spec.instructions[t], task=f"{family}/{t}", task_id=t, env_name=family,
                            env_kwargs=_env_kwargs(cfg), image_orientation=_image_orientation(cfg)) as writer:
                for r in mine:
                    writer.append_file(r["shard"])
            successes = [s for r in mine for s in r["successes"]]
            lengths = [n for r in mine for n in r["lengths"]]
            summary["tasks"][str(t)] = {"instruction": spec.instructions[t], "file": path.name,
                                        "episodes": len(successes), "demos_written": writer.num_demos,
                                        "success_rate": float(np.mean(successes)),
                                        "mean_length": float(np.mean(lengths))}
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    tmp = out / f".collect_summary.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "collect_summary.json")
    return summary


def _print_collect_summary(summary: dict) -> None:
    print(f"expert demos of {summary['task']}, noise {summary['noise']}, {summary['seconds']} s")
    print("| task | instruction | episodes | expert success | mean length (env steps) | demos written |")
    print("|---|---|---|---|---|---|")
    for t, row in summary["tasks"].items():
        print(f"| {t} | {row['instruction']} | {row['episodes']} | {row['success_rate']:.1%} | "
              f"{row['mean_length']:.1f} | {row['demos_written']} |")


def info(cfg: Info) -> None:
    """Print one line per file (LIBERO's get_dataset_info.py, shortened), read through `read_demos`'s rules."""
    print("| file | instruction | demos | steps | success | frames | action min / max |")
    print("|---|---|---|---|---|---|---|")
    for file in demo_files(cfg.path):
        episodes = read_demos(file, wrist=False)
        if not episodes:
            print(f"| {file.name} | - | 0 | 0 | - | - | - |")
            continue
        actions = np.concatenate([e["actions"] for e in episodes])
        print(f"| {file.name} | {episodes[0]['instruction']} | {len(episodes)} | {len(actions)} | "
              f"{np.mean([e['success'] for e in episodes]):.0%} | {episodes[0]['images'].shape[1:]} | "
              f"{actions.min():.2f} / {actions.max():.2f} |")


def main(argv: list[str] | None = None) -> int:
    cmd = tyro.extras.subcommand_cli_from_dict({"collect": Collect, "info": Info}, args=argv)
    if isinstance(cmd, Collect):
        _print_collect_summary(collect(cmd))
    else:
        info(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
