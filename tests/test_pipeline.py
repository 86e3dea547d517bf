"""Plumbing of the pipeline in serial mode (the same role objects as the processes, one process):
storage and queues, weight publication, checkpoints and resume, env restarts."""

import dataclasses
import json
import os
import pickle
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt
from accerl import Args, EnvArgs, ExperimentArgs, Learner, Run, WorkersArgs, derive_and_check
from pipeline import Heartbeats, WeightBroadcast, interrupt_on_stop_signals, memory_use
from vla_policy import PolicyConfig

TINY_POLICY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=1, vision_mlp=64,
                   hidden=32, decoder_layers=1, decoder_heads=1, decoder_mlp=64, value_hidden=32)


def tiny_args(tmp_path: Path, **overrides) -> Args:
    """A tiny serial run; overrides by field name, whatever its group (as flags: total_env_steps=..., resume=...)."""
    args = Args(experiment=ExperimentArgs(mode="serial", total_env_steps=400, run_dir=str(tmp_path / "run"),
                                          log_every_s=1e9, checkpoint_every_updates=0),
                policy=PolicyConfig(**TINY_POLICY),
                workers=WorkersArgs(num_env_workers=1, envs_per_worker=2, segment_len=8, segments_per_update=2,
                                    eval_every_updates=3, eval_episodes=4, final_eval_episodes=4))
    for name, value in overrides.items():
        group = next(g for g in (args.experiment, args.env, args.workers, args.algorithm, args.wm) if hasattr(g, name))
        setattr(group, name, value)
    return derive_and_check(args)


class RecordingQueue(queue.Queue):
    """A queue.Queue that keeps a copy of everything put through it."""

    def __init__(self, inner: queue.Queue):
        super().__init__(maxsize=inner.maxsize)
        self.items = []

    def put(self, item, block=True, timeout=None):
        self.items.append(item)
        super().put(item, block, timeout)


def _contains_array(obj) -> bool:
    if isinstance(obj, (np.ndarray, torch.Tensor, bytes, bytearray)):
        return True
    if isinstance(obj, dict):
        return any(_contains_array(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains_array(v) for v in obj)
    return False


def run_serial(args: Args, wrap_queues: bool = False) -> tuple[Run, int, dict]:
    run = Run(args)
    run.build(serial=True)
    recorded = {}
    if wrap_queues:
        chan = run.chan
        for name in ("free_segments", "full_segments", "eval_jobs", "stats"):
            q = RecordingQueue(getattr(chan, name))
            while not getattr(chan, name).empty():  # free_segments is pre-filled
                q.put(getattr(chan, name).get())
            q.items.clear()
            setattr(chan, name, q)
            recorded[name] = q.items
        for name in ("requests", "actions"):  # one queue per inference server / per client
            setattr(chan, name, [RecordingQueue(q) for q in getattr(chan, name)])
            recorded[name] = [q.items for q in getattr(chan, name)]
    run.start()
    code = run._run_serial(run.role_builders(serial=True))
    return run, code, recorded


def test_queues_carry_indices_only_never_image_bytes(tmp_path):
    run, code, recorded = run_serial(tiny_args(tmp_path), wrap_queues=True)
    assert code == 0
    data_queues = {k: v for k, v in recorded.items() if k != "stats"}
    for name in ("requests", "actions"):
        data_queues[name] = [item for items in recorded[name] for item in items]
    assert all(len(items) > 0 for items in data_queues.values()), {k: len(v) for k, v in data_queues.items()}
    for name, items in data_queues.items():
        for item in items:
            assert not _contains_array(item), (name, item)
            assert len(pickle.dumps(item)) < 200, (name, item)
    # statistics are small too: videos go to files, the message only carries the path
    for item in recorded["stats"]:
        assert not _contains_array(item), item
        assert len(pickle.dumps(item)) < 4096


def test_serial_run_counts_consistently_and_writes_summary(tmp_path):
    run, code, _ = run_serial(tiny_args(tmp_path))
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert code == 0 and summary["exit_code"] == 0
    assert summary["global_env_step"] >= 400
    # every update consumed segments_per_update x segment_len chunk steps; at most a few are in flight
    assert summary["updates"] >= 1
    assert summary["chunk_step"] >= summary["updates"] * 2 * 8
    assert summary["final_eval"]["episodes"] == 4
    assert 0.0 <= summary["final_eval_success"] <= 1.0
    for key in ("torch", "transformers", "python"):
        assert key in summary["versions"]
    assert (Path(run.run_dir) / "eval_results.md").is_file()
    assert list(Path(run.run_dir).glob("events.out.tfevents*"))


def test_env_that_raises_is_rebuilt_and_the_run_goes_on(tmp_path):
    # every env instance (training and evaluation) raises at its 150th step: about every third episode
    args = tiny_args(tmp_path, env_options='{"fail_every_steps": 150}', total_env_steps=700)
    run, code, _ = run_serial(args)
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert code == 0
    assert summary["env_restarts"] >= 3
    assert summary["global_env_step"] >= 700
    assert summary["final_eval"]["episodes"] == 4  # evaluation repeats a job whose env raised


@pytest.mark.parametrize("when_behind", ["wait", "drop-oldest"])
def test_a_slow_learner_makes_envs_wait_or_drop_the_oldest_segments(tmp_path, monkeypatch, when_behind):
    # the learner steps only every 20th turn of the serial loop: it falls behind the env worker
    step, assemble, turns, trained = Learner.step, Learner._assemble, [0], []

    def slow_step(self):
        turns[0] += 1
        if turns[0] % 20 == 0:
            step(self)

    def recording_assemble(self, segments):
        batch = assemble(self, segments)
        trained.append(batch["version"][:, :-1].clone())  # rows 0..T-1: the chunk steps trained on
        return batch

    monkeypatch.setattr(Learner, "step", slow_step)
    monkeypatch.setattr(Learner, "_assemble", recording_assemble)
    # batch timeout 0: inference answers within the turn, so turns count chunk steps (~1 per turn)
    args = tiny_args(tmp_path, when_learner_behind=when_behind, total_env_steps=1500, eval_every_updates=0,
                     final_eval_episodes=0, batch_timeout_ms=0.0)
    run, code, _ = run_serial(args)
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert code == 0 and summary["global_env_step"] >= 1500
    versions = torch.cat(trained)
    # every trained segment is one env's rows in order: versions never fall along a segment (an overwritten
    # segment handed to the learner half-written would mix two writers)
    assert (versions[:, 1:] >= versions[:, :-1]).all()
    assert summary["updates"] >= 2 and 0 < summary["env_steps_per_s_between_updates"]
    if when_behind == "wait":
        assert summary["dropped_segments"] == 0
        assert summary["chunk_step"] <= (summary["updates"] + 4) * 2 * 8  # at most the spare segments ahead
    else:
        assert summary["dropped_segments"] >= 5
        # the envs ran on: more chunk steps than the learner trained on, by the dropped segments
        assert summary["chunk_step"] >= summary["updates"] * 2 * 8 + summary["dropped_segments"] * 8


def test_drop_oldest_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(SystemExit, match="drop-oldest"):
        tiny_args(tmp_path, when_learner_behind="drop-oldest", mode="sync")


def test_dropped_episode_rows_are_masked_and_cut_from_gae(tmp_path):
    args = tiny_args(tmp_path, env_options='{"fail_every_steps": 37}', total_env_steps=150,
                     eval_every_updates=0, final_eval_episodes=0)
    run, code, _ = run_serial(args)
    st = run.shared.storage
    invalid = ~st.valid[:, :args.workers.segment_len]
    assert invalid.any(), "the injected failures should have invalidated some rows"
    # the last dropped row of each dropped episode ends it (truncated with zero bootstrap value)
    for seg in range(st.valid.shape[0]):
        rows = torch.nonzero(invalid[seg]).flatten().tolist()
        ends = [r for r in rows if r + 1 not in rows and r + 1 < args.workers.segment_len]
        for r in ends:
            assert st.truncated[seg, r] and st.trunc_value[seg, r] == 0


def test_resume_restores_counters_weights_optimizer_and_continues(tmp_path):
    args = tiny_args(tmp_path)
    run, code, _ = run_serial(args)
    assert code == 0
    first = ckpt.resolve_checkpoint(run.run_dir)
    model, opt, _, meta = ckpt.load_checkpoint(first)
    assert meta["counters"]["global_env_step"] >= 400

    # a learner built with resume_from holds exactly the saved weights and optimiser state
    args2 = tiny_args(tmp_path, resume=str(run.run_dir), total_env_steps=800)
    run2 = Run(args2)
    run2.build(serial=True)
    learner = Learner(args2, run2.spec, run2.shared, run2.chan, 0.0, "cpu", run2.run_dir, run2.resume_from)
    for name, tensor in learner.policy.state_dict().items():
        torch.testing.assert_close(tensor, model[name], rtol=0, atol=0, msg=name)
    state = learner.optimizer.state_dict()
    restored_tensors, _ = ckpt.optimizer_to_tensors(state)
    assert restored_tensors.keys() == opt.keys()
    for key in opt:
        torch.testing.assert_close(restored_tensors[key], opt[key], rtol=0, atol=0, msg=key)
    assert learner.update == meta["update"]
    assert learner.scheduler.last_epoch == meta["scheduler"]["last_epoch"]
    assert run2.shared.counters.total("global_env_step") == meta["counters"]["global_env_step"]
    # the learner's clock continues where the checkpoint stopped (the wall-clock axis of a resumed run's curve)
    assert time.time() - learner.start_time >= meta["learner_seconds"]

    # the resumed run continues the same run directory and counters
    run3, code, _ = run_serial(tiny_args(tmp_path, resume=str(run.run_dir), total_env_steps=800))
    assert code == 0 and run3.run_dir == run.run_dir
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert summary["global_env_step"] >= 800
    assert summary["updates"] > meta["update"]


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "run"
    model = {"w": torch.arange(4.0)}
    ckpt.save_checkpoint(root, 3, model, {}, {"args": {}, "counters": {}})
    # a crash while writing update 7: its temporary directory exists, half full, and latest.json
    # still names update 3; a directory without meta.json is not a checkpoint either
    tmp = root / "checkpoints" / ".tmp_update_0000007_999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    (root / "checkpoints" / "update_0000009").mkdir()
    chosen = ckpt.resolve_checkpoint(root)
    assert chosen.name == "update_0000003"
    loaded, _, _, meta = ckpt.load_checkpoint(root)
    torch.testing.assert_close(loaded["w"], model["w"])
    assert meta["complete"] and meta["update"] == 3
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nothing_here")


def test_weight_broadcast_never_applies_a_torn_copy():
    src = {"a": torch.zeros(3), "b": torch.zeros(2)}
    wb = WeightBroadcast(src, share=False)
    dst = {"a": torch.full((3,), -1.0), "b": torch.full((2,), -1.0)}
    wb.publish({"a": torch.ones(3), "b": torch.ones(2)}, version=1)
    assert wb.read_into(dst) == 1 and torch.all(dst["a"] == 1)
    wb.publish({"a": torch.full((3,), 2.0)}, version=2)  # a subset (only trainable tensors)
    assert wb.read_into(dst) == 2 and torch.all(dst["a"] == 2) and torch.all(dst["b"] == 1)
    wb.seq += 1  # the learner is half-way through a publication
    assert wb.read_into(dst) is None
    with pytest.raises(KeyError):
        wb.publish({"unknown": torch.zeros(1)}, version=3)


def test_weight_broadcast_is_one_buffer_per_dtype_and_readers_copy_frozen_tensors_once():
    import pickle

    from multiprocessing.reduction import ForkingPickler  # what spawn uses (torch registers its tensor reducers)

    import torch.multiprocessing  # noqa: F401  (the registration)

    src = {"frozen": torch.zeros(4, 3), "lora": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.int64)}
    wb = WeightBroadcast(src, share=True)
    assert sorted(str(d) for d in wb._flat) == ["torch.float32", "torch.int64"]
    assert wb.tensors["frozen"].untyped_storage().data_ptr() == wb.tensors["lora"].untyped_storage().data_ptr()
    wb.publish({"frozen": torch.ones(4, 3), "lora": torch.ones(2), "steps": torch.ones(1, dtype=torch.int64)}, 0)
    reader = pickle.loads(ForkingPickler.dumps(wb))  # a spawned reader's copy: views rebuilt on the same memory
    dst = {name: torch.full_like(t, -1) for name, t in src.items()}
    assert reader.read_into(dst) == 0 and all(torch.all(t == 1) for t in dst.values())
    wb.publish({"lora": torch.full((2,), 2.0)}, version=1)  # after each update: the trainable tensors only
    dst["frozen"].fill_(-7)  # a frozen tensor a reader should not copy again
    assert reader.read_into(dst, only_refreshed=True) == 1 and torch.all(dst["lora"] == 2)
    assert torch.all(dst["frozen"] == -7), "the frozen tensor was copied again"
    assert reader.read_into(dst) == 1 and torch.all(dst["frozen"] == 1)  # a new reader's full copy


def test_bad_arguments_fail_before_anything_starts(tmp_path):
    with pytest.raises(SystemExit, match="unknown --task"):
        derive_and_check(Args(env=EnvArgs(task="tabletop3d")))
    with pytest.raises(SystemExit, match="--eval-only needs --checkpoint"):
        derive_and_check(Args(experiment=ExperimentArgs(eval_only=True)))
    with pytest.raises(SystemExit, match="max_dleta"):
        derive_and_check(Args(env=EnvArgs(env_options='{"max_dleta": 1}')))
    with pytest.raises(SystemExit, match="not a JSON object"):
        derive_and_check(Args(env=EnvArgs(env_options="layout=free")))


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    # emulated bf16 made the default policy ~5x slower than float32 (AVX2-only EPYC): a CPU run turns it off there
    import accerl

    monkeypatch.setattr(accerl, "cpu_has_native_bf16", lambda: native)
    assert derive_and_check(Args(experiment=ExperimentArgs(device="cpu"))).algorithm.bf16 is native


def test_flags_stay_flat_while_args_nest_by_group():
    # Args nests one dataclass per group (one --help box each); OmitArgPrefixes keeps the flags' spelling
    import tyro

    args = tyro.cli(Args, args=["--seed", "3", "--task", "libero_10", "--num-env-workers", "5", "--loss", "sapo",
                                "--no-bf16", "--policy.hidden", "64"])
    assert (args.experiment.seed, args.env.task, args.workers.num_env_workers) == (3, "libero_10", 5)
    assert (args.algorithm.loss, args.algorithm.bf16, args.policy.hidden) == ("sapo", False, 64)
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--experiment.seed", "3"])


def test_critic_warmup_trains_the_value_head_only(tmp_path):
    """--critic-warmup-updates: during the warm-up the policy group keeps the warm start's weights exactly
    while the critic learns."""
    from vla_policy import VLAPolicy

    torch.manual_seed(11)
    saved = VLAPolicy(PolicyConfig(**TINY_POLICY))
    saved.save(str(tmp_path / "policy"))
    run, code, _ = run_serial(tiny_args(tmp_path, init_policy=str(tmp_path / "policy"), critic_warmup_updates=1000,
                                        eval_every_updates=0, final_eval_episodes=0))
    assert code == 0
    model, _, _, meta = ckpt.load_checkpoint(ckpt.resolve_checkpoint(run.run_dir))
    assert meta["update"] >= 2
    value = {n for n, p in saved.named_parameters() if any(p is q for q in saved.value_parameters())}
    assert value and any(not torch.equal(model[n], saved.state_dict()[n]) for n in value)
    for name, tensor in saved.state_dict().items():
        if name not in value:
            assert torch.equal(model[name], tensor), name


def test_sync_inference_serves_the_final_evaluation_past_a_training_request_left_behind(tmp_path):
    # training stopped while one env worker's request was pending and the other's never came: in lockstep the
    # server would wait for the missing one forever, and the final evaluation's requests with it (a real hang:
    # the main process waited out --wait-timeout-s for the final evaluation)
    from types import SimpleNamespace

    from accerl import InferenceServer

    args = tiny_args(tmp_path, mode="sync", num_env_workers=2, envs_per_worker=1, batch_timeout_ms=0.0)
    stop = threading.Event()
    server = SimpleNamespace(args=args, num_train_envs=2, shared=SimpleNamespace(train_stop=stop))
    old = time.perf_counter() - 1.0
    server.pending = [((0, 0, 3, (5,), False), old), ((2, 0, 9, (0,), True), old)]  # training env 0, then eval
    assert not InferenceServer._should_flush(server)  # training: env 1's request is still to come
    stop.set()
    assert InferenceServer._should_flush(server)


def test_sync_env_waits_for_the_update_its_segment_feeds_when_it_lands_at_once(tmp_path):
    """Sync mode: an env that hands over its segment waits for the next published version. The learner may
    publish that update between the hand-over and the env's next look (the segment was the last it waited
    for): the env must still wait for exactly that version, not one more (which would never come)."""
    run = Run(tiny_args(tmp_path, mode="sync", num_eval_workers=0, final_eval_episodes=0, eval_every_updates=0))
    run.build(serial=True)
    landed = []

    class UpdateLandsAtOnce:  # full_segments whose put is followed at once by the learner's publication
        def __init__(self, inner):
            self.inner = inner

        def put(self, item, block=True, timeout=None):
            self.inner.put(item, block, timeout)
            landed.append(run.shared.weights.published_version() + 1)
            run.shared.weights.publish({}, landed[-1])

        def __getattr__(self, name):
            return getattr(self.inner, name)

    run.chan.full_segments = UpdateLandsAtOnce(run.chan.full_segments)
    run.start()
    roles = {}
    try:
        roles = {name: build() for name, build in run.role_builders(serial=True).items()}  # the learner publishes v0
        env = roles["env_worker_0"]
        for _ in range(20_000):
            for name in ("env_worker_0", "inference"):
                roles[name].step()
            if landed:
                break
        assert landed, "no segment was completed"
        assert [e.awaiting_version for e in env.envs if e.awaiting_version is not None] == landed[:1]
    finally:
        for role in roles.values():
            role.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_interrupt_a_training_loop_even_where_sigint_was_ignored(signum):
    # sft.py and world_model.py train save what they learnt on KeyboardInterrupt; `nohup cmd &` starts them
    # with SIGINT ignored, and a scheduler stops them with SIGTERM
    before = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        restore = interrupt_on_stop_signals()
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_heartbeats_tell_a_starting_process_from_a_silent_one():
    """Before its first beat a process counts as starting (the shutdown need not wait for it) and its silence
    counts from the heartbeats' creation; after it, from the last beat."""
    beats = Heartbeats(["env_worker_0", "learner"], share=False)
    beats.created -= 50.0  # made 50 s ago
    assert not beats.started("learner") and beats.silent_for()["learner"] >= 50.0
    beats.beat("learner")
    assert beats.started("learner") and not beats.started("env_worker_0")
    silent = beats.silent_for()
    assert silent["learner"] < 1.0 and silent["env_worker_0"] >= 50.0


def test_memory_use_follows_the_resident_memory():
    before = memory_use()["rss_gib"]
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    grown = memory_use()["rss_gib"]
    del block
    assert 0.01 < before < 64 and grown - before > 0.2, (before, grown)


def proprio_policy_args(tmp_path: Path, proprio_dim: int = 3, **overrides) -> Args:
    args = tiny_args(tmp_path, **overrides)
    args.policy = PolicyConfig(**TINY_POLICY, vision_tower="resnet", resnet_widths=(8, 16, 16, 16),
                               keypoints=2, proprio_dim=proprio_dim)
    return derive_and_check(args)


def test_a_proprio_policy_gets_the_env_proprio_and_a_mismatch_is_refused(tmp_path, monkeypatch):
    """A policy with keypoints and proprio trains in the pipeline, and the env's proprio (tabletop2d: 3-D) is what
    its state MLP reads, in rollouts and in the learner; a policy that reads another size is refused at build."""
    from vla_policy import VLAPolicy
    seen = []
    original = VLAPolicy._state

    def recording_state(self, keypoints, proprio, instruction_tokens, batch):
        seen.append(None if proprio is None else torch.as_tensor(proprio).detach().clone())
        return original(self, keypoints, proprio, instruction_tokens, batch)

    monkeypatch.setattr(VLAPolicy, "_state", recording_state)
    run, code, _ = run_serial(proprio_policy_args(tmp_path))
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert code == 0 and summary["updates"] >= 1
    assert seen and all(p is not None and p.shape[1] == 3 for p in seen)
    everything = torch.cat(seen)
    assert everything.abs().sum() > 0 and everything.std(0).min() > 0  # real, varying robot states, not zeros
    with pytest.raises(SystemExit, match="--policy.proprio-dim 3"):
        Run(proprio_policy_args(tmp_path / "wrong", proprio_dim=5)).build(serial=True)


def test_a_stop_signal_ends_the_learners_update_after_its_current_minibatch(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (shared.stop) mid-update: the learner ends the update after the minibatch in progress and
    finishes it as a shorter one, so its final checkpoint is written inside the shutdown's 10 s even where one
    update takes longer (a CPU learner, several epochs: a LIBERO run lost its final checkpoint that way)."""
    from accerl import Learner
    from test_scaling import _fill_storage
    args = tiny_args(tmp_path, segments_per_update=2, update_epochs=2, num_minibatches=4, bf16=False)
    run = Run(args)
    run.build(serial=True)
    run.chan.free_segments = queue.Queue()  # unbounded: the learner hands back segments nobody took from it
    _fill_storage(run.shared.storage, [0, 1], args.workers.segment_len)
    learner = Learner(args, run.spec, run.shared, run.chan, 0.0, "cpu", tmp_path, None)
    steps, original = [], Learner._minibatch_step

    def counting_step(self, mb):
        steps.append(len(mb["mask"]))
        if len(steps) == 3:
            self.shared.stop.set()
        return original(self, mb)

    monkeypatch.setattr(Learner, "_minibatch_step", counting_step)
    before = learner.scheduler.last_epoch
    metrics = learner.train_on(learner._assemble([0, 1]))
    assert len(steps) == 3 and all(size > 0 for size in steps)  # 3 of the 2 x 4 minibatches, then stopped
    assert learner.scheduler.last_epoch == before + 1 and np.isfinite(metrics["losses/policy_loss"])
    run.shared.stop.clear()
    learner.train_on(learner._assemble([0, 1]))
    assert len(steps) == 3 + 8  # without a stop, the whole update


def test_hindsight_relabel_adds_wrong_grasps_as_successes_and_is_refused_where_envs_cannot_tell(tmp_path,
                                                                                               monkeypatch):
    seen = []
    original = Learner._minibatch_step

    def recording(self, mb):
        seen.append((mb["relabelled"].clone(), mb["mask"].clone(), mb["advantages"].clone()))
        return original(self, mb)

    monkeypatch.setattr(Learner, "_minibatch_step", recording)
    run, code, recorded = run_serial(tiny_args(tmp_path, hindsight_relabel=True, total_env_steps=2000),
                                     wrap_queues=True)
    assert code == 0
    fractions = [m["charts/relabelled_sample_fraction"] for kind, _, m in recorded["stats"] if kind == "update"]
    relabelled = torch.cat([r for r, _, _ in seen])
    assert relabelled.any() and max(fractions) > 0
    assert abs(relabelled.float().mean().item() - np.mean(fractions)) < 0.1  # one minibatch per update here
    # a copy ends in reward 1 at its last row, so its advantages lean positive against the rest
    advantages = torch.cat([a for _, _, a in seen])
    assert advantages[relabelled].mean() > advantages[~relabelled].mean()
    import accerl
    from envs import env_spec as real_env_spec
    monkeypatch.setattr(accerl, "env_spec", lambda *a, **k: dataclasses.replace(real_env_spec(*a, **k),
                                                                                reports_achieved_task=False))
    with pytest.raises(SystemExit, match="drop --hindsight-relabel"):
        tiny_args(tmp_path / "refused", hindsight_relabel=True)
