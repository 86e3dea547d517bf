"""Can the per-token RL update learn tabletop2d at all, and which part is hard? A probe outside the pipeline.

    python benchmarks/rl_probe.py --obs relative --num-minibatches 16     # privileged: target - EE given
    python benchmarks/rl_probe.py --obs objects --ent-coef 0.01           # privileged: every object + task
    python benchmarks/rl_probe.py --obs objects --trunk relu --lr 1e-3 --ent-coef 0.01 --updates 500
                                               # learns the grounding from scratch (~1 M env steps, docs/RESULTS.md)
    python benchmarks/rl_probe.py --obs objects --trunk relu --lr 1e-3 --bc-steps 400   # the same net on labels
    python benchmarks/rl_probe.py --obs pixels                            # a small CNN on the 128 px image
    python benchmarks/rl_probe.py --obs pixels --image-size 64 --pixel-norm   # the mean frame subtracted, unit std
    python benchmarks/rl_probe.py --obs pixels+ee --cnn instructed --image-size 64 --trunk relu --lr 1e-3 \
        --ent-coef 0.01 --updates 500 --relabel   # hindsight relabelling: solves it from pixels (~0.5-0.8 M env steps)
    python benchmarks/rl_probe.py --obs pixels+proprio --net vla --image-size 64 --lr 1e-3 --ent-coef 0.01 --relabel \
        --vla-config '{"decoder_layers": 1, "hidden": 128, "instructed_keypoints": true}'   # the pipeline's VLAPolicy

One process, synchronous PPO-style loop: `--num-envs` tabletop2d envs step `--segment-len` chunks per update
(one chunk = 8 actions), then `--update-epochs` x `--num-minibatches` optimiser steps on the batch. The
policy head is the default VLA's: 256 bins per action dimension through the "smooth" basis, one token per
(chunk step, used dimension), and the objective, GAE and token masking are accerl.py's own functions
(`policy_objective`, `compute_gae`, chunk steps after an episode's end left out). What changes is the input:

  relative  [target - EE, EE, task one-hot]: the direction to go is in the input (no perception, no grounding)
  objects   [all 4 object positions, EE, task one-hot]: the policy must pick the instructed object (grounding)
  pixels    the rendered image + task one-hot through a 3-layer CNN (perception and grounding)
  pixels+ee the same + the EE position (what the objects probe also gets), `--cnn keypoints`: spatial softmax

Every `--eval-every` updates, over the last 200 training episodes: success, the share that ended in a wrong
grasp, and the share of grasps made at the most grasped of the four corners (0.25: no favourite corner, 1.0:
always the same corner); then the mean token entropy of the used dimensions and greedy success on
`--eval-episodes` fixed-seed episodes. Results: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accerl import AlgorithmArgs, compute_gae, hindsight_copies, policy_objective  # noqa: E402
from envs.tabletop2d import SLOTS, Tabletop2D  # noqa: E402
from vla_policy import actions_to_tokens, spatial_softmax, tokens_to_actions  # noqa: E402

USED_DIMS = (0, 1, 6)  # the action dims tabletop2d reads: x, y, gripper
NUM_TASKS = 4


class SmoothBinHead(nn.Module):
    """hidden -> (chunk, used dims, bins) logits through Gaussian bumps over the bin centres, as VLAPolicy's
    "smooth" head; initial logits near 0 (a near-uniform policy)."""

    def __init__(self, hidden: int, chunk_len: int, num_bins: int, basis: int = 24, init_scale: float = 0.01):
        super().__init__()
        self.shape = (chunk_len, len(USED_DIMS), basis)
        self.linear = nn.Linear(hidden, math.prod(self.shape))
        nn.init.normal_(self.linear.weight, std=init_scale / math.sqrt(hidden))
        nn.init.zeros_(self.linear.bias)
        centres = tokens_to_actions(torch.arange(num_bins), num_bins)
        means, width = torch.linspace(-1, 1, basis), 2 / (basis - 1)
        self.register_buffer("basis", torch.exp(-0.5 * ((centres[:, None] - means[None]) / width) ** 2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h).view(-1, *self.shape) @ self.basis.T


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2C) expected (x, y) of each channel's softmax over positions: keypoints
    (Levine et al. 2016), so the trunk gets where things are, as the objects probe gets positions."""

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_softmax(x, self.log_temperature)


class InstructedKeypoints(nn.Module):
    """Feature maps + task one-hot -> where the instructed object is: each of `heads` queries (a linear map of
    the task one-hot) scores every position by a dot product with its feature vector, and the spatial softmax
    of those scores gives one expected (x, y) per head. Cross-attention from the instruction to the image
    with positions as values: the grounding the objects probe learns, as one bilinear map."""

    def __init__(self, channels: int, num_tasks: int, heads: int = 4):
        super().__init__()
        self.query = nn.Linear(num_tasks, heads * channels, bias=False)
        self.heads, self.channels = heads, channels
        self.keypoints = SpatialSoftmax()

    def forward(self, maps: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        query = self.query(task).view(-1, self.heads, self.channels)
        scores = torch.einsum("bhc,bcyx->bhyx", query, maps) / math.sqrt(self.channels)
        return self.keypoints(scores)


class ProbePolicy(nn.Module):
    def __init__(self, obs: str, obs_dim: int, image_size: int, chunk_len: int, num_bins: int,
                 trunk: str = "tanh", cnn: str = "nature"):
        super().__init__()
        self.obs, self.image_size = obs, image_size
        extra = obs_dim - 3 * image_size ** 2 if obs.startswith("pixels") else 0  # task one-hot (+ EE)
        # --pixel-norm: subtract the mean frame and divide by the pixels' std (the table and its texture
        # are the same in every frame; what differs, objects and EE, then carries the input's scale)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.pixel_scale = 1.0
        if obs.startswith("pixels") and cnn == "instructed":  # the task one-hot queries the maps -> ReLU trunk
            self.cnn = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
                                     nn.Conv2d(32, 32, 1))
            self.instructed = InstructedKeypoints(32, NUM_TASKS)
            self.trunk = nn.Sequential(nn.Linear(2 * 4 + extra, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        elif obs.startswith("pixels") and cnn == "keypoints":  # maps at half resolution -> 16 keypoints -> ReLU trunk
            self.cnn = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
                                     nn.Conv2d(32, 16, 1), SpatialSoftmax())
            self.trunk = nn.Sequential(nn.Linear(32 + extra, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        elif obs.startswith("pixels"):
            self.cnn = nn.Sequential(nn.Conv2d(3, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                                     nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten())
            features = self.cnn(torch.zeros(1, 3, image_size, image_size)).shape[1] + extra
            self.trunk = nn.Sequential(nn.Linear(features, 256), nn.ReLU())
        else:
            act = nn.Tanh if trunk == "tanh" else nn.ReLU
            width = 128 if trunk == "tanh" else 256
            self.trunk = nn.Sequential(nn.Linear(obs_dim, width), act(), nn.Linear(width, 256), act())
        self.head = SmoothBinHead(256, chunk_len, num_bins)
        self.value = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.obs.startswith("pixels"):
            p = 3 * self.image_size ** 2
            pixels = x[:, :p].view(-1, self.image_size, self.image_size, 3).permute(0, 3, 1, 2) / 255
            pixels = (pixels - self.pixel_mean) * self.pixel_scale
            features = self.cnn(pixels)
            if hasattr(self, "instructed"):  # the task one-hot is the input's last NUM_TASKS entries
                features = self.instructed(features, x[:, -NUM_TASKS:])
            x = torch.cat([features, x[:, p:]], 1)
        h = self.trunk(x)
        return self.head(h), self.value(h).squeeze(-1)


class VLAProbe(nn.Module):
    """`--net vla`: the pipeline's VLAPolicy (ResNet tower + instruction FiLM + the session-3 init scales,
    `--vla-keypoints` keypoints, the env's 3-D proprio) in the probe's loop, on `--obs pixels+proprio`: the
    instruction tokens are task k's, the logits those of the used dims. Same loop, same head size: what
    differs from `--cnn instructed` is the network alone."""

    def __init__(self, image_size: int, chunk_len: int, num_bins: int, keypoints: int, overrides: dict):
        super().__init__()
        from envs.tabletop2d import INSTRUCTIONS
        from vla_policy import PolicyConfig, VLAPolicy, make_tokenizer

        fields = dict(image_size=image_size, vision_tower="resnet", instruction_film=True, decoder_init_std=0.0625,
                      embedding_init_std=0.3, keypoints=keypoints, proprio_dim=3, chunk_len=chunk_len,
                      num_bins=num_bins)
        cfg = PolicyConfig(**{**fields, **overrides})  # --vla-config wins
        self.vla, self.image_size = VLAPolicy(cfg), image_size
        self.register_buffer("instructions", make_tokenizer(cfg).encode(list(INSTRUCTIONS), cfg.max_instruction_tokens))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = 3 * self.image_size ** 2
        images = x[:, :p].view(-1, 1, self.image_size, self.image_size, 3).round().to(torch.uint8)
        task = x[:, -NUM_TASKS:].argmax(1)
        logits, value = self.vla(images, self.instructions[task], proprio=x[:, p:p + 3])
        return logits[:, :, list(USED_DIMS)], value


def observe(env: Tabletop2D, obs: str) -> np.ndarray:
    task = np.eye(NUM_TASKS)[env.task_id]
    if obs == "relative":
        return np.concatenate([env.target_xy - env.ee_xy, env.ee_xy, task]).astype(np.float32)
    if obs == "objects":
        return np.concatenate([env.object_xy.reshape(-1), env.ee_xy, task]).astype(np.float32)
    image = env._observe()["image"].reshape(-1)
    if obs == "pixels+ee":
        return np.concatenate([image, env.ee_xy, task]).astype(np.float32)
    if obs == "pixels+proprio":
        return np.concatenate([image, env._observe()["proprio"], task]).astype(np.float32)
    return np.concatenate([image, task]).astype(np.float32)


def to_env_actions(tokens: torch.Tensor, num_bins: int) -> np.ndarray:
    """(chunk, used dims) bins -> (chunk, 7) env actions; unused dims 0."""
    actions = np.zeros((tokens.shape[0], 7))
    actions[:, USED_DIMS] = tokens_to_actions(tokens, num_bins).numpy()
    return actions


def greedy_success(policy: ProbePolicy, args, make) -> float:
    successes = 0
    for i in range(args.eval_episodes):
        env = make(10**6 + i)
        env.reset()
        done = False
        while not done:
            with torch.no_grad():
                logits, _ = policy(torch.from_numpy(observe(env, args.obs))[None])
            _, _, terminated, truncated, info = env.step_chunk(to_env_actions(logits[0].argmax(-1), args.num_bins))
            done = terminated or truncated
        successes += info["success"]
    return successes / args.eval_episodes


def behaviour_cloning(policy: ProbePolicy, optimizer, args, make) -> None:
    """`--bc-steps`: the same policy and head trained by cross-entropy on the scripted expert's chunks (noise
    0.1) from fresh episodes' first states, a batch of `--num-envs` x 4: what the network can learn from
    labels, beside what RL gets out of it."""
    from envs.tabletop2d import expert_chunk

    rng, env, batch = np.random.default_rng(args.seed), make(args.seed + 7), args.num_envs * 4
    start = time.time()
    for step in range(1, args.bc_steps + 1):
        xs, targets = [], []
        for _ in range(batch):
            env.reset()
            xs.append(observe(env, args.obs))
            chunk = expert_chunk(env, args.chunk_len, noise=0.1, rng=rng)[:, USED_DIMS]
            targets.append(actions_to_tokens(torch.from_numpy(chunk).float(), args.num_bins))
        logits, _ = policy(torch.from_numpy(np.stack(xs)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 2), torch.stack(targets).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.bc_steps:
            print(f"bc_step {step} wall_s {time.time() - start:.0f} loss {loss.item():.3f} greedy_success "
                  f"{greedy_success(policy, args, make):.2f}", flush=True)


def relabelled(policy, columns, rewards, terminated, truncated, achieved):
    """Hindsight copies of the segment's wrong-grasp episodes (`--relabel`), made by the learner's own
    `hindsight_copies` with the task one-hot (the input's last NUM_TASKS entries) as the instruction: the rows of
    each such episode with the grasped object's one-hot, reward 1 at the grasp; values from the current critic
    under the new instruction, GAE within the episode, behaviour log-probs kept. Other rows get mask 0."""
    obs, tokens, behaviour_logp, _, _, ran, _, behaviour_all = columns
    task = obs[..., -NUM_TASKS:]
    copies = hindsight_copies({
        "obs": obs, "instruction": task, "task_id": task.argmax(-1), "achieved_task": achieved, "reward": rewards,
        "terminated": terminated, "truncated": truncated, "mask": torch.ones_like(terminated), "tokens": tokens,
        "behaviour_logp": behaviour_logp, "ran": ran, "behaviour_all": behaviour_all}, torch.eye(NUM_TASKS))
    if copies is None:
        return None
    copies["obs"][..., -NUM_TASKS:] = copies["instruction"]
    R, T = copies["reward"].shape
    with torch.no_grad():
        values = policy(copies["obs"].flatten(0, 1))[1].view(R, T)
    advantages, returns = compute_gae(copies["reward"], values, torch.zeros(R), copies["terminated"],
                                      copies["truncated"], torch.zeros(R, T), 0.99, 0.95)
    return [copies["obs"], copies["tokens"], copies["behaviour_logp"], advantages, returns,
            copies["ran"] * copies["mask"][..., None, None].float(), torch.zeros(R, T), copies["behaviour_all"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obs", default="relative", choices=["relative", "objects", "pixels", "pixels+ee",
                                                                    "pixels+proprio"])
    parser.add_argument("--env-options", default="{}", help='tabletop2d options as JSON, e.g. \'{"layout": "fixed"}\'')
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--segment-len", type=int, default=16, help="chunk steps per env per update")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--update-epochs", type=int, default=1)
    parser.add_argument("--num-minibatches", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ent-coef", type=float, default=0.0)
    parser.add_argument("--loss", default="gipo", choices=["gipo", "ppo-clip", "sapo", "no-clip"])
    parser.add_argument("--chunk-len", type=int, default=8)
    parser.add_argument("--num-bins", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trunk", default="tanh", choices=["tanh", "relu"],
                        help="state trunk: tanh 128-256 or relu 256-256 (relative and objects only)")
    parser.add_argument("--cnn", default="nature", choices=["nature", "keypoints", "instructed"],
                        help="pixels: the 3-layer Nature-DQN CNN, convs + spatial softmax (16 keypoints), or "
                             "convs + 4 keypoints whose maps the task one-hot queries (InstructedKeypoints)")
    parser.add_argument("--net", default="probe", choices=["probe", "vla"],
                        help="the probe's networks (--cnn, --trunk) or the pipeline's VLAPolicy (VLAProbe; needs "
                             "--obs pixels+proprio)")
    parser.add_argument("--vla-keypoints", type=int, default=16)
    parser.add_argument("--vla-config", default="{}", help='more PolicyConfig fields as JSON, e.g. \'{"hidden": 128}\'')
    parser.add_argument("--kl-coef", type=float, default=0.0,
                        help="KL(behaviour || current) over the used dims' full categoricals, as the learner's")
    parser.add_argument("--pixel-norm", action="store_true",
                        help="pixels: subtract the mean of 512 reset frames and divide by their std")
    parser.add_argument("--relabel", action="store_true",
                        help="hindsight instruction relabelling: an episode that ended in a wrong grasp of object j "
                             "is also trained on as a success of task j (its rows copied with task j's one-hot, "
                             "reward 1 at the grasp, values from the current critic, the behaviour log-probs kept)")
    parser.add_argument("--bc-steps", type=int, default=0,
                        help="instead of RL: this many behaviour-cloning steps on the scripted expert (labels)")
    args = parser.parse_args()
    options = json.loads(args.env_options)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    def make(seed: int) -> Tabletop2D:
        return Tabletop2D(image_size=args.image_size, seed=seed, **options)

    envs = [make(args.seed * 1000 + i) for i in range(args.num_envs)]
    for env in envs:
        env.reset()
    obs_dim = observe(envs[0], args.obs).shape[0]
    if args.net == "vla":
        if args.obs != "pixels+proprio":
            parser.error("--net vla reads the image, the proprio and the task: use --obs pixels+proprio")
        policy = VLAProbe(args.image_size, args.chunk_len, args.num_bins, args.vla_keypoints,
                          json.loads(args.vla_config))
    else:
        policy = ProbePolicy(args.obs, obs_dim, args.image_size, args.chunk_len, args.num_bins, args.trunk,
                             cnn=args.cnn)
    if args.obs.startswith("pixels") and args.pixel_norm:
        probe_env, frames = make(args.seed + 99), []
        for _ in range(512):
            probe_env.reset()
            frames.append(probe_env._observe()["image"])
        frames = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
        policy.pixel_mean.data = frames.mean(0)
        policy.pixel_scale = 1.0 / float((frames - frames.mean(0)).std())
        print(f"# pixel norm: centred std {1 / policy.pixel_scale:.4f}", flush=True)
    optimizer = torch.optim.Adam(policy.parameters(), args.lr)
    algo = AlgorithmArgs(loss=args.loss)
    print(f"# rl_probe {vars(args)}", flush=True)
    if args.bc_steps:
        return behaviour_cloning(policy, optimizer, args, make)
    N, T, K, D = args.num_envs, args.segment_len, args.chunk_len, len(USED_DIMS)
    start, env_steps, outcomes, wrong, slots = time.time(), 0, [], [], []
    for update in range(1, args.updates + 1):
        obs = torch.zeros(N, T, obs_dim)
        tokens = torch.zeros(N, T, K, D, dtype=torch.long)
        behaviour_logp, behaviour_all = torch.zeros(N, T, K, D), torch.zeros(N, T, K, D, args.num_bins)
        rewards, values, trunc_values = torch.zeros(N, T), torch.zeros(N, T), torch.zeros(N, T)
        terminated, truncated = torch.zeros(N, T, dtype=torch.bool), torch.zeros(N, T, dtype=torch.bool)
        steps_run = torch.zeros(N, T, dtype=torch.long)
        achieved = torch.full((N, T), -1, dtype=torch.long)  # at an episode's termination: the task it met
        for t in range(T):
            x = torch.from_numpy(np.stack([observe(env, args.obs) for env in envs]))
            with torch.no_grad():
                logits, value = policy(x)
                log_probs = logits.log_softmax(-1)
                sampled = torch.distributions.Categorical(logits=log_probs).sample()
            obs[:, t], tokens[:, t], values[:, t] = x, sampled, value
            behaviour_logp[:, t] = log_probs.gather(-1, sampled[..., None])[..., 0]
            behaviour_all[:, t] = log_probs
            for i, env in enumerate(envs):
                _, reward, term, trunc, info = env.step_chunk(to_env_actions(sampled[i], args.num_bins))
                env_steps += info["env_steps"]
                rewards[i, t], terminated[i, t], truncated[i, t], steps_run[i, t] = reward, term, trunc, info["env_steps"]
                if term:
                    achieved[i, t] = info["achieved_task"]
                if trunc:  # the time limit is not part of the task: bootstrap from the final state
                    with torch.no_grad():
                        trunc_values[i, t] = policy(torch.from_numpy(observe(env, args.obs))[None])[1][0]
                if term or trunc:
                    outcomes.append(float(info["success"]))
                    wrong.append(float(term and not info["success"]))
                    if term:  # the corner (slot) of the grasped object
                        slots.append(int(np.linalg.norm(SLOTS - env.object_xy[info["grasped"]], axis=1).argmin()))
                    env.reset()
        with torch.no_grad():
            bootstrap = policy(torch.from_numpy(np.stack([observe(env, args.obs) for env in envs])))[1]
        advantages, returns = compute_gae(rewards, values, bootstrap, terminated, truncated, trunc_values, 0.99, 0.95)
        ran = (torch.arange(K)[None, None] < steps_run[..., None]).float()[..., None].expand(-1, -1, K, D)
        columns = [obs, tokens, behaviour_logp, advantages, returns, ran, torch.ones(N, T), behaviour_all]
        copies = relabelled(policy, columns, rewards, terminated, truncated, achieved) if args.relabel else None
        if copies is not None:
            columns = [torch.cat(pair) for pair in zip(columns, copies)]
        rows = columns[0].shape[0] * T
        flat = [z.reshape(rows, *z.shape[2:]) for z in columns]
        keep = flat[5].flatten(1).any(1)  # relabelled copies keep only their episodes' rows
        flat = [z[keep] for z in flat]
        flat[3] = (flat[3] - flat[3].mean()) / (flat[3].std() + 1e-8)
        for _ in range(args.update_epochs):
            for idx in torch.randperm(len(flat[0])).chunk(args.num_minibatches):
                x, tok, old_logp, adv, ret, mask, own, old_all = (z[idx] for z in flat)
                logits, value = policy(x)
                log_probs = logits.log_softmax(-1)
                logp = log_probs.gather(-1, tok[..., None])[..., 0]
                per_token, _ = policy_objective(args.loss, logp, old_logp, adv[:, None, None], algo)
                entropy = (-(log_probs.exp() * log_probs).sum(-1) * mask).sum() / mask.sum()
                kl = (old_all.exp() * (old_all - log_probs)).sum(-1) * mask * own[:, None, None, None]
                loss = (per_token * mask).sum() / mask.sum() + 0.5 * (value - ret).square().mean() \
                    - args.ent_coef * entropy + args.kl_coef * kl.sum() / mask.sum()
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
        if update % args.eval_every == 0 or update == args.updates:
            print(f"update {update} env_steps {env_steps} wall_s {time.time() - start:.0f} train_success "
                  f"{np.mean(outcomes[-200:]):.2f} wrong_grasp {np.mean(wrong[-200:]):.2f} top_slot_share "
                  f"{np.bincount(slots[-200:], minlength=4).max() / max(len(slots[-200:]), 1):.2f} "
                  f"entropy {entropy.item():.2f} greedy_success "
                  f"{greedy_success(policy, args, make):.2f}", flush=True)


if __name__ == "__main__":
    main()
