"""LIBERO adapter: the env contract (same as tabletop2d's) and a smoke run on a real LIBERO task.

Needs the LIBERO stack (envs/requirements-libero.txt); CI installs it, so these tests run there. Where it
is missing they are skipped with a loud reason and a warning. ~40 s on 2 cores (one env is built once per
module; building is 3-9 s, a reset 0.4 s, a chunk of 8 ~0.15 s).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from envs import EnvSpec, TaskEnv, env_spec, make_env

from libero_stack import needs_libero  # tests/libero_stack.py

SUITE, TASK = "libero_spatial", 0
INFO_KEYS = {"success", "task_id", "env_steps"}


@pytest.fixture(scope="module")
def libero_env():
    env = make_env(f"{SUITE}/{TASK}", image_size=64, seed=0, wrist_camera=True, init_states="fixed")
    yield env
    env.close()


def check_contract(env: TaskEnv, spec: EnvSpec, chunk_len: int = 4) -> dict:
    """Everything envs/__init__.py promises; returns a summary of types to compare families."""
    obs = env.reset()
    assert set(obs) == set(spec.cameras) | {"proprio"}
    for key in spec.cameras:
        assert obs[key].dtype == np.uint8 and obs[key].shape == (spec.image_size, spec.image_size, 3), key
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (spec.proprio_dim,)
    assert 0 <= env.task_id < spec.num_tasks and env.instruction == spec.instructions[env.task_id]

    step = env.step(np.zeros(spec.action_dim))
    assert len(step) == 5
    obs, reward, terminated, truncated, info = step
    assert set(obs) == set(spec.cameras) | {"proprio"}
    assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert INFO_KEYS <= set(info) and info["env_steps"] == 1 and info["task_id"] == env.task_id
    assert isinstance(info["success"], bool) and not (terminated and truncated)

    actions = np.random.default_rng(0).uniform(-1, 1, (chunk_len, spec.action_dim))
    obs, reward, terminated, truncated, info = env.step_chunk(actions)
    assert set(obs) == set(spec.cameras) | {"proprio"} and isinstance(reward, float)
    assert INFO_KEYS <= set(info) and 1 <= info["env_steps"] <= chunk_len
    assert isinstance(terminated, bool) and isinstance(truncated, bool) and not (terminated and truncated)
    return {"obs": {k: (v.dtype, v.ndim) for k, v in obs.items()}, "info": {k: type(info[k]) for k in INFO_KEYS},
            "step_arity": len(step)}


@needs_libero
def test_libero_and_tabletop2d_share_the_contract(libero_env):
    if importlib.util.find_spec("envs.tabletop2d") is None:
        pytest.skip("envs/tabletop2d.py is not there yet")
    tabletop = make_env("tabletop2d", image_size=64, seed=0, wrist_camera=True)
    summaries = [check_contract(tabletop, env_spec("tabletop2d", 64, wrist_camera=True)),
                 check_contract(libero_env, libero_env.spec)]
    tabletop.close()
    assert summaries[0] == summaries[1]


@needs_libero
def test_spec_is_cheap_and_complete():
    code = ("import sys; from envs import env_spec\n"
            "specs = {s: env_spec(s, 128) for s in ('libero_spatial', 'libero_object', 'libero_goal', "
            "'libero_10', 'libero_90')}\n"
            "assert not {'robosuite', 'mujoco', 'torch', 'libero'} & set(sys.modules), sorted(sys.modules)\n"
            "print({s: (v.num_tasks, v.max_episode_steps) for s, v in specs.items()})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == {"libero_spatial": (10, 220), "libero_object": (10, 280), "libero_goal": (10, 300),
                         "libero_10": (10, 520), "libero_90": (90, 400)}
    spec = env_spec("libero_10", 224, wrist_camera=True, max_episode_steps=50)
    assert spec.cameras == ("image", "wrist") and spec.max_episode_steps == 50 and spec.proprio_dim == 8
    assert spec.instructions[0] == "put both the alphabet soup and the tomato sauce in the basket"
    assert env_spec("libero_90", 128).instructions[0] == "close the top drawer of the cabinet"


@needs_libero
def test_unknown_options_are_type_errors():
    with pytest.raises(TypeError, match="unknown libero option"):
        env_spec("libero_goal", 128, camera_size=3)
    with pytest.raises(TypeError, match="unknown libero option"):
        make_env("libero_goal", 128, seed=0, render_all=True)
    with pytest.raises(ValueError):
        make_env("libero_goal", 128, seed=0, init_state_index=3)  # needs init_states="fixed"


@needs_libero
def test_action_mapping_is_openvla_convention():
    from envs.libero import OPENVLA_ACTION_STATS

    env = make_env("libero_spatial", 64, seed=0)  # builds no simulator until reset
    q01, q99 = (np.array(v) for v in OPENVLA_ACTION_STATS["libero_spatial"])
    np.testing.assert_allclose(env.to_libero_action(np.r_[-np.ones(6), 0.7])[:6], q01)
    np.testing.assert_allclose(env.to_libero_action(np.r_[np.ones(6), 0.7])[:6], q99)
    assert env.to_libero_action(np.r_[np.zeros(6), 0.01])[6] == 1.0   # policy > 0: close
    assert env.to_libero_action(np.r_[np.zeros(6), -0.5])[6] == -1.0  # otherwise: open
    assert env.to_libero_action(np.r_[np.zeros(6), 0.0])[6] == -1.0
    ident = make_env("libero_90", 64, seed=0)  # no OpenVLA statistics: identity
    np.testing.assert_allclose(ident.to_libero_action(np.r_[np.full(6, 0.3), 1])[:6], 0.3)


@needs_libero
def test_smoke_fixed_states_truncation_success(libero_env):
    env = libero_env
    obs = env.reset(seed=3)
    assert env.init_state_index == 3 and env.task_id == TASK
    # proprio = [eef pos, axis-angle, gripper qpos], the same numbers robosuite's observables give
    sensors = env.sim._observables
    pos, quat, grip = (np.asarray(sensors[k]._sensor({})) for k in
                       ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"))
    from envs.libero import quat2axisangle

    np.testing.assert_allclose(obs["proprio"], np.r_[pos, quat2axisangle(quat), grip].astype(np.float32),
                               rtol=1e-5, atol=1e-6)
    assert obs["image"].std() > 5 and obs["wrist"].std() > 5  # a rendered scene, not a blank frame

    # The same fixed state and seed give the same first frame; in-chunk frames are not rendered.
    again = env.reset(seed=3)
    np.testing.assert_array_equal(obs["image"], again["image"])
    still = np.zeros((8, 7))
    still[:, 6] = -1
    obs, reward, terminated, truncated, info = env.step_chunk(still)
    assert (reward, terminated, truncated, info["success"], info["env_steps"]) == (0.0, False, False, False, 8)
    assert "frames" not in info

    # Truncation at the limit, in the middle of a chunk; stepping on is an error.
    short = make_env(f"{SUITE}/{TASK}", image_size=32, seed=1, init_states="fixed", init_state_index=0,
                     max_episode_steps=12, render_every_step=True)
    try:
        short.reset()
        _, _, terminated, truncated, info = short.step_chunk(still)
        assert not (terminated or truncated) and info["frames"].shape == (8, 32, 32, 3)
        obs, _, terminated, truncated, info = short.step_chunk(still)
        assert (terminated, truncated, info["env_steps"]) == (False, True, 4)
        np.testing.assert_array_equal(info["frames"][-1], obs["image"])
        with pytest.raises(RuntimeError):
            short.step(still[0])
        # Success comes from the simulator's predicate: reward 1, terminated, not truncated.
        short.reset()
        short.sim._check_success = lambda: True
        obs, reward, terminated, truncated, info = short.step_chunk(still)
        assert (reward, terminated, truncated, info["success"], info["env_steps"]) == (1.0, True, False, True, 1)
    finally:
        short.close()
        short.close()  # close is idempotent


@needs_libero
def test_step_chunk_record_returns_every_step(libero_env):
    """record=True (the real steps that train the world model): every step's agent view and proprio."""
    libero_env.reset(seed=5)
    actions = np.random.default_rng(1).uniform(-1, 1, (4, 7))
    obs, _, _, _, info = libero_env.step_chunk(actions, record=True)
    n = info["env_steps"]
    assert info["frames"].shape == (n, 64, 64, 3) and info["frames"].dtype == np.uint8
    assert info["proprio"].shape == (n, libero_env.spec.proprio_dim) and info["proprio"].dtype == np.float32
    np.testing.assert_array_equal(info["frames"][-1], obs["image"])
    np.testing.assert_array_equal(info["proprio"][-1], obs["proprio"])


@needs_libero
def test_sampled_placements_are_seeded_and_differ(libero_env):
    env = make_env(f"{SUITE}/{TASK}", image_size=32, seed=0)  # init_states="sampled" (training default)
    try:
        a = env.reset(seed=11)["image"]
        b = env.reset(seed=11)["image"]
        c = env.reset(seed=12)["image"]
    finally:
        env.close()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 0.1
