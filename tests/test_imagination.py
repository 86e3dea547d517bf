"""Imagination as an extra rollout source (issue 5, items 3 and 4): in serial mode the env worker's own code
runs on ImaginedEnvs, imagined segments reach the learner, real and imagined steps are counted apart and
evaluation stays on the real env; the learner never waits for imagination; online world-model training
(replay of every real step, publication, checkpoint, resume); step_chunk(record=True); the argument checks;
a subprocess smoke run of accerl.py with a world_model process. ~45 s on 2 cores."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from accerl import EnvWorker, Learner, Run
from envs import TaskEnv
from envs.tabletop2d import INSTRUCTIONS, Tabletop2D
from pipeline import COUNTERS
from test_entry import TINY
from test_pipeline import RecordingQueue, _contains_array, tiny_args
from test_world_model import SIZE, tiny_model
from world_model import ImaginedEnv, LocalWorldModel, RealResetContexts, ReplayContexts, StepReplay, WorldModel

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def wm_dir(tmp_path_factory) -> Path:
    """A tiny world model (untrained: plumbing) whose end signal is rare (p ~ 0.05): imagined episodes
    mostly run to the horizon and are truncated, the path that bootstraps."""
    path = tmp_path_factory.mktemp("wm") / "world_model"
    tiny_model(seed=0, success_bias=-3.0).save(path)
    return path


def wm_args(tmp_path: Path, wm_dir: Path, **overrides):
    return tiny_args(tmp_path, **{**dict(wm_checkpoint=str(wm_dir), num_imagination_workers=1,
                                         imagined_envs_per_worker=2, imagine_horizon=2), **overrides})


def run_serial_capturing(args, drop: tuple[str, ...] = ()) -> tuple[Run, int, dict, dict]:
    """A serial run that records the imagined segment queues and the stats, and keeps the built roles;
    roles named in `drop` are never built (their process "never delivers")."""
    run = Run(args)
    run.build(serial=True)
    recorded = {}
    for name in ("imagined_free_segments", "imagined_full_segments", "stats"):
        original = getattr(run.chan, name)
        q = RecordingQueue(original)
        while not original.empty():
            q.put(original.get())
        q.items.clear()
        setattr(run.chan, name, q)
        recorded[name] = q.items
    run.start()
    built = {}

    def capture(name, build):
        def make():
            built[name] = build()
            return built[name]
        return make

    builders = {n: capture(n, b) for n, b in run.role_builders(serial=True).items() if n not in drop}
    code = run._run_serial(builders)
    return run, code, recorded, built


def update_metrics(recorded: dict) -> list[dict]:
    return [payload for kind, _, payload in recorded["stats"] if kind == "update"]


def test_serial_run_trains_on_imagined_segments_counted_apart(tmp_path, wm_dir):
    args = wm_args(tmp_path, wm_dir, wm_train_every_updates=1, wm_train_steps=1, wm_batch_size=4)
    run, code, recorded, built = run_serial_capturing(args)
    assert code == 0
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())

    # the imagination worker is the env worker's code on imagined envs; evaluation runs the real env
    worker = built["imagination_worker_0"]
    assert type(worker) is EnvWorker and all(isinstance(e.env, ImaginedEnv) for e in worker.envs)
    assert all(isinstance(e.env, Tabletop2D) for e in built["env_worker_0"].envs)
    assert isinstance(built["eval_worker_0"].env, Tabletop2D)
    assert summary["final_eval"]["episodes"] == 4

    # imagined segments reached the learner, mixed with real ones; they cycle through their own queues
    full = recorded["imagined_full_segments"]
    assert full and all(type(seg) is int and bool(run.shared.storage.imagined[seg, 0]) for seg in full)
    fractions = [m["charts/imagined_sample_fraction"] for m in update_metrics(recorded)]
    assert max(fractions) > 0 and min(fractions) < 1
    for item in full + recorded["imagined_free_segments"]:
        assert not _contains_array(item) and len(pickle.dumps(item)) < 200

    # counted apart: real steps drive the budget and the x axis; the imagination worker writes only
    # imagined counters, the env worker only real ones
    table = dict(zip(COUNTERS, run.shared.counters.table.T.tolist()))
    env_row, imagined_row = 1 + 0, 1 + worker.client
    assert table["global_env_step"][imagined_row] == 0 and table["imagined_chunk_step"][env_row] == 0
    assert summary["global_env_step"] >= 400 and summary["global_env_step"] == table["global_env_step"][env_row]
    assert summary["imagined_chunk_step"] > 0 and summary["imagined_episodes"] > 0
    assert summary["imagined_env_step"] >= summary["imagined_chunk_step"]
    assert any(kind == "imagined_episode" for kind, _, _ in recorded["stats"])
    # imagined episodes end by the horizon (2 chunk steps) or the end signal
    lengths = [p["length"] for kind, _, p in recorded["stats"] if kind == "imagined_episode"]
    assert max(lengths) <= 2 * args.policy.chunk_len

    # online world-model training: every real step went into the replay; the learner trained and published;
    # the in-process world models load what it publishes; the checkpoint holds the world model
    assert int(run.shared.replay.written.sum()) == summary["global_env_step"]
    wm_updates = [m["wm/updates"] for m in update_metrics(recorded) if "wm/updates" in m]
    assert wm_updates and summary["wm_online_updates"] == wm_updates[-1]
    assert {"wm/denoiser_loss", "wm/reward_loss", "perf/wm_train_s"} <= set().union(*update_metrics(recorded))
    assert run.shared.wm_weights.published_version() == wm_updates[-1]
    client = worker.envs[0].env.world_model
    assert isinstance(client, LocalWorldModel) and client.version > 0
    saved = Path(run.run_dir) / "checkpoints"
    latest = saved / json.loads((saved / "latest.json").read_text())["checkpoint"] / "world_model"
    assert json.loads((latest / "train.json").read_text())["online_updates"] == wm_updates[-1]
    assert (latest / "optimizer.safetensors").is_file()

    # --resume continues the world model from the checkpoint's copy and publishes it at once
    resumed = Run(wm_args(tmp_path / "again", wm_dir, wm_train_every_updates=1, resume=str(run.run_dir)))
    resumed.build(serial=True)
    learner = resumed.role_builders(serial=True)["learner"]()
    assert isinstance(learner, Learner) and learner.wm_trainer.update == wm_updates[-1]
    assert resumed.shared.wm_weights.published_version() == wm_updates[-1]
    weights = load_file(str(latest / "model.safetensors"))
    for name, tensor in learner.world_model.state_dict().items():
        assert torch.equal(tensor.cpu(), weights[name]), name


def test_learner_never_waits_for_imagination(tmp_path, wm_dir):
    """An imagination worker that never delivers: real learning goes on, updates on real segments only."""
    run, code, recorded, _ = run_serial_capturing(wm_args(tmp_path, wm_dir, total_env_steps=300, num_eval_workers=0),
                                                  drop=("imagination_worker_0",))
    assert code == 0
    metrics = update_metrics(recorded)
    assert len(metrics) >= 2 and all(m.get("charts/imagined_sample_fraction", 0.0) == 0.0 for m in metrics)
    assert json.loads((Path(run.run_dir) / "summary.json").read_text())["imagined_chunk_step"] == 0


def test_wait_for_imagined_gives_every_update_its_full_imagined_share(tmp_path, wm_dir, monkeypatch):
    """--wait-for-imagined: every update holds S real then exactly n imagined segments (sample-efficiency
    runs, where real env steps are the budget); without it the same run may train on fewer (above)."""
    kinds = []
    update = Learner._update

    def recording(self, segments):
        kinds.append([bool(self.shared.storage.imagined[seg, 0]) for seg in segments])
        return update(self, segments)

    monkeypatch.setattr(Learner, "_update", recording)
    args = wm_args(tmp_path, wm_dir, total_env_steps=800, num_eval_workers=0, wait_for_imagined=True,
                   imagined_share=0.6)
    S, n = args.workers.segments_per_update, args.wm.imagined_segments_per_update
    assert (S, n) == (2, 3)
    run, code, recorded, _ = run_serial_capturing(args)
    assert code == 0
    assert len(kinds) >= 2 and all(k == [False] * S + [True] * n for k in kinds), kinds
    fractions = [m["charts/imagined_sample_fraction"] for m in update_metrics(recorded)]
    assert min(fractions) > 0.3  # rows after an episode's end are dropped, so the row share is not exactly 0.6


def test_imagination_worker_sends_every_ready_chunk_before_waiting(tmp_path, wm_dir):
    """Replies for several imagined envs wait in the worker's queue: one step submits all their chunks, then
    finishes them (one world-model batch); real env workers keep stepping one env at a time."""
    run = Run(wm_args(tmp_path, wm_dir, imagined_envs_per_worker=3, max_batch=3))
    run.build(serial=True)
    builders = run.role_builders(serial=True)
    builders["learner"]()  # publishes the first weights
    worker, inference = builders["imagination_worker_0"](), builders["inference"]()
    replies = run.chan.actions[worker.client]
    for _ in range(100):
        inference.step()
        if replies.qsize() == 3:
            break
    assert replies.qsize() == 3
    calls = []
    for k, e in enumerate(worker.envs):
        for name in ("submit_chunk", "finish_chunk"):
            method = getattr(e.env, name)
            setattr(e.env, name, lambda *a, _m=method, _c=(name, k), **kw: calls.append(_c) or _m(*a, **kw))
    worker.step()
    assert [c[0] for c in calls] == ["submit_chunk"] * 3 + ["finish_chunk"] * 3, calls
    assert sorted(c[1] for c in calls[:3]) == [0, 1, 2] and replies.qsize() == 0
    assert int(run.shared.counters.table[1 + worker.client, COUNTERS.index("imagined_chunk_step")]) == 3
    assert builders["env_worker_0"]().source.batch_chunks is False


# ---------------------------------------------------------------------------------------------------
# Pieces: recorded steps, start contexts from the replay
# ---------------------------------------------------------------------------------------------------
class Stepwise(Tabletop2D):
    """Tabletop2D through the base class's step_chunk (step by step)."""

    step_chunk = TaskEnv.step_chunk


@pytest.mark.parametrize("cls", [Tabletop2D, Stepwise])
def test_step_chunk_record_returns_every_step(cls):
    env, reference = cls(image_size=SIZE, seed=3), Tabletop2D(image_size=SIZE, seed=3)
    env.reset(task_id=1, seed=5)
    reference.reset(task_id=1, seed=5)
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 7))
    obs, reward, terminated, truncated, info = env.step_chunk(actions, record=True)
    n = info["env_steps"]
    assert info["frames"].shape == (n, SIZE, SIZE, 3) and info["frames"].dtype == np.uint8
    assert info["proprio"].shape == (n, 3) and info["proprio"].dtype == np.float32
    for j in range(n):
        step_obs = reference.step(actions[j])[0]
        assert np.array_equal(info["frames"][j], step_obs["image"])
        assert np.allclose(info["proprio"][j], step_obs["proprio"])
    assert np.array_equal(obs["image"], info["frames"][-1])
    keys = set(env.step_chunk(actions)[4])
    assert {"success", "task_id", "env_steps"} <= keys and not {"frames", "proprio"} & keys  # none by default


def test_imagined_env_records_too(wm_dir):
    real = Tabletop2D(image_size=SIZE, seed=0)
    env = ImaginedEnv(real.spec, LocalWorldModel(WorldModel.load(wm_dir)), RealResetContexts(real, 4), 8, seed=0)
    env.reset(task_id=0, seed=1)
    obs, _, _, _, info = env.step_chunk(np.zeros((4, 7)), record=True)
    assert info["frames"].shape == (info["env_steps"], SIZE, SIZE, 3)
    assert np.array_equal(info["frames"][-1], obs["image"])
    assert info["proprio"].shape == (info["env_steps"], 3)


@pytest.mark.parametrize("start", ["replay", "reset", "demos"])
def test_imagined_envs_start_where_wm_start_says(tmp_path, wm_dir, start):
    """The imagination worker's env builder, as its process calls it, for each --wm-start."""
    from accerl import ImaginedEnvs
    from world_model import Collect, collect

    demos = tmp_path / "demos"
    if start == "demos":
        collect(Collect(episodes=1, image_size=SIZE, out=str(demos), seed=3))
    args = wm_args(tmp_path, wm_dir, wm_start=start, wm_demos=(str(demos),) if start == "demos" else ())
    run = Run(args)
    run.build(serial=True)
    env = ImaginedEnvs(0, args, run.spec, run.shared, run.chan, serial=True, poll_s=0.0)(0, 123)
    assert isinstance(env, ImaginedEnv) and env.spec.max_episode_steps == 2 * args.policy.chunk_len
    obs = env.reset(task_id=2)
    assert env.task_id == 2 and obs["image"].shape == (SIZE, SIZE, 3)
    _, _, _, _, info = env.step_chunk(np.zeros((args.policy.chunk_len, 7)))
    assert 1 <= info["env_steps"] <= args.policy.chunk_len


def test_replay_contexts_start_from_real_steps_once_the_task_is_there():
    replay = StepReplay(num_envs=2, capacity=16, image_size=SIZE, context_frames=4, proprio_dim=3, share=False)
    resets = []

    def fallback(rng, task_id):
        resets.append(task_id)
        return RealResetContexts(Tabletop2D(image_size=SIZE, seed=0), 4)(rng, task_id)

    contexts, rng = ReplayContexts(replay, fallback), np.random.default_rng(0)
    assert contexts(rng, None).task_id in range(4) and resets == [None]  # empty replay: a real reset
    frame = np.full((SIZE, SIZE, 3), 7, np.uint8)
    for t in range(30):  # env 1 writes task 2 (the ring wraps), nothing of task 1
        replay.add(1, frame, np.zeros(7), 2, t, False, np.zeros(3))
    ctx = contexts(rng, 2)
    assert ctx.task_id == 2 and np.array_equal(ctx.frames[-1], frame) and resets == [None]
    assert contexts(rng, 1).task_id == 1 and resets == [None, 1]


# ---------------------------------------------------------------------------------------------------
# Argument checks (before anything is spawned)
# ---------------------------------------------------------------------------------------------------
def _variant(tmp_path: Path, **changes) -> Path:
    """A saved world model whose config.json says something else (the checks read only the config)."""
    path = tmp_path / "wm_variant"
    tiny_model().save(path)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **changes}))
    return path


@pytest.mark.parametrize("overrides, message", [
    (dict(wm_checkpoint=None), "need --wm-checkpoint"),
    (dict(wm_checkpoint="/nonexistent/wm"), "holds no config.json"),
    (dict(wrist_camera=True), "drop --wrist-camera"),
    (dict(mode="sync"), "need --mode async or serial"),
    (dict(imagined_share=0.0), "must be in \\(0, 1\\)"),
    (dict(imagined_share=1.0), "must be in \\(0, 1\\)"),
    (dict(wm_start="demos"), "needs --wm-demos"),
    (dict(imagine_horizon=0), "must be >= 1"),
    (dict(wm_device="cuda:7"), "--wm-device: cuda:7"),
    (dict(num_imagination_workers=0, wm_train_every_updates=1, wm_batch_size=0), "--wm-batch-size must be >= 1"),
    (dict(num_imagination_workers=0, wait_for_imagined=True), "--wait-for-imagined .* --num-imagination-workers"),
])
def test_bad_world_model_arguments_fail_before_spawning(tmp_path, wm_dir, overrides, message):
    with pytest.raises(SystemExit, match=message):
        wm_args(tmp_path, wm_dir, **overrides)


def test_world_model_must_match_the_policy_and_the_tasks(tmp_path, wm_dir):
    with pytest.raises(SystemExit, match="imagines 64 px frames, the policy sees 32 px"):
        wm_args(tmp_path, wm_dir, wm_checkpoint=str(_variant(tmp_path, image_size=64)))
    with pytest.raises(SystemExit, match="was not trained on the tasks"):
        wm_args(tmp_path, wm_dir, wm_checkpoint=str(_variant(tmp_path, instructions=list(INSTRUCTIONS[:2]))))
    args = wm_args(tmp_path, wm_dir, eval_only=True, checkpoint="unused")  # evaluation: real env, no world model
    assert args.wm.num_imagination_workers == 0
    args = wm_args(tmp_path, wm_dir, imagined_share=0.5, segments_per_update=2)
    assert args.wm.imagined_segments_per_update == 2  # 2 real + 2 imagined: half of the super batch


# ---------------------------------------------------------------------------------------------------
# The real entry script
# ---------------------------------------------------------------------------------------------------
def test_entry_script_runs_with_imagination_workers_and_a_world_model_process(tmp_path, wm_dir):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "accerl.py"), "--no-task-defaults", "--run-dir", str(run_dir),
         "--num-env-workers", "1",
         "--envs-per-worker", "2", "--num-eval-workers", "0", "--segment-len", "4", "--segments-per-update", "2",
         "--total-env-steps", "300", "--log-every-s", "2", *TINY, "--wm-checkpoint", str(wm_dir),
         "--num-imagination-workers", "1", "--imagined-envs-per-worker", "2", "--imagine-horizon", "2",
         "--wm-train-every-updates", "2", "--wm-batch-size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_env_step"] >= 300 and summary["updates"] >= 1
    assert summary["imagined_chunk_step"] > 0
    for role in ("[imagination_worker_0] ready", "[world_model] ready", "[learner] world model from"):
        assert role in result.stderr
    assert (run_dir / "checkpoints").is_dir()


def test_imagination_feeds_a_proprio_policy_only_from_a_world_model_that_predicts_proprio(tmp_path, wm_dir):
    """A policy that reads proprio (tabletop2d's defaults do) needs a world model that predicts it: one without is
    refused before spawning; with one, the imagined env's proprio moves as the model says."""
    from test_pipeline import TINY_POLICY
    from accerl import ImaginedEnvs, derive_and_check
    from vla_policy import PolicyConfig

    policy = PolicyConfig(**TINY_POLICY, vision_tower="resnet", resnet_widths=(8, 16, 16, 16), proprio_dim=3)
    frames_only = tmp_path / "frames_only"
    tiny_model(seed=0, proprio_dim=0).save(frames_only)
    args = wm_args(tmp_path, frames_only)
    args.policy = policy
    with pytest.raises(SystemExit, match="does not predict it"):
        Run(derive_and_check(args)).build(serial=True)
    args = wm_args(tmp_path, wm_dir)
    args.policy = policy
    run = Run(derive_and_check(args))
    run.build(serial=True)
    env = ImaginedEnvs(0, args, run.spec, run.shared, run.chan, serial=True, poll_s=0.0)(0, 123)
    start = env.reset(task_id=1)["proprio"]
    obs, _, _, _, info = env.step_chunk(np.full((args.policy.chunk_len, 7), 0.5), record=True)
    assert obs["proprio"].shape == (3,) and not np.allclose(obs["proprio"], start)
    assert np.array_equal(info["proprio"][info["env_steps"] - 1], obs["proprio"])
