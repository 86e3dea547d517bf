"""`tabletop2d`: a fast, language- and vision-conditioned 2-D picking task (the project's default env).

A top-down table, the square [-1, 1]^2, holds K = 4 objects that differ in colour and shape. Task k says
"pick up the <object k>": move the end effector (EE) onto that object and close the gripper there. The
instruction alone names the goal and only the image shows where it is, so a policy that ignores either
cannot beat chance (1/K). It renders in numpy at thousands of steps per second per core, which is what
lets a small VLA learn it from pixels with RL on a CPU; `step_cost_ms` adds LIBERO-like, heavy-tailed
step times when the asynchronous machinery itself is under test.

Action (normalised, see envs/__init__.py): dims 0-1 move the EE by up to `max_delta` along x and y
(clipped to the table), dims 2-5 are ignored (they exist for the 7-D contract), dim 6 > 0 closes the
gripper. Success at a step: gripper closed and EE within `success_radius` of the target's centre ->
reward 1.0 and terminated. Closing it there on another object is a wrong grasp: terminated with reward 0
(option `wrong_grasp`; without it, closing on every object in turn succeeds blind, see `sweep_chunk`).
Every other step gives 0. proprio = [x, y, gripper (1.0 closed, 0.0 open)]. info["grasped"] names the
object under the closed gripper (-1: none), and so does info["achieved_task"] (task j is "pick up object j"): a
wrong grasp of object j is a success of task j, which hindsight relabelling (--hindsight-relabel) learns from.

Tuning (benchmarks/env_speed.py, 1,000-2,000 episodes, default options): uniformly random actions succeed
in ~4-4.5 % of episodes (a weak but real RL signal; ~9 % with layout "free"), a policy that goes to a random
object in ~1/K, the blind `sweep_chunk` in ~1/K, `expert_chunk` in 100 %, within 4-8 env steps (one chunk of
8) of the 64 allowed. A longer direct route at the same random success rate would need a much longer
episode: a random walk covers distance ~ max_delta * sqrt(steps), a direct route ~ max_delta * steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from envs import EnvSpec, TaskEnv

# (colour name, shape name, RGB). Colour and shape each identify an object; the instruction names both.
OBJECTS = (
    ("red", "block", (215, 40, 40)),
    ("green", "disk", (40, 165, 60)),
    ("blue", "triangle", (45, 85, 215)),
    ("yellow", "cross", (235, 195, 25)),
)
INSTRUCTIONS = tuple(f"pick up the {colour} {shape}" for colour, shape, _ in OBJECTS)
SLOTS = np.array([(-0.55, 0.55), (0.55, 0.55), (-0.55, -0.55), (0.55, -0.55)])
"""Object centres of the default layout, one object per slot in a random permutation."""
EE_START_JITTER = 0.1
"""The EE starts uniformly in [-0.1, 0.1]^2: near the centre, equally far from every slot."""
EE_RADIUS = 0.075
EE_COLOUR = (25, 25, 30)
OFF_TABLE_COLOUR = (70, 70, 80)
WRIST_HALF_WIDTH = 0.3
"""The wrist camera sees [x - 0.3, x + 0.3] x [y - 0.3, y + 0.3] around the EE."""


@dataclasses.dataclass(frozen=True)
class Tabletop2DOptions:
    """Task options; `tabletop2d_spec` and `Tabletop2D` accept exactly these as keyword arguments."""

    layout: str = "slots"
    """"slots": objects near the four corners in a random permutation (+-`slot_jitter`); "fixed": object k
    always near corner k (+-`slot_jitter`; the instruction alone gives the direction, the image the exact
    place: an easier variant, see benchmarks/rl_probe.py); "free": uniform on the table with a minimum
    separation (a harder vision problem)."""
    object_radius: float = 0.13
    """Half-size of a drawn object (world units; the table is 2 wide)."""
    slot_jitter: float = 0.12
    """Uniform jitter of each object around its slot (layout "slots")."""
    max_delta: float = 0.09
    """EE displacement per step at action +-1, per axis (world units)."""
    success_radius: float = 0.15
    """EE-to-target-centre distance within which closing the gripper succeeds."""
    wrong_grasp: str = "fail"
    """Closing the gripper within `success_radius` of another object than the target: "fail" ends the
    episode (terminated, reward 0), so a policy that ignores the instruction cannot beat 1/K; "ignore"
    lets it go on (then one that closes on every object in turn succeeds without reading the
    instruction: the four slots are 43 env steps apart of the 64 allowed)."""
    max_episode_steps: int = 64
    """Truncation limit in env steps (8 chunks of 8)."""
    step_cost_ms: float = 0.0
    """Mean simulated extra cost per step (ms), lognormal (sigma 1, capped at 50x the mean) to mimic
    LIBERO's long-tailed step times; 0 disables it."""
    step_cost_kind: str = "sleep"
    """"sleep" (time.sleep, frees the core) or "spin" (busy wait, burns the core like a simulator)."""
    reset_cost_ms: float = 0.0
    """Simulated extra cost of every reset (ms, constant; LIBERO resets take 0.3-2.6 s, platform.md)."""
    fail_every_steps: int = 0
    """Fault injection for tests of the pipeline's recovery: raise RuntimeError at every N-th step of an
    env instance, as simulators sometimes do (0: never)."""
    fail_on_build: bool = False
    """Fault injection: raise in the constructor (an env that cannot be built stops the run)."""

    def __post_init__(self):
        if self.layout not in ("slots", "fixed", "free"):
            raise ValueError(f"tabletop2d layout={self.layout!r}: use 'slots', 'fixed' or 'free'")
        if self.wrong_grasp not in ("fail", "ignore"):
            raise ValueError(f"tabletop2d wrong_grasp={self.wrong_grasp!r}: use 'fail' or 'ignore'")
        if self.step_cost_kind not in ("sleep", "spin"):
            raise ValueError(f"tabletop2d step_cost_kind={self.step_cost_kind!r}: use 'sleep' or 'spin'")
        for name in ("max_delta", "success_radius", "max_episode_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"tabletop2d {name}={getattr(self, name)!r} must be > 0")
        if not self.reset_cost_ms >= 0:
            raise ValueError(f"tabletop2d reset_cost_ms={self.reset_cost_ms!r} must be >= 0")
        if not self.step_cost_ms >= 0:
            raise ValueError(f"tabletop2d step_cost_ms={self.step_cost_ms!r} must be >= 0")
        if not 0 <= self.slot_jitter <= 0.2:  # more lets objects touch or leave the table
            raise ValueError(f"tabletop2d slot_jitter={self.slot_jitter!r} must be in [0, 0.2]")

    @classmethod
    def parse(cls, options: dict) -> Tabletop2DOptions:
        """Options from keyword arguments; an unknown name is a TypeError that lists the valid ones."""
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown tabletop2d option(s) {unknown}; valid options: {valid}")
        return cls(**options)


def tabletop2d_spec(image_size: int = 128, wrist_camera: bool = False, **options) -> EnvSpec:
    """The spec of the family (all K tasks, even when an env pins one with `only_task`)."""
    opts = Tabletop2DOptions.parse(options)
    return EnvSpec(name="tabletop2d", instructions=INSTRUCTIONS, image_size=image_size,
                   cameras=("image", "wrist") if wrist_camera else ("image",), proprio_dim=3,
                   max_episode_steps=opts.max_episode_steps, active_action_dims=(0, 1, 6),
                   reports_achieved_task=True)


@functools.lru_cache(maxsize=8)
def _table_texture(size: int) -> np.ndarray:
    """Light wood-like stripes plus pixel noise, the same for every env (a fixed seed, not the task RNG)."""
    rng = np.random.default_rng(12345)
    rows = np.arange(size)[:, None] / size
    grain = 6 * np.sin(2 * np.pi * (7 * rows + 0.15 * rng.standard_normal((size, 1))))
    shade = grain + rng.normal(0, 3, (size, size))
    table = np.array([205, 185, 150], dtype=np.float64) + shade[..., None]
    table = np.clip(table, 0, 255).astype(np.uint8)
    table.flags.writeable = False
    return table


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape centred at the origin; (u, v) are pixel-centre offsets in world units, v up."""
    if shape == "block":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    if shape == "disk":
        return u * u + v * v <= r * r
    if shape == "triangle":  # equilateral, pointing up, circumradius r * 1.15 around the centroid
        big_r = 1.15 * r
        return (v >= -big_r / 2) & (np.sqrt(3) * np.abs(u) + v <= big_r)
    if shape == "cross":
        half_bar = 0.35 * r
        return ((np.abs(u) <= half_bar) & (np.abs(v) <= r)) | ((np.abs(v) <= half_bar) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


class Tabletop2D(TaskEnv):
    """K-object top-down picking; see the module docstring. Privileged state (for `expert_chunk` and
    tests): `ee_xy`, `gripper_closed`, `object_xy` (K, 2), `target_xy`."""

    def __init__(self, image_size: int = 128, seed: int = 0, wrist_camera: bool = False,
                 only_task: int | None = None, **options):
        self.opts = Tabletop2DOptions.parse(options)
        if self.opts.fail_on_build:
            raise RuntimeError("tabletop2d: fail_on_build=True (fault injection)")
        self.spec = tabletop2d_spec(image_size, wrist_camera, **options)
        if image_size < 16:
            raise ValueError(f"tabletop2d image_size={image_size} is too small (>= 16)")
        if only_task is not None and not 0 <= only_task < self.spec.num_tasks:
            raise ValueError(f"tabletop2d only_task={only_task}: tasks are 0..{self.spec.num_tasks - 1}")
        self.only_task = only_task
        self.wrist_camera = wrist_camera
        self._seed(seed)
        self.ee_xy = np.zeros(2)
        self.gripper_closed = False
        self.grasped = -1
        self.object_xy = SLOTS.copy()
        self.env_steps = 0
        self._episode_over = True  # step() before reset() is an error

        # Pixel geometry. Frames are drawn with a margin of `_pad` pixels, so the EE stamp and the wrist
        # crop never need bounds checks; the margin shows as the floor in the wrist view.
        size = image_size
        self._px_per_unit = size / 2
        stamp_half = int(np.ceil(EE_RADIUS * self._px_per_unit)) + 1
        wrist_half = int(round(WRIST_HALF_WIDTH * self._px_per_unit))
        self._pad = max(stamp_half, wrist_half) + 1
        offsets = (np.arange(-stamp_half, stamp_half + 1) / self._px_per_unit)
        dist = np.hypot(offsets[:, None], offsets[None, :])
        ring_width = max(1.5, 0.02 * self._px_per_unit) / self._px_per_unit
        self._stamp_open = (dist <= EE_RADIUS) & (dist >= EE_RADIUS - ring_width)  # open: a ring
        self._stamp_closed = dist <= EE_RADIUS  # closed: a filled disk
        self._stamp_half = stamp_half
        # Wrist view: nearest-neighbour resampling of a (2 * wrist_half) pixel square to image_size.
        self._wrist_offsets = (np.arange(size) * (2 * wrist_half) // size - wrist_half)
        self._background = None

    def _seed(self, seed: int) -> None:
        # The step-cost draws use their own generator, so turning the cost on or off never changes the
        # layouts and tasks a seed produces.
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._cost_rng = np.random.Generator(np.random.PCG64([seed, 1]))

    @property
    def target_xy(self) -> np.ndarray:
        return self.object_xy[self.task_id]

    def reset(self, task_id: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self._seed(seed)
        if self.only_task is not None and task_id not in (None, self.only_task):
            raise ValueError(f"this tabletop2d env is pinned to task {self.only_task}, asked for {task_id}")
        if task_id is not None and not 0 <= task_id < self.spec.num_tasks:
            raise ValueError(f"tabletop2d task_id={task_id}: tasks are 0..{self.spec.num_tasks - 1}")
        # The task is always drawn, even when given, so a seed gives the same scene whichever task is
        # asked for: an instruction can be swapped on an identical scene (tests, paired evaluations).
        drawn = int(self.rng.integers(self.spec.num_tasks))
        self.task_id = task_id if task_id is not None else (self.only_task if self.only_task is not None else drawn)
        self.ee_xy = self.rng.uniform(-EE_START_JITTER, EE_START_JITTER, 2)
        self.object_xy = self._sample_layout()
        self.gripper_closed = False
        self.grasped = -1
        self.env_steps = 0
        self._episode_over = False
        self._background = self._render_background()
        if self.opts.reset_cost_ms > 0:
            time.sleep(self.opts.reset_cost_ms / 1000)
        return self._observe()

    def _sample_layout(self) -> np.ndarray:
        if self.opts.layout in ("slots", "fixed"):
            jitter = self.rng.uniform(-self.opts.slot_jitter, self.opts.slot_jitter, (len(OBJECTS), 2))
            order = self.rng.permutation(len(OBJECTS))  # drawn for "fixed" too: both use the rng alike
            return (SLOTS[order] if self.opts.layout == "slots" else SLOTS) + jitter
        # "free": rejection sampling; objects keep apart (no ambiguous grasps) and away from the EE start
        # (no free successes). With 4 objects on this table it accepts within a few tries.
        limit, min_separation = 1 - self.opts.object_radius - 0.05, 2 * self.opts.success_radius + 0.1
        placed: list[np.ndarray] = []
        for _ in range(10_000):
            xy = self.rng.uniform(-limit, limit, 2)
            if (np.linalg.norm(xy - self.ee_xy) > min_separation
                    and all(np.linalg.norm(xy - other) > min_separation for other in placed)):
                placed.append(xy)
                if len(placed) == len(OBJECTS):
                    return np.array(placed)
        raise ValueError(f"tabletop2d layout 'free' cannot fit the objects with success_radius="
                         f"{self.opts.success_radius}; use a smaller radius")

    def _render_background(self) -> np.ndarray:
        """Table and objects for this episode (padded), drawn once per reset; renders copy it."""
        size, pad = self.spec.image_size, self._pad
        frame = np.empty((size + 2 * pad, size + 2 * pad, 3), dtype=np.uint8)
        frame[:] = OFF_TABLE_COLOUR
        table = frame[pad:pad + size, pad:pad + size]
        table[:] = _table_texture(size)
        centres = -1 + (2 * np.arange(size) + 1) / size  # pixel centres in world units
        for (_, shape, colour), (x, y) in zip(OBJECTS, self.object_xy):
            mask = _shape_mask(shape, centres[None, :] - x, centres[::-1, None] - y, self.opts.object_radius)
            table[mask] = colour
        return frame

    def _observe(self) -> dict[str, np.ndarray]:
        frame = self._background.copy()
        pad, size, half = self._pad, self.spec.image_size, self._stamp_half
        # Row 0 is the top of the table (y = +1): the image is upright, as the contract asks.
        col = pad + min(int((self.ee_xy[0] + 1) * self._px_per_unit), size - 1)
        row = pad + min(int((1 - self.ee_xy[1]) * self._px_per_unit), size - 1)
        stamp = self._stamp_closed if self.gripper_closed else self._stamp_open
        frame[row - half:row + half + 1, col - half:col + half + 1][stamp] = EE_COLOUR
        obs = {"image": np.ascontiguousarray(frame[pad:pad + size, pad:pad + size])}
        if self.wrist_camera:
            # Two 1-D takes are ~3x faster than one 2-D fancy index.
            obs["wrist"] = frame.take(row + self._wrist_offsets, 0).take(col + self._wrist_offsets, 1)
        obs["proprio"] = np.array([self.ee_xy[0], self.ee_xy[1], float(self.gripper_closed)], np.float32)
        return obs

    def _advance(self, action: np.ndarray) -> tuple[float, bool, bool, bool]:
        """Apply one action without rendering: (reward, terminated, truncated, success)."""
        if self._episode_over:
            raise RuntimeError("tabletop2d: the episode is over (or never started); call reset() first")
        if action.shape != (7,):
            raise ValueError(f"tabletop2d expects 7-D actions, got shape {action.shape}")
        self._steps_since_build = getattr(self, "_steps_since_build", 0) + 1
        if self.opts.fail_every_steps and self._steps_since_build % self.opts.fail_every_steps == 0:
            raise RuntimeError(f"tabletop2d: injected failure at step {self._steps_since_build} (fail_every_steps)")
        move = np.clip(action[:2], -1.0, 1.0) * self.opts.max_delta
        self.ee_xy = np.clip(self.ee_xy + move, -1.0, 1.0)
        self.gripper_closed = bool(action[6] > 0)
        self.env_steps += 1
        # The object under a closed gripper (-1: none); every layout keeps objects > 2 x success_radius apart.
        self.grasped = -1
        if self.gripper_closed:
            delta = self.object_xy - self.ee_xy
            near = np.flatnonzero(np.einsum("kd,kd->k", delta, delta) <= self.opts.success_radius ** 2)
            self.grasped = int(near[0]) if len(near) else -1
        success = self.grasped == self.task_id
        terminated = success or (self.grasped >= 0 and self.opts.wrong_grasp == "fail")
        truncated = not terminated and self.env_steps >= self.opts.max_episode_steps
        self._episode_over = terminated or truncated
        if self.opts.step_cost_ms > 0:
            self._spend_step_cost()
        return float(success), terminated, truncated, success

    def _spend_step_cost(self) -> None:
        # Lognormal with sigma 1 has mean exp(mu + 1/2): mu is chosen so the mean is step_cost_ms.
        mean_s = self.opts.step_cost_ms / 1000
        cost_s = min(self._cost_rng.lognormal(np.log(mean_s) - 0.5, 1.0), 50 * mean_s)
        if self.opts.step_cost_kind == "sleep":
            time.sleep(cost_s)
        else:
            deadline = time.perf_counter() + cost_s
            while time.perf_counter() < deadline:
                pass

    def _info(self, success: bool, env_steps: int) -> dict:
        # task k is "pick up object k": a grasp of object j meets task j's goal, whichever task the episode had
        return {"success": success, "task_id": self.task_id, "env_steps": env_steps, "grasped": self.grasped,
                "achieved_task": self.grasped}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        reward, terminated, truncated, success = self._advance(np.asarray(action, dtype=np.float64))
        return self._observe(), reward, terminated, truncated, self._info(success, 1)

    def step_chunk(self, actions: np.ndarray, record: bool = False
                   ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """As `TaskEnv.step_chunk`, but only the chunk's last frame is rendered (nobody sees the others),
        unless `record` asks for every step's image and proprio."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"tabletop2d step_chunk expects (chunk_len >= 1, 7) actions, got {actions.shape}")
        total_reward, env_steps, recorded = 0.0, 0, []
        for action in actions:
            reward, terminated, truncated, success = self._advance(action)
            total_reward += reward
            env_steps += 1
            if record:
                recorded.append(self._observe())
            if terminated or truncated:
                break
        obs = recorded[-1] if record else self._observe()
        info = self._info(success, env_steps)
        if record:
            info["frames"] = np.stack([o["image"] for o in recorded])
            info["proprio"] = np.stack([o["proprio"] for o in recorded])
        return obs, total_reward, terminated, truncated, info


def expert_chunk(env: Tabletop2D, chunk_len: int = 8, noise: float = 0.0,
                 rng: np.random.Generator | None = None, task_id: int | None = None) -> np.ndarray:
    """A scripted expert chunk (chunk_len, 7) from privileged state: head straight for the target and
    close the gripper once the EE will be well inside the success radius.

    `noise` is the std of Gaussian noise added to the x, y and gripper action dims (normalised units),
    drawn from `rng` (never from the env's RNG, so the env's stream is untouched; pass a seeded `rng`
    for reproducible demos). `task_id` plans for another task's object than the env's: the
    instruction-ignoring baseline, and failures for world-model data. The chunk is planned open-loop by
    predicting the env's own motion.
    """
    if noise > 0 and rng is None:
        rng = np.random.default_rng()
    opts = env.opts
    target = env.target_xy if task_id is None else env.object_xy[task_id]
    xy = env.ee_xy.copy()
    chunk = np.zeros((chunk_len, 7))
    for k in range(chunk_len):
        action = chunk[k]
        action[:2] = np.clip((target - xy) / opts.max_delta, -1.0, 1.0)
        if noise > 0:
            action[[0, 1, 6]] += rng.normal(0.0, noise, 3)
            action[:2] = np.clip(action[:2], -1.0, 1.0)
        xy = np.clip(xy + action[:2] * opts.max_delta, -1.0, 1.0)
        close = np.linalg.norm(xy - target) <= 0.7 * opts.success_radius
        action[6] = np.clip((1.0 if close else -1.0) + action[6], -1.0, 1.0)
    return chunk


SWEEP_ORDER = (0, 1, 3, 2)
"""Slot order of `sweep_chunk`: round the table, adjacent corners only."""
SWEEP_LEG_STEPS = 14
"""Env steps `sweep_chunk` spends heading for each slot (a corner-to-corner leg needs ~13 at max_delta)."""


def sweep_chunk(env: Tabletop2D, chunk_len: int = 8) -> np.ndarray:
    """The instruction-blind baseline (chunk_len, 7): visit the four slots in turn with the gripper
    closed, ignoring the instruction and the image. With wrong_grasp="ignore" it succeeds in ~99 % of
    episodes with the default layout; with "fail" (the default) the first object it reaches ends the
    episode, so it succeeds in ~1/K. tests/test_tabletop2d.py checks both."""
    xy, steps = env.ee_xy.copy(), env.env_steps
    chunk = np.zeros((chunk_len, 7))
    for k in range(chunk_len):
        target = SLOTS[SWEEP_ORDER[min((steps + k) // SWEEP_LEG_STEPS, len(SWEEP_ORDER) - 1)]]
        chunk[k, :2] = np.clip((target - xy) / env.opts.max_delta, -1.0, 1.0)
        chunk[k, 6] = 1.0
        xy = np.clip(xy + chunk[k, :2] * env.opts.max_delta, -1.0, 1.0)
    return chunk
