"""Tests of the tabletop2d env: the env contract (envs/__init__.py), determinism, that the instruction
decides the goal, the baselines' success rates, chunked stepping, options and the step-cost option."""

import time

import numpy as np
import pytest

from envs import env_spec, make_env
from envs.tabletop2d import EE_COLOUR, INSTRUCTIONS, SLOTS, Tabletop2D, expert_chunk, sweep_chunk, tabletop2d_spec

OPEN, CLOSE = -1.0, 1.0


def action(dx=0.0, dy=0.0, gripper=OPEN):
    return np.array([dx, dy, 0, 0, 0, 0, gripper])


def run_expert_episode(env, chunk_len=8):
    """Run the expert from the current state of a reset env to the end of the episode; returns (the
    actions executed, terminated)."""
    taken, done, terminated = [], False, False
    while not done:
        chunk = expert_chunk(env, chunk_len)
        _, _, terminated, truncated, info = env.step_chunk(chunk)
        taken.extend(chunk[:info["env_steps"]])
        done = terminated or truncated
    return np.array(taken), terminated


@pytest.mark.parametrize("wrist_camera", [False, True])
@pytest.mark.parametrize("image_size", [64, 128])
def test_spec_and_observation_contract(image_size, wrist_camera):
    spec = env_spec("tabletop2d", image_size, wrist_camera=wrist_camera)
    env = make_env("tabletop2d", image_size, seed=0, wrist_camera=wrist_camera)
    assert env.spec == spec
    assert spec.instructions == INSTRUCTIONS and spec.num_tasks == 4 and len(set(INSTRUCTIONS)) == 4
    assert spec.cameras == (("image", "wrist") if wrist_camera else ("image",))
    assert spec.proprio_dim == 3 and spec.action_dim == 7 and spec.max_episode_steps == 64
    for obs in (env.reset(), env.step(action())[0], env.step_chunk(np.zeros((8, 7)))[0]):
        assert set(obs) == set(spec.cameras) | {"proprio"}
        for camera in spec.cameras:
            assert obs[camera].shape == (image_size, image_size, 3) and obs[camera].dtype == np.uint8
            assert obs[camera].flags.c_contiguous
        assert obs["proprio"].shape == (3,) and obs["proprio"].dtype == np.float32


def test_step_returns_gymnasium_tuple_and_contract_info():
    env = Tabletop2D(seed=1)
    env.reset(task_id=2)
    assert env.instruction == INSTRUCTIONS[2]
    obs, reward, terminated, truncated, info = env.step(action(0.5, -0.5, CLOSE))
    assert reward == 0.0 and terminated is False and truncated is False
    assert info == {"success": False, "task_id": 2, "env_steps": 1, "grasped": -1, "achieved_task": -1}
    np.testing.assert_allclose(obs["proprio"][:2], env.ee_xy, atol=1e-6)
    assert obs["proprio"][2] == 1.0  # gripper closed


def test_truncated_at_the_limit_and_step_after_end_raises():
    env = Tabletop2D(seed=2, max_episode_steps=10)
    env.reset()
    for t in range(1, 11):
        _, reward, terminated, truncated, info = env.step(action(gripper=OPEN))
        assert reward == 0.0 and not terminated and truncated == (t == 10) and not info["success"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action())


def test_terminated_on_success_with_reward_one_never_both():
    env = Tabletop2D(seed=3)
    env.reset(seed=3)
    actions, terminated = run_expert_episode(env)
    assert terminated and env.gripper_closed
    assert np.linalg.norm(env.ee_xy - env.target_xy) <= env.opts.success_radius
    # Success on the very last allowed step: terminated, not truncated.
    env = Tabletop2D(seed=3, max_episode_steps=len(actions))
    env.reset(seed=3)
    for a in actions:
        _, reward, terminated, truncated, info = env.step(a)
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)


def test_closing_away_from_the_target_or_reaching_it_open_does_not_succeed():
    env = Tabletop2D(seed=4)
    env.reset(seed=4)
    assert not env.step(action(gripper=CLOSE))[2]  # closed at the start, far from every object
    env.reset(seed=4)
    path = run_expert_episode(env)[0]
    env.reset(seed=4)
    path[:, 6] = OPEN  # the expert's path, with the gripper open
    assert not any(env.step(a)[2] for a in path)


def play(env, actions, episodes, seed=None):
    """(obs, reward, terminated, truncated) of every reset and step of `episodes` episodes; the first
    reset gets `seed`."""
    record, steps = [], iter(actions)
    for episode in range(episodes):
        record.append((env.reset(seed=seed if episode == 0 else None), 0.0, False, False))
        done = False
        while not done:
            record.append(env.step(next(steps))[:4])
            done = record[-1][2] or record[-1][3]
    return record


def assert_same_record(a, b):
    assert len(a) == len(b)
    for (obs_a, *rest_a), (obs_b, *rest_b) in zip(a, b):
        assert all(np.array_equal(obs_a[k], obs_b[k]) for k in obs_a) and rest_a == rest_b


def test_same_seed_same_actions_same_episodes_and_step_cost_does_not_change_them():
    actions = np.random.default_rng(0).uniform(-1, 1, (1000, 7))
    reference = play(Tabletop2D(seed=7), actions, episodes=3)
    assert_same_record(reference, play(Tabletop2D(seed=7), actions, episodes=3))
    # Reseeding at reset replays it, and the step cost's draws do not shift the task RNG's stream.
    assert_same_record(reference, play(Tabletop2D(seed=99, step_cost_ms=0.01), actions, episodes=3, seed=7))
    # Consecutive resets differ; a given task id draws the same scene as a random one.
    env = Tabletop2D(seed=7)
    first, second = env.reset()["image"], env.reset()["image"]
    assert not np.array_equal(first, second)
    assert np.array_equal(env.reset(seed=7, task_id=(env.task_id + 1) % 4)["image"], first)


def test_instruction_decides_the_goal():
    env = Tabletop2D(seed=5)
    for seed in range(10):
        obs_a = env.reset(task_id=0, seed=seed)
        layout, target_a = env.object_xy.copy(), env.target_xy.copy()
        actions, terminated = run_expert_episode(env)
        assert terminated
        obs_b = env.reset(task_id=1, seed=seed)
        # Same scene, same pixels: only the instruction tells the tasks apart ...
        assert np.array_equal(env.object_xy, layout) and np.array_equal(obs_a["image"], obs_b["image"])
        assert np.linalg.norm(env.target_xy - target_a) > 2 * env.opts.success_radius
        # ... and task 0's expert actions fail under task 1's instruction: a wrong grasp of object 0.
        _, reward, terminated, _, info = env.step_chunk(actions)
        assert (reward, terminated, info["success"], info["grasped"]) == (0.0, True, False, 0)
        env.reset(task_id=1, seed=seed)
        assert np.array_equal(expert_chunk(env, task_id=0)[:len(actions)], actions[:8])  # same plan


def test_expert_succeeds_with_and_without_noise():
    for layout, episodes in (("slots", 48), ("free", 24)):
        env = Tabletop2D(seed=11, layout=layout)
        for _ in range(episodes):
            env.reset()
            assert run_expert_episode(env)[1]
    env, rng, successes = Tabletop2D(seed=11), np.random.default_rng(0), 0
    for _ in range(24):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step_chunk(expert_chunk(env, 8, noise=0.3, rng=rng))
            done = terminated or truncated
        successes += terminated
    assert successes >= 22


def test_random_policy_rarely_but_sometimes_succeeds():
    env, rng = Tabletop2D(image_size=32, seed=12), np.random.default_rng(12)
    successes, episodes = 0, 400
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (8, 7)))
            done = terminated or truncated
        successes += info["success"]
    assert 0 < successes / episodes <= 0.10


def test_a_wrong_grasp_ends_the_episode_without_reward():
    env = Tabletop2D(seed=13)
    env.reset(seed=13, task_id=0)
    other = 2
    _, reward, terminated, truncated, info = env.step_chunk(expert_chunk(env, 16, task_id=other))
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert info["grasped"] == other and not info["success"]
    assert info["achieved_task"] == other and tabletop2d_spec().reports_achieved_task  # hindsight relabelling's input
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action())
    env = Tabletop2D(seed=13, wrong_grasp="ignore")
    env.reset(seed=13, task_id=0)
    _, reward, terminated, truncated, info = env.step_chunk(expert_chunk(env, 16, task_id=other))
    assert (reward, terminated, info["grasped"]) == (0.0, False, other)


@pytest.mark.parametrize("wrong_grasp, low, high", [("fail", 0.10, 0.40), ("ignore", 0.90, 1.0)])
def test_an_instruction_blind_sweep_succeeds_only_with_wrong_grasps_ignored(wrong_grasp, low, high):
    env = Tabletop2D(image_size=32, seed=14, wrong_grasp=wrong_grasp)
    successes, episodes = 0, 200
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step_chunk(sweep_chunk(env))
            done = terminated or truncated
        successes += info["success"]
    assert low <= successes / episodes <= high


def test_step_chunk_stops_at_termination_and_matches_stepping():
    env = Tabletop2D(seed=13, wrist_camera=True)
    env.reset(seed=13)
    actions, _ = run_expert_episode(env)
    n = len(actions)
    padded = np.concatenate([actions, np.tile(action(gripper=CLOSE), (16 - n, 1))])  # past the success
    env.reset(seed=13)
    obs, reward, terminated, truncated, info = env.step_chunk(padded)
    assert (reward, terminated, truncated, info["env_steps"], info["success"]) == (1.0, True, False, n, True)
    env.reset(seed=13)
    for a in actions:
        step_obs = env.step(a)[0]
    assert all(np.array_equal(obs[k], step_obs[k]) for k in obs)
    # Truncation inside a chunk.
    env = Tabletop2D(seed=13, max_episode_steps=12)
    env.reset()
    assert env.step_chunk(np.zeros((8, 7)))[4]["env_steps"] == 8
    _, _, terminated, truncated, info = env.step_chunk(np.zeros((8, 7)))
    assert (terminated, truncated, info["env_steps"]) == (False, True, 4)


def test_image_is_upright_and_shows_the_end_effector():
    env = Tabletop2D(seed=14)
    env.reset(seed=14)

    def ee_centre(image):
        rows, cols = np.nonzero(np.all(image == EE_COLOUR, axis=-1))
        return rows.mean(), cols.mean()

    row0, col0 = ee_centre(env.step(action())[0]["image"])
    row1, col1 = ee_centre(env.step(action(dx=1.0, dy=1.0))[0]["image"])
    assert row1 < row0 - 3 and col1 > col0 + 3  # +y is up, +x is right
    open_pixels = np.all(env.step(action())[0]["image"] == EE_COLOUR, axis=-1).sum()
    closed_pixels = np.all(env.step(action(gripper=CLOSE))[0]["image"] == EE_COLOUR, axis=-1).sum()
    assert closed_pixels > open_pixels  # a closed gripper is drawn filled


def test_layouts_keep_objects_apart_and_on_the_table():
    for layout, jitter in (("slots", 0.12), ("fixed", 0.2), ("free", 0.12)):
        env = Tabletop2D(seed=15, layout=layout, slot_jitter=jitter)
        corners = set()
        for _ in range(50):
            env.reset()
            xy = env.object_xy
            gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1)[np.triu_indices(4, 1)]
            assert gaps.min() > 2 * env.opts.success_radius and np.abs(xy).max() < 0.9
            assert np.linalg.norm(xy - env.ee_xy, axis=-1).min() > env.opts.success_radius
            corners.add(tuple(np.sign(xy[0])))  # where object 0 (the red block) is
        if layout == "fixed":  # object k near slot k, every episode, with jitter
            assert corners == {tuple(np.sign(SLOTS[0]))} and np.abs(xy - SLOTS).max() <= jitter
        if layout == "slots":
            assert len(corners) == 4


def test_only_task_pins_the_task():
    env = make_env("tabletop2d/2", 64, seed=0)
    for _ in range(5):
        env.reset()
        assert env.task_id == 2
    env.reset(task_id=2)
    with pytest.raises(ValueError, match="pinned to task 2"):
        env.reset(task_id=1)
    with pytest.raises(ValueError, match="only_task"):
        Tabletop2D(only_task=4)


def test_bad_options_and_actions_raise_clear_errors():
    with pytest.raises(TypeError, match="max_dleta"):
        Tabletop2D(max_dleta=0.1)
    with pytest.raises(TypeError, match="max_dleta"):
        env_spec("tabletop2d", 64, max_dleta=0.1)
    with pytest.raises(ValueError, match="layout"):
        Tabletop2D(layout="grid")
    with pytest.raises(ValueError, match="step_cost_kind"):
        Tabletop2D(step_cost_kind="nap")
    with pytest.raises(ValueError, match="wrong_grasp"):
        Tabletop2D(wrong_grasp="retry")
    with pytest.raises(ValueError, match="max_delta"):
        Tabletop2D(max_delta=0)
    with pytest.raises(ValueError, match="task_id"):
        Tabletop2D().reset(task_id=7)
    env = Tabletop2D()
    env.reset()
    with pytest.raises(ValueError, match="7-D"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="chunk_len"):
        env.step_chunk(np.zeros((0, 7)))


@pytest.mark.parametrize("kind", ["sleep", "spin"])
def test_step_cost_slows_steps(kind):
    steps, mean_ms = 30, 2.0
    env = Tabletop2D(image_size=32, seed=16, step_cost_ms=mean_ms, step_cost_kind=kind)
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(action())
    per_step_ms = (time.perf_counter() - start) / steps * 1000
    assert 0.5 * mean_ms < per_step_ms < 20 * mean_ms  # the draws are seeded: only the clock varies
