"""Runs of the real entry script: subprocesses for a sync run, Ctrl-C, a crashing child and kill -9 followed by
--resume (the async smoke run); its command line run in this process where no process boundary is tested."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import checkpoint as ckpt
from pipeline import shm_entries

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--policy.image-size", "32", "--policy.patch-size", "8", "--policy.vision-hidden", "32",
        "--policy.vision-layers", "1", "--policy.vision-heads", "1", "--policy.vision-mlp", "64",
        "--policy.hidden", "32", "--policy.decoder-layers", "1", "--policy.decoder-heads", "1",
        "--policy.decoder-mlp", "64", "--policy.value-hidden", "32"]
TINY_SIZES = dict(zip([a[len("--policy."):].replace("-", "_") for a in TINY[::2]], [int(v) for v in TINY[1::2]]))
"""TINY as PolicyConfig keyword arguments."""


def accerl(run_dir: Path, *extra: str) -> list[str]:
    # the plain defaults: these runs test the pipeline's machinery with TINY, not tabletop2d's tuned setting
    return [sys.executable, str(ROOT / "accerl.py"), "--no-task-defaults", "--run-dir", str(run_dir),
            "--num-env-workers", "2", "--envs-per-worker", "1", "--segment-len", "8", "--segments-per-update", "2",
            "--eval-episodes", "4", "--final-eval-episodes", "4", "--eval-every-updates", "2", "--log-every-s", "2",
            # below the tests' subprocess timeouts: a stall fails with the name of the silent process
            "--wait-timeout-s", "120", *TINY, *extra]


def accerl_main(argv: list[str]) -> int:
    """accerl.py's `__main__` in this process: parse the command line, run, return the exit code."""
    import accerl as entry

    return entry.main(entry.cli_with_preset(entry.Args, argv))


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sync_entry_script_runs_learns_and_summarises(tmp_path):
    """--mode sync end to end (the async entry script's run is the resumed half of the kill -9 test)."""
    run_dir = tmp_path / "sync"
    result = subprocess.run(accerl(run_dir, "--mode", "sync", "--total-env-steps", "300"), cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "sync" and summary["global_env_step"] >= 300 and summary["updates"] >= 1
    assert summary["final_eval"]["episodes"] == 4
    for role in ("[env_worker_0]", "[learner]", "[main]", "[eval_worker_0]", "updates"):
        assert role in result.stderr
    rss = summary["memory_max"]["rss_gib"]  # every process reports its resident memory
    assert {"main", "env_worker_0", "env_worker_1", "eval_worker_0", "inference", "learner"} <= set(rss), rss
    assert all(0.05 < v < 16 for v in rss.values()), rss


def test_tabletop2d_task_defaults_apply_where_they_should_and_every_flag_wins(tmp_path):
    """`python accerl.py` on the built-in family starts from TABLETOP2D_DEFAULTS; a flag you pass wins; LIBERO,
    --no-task-defaults, a preset and a start from saved weights keep the plain defaults. The tuned setting then runs
    (serial mode, a few updates: decoder residual, relabelling, 2 epochs) and its checkpoint keeps the architecture."""
    import accerl as entry

    tuned = entry.TABLETOP2D_DEFAULTS
    args = entry.parse_args([])
    for group in ("policy", "algorithm", "experiment"):
        for name, value in tuned[group].items():
            assert getattr(getattr(args, group), name) == value, (group, name)
    args = entry.parse_args(["--task=tabletop2d/1", "--policy.image-size", "128", "--update-epochs", "1"])
    assert (args.policy.image_size, args.algorithm.update_epochs, args.policy.decoder_residual) == (128, 1, True)
    plain = entry.Args()
    for argv in (["--no-task-defaults"], ["--task", "libero_10"], ["--init-policy", "runs/x/policy"],
                 ["--policy.checkpoint=runs/x/policy"]):
        args = entry.parse_args(argv)
        assert args.algorithm == plain.algorithm and args.experiment.max_seconds == 0, argv
        assert args.policy.vision_tower == "siglip" and args.policy.image_size == 128, argv
    assert entry.parse_args(["--policy.preset", "small"]).algorithm == plain.algorithm
    run_dir = tmp_path / "tuned"
    argv = ["--mode", "serial", "--run-dir", str(run_dir), "--num-env-workers", "1", "--envs-per-worker", "2",
            "--segment-len", "8", "--segments-per-update", "2", "--total-env-steps", "400", "--max-seconds", "0",
            "--eval-every-updates", "0", "--final-eval-episodes", "2", "--log-every-s", "5"]
    assert entry.main(entry.parse_args(argv)) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] >= 2 and summary["global_env_step"] >= 400
    saved = json.loads((ckpt.resolve_checkpoint(run_dir) / "meta.json").read_text())["args"]
    assert saved["policy"]["decoder_residual"] and saved["algorithm"]["hindsight_relabel"]


def test_sigint_stops_every_process_within_10_s_and_frees_shared_memory(tmp_path):
    before = shm_entries()
    run_dir = tmp_path / "sigint"
    proc = subprocess.Popen(accerl(run_dir, "--total-env-steps", "10000000", "--num-eval-workers", "0"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # read from the start, so a full pipe never stalls the run
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(children_of(proc.pid)) >= 4, 60, proc)  # 2 env workers, inference, learner
        kids = children_of(proc.pid)
        # The 10 s promise is about a running run: wait until every role has reported ready (a loaded machine
        # can take longer than that just to import torch in four processes), then let it train a little.
        try:
            wait_for(lambda: sum(" ready (pid " in line for line in list(lines)) >= 4, 120, proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the run's output:\n{''.join(lines)[-3000:]}") from None
        time.sleep(2)
        start = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        elapsed = time.time() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    output = "".join(lines)
    assert elapsed < 10, output[-2000:]
    assert proc.returncode == 130, output[-2000:]
    wait_for(lambda: not any(alive(k) for k in kids), 2)
    # only this run's segments (torch names them torch_<pid>_...): other tests may run beside this one
    ours = {f"torch_{pid}_" for pid in [proc.pid, *kids]}
    left = {name for name in shm_entries() - before if any(name.startswith(prefix) for prefix in ours)}
    assert not left, left
    assert ckpt.resolve_checkpoint(run_dir)  # the final checkpoint was written
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] is True


def test_crashing_child_stops_the_run_with_its_traceback(tmp_path):
    result = subprocess.run(accerl(tmp_path / "crash", "--env-options", '{"fail_on_build": true}',
                                   "--num-eval-workers", "0"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "env_worker_0 failed" in result.stderr or "env_worker_1 failed" in result.stderr
    assert "fail_on_build=True (fault injection)" in result.stderr  # the child's own traceback


def test_kill_9_then_resume_continues_counters_and_weights(tmp_path):
    """An async run killed with SIGKILL (no chance to save) resumes from its last complete checkpoint; the
    resumed run trains on, evaluates and summarises (the entry script's async smoke run)."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(accerl(run_dir, "--total-env-steps", "10000000", "--checkpoint-every-updates", "1",
                                   "--num-eval-workers", "0", "--final-eval-episodes", "0"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest.json").exists(), 120, proc)
        kids = children_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not any(alive(k) for k in kids), 10)  # children die with their parent
    saved = ckpt.resolve_checkpoint(run_dir)
    _, _, _, meta = ckpt.load_checkpoint(saved)
    steps_at_kill = meta["counters"]["global_env_step"]
    result = subprocess.run(accerl(run_dir, "--resume", str(run_dir), "--total-env-steps", str(steps_at_kill + 200)),
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {saved}" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "async" and summary["global_env_step"] >= steps_at_kill + 200
    assert summary["updates"] > meta["update"]
    assert summary["final_eval"]["episodes"] == 4
    for role in ("[env_worker_0]", "[eval_worker_0]", "[inference]", "[learner]", "[main]"):
        assert role in result.stderr


def test_init_policy_starts_from_saved_weights(tmp_path):
    """sft.py's output (a VLAPolicy.save directory) seeds a new run: the run's checkpoint before any update
    holds exactly the saved weights; a camera mismatch is refused before anything is spawned."""
    import torch

    from vla_policy import PolicyConfig, VLAPolicy

    torch.manual_seed(123)
    saved = VLAPolicy(PolicyConfig(**TINY_SIZES))
    saved.save(str(tmp_path / "policy"))
    run_dir = tmp_path / "run"
    # the entry script's command line, parsed and run in this process (its main(), as `python accerl.py` does)
    argv = accerl(run_dir, "--mode", "serial", "--total-env-steps", "8", "--init-policy", str(tmp_path / "policy"),
                  "--final-eval-episodes", "0")[2:]
    assert accerl_main(argv) == 0
    model, _, _, meta = ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(run_dir)))
    assert meta["update"] == 0
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model[name], tensor), name
    with pytest.raises(SystemExit, match="--wrist-camera"):
        accerl_main([*argv, "--wrist-camera"])


def test_eval_only_of_a_saved_policy(tmp_path):
    """`--eval-only --init-policy DIR` evaluates a saved policy (sft.py's) under the run's protocol: its
    architecture and exact weights are what the inference server gets (as version 0), buffers that a state
    dict leaves out included, every task x --eval-episodes-per-task episodes run; --checkpoint together with
    it is refused."""
    import torch

    from accerl import Args, ExperimentArgs, Run, WorkersArgs, derive_and_check
    from vla_policy import PolicyConfig, VLAPolicy

    torch.manual_seed(7)
    saved = VLAPolicy(PolicyConfig(**TINY_SIZES))
    saved.save(str(tmp_path / "policy"))

    def args(**experiment):
        return Args(experiment=ExperimentArgs(mode="serial", run_dir=str(tmp_path / "eval"), log_every_s=1e9,
                                              eval_only=True, init_policy=str(tmp_path / "policy"), **experiment),
                    workers=WorkersArgs(num_env_workers=1, eval_episodes_per_task=2))

    run = Run(derive_and_check(args()))
    assert run.run() == 0
    assert run.shared.weights.published_version() == 0
    # every broadcast tensor, the non-persistent buffers too (rotary frequencies: not in the saved state dict)
    reference = dict(saved.named_parameters()) | dict(saved.named_buffers())
    assert set(run.shared.weights.tensors) == set(reference)
    assert set(reference) - set(saved.state_dict())  # such buffers exist: the case this test is about
    for name, tensor in reference.items():
        assert torch.equal(run.shared.weights.tensors[name], tensor), name
    assert run.final_eval["episodes"] == 2 * run.spec.num_tasks
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["episodes"] == 2 * run.spec.num_tasks
    with pytest.raises(SystemExit, match="not both"):
        derive_and_check(args(checkpoint=str(tmp_path / "eval")))


def test_checkpoint_curve_scores_every_checkpoint_and_the_warm_start(tmp_path):
    """benchmarks/checkpoint_curve.py: one --eval-only run per kept checkpoint plus the --baseline policy at 0 env
    steps, rows in training order with the checkpoints' counters; a second call reuses the stored results."""
    import torch

    from vla_policy import PolicyConfig, VLAPolicy

    torch.manual_seed(3)
    VLAPolicy(PolicyConfig(**TINY_SIZES)).save(str(tmp_path / "policy"))
    run_dir = tmp_path / "run"
    train = accerl(run_dir, "--mode", "serial", "--total-env-steps", "300", "--init-policy", str(tmp_path / "policy"),
                   "--checkpoint-every-updates", "1", "--keep-checkpoints", "10", "--num-eval-workers", "0",
                   "--final-eval-episodes", "0")
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = sorted((run_dir / "checkpoints").glob("update_*"))
    assert len(kept) >= 2  # one per update; --keep-checkpoints 10 deleted none
    curve = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_curve.py"), str(run_dir), "--baseline",
             str(tmp_path / "policy"), "--episodes-per-task", "1", "--eval-workers", "1", "--", "--mode", "serial"]
    result = subprocess.run(curve, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [r["update"] for r in rows] == [0] + [int(p.name.split("_")[1]) for p in kept]
    assert rows[0]["env_steps"] == 0 and all(a["env_steps"] < b["env_steps"] for a, b in zip(rows[1:], rows[2:]))
    assert all(r["episodes"] == 4 for r in rows)  # 1 per task x the 4 tabletop2d tasks
    again = subprocess.run(curve, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "--eval-only" not in again.stdout  # nothing evaluated twice
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == rows


def test_plot_curves_shifts_a_continued_run_to_the_end_of_the_one_it_continues(tmp_path):
    def curve(name: str, points: list[tuple[int, float, float]]) -> str:
        rows = [{"update": i, "env_steps": steps, "seconds": seconds, "success": success, "episodes": 50}
                for i, (steps, seconds, success) in enumerate(points)]
        (tmp_path / name).write_text("| table |\n" + json.dumps({"run": name, "task": "t", "rows": rows}) + "\n")
        return str(tmp_path / name)

    first = curve("a.txt", [(0, 0.0, 0.6), (100, 50.0, 0.7)])
    second = curve("b.txt", [(0, 0.0, 0.72), (30, 20.0, 0.8)])
    script = [sys.executable, str(ROOT / "benchmarks" / "plot_curves.py")]
    result = subprocess.run([*script, f"{first}:first", f"{second}:second:a", "--out", str(tmp_path / "c.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    drawn = json.loads(result.stdout.splitlines()[-1])
    assert [(r["env_steps"], r["seconds"]) for r in drawn["second"]] == [(100, 50.0), (130, 70.0)]
    assert [(r["env_steps"], r["seconds"]) for r in drawn["first"]] == [(0, 0.0), (100, 50.0)]
    assert (tmp_path / "c.png").stat().st_size > 0
    bad = subprocess.run([*script, f"{second}:second:b", "--out", str(tmp_path / "d.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not an earlier argument" in bad.stderr


def test_learning_curve_threshold_with_sustain():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from learning_curve import first_reached
    finally:
        sys.path.pop(0)
    points = [(0, 0.7), (10, 0.82), (20, 0.7), (30, 0.8), (40, 0.9), (50, 0.85)]
    curve = [{"env_steps": steps, "success": success} for steps, success in points]
    assert first_reached(curve, 0.8)["env_steps"] == 10      # one lucky round
    assert first_reached(curve, 0.8, sustain=3)["env_steps"] == 30
    assert first_reached(curve, 0.95) is None and first_reached(curve, 0.8, sustain=4) is None
