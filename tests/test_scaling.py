"""Several inference servers and a data-parallel learner (issue 7): placement in serial mode, one DP update
(M = 2 on gloo) against the single-learner update on the same super batch, the placement checks, and (marked
slow) a subprocess smoke run of benchmarks/scaling.py on the CPU (2 servers + 2 learner ranks, the real
entry script)."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from accerl import (Args, ExperimentArgs, Learner, Run, WorkersArgs, derive_and_check, placement_problems,
                    resolve_devices)
from pipeline import free_tcp_port
from test_entry import TINY
from test_pipeline import run_serial, tiny_args

ROOT = Path(__file__).resolve().parents[1]


def test_two_inference_servers_serve_their_round_robin_clients(tmp_path):
    args = tiny_args(tmp_path, num_inference_servers=2, num_env_workers=3, envs_per_worker=1, total_env_steps=300,
                     num_eval_workers=1)
    run, code, recorded = run_serial(args, wrap_queues=True)
    assert code == 0
    assert run.inference_names == ["inference_0", "inference_1"] and run.learner_names == ["learner"]
    # clients 0..2 are env workers, client 3 the eval worker: client c asks server c mod 2, and only it
    for k, items in enumerate(recorded["requests"]):
        clients = {item[0] for item in items}
        assert clients == {c for c in range(4) if c % 2 == k}, (k, clients)
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert summary["global_env_step"] >= 300 and summary["updates"] >= 1 and summary["final_eval"]["episodes"] == 4


def _fill_storage(storage, segments: list[int], T: int) -> None:
    """Random but well-formed rollout rows: behaviour log-probs are a real log-softmax, some rows dropped
    (more in segment 1, so the ranks keep different numbers of samples), episode ends inside segments."""
    g = torch.Generator().manual_seed(0)
    st = storage.fields
    for seg in segments:
        rows = T + 1
        st["images"][seg, :rows] = torch.randint(0, 256, st["images"][seg, :rows].shape, generator=g, dtype=torch.uint8)
        st["instruction"][seg, :rows] = torch.randint(3, 200, st["instruction"][seg, :rows].shape, generator=g)
        log_probs = torch.randn(st["log_probs"][seg, :rows].shape, generator=g).log_softmax(-1)
        tokens = torch.randint(0, log_probs.shape[-1], log_probs.shape[:-1], generator=g)
        st["log_probs"][seg, :rows] = log_probs.half()
        st["action_tokens"][seg, :rows] = tokens
        st["logp"][seg, :rows] = log_probs.half().float().gather(-1, tokens[..., None]).squeeze(-1)
        st["value"][seg, :rows] = torch.randn(rows, generator=g)
        st["reward"][seg, :rows] = (torch.rand(rows, generator=g) < 0.2).float()
        st["terminated"][seg, :rows] = torch.rand(rows, generator=g) < 0.1
        st["truncated"][seg, :rows] = torch.rand(rows, generator=g) < 0.05
        st["trunc_value"][seg, :rows] = torch.randn(rows, generator=g)
        st["valid"][seg, :rows] = torch.rand(rows, generator=g) > (0.6 if seg == 1 else 0.1)
        st["env_steps"][seg, :rows] = torch.randint(1, 9, (rows,), generator=g)
        st["version"][seg, :rows] = 0


def _train_once(rank: int, args: Args, run: dict, port: int | None, out: str) -> None:
    """One learner rank (a fresh process: accelerate's state is per process) trains once on its share."""
    torch.set_num_threads(1)
    learner = Learner(args, run["spec"], run["shared"], run["chan"], 0.0, "cpu", Path(out), None, rank, port)
    before = {n: t.clone() for n, t in learner.policy.state_dict().items()}
    # segments as Learner.step shares them: 4 real ones, then an imagined one (rank 0 gets 3, rank 1 gets 2)
    metrics = learner.train_on(learner._assemble([0, 1, 2, 3, 4][rank::args.workers.num_learners]))
    grads = {n: p.grad.clone() for n, p in learner.policy.named_parameters() if p.grad is not None}
    torch.save({"before": before, "state": learner.policy.state_dict(), "grads": grads, "metrics": metrics},
               f"{out}/m{args.workers.num_learners}_rank{rank}.pt")
    learner.accelerator.end_training()


def test_data_parallel_update_equals_the_single_learner_update(tmp_path):
    """M = 2 ranks on gloo, each on its share of a super batch, give the weights, gradients and losses that one
    learner gets on the whole of it (global advantage statistics, global loss normalisers, DDP all-reduce), also
    when they accumulate gradients over micro-batches (--micro-batch-size, DDP's no_sync until the last).
    The shares differ in size, as when imagined segments join the real ones."""
    one = tiny_args(tmp_path, mode="async", segments_per_update=4, bf16=False)
    # the two ranks also accumulate gradients over micro-batches of 5 rows: the same update again
    two = replace(one, workers=replace(one.workers, num_learners=2),
                  algorithm=replace(one.algorithm, micro_batch_size=5))
    run = Run(one)
    run.build(serial=False)  # shared memory, which the learner processes map
    ctx = mp.get_context("spawn")
    run.chan.free_segments = ctx.Queue()  # unbounded: every learner frees its segments
    run.chan.imagined_free_segments = ctx.Queue()
    _fill_storage(run.shared.storage, [0, 1, 2, 3, 4], one.workers.segment_len)
    run.shared.storage.imagined[4] = True
    shared, port = {"spec": run.spec, "shared": run.shared, "chan": run.chan}, free_tcp_port()
    procs = [ctx.Process(target=_train_once, args=(0, one, shared, None, str(tmp_path)))]
    procs += [ctx.Process(target=_train_once, args=(r, two, shared, port, str(tmp_path))) for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
            assert p.exitcode == 0, f"learner process exit code {p.exitcode} (None: still running after 240 s)"
    finally:  # a rank stuck in the gloo rendezvous would otherwise keep pytest from exiting
        for p in procs:
            if p.is_alive():
                p.kill()
    single, *ranks = [torch.load(tmp_path / name) for name in ("m1_rank0.pt", "m2_rank0.pt", "m2_rank1.pt")]

    assert single["grads"].keys() == ranks[0]["grads"].keys()
    for name, grad in single["grads"].items():  # the all-reduced gradient is the whole batch's (grad norm ~1)
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-3, atol=1e-7, msg=name)
    assert any(not torch.equal(single["before"][n], t) for n, t in single["state"].items())
    for name, tensor in single["state"].items():
        torch.testing.assert_close(ranks[0]["before"][name], single["before"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0, msg=name)
        # Adam's first step moves a weight by lr * g / (|g| + 1e-8): where |g| is near that eps, float noise
        # in g (1e-10 here) moves the weight visibly, so weights are compared where g is clear of it
        clear = single["grads"][name].abs() > 1e-6 if name in single["grads"] else torch.ones_like(tensor, dtype=bool)
        torch.testing.assert_close(ranks[0]["state"][name][clear], tensor[clear], rtol=1e-5, atol=1e-6, msg=name)
    assert single["metrics"]["charts/imagined_sample_fraction"] > 0
    for key in ("losses/policy_loss", "losses/value_loss", "losses/kl", "losses/entropy", "losses/grad_norm",
                "charts/samples_kept_fraction", "charts/imagined_sample_fraction"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), key


def test_placement_checks_name_the_fix():
    def check(**workers):
        return derive_and_check(Args(experiment=ExperimentArgs(device="cpu"), workers=WorkersArgs(**workers)))

    with pytest.raises(SystemExit, match="--num-inference-servers and --num-learners must be >= 1"):
        check(num_inference_servers=0)
    with pytest.raises(SystemExit, match="names 3 devices for 2 server"):
        check(num_inference_servers=2, inference_devices=("cpu", "cpu", "cpu"))
    with pytest.raises(SystemExit, match=r"--inference-devices: cuda:\d but torch sees \d GPU"):
        check(inference_devices=(f"cuda:{torch.cuda.device_count()}",))
    with pytest.raises(SystemExit, match="name one per rank or set --num-learners 1"):
        check(num_learners=2, learner_devices=("cpu",))
    with pytest.raises(SystemExit, match="only 3 env/eval worker"):
        check(num_inference_servers=4, num_env_workers=2, num_eval_workers=1)
    with pytest.raises(SystemExit, match="--segments-per-update 3 must be a multiple of --num-learners 2"):
        check(num_learners=2, segments_per_update=3)
    with pytest.raises(SystemExit, match="--num-env-workers x --envs-per-worker a multiple of --num-learners 2"):
        derive_and_check(Args(experiment=ExperimentArgs(device="cpu", mode="sync"),
                              workers=WorkersArgs(num_learners=2, num_env_workers=3, envs_per_worker=1)))
    with pytest.raises(SystemExit, match="serial mode runs one process"):
        derive_and_check(Args(experiment=ExperimentArgs(device="cpu", mode="serial"),
                              workers=WorkersArgs(num_learners=2)))
    # the default placement: one of each, on --device
    args = check()
    assert (args.workers.num_inference_servers, args.workers.num_learners) == (1, 1)


def test_default_placement_spreads_over_gpus(monkeypatch):
    """With (pretend) 4 GPUs: rank r and server k on cuda:r / cuda:(k mod 4); NCCL's one-rank-per-GPU rule."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def placed(device="auto", **workers):
        args = Args(experiment=ExperimentArgs(device=device), workers=WorkersArgs(num_env_workers=8, **workers))
        problems = placement_problems(args)
        return problems or resolve_devices(args)

    assert placed() == (["cuda:0"], ["cuda:0"])  # one of each: as before
    assert placed(num_inference_servers=4, num_learners=4) == ([f"cuda:{g}" for g in range(4)],) * 2
    assert placed(num_inference_servers=6, num_learners=2)[1] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                                                  "cuda:0", "cuda:1"]
    assert placed(num_inference_servers=3, inference_devices=("cuda:3",))[1] == ["cuda:3"] * 3
    assert placed("cpu", num_inference_servers=2, num_learners=2) == (["cpu", "cpu"], ["cpu", "cpu"])
    assert "NCCL runs one rank per GPU" in placed(num_learners=5)[0]
    assert "not mixed" in placed(num_learners=2, learner_devices=("cpu", "cuda:1"))[0]
    assert "torch sees 4 GPU(s)" in placed(inference_devices=("cuda:4",))[0]


@pytest.mark.slow  # ~2 min on 2 busy cores (python -m pytest -m slow tests/test_scaling.py)
def test_scaling_benchmark_runs_on_cpu_with_two_servers_and_two_learner_ranks(tmp_path):
    """The real entry script with 2 inference servers and 2 learner ranks (gloo), async and sync, through the
    benchmark; each run stops at 300 env steps (the last --total-env-steps wins)."""
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--gpus", "2", "--device", "cpu",
           "--seconds", "240", "--env-workers-per-gpu", "1", "--step-cost-ms", "0", "--reset-cost-ms", "0",
           "--segments-per-update-per-gpu", "1", "--image-size", "32", "--out", str(out),
           "--", *TINY[2:], "--segment-len", "8", "--total-env-steps", "300"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["gpus"], r["mode"], r["inference_servers"], r["learners"]) for r in runs] == [
        (2, "async", 2, 2), (2, "sync", 2, 2)]
    assert all(r["updates"] >= 1 and r["card"] == "cpu" for r in runs)
    assert "| 2 | async |" in result.stdout and "| 2 | sync |" in result.stdout  # the table
