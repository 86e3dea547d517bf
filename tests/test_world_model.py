"""The world model (world_model.py): transitions from demo files, the denoiser's loss falls on a tiny
dataset, reward-model metrics against hand-computed values, one shared env-contract check run on the real
tabletop2d env and on ImaginedEnv (in-process and served), served = local for the same seed, atomic save /
load round trip, the train / eval commands and benchmarks/wm_quality.py on given demo files. ~20-30 s on 2 cores."""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.tabletop2d import INSTRUCTIONS, Tabletop2D, expert_chunk
from envs import env_spec
from world_model import (Collect, ContextBank, ImaginationSlots, ImaginedEnv, LocalWorldModel, RealResetContexts,
                         ServedWorldModel, SlotShape, StartContext, StepReplay, SuccessSampler, TransitionData, WorldModel, WorldModelConfig,
                         WorldModelServer, WorldModelTrainer, collect, evaluate, load_optimizer_state, main, psnr, read_episodes,
                         reward_metrics, ssim)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CHUNK = 8
HORIZON = 12  # imagined env steps: one full chunk, then a chunk cut short by the time limit
TINY = dict(image_size=SIZE, channels=(8, 16), blocks_per_level=1, reward_channels=(8, 16), reward_hidden=32,
            action_embed_dim=8, instructions=INSTRUCTIONS, proprio_dim=3, proprio_hidden=16)


def tiny_model(seed: int = 0, success_bias: float | None = None, end_bias: float | None = None,
               **config) -> WorldModel:
    """A tiny world model; `success_bias` pins both outputs (always success and end, or never), `end_bias`
    then the end output alone (a failure that ends the episode: success -20, end +20). Its proprio model's last
    layer is random (an untrained one starts at zero, keeping the state put), so imagined proprio moves."""
    torch.manual_seed(seed)
    model = WorldModel(WorldModelConfig(**{**TINY, **config})).eval()
    if model.proprio is not None:
        torch.nn.init.normal_(model.proprio.net[-1].weight, std=0.3)
    if success_bias is not None:
        with torch.no_grad():
            model.reward.head[-1].weight.zero_()
            model.reward.head[-1].bias.fill_(success_bias)
            if end_bias is not None:
                model.reward.head[-1].bias[1] = end_bias
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Weak-policy episodes (both outcomes) written by `collect` in demos.py's layout."""
    out = tmp_path_factory.mktemp("wm_data")
    summary = collect(Collect(episodes=3, image_size=SIZE, out=str(out), seed=3))
    assert len(summary["tasks"]) == 4
    return out


@pytest.fixture(scope="module")
def episodes(data_dir) -> list[dict]:
    return read_episodes((str(data_dir),), SIZE)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def test_transitions_pad_episode_starts_and_label_successes(episodes):
    data = TransitionData(episodes, INSTRUCTIONS, context_frames=4)
    assert len(data) == sum(len(e["actions"]) for e in episodes)
    e = next(i for i, ep in enumerate(episodes) if ep["success"] and len(ep["actions"]) >= 3)
    first, end = data.episodes[e]
    ep = episodes[e]
    batch = data.batch(torch.tensor([first, first + 2, end - 1]))
    # the first step: its frame four times, zero actions except its own
    assert all(np.array_equal(batch["frames"][0, k].numpy(), ep["images"][0]) for k in range(4))
    assert torch.all(batch["actions"][0, :3] == 0) and np.allclose(batch["actions"][0, 3].numpy(), ep["actions"][0])
    # step 2: frames 0, 0, 1, 2 and actions 0, a0, a1, a2
    assert [int(np.argmax([np.array_equal(batch["frames"][1, k].numpy(), f) for f in ep["images"][:3]]))
            for k in range(4)] == [0, 0, 1, 2]
    assert np.allclose(batch["actions"][1, 1:].numpy(), ep["actions"][:3]) and torch.all(batch["actions"][1, 0] == 0)
    assert np.array_equal(batch["next_frame"][1].numpy(), ep["images"][3])
    # the last step: success label, no recorded successor frame
    assert batch["has_next"].tolist() == [True, True, False]
    assert batch["success"].tolist() == [0.0, 0.0, 1.0]
    assert int(data.success.sum()) == sum(bool(ep["success"]) for ep in episodes)
    # end labels: every terminated episode's last step, successes and wrong grasps (collect records both)
    failures = [ep for ep in episodes if ep["terminated"] and not ep["success"]]
    assert failures and int(data.terminated.sum()) == sum(bool(ep["terminated"]) for ep in episodes)
    assert torch.all(data.terminated[data.success])  # a success is an end
    assert int(data.task[first]) == INSTRUCTIONS.index(ep["instruction"])


def test_success_sampler_weights_keep_the_loss_unbiased(episodes):
    data = TransitionData(episodes, INSTRUCTIONS, 4)
    sampler = SuccessSampler(data, batch_size=16, success_fraction=0.25, generator=torch.Generator().manual_seed(0))
    batch = sampler.sample()
    assert int(batch["success"].sum()) == 4
    rate = float(data.success.float().mean())
    # E[weight x indicator] reproduces the real frequencies: share x w+ = rate, (1 - share) x w- = 1 - rate
    assert math.isclose(0.25 * sampler.weight_positive, rate, rel_tol=1e-6)
    assert math.isclose(0.75 * sampler.weight_negative, 1 - rate, rel_tol=1e-6)
    assert sum(len(sampler.sample()["success"]) for _ in range(20)) == 320  # wraps around its passes


def test_step_replay_gives_the_transitions_of_the_files(episodes):
    """Real steps written one by one into a small ring (it wraps around) come back as the same batches as
    TransitionData builds from the episodes."""
    data = TransitionData(episodes, INSTRUCTIONS, 4)
    replay = StepReplay(num_envs=2, capacity=40, image_size=SIZE, context_frames=4, proprio_dim=3, share=False)
    for e in episodes:
        for t in range(len(e["actions"])):
            last = t == len(e["actions"]) - 1
            replay.add(1, e["images"][t], e["actions"][t], INSTRUCTIONS.index(e["instruction"]), t,
                       bool(e["success"]) and last, proprio=e["proprio"][t], terminated=bool(e["terminated"]) and last)
    written = int(replay.written[1])
    assert written == len(data) and len(replay) == 40 - 4 - 2
    positions = torch.arange(written - len(replay), written)
    got, want = replay.batch(torch.ones_like(positions), positions), data.batch(positions)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    batch = replay.sample(64, torch.Generator().manual_seed(0))
    assert batch["frames"].shape == (64, 4, SIZE, SIZE, 3) and batch["success"].shape == (64,)
    # recent real steps as starts of imagined episodes
    task = int(want["task_id"][-1])
    ctx = replay.start_context(np.random.default_rng(0), task_id=task)
    assert ctx.task_id == task and ctx.frames.shape == (4, SIZE, SIZE, 3) and ctx.past_actions.shape == (3, 7)
    assert any(np.array_equal(ctx.frames[-1], f) for f in data.images[-len(replay):].numpy())


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def test_denoiser_reward_and_proprio_losses_fall_on_a_tiny_dataset(episodes):
    model = tiny_model().train()
    data = TransitionData(episodes, INSTRUCTIONS, 4)
    fixed = data.batch(torch.nonzero(data.has_next).squeeze(1)[:32])

    def fixed_loss() -> float:  # same sigmas and noise every time
        with torch.no_grad():
            return model.denoiser(fixed, torch.Generator().manual_seed(0))[0].item()

    before = fixed_loss()
    trainer = WorldModelTrainer(model, lr=3e-3, warmup_updates=1)
    sampler = SuccessSampler(data, 16, 0.25, torch.Generator().manual_seed(1))
    reward_losses, end_losses = [], []
    proprio_before = model.proprio(fixed)[0].item()
    for _ in range(40):
        metrics = trainer.train_step(sampler.sample())
        reward_losses.append(metrics["wm/reward_loss"])
        end_losses.append(metrics["wm/end_loss"])
        assert set(metrics) >= {"wm/loss", "wm/denoiser_loss", "wm/reward_loss", "wm/end_loss", "wm/proprio_loss",
                                "wm/grad_norm", "wm/lr"}
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)
    assert np.mean(reward_losses[-10:]) < np.mean(reward_losses[:10])
    assert np.mean(end_losses[-10:]) < np.mean(end_losses[:10])
    proprio_after = model.proprio(fixed)[0].item()
    assert proprio_after < 0.7 * proprio_before, (proprio_before, proprio_after)


def test_reward_metrics_against_hand_computed_values():
    m = reward_metrics(np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 1, 0, 1]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert math.isclose(m["auroc"], 0.75)  # 3 of the 4 (positive, negative) pairs are ordered right
    assert math.isclose(m["ece"], (0.1 + 0.6 + 0.6 + 0.1) / 4)  # one value per bin
    assert math.isclose(m["brier"], (0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert math.isclose(reward_metrics(np.array([0.5, 0.5]), np.array([1, 0]))["auroc"], 0.5)  # ties count half
    calibrated = reward_metrics(np.array([0.25] * 4), np.array([1, 0, 0, 0]))
    assert calibrated["ece"] == 0.0 and calibrated["accuracy"] == 0.75 and calibrated["balanced_accuracy"] == 0.5
    assert math.isnan(reward_metrics(np.array([0.2, 0.3]), np.array([0, 0]))["auroc"])


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8))
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert torch.allclose(psnr(a, a), torch.full((2,), 10 * math.log10(255 ** 2 * SIZE * SIZE * 3)))
    b = a.clone()
    b[0] = (a[0].int() ^ 4).to(torch.uint8)  # every value off by exactly 4
    assert math.isclose(float(psnr(a, b)[0]), 10 * math.log10(255 ** 2 / 16), rel_tol=1e-5)
    assert float(ssim(a, b)[0]) < 1.0


def test_imagine_rows_do_not_depend_on_the_batch():
    model = tiny_model()
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (3, 4, SIZE, SIZE, 3), dtype=np.uint8))
    past, actions = torch.rand(3, 3, 7) * 2 - 1, torch.rand(3, 5, 7) * 2 - 1
    tasks, seeds, proprio = torch.tensor([0, 1, 2]), [11, 12, 13], torch.rand(3, 3)
    with torch.no_grad():  # a proprio model that moves by a constant step
        model.proprio.net[-1].weight.zero_()
        model.proprio.net[-1].bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    batched_frames, batched_p, batched_end, batched_proprio = model.imagine(frames, past, actions, tasks, seeds, proprio)
    assert batched_frames.dtype == torch.uint8 and batched_frames.shape == (3, 5, SIZE, SIZE, 3)
    assert batched_p.shape == batched_end.shape == (3, 5) and not torch.equal(batched_p, batched_end)
    assert batched_proprio.shape == (3, 5, 3)
    assert torch.allclose(batched_proprio[:, -1, :2] - proprio[:, :2], torch.tensor([0.5, -1.0]).expand(3, 2), atol=1e-5)
    for b in range(3):
        f, p, end, state = model.imagine(frames[b:b + 1], past[b:b + 1], actions[b:b + 1], tasks[b:b + 1],
                                         seeds[b:b + 1], proprio[b:b + 1])
        assert (f[0].int() - batched_frames[b].int()).abs().max() <= 1  # float reductions may round differently
        assert torch.allclose(p[0], batched_p[b], atol=1e-5) and torch.allclose(end[0], batched_end[b], atol=1e-5)
        assert torch.allclose(state[0], batched_proprio[b], atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = tiny_model(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.square().sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    path = model.save(tmp_path / "wm", extra={"note": "test"}, optimizer=optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wm"]  # no temporary directory left behind
    loaded = WorldModel.load(path)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    assert load_optimizer_state(path, fresh)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    args = (torch.zeros(1, 4, SIZE, SIZE, 3, dtype=torch.uint8), torch.zeros(1, 3, 7), torch.ones(1, 2, 7),
            torch.tensor([1]), [5], torch.rand(1, 3))
    for x, y in zip(model.imagine(*args), loaded.imagine(*args), strict=True):
        assert torch.equal(x, y)
    model.save(path)  # overwriting keeps one complete directory
    assert (path / "model.safetensors").is_file() and not (path / "optimizer.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# The env contract, shared by the real env and the imagined one
# ---------------------------------------------------------------------------------------------------
@contextmanager
def served(model: WorldModel):
    """A WorldModelServer stepped by a thread (queue.Queue, unshared slots): the process wiring in one process."""
    slots = ImaginationSlots(SlotShape(num_slots=2, context_frames=4, image_size=SIZE, action_dim=7,
                                       max_actions=CHUNK, proprio_dim=3), share=False)
    requests, replies = queue.Queue(maxsize=4), [queue.Queue(maxsize=2)]
    server = WorldModelServer(model, slots, requests, replies, poll_s=0.01, max_batch=2, batch_timeout_ms=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.step() for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    try:
        yield ServedWorldModel(model.cfg, client=0, slot=1, slots=slots, requests=requests, replies=replies[0],
                               wait_timeout_s=30.0, poll_s=0.01, should_stop=stop.is_set)
    finally:
        stop.set()
        thread.join(timeout=10)


@contextmanager
def env_under_test(kind: str, ending: str):
    """(env, policy) where the policy's episode ends by `ending`: "terminated" (success) or "truncated"."""
    if kind == "tabletop2d":
        env = Tabletop2D(image_size=SIZE, seed=0)
        if ending == "terminated":
            yield env, lambda: expert_chunk(env, CHUNK)
        else:  # standing still with the gripper open never succeeds
            yield env, lambda: np.zeros((CHUNK, 7))
        return
    model = tiny_model(success_bias=20.0 if ending == "terminated" else -20.0)
    real = Tabletop2D(image_size=SIZE, seed=1)
    contexts = RealResetContexts(real, context_frames=4)
    rng = np.random.default_rng(0)

    def policy():
        return rng.uniform(-1, 1, (CHUNK, 7))

    if kind == "imagined":
        yield ImaginedEnv(real.spec, LocalWorldModel(model), contexts, HORIZON, seed=0), policy
    else:
        with served(model) as client:
            yield ImaginedEnv(real.spec, client, contexts, HORIZON, seed=0), policy


def check_observation(env, obs: dict) -> None:
    spec = env.spec
    assert set(obs) == set(spec.cameras) | {"proprio"}
    for camera in spec.cameras:
        assert obs[camera].dtype == np.uint8 and obs[camera].shape == (spec.image_size, spec.image_size, 3)
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (spec.proprio_dim,)


@pytest.mark.parametrize("kind", ["tabletop2d", "imagined", "imagined-served"])
@pytest.mark.parametrize("ending", ["terminated", "truncated"])
def test_env_contract(kind, ending):
    with env_under_test(kind, ending) as (env, policy):
        with pytest.raises(RuntimeError):  # no step before reset
            env.step_chunk(policy())
        obs = env.reset(task_id=2, seed=7)
        check_observation(env, obs)
        assert env.task_id == 2 and env.instruction == INSTRUCTIONS[2]
        total_steps, done, ret = 0, False, 0.0
        while not done:
            obs, reward, terminated, truncated, info = env.step_chunk(policy())
            check_observation(env, obs)
            # the contract's keys (an env may add its own, as tabletop2d's "grasped"), none of record=True's
            assert {"success", "task_id", "env_steps"} <= set(info) and not {"frames", "proprio"} & set(info)
            assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
            assert type(info["success"]) is bool and info["task_id"] == 2 and 1 <= info["env_steps"] <= CHUNK
            assert not (terminated and truncated)
            total_steps += info["env_steps"]
            ret += reward
            done = terminated or truncated
            if not done:
                assert info["env_steps"] == CHUNK  # only an ending cuts a chunk short
        assert total_steps <= env.spec.max_episode_steps
        if ending == "terminated":
            assert terminated and info["success"] and ret > 0.5
        else:
            assert truncated and not info["success"] and total_steps == env.spec.max_episode_steps
        with pytest.raises(RuntimeError):  # the episode is over
            env.step_chunk(policy())
        # the same seed replays the same start; a single step is a chunk of one
        again = env.reset(task_id=2, seed=7)
        assert np.array_equal(again["image"], env.reset(task_id=2, seed=7)["image"])
        _, _, _, _, info = env.step(policy()[0])
        assert info["env_steps"] == 1


def test_imagined_env_is_deterministic_and_served_equals_local(episodes):
    model = tiny_model(seed=5)
    spec = Tabletop2D(image_size=SIZE).spec
    bank = ContextBank(episodes, INSTRUCTIONS, context_frames=4)
    actions = np.random.default_rng(0).uniform(-1, 1, (2, CHUNK, 7))

    def rollout(client) -> list:
        env = ImaginedEnv(spec, client, bank, horizon_env_steps=64, seed=0)
        obs = env.reset(task_id=1, seed=3)
        out = [obs["image"], obs["proprio"]]
        for chunk in actions:
            obs, reward, terminated, truncated, _ = env.step_chunk(chunk)
            out += [obs["image"], obs["proprio"], reward, terminated]
            if terminated or truncated:
                break
        return out

    local = rollout(LocalWorldModel(model))
    assert all(np.array_equal(a, b) for a, b in zip(local, rollout(LocalWorldModel(model))))
    assert not np.allclose(local[1], local[3])  # the imagined proprio follows the proprio model
    with served(model) as client:
        remote = rollout(client)
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        assert np.array_equal(a, b)


def test_envs_of_one_worker_share_a_batch_and_a_reply_queue(episodes):
    """An imagination worker submits the chunks of all its ready envs, then finishes them (any order): one
    batch at the server, one reply queue, and the same episodes as one env at a time in-process."""
    model = tiny_model(seed=5)
    spec = Tabletop2D(image_size=SIZE).spec
    bank = ContextBank(episodes, INSTRUCTIONS, context_frames=4)
    chunks = np.random.default_rng(1).uniform(-1, 1, (3, CHUNK, 7))
    slots = ImaginationSlots(SlotShape(3, 4, SIZE, 7, CHUNK, proprio_dim=3), share=False)
    requests, replies, arrived = queue.Queue(), [queue.Queue()], set()
    server = WorldModelServer(model, slots, requests, replies, poll_s=0.0, max_batch=3, batch_timeout_ms=1e6)
    served = [ImaginedEnv(spec, ServedWorldModel(model.cfg, 0, k, slots, requests, replies[0], poll_s=0.0,
                                                 should_stop=lambda: server.step() or False, arrived=arrived),
                          bank, horizon_env_steps=64, seed=k) for k in range(3)]
    local = [ImaginedEnv(spec, LocalWorldModel(model), bank, horizon_env_steps=64, seed=k) for k in range(3)]
    for k in range(3):
        assert np.array_equal(served[k].reset(task_id=k, seed=10 + k)["image"],
                              local[k].reset(task_id=k, seed=10 + k)["image"])
    for k in range(3):
        served[k].submit_chunk(chunks[k])
    assert requests.qsize() == 3 and not server.perf["batch_size"]  # all in flight, none served yet
    with pytest.raises(RuntimeError, match="already in flight"):
        served[0].submit_chunk(chunks[0])
    for k in (2, 0, 1):  # finished in another order than submitted: replies are kept for their env
        got, want = served[k].finish_chunk(), local[k].step_chunk(chunks[k])
        assert np.array_equal(got[0]["image"], want[0]["image"]) and got[1:4] == want[1:4]
    assert server.perf["batch_size"] == [3] and not arrived
    with pytest.raises(RuntimeError, match="no chunk in flight"):
        served[0].finish_chunk()


def test_server_loads_published_weights():
    """A trainer publishes new world-model weights (WeightBroadcast, version counter); the server serves
    them from its next request on and stamps the version into the reply slot."""
    from pipeline import WeightBroadcast

    model = tiny_model(success_bias=-20.0)
    weights = WeightBroadcast(model.state_dict(), share=False)
    slots = ImaginationSlots(SlotShape(1, 4, SIZE, 7, CHUNK, proprio_dim=3), share=False)
    requests, replies = queue.Queue(), [queue.Queue()]
    server = WorldModelServer(model, slots, requests, replies, poll_s=0.0, max_batch=1, weights=weights)
    client = ServedWorldModel(model.cfg, 0, 0, slots, requests, replies[0], poll_s=0.0,
                              should_stop=lambda: server.step() or False)  # serve while waiting
    frames, past, actions = np.zeros((4, SIZE, SIZE, 3), np.uint8), np.zeros((3, 7)), np.zeros((2, 7))
    assert client.imagine(frames, past, actions, 0, 1, np.zeros(3))[1].max() < 1e-6
    trained = tiny_model(success_bias=20.0)
    weights.publish(trained.state_dict(), version=3)
    assert client.imagine(frames, past, actions, 0, 1, np.zeros(3))[1].min() > 1 - 1e-6
    assert int(slots.version[0]) == 3 and server.version == 3


def test_context_bank_starts_from_real_frames(episodes):
    bank = ContextBank(episodes, INSTRUCTIONS, context_frames=4, start="first")
    ctx = bank(np.random.default_rng(0), task_id=3)
    ep = next(e for e in episodes if e["instruction"] == INSTRUCTIONS[3])
    assert ctx.task_id == 3 and ctx.env_step == 0 and ctx.frames.shape == (4, SIZE, SIZE, 3)
    assert np.array_equal(ctx.frames[-1], ctx.frames[0]) and not ctx.past_actions.any()  # padded start
    assert any(np.array_equal(ctx.frames[-1], e["images"][0]) for e in episodes if e["instruction"] == INSTRUCTIONS[3])
    assert ctx.proprio.shape == ep["proprio"][0].shape
    anywhere = ContextBank(episodes, INSTRUCTIONS, context_frames=4)
    ctx = anywhere(np.random.default_rng(1), task_id=None)
    assert 0 <= ctx.env_step < 64 and ctx.past_actions.shape == (3, 7)


def test_imagined_env_refuses_a_mismatched_spec():
    model = tiny_model()
    env = Tabletop2D(image_size=64)
    with pytest.raises(ValueError, match="px"):
        ImaginedEnv(env.spec, LocalWorldModel(model), RealResetContexts(env, 4), HORIZON)
    wrist = Tabletop2D(image_size=SIZE, wrist_camera=True)
    with pytest.raises(ValueError, match="wrist"):
        ImaginedEnv(wrist.spec, LocalWorldModel(model), RealResetContexts(wrist, 4), HORIZON)


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------
def test_train_and_eval_commands(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--model.image-size", str(SIZE), "--model.channels", "8", "16", "--model.blocks-per-level", "1",
             "--model.reward-channels", "8", "16", "--model.reward-hidden", "32", "--model.action-embed-dim", "8"]
    result = subprocess.run(
        [sys.executable, "world_model.py", "train", "--data", str(data_dir), "--run-dir", str(run), "--total-updates",
         "4", "--batch-size", "4", "--log-every-updates", "2", "--eval-windows", "8", "--holdout-fraction", "0.3",
         "--threads", "1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| open-loop PSNR (dB) |" in result.stdout
    assert (run / "world_model" / "model.safetensors").is_file() and (run / "wm_strip.png").is_file()
    assert main(["eval", "--checkpoint", str(run / "world_model"), "--data", str(data_dir), "--holdout-fraction",
                 "0.3", "--windows", "8", "--horizons", "1", "2", "--strip", str(tmp_path / "strip.png")]) == 0
    out = capsys.readouterr().out
    assert "reward model on real contexts" in out and (tmp_path / "strip.png").is_file()


def test_train_names_the_fix_when_the_data_are_of_other_tasks(data_dir, tmp_path):
    # e.g. LIBERO demonstrations with the default --task tabletop2d: stopped before any training
    with pytest.raises(SystemExit, match="instruction.*not among the 1 tasks.*pass the --task"):
        main(["train", "--data", str(data_dir), "--run-dir", str(tmp_path / "run"), "--model.image-size", str(SIZE),
              "--model.instructions", "stack the plates"])
    assert not (tmp_path / "run").exists()


def test_wm_quality_scores_given_demo_files(data_dir, tmp_path):
    # benchmarks/wm_quality.py on demos.py files of one task (the path LIBERO takes: --task, --test-data): the
    # table and the JSON are those of `evaluate` on exactly that file, every horizon finite
    from demos import task_file_name

    checkpoint = tiny_model(seed=5).save(tmp_path / "wm")
    test_file = data_dir / task_file_name(INSTRUCTIONS[1])
    result = subprocess.run(
        [sys.executable, "benchmarks/wm_quality.py", "--checkpoint", str(checkpoint), "--task", "tabletop2d/1",
         "--test-data", str(test_file), "--windows", "16", "--device", "cpu", "--data-dir", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| open-loop PSNR (dB) |" in result.stdout and "| copy-last-frame PSNR (dB) |" in result.stdout
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert not (tmp_path / "none").exists()  # nothing collected: only the given file is read
    episodes = read_episodes((str(test_file),), SIZE)
    assert scored["task"] == "tabletop2d/1" and scored["test_episodes"] == len(episodes) == 3
    expected, _ = evaluate(WorldModel.load(checkpoint), TransitionData(episodes, INSTRUCTIONS, 4), windows=16, seed=0)
    for h in (1, 2, 4, 8):
        for key in (f"open_loop_psnr_h{h}", f"copy_last_psnr_h{h}"):
            assert math.isfinite(scored[key]) and 5 < scored[key] < 100, key
            assert scored[key] == pytest.approx(expected[key], rel=1e-5), key
    assert scored["reward_count"] == len(TransitionData(episodes, INSTRUCTIONS, 4))
    assert scored["reward_accuracy"] == pytest.approx(expected["reward_accuracy"])


def test_wm_quality_refuses_other_tasks_without_their_data(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/wm_quality.py", "--task", "libero_spatial/0", "--checkpoint",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pass --test-data" in result.stderr


def test_evaluate_reports_every_metric(episodes):
    data = TransitionData(episodes, INSTRUCTIONS, 4)
    metrics, image = evaluate(tiny_model(), data, horizons=(1, 2, 4, 8), windows=16, strip_steps=3)
    for key in ("next_frame_psnr", "next_frame_ssim", "open_loop_psnr_h8", "copy_last_psnr_h8", "reward_accuracy",
                "reward_ece", "reward_auroc", "reward_auroc_imagined"):
        assert key in metrics, key
    assert image.dtype == np.uint8 and image.shape[1] == 3 * SIZE + 4  # real | imagined | difference


def test_a_failure_the_end_output_predicts_ends_the_imagined_episode_without_success():
    """End output high, success low (a wrong grasp): the imagined episode terminates at the first action,
    info["success"] False, reward ~0; with the success output high too it is a success."""
    spec = env_spec("tabletop2d", SIZE)
    ctx = StartContext(frames=np.zeros((4, SIZE, SIZE, 3), np.uint8), past_actions=np.zeros((3, 7), np.float32),
                       proprio=np.zeros(3, np.float32), task_id=0, env_step=0)
    for success_bias, success in ((-20.0, False), (20.0, True)):
        model = tiny_model(success_bias=success_bias, end_bias=20.0)
        env = ImaginedEnv(spec, LocalWorldModel(model), lambda rng, task_id: ctx, horizon_env_steps=HORIZON)
        env.reset(task_id=0, seed=1)
        _, reward, terminated, truncated, info = env.step_chunk(np.zeros((CHUNK, 7)))
        assert (terminated, truncated, info["success"], info["env_steps"]) == (True, False, success, 1)
        assert reward == pytest.approx(float(success), abs=1e-6)


def test_a_world_model_saved_without_the_end_output_loads_and_ends_on_success_only(tmp_path):
    """config.json of a model saved before `end_head` and `proprio_dim` existed lacks the keys: it loads with one
    output, its end probability is the success probability, and the proprio it is given stays put."""
    old = tiny_model(end_head=False, proprio_dim=0)
    old.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["end_head"], config["proprio_dim"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = WorldModel.load(tmp_path / "old")
    assert not loaded.cfg.end_head and loaded.reward.head[-1].out_features == 1
    assert loaded.cfg.proprio_dim == 0 and loaded.proprio is None
    frames, proprio = torch.zeros(1, 4, SIZE, SIZE, 3, dtype=torch.uint8), torch.rand(1, 3)
    _, success, end, state = loaded.imagine(frames, torch.zeros(1, 3, 7), torch.zeros(1, 2, 7), torch.tensor([0]),
                                            [0], proprio)
    assert torch.equal(success, end) and torch.equal(state, proprio[:, None].expand(1, 2, 3))
