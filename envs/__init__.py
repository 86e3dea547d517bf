"""Simulator adapters behind one contract.

Every env (the built-in `tabletop2d` family, LIBERO, and the world model's imagined env) is a
`TaskEnv`: a multi-task env whose task is chosen at reset, with single-step `step` and the chunked
`step_chunk` that env workers call. Actions are *normalised* to [-1, 1] per dimension (7-D: 6-DoF
end-effector delta + gripper, gripper > 0 means close, OpenVLA convention after binarisation); each
adapter maps them to its simulator's units.

Observation (a dict of numpy arrays, the same keys for every env):
    "image":   uint8 (H, W, 3), third-person camera, upright
    "wrist":   uint8 (H, W, 3), only when the env was built with a wrist camera
    "proprio": float32 (spec.proprio_dim,)
Info (a dict) from `step` and `step_chunk`:
    "success": bool, the task's success predicate at the last executed step
    "task_id": int
    "env_steps": int, simulator steps executed (1 for `step`, <= chunk length for `step_chunk`)
    an env may add its own keys (tabletop2d: "grasped"); the pipeline reads only these three;
    with `step_chunk(actions, record=True)` only (the real steps that train the world model):
    "frames":  uint8 (env_steps, H, W, 3), the third-person image after every executed step (the last
               one is obs["image"])
    "proprio": float32 (env_steps, spec.proprio_dim), the proprio after every executed step
Done semantics (gymnasium): `terminated` = the task ended by itself (success, or a failure the env
defines); `truncated` = the time limit `spec.max_episode_steps` was hit. Never both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnvSpec:
    """What the pipeline needs to know about an env family before any env is built."""

    name: str
    """Family and suite, e.g. "tabletop2d" or "libero_10"."""
    instructions: tuple[str, ...]
    """One language instruction per task id."""
    image_size: int
    """Square image side in pixels."""
    cameras: tuple[str, ...]
    """Observation image keys, "image" first, e.g. ("image",) or ("image", "wrist")."""
    proprio_dim: int
    """Length of obs["proprio"]."""
    max_episode_steps: int
    """Truncation limit in simulator steps (the largest over the tasks, if they differ)."""
    action_dim: int = 7
    active_action_dims: tuple[int, ...] | None = None
    """Action dimensions that affect the env (None: all). The learner leaves the others out of the
    policy loss: the reward cannot depend on them, so their tokens' score terms have zero mean and only
    add variance (tabletop2d ignores the rotation dims that exist for the 7-D contract)."""
    reports_achieved_task: bool = False
    """At an episode's termination, info["achieved_task"] names the task whose goal the final state meets (-1:
    none), whatever the episode's own task was, and that task's success would have paid reward 1.0: what
    hindsight relabelling (--hindsight-relabel) needs. tabletop2d: the grasped object; LIBERO: not reported."""
    action_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(low, high) of the dataset statistics the adapter de-normalises action dims 0..len(low)-1 with
    (a = 0.5 (x + 1)(high - low) + low; LIBERO: OpenVLA's q01 / q99 of the suite), for policies trained on
    such data to check theirs against; None: the env's own units, no dataset behind them (tabletop2d)."""

    @property
    def num_tasks(self) -> int:
        return len(self.instructions)


class TaskEnv:
    """Base class: subclasses implement `spec`, `reset` and `step`; `step_chunk` is shared."""

    spec: EnvSpec
    task_id: int = 0

    @property
    def instruction(self) -> str:
        return self.spec.instructions[self.task_id]

    def reset(self, task_id: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode of `task_id` (None: the env picks one uniformly). Returns the first obs."""
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """One simulator step with a normalised 7-D action; gymnasium's 5-tuple."""
        raise NotImplementedError

    def step_chunk(self, actions: np.ndarray, record: bool = False
                   ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """Execute an action chunk (chunk_len, 7) step by step, stopping early when the episode ends.

        One RL step of AcceRL is one chunk (reference.md section 2): the reward is the chunk's sum.
        `record`: also return every step's image and proprio (info "frames", "proprio"; module docstring).
        """
        total_reward, env_steps, frames, proprio = 0.0, 0, [], []
        obs, terminated, truncated, info = None, False, False, {}
        for action in actions:
            obs, reward, terminated, truncated, info = self.step(action)
            total_reward += float(reward)
            env_steps += 1
            if record:
                frames.append(obs["image"])
                proprio.append(obs["proprio"])
            if terminated or truncated:
                break
        info = dict(info, env_steps=env_steps)
        if record:
            info.update(frames=np.stack(frames), proprio=np.stack(proprio).astype(np.float32))
        return obs, total_reward, terminated, truncated, info

    def close(self) -> None:
        pass


def parse_task(task: str) -> tuple[str, int | None]:
    """"tabletop2d" -> ("tabletop2d", None); "libero_10/3" -> ("libero_10", 3)."""
    family, _, index = task.partition("/")
    if index and not index.isdigit():
        raise ValueError(f"--task {task!r}: the part after '/' must be a task index, e.g. {family}/0")
    return family, (int(index) if index else None)


def env_spec(task: str, image_size: int, wrist_camera: bool = False, **options) -> EnvSpec:
    """The spec of a task family, without building a simulator (cheap; used before spawning)."""
    family, _ = parse_task(task)
    if family == "tabletop2d":
        from envs.tabletop2d import tabletop2d_spec

        return tabletop2d_spec(image_size=image_size, wrist_camera=wrist_camera, **options)
    if family.startswith("libero_"):
        from envs.libero import libero_spec

        return libero_spec(family, image_size=image_size, wrist_camera=wrist_camera, **options)
    raise ValueError(f"unknown --task {task!r}: use tabletop2d, tabletop2d/<i>, libero_spatial, "
                     "libero_object, libero_goal, libero_10 or libero_90 (optionally /<i>)")


def make_env(task: str, image_size: int, seed: int, wrist_camera: bool = False, **options) -> TaskEnv:
    """Build one env of a task family; `task` may pin one task with "/<i>"."""
    family, index = parse_task(task)
    if family == "tabletop2d":
        from envs.tabletop2d import Tabletop2D

        return Tabletop2D(image_size=image_size, seed=seed, wrist_camera=wrist_camera, only_task=index, **options)
    if family.startswith("libero_"):
        from envs.libero import LiberoEnv

        return LiberoEnv(family, image_size=image_size, seed=seed, wrist_camera=wrist_camera, only_task=index,
                         **options)
    raise ValueError(f"unknown --task {task!r}")
