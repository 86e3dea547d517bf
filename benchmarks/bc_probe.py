"""Supervised probe of a policy architecture: behaviour-clone the tabletop2d scripted expert and report
greedy success. If an architecture cannot learn the task from expert labels in a few hundred steps, RL
from a sparse reward will not learn it in 20 minutes either.

    python benchmarks/bc_probe.py --lr 1e-3 --steps 300 --policy action_head=smooth vision_layers=2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from envs.tabletop2d import Tabletop2D, expert_chunk  # noqa: E402
from vla_policy import InstructionTokenizer, PolicyConfig, VLAPolicy, actions_to_tokens  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--policy", nargs="*", default=[], help="PolicyConfig overrides name=value")
    parser.add_argument("--env-options", default="{}", help="tabletop2d options as JSON")
    parser.add_argument("--active-dims", default="0,1,2,3,4,5,6",
                        help="action dims in the loss (tabletop2d ignores 2-5: their tokens are pure label noise)")
    parser.add_argument("--noise", type=float, default=0.1, help="expert action noise (normalised units)")
    parser.add_argument("--only-task", type=int, default=None, help="pin one task (vision-only probe)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.policy:
        key, value = item.split("=")
        field_type = type(getattr(PolicyConfig(), key))
        overrides[key] = field_type(value) if field_type is not bool else value == "True"
    policy = VLAPolicy(PolicyConfig(**overrides))
    tokenizer = InstructionTokenizer()
    env = Tabletop2D(seed=0, only_task=args.only_task, **json.loads(args.env_options))
    instructions = tokenizer.encode(list(env.spec.instructions), policy.cfg.max_instruction_tokens)
    rng = np.random.default_rng(0)
    images, texts, actions = [], [], []
    while len(images) < 3000:
        obs = env.reset()
        for _ in range(3):
            chunk = expert_chunk(env, noise=args.noise, rng=rng)
            images.append(obs["image"])
            texts.append(instructions[env.task_id])
            actions.append(chunk)
            obs, _, terminated, truncated, _ = env.step_chunk(chunk)
            if terminated or truncated:
                break
    X = torch.from_numpy(np.stack(images))[:, None]
    T = torch.stack(texts)
    A = actions_to_tokens(torch.from_numpy(np.stack(actions)).float())
    active = [int(d) for d in args.active_dims.split(",")]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)

    def greedy_success(episodes: int = 100) -> float:
        policy.eval()
        wins = 0
        for ep in range(episodes):
            obs = env.reset(seed=10_000 + ep)
            for _ in range(8):
                with torch.no_grad():
                    out = policy.act(torch.from_numpy(obs["image"])[None, None], instructions[env.task_id][None],
                                     greedy=True)
                obs, _, terminated, truncated, _ = env.step_chunk(out["actions"][0].numpy())
                if terminated or truncated:
                    wins += int(terminated)
                    break
        policy.train()
        return wins / episodes

    start = time.time()
    for step in range(args.steps + 1):
        idx = torch.randint(0, len(X), (args.batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy.evaluate(X[idx], T[idx], A[idx])
        loss = -out["logp"][:, :, active].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            print(f"step {step} {time.time() - start:.0f}s loss {loss.item():.3f} "
                  f"greedy success {greedy_success():.2f}", flush=True)


if __name__ == "__main__":
    main()
