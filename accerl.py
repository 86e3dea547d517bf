"""accerl: asynchronous RL fine-tuning of Vision-Language-Action policies (AcceRL + GIPO).

    python accerl.py                                  # built-in tabletop2d tasks, CPU default
    python accerl.py --task libero_10                 # LIBERO-Long, all 10 tasks
    python accerl.py --mode sync                      # the synchronous baseline, same parts
    python accerl.py --eval-only --checkpoint runs/X  # greedy evaluation table
    python accerl.py --wm-checkpoint runs/W/world_model --num-imagination-workers 2   # + imagination
    python accerl.py --task libero_spatial --policy.backend openvla-oft --policy.checkpoint DIR \
        --policy.trust-remote-code                    # fine-tune an OpenVLA-OFT checkpoint (LoRA)

Read top to bottom: Args -> the process roles (env worker, also the imagination worker; evaluation,
inference; the world model's server lives in world_model.py) -> the learner (GAE, the GIPO objective,
world-model training) -> main (storage, queues, spawn, supervision, shutdown).

Who sends what to whom (queues carry indices only; frames and outputs live in shared memory). Client c
is env worker i (c = i), eval worker j (c = #env workers + j) or imagination worker w (after those):

    env_worker_i --(client, env, segment, rows)--> requests[k] --> inference_k    (k = c mod K)
    env_worker_i <--(env, segment, rows)---------- actions[c] <-- inference_k    (outputs in storage)
    env_worker_i --segment id--> full_segments --> learner --segment id--> free_segments --> env_worker_i
    learner --weights + version (seqlock, shared memory)--> every inference_k
    eval_worker_j <--(round, task, seed)-- eval_jobs <-- main;  eval_worker_j <-> inference_k as above
    every process --(kind, role, payload)--> stats --> main (the only tensorboard writer)

With a world model (--wm-checkpoint, --num-imagination-workers W; reference.md section 5):

    imagination_worker_w: the env worker's code on ImaginedEnvs; requests[k] / actions[c] as above
    imagination_worker_w --segment id--> imagined_full_segments --> learner   (a share per update, never
    imagination_worker_w <--segment id-- imagined_free_segments <-- learner    waited for)
    imagination_worker_w --(w, slot)--> wm_requests --> world_model --slot--> wm_replies[w]  (frames in slots)
    env_worker_i --every real step (frames, actions)--> replay (shared memory) --> learner, imagined starts
    learner --world-model weights + version (seqlock), every --wm-train-every-updates--> world_model

With M data-parallel learners (--num-learners), `learner` is learner_0..M-1: learner_0 takes the segment
ids and sends rank r its share (learner_shares[r]); each rank frees its own; DDP all-reduces gradients;
only learner_0 publishes weights, checkpoints and reports. K = M = 1 (the default) names the processes
`inference` and `learner`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import torch
import torch.multiprocessing as mp
import tyro

import checkpoint as ckpt
from envs import EnvSpec, env_spec, make_env, parse_task
from pipeline import (Counters, Heartbeats, RolloutStorage, StorageShape, TimedGet, WeightBroadcast, free_tcp_port, log,
                      memory_use)
from vla_policy import (PolicyConfig, VLAPolicy, cli_with_preset, cpu_has_native_bf16, make_policy,
                        make_tokenizer, resolve_policy_config)
from world_model import (ContextBank, ImaginationSlots, ImaginedEnv, LocalWorldModel, RealResetContexts,
                         ReplayContexts, ServedWorldModel, SlotShape, StepReplay, WorldModel, WorldModelServer,
                         WorldModelTrainer, load_config, load_optimizer_state, read_episodes)


# Args (below) nests one small dataclass per group, so that --help shows one box per group. The groups are
# marked tyro.conf.OmitArgPrefixes: their flags stay flat (--seed, not --experiment.seed), while code names
# the group (args.experiment.seed). The policy's flags keep their prefix (--policy.hidden).


@dataclass
class ExperimentArgs:
    exp_name: str = "accerl"
    """Name of the experiment; part of the run name."""
    seed: int = 1
    """One seed for everything; every worker's and env's seed is derived from it."""
    run_dir: str | None = None
    """Where logs, checkpoints and summary.json go (default runs/<task>__<exp_name>__<seed>__<time>)."""
    resume: str | None = None
    """Continue a run from its latest complete checkpoint (a run directory or a checkpoint directory)."""
    init_policy: str | None = None
    """Start from a saved policy (a directory written by `VLAPolicy.save`, e.g. sft.py's `<run>/policy`): its
    architecture and weights, with a fresh optimiser and counters (supervised warm start, then RL)."""
    eval_only: bool = False
    """Only evaluate --checkpoint (or a saved policy given by --init-policy, e.g. an SFT result) greedily (every
    task x --eval-episodes-per-task) and write a table."""
    checkpoint: str | None = None
    """Checkpoint (or run directory) whose policy --eval-only evaluates."""
    mode: Literal["async", "sync", "serial"] = "async"
    """async: decoupled processes (AcceRL); sync: the same processes in lockstep (the baseline);
    serial: the same role objects stepped round-robin in one process (debugging, tests)."""
    total_env_steps: int = 400_000
    """Stop after this many simulator steps (summed over env workers; imagined steps not counted)."""
    max_seconds: float = 0.0
    """Also stop after this many wall-clock seconds (0: no limit)."""
    task_defaults: bool = True
    """On the built-in task family, start from TABLETOP2D_DEFAULTS (a small VLA and the update measured to learn it
    from random init on a 2-core CPU; the values --help shows) instead of the plain defaults; every flag you pass
    wins. Not applied with --policy.preset, --policy.checkpoint or --init-policy (they choose the policy)."""
    device: str = "auto"
    """Device for inference and learner: auto (cuda if present), cpu, cuda, cuda:N."""
    inference_device: str | None = None
    """Override the inference device (e.g. cuda:1 with two GPUs); default: --device."""
    checkpoint_every_updates: int = 100
    """Write a checkpoint every this many updates (and always at exit)."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (older ones are deleted once a newer one is complete); raise it to
    evaluate a run's checkpoints afterwards (benchmarks/checkpoint_curve.py)."""
    log_every_s: float = 10.0
    """Seconds between progress lines."""


@dataclass
class EnvArgs:
    task: str = "tabletop2d"
    """tabletop2d | libero_spatial | libero_object | libero_goal | libero_10 | libero_90; '/<i>' pins one task."""
    wrist_camera: bool = False
    """Also give the policy the wrist camera image."""
    step_cost_ms: float = 0.0
    """tabletop2d only: mean simulated cost per env step, heavy-tailed (mimics LIBERO step times)."""
    step_cost_kind: Literal["sleep", "spin"] = "sleep"
    """tabletop2d only: the simulated cost sleeps or burns CPU."""
    env_options: str = "{}"
    """More keyword options of the env family as JSON, e.g. '{"layout": "free"}' (see envs/)."""
    init_states: Literal["sampled", "fixed"] = "sampled"
    """LIBERO training episodes start from freshly sampled placements (default) or the suite's fixed
    initial states (which evaluation always uses: training on them leaks the test set)."""


@dataclass
class WorldModelArgs:
    wm_checkpoint: str | None = None
    """A world model written by WorldModel.save (`python world_model.py train`); None: no imagination."""
    num_imagination_workers: int = 0
    """Imagination worker processes: the env worker's code on envs imagined by the world model."""
    imagined_envs_per_worker: int = 8
    """Imagined envs owned by each imagination worker."""
    imagine_horizon: int = 4
    """Imagined episode length limit in chunk steps (then truncated and bootstrapped; reference.md: 4-8)."""
    imagined_share: float = 0.5
    """Target share of imagined segments in each update's super batch, in (0, 1): the learner adds up to
    round(S x share / (1 - share)) imagined segments to the S real ones, without ever waiting for them."""
    wait_for_imagined: bool = False
    """The learner waits for all its imagined segments instead of taking those that are ready: every update
    then holds exactly the share, and the real env workers slow down to imagination's pace (they wait for
    free segments). For sample-efficiency experiments, where real env steps are the budget, not time."""
    wm_start: Literal["replay", "reset", "demos"] = "replay"
    """Where imagined episodes start: a recent real step from the replay (a fresh real reset until the
    replay holds the task), a fresh real reset (costs no env step), or a random step of --wm-demos."""
    wm_demos: tuple[str, ...] = ()
    """--wm-start demos: HDF5 files or directories of them (demos.py's layout)."""
    wm_max_batch: int = 16
    """world_model flushes a batch when this many imagined envs wait (an imagination worker sends the
    requests of all its envs whose action chunks are ready at once)..."""
    wm_batch_timeout_ms: float = 5.0
    """...or when the oldest request has waited this long."""
    wm_device: str | None = None
    """Device of the world_model server (default: the first inference server's)."""
    wm_train_every_updates: int = 0
    """Train the world model online on the replay of real steps every this many policy updates (0: frozen)."""
    wm_train_steps: int = 1
    """World-model optimiser steps each time it trains."""
    wm_batch_size: int = 32
    """Real transitions per world-model optimiser step."""
    wm_lr: float = 1e-4
    """World-model learning rate (AdamW, weight decay 1e-2, grad clip 1; reference.md section 5)."""
    wm_replay_steps_per_env: int = 2000
    """Recent real steps kept per real env for world-model training and imagined starts (shared memory)."""

    # derived (set by derive_and_check after parsing)
    imagined_segments_per_update: int = 0
    """Derived: imagined segments the learner adds to each update (at most; never waited for)."""


@dataclass
class WorkersArgs:
    num_env_workers: int = 2
    """Env worker processes (CPU, no model)."""
    envs_per_worker: int = 2
    """Envs owned by each env worker (stepped while the others wait for actions)."""
    num_eval_workers: int = 1
    """Greedy evaluation worker processes (real env only, never write to the learner)."""
    max_batch: int = 8
    """Inference flushes a batch when this many observations wait..."""
    batch_timeout_ms: float = 10.0
    """...or when the oldest waiting observation has waited this long (AcceRL: 8 / 300 ms on GPU)."""
    segment_len: int = 64
    """T: chunk steps per trajectory segment (bootstrapped with the value of the next observation)."""
    segments_per_update: int = 4
    """Segments in one learner update (the "super batch" is this x segment_len chunk steps)."""
    when_learner_behind: Literal["wait", "drop-oldest"] = "wait"
    """Async: what an env worker does when it needs a segment and every spare one is full, waiting for the
    learner. "wait": it waits (the learner trains on every collected step; its pace caps collection).
    "drop-oldest": it overwrites the oldest full segment the learner has not taken yet, as the paper's
    bounded replay of recent trajectories does: the envs never wait for the learner, the learner trains on
    the freshest segments, and the overwritten ones are counted in perf/dropped_segments."""
    wait_timeout_s: float = 300.0
    """A blocking wait longer than this stops the run and names the silent process."""
    eval_every_updates: int = 25
    """Run a greedy evaluation round every this many updates (0: only the final one)."""
    eval_episodes: int = 40
    """Episodes per periodic evaluation round (spread evenly over the tasks)."""
    final_eval_episodes: int = 200
    """Episodes of the final evaluation (reported in summary.json)."""
    eval_episodes_per_task: int = 50
    """--eval-only: episodes per task (LIBERO: one per fixed initial state, 50 in the suites)."""
    num_inference_servers: int = 1
    """K inference processes (`inference_0..K-1`; one is named `inference`); env and eval workers are
    assigned to them round-robin (client c sends to server c mod K), each server has its own request queue."""
    inference_devices: tuple[str, ...] = ()
    """Device of each inference server, server k on entry k mod len (e.g. cuda:0 cuda:1; repeat a device for
    several servers per GPU). Default: server k on cuda:(k mod #GPUs) with --device auto/cuda, else --device."""
    num_learners: int = 1
    """M data-parallel learner processes (`learner_0..M-1`; one is named `learner`): each trains on
    --segments-per-update / M segments, gradients all-reduced (NCCL on GPUs, gloo on CPU)."""
    learner_devices: tuple[str, ...] = ()
    """Device of each learner rank, one per rank (e.g. cuda:2 cuda:3). Default: rank r on cuda:r with
    --device auto/cuda, else --device."""

    # derived (set by derive_and_check after parsing)
    num_envs: int = 0
    """Derived: num_env_workers x envs_per_worker."""


@dataclass
class AlgorithmArgs:
    loss: Literal["gipo", "ppo-clip", "sapo", "no-clip"] = "gipo"
    """Policy objective per action token (reference.md section 4)."""
    gipo_sigma: float = 1.0
    """GIPO trust width: w = exp(-(ln rho)^2 / (2 sigma^2)); implicit bound on w*rho is exp(sigma^2/2)."""
    clip_eps: float = 0.2
    """PPO-clip epsilon."""
    sapo_tau_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    sapo_tau_neg: float = 2.0
    """SAPO gate temperature for negative advantages."""
    gamma: float = 0.99
    """Discount per chunk step (one RL step = one action chunk)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    recompute_value: bool = False
    """Recompute V with the current critic before GAE (behaviour values are up to --max-policy-lag old)."""
    norm_adv: bool = True
    """Normalise advantages with the super batch's mean and std."""
    vf_coef: float = 0.5
    """Value loss coefficient (plain MSE)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    kl_coef: float = 0.1
    """KL(behaviour || current) penalty coefficient (full categorical KL from stored log-probs)."""
    policy_lr: float = 3e-4
    """Learning rate of the policy group (the paper fine-tunes a 7B VLA with LoRA at 1e-5). From a warm start
    (--init-policy) on LIBERO, 3e-4 undid the SFT policy (training success 0.78 -> 0.39 in 35 updates) while 3e-5
    kept it (docs/RESULTS.md); on tabletop2d 3e-4 raised SFT's 60 % to 83.5 %."""
    value_lr: float = 1e-3
    """Learning rate of the value group (paper: 1e-4)."""
    warmup_updates: int = 10
    """Linear learning-rate warm-up (paper: 500)."""
    critic_warmup_updates: int = 0
    """Train only the critic for this many first updates (the policy group's learning rate is 0, then its own
    warm-up and decay start): from a warm start (--init-policy) the fresh value head's advantages are noise at first
    (explained variance -4.7 at update 1 on LIBERO), and policy steps on them only undo the supervised policy."""
    lr_decay_updates: int = 3000
    """Cosine decay horizon after warm-up (paper: 30k), down to --min-lr-ratio."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    update_epochs: int = 1
    """Passes over each super batch."""
    num_minibatches: int = 1
    """Optimiser steps per pass (the paper: one step per super batch)."""
    micro_batch_size: int = 0
    """Rows per forward/backward inside a minibatch, gradients accumulated (0: the whole minibatch at once).
    Same update, less activation memory: large presets, or sync mode where a minibatch holds every env's segment."""
    max_policy_lag: int | None = None
    """Drop samples produced by a policy more than this many updates old (None: keep all)."""
    hindsight_relabel: bool = False
    """Hindsight instruction relabelling (HER, Andrychowicz et al. 2017, with instructions as goals): an episode
    that terminated meeting another task's goal (tabletop2d: a wrong grasp of object j) is also trained on as a
    success of that task: a copy of its rows with task j's instruction, reward 1.0 at its end, values from the
    current critic, the behaviour log-probs kept. The ratio pi(a | s, j) / pi_behaviour(a | s, k) is then an
    importance weight, and GIPO's trust weight discounts a copy's tokens once the policy reads the instruction.
    Copies stay out of the KL term and of the staleness instruments. Needs an env that reports which task an
    episode achieved (EnvSpec.reports_achieved_task: tabletop2d, not LIBERO)."""
    bf16: bool = True
    """bf16 autocast in inference and learner (heads and log-probs stay fp32). On a CPU-only run it stays on
    only where the CPU has native bf16 (avx512_bf16 makes the default policy 1.3-1.6x faster, platform.md);
    elsewhere it is turned off with a log line (emulated bf16 ran it ~5x slower: vla_policy.cpu_has_native_bf16)."""


@dataclass
class Args:
    experiment: Annotated[ExperimentArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ExperimentArgs)
    """What to run and where: name, seed, run directory, resume / evaluate, budget, devices."""
    env: Annotated[EnvArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=EnvArgs)
    """The simulator: task suite, cameras, simulated step cost (envs/)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The VLA policy (vla_policy.py)."""
    wm: Annotated[WorldModelArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=WorldModelArgs)
    """The world model as an extra rollout source: imagination workers, its server, online training."""
    workers: Annotated[WorkersArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=WorkersArgs)
    """Processes and their batching: env / eval workers, inference batches, segments, evaluation rounds."""
    algorithm: Annotated[AlgorithmArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=AlgorithmArgs)
    """The RL update: objective (GIPO / PPO-clip / SAPO), GAE, coefficients, optimiser, schedule."""


# What `python accerl.py` trains on the built-in task family (--task tabletop2d or tabletop2d/<i>): a small VLA (ResNet
# tower with instruction FiLM and instruction-queried keypoints, a 1-layer Llama decoder whose output starts at zero
# on top of the state path, OFT action tokens, a critic that trains the trunk) and an update that together learn
# tabletop2d from random init to >= 90 % greedy success in 20 minutes on a 2-core CPU (docs/RESULTS.md, session 15).
# The plain dataclass defaults above stay those of the paper's setting (LIBERO, large VLAs started from SFT).
TABLETOP2D_DEFAULTS = {
    "policy": dict(image_size=64, vision_tower="resnet", resnet_widths=(16, 32, 64, 96), instruction_film=True,
                   hidden=128, decoder_layers=1, decoder_heads=2, decoder_mlp=384, decoder_init_std=0.0625,
                   embedding_init_std=0.3, keypoints=16, instructed_keypoints=True, proprio_dim=3,
                   decoder_residual=True, value_detach=False),
    "algorithm": dict(policy_lr=1e-3, lr_decay_updates=700, ent_coef=0.01, kl_coef=0.03, update_epochs=2,
                      num_minibatches=8, hindsight_relabel=True),
    "experiment": dict(total_env_steps=1_300_000, max_seconds=1200.0),
}


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line -> Args (tyro). `--policy.preset NAME` sets the --policy.* defaults (cli_with_preset);
    otherwise, on the built-in task family, TABLETOP2D_DEFAULTS replace the plain defaults unless
    --no-task-defaults, --policy.checkpoint or --init-policy is given. Every flag you pass wins."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    task = EnvArgs.task
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            task = argv[i + 1]
        elif a.startswith("--task="):
            task = a.split("=", 1)[1]
    if task.split("/")[0] != "tabletop2d" or any(
            given(f) for f in ("--no-task-defaults", "--policy.preset", "--policy.checkpoint", "--init-policy")):
        return cli_with_preset(Args, argv)
    default = Args()
    default.policy = replace(default.policy, **TABLETOP2D_DEFAULTS["policy"])
    default.algorithm = replace(default.algorithm, **TABLETOP2D_DEFAULTS["algorithm"])
    default.experiment = replace(default.experiment, **TABLETOP2D_DEFAULTS["experiment"])
    return tyro.cli(Args, args=argv, default=default)


def derive_and_check(args: Args) -> Args:
    """Derived fields and every check that can fail before a process is spawned."""
    problems = []
    family, index = parse_task(args.env.task)  # raises on a malformed task
    if args.workers.num_env_workers < 1 and not args.experiment.eval_only:
        problems.append("--num-env-workers must be >= 1")
    if args.workers.envs_per_worker < 1:
        problems.append("--envs-per-worker must be >= 1")
    if args.workers.segment_len < 2:
        problems.append("--segment-len must be >= 2")
    if args.workers.segments_per_update < 1:
        problems.append("--segments-per-update must be >= 1")
    if args.experiment.eval_only and not (args.experiment.checkpoint or args.experiment.init_policy):
        problems.append("--eval-only needs --checkpoint DIR (a run directory or a checkpoint) or --init-policy DIR "
                        "(a saved policy)")
    if args.experiment.eval_only and args.experiment.checkpoint and args.experiment.init_policy:
        problems.append("--eval-only evaluates one policy: pass --checkpoint or --init-policy, not both")
    if args.algorithm.critic_warmup_updates < 0:
        problems.append("--critic-warmup-updates must be >= 0")
    if args.experiment.keep_checkpoints < 1:
        problems.append("--keep-checkpoints must be >= 1 (the newest checkpoint is what --resume reads)")
    if args.experiment.eval_only and args.workers.num_eval_workers < 1:
        problems.append("--eval-only needs --num-eval-workers >= 1")
    if args.experiment.resume and args.experiment.eval_only:
        problems.append("--resume and --eval-only exclude each other")
    if args.experiment.init_policy and args.experiment.resume:
        problems.append("--init-policy starts a new training run: drop --resume (a resumed run keeps its own weights)")
    if args.workers.when_learner_behind == "drop-oldest" and args.experiment.mode == "sync":
        problems.append("--when-learner-behind drop-oldest is for --mode async or serial: sync mode's learner "
                        "trains on every env's segment, in lockstep")
    if args.workers.when_learner_behind == "drop-oldest" and args.wm.wait_for_imagined:
        problems.append("--when-learner-behind drop-oldest and --wait-for-imagined pull apart: waiting slows the "
                        "real envs to imagination's pace, dropping lets them run on; choose one")
    if args.algorithm.gipo_sigma <= 0:
        problems.append("--gipo-sigma must be > 0")
    if args.algorithm.micro_batch_size < 0:
        problems.append("--micro-batch-size must be >= 0 (0: the whole minibatch in one forward)")
    if args.policy.checkpoint and args.experiment.init_policy:
        problems.append("--init-policy and --policy.checkpoint exclude each other (both start from a saved policy)")
    if args.workers.max_batch < 1 or args.workers.batch_timeout_ms < 0:
        problems.append("--max-batch must be >= 1 and --batch-timeout-ms >= 0")
    if args.experiment.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.experiment.device} but torch sees no CUDA device (use --device cpu)")
    else:
        problems += placement_problems(args)
    try:
        options = json.loads(args.env.env_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        problems.append(f"--env-options {args.env.env_options!r} is not a JSON object ({exc}); "
                        """example: --env-options '{"layout": "free"}'""")
    if problems:
        raise SystemExit("accerl: bad arguments:\n  " + "\n  ".join(problems))
    try:  # builds no simulator: checks the task name and the env options before anything is spawned
        spec = env_spec(args.env.task, image_size=args.policy.image_size, wrist_camera=args.env.wrist_camera,
                        **env_options(args))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"accerl: bad env options for --task {args.env.task}: {exc}")
    if args.algorithm.hindsight_relabel and not spec.reports_achieved_task:
        raise SystemExit(f"accerl: --hindsight-relabel needs an env that reports which task an episode achieved "
                         f"(info['achieved_task']); {spec.name} does not: drop --hindsight-relabel")
    if args.policy.backend == "openvla-oft":  # before any of the checkpoint's code runs
        problems = openvla_oft_problems(args, spec)
        if problems:
            raise SystemExit("accerl: bad --policy.backend openvla-oft arguments:\n  " + "\n  ".join(problems))
    if args.experiment.init_policy:
        args.policy = load_policy_config(args.experiment.init_policy)
        if args.policy.num_cameras != (2 if args.env.wrist_camera else 1):
            raise SystemExit(f"accerl: --init-policy {args.experiment.init_policy} sees {args.policy.num_cameras} "
                             f"camera(s); {'drop' if args.env.wrist_camera else 'add'} --wrist-camera to match it")
    try:  # --policy.checkpoint DIR (a VLAPolicy.save directory): its architecture, this run's training options
        args.policy = resolve_policy_config(args.policy, num_cameras=2 if args.env.wrist_camera else 1)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"accerl: --policy.checkpoint: {exc}")
    # instructions must fit whole (LIBERO's run to ~100 bytes): a cut instruction can hide the goal. The tokens
    # are the policy's own (make_tokenizer): OpenVLA-OFT's prompt tokenizer wraps them in its prompt template.
    try:
        tokenizer = make_tokenizer(args.policy)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"accerl: --policy.checkpoint {args.policy.checkpoint}: no usable tokenizer: {exc}")
    longest = max(tokenizer.num_tokens(text) for text in spec.instructions)
    fixed_width = args.experiment.init_policy or (args.policy.checkpoint and args.policy.backend == "vla")
    if longest > args.policy.max_instruction_tokens and fixed_width:  # a VLAPolicy was trained at its width
        raise SystemExit(f"accerl: the instructions of {args.env.task} need {longest} tokens, the policy in "
                         f"--init-policy takes {args.policy.max_instruction_tokens}: train it with "
                         f"--policy.max-instruction-tokens {longest}")
    if longest > args.policy.max_instruction_tokens and not (args.experiment.resume or args.experiment.eval_only):
        log("main", f"--policy.max-instruction-tokens {args.policy.max_instruction_tokens} -> {longest} "
                    f"(the longest instruction of {args.env.task})")
        args.policy.max_instruction_tokens = longest
    if args.experiment.eval_only:  # evaluation runs on the real env only: no imagination, no training
        args.wm.num_imagination_workers, args.wm.wm_train_every_updates = 0, 0
    problems = world_model_problems(args, spec)
    if problems:
        raise SystemExit("accerl: bad world-model arguments:\n  " + "\n  ".join(problems))
    args.workers.num_envs = args.workers.num_env_workers * args.workers.envs_per_worker
    if args.experiment.mode == "sync":
        # lockstep: every env contributes one segment per update, collected with one policy version
        args.workers.segments_per_update = args.workers.num_envs
    if args.wm.num_imagination_workers:  # S real segments + n imagined: n / (S + n) = share
        share = args.wm.imagined_share
        args.wm.imagined_segments_per_update = max(1, round(args.workers.segments_per_update * share / (1 - share)))
    learners = args.workers.num_learners
    if args.workers.segments_per_update % learners and not args.experiment.eval_only:
        raise SystemExit(
            f"accerl: each of the {learners} learner ranks trains on an equal share of the super batch: "
            + (f"--mode sync trains on one segment per env ({args.workers.num_envs} envs), so make "
               "--num-env-workers x --envs-per-worker" if args.experiment.mode == "sync" else
               f"--segments-per-update {args.workers.segments_per_update} must be")
            + f" a multiple of --num-learners {learners}")
    rows_per_rank = args.workers.segments_per_update // learners * args.workers.segment_len
    if learners > 1 and args.algorithm.num_minibatches > rows_per_rank:
        raise SystemExit(f"accerl: --num-minibatches {args.algorithm.num_minibatches} exceeds the {rows_per_rank} "
                         "chunk steps of each learner rank: lower it or raise --segments-per-update")
    args.policy.num_cameras = 2 if args.env.wrist_camera else 1
    learner_devices, inference_devices = resolve_devices(args)
    all_cpu = all(d == "cpu" for d in learner_devices + inference_devices)
    if args.algorithm.bf16 and all_cpu and not cpu_has_native_bf16():
        log("main", "bf16 autocast off: this CPU has no native bf16 (avx512_bf16 / AMX), where it is ~5x slower "
                    "than float32 for the default policy")
        args.algorithm.bf16 = False
    return args


def world_model_problems(args: Args, spec: EnvSpec) -> list[str]:
    """Bad world-model options (derive_and_check reports them before anything is spawned)."""
    wm, problems = args.wm, []
    if wm.num_imagination_workers < 0 or wm.wm_train_every_updates < 0:
        return ["--num-imagination-workers and --wm-train-every-updates must be >= 0"]
    imagination = wm.num_imagination_workers > 0
    if wm.wait_for_imagined and not imagination:
        return ["--wait-for-imagined waits for imagined segments: give --num-imagination-workers N (and "
                "--wm-checkpoint DIR)"]
    if not imagination and not wm.wm_train_every_updates:
        return []
    if not wm.wm_checkpoint:
        return ["--num-imagination-workers / --wm-train-every-updates need --wm-checkpoint DIR (a world model "
                "written by `python world_model.py train`)"]
    try:
        cfg = load_config(wm.wm_checkpoint)
    except (OSError, TypeError, ValueError) as exc:
        return [f"--wm-checkpoint: {exc}"]
    if not (Path(wm.wm_checkpoint) / "model.safetensors").is_file():
        problems.append(f"--wm-checkpoint {wm.wm_checkpoint} holds no model.safetensors")
    if cfg.image_size != args.policy.image_size:
        problems.append(f"the world model in --wm-checkpoint imagines {cfg.image_size} px frames, the policy sees "
                        f"{args.policy.image_size} px: pass --policy.image-size {cfg.image_size} or train a world "
                        f"model at {args.policy.image_size} px")
    missing = [text for text in spec.instructions if text not in cfg.instructions]
    if missing:
        problems.append(f"the world model in --wm-checkpoint was not trained on the tasks of --task {args.env.task} "
                        f"(e.g. {missing[0]!r})")
    if cfg.action_dim != args.policy.action_dim:
        problems.append(f"the world model takes {cfg.action_dim}-D actions, the policy gives "
                        f"{args.policy.action_dim}-D")
    if imagination:
        if args.env.wrist_camera:
            problems.append("the world model imagines the third-person camera only: drop --wrist-camera to use "
                            "imagination workers")
        if args.experiment.mode == "sync":
            problems.append("--mode sync steps every env in lockstep with the learner; imagination workers need "
                            "--mode async or serial")
        if wm.imagined_envs_per_worker < 1 or wm.imagine_horizon < 1:
            problems.append("--imagined-envs-per-worker and --imagine-horizon must be >= 1")
        if not 0 < wm.imagined_share < 1:
            problems.append(f"--imagined-share {wm.imagined_share} must be in (0, 1) with imagination workers "
                            "(the share of imagined segments in each update)")
        if wm.wm_max_batch < 1 or wm.wm_batch_timeout_ms < 0:
            problems.append("--wm-max-batch must be >= 1 and --wm-batch-timeout-ms >= 0")
        if wm.wm_start == "demos" and not wm.wm_demos:
            problems.append("--wm-start demos needs --wm-demos FILE_OR_DIR ...")
        problems += [f"--wm-demos: {path} does not exist" for path in wm.wm_demos
                     if wm.wm_start == "demos" and not Path(path).exists()]
        if wm.wm_device is not None:
            problems += device_problems("--wm-device", [wm.wm_device])
    if wm.wm_train_every_updates and (wm.wm_train_steps < 1 or wm.wm_batch_size < 1 or wm.wm_lr <= 0):
        problems.append("--wm-train-steps and --wm-batch-size must be >= 1, --wm-lr > 0")
    if uses_replay(args) and wm.wm_replay_steps_per_env < cfg.context_frames + 4:
        problems.append(f"--wm-replay-steps-per-env must be >= {cfg.context_frames + 4} (context frames + 4)")
    return problems


def openvla_oft_problems(args: Args, spec: EnvSpec) -> list[str]:
    """Bad combinations with --policy.backend openvla-oft, found from the checkpoint's files before any of its code
    runs: no checkpoint there, remote code not allowed (--policy.trust-remote-code), action statistics other than
    those the env de-normalises with (the policy acts in [-1, 1] of ITS dataset statistics, the env maps [-1, 1]
    back with its own: different ones scale every action wrongly, silently)."""
    from openvla_oft import check_checkpoint, checkpoint_action_stats

    directory = args.policy.checkpoint
    try:
        check_checkpoint(directory, args.policy.trust_remote_code)
        stats = checkpoint_action_stats(directory)
    except (OSError, ValueError, RuntimeError) as exc:  # RemoteCodeError is a RuntimeError
        return [f"--policy.checkpoint {directory}: {exc}"]
    if spec.action_stats is None:  # the env's own units (tabletop2d): no dataset statistics to agree with
        return []
    env_low, env_high = (np.asarray(v, dtype=np.float64) for v in spec.action_stats)
    n = len(env_low)
    mask = np.asarray(stats["mask"], dtype=bool)
    low, high = (np.asarray(stats[k], dtype=np.float64)[:n] for k in ("low", "high"))
    if len(mask) != spec.action_dim or not mask[:n].all() or mask[n:].any():
        return [f"--policy.checkpoint {directory}: its statistics normalise action dims "
                f"{np.flatnonzero(mask).tolist()}; the {spec.name} env de-normalises dims 0..{n - 1} and takes the "
                "others unnormalised"]
    if not all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in ((low, env_low), (high, env_high))):
        return [f"--policy.checkpoint {directory}: its action statistics ({stats['key']}: low "
                f"{np.round(low, 4).tolist()}, high {np.round(high, 4).tolist()}) are not those the {spec.name} env "
                f"de-normalises with (low {np.round(env_low, 4).tolist()}, high {np.round(env_high, 4).tolist()}): "
                "every action would be scaled wrongly. Use a checkpoint trained on this suite, or name the matching "
                """statistics (--env-options '{"action_stats": "<suite>"}')"""]
    return []


def uses_replay(args: Args) -> bool:
    """The env workers record every real step into the replay: for imagined starts or world-model training."""
    wm = args.wm
    return bool(wm.wm_train_every_updates or (wm.num_imagination_workers and wm.wm_start == "replay"))


def load_policy_config(directory: str) -> PolicyConfig:
    """The PolicyConfig of a directory written by `VLAPolicy.save`; a clear error if it is not one."""
    path = Path(directory)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise SystemExit(f"accerl: --init-policy {directory} holds no config.json + model.safetensors "
                         "(a directory written by VLAPolicy.save, e.g. sft.py's <run>/policy)")
    return PolicyConfig(**json.loads((path / "config.json").read_text()))  # its __post_init__ re-tuples lists


def load_policy_weights(directory: str) -> dict[str, torch.Tensor]:
    """The state dict of a directory written by `VLAPolicy.save` (its architecture: `load_policy_config`)."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def resolve_devices(args: Args) -> tuple[list[str], list[str]]:
    """(device of each learner rank, device of each inference server). With --device auto (or cuda) and
    GPUs visible, learner rank r goes to cuda:r and server k to cuda:(k mod #GPUs), so K = M = G puts one
    server and one learner rank on each GPU; --learner-devices / --inference-devices override. One of each
    (the default) is as before: both on --device, the server on --inference-device if given."""
    w, base, gpus = args.workers, args.experiment.device, torch.cuda.device_count()
    spread = base in ("auto", "cuda") and gpus > 0
    if w.learner_devices:
        learner = list(w.learner_devices)
    elif spread:
        learner = [f"cuda:{r % gpus}" for r in range(w.num_learners)]
    else:
        learner = ["cpu" if base == "auto" else base] * w.num_learners
    if w.inference_devices:
        listed = list(w.inference_devices)
    elif args.experiment.inference_device:
        listed = [args.experiment.inference_device]
    elif spread:
        listed = [f"cuda:{k}" for k in range(min(w.num_inference_servers, gpus))]
    else:
        listed = ["cpu" if base == "auto" else base]
    inference = [listed[k % len(listed)] for k in range(w.num_inference_servers)]
    # "cuda" means the first GPU: processes pin an explicit index
    return [d + ":0" if d == "cuda" else d for d in learner], [d + ":0" if d == "cuda" else d for d in inference]


def placement_problems(args: Args) -> list[str]:
    """Bad combinations of the placement options (derive_and_check reports them)."""
    w, problems = args.workers, []
    if w.num_inference_servers < 1 or w.num_learners < 1:
        return ["--num-inference-servers and --num-learners must be >= 1"]
    if len(w.inference_devices) > w.num_inference_servers:
        problems.append(f"--inference-devices names {len(w.inference_devices)} devices for {w.num_inference_servers} "
                        f"server(s): set --num-inference-servers {len(w.inference_devices)} or name fewer devices")
    if w.learner_devices and len(w.learner_devices) != w.num_learners:
        problems.append(f"--learner-devices names {len(w.learner_devices)} devices for {w.num_learners} learner(s): "
                        f"name one per rank or set --num-learners {len(w.learner_devices)}")
    clients = (0 if args.experiment.eval_only else w.num_env_workers + args.wm.num_imagination_workers) \
        + w.num_eval_workers
    if w.num_inference_servers > clients:
        problems.append(f"--num-inference-servers {w.num_inference_servers} but only {clients} env/eval worker(s) send "
                        "requests (a server without clients idles): lower it or raise --num-env-workers")
    if w.num_learners > 1 and args.experiment.mode == "serial":
        problems.append("--num-learners > 1 needs --mode async or sync (serial mode runs one process)")
    if problems:
        return problems
    learner, inference = resolve_devices(args)
    problems = device_problems("--learner-devices", learner) + device_problems("--inference-devices", inference)
    if problems:
        return problems
    if len({torch.device(d).type for d in learner}) > 1:
        problems.append(f"learner ranks on {learner}: all on GPUs (NCCL) or all on the CPU (gloo), not mixed")
    cuda_ranks = [str(torch.device(d)) for d in learner if torch.device(d).type == "cuda"]
    if len(set(cuda_ranks)) < len(cuda_ranks):
        problems.append(f"learner ranks on {learner}: NCCL runs one rank per GPU; name distinct --learner-devices "
                        "or lower --num-learners")
    return problems


def device_problems(flag: str, devices: list[str]) -> list[str]:
    """Devices that torch cannot name or does not see."""
    problems, gpus = [], torch.cuda.device_count()
    for d in dict.fromkeys(devices):
        try:
            device = torch.device(d)
        except RuntimeError:
            problems.append(f"{flag}: {d!r} is not a device (cpu, cuda, cuda:N)")
            continue
        if device.type == "cuda" and (device.index or 0) >= gpus:
            problems.append(f"{flag}: {d} but torch sees {gpus} GPU(s){f' (cuda:0..{gpus - 1})' if gpus else ''}: "
                            "place fewer processes, name visible devices, or use --device cpu")
    return problems


def env_options(args: Args) -> dict:
    family, _ = parse_task(args.env.task)
    extra = json.loads(args.env.env_options)
    if family == "tabletop2d":
        return {"step_cost_ms": args.env.step_cost_ms, "step_cost_kind": args.env.step_cost_kind, **extra}
    options = {"init_states": args.env.init_states}
    inference = args.experiment.inference_device or args.experiment.device
    if inference.startswith("cuda") or (inference == "auto" and torch.cuda.is_available()):
        # render on the inference GPU, found by its CUDA index in EGL's own device order
        options["render_cuda_device"] = int(inference.split(":")[1]) if ":" in inference else 0
    return {**options, **extra}


def derive_seed(seed: int, *path: int) -> int:
    """Deterministic, well-spread seeds per (role, rank, instance, ...) (style.md rule 8)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


# ===================================================================================================
# Process roles. Each role is an object with step() (one unit of work, waiting at most `poll_s`) and
# close(); a process runs one role in a loop, serial mode steps all roles in one loop.
# ===================================================================================================
@dataclass
class Channels:
    """The queues. Their names say what they carry; all are bounded."""

    requests: list  # per inference server k: (client, env_index, segment, rows, greedy) -> inference_k
    actions: list  # per client: (env_index, segment, rows) <- inference; outputs are in storage
    free_segments: object  # segment ids an env worker may fill
    full_segments: object  # filled segment ids for the learner (rank 0)
    learner_shares: list  # per learner rank r >= 1: its segment ids of the next update ([]: stop)
    eval_jobs: object  # (round, task_id, episode_seed) for eval workers
    stats: object  # (kind, role, payload) for the main process
    imagined_free_segments: object = None  # segment ids an imagination worker may fill
    imagined_full_segments: object = None  # filled imagined segment ids for the learner (never waited for)
    wm_requests: object = None  # (imagination worker w, slot) -> world_model; the request is in the slot
    wm_replies: list = field(default_factory=list)  # per imagination worker: slot <- world_model


def inference_server_of(client: int, args: Args) -> int:
    """Round-robin placement: client c (env worker i is client i, eval worker j is client
    num_env_workers + j, imagination worker w is client num_env_workers + num_eval_workers + w) sends its
    requests to inference server c mod K."""
    return client % args.workers.num_inference_servers


def imagination_client(w: int, args: Args) -> int:
    """Client id of imagination worker w: after the env and eval workers."""
    return args.workers.num_env_workers + args.workers.num_eval_workers + w


def numbered(role: str, count: int) -> list[str]:
    """Process names of a role with `count` processes: `role` alone, else `role_0..count-1`."""
    return [role] if count == 1 else [f"{role}_{i}" for i in range(count)]


@dataclass
class Shared:
    """Everything shared by all roles besides the queues."""

    storage: RolloutStorage
    weights: WeightBroadcast
    counters: Counters
    heartbeats: Heartbeats
    train_stop: object  # event: env workers and learner finish
    stop: object  # event: everybody finishes
    replay: StepReplay | None = None  # recent real steps (world-model training, imagined starts)
    wm_slots: ImaginationSlots | None = None  # world-model requests and replies, one slot per imagined env
    wm_weights: WeightBroadcast | None = None  # learner -> world_model (online training)


class TaskCurriculum:
    """Task choice at reset weighted by (recent failures + 1) per task (reference.md section 2)."""

    def __init__(self, num_tasks: int, rng: np.random.Generator, window: int = 20):
        self.rng = rng
        self.recent = [deque(maxlen=window) for _ in range(num_tasks)]

    def sample(self) -> int:
        weights = np.array([sum(1 for ok in r if not ok) + 1.0 for r in self.recent])
        return int(self.rng.choice(len(weights), p=weights / weights.sum()))

    def record(self, task_id: int, success: bool) -> None:
        self.recent[task_id].append(bool(success))


@dataclass
class EnvState:
    """Book-keeping of one env inside an env worker."""

    env: object
    task_id: int = 0
    segment: int = -1
    episode_return: float = 0.0
    episode_env_steps: int = 0
    episode_start_row: int = 0
    awaiting_version: int | None = None  # sync mode: wait for these weights before acting again
    restarts: int = 0


@dataclass
class RolloutSource:
    """Where an env worker's episodes come from and where its segments go: all that differs between
    `env_worker_i` (the simulator) and `imagination_worker_w` (envs imagined by the world model). The
    rollout code, EnvWorker, is the same for both and never asks which one it runs (style.md rule 3)."""

    role: str  # "env_worker" | "imagination_worker": the process is <role>_<rank>, its perf tags perf/<role>_*
    client: int  # inference client id (its reply queue actions[client], its server client mod K), Counters row
    num_envs: int
    build_env: Callable[[int, int], object]  # (env index, seed) -> a TaskEnv
    seed_stream: int  # derive_seed path component of its envs and its task choice
    free_segments: str  # the Channels queues its segments cycle through
    full_segments: str
    counters: tuple[str, str, str, str]  # Counters names of its env steps, chunk steps, episodes, env rebuilds
    episode_stat: str  # stats kind of a finished episode
    replay_envs_from: int | None = None  # record every step into shared.replay as envs from here (None: off)
    drop_oldest: bool = False  # no free segment: overwrite the oldest full one the learner has not taken
    batch_chunks: bool = False  # its envs have submit_chunk / finish_chunk: the chunks of all replies that are
    #                             ready go out together (one world-model batch) before any is waited for


class RealEnvs:
    """`build_env` of env workers: the simulator of --task (picklable: built inside the worker)."""

    def __init__(self, args: Args):
        self.args = args

    def __call__(self, index: int, seed: int):
        a = self.args
        return make_env(a.env.task, image_size=a.policy.image_size, wrist_camera=a.env.wrist_camera, seed=seed,
                        **env_options(a))


def real_rollouts(rank: int, args: Args) -> RolloutSource:
    """env_worker_i: the simulator; every step also goes to the replay when the world model needs it."""
    E = args.workers.envs_per_worker
    return RolloutSource(
        role="env_worker", client=rank, num_envs=E, build_env=RealEnvs(args), seed_stream=1,
        free_segments="free_segments", full_segments="full_segments",
        counters=("global_env_step", "chunk_step", "episodes", "env_restarts"), episode_stat="episode",
        replay_envs_from=rank * E if uses_replay(args) else None,
        drop_oldest=args.workers.when_learner_behind == "drop-oldest")


class ImaginedEnvs:
    """`build_env` of imagination worker w: ImaginedEnvs (world_model.py) with the real envs' chunked
    contract. Env i asks the world model through its own slot: served by the `world_model` process
    (ServedWorldModel), or, in serial mode, in-process (LocalWorldModel, loading what the learner
    publishes). Episodes start where --wm-start says, last at most --imagine-horizon chunk steps."""

    def __init__(self, w: int, args: Args, spec: EnvSpec, shared: Shared, chan: Channels, serial: bool,
                 poll_s: float):
        self.w, self.args, self.spec, self.shared, self.chan = w, args, spec, shared, chan
        self.serial, self.poll_s = serial, poll_s
        self.contexts, self.model = None, None  # one per worker, built with its first env
        self.arrived: set = set()  # world-model replies read by one env's wait for another's (one reply queue)

    def _start_contexts(self, cfg, seed: int):
        a = self.args
        if a.wm.wm_start == "demos":
            return ContextBank(read_episodes(a.wm.wm_demos, cfg.image_size), self.spec.instructions,
                               cfg.context_frames)
        real = make_env(a.env.task, image_size=a.policy.image_size, seed=seed, **env_options(a))
        resets = RealResetContexts(real, cfg.context_frames)
        return resets if a.wm.wm_start == "reset" else ReplayContexts(self.shared.replay, resets)

    def __call__(self, index: int, seed: int):
        a = self.args
        cfg = load_config(a.wm.wm_checkpoint)
        if self.contexts is None:
            self.contexts = self._start_contexts(cfg, derive_seed(seed, 1))
        if self.serial:
            if self.model is None:
                self.model = LocalWorldModel(WorldModel.load(a.wm.wm_checkpoint), self.shared.wm_weights)
            client = self.model
        else:
            client = ServedWorldModel(cfg, self.w, self.w * a.wm.imagined_envs_per_worker + index, self.shared.wm_slots,
                                      self.chan.wm_requests, self.chan.wm_replies[self.w], a.workers.wait_timeout_s,
                                      self.poll_s, should_stop=self.shared.train_stop.is_set, arrived=self.arrived)
        return ImaginedEnv(self.spec, client, self.contexts, a.wm.imagine_horizon * a.policy.chunk_len, seed=seed)


def imagined_rollouts(w: int, args: Args, spec: EnvSpec, shared: Shared, chan: Channels, serial: bool,
                      poll_s: float) -> RolloutSource:
    """imagination_worker_w: the world model's envs, their own segment pool and counters."""
    return RolloutSource(
        role="imagination_worker", client=imagination_client(w, args), num_envs=args.wm.imagined_envs_per_worker,
        build_env=ImaginedEnvs(w, args, spec, shared, chan, serial, poll_s), seed_stream=6,
        free_segments="imagined_free_segments", full_segments="imagined_full_segments",
        counters=("imagined_env_step", "imagined_chunk_step", "imagined_episodes", "imagined_env_restarts"),
        episode_stat="imagined_episode", batch_chunks=True)


class EnvWorker:
    """`env_worker_i`: owns envs, no model. Writes observations into storage rows, asks inference for
    an action chunk, executes it step by step, records the chunk's summed reward, terminated and
    truncated; hands full segments to the learner. `imagination_worker_w` is this same code on envs the
    world model imagines (its RolloutSource)."""

    def __init__(self, rank: int, args: Args, spec: EnvSpec, shared: Shared, chan: Channels, poll_s: float,
                 seed_offset: int = 0, source: RolloutSource | None = None):
        self.rank, self.args, self.spec, self.shared, self.chan, self.poll_s = rank, args, spec, shared, chan, poll_s
        self.source = src = source or real_rollouts(rank, args)
        self.name = f"{src.role}_{rank}"
        self.client = src.client
        self.requests = chan.requests[inference_server_of(src.client, args)]
        self.free_segments, self.full_segments = getattr(chan, src.free_segments), getattr(chan, src.full_segments)
        self.T = args.workers.segment_len
        self.seed_offset = seed_offset
        self.rng = np.random.default_rng(derive_seed(args.experiment.seed, src.seed_stream, rank, seed_offset))
        self.curriculum = TaskCurriculum(spec.num_tasks, self.rng)
        self.pinned_task = parse_task(args.env.task)[1]
        # the policy's own tokenizer (no model needed): its ids are what the policy reads
        tokenizer = make_tokenizer(args.policy)
        self.instructions = tokenizer.encode(list(spec.instructions), args.policy.max_instruction_tokens)
        self.getter = TimedGet(self.name, args.workers.wait_timeout_s)
        self.envs = [EnvState(env=self._build_env(i, 0)) for i in range(src.num_envs)]
        self.sim_s, self.last_report = 0.0, time.perf_counter()
        self.held: list = []  # serial mode: action replies that wait for a free segment
        for i in range(len(self.envs)):
            self._start_first_segment(i)

    # -- env life cycle --------------------------------------------------------------------------
    def _build_env(self, index: int, restart: int):
        seed = derive_seed(self.args.experiment.seed, self.source.seed_stream, self.rank, index, restart,
                           self.seed_offset)
        return self.source.build_env(index, seed)

    def _reset(self, i: int) -> dict:
        e = self.envs[i]
        e.task_id = self.pinned_task if self.pinned_task is not None else self.curriculum.sample()
        e.episode_return, e.episode_env_steps = 0.0, 0
        return e.env.reset(task_id=e.task_id)

    def _segment_ready(self) -> bool:
        """_take_free_segment would return at once (serial mode asks before it would block)."""
        return not self.free_segments.empty() or (self.source.drop_oldest and not self.full_segments.empty())

    def _take_free_segment(self) -> int:
        while True:
            if self.source.drop_oldest:  # a free segment, else the oldest full one (the learner is behind)
                for segments in (self.free_segments, self.full_segments):
                    try:
                        seg = segments.get_nowait()
                    except queue.Empty:
                        continue
                    if segments is self.full_segments:
                        self.shared.counters.add(self.client, "dropped_segments", 1)
                    return seg
            seg = self.getter.get(self.free_segments, "learner (no free segment)", max(self.poll_s, 0.1))
            if seg is not None:
                return seg
            if self.shared.train_stop.is_set():
                raise _Stopping()

    def _start_first_segment(self, i: int) -> None:
        e = self.envs[i]
        e.segment = self._take_free_segment()
        obs = self._reset(i)
        self._write_obs(e, 0, obs)
        e.episode_start_row = 0
        self._request(i, (0,))

    def _write_obs(self, e: EnvState, row: int, obs: dict) -> None:
        self.shared.storage.write_observation(e.segment, row, obs, self.spec.cameras,
                                              self.instructions[e.task_id], e.task_id)

    def _request(self, i: int, rows: tuple[int, ...]) -> None:
        self.requests.put((self.client, i, self.envs[i].segment, rows, False), timeout=self.args.workers.wait_timeout_s)

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> None:
        if self.args.experiment.mode == "sync":
            self._resume_envs_with_new_weights()
        if time.perf_counter() - self.last_report > 5.0:
            self._report()
        replies = self.held or [self.getter.get(self.chan.actions[self.client], "inference", self.poll_s)]
        if replies[0] is None:
            return
        self.held = []
        if self.source.batch_chunks:  # and every other reply already here: their chunks run as one batch
            replies += self._ready_replies()
        chunks = []
        for k, (i, seg, rows) in enumerate(replies):
            if self.poll_s == 0 and rows[0] == self.T and not self._segment_ready():
                # serial mode: the roles take turns, and only the learner's turn frees a segment (it may be
                # waiting for imagined ones): keep the replies for a later turn instead of blocking the only thread
                self.held = replies[k:]
                break
            row = self._accept_reply(i, seg, rows)
            if row is not None:
                chunks.append((i, row))
        if self.source.batch_chunks:  # send them all, then wait for each
            chunks = [(i, row) for i, row in chunks if self._submit_chunk(i, row)]
        for i, row in chunks:
            self._execute_chunk(i, row, submitted=self.source.batch_chunks)

    def _ready_replies(self) -> list:
        ready = []
        while True:
            try:
                ready.append(self.chan.actions[self.client].get_nowait())
            except queue.Empty:
                return ready

    def _accept_reply(self, i: int, seg: int, rows: tuple[int, ...]) -> int | None:
        """The row whose action chunk env i executes next (None: none now, sync mode waits for weights)."""
        e, storage = self.envs[i], self.shared.storage
        if len(rows) == 2:  # the second row held the final observation of a truncated episode
            storage.trunc_value[seg, rows[0] - 1] = storage.value[seg, rows[1]]
        row = rows[0]
        if row == self.T:  # the bootstrap row is evaluated: the segment is complete
            # sync: wait for the update this segment feeds. Read the version before handing the segment over:
            # read after, the learner may already have published that update (the last segment it waited for),
            # and the env would wait for one more, which needs its own next segment: a deadlock
            version = self.shared.weights.published_version()
            row = self._finish_segment(i)
            if self.args.experiment.mode == "sync":
                e.awaiting_version = version + 1
                return None
        return row

    def _report(self) -> None:
        elapsed = time.perf_counter() - self.last_report
        role = self.source.role
        self.chan.stats.put(("perf", self.name, {
            f"perf/{role}_sim_fraction": self.sim_s / elapsed,
            f"perf/{role}_wait_fraction": self.getter.pop_waited() / elapsed}))
        self.sim_s, self.last_report = 0.0, time.perf_counter()

    def _finish_segment(self, i: int) -> int:
        """Row T becomes row 0 of the env's next segment; the full segment goes to the learner."""
        e, storage = self.envs[i], self.shared.storage
        new_segment = self._take_free_segment()
        storage.copy_row((e.segment, self.T), (new_segment, 0))
        self.full_segments.put(e.segment, timeout=self.args.workers.wait_timeout_s)
        e.segment, e.episode_start_row = new_segment, 0
        return 0

    def _resume_envs_with_new_weights(self) -> None:
        version = self.shared.weights.published_version()
        for i, e in enumerate(self.envs):
            if e.awaiting_version is not None and version >= e.awaiting_version:
                e.awaiting_version = None
                self._request(i, (0,))  # re-evaluate row 0 with the new weights (on-policy)

    def _submit_chunk(self, i: int, row: int) -> bool:
        """Batched envs (imagined): send env i's chunk without waiting; False if the env raised (rebuilt)."""
        e = self.envs[i]
        start = time.perf_counter()
        try:
            e.env.submit_chunk(self.shared.storage.actions[e.segment, row].numpy())
        except InterruptedError:
            raise _Stopping()
        except Exception:
            self._restart_env(i, row, traceback.format_exc())
            return False
        self.sim_s += time.perf_counter() - start
        return True

    def _execute_chunk(self, i: int, row: int, submitted: bool = False) -> None:
        e, storage, T = self.envs[i], self.shared.storage, self.T
        actions = storage.actions[e.segment, row].numpy()
        record = self.source.replay_envs_from is not None
        start = time.perf_counter()
        try:
            if submitted:
                obs, reward, terminated, truncated, info = e.env.finish_chunk(record=record)
            else:
                obs, reward, terminated, truncated, info = e.env.step_chunk(actions, record=record)
        except InterruptedError:  # the env's wait noticed the stop flag
            raise _Stopping()
        except Exception:  # simulators raise: rebuild the env, drop the episode, go on
            self._restart_env(i, row, traceback.format_exc())
            return
        self.sim_s += time.perf_counter() - start
        seg = e.segment
        if record:
            self._record_steps(i, row, actions, info, bool(terminated))
        storage.reward[seg, row] = reward
        storage.terminated[seg, row] = bool(terminated)
        if terminated:
            storage.achieved_task[seg, row] = int(info.get("achieved_task", -1))
        storage.truncated[seg, row] = bool(truncated)
        storage.env_steps[seg, row] = info["env_steps"]
        counters, (env_steps, chunk_steps, episodes, _) = self.shared.counters, self.source.counters
        counters.add(self.client, env_steps, info["env_steps"])
        counters.add(self.client, chunk_steps, 1)
        e.episode_return += reward
        e.episode_env_steps += info["env_steps"]
        if terminated or truncated:
            success = bool(info.get("success", False))
            counters.add(self.client, episodes, 1)
            self.curriculum.record(e.task_id, success)
            self.chan.stats.put((self.source.episode_stat, self.name, {
                "return": e.episode_return, "length": e.episode_env_steps, "success": success,
                "task_id": e.task_id, "truncated": bool(truncated)}))
            if truncated:
                # the truncated step bootstraps with V(final observation), under the ended episode's
                # instruction: write it before the reset picks the next task, evaluate it alongside
                self._write_obs(e, T + 1, obs)
            obs = self._reset(i)
            e.episode_start_row = row + 1
        self._write_obs(e, row + 1, obs)
        if truncated:
            self._request(i, (row + 1, T + 1))
        else:
            self._request(i, (row + 1,))

    def _record_steps(self, i: int, row: int, actions: np.ndarray, info: dict, terminated: bool) -> None:
        """Every executed step into the replay: the frame and proprio before the action (the chunk's first
        from its storage row, the others from info), the action, and whether success (and the episode's
        termination, for any reason) followed it."""
        e, storage, replay = self.envs[i], self.shared.storage, self.shared.replay
        n = info["env_steps"]
        frames = [storage.images[e.segment, row, 0].numpy(), *info["frames"][:n - 1]]
        proprio = [storage.proprio[e.segment, row, :self.spec.proprio_dim].numpy(), *info["proprio"][:n - 1]]
        for j in range(n):
            last = j == n - 1
            replay.add(self.source.replay_envs_from + i, frames[j], actions[j], e.task_id, e.episode_env_steps + j,
                       bool(info["success"]) and last, proprio[j], terminated=terminated and last)

    def _restart_env(self, i: int, row: int, tb: str) -> None:
        e, storage = self.envs[i], self.shared.storage
        e.restarts += 1
        log(self.name, f"env {i} raised; rebuilding it and dropping the episode:\n{tb}")
        self.shared.counters.add(self.client, self.source.counters[3], 1)
        try:
            e.env.close()
        except Exception:
            pass
        e.env = self._build_env(i, e.restarts)
        # the dropped episode's rows are masked out; a boundary after them stops GAE from crossing
        storage.valid[e.segment, e.episode_start_row: row + 1] = False
        storage.truncated[e.segment, row] = True
        storage.trunc_value[e.segment, row] = 0.0
        storage.reward[e.segment, row] = 0.0
        obs = self._reset(i)
        e.episode_start_row = row + 1
        self._write_obs(e, row + 1, obs)
        self._request(i, (row + 1,))

    def close(self) -> None:
        for e in self.envs:
            try:
                e.env.close()
            except Exception:
                pass


class EvalWorker:
    """`eval_worker_j`: greedy episodes on the real env for jobs from main; never feeds the learner."""

    def __init__(self, rank: int, client: int, args: Args, spec: EnvSpec, shared: Shared, chan: Channels,
                 poll_s: float, segment: int, video_dir: Path | None = None, video_frames: int = 64):
        self.rank, self.client, self.args, self.spec, self.shared, self.chan = rank, client, args, spec, shared, chan
        self.poll_s, self.segment = poll_s, segment
        self.name = f"eval_worker_{rank}"
        self.requests = chan.requests[inference_server_of(client, args)]
        tokenizer = make_tokenizer(args.policy)  # as the env workers
        self.instructions = tokenizer.encode(list(spec.instructions), args.policy.max_instruction_tokens)
        self.restarts = 0
        self.env = self._build_env(0)
        self.getter = TimedGet(self.name, args.workers.wait_timeout_s)
        self.job = None
        self.video_dir, self.video_frames = video_dir, video_frames
        self.recorded: set[tuple[int, int]] = set()
        self.frames: list[np.ndarray] = []

    def _build_env(self, restart: int):
        options = env_options(self.args)
        if "init_states" in options:
            options["init_states"] = "fixed"  # evaluation always uses the suite's fixed initial states
        return make_env(parse_task(self.args.env.task)[0], image_size=self.args.policy.image_size,
                        wrist_camera=self.args.env.wrist_camera,
                        seed=derive_seed(self.args.experiment.seed, 2, self.rank, restart),
                        **options)

    def step(self) -> None:
        if self.job is None:
            job = self.getter.get(self.chan.eval_jobs, "main (eval jobs)", self.poll_s, idle_ok=True)
            if job is None:
                return
            self.job = job
            round_id, task_id, episode_seed = job
            self.task_id, self.ret, self.env_steps = task_id, 0.0, 0
            try:
                obs = self.env.reset(task_id=task_id, seed=episode_seed)
            except Exception:
                self._restart_env(traceback.format_exc())
                return
            # record the first episode of each task in each round (frames go to a file, never a queue)
            record = self.video_dir is not None and (round_id, task_id) not in self.recorded
            self.frames = [obs["image"]] if record else []
            if record:
                self.recorded.add((round_id, task_id))
            self._observe(obs)
            return
        msg = self.getter.get(self.chan.actions[self.client], "inference", self.poll_s)
        if msg is None:
            return
        storage = self.shared.storage
        try:
            obs, reward, terminated, truncated, info = self.env.step_chunk(storage.actions[self.segment, 0].numpy())
        except Exception:
            self._restart_env(traceback.format_exc())
            return
        self.ret += reward
        self.env_steps += info["env_steps"]
        if self.frames and len(self.frames) < self.video_frames:
            self.frames.append(obs["image"])
        if terminated or truncated:
            round_id = self.job[0]
            payload = {"round": round_id, "task_id": self.task_id, "success": bool(info.get("success", False)),
                       "return": self.ret, "length": self.env_steps,
                       "version": int(storage.version[self.segment, 0])}
            if self.frames:
                self.video_dir.mkdir(parents=True, exist_ok=True)
                path = self.video_dir / f"round{round_id}_task{self.task_id}_{self.name}.npy"
                np.save(path, np.stack(self.frames))
                payload["video"] = str(path)
                self.frames = []
            self.chan.stats.put(("eval_episode", self.name, payload))
            self.job = None
            return
        self._observe(obs)

    def _restart_env(self, tb: str) -> None:
        """A simulator exception: rebuild the env and run the same job again from its start."""
        self.restarts += 1
        log(self.name, f"env raised; rebuilding it and repeating job {self.job}:\n{tb}")
        if self.restarts > 100:
            raise RuntimeError(f"{self.name}: the env raised {self.restarts} times; giving up")
        try:
            self.env.close()
        except Exception:
            pass
        self.env = self._build_env(self.restarts)
        self.chan.eval_jobs.put(self.job)
        self.job, self.frames = None, []

    def _observe(self, obs: dict) -> None:
        self.shared.storage.write_observation(self.segment, 0, obs, self.spec.cameras,
                                              self.instructions[self.task_id], self.task_id)
        self.requests.put((self.client, 0, self.segment, (0,), True), timeout=self.args.workers.wait_timeout_s)

    def close(self) -> None:
        self.env.close()


class InferenceServer:
    """`inference` (or `inference_k` of K): a policy copy in eval mode with dynamic batching: one batched
    forward when --max-batch observations wait or the oldest has waited --batch-timeout-ms (sync mode: when
    every env it serves waits). Samples (greedy for eval requests); writes action tokens, continuous
    actions, behaviour log-probs, the value and the policy version into storage; never waits for the
    learner. Server k serves the clients c with c mod K = k, from its own request queue."""

    def __init__(self, args: Args, shared: Shared, chan: Channels, poll_s: float, device: str, rank: int = 0):
        self.args, self.shared, self.chan, self.poll_s = args, shared, chan, poll_s
        self.name = numbered("inference", args.workers.num_inference_servers)[rank]
        self.requests = chan.requests[rank]
        # sync mode flushes once every env this server serves waits
        self.num_train_envs = args.workers.envs_per_worker * sum(
            1 for i in range(args.workers.num_env_workers) if inference_server_of(i, args) == rank)
        self.device = torch.device(device)
        torch.manual_seed(derive_seed(args.experiment.seed, 3, *((rank,) if rank else ())))  # server 0: as with K = 1
        if frozen_base_from_checkpoint(args.policy):  # the frozen base from disk, the trainable tensors published
            self.policy = make_policy(args.policy).to(self.device).eval()
        else:  # every weight comes from the learner's first publication
            with torch.device("meta"):
                policy = make_policy(args.policy)
            self.policy = policy.to_empty(device=self.device).eval()
        self.params = dict(self.policy.named_parameters())
        self.params.update(dict(self.policy.named_buffers()))
        self.proprio_dim = policy_proprio_dim(self.policy)
        self.version = -1
        self.pending: list[tuple[tuple, float]] = []
        self.getter = TimedGet(self.name, args.workers.wait_timeout_s)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.algorithm.bf16)
        self.perf = defaultdict(list)
        self.last_report = time.time()
        self.busy_s = 0.0

    def _maybe_load_weights(self) -> None:
        published = self.shared.weights.published_version()
        if published > self.version:
            # a full copy the first time, then only what the learner re-publishes (trainable tensors)
            version = self.shared.weights.read_into(self.params, only_refreshed=self.version >= 0)
            if version is not None:
                self.version = version

    def step(self) -> None:
        self._maybe_load_weights()
        if self.version < 0:  # nothing published yet: the learner is still starting
            time.sleep(min(self.poll_s, 0.05))
            return
        now = time.perf_counter()
        if self.pending:
            wait = max(0.0, self.pending[0][1] + self.args.workers.batch_timeout_ms / 1000 - now)
            timeout = min(wait, self.poll_s) if self.poll_s > 0 else 0.0
        else:
            timeout = self.poll_s
        msg = self.getter.get(self.requests, "env workers", timeout, idle_ok=True)
        while msg is not None:
            self.pending.append((msg, time.perf_counter()))
            if self._rows_pending() >= self.args.workers.max_batch * 4:
                break
            try:
                msg = self.requests.get_nowait()
            except queue.Empty:
                msg = None
        if self._should_flush():
            self._flush()
        if time.time() - self.last_report > 5.0:
            self._report()

    def _rows_pending(self) -> int:
        return sum(len(m[3]) for m, _ in self.pending)

    def _should_flush(self) -> bool:
        if not self.pending:
            return False
        oldest_wait = time.perf_counter() - self.pending[0][1]
        # sync: lockstep until training stops; then an env worker may have left with its request still here (the
        # other env's never comes), and the final evaluation's requests must not wait behind it forever
        if self.args.experiment.mode == "sync" and not self.shared.train_stop.is_set():
            training = sum(1 for m, _ in self.pending if not m[4])
            evals = len(self.pending) - training
            return training >= self.num_train_envs or (evals > 0 and training == 0 and
                                                       oldest_wait * 1000 >= self.args.workers.batch_timeout_ms)
        return (len(self.pending) >= self.args.workers.max_batch
                or oldest_wait * 1000 >= self.args.workers.batch_timeout_ms)

    @torch.no_grad()
    def _flush(self) -> None:
        # sync: everything that waits goes in one batch (a partial flush would put envs out of phase)
        limit = len(self.pending) if self.args.experiment.mode == "sync" else self.args.workers.max_batch
        batch, self.pending = self.pending[:limit], self.pending[limit:]
        storage = self.shared.storage
        segs = torch.tensor([m[2] for m, _ in batch for _ in m[3]])
        rows = torch.tensor([r for m, _ in batch for r in m[3]])
        greedy = torch.tensor([m[4] for m, _ in batch for _ in m[3]], device=self.device)
        start = time.perf_counter()
        images = storage.images[segs, rows].to(self.device, non_blocking=True)
        instructions = storage.instruction[segs, rows].to(self.device, non_blocking=True)
        proprio = proprio_input(self.proprio_dim, storage.proprio[segs, rows], self.device)
        with self.autocast:
            out = self.policy.act(images, instructions, greedy, **proprio)
        storage.action_tokens[segs, rows] = out["action_tokens"].cpu()
        # The one place actions go to the envs: act()["actions"] is in the env contract's convention for every
        # backend (envs/__init__.py: [-1, 1] per dim, gripper > 0 closes; each env de-normalises with its own
        # statistics). VLAPolicy: its bin centres. OpenVLA-OFT: the model's output normalised with its dataset
        # statistics, gripper mapped x -> 1 - 2x (OpenVLAOFTPolicy.to_env_actions), NOT de-normalised
        # (unnormalize_actions is not used here); derive_and_check refused statistics other than the env's.
        storage.actions[segs, rows] = out["actions"].float().cpu()
        storage.logp[segs, rows] = out["logp"].float().cpu()
        storage.log_probs[segs, rows] = out["log_probs"].to(torch.float16).cpu()
        storage.value[segs, rows] = out["value"].float().cpu()
        storage.version[segs, rows] = self.version
        done = time.perf_counter()  # the .cpu() copies waited for the device: done - start is its busy time
        for (client, env_index, seg, msg_rows, _), _ in batch:
            self.chan.actions[client].put((env_index, seg, msg_rows))
        self.busy_s += done - start
        self.perf["batch_size"].append(len(rows))
        self.perf["forward_ms"].append((done - start) * 1000)
        self.perf["latency_ms"].extend((done - t0) * 1000 for _, t0 in batch)

    def _report(self) -> None:
        elapsed = time.time() - self.last_report
        if self.perf["batch_size"]:
            self.chan.stats.put(("perf", self.name, {
                "perf/inference_batch_size": float(np.mean(self.perf["batch_size"])),
                "perf/inference_forward_ms": float(np.median(self.perf["forward_ms"])),
                "perf/inference_latency_ms": float(np.median(self.perf["latency_ms"])),
                "perf/inference_per_s": float(np.sum(self.perf["batch_size"]) / elapsed),
                "perf/inference_busy_fraction": self.busy_s / elapsed,
                "perf/inference_version": float(self.version)}))
        elif self.version >= 0:  # an idle window counts in the busy fraction too
            self.chan.stats.put(("perf", self.name, {"perf/inference_busy_fraction": 0.0}))
        self.perf.clear()
        self.busy_s = 0.0
        self.last_report = time.time()

    def close(self) -> None:
        pass


class _Stopping(Exception):
    """Raised inside a role's step when it notices the stop flag while waiting."""


# ===================================================================================================
# Advantages and the objective (reference.md section 4)
# ===================================================================================================
def hindsight_copies(batch: dict[str, torch.Tensor], instructions: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """--hindsight-relabel: copies of the segments (N, T) that hold an episode which terminated meeting another
    task j's goal (batch["achieved_task"] at its last row), with task j's instruction tokens on that episode's
    rows (from its first row in the segment to its end), reward 1.0 at its end and `mask` on those rows only.
    Everything else (images, actions, behaviour log-probs) is the row as collected; the per-segment bootstrap_*
    fields are left out. None: no such episode."""
    ends = batch["terminated"] & (batch["achieved_task"] >= 0) & (batch["achieved_task"] != batch["task_id"])
    segments = torch.nonzero(ends.any(1)).squeeze(1)
    if len(segments) == 0:
        return None
    copies = {k: v[segments].clone() for k, v in batch.items() if not k.startswith("bootstrap")}
    ends, achieved = ends[segments], copies["achieved_task"]
    episode_end = copies["terminated"] | copies["truncated"]
    task = torch.full_like(achieved, -1)  # the relabelled task of each row's episode, -1: not relabelled
    following = torch.full((len(segments),), -1, dtype=torch.long)
    for t in reversed(range(task.shape[1])):  # each row takes the task of the episode end that follows it
        following = torch.where(episode_end[:, t], torch.where(ends[:, t], achieved[:, t], -1), following)
        task[:, t] = following
    rows = task >= 0
    copies["instruction"][rows] = instructions[task[rows]]
    copies["task_id"] = torch.where(rows, task, copies["task_id"])
    copies["reward"] = torch.where(ends, 1.0, copies["reward"])
    copies["mask"] = copies["mask"] & rows
    return copies


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, bootstrap: torch.Tensor, terminated: torch.Tensor,
                truncated: torch.Tensor, trunc_values: torch.Tensor, gamma: float, lam: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over segments (N, T) of chunk steps.

    The successor value of step t is V(obs t+1), or `bootstrap` after the last step; 0 after a
    termination; V(final observation) after a truncation (the time limit is not part of the task, so
    the truncated state is bootstrapped, not treated as terminal: CleanRL PR #576). The recursion is cut
    at every episode end so advantages never leak across resets.
    """
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(bootstrap)
    for t in reversed(range(T)):
        next_value = bootstrap if t == T - 1 else values[:, t + 1]
        next_value = torch.where(truncated[:, t], trunc_values[:, t], next_value)
        next_value = torch.where(terminated[:, t], torch.zeros_like(next_value), next_value)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        continues = (~(terminated[:, t] | truncated[:, t])).to(rewards.dtype)
        last = delta + gamma * lam * continues * last
        advantages[:, t] = last
    return advantages, advantages + values


def gipo_trust_weight(ratio: torch.Tensor, sigma: float) -> torch.Tensor:
    """w = exp(-(ln rho)^2 / (2 sigma^2)) on the stop-gradient ratio, clamped >= 1e-9 (GIPO eq. for w)."""
    log_ratio = torch.log(ratio.detach().clamp_min(1e-9))
    return torch.exp(-log_ratio.square() / (2 * sigma**2))


MAX_LOG_RATIO = 20.0
"""|ln rho| bound inside the objectives (a float32 guard, see policy_objective)."""


def policy_objective(loss: str, logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                     algo: AlgorithmArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token surrogate loss (to be averaged over all action tokens) and its trust diagnostics.

    logp, behaviour_logp: (..., tokens); advantages broadcast to them (a chunk's 56 tokens share it).
    gipo:     -w * rho * A            (gradient w * rho * A * grad log pi; w * rho <= exp(sigma^2 / 2))
    ppo-clip: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)
    sapo:     -(4 / tau) * sigmoid(tau * (rho - 1)) * A, tau by the sign of A (not multiplied by rho)
    no-clip:  -rho * A
    """
    # ln rho is clamped to +-MAX_LOG_RATIO: beyond ~88 exp overflows float32 and w * rho = 0 * inf = NaN (seen
    # once a collapsing policy meets stale tokens); at |ln rho| = 20 the GIPO weight is already exp(-200) = 0.
    ratio = torch.exp((logp - behaviour_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    w = gipo_trust_weight(ratio, algo.gipo_sigma)
    if loss == "gipo":
        per_token = -(w * ratio * advantages)
    elif loss == "ppo-clip":
        per_token = -torch.min(ratio * advantages, ratio.clamp(1 - algo.clip_eps, 1 + algo.clip_eps) * advantages)
    elif loss == "sapo":
        tau = torch.where(advantages > 0, torch.full_like(ratio, algo.sapo_tau_pos),
                          torch.full_like(ratio, algo.sapo_tau_neg))
        per_token = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * advantages
    elif loss == "no-clip":
        per_token = -(ratio * advantages)
    else:
        raise ValueError(f"unknown --loss {loss!r}")
    return per_token, {"ratio": ratio.detach(), "w": w.detach()}


def effective_tokens(env_steps: torch.Tensor, chunk_len: int, active_dims: torch.Tensor) -> torch.Tensor:
    """(B, chunk_len, action_dim) bool, the action tokens that acted: chunk step k ran (k < the row's env
    steps; a chunk stops at the episode's end) and dimension d is one the env uses (`active_dims`, bool).
    The policy loss, entropy and KL average over these only: the reward cannot depend on the other tokens,
    so their score terms have zero mean and add only variance. (A row with 0 env steps keeps every step.)"""
    steps = torch.where(env_steps > 0, env_steps, chunk_len)
    ran = torch.arange(chunk_len, device=env_steps.device)[None] < steps[:, None]
    return ran[:, :, None] & active_dims[None, None]


def lr_lambda(algo: AlgorithmArgs, delay: int = 0):
    """Linear warm-up, then cosine decay to min_lr_ratio (reference.md section 4); 0 for the first `delay`
    updates, after which the schedule starts (the policy group with --critic-warmup-updates)."""

    def fn(update: int) -> float:
        if update < delay:
            return 0.0
        update -= delay
        if update < algo.warmup_updates:
            return (update + 1) / algo.warmup_updates
        progress = min(1.0, (update - algo.warmup_updates) / max(1, algo.lr_decay_updates))
        return algo.min_lr_ratio + (1 - algo.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def frozen_base_from_checkpoint(cfg: PolicyConfig) -> bool:
    """Whether every process reads the policy's frozen weights itself from --policy.checkpoint: OpenVLA-OFT (the
    7.5 B base model and the constant buffers: statistics, bin centres, image normalisation). Then only the
    trainable tensors (LoRA adapters, action head and log sigma, proprio projector, critic) travel through the
    weight broadcast and go into checkpoints. A VLAPolicy's initial weights exist only in the learner: it ships
    everything once."""
    return cfg.backend == "openvla-oft"


def published_tensors(policy: torch.nn.Module, trainable_only: bool,
                      base_from_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """What the inference copy needs: everything once, then after each update only the trainable
    parameters (and buffers): frozen weights never change, so they are not copied again. With
    `base_from_checkpoint` (`frozen_base_from_checkpoint`): the trainable parameters only, always; that is
    also the broadcast's whole layout, so inference never copies a frozen tensor either."""
    if base_from_checkpoint:
        return {n: p for n, p in policy.named_parameters() if p.requires_grad}
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad or not trainable_only}
    named.update(dict(policy.named_buffers()))
    return named


def proprio_input(proprio_dim: int, proprio: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The `proprio=` keyword of the policy's act / evaluate / forward: the env's raw robot state (B, proprio_dim)
    from the storage rows, for a policy that reads it (`proprio_dim` > 0: a VLAPolicy built with
    --policy.proprio-dim, an OpenVLA-OFT checkpoint with a proprio projector); nothing for one that does not."""
    return {"proprio": proprio[..., :proprio_dim].to(device, non_blocking=True)} if proprio_dim else {}


def policy_proprio_dim(policy: torch.nn.Module) -> int:
    """Length of the robot state the policy reads (its `proprio_dim`: VLAPolicy's config, or the size of an
    OpenVLA-OFT checkpoint's proprio projector); 0: none."""
    return int(getattr(policy, "proprio_dim", 0))


class _EvaluateForward(torch.nn.Module):
    """DistributedDataParallel all-reduces the gradients of what runs through its forward: the
    data-parallel learner wraps the policy in this, so that `evaluate` is that forward."""

    def __init__(self, policy: VLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, images: torch.Tensor, instructions: torch.Tensor, action_tokens: torch.Tensor,
                **proprio: torch.Tensor) -> dict:
        return self.policy.evaluate(images, instructions, action_tokens, **proprio)


class Learner:
    """`learner`: assembles segments into a super batch, GAE with bootstrap (optionally recomputing
    values with the current critic), advantage normalisation, the per-token objective, one or more
    optimiser steps; then publishes the weights with a new version. Writes checkpoints.

    With imagination workers, a super batch is the real segments (waited for, as always) plus up to
    imagined_segments_per_update imagined ones that are ready (from --imagined-share; never waited
    for, so imagination never stalls real learning, unless --wait-for-imagined), trained on together
    (reference.md section 5). With --wm-train-every-updates, rank 0 also trains the world model on the
    replay of real steps and publishes it to `world_model`.

    Data-parallel over M ranks (`learner_0..M-1`, --num-learners): rank 0 takes the super batch's segment
    ids and hands rank r its share (segments r, r + M, ...); every rank copies its share, computes GAE on
    it and trains on it; advantage statistics and loss normalisers are global (all-reduced), gradients are
    all-reduced by DDP, so one update equals the single-learner update on the whole super batch. Only
    rank 0 publishes weights, writes checkpoints and sends statistics. M = 1 builds no process group."""

    def __init__(self, args: Args, spec: EnvSpec, shared: Shared, chan: Channels, poll_s: float, device: str,
                 run_dir: Path, resume_from: Path | None, rank: int = 0, dist_port: int | None = None):
        from accelerate import Accelerator

        self.args, self.shared, self.chan, self.poll_s, self.run_dir = args, shared, chan, poll_s, run_dir
        self.rank, self.world_size = rank, args.workers.num_learners
        self.name = numbered("learner", self.world_size)[rank]
        self.active_dims = torch.zeros(args.policy.action_dim, dtype=torch.bool)
        self.active_dims[list(spec.active_action_dims or range(args.policy.action_dim))] = True
        on_cuda = device.startswith("cuda")
        if on_cuda:
            torch.cuda.set_device(torch.device(device))
        if self.world_size > 1:
            # the process group as `accelerate launch` would describe it; accelerate picks NCCL on GPUs, gloo
            # on the CPU, and places DDP on LOCAL_RANK, so that is the CUDA index; OMP_NUM_THREADS keeps
            # accelerate from resizing our thread pool
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist_port), RANK=str(rank),
                              WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.world_size),
                              LOCAL_RANK=str(torch.device(device).index if on_cuda else rank),
                              OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.accelerator = Accelerator(cpu=not on_cuda, mixed_precision="bf16" if args.algorithm.bf16 else "no")
        self.device = self.accelerator.device
        torch.manual_seed(args.experiment.seed)
        random.seed(args.experiment.seed)
        np.random.seed(args.experiment.seed % 2**32)
        policy = make_policy(args.policy)
        self.proprio_dim = policy_proprio_dim(policy)  # robot state the policy reads from the rows (0: none)
        optimizer = torch.optim.AdamW(
            [{"params": policy.policy_parameters(), "lr": args.algorithm.policy_lr, "name": "policy"},
             {"params": policy.value_parameters(), "lr": args.algorithm.value_lr, "name": "value"}],
            weight_decay=args.algorithm.weight_decay)
        schedules = [lr_lambda(args.algorithm, delay=args.algorithm.critic_warmup_updates), lr_lambda(args.algorithm)]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)  # groups: policy, value
        if self.world_size == 1:
            self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
            self.evaluate = self.policy.evaluate
        else:  # DDP holds the same parameter tensors as `policy`, which publish / save / load keep using
            self.evaluate, self.optimizer = self.accelerator.prepare(_EvaluateForward(policy), optimizer)
            self.policy = policy
        self.update = 0
        # checkpoints record the learner's seconds so far ("learner_seconds"); a resumed run continues the count
        self.start_time = time.time()
        if resume_from is not None:
            self._load(resume_from)
        elif args.experiment.init_policy:  # weights only: the architecture came from the same directory
            weights = load_policy_weights(args.experiment.init_policy)
            self.accelerator.unwrap_model(self.policy).load_state_dict(weights, strict=True)
            log(self.name, f"policy initialised from {args.experiment.init_policy}")
        self.getter = TimedGet(self.name, args.workers.wait_timeout_s)
        if args.algorithm.hindsight_relabel:  # task id -> instruction tokens, as the env workers write them
            self.instructions = make_tokenizer(args.policy).encode(list(spec.instructions),
                                                                   args.policy.max_instruction_tokens)
        self.segments: list[int] = []  # real segments of the next update
        self.imagined: list[int] = []  # its imagined segments
        self.last_update_time = time.perf_counter()
        self.world_model = self.wm_trainer = None
        if self.rank == 0 and args.wm.wm_train_every_updates:
            self._build_world_model_trainer(spec, resume_from)
        if self.rank == 0:
            self.publish(trainable_only=False)

    def _build_world_model_trainer(self, spec: EnvSpec, resume_from: Path | None) -> None:
        """The world model trained online (reference.md section 5): from --wm-checkpoint, or from the
        resumed checkpoint's copy (then published at once: `world_model` starts from --wm-checkpoint)."""
        wm = self.args.wm
        saved = resume_from / "world_model" if resume_from is not None else None
        source = saved if saved is not None and saved.is_dir() else Path(wm.wm_checkpoint)
        self.world_model = WorldModel.load(source, self.device)
        # no warm-up: the model and (when saved) its optimiser state continue a finished training
        self.wm_trainer = WorldModelTrainer(self.world_model, lr=wm.wm_lr, weight_decay=1e-2, warmup_updates=0)
        load_optimizer_state(source, self.wm_trainer.optimizer)
        for group in self.wm_trainer.optimizer.param_groups:  # this run's rate, whatever the saved state says
            group["lr"] = group["initial_lr"] = wm.wm_lr
        train_json = source / "train.json"
        if source == saved and train_json.is_file():
            self.wm_trainer.update = int(json.loads(train_json.read_text()).get("online_updates", 0))
        # the replay stores task ids in the env's order, the reward model numbers tasks in its own
        cfg = self.world_model.cfg
        self.wm_task = torch.tensor([cfg.instructions.index(text) for text in spec.instructions])
        self.wm_generator = torch.Generator().manual_seed(derive_seed(self.args.experiment.seed, 7))
        if self.wm_trainer.update:
            self.shared.wm_weights.publish(self.world_model.state_dict(), self.wm_trainer.update)
        log(self.name, f"world model from {source}, trained online every {wm.wm_train_every_updates} updates")

    # -- weights and checkpoints -----------------------------------------------------------------
    def publish(self, trainable_only: bool = True) -> None:
        policy = self.accelerator.unwrap_model(self.policy)
        self.shared.weights.publish(
            published_tensors(policy, trainable_only, frozen_base_from_checkpoint(self.args.policy)), self.update)

    def save(self) -> Path:
        policy = self.accelerator.unwrap_model(self.policy)
        # OpenVLA-OFT: the trainable tensors only (as OpenVLAOFTPolicy.save); the frozen base is --policy.checkpoint
        model = (published_tensors(policy, True, base_from_checkpoint=True)
                 if frozen_base_from_checkpoint(self.args.policy) else policy.state_dict())
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(self.optimizer.state_dict())
        meta = {"args": _jsonable(asdict(self.args)), "counters": self.shared.counters.totals(),
                "learner_seconds": time.time() - self.start_time, "optimizer": opt_meta,
                "scheduler": self.scheduler.state_dict(), "versions": software_versions(self.args)}
        # the world model goes inside the checkpoint: both are installed by one rename
        path = ckpt.save_checkpoint(self.run_dir, self.update, model, opt_tensors, meta,
                                    keep=self.args.experiment.keep_checkpoints,
                                    write_extra=self._save_world_model if self.world_model is not None else None)
        log(self.name, f"checkpoint {path}")
        return path

    def _save_world_model(self, checkpoint_dir: Path) -> None:
        self.world_model.save(checkpoint_dir / "world_model", optimizer=self.wm_trainer.optimizer,
                              extra={"online_updates": self.wm_trainer.update, "policy_update": self.update,
                                     "initial": self.args.wm.wm_checkpoint})

    def _load(self, path: Path) -> None:
        model, opt_tensors, rng, meta = ckpt.load_checkpoint(path)
        policy = self.accelerator.unwrap_model(self.policy)
        if frozen_base_from_checkpoint(self.args.policy):  # trainable tensors only, all of them (see save)
            expected = published_tensors(policy, True, base_from_checkpoint=True)
            unknown, missing = sorted(set(model) - set(expected)), sorted(set(expected) - set(model))
            if unknown or missing:
                raise ValueError(f"{path} does not match this policy's trainable tensors: unknown {unknown[:5]}, "
                                 f"missing {missing[:5]}")
            policy.load_state_dict(model, strict=False)
        else:
            policy.load_state_dict(model)
        self.optimizer.load_state_dict(ckpt.optimizer_from_tensors(opt_tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        ckpt.set_rng_state(rng, meta["rng"])
        self.update = int(meta["update"])
        self.start_time -= float(meta.get("learner_seconds", 0.0))
        log(self.name, f"resumed from {path} at update {self.update}")

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> None:
        if self.rank > 0:  # a follower: trains on the share rank 0 hands it, in lockstep with rank 0
            share = self.getter.get(self.chan.learner_shares[self.rank - 1], "learner_0", self.poll_s, idle_ok=True)
            if share == []:  # rank 0 stopped; leaving on our own could strand it in an all-reduce
                raise _Stopping()
            if share is not None:
                self._update(share)
            return
        wm = self.args.wm
        if len(self.segments) < self.args.workers.segments_per_update:
            seg = self.getter.get(self.chan.full_segments, "env workers (no full segment)", self.poll_s)
            if seg is None:
                return
            self.segments.append(seg)
            if len(self.segments) < self.args.workers.segments_per_update:
                return
        # imagined segments after the real ones (so every rank gets an equal share of the real ones,
        # segments r, r + M, ...): those that are ready, or (--wait-for-imagined) all of them
        while len(self.imagined) < wm.imagined_segments_per_update:
            if wm.wait_for_imagined:
                seg = self.getter.get(self.chan.imagined_full_segments, "imagination workers (no imagined segment)",
                                      self.poll_s)
                if seg is None:
                    return  # back to the role loop (stop flag, heartbeat); the real segments wait here
            else:
                try:
                    seg = self.chan.imagined_full_segments.get_nowait()
                except queue.Empty:
                    break
            self.imagined.append(seg)
        segments, self.segments, self.imagined = self.segments + self.imagined, [], []
        for r in range(1, self.world_size):
            self.chan.learner_shares[r - 1].put(segments[r::self.world_size], timeout=self.args.workers.wait_timeout_s)
        self._update(segments[::self.world_size])

    def _update(self, segments: list[int]) -> None:
        """One update on this rank's segments; rank 0 then publishes, reports and checkpoints."""
        batch = self._assemble(segments)
        start = time.perf_counter()
        metrics = self.train_on(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        busy = time.perf_counter() - start  # forward + backward + optimiser (+ all-reduces): the device's work
        self.update += 1
        if self.rank > 0:
            return
        self.publish()
        if self.wm_trainer is not None and self.update % self.args.wm.wm_train_every_updates == 0:
            metrics.update(self._train_world_model())
        now = time.perf_counter()
        metrics["perf/learner_update_s"] = now - self.last_update_time
        metrics["perf/learner_samples_per_s"] = batch["mask"].numel() * self.world_size / (now - self.last_update_time)
        metrics["perf/learner_busy_fraction"] = busy / (now - self.last_update_time)
        metrics["perf/learner_wait_data_s"] = self.getter.pop_waited()
        metrics["charts/update"] = self.update
        self.last_update_time = now
        self.chan.stats.put(("update", self.name, metrics))
        every = self.args.experiment.checkpoint_every_updates
        if every and self.update % every == 0:
            self.save()

    def _train_world_model(self) -> dict[str, float]:
        """--wm-train-steps world-model steps on uniform samples of the replay of real steps, then publish
        the weights to `world_model` (version = online world-model updates). Returns wm/* metrics."""
        wm, replay = self.args.wm, self.shared.replay
        if len(replay) < wm.wm_batch_size:  # too few real steps yet
            return {}
        start = time.perf_counter()
        sums = defaultdict(list)
        for _ in range(wm.wm_train_steps):
            batch = replay.sample(wm.wm_batch_size, self.wm_generator)
            batch["task_id"] = self.wm_task[batch["task_id"]]
            for key, value in self.wm_trainer.train_step(batch).items():
                sums[key].append(value)
        self.world_model.eval()
        self.shared.wm_weights.publish(self.world_model.state_dict(), self.wm_trainer.update)
        metrics = {key: float(np.mean(values)) for key, values in sums.items()}
        metrics.update({"wm/updates": self.wm_trainer.update, "wm/replay_steps": len(replay),
                        "perf/wm_train_s": time.perf_counter() - start})
        return metrics

    def _assemble(self, segments: list[int]) -> dict[str, torch.Tensor]:
        """Copy the segments out of shared memory, then hand the slots back to the env workers."""
        storage, T = self.shared.storage, self.args.workers.segment_len
        idx = torch.tensor(segments)
        # indexing with a tensor copies; rows 0..T only (row T + 1 is scratch space)
        batch = {name: storage.fields[name][idx, : T + 1] for name in (
            "images", "proprio", "instruction", "action_tokens", "logp", "log_probs", "value", "version",
            "reward", "terminated", "truncated", "trunc_value", "valid", "env_steps", "imagined", "task_id",
            "achieved_task")}
        for seg in segments:
            imagined = bool(storage.imagined[seg, 0])
            (self.chan.imagined_free_segments if imagined else self.chan.free_segments).put(seg)
        batch["bootstrap_images"] = batch["images"][:, T]
        batch["bootstrap_proprio"] = batch["proprio"][:, T]
        batch["bootstrap_instruction"] = batch["instruction"][:, T]
        batch["bootstrap_value"] = batch["value"][:, T]
        for name in list(batch):
            if not name.startswith("bootstrap"):
                batch[name] = batch[name][:, :T]
        lag = self.update - batch["version"]
        batch["lag"] = lag
        mask = batch["valid"].clone()
        if self.args.algorithm.max_policy_lag is not None:
            mask &= lag <= self.args.algorithm.max_policy_lag
        batch["mask"] = mask
        return batch

    @torch.no_grad()
    def _values(self, images: torch.Tensor, instructions: torch.Tensor, proprio: torch.Tensor,
                chunk: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(images), chunk):
            with self.accelerator.autocast():
                _, value = self.policy(images[i:i + chunk].to(self.device), instructions[i:i + chunk].to(self.device),
                                       **proprio_input(self.proprio_dim, proprio[i:i + chunk], self.device))
            out.append(value.float().cpu())
        return torch.cat(out)

    def train_on(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        args = self.args
        N, T = batch["reward"].shape
        values, bootstrap = batch["value"], batch["bootstrap_value"]
        if args.algorithm.recompute_value:
            values = self._values(batch["images"].flatten(0, 1), batch["instruction"].flatten(0, 1),
                                  batch["proprio"].flatten(0, 1)).view(N, T)
            bootstrap = self._values(batch["bootstrap_images"], batch["bootstrap_instruction"],
                                     batch["bootstrap_proprio"])
        advantages, returns = compute_gae(batch["reward"], values, bootstrap, batch["terminated"],
                                          batch["truncated"], batch["trunc_value"], args.algorithm.gamma,
                                          args.algorithm.gae_lambda)
        keys = ("images", "proprio", "instruction", "action_tokens", "logp", "log_probs", "mask", "lag", "env_steps",
                "imagined")
        flat = {k: batch[k].flatten(0, 1) for k in keys}
        flat["advantages"], flat["returns"], flat["values"] = advantages.flatten(), returns.flatten(), values.flatten()
        flat["relabelled"] = torch.zeros_like(flat["mask"])
        copies = hindsight_copies(batch, self.instructions) if args.algorithm.hindsight_relabel else None
        if copies is not None:  # appended after the real rows: GAE within each copied episode, current critic
            R = len(copies["reward"])
            copy_values = torch.zeros(R, T)
            rows = copies["mask"]
            copy_values[rows] = self._values(copies["images"][rows], copies["instruction"][rows],
                                             copies["proprio"][rows])
            copy_adv, copy_ret = compute_gae(copies["reward"], copy_values, torch.zeros(R), copies["terminated"],
                                             copies["truncated"], copies["trunc_value"], args.algorithm.gamma,
                                             args.algorithm.gae_lambda)
            extra = {k: copies[k].flatten(0, 1) for k in keys}
            extra.update(advantages=copy_adv.flatten(), returns=copy_ret.flatten(), values=copy_values.flatten(),
                         relabelled=rows.flatten())
            flat = {k: torch.cat([flat[k], extra[k]]) for k in flat}
        mask = flat["mask"]
        kept, kept_imagined = int(mask.sum()), int((mask & flat["imagined"]).sum())
        counts = torch.tensor([kept, kept_imagined, mask.numel()])  # the ranks' shares may differ in size
        total_kept, total_imagined, total_rows = (int(x) for x in (
            counts if self.world_size == 1 else self._sum_over_ranks(counts)))
        if total_kept == 0:
            return {"charts/samples_kept_fraction": 0.0}
        kept_relabelled = int((mask & flat["relabelled"]).sum())
        raw_advantage_mean = flat["advantages"][mask].mean().item() if kept else 0.0
        if args.algorithm.norm_adv and self.world_size == 1:
            a = flat["advantages"][mask]
            flat["advantages"] = (flat["advantages"] - a.mean()) / (a.std(unbiased=False) + 1e-8)
        elif args.algorithm.norm_adv:  # the super batch's statistics, over every rank's share
            mean, std = self._global_mean_std(flat["advantages"][mask])
            flat["advantages"] = (flat["advantages"] - mean) / (std + 1e-8)

        self.policy.train()
        sums: dict[str, list[float]] = defaultdict(list)
        diagnostics: dict[str, list[torch.Tensor]] = defaultdict(list)
        # One learner trains on the kept rows. Data-parallel ranks step through every row of their share,
        # the dropped ones weighted 0, so that all run the same number of equal minibatches: each backward
        # is an all-reduce, and a rank that ran one fewer would leave the others waiting in it.
        order = torch.nonzero(mask).squeeze(1) if self.world_size == 1 else torch.arange(mask.numel())
        epochs, n = args.algorithm.update_epochs, args.algorithm.num_minibatches

        def minibatches():
            shuffled = order
            for _ in range(epochs):
                shuffled = shuffled[torch.randperm(len(shuffled))]
                yield from (shuffled.chunk(n) if self.world_size == 1 else shuffled.tensor_split(n))

        for i, mb in enumerate(minibatches()):
            # Ctrl-C / SIGTERM (shared.stop) mid-update: end this update after the minibatches done so far, so the
            # final checkpoint is written inside the shutdown's 10 s even where one update takes longer (a CPU
            # learner, several epochs). Data-parallel ranks always finish together: each backward is an all-reduce.
            if i and self.world_size == 1 and self.shared.stop.is_set():
                log(self.name, f"stopping: update {self.update + 1} ends after {i} of {epochs * n} minibatches")
                break
            metrics, diag = self._minibatch_step({k: v[mb] for k, v in flat.items()})
            for k, v in metrics.items():
                sums[k].append(v)
            for k, v in diag.items():
                diagnostics[k].append(v)
        self.scheduler.step()
        self.policy.eval()

        # staleness instruments (reference.md section 2), over every token of the super batch (data-parallel:
        # of rank 0's share; the losses above are the whole super batch's)
        out = {k: float(np.mean(v)) for k, v in sums.items()}
        if kept == 0:  # a data-parallel rank whose whole share was dropped
            return out
        ratio, w = torch.cat(diagnostics["ratio"]), torch.cat(diagnostics["w"])
        u = (w * ratio).double()
        own = mask & ~flat["relabelled"]  # the rows as collected; hindsight copies are off-policy by design
        lag = flat["lag"][own].double()
        y, v = flat["returns"][mask], flat["values"][mask]
        out.update({
            "charts/policy_lag_mean": lag.mean().item(),
            "charts/policy_lag_p95": torch.quantile(lag, 0.95).item(),
            "charts/policy_lag_max": lag.max().item(),
            "charts/abs_log_ratio_p95": torch.quantile(ratio.double().log().abs(), 0.95).item(),
            "charts/trust_weight_below_1e-3": (w < 1e-3).double().mean().item(),
            "charts/effective_sample_size": ((u.sum() ** 2) / (u.square().sum() + 1e-12) / u.numel()).item(),
            "charts/explained_variance": (1 - (y - v).var() / (y.var() + 1e-8)).item(),
            "charts/samples_kept_fraction": total_kept / total_rows,
            "charts/imagined_sample_fraction": total_imagined / total_kept,
            "charts/relabelled_sample_fraction": kept_relabelled / kept,
            "charts/advantage_mean_raw": raw_advantage_mean,
            "charts/lr_policy": self.optimizer.param_groups[0]["lr"],
            "charts/lr_value": self.optimizer.param_groups[1]["lr"],
        })
        return out

    def _minibatch_step(self, mb: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One optimiser step on a minibatch, in micro-batches of --micro-batch-size rows whose gradients add up
        to the whole minibatch's (every sum is divided by the minibatch's counts, not the micro-batch's)."""
        args, dev = self.args, self.device
        # Only tokens that acted count: steps the env executed (a chunk stops at the episode's end) and
        # dimensions it uses. The others cannot change the reward, so their terms only add variance.
        tokens = effective_tokens(mb["env_steps"].to(dev), args.policy.chunk_len, self.active_dims.to(dev))
        keep = mb["mask"].to(dev)
        n_tokens, n_samples = tokens.sum().clamp_min(1), torch.tensor(float(len(keep)), device=dev)
        if self.world_size > 1:
            tokens &= keep[:, None, None]  # rows dropped from the super batch weigh 0 (see train_on)
            # Each rank divides its sums by the global counts over M: DDP averages the M gradients, so the
            # result is the gradient of the whole minibatch's loss, as one learner would compute it.
            counts = self._sum_over_ranks(torch.stack([tokens.sum(), keep.sum()])).clamp_min(1) / self.world_size
            n_tokens, n_samples = counts.float().to(dev)
        rows = len(keep)
        size = args.algorithm.micro_batch_size or rows
        parts = [slice(i, min(i + size, rows)) for i in range(0, rows, size)]
        self.optimizer.zero_grad(set_to_none=True)
        terms, ratios, weights = torch.zeros(5, device=dev), [], []
        for i, part in enumerate(parts):
            # DDP all-reduces the gradients at the last micro-batch's backward only
            sync = self.world_size == 1 or i == len(parts) - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.evaluate):
                part_terms, diag = self._micro_batch_loss({k: v[part] for k, v in mb.items()}, tokens[part],
                                                         keep[part], n_tokens, n_samples)
                self.accelerator.backward(part_terms[-1])
            terms += part_terms.detach()
            ratios.append(diag["ratio"].flatten().float().cpu())
            weights.append(diag["w"].flatten().float().cpu())
        grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), args.algorithm.max_grad_norm)
        self.optimizer.step()
        if self.world_size > 1:  # each rank holds M x its part of the minibatch's losses
            terms = self._sum_over_ranks(terms) / self.world_size
        names = ("losses/policy_loss", "losses/value_loss", "losses/kl", "losses/entropy", "losses/total")
        metrics = {**dict(zip(names, terms.tolist())), "losses/grad_norm": float(grad_norm)}
        return metrics, {"ratio": torch.cat(ratios), "w": torch.cat(weights)}

    def _micro_batch_loss(self, mb: dict[str, torch.Tensor], tokens: torch.Tensor, keep: torch.Tensor,
                          n_tokens: torch.Tensor, n_samples: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(policy, value, KL, entropy, total) loss terms of these rows, as sums over the rows divided by the
        minibatch's token and sample counts, and the trust diagnostics."""
        dev, algo = self.device, self.args.algorithm
        with self.accelerator.autocast():
            out = self.evaluate(mb["images"].to(dev), mb["instruction"].to(dev), mb["action_tokens"].to(dev),
                                **proprio_input(self.proprio_dim, mb["proprio"], dev))
        logp = out["logp"].float()[tokens]
        behaviour_logp = mb["logp"].to(dev)[tokens]
        adv = mb["advantages"].to(dev)[:, None, None].expand_as(tokens)[tokens]
        per_token, diag = policy_objective(algo.loss, logp, behaviour_logp, adv, algo)
        pg_loss = per_token.sum() / n_tokens
        # KL(behaviour || current) over the full 256-way categorical of every such token; a hindsight copy's
        # behaviour acted under another instruction, so it has no trust region to keep and no staleness to report
        own = ~mb["relabelled"].to(dev)[:, None, None].expand_as(tokens)[tokens]
        diag = {k: v[own] for k, v in diag.items()}
        b_logp_all = mb["log_probs"].to(dev).float()[tokens]
        kl_per_token = (b_logp_all.exp() * (b_logp_all - out["log_probs"].float()[tokens])).sum(-1)
        kl = torch.where(own, kl_per_token, 0.0).sum() / n_tokens
        entropy = out["entropy"].float()[tokens].sum() / n_tokens
        value_error = (out["value"].float() - mb["returns"].to(dev)).square()
        value_loss = torch.where(keep, value_error, 0.0).sum() / n_samples
        loss = pg_loss + algo.kl_coef * kl - algo.ent_coef * entropy + algo.vf_coef * value_loss
        return torch.stack([pg_loss, value_loss, kl, entropy, loss]), diag

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small tensor over the learner ranks (float64, returned on the CPU)."""
        values = values.detach().double().to(self.device)
        torch.distributed.all_reduce(values)
        return values.cpu()

    def _global_mean_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std of x's elements over every rank (two passes in float64)."""
        total, count = self._sum_over_ranks(torch.stack([x.double().sum(), torch.tensor(float(x.numel()))]))
        mean = total / count
        var = self._sum_over_ranks((x.double() - mean).square().sum().reshape(1))[0] / count
        return mean.float(), var.sqrt().float()

    def close(self) -> None:
        if self.rank == 0:
            self.save()
            for shares in self.chan.learner_shares:  # the followers stop with us
                try:
                    shares.put([], timeout=5.0)
                except queue.Full:
                    pass
        if self.world_size > 1:
            self.accelerator.end_training()  # destroys the process group


# ===================================================================================================
# main: storage, queues, processes, supervision, shutdown
# ===================================================================================================
def software_versions(args: Args) -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    names = ["transformers", "accelerate"]
    if parse_task(args.env.task)[0].startswith("libero"):
        names += ["mujoco", "robosuite", "libero", "bddl"]
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    # the card's name costs a CUDA context in the asking process: only asked where this run uses a GPU
    learner, inference = resolve_devices(args)
    if not torch.cuda.is_available():
        versions["cuda"] = "none"
    elif any(d.startswith("cuda") for d in (*learner, *inference)):
        versions["cuda"] = torch.cuda.get_device_name(0)
    else:
        versions["cuda"] = f"{torch.cuda.device_count()} GPU(s), unused by this run"
    return versions


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _die_with_parent() -> None:
    """Linux: ask the kernel to kill this child if the main process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


MEMORY_REPORT_S = 10.0
"""Every process reports its memory (pipeline.memory_use) this often: perf/rss_gib/<name>, perf/gpu_peak_gib/<name>."""


def run_role(name: str, build, stop_event, stats, heartbeats: Heartbeats) -> None:
    """Process entry: build the role, step it until its stop event, report any exception with its
    traceback (the main process then stops the run). Only the main process handles Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    parent = os.getppid()
    torch.set_num_threads(1)  # leave the other cores to the simulators (platform.md)
    role, last_memory_report = None, 0.0
    try:
        role = build()
        log(name, f"ready (pid {os.getpid()})")
        while not stop_event.is_set():
            role.step()
            heartbeats.beat(name)
            if os.getppid() != parent:  # the main process was killed: nobody will ever stop us
                return
            if time.time() - last_memory_report > MEMORY_REPORT_S:
                stats.put(("memory", name, memory_use()))
                last_memory_report = time.time()
        role.close()
    except _Stopping:
        if role is not None:
            role.close()
    except BaseException:
        stats.put(("error", name, traceback.format_exc()))
        stats.close()
        stats.join_thread()
        sys.exit(1)
    stats.close()
    stats.join_thread()


class Run:
    """The main process: wiring, supervision, the one tensorboard writer, evaluation rounds, shutdown."""

    def __init__(self, args: Args):
        self.args = args
        self.spec = env_spec(args.env.task, image_size=args.policy.image_size, wrist_camera=args.env.wrist_camera,
                             **env_options(args))
        self.learner_devices, self.inference_devices = resolve_devices(args)
        self.resume_from = ckpt.resolve_checkpoint(args.experiment.resume) if args.experiment.resume else None
        self.resume_meta = json.loads((self.resume_from / "meta.json").read_text()) if self.resume_from else None
        source = self.resume_from or (ckpt.resolve_checkpoint(args.experiment.checkpoint)
                                      if args.experiment.eval_only and args.experiment.checkpoint else None)
        if source is not None:  # the policy's architecture is the checkpoint's, whatever the flags say
            saved = json.loads((source / "meta.json").read_text())["args"]["policy"]
            # ... except the consent to run a checkpoint's own code: this command line's, never a saved one
            saved["trust_remote_code"] = args.policy.trust_remote_code
            args.policy = PolicyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            if args.policy.backend == "openvla-oft":
                problems = openvla_oft_problems(args, self.spec)
                if problems:
                    raise SystemExit(f"accerl: the policy of {source}: " + "\n  ".join(problems))
        self.run_dir = self._run_dir()
        self.start_time = time.time()
        self.interrupted = False
        self.eval_rounds: dict[int, dict] = {}
        self.next_round = 0
        self.final_eval: dict | None = None
        self.episode_window = deque(maxlen=100)
        self.imagined_window = deque(maxlen=100)  # imagined episodes' success (the reward model's end signal)
        self.wm_updates = 0
        self.flow_started, self.steady_from, self.train_end = None, None, None
        # (time, env steps) as the first and the latest update's report arrived
        self.first_update_mark: tuple[float, int] | None = None
        self.last_update_mark: tuple[float, int] | None = None
        self.warmup_s = min(10.0, args.experiment.max_seconds / 6) if args.experiment.max_seconds else 10.0
        self.learner_rates: list[float] = []
        self.busy_fractions: dict[str, list[float]] = defaultdict(list)  # steady part of training, every process
        self.memory_max: dict[str, dict[str, float]] = defaultdict(dict)  # "rss_gib" / "gpu_peak_gib" -> process -> GiB

    def _run_dir(self) -> Path:
        args = self.args
        if self.resume_from is not None:
            return self.resume_from.parent.parent
        exp = args.experiment
        if exp.run_dir:
            return Path(exp.run_dir)
        name = f"{args.env.task.replace('/', '-')}__{exp.exp_name}__{exp.seed}__{int(time.time())}"
        return Path("runs") / name

    # -- wiring ----------------------------------------------------------------------------------
    def build(self, serial: bool) -> None:
        args, spec = self.args, self.spec
        wm = args.wm
        num_train = 0 if args.experiment.eval_only else args.workers.num_envs
        # segments: real ones, imagined ones (their own pool: imagination never takes a real env's), eval
        num_real = num_train + args.workers.segments_per_update * 2
        num_imagined = (wm.num_imagination_workers * wm.imagined_envs_per_worker + wm.imagined_segments_per_update * 2
                        if wm.num_imagination_workers else 0)
        num_segments = num_real + num_imagined + args.workers.num_eval_workers
        self.first_eval_segment = num_segments - args.workers.num_eval_workers
        with torch.device("meta"):  # names, shapes and dtypes only
            skeleton = make_policy(args.policy)
        proprio_dim = policy_proprio_dim(skeleton)
        if proprio_dim and proprio_dim != spec.proprio_dim:
            fix = (f"use --policy.proprio-dim {spec.proprio_dim}" if args.policy.backend == "vla" else
                   "use a checkpoint whose proprio projector fits this env")
            raise SystemExit(f"accerl: the policy reads {proprio_dim}-D proprio (--policy.proprio-dim, or the "
                             f"proprio projector of --policy.checkpoint), the {spec.name} env gives "
                             f"{spec.proprio_dim}-D: {fix}")
        if proprio_dim and wm.num_imagination_workers and load_config(wm.wm_checkpoint).proprio_dim != proprio_dim:
            raise SystemExit(f"accerl: the policy reads {proprio_dim}-D proprio, but the world model in --wm-checkpoint "
                             f"does not predict it (saved before world models predicted proprio, or trained with "
                             f"--model.proprio-dim 0; an imagined episode would keep its start's proprio): train one "
                             f"with `python world_model.py train` (it predicts the env's proprio), or use a policy "
                             f"without proprio (--policy.proprio-dim 0)")
        shape = StorageShape(num_segments=num_segments, segment_len=args.workers.segment_len,
                             num_cameras=len(spec.cameras), image_size=args.policy.image_size,
                             proprio_dim=spec.proprio_dim, instruction_len=args.policy.max_instruction_tokens,
                             chunk_len=args.policy.chunk_len, action_dim=args.policy.action_dim,
                             num_bins=args.policy.num_bins)
        share = not serial
        storage = RolloutStorage(shape, share=share)
        storage.imagined[num_real:num_real + num_imagined] = True
        layout = published_tensors(skeleton, False, frozen_base_from_checkpoint(args.policy))
        weights = WeightBroadcast({n: torch.zeros(t.shape, dtype=t.dtype) for n, t in layout.items()}, share=share)
        num_env_workers = 0 if args.experiment.eval_only else args.workers.num_env_workers
        self.inference_names = numbered("inference", args.workers.num_inference_servers)
        self.learner_names = [] if args.experiment.eval_only else numbered("learner", args.workers.num_learners)
        W = wm.num_imagination_workers
        self.world_model_names = ["world_model"] if W and not serial else []  # serial: in-process world models
        # client c is the c-th name (env, eval, imagination workers): it is also its Counters row
        self.names = ([f"env_worker_{i}" for i in range(num_env_workers)]
                      + [f"eval_worker_{j}" for j in range(args.workers.num_eval_workers)]
                      + [f"imagination_worker_{w}" for w in range(W)]
                      + self.inference_names + self.world_model_names + self.learner_names)
        counters = Counters(len(self.names), share=share)
        heartbeats = Heartbeats(self.names, share=share)
        ctx = mp.get_context("spawn")
        make_q = (lambda n: queue.Queue(maxsize=n)) if serial else (lambda n: ctx.Queue(maxsize=n))
        make_event = threading.Event if serial else ctx.Event
        clients = args.workers.num_env_workers + args.workers.num_eval_workers
        imagined_envs = W * wm.imagined_envs_per_worker
        self.chan = Channels(
            requests=[make_q(args.workers.num_envs + args.workers.num_eval_workers + imagined_envs + 8)
                      for _ in self.inference_names],
            actions=([make_q(args.workers.envs_per_worker + 2) for _ in range(clients)]
                     + [make_q(wm.imagined_envs_per_worker + 2) for _ in range(W)]),
            free_segments=make_q(num_segments + 1), full_segments=make_q(num_segments + 1),
            learner_shares=[make_q(2) for _ in self.learner_names[1:]],
            eval_jobs=make_q(100_000), stats=make_q(100_000),
            imagined_free_segments=make_q(num_segments + 1) if W else None,
            imagined_full_segments=make_q(num_segments + 1) if W else None,
            wm_requests=make_q(imagined_envs + 8) if W else None,
            wm_replies=[make_q(wm.imagined_envs_per_worker + 2) for _ in range(W)])
        # the data-parallel learner's rendezvous (torch.distributed over TCP on this host)
        self.dist_port = free_tcp_port() if len(self.learner_names) > 1 else None
        self.shared = Shared(storage, weights, counters, heartbeats, make_event(), make_event(),
                             *self._world_model_buffers(serial, num_train))
        for seg in range(num_real):
            self.chan.free_segments.put(seg)
        for seg in range(num_real, num_real + num_imagined):
            self.chan.imagined_free_segments.put(seg)
        if self.resume_meta is not None:
            counters.restore(self.resume_meta["counters"])
        log("main", f"shared storage {storage.nbytes() / 2**20:.0f} MiB: {num_segments} segments x "
                    f"{args.workers.segment_len + 2} rows; "
                    f"weights {sum(t.numel() for t in weights.tensors.values()) / 1e6:.2f} M")

    def _world_model_buffers(self, serial: bool, num_real_envs: int) -> tuple:
        """(replay, request slots, weight broadcast) of the world model, each None when unused."""
        args, wm, share = self.args, self.args.wm, not serial
        if not (wm.num_imagination_workers or wm.wm_train_every_updates):
            return None, None, None
        cfg = load_config(wm.wm_checkpoint)
        replay = slots = weights = None
        if uses_replay(args):
            replay = StepReplay(num_real_envs, wm.wm_replay_steps_per_env, args.policy.image_size, cfg.context_frames,
                                args.policy.action_dim, self.spec.proprio_dim, share=share)
            log("main", f"replay of real steps: {num_real_envs} envs x {wm.wm_replay_steps_per_env} steps, "
                        f"{replay.nbytes() / 2**20:.0f} MiB")
        if wm.num_imagination_workers and not serial:
            slots = ImaginationSlots(SlotShape(wm.num_imagination_workers * wm.imagined_envs_per_worker,
                                               cfg.context_frames, args.policy.image_size, args.policy.action_dim,
                                               args.policy.chunk_len, self.spec.proprio_dim), share=share)
        if wm.wm_train_every_updates:
            with torch.device("meta"):
                skeleton = WorldModel(cfg)
            weights = WeightBroadcast({n: torch.zeros(t.shape, dtype=t.dtype)
                                       for n, t in skeleton.state_dict().items()}, share=share)
        return replay, slots, weights

    def role_builders(self, serial: bool) -> dict[str, object]:
        """name -> zero-argument constructor of that role (called inside the role's process)."""
        args, spec, shared, chan = self.args, self.spec, self.shared, self.chan
        poll = 0.0 if serial else 0.05
        builders = {}
        if not args.experiment.eval_only:
            for i in range(args.workers.num_env_workers):
                builders[f"env_worker_{i}"] = _Builder(EnvWorker, i, args, spec, shared, chan, poll,
                                                       self.resume_update())
        for j in range(args.workers.num_eval_workers):
            builders[f"eval_worker_{j}"] = _Builder(EvalWorker, j, args.workers.num_env_workers + j, args, spec, shared,
                                                    chan, poll, self.first_eval_segment + j, self.run_dir / "videos")
        for w in range(args.wm.num_imagination_workers):
            source = imagined_rollouts(w, args, spec, shared, chan, serial, poll)
            builders[f"imagination_worker_{w}"] = _Builder(EnvWorker, w, args, spec, shared, chan, poll,
                                                           self.resume_update(), source)
        for k, name in enumerate(self.inference_names):
            builders[name] = _Builder(InferenceServer, args, shared, chan, poll, self.inference_devices[k], k)
        if self.world_model_names:  # a request in flight per imagined env at most: batches of <= W x E
            wm = args.wm
            device = wm.wm_device or self.inference_devices[0]
            builders["world_model"] = _Builder(
                WorldModelServer.from_checkpoint, wm.wm_checkpoint, "cuda:0" if device == "cuda" else device,
                shared.wm_slots, chan.wm_requests, chan.wm_replies, poll,
                min(wm.wm_max_batch, wm.num_imagination_workers * wm.imagined_envs_per_worker), wm.wm_batch_timeout_ms,
                shared.wm_weights, chan.stats)
        for r, name in enumerate(self.learner_names):
            builders[name] = _Builder(Learner, args, spec, shared, chan, poll, self.learner_devices[r], self.run_dir,
                                      self.resume_from, r, self.dist_port)
        return builders

    def resume_update(self) -> int:
        return 0 if self.resume_meta is None else int(self.resume_meta["update"])

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        args = self.args
        self.run_dir.mkdir(parents=True, exist_ok=True)
        purge = self.shared.counters.total("global_env_step") if self.resume_from else None
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge)
        header = {"run_dir": str(self.run_dir), "mode": args.experiment.mode, "task": args.env.task,
                  "tasks": self.spec.num_tasks, "env_workers": args.workers.num_env_workers,
                  "envs": args.workers.num_envs, "learner_device": ",".join(self.learner_devices),
                  "inference_device": ",".join(self.inference_devices), "loss": args.algorithm.loss,
                  "train_init_states": (args.env.init_states if parse_task(args.env.task)[0].startswith("libero")
                                        else "random"),
                  "versions": software_versions(args)}
        if self.resume_from:
            header["resumed_from"] = str(self.resume_from)
        log("main", "run " + json.dumps(header))
        if not self.resume_from:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in sorted(_flatten(asdict(args)).items())))
            (self.run_dir / "args.json").write_text(json.dumps(_jsonable(asdict(args)), indent=1))

    def run(self) -> int:
        serial = self.args.experiment.mode == "serial"
        self.build(serial)
        self.start()
        if self.args.experiment.eval_only:
            self._publish_checkpoint_weights()
        builders = self.role_builders(serial)
        if serial:
            return self._run_serial(builders)
        return self._run_processes(builders)

    def _publish_checkpoint_weights(self) -> None:
        """--eval-only: publish the weights of --checkpoint (its update as the version) or of --init-policy (0).
        The files hold state dicts, which lack non-persistent buffers (the decoder's rotary frequencies): the
        policy is rebuilt and loaded here, and its full published set goes out, as a learner would publish it."""
        if self.args.experiment.init_policy:
            model, version = load_policy_weights(self.args.experiment.init_policy), 0
        else:
            model, _, _, meta = ckpt.load_checkpoint(self.args.experiment.checkpoint)
            version = int(meta["update"])
        # OpenVLA-OFT: the file holds the trainable tensors, which are the broadcast's whole layout: as they are
        if not frozen_base_from_checkpoint(self.args.policy):
            policy = make_policy(self.args.policy)
            policy.load_state_dict(model, strict=True)
            model = published_tensors(policy, trainable_only=False)
        self.shared.weights.publish(model, version)

    def _run_processes(self, builders: dict) -> int:
        ctx = mp.get_context("spawn")
        self.procs = {}
        for name, build in builders.items():
            # learner followers stop on learner_0's word (Learner.step), or with everybody if it is gone
            stop = (self.shared.stop if name.startswith(("inference", "eval", "world_model"))
                    or name in self.learner_names[1:] else self.shared.train_stop)
            p = ctx.Process(target=run_role, name=name, args=(name, build, stop, self.chan.stats, self.shared.heartbeats),
                            daemon=True)
            p.start()
            self.procs[name] = p
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            code = self._supervise()
        except BaseException:
            log("main", "supervisor failed:\n" + traceback.format_exc())
            code = 1
        finally:
            self._shutdown(code)
            for s, h in previous.items():
                signal.signal(s, h)
        return code

    def _on_signal(self, signum, frame) -> None:
        log("main", f"got {signal.Signals(signum).name}: stopping (final checkpoint, then exit)")
        self.interrupted = True

    def _track_rate(self, steps: int) -> None:
        """Steady-state throughput: from a warm-up after the first env step to the end of training."""
        now = time.time()
        if self.flow_started is None and steps > 0:
            self.flow_started = now
        if self.steady_from is None and self.flow_started is not None and now - self.flow_started >= self.warmup_s:
            self.steady_from = (now, steps)
        self.train_end = (now, steps)

    def _training_done(self) -> bool:
        args = self.args
        if args.experiment.eval_only:
            return False
        steps = self.shared.counters.total("global_env_step")
        self._track_rate(steps)
        exp = args.experiment
        out_of_time = exp.max_seconds > 0 and time.time() - self.start_time >= exp.max_seconds
        return steps >= exp.total_env_steps or out_of_time

    def _supervise(self) -> int:
        """Drain stats, log, schedule evaluations, watch children; returns the exit code."""
        args = self.args
        self.last_log = time.time()
        self.last_steps = (time.time(), self.shared.counters.total("global_env_step"),
                           self.shared.counters.total("imagined_chunk_step"))
        if args.experiment.eval_only:
            round_id = self._enqueue_eval_round(args.workers.eval_episodes_per_task * self.spec.num_tasks,
                                                per_task=True)
        next_eval_update = args.workers.eval_every_updates
        while True:
            self._drain_stats()
            if self.interrupted:
                return 130
            for name, p in self.procs.items():
                if p.exitcode not in (None, 0):
                    log("main", f"{name} died with exit code {p.exitcode}; stopping the run")
                    return 1
                if p.exitcode == 0 and not self.shared.train_stop.is_set():
                    log("main", f"{name} exited early; stopping the run")
                    return 1
            silent = {n: s for n, s in self.shared.heartbeats.silent_for().items()
                      if s > args.workers.wait_timeout_s and self.procs[n].is_alive()}
            if silent:
                log("main", f"no heartbeat for {max(silent.values()):.0f} s from {', '.join(silent)}; stopping the run")
                return 1
            if args.experiment.eval_only:
                if self._round_complete(round_id):
                    self.final_eval = self._close_round(round_id, final=True)
                    return 0
                continue
            version = self.shared.weights.published_version()
            if args.workers.eval_every_updates and version >= next_eval_update and args.workers.num_eval_workers:
                self._enqueue_eval_round(args.workers.eval_episodes)
                next_eval_update = version + args.workers.eval_every_updates
            for rid in [r for r in self.eval_rounds if self._round_complete(r)]:
                self._close_round(rid)
            if time.time() - self.last_log > args.experiment.log_every_s:
                self._progress()
            if self._training_done():
                self._progress()
                return self._finish_training()

    def _finish_training(self) -> int:
        """Stop collection, let the learner publish and checkpoint, then a final greedy evaluation."""
        self.shared.train_stop.set()
        deadline = time.time() + 60
        learners = [self.procs[name] for name in self.learner_names]
        while any(p.is_alive() for p in learners) and time.time() < deadline and not self.interrupted:
            self._drain_stats()
        if any(p.exitcode not in (0, None) for p in learners):
            return 1
        if self.args.workers.num_eval_workers and self.args.workers.final_eval_episodes and not self.interrupted:
            rid = self._enqueue_eval_round(self.args.workers.final_eval_episodes, per_task=False)
            deadline = time.time() + self.args.workers.wait_timeout_s
            while not self._round_complete(rid) and time.time() < deadline and not self.interrupted:
                self._drain_stats()
                if any(p.exitcode not in (None, 0) for p in self.procs.values()):
                    return 1
            if self._round_complete(rid):
                self.final_eval = self._close_round(rid, final=True)
            elif not self.interrupted:
                log("main", f"final evaluation incomplete after --wait-timeout-s "
                            f"{self.args.workers.wait_timeout_s:.0f} s: no answer from the eval workers or inference; "
                            "summary.json has no final_eval")
        return 130 if self.interrupted else 0

    def _shutdown(self, code: int) -> None:
        self.shared.train_stop.set()
        deadline = time.time() + 8.0  # everything is gone within 10 s of a signal
        # learner followers leave on learner_0's word, after the update they share with it (on `stop` only if
        # learner_0 is gone): give it that long before stopping everybody
        lead = self.procs.get(self.learner_names[0]) if len(self.learner_names) > 1 else None
        followers = [self.procs[name] for name in self.learner_names[1:] if name in self.procs]
        while (lead is not None and lead.is_alive() and any(p.is_alive() for p in followers)
               and time.time() < deadline - 3.0):
            self._drain_stats(timeout=0.05)
        self.shared.stop.set()
        while time.time() < deadline and any(p.is_alive() for p in self.procs.values()):
            # a process still building its role (importing, loading a policy) holds nothing to save: a run
            # stopped during start-up (a crashed env, Ctrl-C) need not wait until it is ready to stop
            for name, p in self.procs.items():
                if p.is_alive() and not self.shared.heartbeats.started(name):
                    p.terminate()
            self._drain_stats(timeout=0.05)
        for name, p in self.procs.items():
            if p.is_alive():
                log("main", f"{name} did not exit in time; terminating it")
                p.terminate()
                p.join(timeout=1.0)
            if p.is_alive():
                p.kill()
        self._drain_stats(timeout=0.0)
        self._write_summary(code)

    def _run_serial(self, builders: dict) -> int:
        """Serial mode: the same role objects, stepped round-robin in this process."""
        roles = {name: build() for name, build in builders.items()}
        self.procs = {}
        self.last_log = time.time()
        self.last_steps = (time.time(), 0, 0)
        code = 0
        try:
            if self.args.experiment.eval_only:
                rid = self._enqueue_eval_round(self.args.workers.eval_episodes_per_task * self.spec.num_tasks,
                                               per_task=True)
            while True:
                for name, role in roles.items():
                    if (name.startswith(("env_worker", "imagination_worker", "learner"))
                            and self.shared.train_stop.is_set()):
                        continue
                    role.step()
                self._drain_stats(timeout=0.0)
                if self.args.experiment.eval_only:
                    if self._round_complete(rid):
                        self.final_eval = self._close_round(rid, final=True)
                        break
                    continue
                if time.time() - self.last_log > self.args.experiment.log_every_s:
                    self._progress()
                if self._training_done():
                    self.shared.train_stop.set()
                    break
            if not self.args.experiment.eval_only:
                roles["learner"].close()
                if self.args.workers.num_eval_workers and self.args.workers.final_eval_episodes:
                    rid = self._enqueue_eval_round(self.args.workers.final_eval_episodes)
                    while not self._round_complete(rid):
                        for name in roles:
                            if name.startswith(("eval", "inference")):
                                roles[name].step()
                        self._drain_stats(timeout=0.0)
                    self.final_eval = self._close_round(rid, final=True)
        except KeyboardInterrupt:
            code = 130
        finally:
            for name, role in roles.items():
                if name != "learner":
                    role.close()
            self._write_summary(code)
        return code

    # -- evaluation rounds -------------------------------------------------------------------------
    def _enqueue_eval_round(self, episodes: int, per_task: bool = False) -> int:
        """Jobs (round, task, seed). Episode k of task t uses seed k: LIBERO's k-th fixed initial state."""
        rid, self.next_round = self.next_round, self.next_round + 1
        tasks = range(self.spec.num_tasks)
        pinned = parse_task(self.args.env.task)[1]
        if pinned is not None:
            tasks = [pinned]
        jobs = []
        if per_task:
            jobs = [(rid, t, k) for t in tasks for k in range(self.args.workers.eval_episodes_per_task)]
        else:
            jobs = [(rid, t, k) for k in range(math.ceil(episodes / len(tasks))) for t in tasks][:episodes]
        for job in jobs:
            self.chan.eval_jobs.put(job)
        self.eval_rounds[rid] = {"expected": len(jobs), "episodes": [], "version": self.shared.weights.published_version(),
                                 "global_env_step": self.shared.counters.total("global_env_step"), "start": time.time()}
        return rid

    def _round_complete(self, rid: int) -> bool:
        r = self.eval_rounds.get(rid)
        return r is not None and len(r["episodes"]) >= r["expected"]

    def _close_round(self, rid: int, final: bool = False) -> dict:
        r = self.eval_rounds.pop(rid)
        per_task = defaultdict(list)
        for ep in r["episodes"]:
            per_task[ep["task_id"]].append(ep["success"])
        table = {self.spec.instructions[t]: float(np.mean(v)) for t, v in sorted(per_task.items())}
        success = float(np.mean([ep["success"] for ep in r["episodes"]]))
        step = r["global_env_step"]
        self.writer.add_scalar("eval/success_rate", success, step)
        self.writer.add_scalar("eval/episodic_return", float(np.mean([ep["return"] for ep in r["episodes"]])), step)
        self.writer.add_scalar("eval/episodic_length", float(np.mean([ep["length"] for ep in r["episodes"]])), step)
        for t, v in sorted(per_task.items()):
            self.writer.add_scalar(f"eval/success_rate_task_{t}", float(np.mean(v)), step)
        result = {"success_rate": success, "episodes": len(r["episodes"]), "version": r["version"],
                  "global_env_step": step, "per_task": table, "seconds": time.time() - r["start"]}
        log("main", f"eval round {rid}: success {success:.3f} over {len(r['episodes'])} episodes "
                    f"(policy version {r['version']}, env step {step:,})")
        if final:
            self._write_eval_table(result)
        return result

    def _write_eval_table(self, result: dict) -> None:
        lines = [f"# Greedy evaluation: {self.args.env.task}", "",
                 f"policy version {result['version']}, {result['episodes']} episodes, "
                 f"{result['seconds']:.0f} s, seed {self.args.experiment.seed}", "", "| task | success |", "|---|---|"]
        lines += [f"| {name} | {100 * s:.1f} % |" for name, s in result["per_task"].items()]
        lines += [f"| **suite** | **{100 * result['success_rate']:.1f} %** |"]
        (self.run_dir / "eval_results.md").write_text("\n".join(lines) + "\n")
        (self.run_dir / "eval_results.json").write_text(json.dumps(result, indent=1))

    # -- statistics ------------------------------------------------------------------------------
    def _drain_stats(self, timeout: float = 0.1) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                remaining = deadline - time.time()
                kind, role, payload = (self.chan.stats.get(timeout=remaining) if remaining > 0
                                       else self.chan.stats.get_nowait())
            except (queue.Empty, OSError, ValueError):
                return
            self._handle_stat(kind, role, payload)

    def _handle_stat(self, kind: str, role: str, payload) -> None:
        step = self.shared.counters.total("global_env_step")
        if kind == "error":
            log("main", f"{role} failed:\n{payload}")
            if self.args.experiment.mode == "serial":
                raise RuntimeError(f"{role} failed")
            return
        if kind == "episode":
            self.episode_window.append(payload["success"])
            self.writer.add_scalar("charts/episodic_return", payload["return"], step)
            self.writer.add_scalar("charts/episodic_length", payload["length"], step)
            self.writer.add_scalar("charts/success_rate", float(np.mean(self.episode_window)), step)
        elif kind == "imagined_episode":
            self.imagined_window.append(payload["success"])
            self.writer.add_scalar("charts/imagined_episodic_return", payload["return"], step)
            self.writer.add_scalar("charts/imagined_episodic_length", payload["length"], step)
            self.writer.add_scalar("charts/imagined_success_rate", float(np.mean(self.imagined_window)), step)
        elif kind == "eval_episode":
            video = payload.pop("video", None)
            if payload["round"] in self.eval_rounds:
                self.eval_rounds[payload["round"]]["episodes"].append(payload)
            if video is not None:
                self._log_video(f"videos/eval_task_{payload['task_id']}", Path(video), step)
        elif kind == "memory":
            for key, value in payload.items():
                self.writer.add_scalar(f"perf/{key}/{role}", value, step)
                largest = self.memory_max[key]
                largest[role] = max(largest.get(role, 0.0), value)
        elif kind in ("update", "perf"):
            for tag, value in payload.items():
                self.writer.add_scalar(tag, value, step)
                steady = self.steady_from is not None and not self.shared.train_stop.is_set()
                if tag.endswith("busy_fraction") and steady:
                    self.busy_fractions[tag].append(value)
            if kind == "update":
                self.learner_rates.append(payload["perf/learner_samples_per_s"])
                self.last_update_mark = (time.time(), self.shared.counters.total("global_env_step"))
                self.first_update_mark = self.first_update_mark or self.last_update_mark
                self.wm_updates = int(payload.get("wm/updates", self.wm_updates))

    def _log_video(self, tag: str, path: Path, step: int) -> None:
        """An animated GIF summary (what tensorboard's add_video writes, without needing moviepy)."""
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        try:
            frames = np.load(path)
        except (OSError, ValueError):
            return
        path.unlink(missing_ok=True)
        buf = io.BytesIO()
        images = [Image.fromarray(f) for f in frames]
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                              encoded_image_string=buf.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _progress(self) -> None:
        now = time.time()
        totals = self.shared.counters.totals()
        steps = totals["global_env_step"]
        imagined = totals["imagined_chunk_step"]
        dt = now - self.last_steps[0]
        rate = (steps - self.last_steps[1]) / dt if dt > 0 else 0.0
        imagined_rate = (imagined - self.last_steps[2]) / dt if dt > 0 else 0.0
        self.last_steps, self.last_log = (now, steps, imagined), now
        self.writer.add_scalar("perf/env_steps_per_s", rate, steps)
        self.writer.add_scalar("perf/chunk_steps", totals["chunk_step"], steps)
        self.writer.add_scalar("perf/env_restarts", totals["env_restarts"], steps)
        if self.args.workers.when_learner_behind == "drop-oldest":
            self.writer.add_scalar("perf/dropped_segments", totals["dropped_segments"], steps)
        self._handle_stat("memory", "main", memory_use())
        if self.args.wm.num_imagination_workers:
            self.writer.add_scalar("perf/imagined_chunk_steps_per_s", imagined_rate, steps)
            self.writer.add_scalar("perf/imagined_chunk_steps", imagined, steps)
        left = self.args.experiment.total_env_steps - steps
        eta = left / rate if rate > 0 else float("inf")
        if self.args.experiment.max_seconds:
            eta = min(eta, self.args.experiment.max_seconds - (now - self.start_time))
        pct = 100 * steps / self.args.experiment.total_env_steps
        bar = "#" * int(pct / 5) + "." * (20 - int(pct / 5))
        success = float(np.mean(self.episode_window)) if self.episode_window else 0.0
        imagination = ""
        if self.args.wm.num_imagination_workers:
            imagined_success = float(np.mean(self.imagined_window)) if self.imagined_window else 0.0
            imagination = (f" | imagined chunk steps {imagined:,} ({imagined_rate:,.0f}/s, success "
                           f"{imagined_success:.2f})")
        log("main", f"[{bar}] {pct:5.1f}% env steps {steps:,} | {rate:,.0f} steps/s | chunk steps "
                    f"{totals['chunk_step']:,} | updates {self.shared.weights.published_version()} | "
                    f"train success {success:.2f}{imagination} | ETA {_fmt_s(eta)}")

    def _steady_rate(self) -> float | None:
        if self.steady_from is None or self.train_end is None or self.train_end[0] <= self.steady_from[0]:
            return None
        return (self.train_end[1] - self.steady_from[1]) / (self.train_end[0] - self.steady_from[0])

    def _rate_between_updates(self) -> float | None:
        if self.first_update_mark is None:
            return None
        (t0, steps0), (t1, steps1) = self.first_update_mark, self.last_update_mark
        return (steps1 - steps0) / (t1 - t0) if t1 > t0 else None  # None: a single update

    def _write_summary(self, code: int) -> None:
        totals = self.shared.counters.totals()
        wall = time.time() - self.start_time
        # GPU (or CPU) busy fractions over the steady part, averaged over reports and processes
        busy = {tag.removeprefix("perf/"): float(np.mean(v)) for tag, v in self.busy_fractions.items() if v}
        summary = {"exit_code": code, "interrupted": self.interrupted, "task": self.args.env.task,
                   "mode": self.args.experiment.mode,
                   "final_eval_success": None if self.final_eval is None else self.final_eval["success_rate"],
                   "final_eval": self.final_eval, "global_env_step": totals["global_env_step"],
                   "chunk_step": totals["chunk_step"], "episodes": totals["episodes"],
                   "env_restarts": totals["env_restarts"], "dropped_segments": totals["dropped_segments"],
                   "updates": self.shared.weights.published_version(),
                   # the world model's rollouts, counted apart (global_env_step counts real steps only)
                   **{name: totals[name] for name in ("imagined_env_step", "imagined_chunk_step", "imagined_episodes",
                                                      "imagined_env_restarts")},
                   "imagined_chunk_steps_per_s": totals["imagined_chunk_step"] / max(wall, 1e-9),
                   "world_model": self.args.wm.wm_checkpoint, "wm_online_updates": self.wm_updates,
                   "wm_busy_fraction": busy.get("wm_busy_fraction"),
                   "wall_seconds": wall, "env_steps_per_s": totals["global_env_step"] / max(wall, 1e-9),
                   "steady_env_steps_per_s": self._steady_rate(),
                   # from the first update to the last: whole collect + train rounds (sync mode's fair rate)
                   "env_steps_per_s_between_updates": self._rate_between_updates(),
                   "learner_samples_per_s": float(np.median(self.learner_rates[1:])) if len(self.learner_rates) > 1 else None,
                   "inference_busy_fraction": busy.get("inference_busy_fraction"),
                   "learner_busy_fraction": busy.get("learner_busy_fraction"),
                   # per process, the largest value reported (GiB): resident host memory, torch's peak GPU allocation
                   "memory_max": {key: {name: round(v, 3) for name, v in sorted(largest.items())}
                                  for key, largest in self.memory_max.items()},
                   "versions": software_versions(self.args), "run_dir": str(self.run_dir)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.writer.close()
        log("main", f"summary: {json.dumps({k: v for k, v in summary.items() if k not in ('final_eval', 'versions')})}")


class _Builder:
    """A picklable zero-argument constructor (spawned processes receive it)."""

    def __init__(self, cls, *args):
        self.cls, self.args = cls, args

    def __call__(self):
        return self.cls(*self.args)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def main(args: Args) -> int:
    args = derive_and_check(args)
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main(parse_args()))  # tyro.cli with --policy.preset and the task family's defaults
