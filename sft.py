"""sft: supervised warm start of a VLA policy by behaviour cloning demonstrations, before RL.

    python demos.py collect --task tabletop2d --episodes 200 --out demos/tabletop2d --noise 0.1
    python sft.py --demos demos/tabletop2d                       # -> runs/<run>/policy (VLAPolicy.save)
    python sft.py --demos LIBERO/datasets/libero_spatial --task libero_spatial   # the official LIBERO files
    tensorboard --logdir runs

Read top to bottom: Args -> the demonstrations as action chunks -> the loss -> greedy evaluation on the
real env -> main (data, policy, AdamW with warm-up and cosine decay, logging, atomic save).

The objective is the cross-entropy of the policy's per-token bin distribution against the demonstrated
action's bin: the action tokens are `actions_to_tokens(demo actions, num_bins)`, and the loss is the mean
of `-VLAPolicy.evaluate(...)["logp"]` over the chunk's valid tokens, the same log-probabilities RL later
re-weights (OpenVLA's fine-tuning objective; OFT's parallel decoding predicts the whole chunk at once).

Chunks: every step t of a demo starts one training chunk whose targets are the demo's actions t .. t +
chunk_len - 1 (OpenVLA-OFT also trains on every start, though the policy acts every chunk_len steps).
Near the end of a demo fewer than chunk_len actions remain. Those slots are masked out of the loss
(`--pad mask`, the default) rather than filled by repeating the last action (`--pad repeat-last`,
robomimic's and OpenVLA-OFT's padding): `step_chunk` stops at termination, so an action after the last
one is never executed and any label there is arbitrary; and repeating it is far from harmless when demos
are as short as a chunk. tabletop2d's expert finishes in 4-8 steps, so with chunks of 8 about half of all
target slots would be copies of the final grasp action, and the clone learns to close the gripper early.

The critic is not trained here (demos carry no value targets from the policy's own returns); RL starts
with the saved value head as initialised, and `value_detach` keeps it from disturbing the trunk.

Metrics: the same tag vocabulary as accerl.py (README, "Metrics"); the x axis is the SFT update.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import checkpoint as ckpt
from demos import read_demos
from envs import env_spec, make_env, parse_task
from pipeline import interrupt_on_stop_signals, log
from vla_policy import (PolicyConfig, VLAPolicy, actions_to_tokens, cli_with_preset, policy_autocast,
                        tokens_to_actions)


@dataclass
class Args:
    # --- experiment --------------------------------------------------------------------------------
    exp_name: str = "sft"
    """Name of the experiment; part of the run name."""
    seed: int = 1
    """One seed for initialisation, batch order and evaluation envs."""
    run_dir: str | None = None
    """Where tensorboard logs and summary.json go (default runs/<task>__<exp_name>__<seed>__<time>)."""
    out: str | None = None
    """Where the trained policy is written (VLAPolicy.save layout, atomically); default <run_dir>/policy."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:N."""
    threads: int = 0
    """torch CPU threads (0: torch's default, one per core). On cores shared with other work use 1: a
    thread that waits for a core stalls every parallel op (measured here: 100x slower updates)."""

    # --- data --------------------------------------------------------------------------------------
    demos: str = "demos/tabletop2d"
    """An .hdf5 demonstration file or a directory of them (ours or the official LIBERO files; demos.py)."""
    only_successful: bool = True
    """Train on successful demos only."""
    pad: Literal["mask", "repeat-last"] = "mask"
    """Chunk slots past a demo's last action: masked out of the loss, or filled with the last action
    (see the module docstring for why masking is the default)."""
    image_orientation: Literal["camera", "openvla", "stored"] | None = None
    """Frame orientation to train on; None: as the recording env returned them (read_demos). Must match
    what the env gives the policy at RL time."""
    action_stats: str = "auto"
    """Official LIBERO files: statistics that normalise their actions (read_demos: auto, a suite, identity)."""
    libero_obs_shift: bool = True
    """Official LIBERO files: pair obs[t] with action t + 1 (their observations are recorded after the step)."""

    # --- env (greedy evaluation) -------------------------------------------------------------------
    task: str = "tabletop2d"
    """Env of the greedy evaluation: tabletop2d | libero_spatial | libero_object | libero_goal | libero_10 |
    libero_90; '/<i>' pins one task."""
    wrist_camera: bool = False
    """Also give the policy the wrist camera image (the demos must have it)."""
    env_options: str = "{}"
    """More keyword options of the env family as JSON (see envs/)."""

    # --- policy ------------------------------------------------------------------------------------
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The VLA policy (vla_policy.py)."""
    init_policy: str | None = None
    """Start from a policy written by VLAPolicy.save (its architecture replaces --policy.*)."""

    # --- optimisation ------------------------------------------------------------------------------
    total_updates: int = 3000
    """Optimiser steps."""
    batch_size: int = 64
    """Chunks per update (each: one observation and chunk_len x action_dim target tokens)."""
    lr: float = 1e-3
    """Peak learning rate (benchmarks/bc_probe.py: 1e-3 to 3e-3 learn fastest for the CPU presets)."""
    warmup_updates: int = 50
    """Linear learning-rate warm-up."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay (over the updates after warm-up) as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (all parameters)."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    bf16: bool = False
    """bf16 autocast also on CPU (always on with CUDA; vla_policy.policy_autocast). Leave it as the RL run
    will: log-probs under bf16 differ from float32 ones."""

    # --- logging and evaluation --------------------------------------------------------------------
    log_every_updates: int = 20
    """Write training scalars (averaged over the window) and a progress line every this many updates."""
    eval_every_updates: int = 500
    """Greedy evaluation on the real env every this many updates (0: only the final one)."""
    eval_episodes: int = 40
    """Episodes per periodic evaluation (spread evenly over the tasks; episode k of a task uses seed k)."""
    final_eval_episodes: int = 200
    """Episodes of the final evaluation (0: none; reported in summary.json)."""
    eval_envs: int = 8
    """Envs stepped in lockstep during evaluation (one batched forward per chunk). A LIBERO env holds
    ~1.2 GB and takes 3-9 s to build: use 1-2 there on a small machine."""


def derive_and_check(args: Args) -> Args:
    """Checks that can fail before any data is read, and the derived policy settings."""
    problems = []
    parse_task(args.task)
    if args.total_updates < 1 or args.batch_size < 1:
        problems.append("--total-updates and --batch-size must be >= 1")
    if args.log_every_updates < 1 or args.eval_envs < 1:
        problems.append("--log-every-updates and --eval-envs must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device} but torch sees no CUDA device (use --device cpu)")
    try:
        if not isinstance(json.loads(args.env_options), dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        problems.append(f"--env-options {args.env_options!r} is not a JSON object ({exc})")
    if args.policy.checkpoint or args.policy.backend != "vla":
        problems.append("--policy.checkpoint / --policy.backend are accerl.py's: start from a saved policy with "
                        "--init-policy DIR")
    if args.init_policy:  # the architecture is the saved policy's, whatever the flags say
        args.policy = PolicyConfig(**json.loads((Path(args.init_policy) / "config.json").read_text()))
        if args.policy.num_cameras != (2 if args.wrist_camera else 1):
            problems.append(f"--init-policy has {args.policy.num_cameras} camera(s): set --wrist-camera to match")
    if problems:
        raise SystemExit("sft: bad arguments:\n  " + "\n  ".join(problems))
    args.policy.num_cameras = 2 if args.wrist_camera else 1
    return args


def env_options(args: Args) -> dict:
    """Options of the evaluation env: LIBERO evaluates on the suite's fixed initial states (accerl.py)."""
    extra = json.loads(args.env_options)
    if parse_task(args.task)[0].startswith("libero_"):
        return {"init_states": "fixed", **extra}
    return extra


# ===================================================================================================
# Demonstrations as action chunks
# ===================================================================================================
class DemoChunks:
    """Every step of every demo, in memory, as the start of one training chunk.

    Frames stay uint8 (N, cameras, H, W, 3); a batch gathers its observations, instruction ids and the
    (chunk_len, action_dim) target tokens of the next chunk_len steps of the same demo, with a mask of the
    slots that exist (all ones with pad "repeat-last", whose missing slots repeat the last action).
    """

    def __init__(self, episodes: list[dict], policy: VLAPolicy, pad: str):
        cfg = policy.cfg
        if not episodes:
            raise SystemExit("sft: no demonstrations to train on (check --demos and --only-successful)")
        for e in episodes:
            if e["actions"].shape[1] != cfg.action_dim:
                raise SystemExit(f"sft: {e['source']} has {e['actions'].shape[1]}-D actions, the policy "
                                 f"{cfg.action_dim}-D")
            if cfg.num_cameras == 2 and e["wrist_images"] is None:
                raise SystemExit(f"sft: --wrist-camera but {e['source']} has no wrist frames")
            if cfg.proprio_dim and e["proprio"].shape[1] != cfg.proprio_dim:
                raise SystemExit(f"sft: {e['source']} has {e['proprio'].shape[1]}-D proprio, the policy reads "
                                 f"{cfg.proprio_dim}-D (--policy.proprio-dim)")
        cameras = ["images", "wrist_images"][: cfg.num_cameras]
        self.images = torch.from_numpy(np.concatenate(
            [np.stack([e[c] for c in cameras], axis=1) for e in episodes]))
        self.proprio = (torch.from_numpy(np.concatenate([e["proprio"] for e in episodes]).astype(np.float32))
                        if cfg.proprio_dim else torch.zeros(sum(len(e["actions"]) for e in episodes), 0))
        self.tokens = actions_to_tokens(torch.from_numpy(np.concatenate([e["actions"] for e in episodes])),
                                        cfg.num_bins)
        self.instruction_texts = sorted({e["instruction"] for e in episodes})
        self.instructions = policy.tokenizer.encode(self.instruction_texts, cfg.max_instruction_tokens)
        row = {text: i for i, text in enumerate(self.instruction_texts)}
        lengths = torch.tensor([len(e["actions"]) for e in episodes])
        self.end = torch.repeat_interleave(lengths.cumsum(0), lengths)  # exclusive end of each step's demo
        self.instruction_row = torch.repeat_interleave(torch.tensor([row[e["instruction"]] for e in episodes]),
                                                       lengths)
        self.chunk_len, self.pad = cfg.chunk_len, pad
        self.num_episodes = len(episodes)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        steps = index[:, None] + torch.arange(self.chunk_len)
        end = self.end[index][:, None]
        valid = steps < end
        steps = torch.minimum(steps, end - 1)  # repeat-last; with "mask" these slots carry no loss
        mask = valid if self.pad == "mask" else torch.ones_like(valid)
        return {"images": self.images[index], "instruction": self.instructions[self.instruction_row[index]],
                "action_tokens": self.tokens[steps], "mask": mask, "proprio": self.proprio[index]}


def sft_loss(policy: VLAPolicy, batch: dict[str, torch.Tensor], device: torch.device,
             bf16: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked token cross-entropy of a batch of chunks -> (loss, metrics). Every token of a valid slot
    counts once: the mean runs over valid slots x action_dim."""
    targets = batch["action_tokens"].to(device)
    with policy_autocast(device, cpu_bf16=bf16):
        out = policy.evaluate(batch["images"].to(device), batch["instruction"].to(device), targets,
                              proprio=batch["proprio"].to(device))
    mask = batch["mask"].to(device)[..., None].expand_as(targets).float()
    count = mask.sum().clamp_min(1.0)
    loss = -(out["logp"].float() * mask).sum() / count
    with torch.no_grad():
        greedy = out["log_probs"].argmax(-1)
        bins = policy.cfg.num_bins
        error = (tokens_to_actions(greedy, bins) - tokens_to_actions(targets, bins)).abs()
        metrics = {"losses/sft_loss": loss.item(),
                   "charts/token_accuracy": ((greedy == targets).float() * mask).sum().item() / count.item(),
                   "charts/action_abs_error": (error * mask).sum().item() / count.item(),
                   "charts/valid_slot_fraction": batch["mask"].float().mean().item()}
    return loss, metrics


def lr_lambda(args: Args):
    """Linear warm-up, then cosine decay to min_lr_ratio at the last update."""

    def fn(update: int) -> float:
        if update < args.warmup_updates:
            return (update + 1) / args.warmup_updates
        progress = min(1.0, (update - args.warmup_updates) / max(1, args.total_updates - args.warmup_updates))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


# ===================================================================================================
# Greedy evaluation on the real env
# ===================================================================================================
@torch.no_grad()
def greedy_evaluation(policy: VLAPolicy, args: Args, episodes: int, device: torch.device) -> dict:
    """Greedy episodes, episode k of task t reset with seed k (LIBERO: fixed initial state k), as accerl.py
    evaluates; `eval_envs` envs step in lockstep with one batched forward per chunk. Returns the success
    rate, per task and overall, and the mean episode length in env steps."""
    cfg = policy.cfg
    family, pinned = parse_task(args.task)
    options = env_options(args)
    spec = env_spec(args.task, image_size=cfg.image_size, wrist_camera=args.wrist_camera, **options)
    tasks = [pinned] if pinned is not None else list(range(spec.num_tasks))
    # task-major, so an env keeps its task from one episode to the next (a LIBERO env rebuilds, 2-4 s, when
    # reset switches task); the same episodes as accerl.py's round-robin order
    jobs = [(t, k) for i, t in enumerate(tasks) for k in range(episodes // len(tasks) + (i < episodes % len(tasks)))]
    instructions = policy.tokenizer.encode(list(spec.instructions), cfg.max_instruction_tokens)
    cameras = spec.cameras[: cfg.num_cameras]
    envs = [make_env(family, image_size=cfg.image_size, wrist_camera=args.wrist_camera,
                     seed=int(np.random.SeedSequence([args.seed, 2, i]).generate_state(1)[0]), **options)
            for i in range(min(args.eval_envs, len(jobs)))]
    pending = iter(jobs)
    running: dict[int, tuple[int, dict, int]] = {}  # env index -> (task, last obs, env steps so far)
    results: list[tuple[int, bool, int]] = []

    def start(i: int) -> None:
        job = next(pending, None)
        if job is not None:
            running[i] = (job[0], envs[i].reset(task_id=job[0], seed=job[1]), 0)

    was_training = policy.training
    policy.eval()
    try:
        for i in range(len(envs)):
            start(i)
        while running:
            order = list(running)
            images = torch.from_numpy(np.stack([np.stack([running[i][1][c] for c in cameras]) for i in order]))
            task_ids = torch.tensor([running[i][0] for i in order])
            proprio = torch.from_numpy(np.stack([running[i][1]["proprio"] for i in order]).astype(np.float32))
            with policy_autocast(device, cpu_bf16=args.bf16):
                actions = policy.act(images.to(device), instructions[task_ids].to(device), greedy=True,
                                     proprio=proprio[:, :cfg.proprio_dim].to(device))["actions"]
            for row, i in enumerate(order):
                task, _, steps = running.pop(i)
                obs, _, terminated, truncated, info = envs[i].step_chunk(actions[row].float().cpu().numpy())
                steps += info["env_steps"]
                if terminated or truncated:
                    results.append((task, bool(info["success"]), steps))
                    start(i)
                else:
                    running[i] = (task, obs, steps)
    finally:
        policy.train(was_training)
        for env in envs:
            env.close()
    out = {"greedy_success": float(np.mean([s for _, s, _ in results])),
           "episodic_length": float(np.mean([n for _, _, n in results])), "episodes": len(results)}
    for t in tasks:
        out[f"greedy_success_task_{t}"] = float(np.mean([s for task, s, _ in results if task == t]))
    return out


# ===================================================================================================
# main
# ===================================================================================================
def save_policy(policy: VLAPolicy, out: Path, meta: dict) -> Path:
    """VLAPolicy.save into a hidden temporary directory, plus sft.json (provenance), then one rename into
    place (checkpoint.install_dir): RL never sees a half-written policy."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(str(tmp))
    (tmp / "sft.json").write_text(json.dumps(meta, indent=1, default=str))
    return ckpt.install_dir(tmp, out)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(args: Args) -> dict:
    """Train, evaluate, save; returns the summary (also written to <run_dir>/summary.json)."""
    from torch.utils.tensorboard import SummaryWriter

    args = derive_and_check(args)
    start_time = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    device = resolve_device(args.device)
    name = f"{args.task.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(start_time)}"
    run_dir = Path(args.run_dir or f"runs/{name}")
    out_dir = Path(args.out) if args.out else run_dir / "policy"

    episodes = read_demos(args.demos, image_orientation=args.image_orientation, image_size=args.policy.image_size,
                          action_stats=args.action_stats, only_successful=args.only_successful,
                          wrist=args.wrist_camera, libero_obs_shift=args.libero_obs_shift)
    spec = env_spec(args.task, image_size=args.policy.image_size, wrist_camera=args.wrist_camera,
                    **env_options(args))
    unknown = sorted({e["instruction"] for e in episodes} - set(spec.instructions))
    if unknown:  # the policy would be prompted differently at evaluation and RL time
        log("sft", f"warning: demo instructions not among --task {args.task}'s: {unknown}")
    # instructions must fit whole (LIBERO's run to ~100 bytes): a cut instruction can hide the goal
    longest = max(len(text.encode()) + 2 for text in {e["instruction"] for e in episodes} | set(spec.instructions))
    if longest > args.policy.max_instruction_tokens and not args.init_policy:
        log("sft", f"--policy.max-instruction-tokens {args.policy.max_instruction_tokens} -> {longest}")
        args.policy.max_instruction_tokens = longest

    if args.init_policy:
        policy = VLAPolicy.load(args.init_policy, device=device)
    else:
        policy = VLAPolicy(args.policy).to(device)
    data = DemoChunks(episodes, policy, args.pad)
    del episodes  # the frames now live in `data`
    log("sft", f"{data.num_episodes} demos, {len(data)} chunk starts, {len(data.instruction_texts)} instructions, "
               f"{policy.num_parameters() / 1e6:.2f} M parameters, device {device}")

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    writer = SummaryWriter(str(run_dir))
    writer.add_text("args", f"```\n{json.dumps(asdict(args), indent=1, default=str)}\n```")
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(data), generator=generator), 0
    window: dict[str, list[float]] = {}
    loss_history: list[float] = []
    last_eval: dict | None = None
    update, interrupted = 0, False
    window_start = time.perf_counter()
    policy.train()
    restore_signals = interrupt_on_stop_signals()
    try:
        while update < args.total_updates:
            if cursor + args.batch_size > len(order):  # a new epoch: every chunk start once per epoch
                order, cursor = torch.randperm(len(data), generator=generator), 0
            index = order[cursor:cursor + args.batch_size]
            cursor += len(index)
            loss, metrics = sft_loss(policy, data.batch(index), device, args.bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics["losses/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm))
            optimizer.step()
            scheduler.step()
            update += 1
            loss_history.append(metrics["losses/sft_loss"])
            for key, value in metrics.items():
                window.setdefault(key, []).append(value)
            if update % args.log_every_updates == 0 or update == args.total_updates:
                elapsed = time.perf_counter() - window_start
                scalars = {key: float(np.mean(values)) for key, values in window.items()}
                scalars["charts/lr"] = optimizer.param_groups[0]["lr"]
                scalars["charts/epoch"] = update * args.batch_size / len(data)
                scalars["perf/sft_samples_per_s"] = len(window["losses/sft_loss"]) * args.batch_size / elapsed
                for key, value in scalars.items():
                    writer.add_scalar(key, value, update)
                log("sft", f"update {update}/{args.total_updates} loss {scalars['losses/sft_loss']:.3f} "
                           f"token acc {scalars['charts/token_accuracy']:.2f} "
                           f"|a - a*| {scalars['charts/action_abs_error']:.3f} "
                           f"{scalars['perf/sft_samples_per_s']:.0f} chunks/s")
                window, window_start = {}, time.perf_counter()
            if args.eval_every_updates and update % args.eval_every_updates == 0 and update < args.total_updates \
                    and args.eval_episodes > 0:
                last_eval = _log_eval(writer, greedy_evaluation(policy, args, args.eval_episodes, device), update)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was learnt, save below
        interrupted = True
        log("sft", f"interrupted at update {update}; saving")
    finally:
        restore_signals()

    final_eval = None
    if args.final_eval_episodes > 0 and not interrupted:
        final_eval = _log_eval(writer, greedy_evaluation(policy, args, args.final_eval_episodes, device), update)
    summary = {"updates": update, "interrupted": interrupted, "demos": args.demos, "num_demos": data.num_episodes,
               "chunk_starts": len(data), "first_loss": loss_history[0] if loss_history else None,
               "final_loss": float(np.mean(loss_history[-args.log_every_updates:])) if loss_history else None,
               "final_eval": final_eval, "last_periodic_eval": last_eval, "policy_dir": str(out_dir),
               "wall_seconds": time.time() - start_time}
    save_policy(policy, out_dir, {"args": asdict(args), **summary})
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log("sft", f"policy -> {out_dir}" + (f"; greedy success {final_eval['greedy_success']:.1%}" if final_eval else ""))
    return summary


def _log_eval(writer, result: dict, update: int) -> dict:
    for key, value in result.items():
        if key != "episodes":
            writer.add_scalar(f"eval/{key}", value, update)
    log("sft", f"update {update}: greedy success {result['greedy_success']:.1%} over {result['episodes']} episodes")
    return result


if __name__ == "__main__":
    summary = main(cli_with_preset(Args))  # tyro.cli; --policy.preset sets the --policy.* defaults
    sys.exit(130 if summary["interrupted"] else 0)
