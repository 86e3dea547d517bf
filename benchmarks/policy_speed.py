"""CPU speed of the VLA policy: batched inference (`act`) and one learner step (`evaluate` + backward + AdamW).

    python benchmarks/policy_speed.py --threads 1 --batch 8 16 32 --seconds 5

Prints the parameter count, inferences/s (= observations/s: batch x forward calls per second) for every
batch size in float32 and under bf16 autocast, the time of one training step, and a final JSON line with
everything (for scripts and for platform.md). Every number comes per wall-clock second and per CPU-second
of this process: on a shared machine the wall-clock rate drops with other load, the CPU-time one does not
(compare the two to see contention; with --threads 2 CPU time also counts the threads' spinning).
Random weights and full-length random instructions (no pad columns to trim: the worst case); speed does
not depend on the values, except for denormals, which the policy flushes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from preset_speed import learner_step, random_proprio, synthetic_rollout  # noqa: E402  (argparse only, no tyro)
from vla_policy import PolicyConfig, VLAPolicy, policy_autocast  # noqa: E402


@dataclass
class Args:
    threads: int = 1
    """torch intra-op threads (the platform runs the policy on one core and leaves the other to the envs)."""
    batch: list[int] = field(default_factory=lambda: [8, 16, 32])
    """Inference batch sizes to time."""
    seconds: float = 5.0
    """Timing budget per measurement (after one warm-up call)."""
    train_batch: int = 64
    """Batch of one learner step."""
    train_steps: int = 3
    """Learner steps timed (after one warm-up step)."""
    bf16: bool = True
    """Also time inference and training under CPU bf16 autocast."""
    layout: str = "per_step"
    """PolicyConfig.layout."""
    overrides: str = ""
    """Extra PolicyConfig fields as JSON, e.g. '{"decoder_layers": 4}' (for sweeps)."""


def random_inputs(cfg: PolicyConfig, batch: int, generator: torch.Generator):
    """Random uint8 images and full-length instruction ids (the worst case: no padding)."""
    images = torch.randint(0, 256, (batch, cfg.num_cameras, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, generator=generator)
    tokens = torch.randint(3, 259, (batch, cfg.max_instruction_tokens), generator=generator)
    return images, tokens


def time_inference(policy: VLAPolicy, batch: int, seconds: float, bf16: bool) -> tuple[float, float]:
    """Observations per second through `act` (sampling included): per wall-clock second, and per second of
    this process's CPU time (the intrinsic speed when other processes share the cores; with one thread)."""
    images, tokens = random_inputs(policy.cfg, batch, torch.Generator().manual_seed(batch))
    proprio = random_proprio(policy.cfg, batch)
    with policy_autocast("cpu", cpu_bf16=bf16):
        policy.act(images, tokens, **proprio)  # warm-up: allocator, oneDNN primitive caches
        calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            policy.act(images, tokens, **proprio)
            calls += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return calls * batch / wall, calls * batch / cpu


def time_training(policy: VLAPolicy, batch: int, steps: int, bf16: bool) -> tuple[float, float]:
    """Seconds per learner step (wall, CPU): evaluate + a policy-gradient + value + KL loss, backward, AdamW."""
    images, tokens = random_inputs(policy.cfg, batch, torch.Generator().manual_seed(0))
    rollout = synthetic_rollout(policy.cfg, batch)
    optimiser = torch.optim.AdamW([{"params": policy.policy_parameters(), "lr": 1e-4},
                                   {"params": policy.value_parameters(), "lr": 1e-4}])
    params = list(policy.parameters())
    policy.train()
    durations, cpu_durations = [], []
    for step in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        learner_step(policy, images, tokens, rollout, optimiser, params, policy_autocast("cpu", cpu_bf16=bf16))
        if step:  # the first step allocates AdamW state
            durations.append(time.perf_counter() - start)
            cpu_durations.append(time.process_time() - cpu_start)
    policy.eval()
    return sum(durations) / len(durations), sum(cpu_durations) / len(cpu_durations)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PolicyConfig(layout=args.layout, **(json.loads(args.overrides) if args.overrides else {}))
    policy = VLAPolicy(cfg).eval()
    params = policy.num_parameters()
    print(f"threads={args.threads} layout={cfg.layout} slots={cfg.num_action_slots} "
          f"seq={cfg.vision_tokens + cfg.max_instruction_tokens + cfg.num_action_slots} params={params / 1e6:.2f} M")
    result = {"threads": args.threads, "config": dataclasses.asdict(cfg), "params": params, "inference": {}}
    dtypes = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    for dtype in dtypes:
        for batch in args.batch:
            rate, cpu_rate = time_inference(policy, batch, args.seconds, bf16=dtype == "bf16")
            result["inference"][f"{dtype}_b{batch}"] = round(rate, 1)
            result["inference"][f"{dtype}_b{batch}_per_cpu_s"] = round(cpu_rate, 1)
            print(f"act  {dtype}  batch {batch:3d}: {rate:7.1f} inferences/s  ({rate / batch:6.2f} calls/s, "
                  f"{cpu_rate:7.1f} per CPU-second)")
    for dtype in dtypes:
        seconds, cpu_seconds = time_training(policy, args.train_batch, args.train_steps, bf16=dtype == "bf16")
        result[f"train_step_s_{dtype}"] = round(seconds, 3)
        result[f"train_step_cpu_s_{dtype}"] = round(cpu_seconds, 3)
        result[f"train_samples_per_s_{dtype}"] = round(args.train_batch / seconds, 1)
        print(f"train {dtype} batch {args.train_batch}: {seconds:.3f} s/step  "
              f"({args.train_batch / seconds:.1f} samples/s, {cpu_seconds:.3f} CPU-s/step)")
    print(json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args))
