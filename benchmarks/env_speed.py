"""Env speed and baseline success rates of one env in this process (one core).

    python benchmarks/env_speed.py --task tabletop2d --seconds 5

Prints env steps/s with a rendered obs every step (`step`) and per chunk (`step_chunk`, random chunks of
`--chunk-len`), then success rates over `--episodes` episodes of: uniformly random actions, and for
tabletop2d also the scripted expert and an instruction-ignoring expert (goes to a random object, the
1/K baseline). The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import make_env, parse_task  # noqa: E402


def steps_per_second(env, seconds: float, chunk_len: int | None, rng: np.random.Generator) -> float:
    """Env steps/s under random actions, one `step` per call (chunk_len None) or one `step_chunk`."""
    env.reset()
    env_steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if chunk_len is None:
            _, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, 7))
        else:
            _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (chunk_len, 7)))
        env_steps += info["env_steps"]
        if terminated or truncated:
            env.reset()
    return env_steps / (time.perf_counter() - start)


def success_rate(env, episodes: int, policy: str, chunk_len: int, rng: np.random.Generator) -> float:
    """Fraction of episodes that end in success; policy is "random", "expert", "ignore_instruction" (the
    expert heading for a random object) or "sweep" (`sweep_chunk`: every slot in turn, gripper closed)."""
    from envs.tabletop2d import expert_chunk, sweep_chunk

    successes = 0
    for _ in range(episodes):
        env.reset()
        decoy = int(rng.integers(env.spec.num_tasks))  # the object an instruction-ignoring policy picks
        done = False
        while not done:
            if policy == "random":
                chunk = rng.uniform(-1, 1, (chunk_len, 7))
            elif policy == "sweep":
                chunk = sweep_chunk(env, chunk_len)
            else:
                chunk = expert_chunk(env, chunk_len, task_id=decoy if policy == "ignore_instruction" else None)
            _, _, terminated, truncated, info = env.step_chunk(chunk)
            done = terminated or truncated
        successes += info["success"]
    return successes / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tabletop2d", help="task family, optionally /<index>")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each speed measurement")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per success rate")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--chunk-len", type=int, default=8)
    parser.add_argument("--wrist-camera", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    env = make_env(args.task, args.image_size, args.seed, wrist_camera=args.wrist_camera)
    result = {"task": args.task, "image_size": args.image_size, "cameras": list(env.spec.cameras)}
    result["steps_per_s_rendered_every_step"] = steps_per_second(env, args.seconds, None, rng)
    result["steps_per_s_chunked"] = steps_per_second(env, args.seconds, args.chunk_len, rng)
    print(f"{args.task}: {result['steps_per_s_rendered_every_step']:,.0f} env steps/s rendering every step, "
          f"{result['steps_per_s_chunked']:,.0f} env steps/s in chunks of {args.chunk_len}")
    scripted = ["ignore_instruction", "sweep", "expert"]
    policies = ["random"] + (scripted if parse_task(args.task)[0] == "tabletop2d" else [])
    for policy in policies:
        start = time.perf_counter()
        rate = success_rate(env, args.episodes, policy, args.chunk_len, rng)
        result[f"success_{policy}"] = rate
        print(f"success of {policy} policy: {rate:.3f} over {args.episodes} episodes "
              f"({time.perf_counter() - start:.1f} s)")
    env.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
