"""world_model: a trainable diffusion world model and the imagined env it drives (reference.md section 5).

    python world_model.py collect --episodes 50 --image-size 64 --out demos/wm_tabletop2d    # weak policies
    python world_model.py train --data demos/wm_tabletop2d --model.image-size 64           # -> <run>/world_model
    python world_model.py eval --checkpoint runs/X/world_model --data demos/wm_tabletop2d  # quality table
    tensorboard --logdir runs

Read top to bottom: WorldModelConfig -> the networks (EDM denoiser on a small AdaGN U-Net, reward /
termination model) -> WorldModel (both, `imagine`, save / load) -> transitions from demonstration files
(and `StepReplay`, recent real steps for online training) -> the client interface and `ImaginedEnv` ->
`WorldModelServer` (batched, shared memory) -> training -> evaluation metrics -> collection of
weak-policy data -> the command line.

The transition model (DIAMOND, Alonso et al. 2024, and EDM, Karras et al. 2022) predicts frame t+1 in
pixel space from the last K frames o_{t-K+1..t} and the K actions a_{t-K+1..t} taken at them (action j
leads from frame j to frame j+1). Frames are stacked on channels with the noisy next frame; the actions
(one Linear(7 -> 64) per slot, concatenated) are added to the noise embedding and condition every
residual block through adaptive group norm. Episode starts are padded by repeating the first frame with
zero actions, so imagination can start from a single real first frame. Sampling: Euler, 3 steps; the
result is clamped and quantised to 8 bits, as a real camera frame.

The reward / termination model is a transition classifier: from the same K frames and K actions (and the
task) it gives the probability that the state after action a_t is a success. The paper's classifier looks
at a frame; ours looks at the transition because the demonstration layout (demos.py, LIBERO's) stores the
observation *before* each action, so the success frame itself is never recorded, and because a frame
classifier would judge the denoiser's least reliable output (the imagined frame) instead of the context.
Its second output is the end of the episode: the probability that the env terminated after a_t, for
success or failure (tabletop2d's wrong grasp ends a real episode with reward 0; LIBERO's episodes end on
success only, where the two outputs learn the same label). An imagined episode terminates when either
probability reaches `end_threshold` (the paper's argmax on success); without the end output (`end_head`
False, as world models saved before it) an imagined episode went on after a wrong grasp, in frames the
model never saw. Imagined reward = p(t) - p(t-1) of the success probability, with p = 0 at the start (a
real episode never starts in success): potential-based, so an episode's return telescopes to p_end
(reference.md section 5).

Who sends what to whom when the world model is served (queues carry slot indices, data live in
`ImaginationSlots`, shared memory):

    ImaginedEnv (ServedWorldModel client c, slot s) --(c, s)--> wm_requests --> world_model
    ImaginedEnv <--s-- wm_replies[c] <-- world_model      (frames, success and end probs, proprio in the slot)
    trainer --weights + version (WeightBroadcast seqlock)--> world_model

Metric tags (all written by the one process that owns the writer): `wm/denoiser_loss`, `wm/reward_loss`,
`wm/loss`, `wm/grad_norm`, `wm/lr`, `wm/reward_train_accuracy`, `wm/end_loss`, `wm/proprio_loss`,
`perf/wm_samples_per_s` while training;
`wm/next_frame_psnr`, `wm/next_frame_ssim`, `wm/open_loop_psnr_h<h>`, `wm/copy_last_psnr_h<h>` (the
baseline that repeats the last real frame), `wm/reward_accuracy`, `wm/reward_balanced_accuracy`,
`wm/reward_ece`, `wm/reward_auroc`, `wm/reward_brier`, `wm/reward_auroc_imagined`, `wm/end_accuracy`,
`wm/end_auroc` (the end output on real contexts), `wm/proprio_rmse` and `wm/proprio_rmse_copy` (one step; the
baseline predicts no change) and the image
`wm/open_loop_strip` (rows = steps: real | imagined | difference) at evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import shutil
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file

import checkpoint as ckpt
from envs import EnvSpec, TaskEnv, env_spec, make_env, parse_task
from pipeline import SharedTensors, TimedGet, WeightBroadcast, interrupt_on_stop_signals, log

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
WM_SEED_STREAM = 5
"""Seed path component of world-model data episodes (demos.py uses 4, evaluation seeds 0..N-1)."""


# ===================================================================================================
# Configuration
# ===================================================================================================
@dataclass
class WorldModelConfig:
    """Architecture and diffusion settings; saved as config.json next to the weights."""

    image_size: int = 128
    """Frame side in pixels; training data are resized to it when they differ (read_demos, LANCZOS)."""
    context_frames: int = 4
    """K: frames (and actions) the denoiser and the reward model condition on."""
    action_dim: int = 7
    """Continuous, normalised action dimensions."""
    action_embed_dim: int = 64
    """Per action slot (Linear(action_dim -> this)); the K slots concatenated are the conditioning width."""
    channels: tuple[int, ...] = (64, 64, 64, 64)
    """U-Net channels per level (each level after the first halves the resolution)."""
    blocks_per_level: int = 2
    """Residual blocks per U-Net level (down and up)."""
    sigma_data: float = 0.5
    """EDM sigma_data: the std of frames in [-1, 1]."""
    offset_noise: float = 0.3
    """Std of a per-channel constant added to the training noise (lets the model shift overall brightness)."""
    train_sigma_loc: float = -0.4
    """Training sigma ~ LogNormal(loc, scale)..."""
    train_sigma_scale: float = 1.2
    """...with this scale..."""
    train_sigma_min: float = 2e-3
    """...clipped below at this..."""
    train_sigma_max: float = 20.0
    """...and above at this."""
    sampler_steps: int = 3
    """Euler steps (denoiser evaluations) per imagined frame."""
    sampler_sigma_min: float = 2e-3
    """Smallest sigma of the Karras schedule (before the final step to 0)."""
    sampler_sigma_max: float = 5.0
    """Sigma of the initial noise."""
    sampler_rho: float = 7.0
    """Karras schedule curvature."""
    reward_channels: tuple[int, ...] = (32, 64, 64, 64)
    """Reward model CNN channels per level (each level halves the resolution)."""
    reward_hidden: int = 256
    """Width of the reward model's MLP head."""
    reward_focal_gamma: float = 0.0
    """Focal loss gamma of the reward model (the paper uses a focal loss; 0 = plain cross-entropy, which
    keeps the success probability calibrated, and calibration is what a potential-based reward needs)."""
    end_threshold: float = 0.5
    """Success (or end) probability at or above which the imagined episode terminates (the paper's argmax)."""
    end_head: bool = True
    """The reward model also predicts the end of the episode (any termination: success or failure), and the
    imagined episode ends on it too. False: only success ends one (world models saved before this option,
    whose config.json lacks it, load that way)."""
    instructions: tuple[str, ...] = ()
    """Derived: the task instructions in task-id order (rows of the reward model's task embedding),
    from the env family the model is trained for."""
    proprio_dim: int = -1
    """Length of the robot state (proprio) the model also predicts after each action (`ProprioModel`), so a
    policy that reads proprio sees it change in imagination. -1: the env's (set from the env spec where the
    model is built for an env: `world_model.py train`); 0: none, an imagined episode keeps its start's proprio
    (world models saved before this option load that way)."""
    proprio_hidden: int = 256
    """Width of the proprio model's MLP."""

    def __post_init__(self):
        # JSON gives lists back; tyro may too
        self.channels, self.reward_channels = tuple(self.channels), tuple(self.reward_channels)
        self.instructions = tuple(self.instructions)

    def check(self) -> None:
        if self.context_frames < 1 or self.sampler_steps < 1:
            raise ValueError("context_frames and sampler_steps must be >= 1")
        for name, levels in (("channels", self.channels), ("reward_channels", self.reward_channels)):
            stride = 2 ** (len(levels) - 1)
            if not levels or self.image_size % stride:
                raise ValueError(f"image_size {self.image_size} must be divisible by 2^(len({name}) - 1) = {stride}")
        if not self.instructions:
            raise ValueError("WorldModelConfig.instructions is empty: set it from the env spec")
        if self.proprio_dim < 0:
            raise ValueError("WorldModelConfig.proprio_dim is -1: set it from the env spec (0: predict none)")

    @property
    def cond_dim(self) -> int:
        return self.context_frames * self.action_embed_dim


# ===================================================================================================
# Networks
# ===================================================================================================
def frames_to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    return frames.float().movedim(-1, -3) / 127.5 - 1.0


def model_to_frames(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) -> uint8 (..., H, W, 3): clamped and quantised to 8 bits, as a camera frame."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def _groups(channels: int) -> int:
    return max(1, channels // 32) if channels % 32 == 0 else 1


class AdaGroupNorm(nn.Module):
    """Group norm whose scale and shift come from the conditioning vector (DIAMOND's AdaGN)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = AdaGroupNorm(in_channels, cond_dim)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, cond_dim)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # every block starts as the identity: a stable deep start
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(F.silu(self.norm2(h, cond)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net without attention (reference.md section 5): per level `blocks` residual blocks
    down, a strided conv, and on the way up the level's skip concatenated before its blocks."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], blocks: int, cond_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        width, skip_widths = channels[0], []
        for level, c in enumerate(channels):
            level_blocks = nn.ModuleList()
            for _ in range(blocks):
                level_blocks.append(ResBlock(width, c, cond_dim))
                width = c
            self.down.append(level_blocks)
            skip_widths.append(width)
            last = level == len(channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channels))):
            level_blocks = nn.ModuleList()
            for b in range(blocks):
                level_blocks.append(ResBlock(width + (skip_widths[level] if b == 0 else 0), channels[level], cond_dim))
                width = channels[level]
            self.up.append(level_blocks)
            self.upsample.append(nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(width), width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, cond)
            skips.append(h)
            h = down(h)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, cond)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ActionEmbedding(nn.Module):
    """One Linear(action_dim -> embed) per context slot, concatenated (reference.md section 5)."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.slots = nn.ModuleList(nn.Linear(cfg.action_dim, cfg.action_embed_dim) for _ in range(cfg.context_frames))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, K, action_dim) -> (B, K * embed)."""
        return torch.cat([layer(actions[:, k]) for k, layer in enumerate(self.slots)], dim=1)


def noise_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of EDM's c_noise = ln(sigma) / 4, (B,) -> (B, dim). Deterministic, so nothing
    random needs saving (DIAMOND draws fixed random Fourier frequencies instead)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=c_noise.device))
    angles = c_noise[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def karras_sigmas(cfg: WorldModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sampler's noise levels: Karras et al. (2022) eq. 5 with `sampler_steps` levels, then 0."""
    ramp = torch.linspace(0, 1, cfg.sampler_steps, device=device, dtype=torch.float64)
    lo, hi = cfg.sampler_sigma_min ** (1 / cfg.sampler_rho), cfg.sampler_sigma_max ** (1 / cfg.sampler_rho)
    sigmas = (hi + ramp * (lo - hi)) ** cfg.sampler_rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


class Denoiser(nn.Module):
    """EDM-preconditioned next-frame denoiser D(x; sigma, context frames, actions) (Karras et al. 2022,
    table 1): D = c_skip x + c_out F(c_in x, c_noise), with F the U-Net."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.actions = ActionEmbedding(cfg)
        self.noise_proj = nn.Linear(cfg.cond_dim, cfg.cond_dim)
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(),
                                      nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.net = UNet(3 * (cfg.context_frames + 1), 3, cfg.channels, cfg.blocks_per_level, cfg.cond_dim)

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                actions: torch.Tensor) -> torch.Tensor:
        """noisy (B, 3, H, W), sigma (B,), context (B, K, 3, H, W) in [-1, 1], actions (B, K, A) -> x0 estimate."""
        net_out, c_skip, c_out = self._net(noisy, sigma, context, actions)
        return c_skip * noisy + c_out * net_out

    def _net(self, noisy, sigma, context, actions):
        sd = self.cfg.sigma_data
        s = sigma.view(-1, 1, 1, 1)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        cond = self.cond_mlp(self.noise_proj(noise_embedding(c_noise, self.cfg.cond_dim)) + self.actions(actions))
        net_in = torch.cat([c_in * noisy, context.flatten(1, 2)], dim=1)
        return self.net(net_in, cond), c_skip, c_out

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """EDM loss on the rows that have a next frame -> (loss, metrics). The loss is the MSE of the
        network output against its preconditioned target, which equals EDM's lambda(sigma)-weighted
        denoising loss."""
        cfg = self.cfg
        device = self.noise_proj.weight.device
        context = frames_to_model(batch["frames"].to(device))
        target = frames_to_model(batch["next_frame"].to(device))
        mask = batch["has_next"].to(device).float()
        B = target.shape[0]
        draw = dict(generator=generator, device="cpu")  # CPU draws: identical on every device
        log_sigma = torch.randn(B, **draw) * cfg.train_sigma_scale + cfg.train_sigma_loc
        sigma = log_sigma.exp().clamp(cfg.train_sigma_min, cfg.train_sigma_max).to(device)
        noise = torch.randn(target.shape, **draw) + cfg.offset_noise * torch.randn(B, 3, 1, 1, **draw)
        noisy = target + sigma.view(-1, 1, 1, 1) * noise.to(device)
        net_out, c_skip, c_out = self._net(noisy, sigma, context, batch["actions"].to(device).float())
        net_target = (target - c_skip * noisy) / c_out
        per_row = ((net_out - net_target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, {"wm/denoiser_loss": loss.item()}

    @torch.no_grad()
    def sample(self, context: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler sampler (deterministic, no churn, as DIAMOND's default) from `noise` (B, 3, H, W) ~ N(0, 1)."""
        sigmas = karras_sigmas(self.cfg, noise.device)
        x = noise * sigmas[0]
        ones = torch.ones(len(x), device=x.device)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = self.denoise(x, sigma * ones, context, actions)
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        return x


class RewardModel(nn.Module):
    """Transition classifier: P(success after action a_t | frames o_{t-K+1..t}, actions a_{t-K+1..t}, task)
    and (`end_head`) P(the episode ends after a_t). A CNN over the stacked frames with AdaGN conditioning on
    actions and task, then an MLP on a 4x4 pooled map (pooled, not averaged away: success depends on where
    the end effector is relative to the target)."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.actions = ActionEmbedding(cfg)
        self.task = nn.Embedding(len(cfg.instructions), cfg.cond_dim)
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        chans = cfg.reward_channels
        self.conv_in = nn.Conv2d(3 * cfg.context_frames, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        width = chans[0]
        for level, c in enumerate(chans):
            stride = 1 if level == 0 else 2
            self.blocks.append(nn.ModuleDict({"down": nn.Conv2d(width, c, 3, stride=stride, padding=1),
                                              "block": ResBlock(c, c, cfg.cond_dim)}))
            width = c
        self.norm_out = nn.GroupNorm(_groups(width), width)
        outputs = 2 if cfg.end_head else 1
        self.head = nn.Sequential(nn.Linear(width * 16, cfg.reward_hidden), nn.SiLU(),
                                  nn.Linear(cfg.reward_hidden, outputs))

    def logits(self, context: torch.Tensor, actions: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """context (B, K, 3, H, W) in [-1, 1], actions (B, K, A), task_id (B,) -> logits (B, 2): success, end
        (without the end head, (B, 1): success only)."""
        cond = self.cond_mlp(self.actions(actions) + self.task(task_id))
        h = self.conv_in(context.flatten(1, 2))
        for layer in self.blocks:
            h = layer["block"](layer["down"](h), cond)
        h = F.adaptive_avg_pool2d(F.silu(self.norm_out(h)), 4)
        return self.head(h.flatten(1))

    def probabilities(self, context: torch.Tensor, actions: torch.Tensor, task_id: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(success), P(end)) (B,) each, float32; without the end head the end probability is success's."""
        p = torch.sigmoid(self.logits(context, actions, task_id).float())
        return p[:, 0], p[:, -1]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.head[0].weight.device
        logits = self.logits(frames_to_model(batch["frames"].to(device)), batch["actions"].to(device).float(),
                             batch["task_id"].to(device))
        labels = batch["success"].to(device).float()
        if self.cfg.end_head:
            labels = torch.stack([labels, batch["terminated"].to(device).float()], dim=1)
        else:
            labels = labels[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if self.cfg.reward_focal_gamma > 0:  # Lin et al. (2017): down-weight the easy (mostly negative) rows
            bce = (1 - torch.exp(-bce)) ** self.cfg.reward_focal_gamma * bce
        weight = batch.get("weight")  # importance weights of an oversampled batch (`SuccessSampler`)
        per_output = bce.mean(0) if weight is None else (bce * weight.to(device)[:, None]).mean(0)
        loss = per_output.sum()
        with torch.no_grad():
            accuracy = ((logits[:, 0] >= 0).float() == labels[:, 0]).float().mean().item()
        metrics = {"wm/reward_loss": per_output[0].item(), "wm/reward_train_accuracy": accuracy}
        if self.cfg.end_head:
            metrics["wm/end_loss"] = per_output[1].item()
        return loss, metrics


class ProprioModel(nn.Module):
    """The robot state after an action: proprio_{t+1} = proprio_t + MLP([proprio_t, a_t]). The last layer
    starts at zero, so an untrained model keeps the state where it is (what the imagined env did before it
    predicted proprio). Trained on the change, MSE, on the transitions that have a successor."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        width = cfg.proprio_hidden
        self.net = nn.Sequential(nn.Linear(cfg.proprio_dim + cfg.action_dim, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, cfg.proprio_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def next(self, proprio: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """proprio (B, P), action (B, A) -> proprio after the action (B, P), float32."""
        proprio = proprio.float()
        return proprio + self.net(torch.cat([proprio, action.float()], dim=1)).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.net[0].weight.device
        proprio, target = batch["proprio"].to(device), batch["next_proprio"].to(device)
        error = (self.next(proprio, batch["actions"][:, -1].to(device)) - target.float()).pow(2).mean(1)
        mask = batch["has_next"].to(device).float()
        loss = (error * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"wm/proprio_loss": loss.item()}


class WorldModel(nn.Module):
    """The denoiser, the reward model and (`proprio_dim` > 0) the proprio model, trained together (the sum of
    their losses)."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.denoiser = Denoiser(cfg)
        self.reward = RewardModel(cfg)
        self.proprio = ProprioModel(cfg) if cfg.proprio_dim else None

    @property
    def device(self) -> torch.device:
        return self.reward.head[0].weight.device

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        denoiser_loss, metrics = self.denoiser(batch, generator)
        reward_loss, reward_metrics = self.reward(batch)
        loss = denoiser_loss + reward_loss
        metrics = {**metrics, **reward_metrics}
        if self.proprio is not None:
            proprio_loss, proprio_metrics = self.proprio(batch)
            loss = loss + proprio_loss
            metrics.update(proprio_metrics)
        return loss, {**metrics, "wm/loss": loss.item()}

    @torch.no_grad()
    def imagine(self, frames: torch.Tensor, past_actions: torch.Tensor, actions: torch.Tensor,
                task_id: torch.Tensor, seeds: list[int], proprio: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Roll the model forward through a chunk of actions, batched.

        frames uint8 (B, K, H, W, 3): the last K frames, oldest first; past_actions (B, K-1, A): the actions
        taken at frames 0..K-2; actions (B, n, A): the new actions, the first taken at frames[:, -1];
        task_id (B,) in `cfg.instructions` order; seeds: one per row (the initial noise of row b comes from
        its own generator, so a row's result does not depend on what else is in the batch); proprio (B, P):
        the robot state at frames[:, -1] (None: (B, 0)).
        Returns the imagined frames uint8 (B, n, H, W, 3), the success probabilities (B, n) of the state
        after each action, the probabilities (B, n) that the episode ends after it (success's without the
        end head) and the robot state after each action (B, n, P): predicted by the proprio model, the given
        one repeated by a model without. Everything is computed for all n actions; the caller stops at an end.
        """
        K, device = self.cfg.context_frames, self.device
        B, n = actions.shape[:2]
        context = frames_to_model(frames.to(device))
        all_actions = torch.cat([past_actions.to(device).float(), actions.to(device).float()], dim=1)
        task_id = task_id.to(device)
        H = context.shape[-1]
        noise = torch.stack([torch.randn((n, 3, H, H), generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(device)
        out_frames = torch.empty((B, n, H, H, 3), dtype=torch.uint8, device=device)
        out_success = torch.empty((B, n), dtype=torch.float32, device=device)
        out_end = torch.empty((B, n), dtype=torch.float32, device=device)
        state = torch.zeros((B, 0), device=device) if proprio is None else proprio.to(device).float()
        predict_proprio = self.proprio is not None and proprio is not None
        if predict_proprio and state.shape[1] != self.cfg.proprio_dim:
            raise ValueError(f"imagine: proprio of width {state.shape[1]}, the model predicts {self.cfg.proprio_dim}")
        out_proprio = torch.empty((B, n, state.shape[1]), dtype=torch.float32, device=device)
        for j in range(n):
            window = all_actions[:, j:j + K]
            out_success[:, j], out_end[:, j] = self.reward.probabilities(context, window, task_id)
            if predict_proprio:
                state = self.proprio.next(state, window[:, -1])
            out_proprio[:, j] = state
            frame = model_to_frames(self.denoiser.sample(context, window, noise[:, j]))
            out_frames[:, j] = frame
            # the next context holds the quantised frame, exactly what a camera would have given
            context = torch.cat([context[:, 1:], frames_to_model(frame)[:, None]], dim=1)
        return out_frames, out_success, out_end, out_proprio

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write model.safetensors + config.json (+ the optimiser, + `extra` as train.json) atomically:
        everything goes to a hidden temporary directory that replaces `directory` in one rename."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=1))
        if optimizer is not None:
            tensors, meta = ckpt.optimizer_to_tensors(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if extra is not None:
            (tmp / "train.json").write_text(json.dumps(extra, indent=1, default=str))
        return ckpt.install_dir(tmp, directory)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> WorldModel:
        model = cls(load_config(directory))
        model.load_state_dict(load_file(str(Path(directory) / MODEL_FILE)), strict=True)
        return model.to(device).eval()


def load_config(directory: str | Path) -> WorldModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE} (a directory written by WorldModel.save)")
    saved = json.loads(path.read_text())
    saved.setdefault("end_head", False)  # saved before the end output existed: the weights have none
    saved.setdefault("proprio_dim", 0)  # saved before the proprio model existed
    return WorldModelConfig(**saved)


def load_optimizer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> bool:
    """Restore the optimiser saved next to a world model; False when none was saved."""
    directory = Path(directory)
    if not (directory / "optimizer.safetensors").is_file():
        return False
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(ckpt.optimizer_from_tensors(load_file(str(directory / "optimizer.safetensors")), meta))
    return True


# ===================================================================================================
# Transitions from demonstration episodes (demos.read_demos dicts)
# ===================================================================================================
def is_heldout(source: str, fraction: float) -> bool:
    """Deterministic episode split by name ("<file name>:<demo>"), stable across file order and paths."""
    path, _, demo = source.rpartition(":")
    return zlib.crc32(f"{Path(path).name}:{demo}".encode()) % 10_000 < fraction * 10_000


def check_instructions(episodes: list[dict], instructions: tuple[str, ...], source: str = "the world model") -> None:
    """The reward model's task input is an instruction's index among the tasks: data of other tasks are an error
    that names the fix (`source` says where the tasks came from, e.g. "--task tabletop2d")."""
    unknown = sorted({e["instruction"] for e in episodes} - set(instructions))
    if unknown:
        raise ValueError(f"{len(unknown)} instruction(s) of the data are not among the {len(instructions)} tasks of "
                         f"{source}, e.g. {unknown[0]!r}; pass the --task the demonstrations were recorded on "
                         "(e.g. --task libero_spatial)")


def task_ids(episodes: list[dict], instructions: tuple[str, ...]) -> list[int]:
    """Task id of each episode, by its instruction (official LIBERO files carry no task id)."""
    check_instructions(episodes, instructions)
    index = {text: i for i, text in enumerate(instructions)}
    return [index[e["instruction"]] for e in episodes]


class TransitionData:
    """Every step t of every episode as one transition: K context frames and actions (padded at the
    episode start: first frame repeated, zero actions), the next frame when the file has it (the last
    step's successor frame is never recorded), the task, the success label of the transition (1 at the
    last step of a successful episode) and its end label (1 at the last step of an episode the env
    terminated: episode["terminated"], success where a file does not say). Frames stay uint8 in memory."""

    def __init__(self, episodes: list[dict], instructions: tuple[str, ...], context_frames: int):
        if not episodes:
            raise ValueError("no episodes")
        self.K = context_frames
        self.images = torch.from_numpy(np.concatenate([e["images"] for e in episodes]))
        self.actions = torch.from_numpy(np.concatenate([e["actions"] for e in episodes]).astype(np.float32))
        self.proprio = torch.from_numpy(np.concatenate([e["proprio"] for e in episodes]).astype(np.float32))
        lengths = torch.tensor([len(e["actions"]) for e in episodes])
        ends = lengths.cumsum(0)
        self.start = torch.repeat_interleave(ends - lengths, lengths)  # first frame of each step's episode
        self.end = torch.repeat_interleave(ends, lengths)  # exclusive end
        self.task = torch.repeat_interleave(torch.tensor(task_ids(episodes, instructions)), lengths)
        success = torch.repeat_interleave(torch.tensor([bool(e["success"]) for e in episodes]), lengths)
        index = torch.arange(len(self.images))
        self.success = success & (index == self.end - 1)
        ended = torch.tensor([bool(e.get("terminated", e["success"])) for e in episodes])
        self.terminated = torch.repeat_interleave(ended, lengths) & (index == self.end - 1)
        self.has_next = index < self.end - 1
        self.episodes = [(int(e - n), int(e)) for e, n in zip(ends, lengths)]
        self.sources = [e.get("source", "") for e in episodes]

    def __len__(self) -> int:
        return len(self.images)

    def context_index(self, index: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame indices index + offsets, clamped into each step's episode; and which were inside it."""
        raw = index[:, None] + offsets[None]
        start, end = self.start[index][:, None], self.end[index][:, None]
        return raw.clamp(min=start, max=end - 1), (raw >= start) & (raw < end)

    def action_window(self, index: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Actions index+first .. index+first+count-1 (B, count, A), zero outside each episode."""
        idx, inside = self.context_index(index, torch.arange(first, first + count))
        return self.actions[idx] * inside[..., None]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        idx, _ = self.context_index(index, torch.arange(-self.K + 1, 1))
        next_idx = torch.where(self.has_next[index], index + 1, index)
        return {"frames": self.images[idx], "actions": self.action_window(index, -self.K + 1, self.K),
                "next_frame": self.images[next_idx], "has_next": self.has_next[index],
                "task_id": self.task[index], "success": self.success[index].float(),
                "terminated": self.terminated[index].float(),
                "proprio": self.proprio[index], "next_proprio": self.proprio[next_idx]}


class SuccessSampler:
    """Batches of transitions with a fixed share of success transitions (the reward model's rare class:
    one per successful episode, ~2 % of the transitions of weak-policy data) and the importance weights
    that give back their real frequency in the reward loss: the loss stays an unbiased estimate of the
    plain one, so the success probability stays calibrated, with far less variance."""

    def __init__(self, data: TransitionData, batch_size: int, success_fraction: float, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.positives = torch.nonzero(data.success).squeeze(1)
        self.negatives = torch.nonzero(~data.success).squeeze(1)
        rate = len(self.positives) / len(data)  # the real frequency
        self.num_positive = round(success_fraction * batch_size) if len(self.positives) else 0
        share = self.num_positive / batch_size
        self.weight_positive = rate / share if share else 1.0
        self.weight_negative = (1 - rate) / (1 - share) if share else 1.0
        self.order, self.cursor = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        source = self.negatives if self.num_positive else torch.arange(len(self.data))
        return source[torch.randperm(len(source), generator=self.generator)]

    def sample(self) -> dict[str, torch.Tensor]:
        count = self.batch_size - self.num_positive
        if self.cursor + count > len(self.order):  # a new pass over the (negative) transitions
            self.order, self.cursor = self._shuffle(), 0
        index = self.order[self.cursor:self.cursor + count]
        self.cursor += count
        if self.num_positive:
            pick = torch.randint(len(self.positives), (self.num_positive,), generator=self.generator)
            index = torch.cat([index, self.positives[pick]])
        batch = self.data.batch(index)
        batch["weight"] = torch.where(batch["success"] > 0, self.weight_positive, self.weight_negative)
        return batch


class StepReplay(SharedTensors):
    """Recent real env steps for online world-model training (reference.md section 5: the world model keeps
    learning from real windows). One ring of `capacity` steps per env, in shared memory: each env's steps
    are written in order by its one worker, so nothing is locked; the trainer samples transitions with the
    padding and labels of TransitionData (the same `batch` dict)."""

    def __init__(self, num_envs: int, capacity: int, image_size: int, context_frames: int, action_dim: int = 7,
                 proprio_dim: int = 0, share: bool = True):
        if capacity < context_frames + 4:
            raise ValueError(f"StepReplay capacity {capacity} must exceed context_frames + 3")
        E, C, H = num_envs, capacity, image_size
        self.K, self.capacity = context_frames, capacity
        super().__init__({
            "frames": torch.zeros(E, C, H, H, 3, dtype=torch.uint8),
            "actions": torch.zeros(E, C, action_dim),
            "proprio": torch.zeros(E, C, proprio_dim),
            "task_id": torch.zeros(E, C, dtype=torch.int64),
            "episode_step": torch.zeros(E, C, dtype=torch.int64),  # steps of the episode before this one
            "success": torch.zeros(E, C, dtype=torch.bool),  # the env reported success after this action
            "terminated": torch.zeros(E, C, dtype=torch.bool),  # the env ended the episode after it (any reason)
            "written": torch.zeros(E, dtype=torch.int64),  # steps ever written per env (position of the next)
        }, share)

    def add(self, env: int, frame: np.ndarray, action: np.ndarray, task_id: int, episode_step: int,
            success: bool, proprio: np.ndarray | None = None, terminated: bool | None = None) -> None:
        """One executed step: the frame (and proprio) before the action, the action, and the env's success
        and termination flags after it (terminated defaults to success)."""
        position = int(self.written[env])
        slot = position % self.capacity
        self.frames[env, slot] = torch.from_numpy(np.asarray(frame))
        if proprio is not None:
            self.proprio[env, slot] = torch.as_tensor(np.asarray(proprio), dtype=torch.float32)
        self.actions[env, slot] = torch.as_tensor(np.asarray(action), dtype=torch.float32)
        self.task_id[env, slot], self.episode_step[env, slot], self.success[env, slot] = task_id, episode_step, success
        self.terminated[env, slot] = success if terminated is None else terminated
        self.written[env] = position + 1  # last: a reader never treats a half-written slot as written

    def __len__(self) -> int:
        return int(torch.clamp(self.written, max=self.capacity - self.K - 2).sum())

    def batch(self, env: torch.Tensor, position: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transitions at absolute step `position` of each `env` (TransitionData.batch's dict)."""
        C, K = self.capacity, self.K
        step = self.episode_step[env, position % C]
        back = torch.arange(K - 1, -1, -1)  # K-1 .. 0 steps back
        inside = back[None] <= step[:, None]  # still in the same episode
        first = position - step  # the episode's first step: what padding repeats
        context = torch.where(inside, position[:, None] - back[None], first[:, None]) % C
        envs = env[:, None]
        written = self.written[env]
        following = (position + 1) % C
        has_next = (position + 1 < written) & (self.episode_step[env, following] == step + 1)
        return {"frames": self.frames[envs, context], "actions": self.actions[envs, context] * inside[..., None],
                "next_frame": self.frames[env, torch.where(has_next, following, position % C)],
                "has_next": has_next, "task_id": self.task_id[env, position % C],
                "success": self.success[env, position % C].float(),
                "terminated": self.terminated[env, position % C].float(),
                "proprio": self.proprio[env, position % C],
                "next_proprio": self.proprio[env, torch.where(has_next, following, position % C)]}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Uniform over the stored steps whose context is still in the ring (the oldest K + 2 slots of a full
        ring are skipped: a writer may be overwriting them)."""
        written = self.written.clone()
        available = torch.clamp(written, max=self.capacity - self.K - 2)
        if int(available.sum()) == 0:
            raise ValueError("StepReplay is empty")
        env = torch.multinomial(available.double(), batch_size, replacement=True, generator=generator)
        offset = (torch.rand(batch_size, generator=generator) * available[env]).long()
        return self.batch(env, written[env] - 1 - offset)

    def start_context(self, rng: np.random.Generator, task_id: int | None) -> StartContext:
        """A start for ImaginedEnv from a recent real step (of `task_id` when given): the paper's imagination
        starts from the frames of real episodes (reference.md section 5)."""
        written = self.written.clone()
        available = torch.clamp(written, max=self.capacity - self.K - 2)
        for _ in range(1000):  # rejection sampling on the task: a handful of tries unless the task is rare
            env = int(rng.choice(len(available), p=(available / available.sum()).double().numpy()))
            position = int(written[env]) - 1 - int(rng.integers(int(available[env])))
            task = int(self.task_id[env, position % self.capacity])
            if task_id is None or task == task_id:
                break
        else:
            raise ValueError(f"no recent real step of task {task_id} to start an imagined episode from")
        batch = self.batch(torch.tensor([env]), torch.tensor([position]))
        slot = position % self.capacity
        return StartContext(batch["frames"][0].numpy(), batch["actions"][0, :-1].numpy(),
                            self.proprio[env, slot].numpy().copy(), task, int(self.episode_step[env, slot]))


def read_episodes(paths: tuple[str, ...], image_size: int) -> list[dict]:
    from demos import read_demos

    return [e for path in paths for e in read_demos(path, image_size=image_size, wrist=False)]


def split_episodes(episodes: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    train = [e for e in episodes if not is_heldout(e["source"], fraction)]
    heldout = [e for e in episodes if is_heldout(e["source"], fraction)]
    return train, heldout


# ===================================================================================================
# The client interface and the imagined env
# ===================================================================================================
class WorldModelClient(Protocol):
    """What ImaginedEnv needs from a world model: in-process (`LocalWorldModel`) or served
    (`ServedWorldModel`); both give the same result for the same seed."""

    config: WorldModelConfig

    def imagine(self, frames: np.ndarray, past_actions: np.ndarray, actions: np.ndarray, task_id: int,
                seed: int, proprio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """frames uint8 (K, H, W, 3), past_actions (K-1, A), actions (n, A), task_id in config.instructions
        order, proprio (P,) at frames[-1] -> imagined frames uint8 (n, H, W, 3), success and end probabilities
        float32 (n,) each, the proprio after each action float32 (n, P) (`WorldModel.imagine`)."""
        ...

    def submit(self, frames: np.ndarray, past_actions: np.ndarray, actions: np.ndarray, task_id: int,
               seed: int, proprio: np.ndarray) -> object:
        """`imagine` in two halves: send the request and return a ticket, so that several envs' requests can
        be in flight together (one batch at the server); `collect(ticket)` waits for the result."""
        ...

    def collect(self, ticket: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ...


class LocalWorldModel:
    """The in-process client: one WorldModel, one request at a time (serial mode, tests, evaluation).
    With `weights`, it loads what a trainer publishes before each request, as WorldModelServer does."""

    def __init__(self, model: WorldModel, weights: WeightBroadcast | None = None):
        self.model, self.config, self.weights = model.eval(), model.cfg, weights
        self.params = dict(model.state_dict(keep_vars=True))
        self.version = 0

    def submit(self, frames, past_actions, actions, task_id, seed, proprio):
        return frames, past_actions, actions, task_id, seed, proprio  # computed when collected: one at a time

    def collect(self, ticket):
        return self.imagine(*ticket)

    def imagine(self, frames, past_actions, actions, task_id, seed, proprio):
        if self.weights is not None and self.weights.published_version() > self.version:
            version = self.weights.read_into(self.params)
            self.version = self.version if version is None else version
        out = self.model.imagine(
            torch.from_numpy(np.asarray(frames))[None], torch.as_tensor(np.asarray(past_actions), dtype=torch.float32)[None],
            torch.as_tensor(np.asarray(actions), dtype=torch.float32)[None], torch.tensor([task_id]), [seed],
            torch.as_tensor(np.asarray(proprio), dtype=torch.float32)[None])
        return tuple(x[0].cpu().numpy() for x in out)


@dataclass
class StartContext:
    """Where an imagined episode starts: real frames and the actions between them."""

    frames: np.ndarray
    """uint8 (K, H, W, 3), oldest first; frames[-1] is the first observation of the imagined episode."""
    past_actions: np.ndarray
    """float32 (K-1, A): action j was taken at frames[j]; zeros (and repeated frames) before a real start."""
    proprio: np.ndarray
    """float32 (P,): the real proprio at frames[-1] (from there a world model with a proprio model predicts it)."""
    task_id: int
    """Task id in the env spec's order."""
    env_step: int = 0
    """Real env steps already taken before frames[-1]: the real time limit still applies."""


def context_from_observation(obs: dict, task_id: int, context_frames: int, action_dim: int = 7) -> StartContext:
    """A start context from one real first observation (a reset): padded as at every episode start."""
    frames = np.repeat(obs["image"][None], context_frames, axis=0)
    return StartContext(frames, np.zeros((context_frames - 1, action_dim), np.float32),
                        np.asarray(obs["proprio"], np.float32).copy(), task_id, 0)


class ContextBank:
    """Start contexts drawn from real episodes (read_demos dicts, or recent real episodes): a uniformly
    random episode of the task, then a uniformly random step ("any", the paper's start indices) or its
    first step ("first", imagined episodes that begin as real ones do)."""

    def __init__(self, episodes: list[dict], instructions: tuple[str, ...], context_frames: int,
                 start: Literal["any", "first"] = "any"):
        self.data = TransitionData(episodes, instructions, context_frames)
        self.start, self.K = start, context_frames
        by_task = defaultdict(list)
        for e, task in enumerate(task_ids(episodes, instructions)):
            by_task[task].append(e)
        self.by_task = dict(by_task)

    def __call__(self, rng: np.random.Generator, task_id: int | None) -> StartContext:
        if task_id is not None and task_id not in self.by_task:
            raise ValueError(f"no real episode of task {task_id} to start an imagined one from")
        tasks = sorted(self.by_task) if task_id is None else [task_id]
        task = tasks[int(rng.integers(len(tasks)))]
        first, end = self.data.episodes[self.by_task[task][int(rng.integers(len(self.by_task[task])))]]
        t = first if self.start == "first" else int(rng.integers(first, end))
        index = torch.tensor([t])
        batch = self.data.batch(index)
        past = self.data.action_window(index, -self.K + 1, self.K - 1)[0]
        return StartContext(batch["frames"][0].numpy(), past.numpy(), self.data.proprio[t].numpy().copy(),
                            task, t - first)


class RealResetContexts:
    """Start contexts from resets of a real env (a reset costs no env step): imagination from fresh
    real initial scenes, without a dataset."""

    def __init__(self, env: TaskEnv, context_frames: int):
        self.env, self.K = env, context_frames

    def __call__(self, rng: np.random.Generator, task_id: int | None) -> StartContext:
        obs = self.env.reset(task_id=task_id, seed=int(rng.integers(2**31)))
        return context_from_observation(obs, self.env.task_id, self.K, self.env.spec.action_dim)


class ReplayContexts:
    """Start contexts from recent real steps (`StepReplay.start_context`): the paper's imagination starts
    from the frames of real episodes. While the replay holds no step of the asked task yet (the start of a
    run), a fresh real reset from `fallback` (e.g. RealResetContexts) instead: imagination never waits."""

    def __init__(self, replay: StepReplay, fallback: Callable[[np.random.Generator, int | None], StartContext]):
        self.replay, self.fallback = replay, fallback

    def __call__(self, rng: np.random.Generator, task_id: int | None) -> StartContext:
        replay, written = self.replay, self.replay.written.clone()
        C = replay.capacity
        # slots start_context may draw: the `available` most recent steps of each env's ring
        age = (written[:, None] - 1 - torch.arange(C)[None]) % C
        ready = age < torch.clamp(written, max=C - replay.K - 2)[:, None]
        if task_id is not None:
            ready &= replay.task_id == task_id
        if ready.any():
            try:
                return replay.start_context(rng, task_id)
            except ValueError:  # a task so rare that rejection sampling missed it
                pass
        return self.fallback(rng, task_id)


class ImaginedEnv(TaskEnv):
    """An env whose frames come from the world model: the same chunked reset / step contract as the real
    envs (envs/__init__.py): the same observation keys, dtypes and shapes, the same info keys.

    reset() takes a real start context from `contexts` (the task is chosen uniformly when not given);
    each action then imagines the next frame; the reward is the change of the success probability;
    `terminated` when it or the end probability reaches `end_threshold` (info["success"] True when the
    success probability did), `truncated` after
    `horizon_env_steps` imagined steps or when the real episode's own time limit would be hit.
    obs["proprio"] starts as the start context's real proprio and follows the world model's proprio model
    (`proprio_dim` > 0); a world model without one keeps the start's. Seeded: the same seed, context and
    actions give the same episode, in-process or served.
    """

    def __init__(self, spec: EnvSpec, world_model: WorldModelClient,
                 contexts: Callable[[np.random.Generator, int | None], StartContext], horizon_env_steps: int,
                 seed: int = 0):
        cfg = world_model.config
        if "wrist" in spec.cameras:
            raise ValueError("ImaginedEnv: the world model imagines the third-person camera only; "
                             "build the spec without the wrist camera")
        if spec.image_size != cfg.image_size:
            raise ValueError(f"ImaginedEnv: the env gives {spec.image_size} px frames, the world model "
                             f"{cfg.image_size} px")
        if horizon_env_steps < 1:
            raise ValueError("ImaginedEnv: horizon_env_steps must be >= 1")
        missing = [text for text in spec.instructions if text not in cfg.instructions]
        if missing:
            raise ValueError(f"ImaginedEnv: the world model was not trained on the tasks {missing[:3]}")
        if cfg.proprio_dim not in (0, spec.proprio_dim):
            raise ValueError(f"ImaginedEnv: the world model predicts {cfg.proprio_dim}-D proprio, the env has "
                             f"{spec.proprio_dim}-D")
        self.real_spec = spec
        # the imagined time limit is the horizon: that is what `truncated` means here
        self.spec = dataclasses.replace(spec, max_episode_steps=min(horizon_env_steps, spec.max_episode_steps))
        self.world_model, self.contexts = world_model, contexts
        self.model_task = [cfg.instructions.index(text) for text in spec.instructions]
        self.K, self.end_threshold = cfg.context_frames, cfg.end_threshold
        self.rng = np.random.default_rng(seed)
        self._episode_over = True
        self._ticket = None  # (actions, the world model's ticket) of the chunk in flight

    def reset(self, task_id: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if task_id is not None and not 0 <= task_id < self.spec.num_tasks:
            raise ValueError(f"ImaginedEnv task_id={task_id}: tasks are 0..{self.spec.num_tasks - 1}")
        ctx = self.contexts(self.rng, task_id)
        if task_id is not None and ctx.task_id != task_id:
            raise RuntimeError(f"ImaginedEnv: asked for task {task_id}, the context source gave {ctx.task_id}")
        if ctx.frames.shape != (self.K, self.spec.image_size, self.spec.image_size, 3) or ctx.frames.dtype != np.uint8:
            raise ValueError(f"ImaginedEnv: start frames must be uint8 {(self.K, self.spec.image_size, self.spec.image_size, 3)}, "
                             f"got {ctx.frames.dtype} {ctx.frames.shape}")
        self.task_id = ctx.task_id
        self.frames = ctx.frames.copy()
        self.past_actions = np.asarray(ctx.past_actions, np.float32).reshape(self.K - 1, self.spec.action_dim).copy()
        self.proprio = np.asarray(ctx.proprio, np.float32)
        self.limit = max(1, min(self.spec.max_episode_steps, self.real_spec.max_episode_steps - ctx.env_step))
        self.env_steps, self.success_prob = 0, 0.0  # p = 0 at the start: a real episode never starts in success
        self._episode_over, self._ticket = False, None
        return self._observe(self.frames[-1])

    def _observe(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": frame.copy(), "proprio": self.proprio.copy()}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        return self.step_chunk(np.asarray(action)[None])

    def step_chunk(self, actions: np.ndarray, record: bool = False
                   ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """One world-model request per chunk; stops at the first end, as `TaskEnv.step_chunk` does."""
        self.submit_chunk(actions)
        return self.finish_chunk(record)

    def submit_chunk(self, actions: np.ndarray) -> None:
        """The first half of `step_chunk`: send the world-model request and return at once (an imagination
        worker submits every ready env's chunk, then finishes them: one batch at the world-model server)."""
        if self._episode_over:
            raise RuntimeError("ImaginedEnv: the episode is over (or never started); call reset() first")
        if self._ticket is not None:
            raise RuntimeError("ImaginedEnv: a chunk is already in flight; call finish_chunk() first")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or len(actions) == 0 or actions.shape[1] != self.spec.action_dim:
            raise ValueError(f"ImaginedEnv step_chunk expects (chunk_len >= 1, {self.spec.action_dim}) actions, "
                             f"got {actions.shape}")
        ticket = self.world_model.submit(self.frames, self.past_actions, actions, self.model_task[self.task_id],
                                         int(self.rng.integers(2**63)), self.proprio)
        self._ticket = (actions, ticket)

    def finish_chunk(self, record: bool = False) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """The second half of `step_chunk`: wait for the imagined frames and apply them."""
        if self._ticket is None:
            raise RuntimeError("ImaginedEnv: no chunk in flight; call submit_chunk() first")
        (actions, ticket), self._ticket = self._ticket, None
        frames, success, end, proprio = self.world_model.collect(ticket)
        reward, succeeded, terminated, truncated = 0.0, False, False, False
        for j in range(len(actions)):
            p = float(success[j])
            reward += p - self.success_prob  # potential-based (reference.md section 5)
            self.success_prob = p
            self.env_steps += 1
            succeeded = p >= self.end_threshold
            terminated = succeeded or float(end[j]) >= self.end_threshold  # a success, or a failure that ends it
            truncated = not terminated and self.env_steps >= self.limit
            if terminated or truncated:
                break
        executed = j + 1
        self.frames = np.concatenate([self.frames, frames[:executed]])[-self.K:]
        if self.K > 1:
            self.past_actions = np.concatenate([self.past_actions, actions[:executed]])[-(self.K - 1):]
        self._episode_over = terminated or truncated
        info = {"success": succeeded, "task_id": self.task_id, "env_steps": executed}
        if record:
            info["frames"] = frames[:executed].copy()
            info["proprio"] = np.asarray(proprio[:executed], np.float32).copy()
        self.proprio = np.asarray(proprio[j], np.float32).copy()
        return self._observe(frames[j]), reward, bool(terminated), bool(truncated), info


# ===================================================================================================
# Serving: many imagined envs, one batched world model
# ===================================================================================================
@dataclass(frozen=True)
class SlotShape:
    num_slots: int
    """One slot per imagined env (a request and its reply live there)."""
    context_frames: int
    image_size: int
    action_dim: int
    max_actions: int
    """Longest action chunk one request may carry (the policy's chunk length)."""
    proprio_dim: int = 0
    """The env's proprio length (the robot state at the request's last frame, and after each action)."""


class ImaginationSlots(SharedTensors):
    """Preallocated request / reply tensors, indexed by slot; shared across processes when `share`."""

    def __init__(self, shape: SlotShape, share: bool = True):
        self.shape = s = shape
        K, H = s.context_frames, s.image_size
        super().__init__({
            # written by the client (ImaginedEnv)
            "frames": torch.zeros(s.num_slots, K, H, H, 3, dtype=torch.uint8),
            "past_actions": torch.zeros(s.num_slots, max(K - 1, 0), s.action_dim),
            "actions": torch.zeros(s.num_slots, s.max_actions, s.action_dim),
            "num_actions": torch.zeros(s.num_slots, dtype=torch.int64),
            "task_id": torch.zeros(s.num_slots, dtype=torch.int64),
            "seed": torch.zeros(s.num_slots, dtype=torch.int64),
            "proprio": torch.zeros(s.num_slots, s.proprio_dim),
            # written by the server
            "out_frames": torch.zeros(s.num_slots, s.max_actions, H, H, 3, dtype=torch.uint8),
            "out_success": torch.zeros(s.num_slots, s.max_actions),
            "out_end": torch.zeros(s.num_slots, s.max_actions),
            "out_proprio": torch.zeros(s.num_slots, s.max_actions, s.proprio_dim),
            "version": torch.zeros(s.num_slots, dtype=torch.int64),
        }, share)


class ServedWorldModel:
    """Client of a WorldModelServer for one imagined env: writes the request into the env's slot, sends
    (client, slot), and waits until the server answers on the client's reply queue. The envs of one
    imagination worker share that queue, and `arrived` (pass one set to all of them): a reply read by one
    env's wait is kept there for the env it belongs to, so all of them can have a request in flight."""

    def __init__(self, config: WorldModelConfig, client: int, slot: int, slots: ImaginationSlots, requests,
                 replies, wait_timeout_s: float = 300.0, poll_s: float = 0.05,
                 should_stop: Callable[[], bool] | None = None, arrived: set | None = None):
        self.config, self.client, self.slot, self.slots = config, client, slot, slots
        self.requests, self.replies, self.poll_s, self.should_stop = requests, replies, poll_s, should_stop
        self.arrived = set() if arrived is None else arrived
        self.wait_timeout_s = wait_timeout_s
        self.getter = TimedGet(f"imagined env (client {client}, slot {slot})", wait_timeout_s)

    def imagine(self, frames, past_actions, actions, task_id, seed, proprio):
        return self.collect(self.submit(frames, past_actions, actions, task_id, seed, proprio))

    def submit(self, frames, past_actions, actions, task_id, seed, proprio):
        s, slot, n = self.slots, self.slot, len(actions)
        if n > s.shape.max_actions:
            raise ValueError(f"ServedWorldModel: {n} actions, the slots hold {s.shape.max_actions}")
        proprio = np.asarray(proprio, np.float32)
        if proprio.shape != (s.shape.proprio_dim,):
            raise ValueError(f"ServedWorldModel: proprio of shape {proprio.shape}, the slots hold "
                             f"({s.shape.proprio_dim},): build SlotShape with the env's proprio_dim")
        s.proprio[slot] = torch.from_numpy(proprio)
        s.frames[slot] = torch.from_numpy(np.asarray(frames))
        s.past_actions[slot] = torch.as_tensor(np.asarray(past_actions), dtype=torch.float32)
        s.actions[slot, :n] = torch.as_tensor(np.asarray(actions), dtype=torch.float32)
        s.num_actions[slot], s.task_id[slot], s.seed[slot] = n, task_id, seed
        self.requests.put((self.client, slot), timeout=self.wait_timeout_s)
        return n

    def collect(self, n):
        s, slot = self.slots, self.slot
        while slot not in self.arrived:
            reply = self.getter.get(self.replies, "world_model", self.poll_s)
            if reply is not None:
                self.arrived.add(reply)
            elif self.should_stop is not None and self.should_stop():
                raise InterruptedError("ServedWorldModel: stopping while waiting for world_model")
        self.arrived.discard(slot)
        return (s.out_frames[slot, :n].numpy().copy(), s.out_success[slot, :n].numpy().copy(),
                s.out_end[slot, :n].numpy().copy(), s.out_proprio[slot, :n].numpy().copy())


class WorldModelServer:
    """`world_model`: a world-model copy in eval mode with dynamic batching, as InferenceServer: one batched
    `imagine` when `max_batch` requests wait or the oldest has waited `batch_timeout_ms`. Loads new
    weights when a trainer publishes them (a WeightBroadcast, version counter); every reply records the
    version that produced it."""

    def __init__(self, model: WorldModel, slots: ImaginationSlots, requests, replies: list, poll_s: float,
                 max_batch: int = 16, batch_timeout_ms: float = 5.0, weights: WeightBroadcast | None = None,
                 stats=None):
        self.model, self.slots, self.requests, self.replies = model.eval(), slots, requests, replies
        self.poll_s, self.max_batch, self.batch_timeout_ms = poll_s, max_batch, batch_timeout_ms
        self.weights, self.stats = weights, stats
        self.name = "world_model"
        self.params = dict(model.state_dict(keep_vars=True))
        self.version = 0
        self.pending: list[tuple[tuple[int, int], float]] = []
        self.getter = TimedGet(self.name, 1e9)
        self.perf = defaultdict(list)
        self.busy_s, self.last_report = 0.0, time.time()

    @classmethod
    def from_checkpoint(cls, directory: str, device: str, *args, **kwargs) -> WorldModelServer:
        """Build inside the serving process (a picklable constructor for spawned roles)."""
        return cls(WorldModel.load(directory, device), *args, **kwargs)

    def _maybe_load_weights(self) -> None:
        if self.weights is not None and self.weights.published_version() > self.version:
            version = self.weights.read_into(self.params)
            if version is not None:
                self.version = version

    def step(self) -> None:
        self._maybe_load_weights()
        timeout = self.poll_s
        if self.pending:
            wait = self.pending[0][1] + self.batch_timeout_ms / 1000 - time.perf_counter()
            timeout = min(max(wait, 0.0), self.poll_s)
        msg = self.getter.get(self.requests, "imagined envs", timeout, idle_ok=True)
        while msg is not None:
            self.pending.append((msg, time.perf_counter()))
            try:
                msg = self.requests.get_nowait()
            except queue.Empty:
                msg = None
        if self.pending and (len(self.pending) >= self.max_batch
                             or (time.perf_counter() - self.pending[0][1]) * 1000 >= self.batch_timeout_ms):
            self._flush()
        if self.stats is not None and time.time() - self.last_report > 5.0:
            self._report()

    def _flush(self) -> None:
        batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        s = self.slots
        idx = torch.tensor([slot for (_, slot), _ in batch])
        n = int(s.num_actions[idx].max())  # shorter requests are padded with zero actions, their tail unused
        start = time.perf_counter()
        frames, success, end, proprio = self.model.imagine(s.frames[idx], s.past_actions[idx], s.actions[idx, :n],
                                                           s.task_id[idx], s.seed[idx].tolist(), s.proprio[idx])
        s.out_frames[idx, :n] = frames.cpu()
        s.out_success[idx, :n] = success.cpu()
        s.out_end[idx, :n] = end.cpu()
        s.out_proprio[idx, :n] = proprio.cpu()
        s.version[idx] = self.version
        done = time.perf_counter()
        for (client, slot), _ in batch:
            self.replies[client].put(slot)
        self.busy_s += done - start
        self.perf["batch_size"].append(len(batch))
        self.perf["imagined_env_steps"].append(int(s.num_actions[idx].sum()))
        self.perf["latency_ms"].extend((done - t0) * 1000 for _, t0 in batch)

    def _report(self) -> None:
        elapsed = time.time() - self.last_report
        if self.perf["batch_size"]:
            self.stats.put(("perf", self.name, {
                "perf/wm_batch_size": float(np.mean(self.perf["batch_size"])),
                "perf/wm_latency_ms": float(np.median(self.perf["latency_ms"])),
                "perf/wm_imagined_env_steps_per_s": float(np.sum(self.perf["imagined_env_steps"]) / elapsed),
                "perf/wm_busy_fraction": self.busy_s / elapsed,
                "perf/wm_version": float(self.version)}))
        self.perf.clear()
        self.busy_s, self.last_report = 0.0, time.time()

    def close(self) -> None:
        pass


# ===================================================================================================
# Training
# ===================================================================================================
class WorldModelTrainer:
    """AdamW with linear warm-up then a constant rate (DIAMOND), gradient clipping; one `train_step` per
    batch of transitions. Used by the offline command below and by an online trainer role alike."""

    def __init__(self, model: WorldModel, lr: float = 1e-4, weight_decay: float = 1e-2, warmup_updates: int = 500,
                 max_grad_norm: float = 1.0):
        self.model, self.max_grad_norm = model, max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: min(1.0, (update + 1) / max(1, warmup_updates)))
        self.update = 0

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        loss, metrics = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["wm/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        metrics["wm/lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.update += 1
        return metrics


# ===================================================================================================
# Evaluation: frame quality and reward-model quality on held-out real data
# ===================================================================================================
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR (dB) of uint8 frames (..., H, W, 3). MSE is floored at the smallest non-zero MSE of
    8-bit frames (one level on one value), so identical frames score a finite maximum."""
    mse = ((a.float() - b.float()) ** 2).flatten(-3).mean(-1)
    floor = 1.0 / (a.shape[-3] * a.shape[-2] * a.shape[-1])
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(floor))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of uint8 frames (B, H, W, 3): Wang et al. (2004), 11x11 Gaussian window (sigma 1.5),
    per channel on the 0-255 scale, valid region, averaged."""
    x, y = a.float().movedim(-1, 1), b.float().movedim(-1, 1)
    size = min(11, x.shape[-1])
    g = torch.exp(-((torch.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None]).expand(3, 1, size, size).contiguous()

    def blur(t):
        return F.conv2d(t, window, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def reward_metrics(prob: np.ndarray, label: np.ndarray, bins: int = 10, threshold: float = 0.5) -> dict[str, float]:
    """Binary classifier quality: accuracy and balanced accuracy at `threshold`, precision and recall of
    success, the Brier score, AUROC (Mann-Whitney, ties averaged) and the expected calibration error of
    the success probability itself (equal-width bins: sum over bins of |mean label - mean p| x bin share)."""
    prob, label = np.asarray(prob, np.float64), np.asarray(label).astype(bool)
    pred = prob >= threshold
    pos, neg = label.sum(), (~label).sum()
    tp, tn = (pred & label).sum(), (~pred & ~label).sum()
    recall = tp / pos if pos else float("nan")
    specificity = tn / neg if neg else float("nan")
    out = {"accuracy": float((pred == label).mean()), "balanced_accuracy": float(np.nanmean([recall, specificity])),
           "precision": float(tp / pred.sum()) if pred.sum() else float("nan"), "recall": float(recall),
           "brier": float(((prob - label) ** 2).mean()), "positives": int(pos), "count": int(len(label))}
    which = np.minimum((prob * bins).astype(int), bins - 1)
    out["ece"] = float(sum(abs(label[which == b].mean() - prob[which == b].mean()) * (which == b).mean()
                           for b in range(bins) if (which == b).any()))
    if pos and neg:
        order = np.argsort(prob, kind="mergesort")
        ranks = np.empty(len(prob))
        sorted_p = prob[order]
        i = 0
        while i < len(prob):  # average ranks over ties
            j = i
            while j + 1 < len(prob) and sorted_p[j + 1] == sorted_p[i]:
                j += 1
            ranks[order[i:j + 1]] = (i + j) / 2 + 1
            i = j + 1
        out["auroc"] = float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))
    else:
        out["auroc"] = float("nan")
    return out


@torch.no_grad()
def open_loop(model: WorldModel, data: TransitionData, index: torch.Tensor, horizon: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the real context at each step in `index`, imagine `horizon` frames under the real actions.
    Returns imagined frames (B, horizon, H, W, 3), the real frames at the same steps (the last real frame
    repeated past the episode end), and which (row, step) exist in the data."""
    K = data.K
    batch = data.batch(index)
    past = data.action_window(index, -K + 1, K - 1)
    future = data.action_window(index, 0, horizon)
    seeds = [int(x) for x in np.random.SeedSequence([seed, int(index[0])]).generate_state(len(index), np.uint64)]
    frames = model.imagine(batch["frames"], past, future, data.task[index], seeds)[0]
    real_idx, inside = data.context_index(index, torch.arange(1, horizon + 1))
    return frames.cpu(), data.images[real_idx], inside


@torch.no_grad()
def evaluate(model: WorldModel, data: TransitionData, horizons: tuple[int, ...] = (1, 2, 4, 8), windows: int = 256,
             seed: int = 0, batch_size: int = 32, strip_steps: int = 16) -> tuple[dict[str, float], np.ndarray]:
    """Quality on held-out real data: one-step PSNR / SSIM, open-loop PSNR by horizon (and the
    copy-last-frame baseline), reward-model metrics on real contexts and on imagined ones. Returns the
    metrics and a `real | imagined | difference` strip (uint8 image, rows = steps) of one episode."""
    model.eval()
    H = max(horizons)
    rng = torch.Generator().manual_seed(seed)
    starts = torch.nonzero(data.has_next).squeeze(1)
    starts = starts[torch.randperm(len(starts), generator=rng)[:windows]]
    scores = defaultdict(list)
    for chunk in starts.split(batch_size):
        imagined, real, inside = open_loop(model, data, chunk, H, seed)
        last_real = data.images[chunk]
        for h in horizons:
            ok = inside[:, h - 1]
            scores[f"open_loop_psnr_h{h}"].append(psnr(imagined[ok, h - 1], real[ok, h - 1]))
            scores[f"copy_last_psnr_h{h}"].append(psnr(last_real[ok], real[ok, h - 1]))
        scores["next_frame_ssim"].append(ssim(imagined[:, 0], real[:, 0]))
    metrics = {key: float(torch.cat(values).mean()) for key, values in scores.items() if torch.cat(values).numel()}
    metrics["next_frame_psnr"] = metrics.get("open_loop_psnr_h1", float("nan"))
    metrics["windows"] = len(starts)
    if model.proprio is not None:  # one step, every held-out transition with a successor; baseline: no change
        index = torch.nonzero(data.has_next).squeeze(1)  # proprio and action only: no frame windows
        now, after = data.proprio[index], data.proprio[index + 1]
        predicted = model.proprio.next(now.to(model.device), data.actions[index].to(model.device)).cpu()
        metrics["proprio_rmse"] = float((predicted - after).pow(2).mean().sqrt())
        metrics["proprio_rmse_copy"] = float((now - after).pow(2).mean().sqrt())

    # reward model: every held-out transition on its real context, and on imagined contexts (the frames the
    # imagined env really scores), the labels of the same real transitions
    probs, end_probs = [], []
    for chunk in torch.arange(len(data)).split(256):
        b = data.batch(chunk)
        success, end = model.reward.probabilities(frames_to_model(b["frames"].to(model.device)),
                                                  b["actions"].to(model.device), b["task_id"].to(model.device))
        probs.append(success.cpu())
        end_probs.append(end.cpu())
    real_metrics = reward_metrics(torch.cat(probs).numpy(), data.success.numpy(), threshold=model.cfg.end_threshold)
    metrics.update({f"reward_{k}": v for k, v in real_metrics.items()})
    if model.cfg.end_head:  # episode ends (successes and failures) on real contexts
        end_metrics = reward_metrics(torch.cat(end_probs).numpy(), data.terminated.numpy(),
                                     threshold=model.cfg.end_threshold)
        metrics.update({f"end_{k}": end_metrics[k] for k in ("accuracy", "balanced_accuracy", "auroc", "recall")})
        metrics["end_failures"] = int((data.terminated & ~data.success).sum())
    metrics.update(imagined_reward_metrics(model, data, seed, batch_size, horizon=min(4, H)))
    return metrics, strip(model, data, seed, strip_steps)


@torch.no_grad()
def imagined_reward_metrics(model: WorldModel, data: TransitionData, seed: int, batch_size: int, horizon: int
                            ) -> dict[str, float]:
    """AUROC / recall of success on contexts imagined for up to `horizon` steps: start `horizon` steps
    before each successful ending (and at as many random negatives), follow the real actions, score the
    transitions the reward model sees on imagined frames."""
    ends = torch.nonzero(data.success).squeeze(1)
    if len(ends) == 0:
        return {}
    start = torch.maximum(ends - horizon + 1, data.start[ends])
    rng = torch.Generator().manual_seed(seed + 1)
    negatives = torch.nonzero(~data.success).squeeze(1)
    negatives = negatives[torch.randperm(len(negatives), generator=rng)[:len(ends)]]
    probs, labels = [], []
    for index in (start, negatives):
        for chunk in index.split(batch_size):
            K = data.K
            b = data.batch(chunk)
            seeds = [int(s) for s in np.random.SeedSequence([seed, 7, int(chunk[0])]).generate_state(len(chunk), np.uint64)]
            success = model.imagine(b["frames"], data.action_window(chunk, -K + 1, K - 1),
                                    data.action_window(chunk, 0, horizon), data.task[chunk], seeds)[1]
            idx, inside = data.context_index(chunk, torch.arange(0, horizon))
            label = data.success[idx] & inside
            seen = inside & (torch.cumsum(label.int(), 1) - label.int() == 0)  # up to the real ending
            probs.append(success.cpu()[seen])
            labels.append(label[seen])
    out = reward_metrics(torch.cat(probs).numpy(), torch.cat(labels).numpy(), threshold=model.cfg.end_threshold)
    return {"reward_auroc_imagined": out["auroc"], "reward_recall_imagined": out["recall"],
            "reward_precision_imagined": out["precision"]}


@torch.no_grad()
def strip(model: WorldModel, data: TransitionData, seed: int, steps: int) -> np.ndarray:
    """`real | imagined | |difference|` rows, open loop from the first frame of the longest successful episode
    (the longest episode when none succeeded): the approach and the grasp."""
    first, end = max(data.episodes, key=lambda e: (bool(data.success[e[1] - 1]), e[1] - e[0]))
    steps = max(1, min(steps, end - first - 1))
    imagined, real, _ = open_loop(model, data, torch.tensor([first]), steps, seed)
    rows = []
    for j in range(steps):
        r, m = real[0, j].numpy(), imagined[0, j].numpy()
        diff = np.abs(r.astype(np.int16) - m.astype(np.int16)).astype(np.uint8)
        gap = np.full((r.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([r, gap, m, gap, diff], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def format_table(metrics: dict[str, float], horizons: tuple[int, ...]) -> str:
    """The quality table in markdown."""
    lines = ["| horizon (env steps) | " + " | ".join(str(h) for h in horizons) + " |",
             "|---|" + "---|" * len(horizons),
             "| open-loop PSNR (dB) | " + " | ".join(f"{metrics.get(f'open_loop_psnr_h{h}', float('nan')):.2f}"
                                                   for h in horizons) + " |",
             "| copy-last-frame PSNR (dB) | " + " | ".join(f"{metrics.get(f'copy_last_psnr_h{h}', float('nan')):.2f}"
                                                         for h in horizons) + " |",
             "",
             f"next-frame PSNR {metrics['next_frame_psnr']:.2f} dB, SSIM {metrics['next_frame_ssim']:.4f} "
             f"({metrics['windows']} held-out windows)",
             f"reward model on real contexts: accuracy {metrics['reward_accuracy']:.4f}, balanced accuracy "
             f"{metrics['reward_balanced_accuracy']:.4f}, precision {metrics['reward_precision']:.3f}, recall "
             f"{metrics['reward_recall']:.3f}, AUROC {metrics['reward_auroc']:.4f}, ECE {metrics['reward_ece']:.4f}, "
             f"Brier {metrics['reward_brier']:.4f} ({metrics['reward_positives']} successes in "
             f"{metrics['reward_count']} transitions)"]
    if "reward_auroc_imagined" in metrics:
        lines.append(f"reward model on imagined contexts: AUROC {metrics['reward_auroc_imagined']:.4f}, precision "
                     f"{metrics['reward_precision_imagined']:.3f}, recall {metrics['reward_recall_imagined']:.3f}")
    if "end_auroc" in metrics:
        lines.append(f"end of episode (successes and {metrics['end_failures']} failure terminations) on real contexts: "
                     f"accuracy {metrics['end_accuracy']:.4f}, balanced {metrics['end_balanced_accuracy']:.3f}, "
                     f"recall {metrics['end_recall']:.3f}, AUROC {metrics['end_auroc']:.4f}")
    if "proprio_rmse" in metrics:
        lines.append(f"proprio one step ahead: RMSE {metrics['proprio_rmse']:.5f} (no-change baseline "
                     f"{metrics['proprio_rmse_copy']:.5f})")
    return "\n".join(lines)


def write_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def log_evaluation(writer, metrics: dict[str, float], image: np.ndarray, step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"wm/{key}", value, step)
    writer.add_image("wm/open_loop_strip", image, step, dataformats="HWC")


# ===================================================================================================
# Data: weak scripted policies (successes and failures) on tabletop2d, or a saved VLAPolicy
# ===================================================================================================
@dataclass
class Collect:
    """Record tabletop2d episodes of weak policies (both outcomes kept) in demos.py's HDF5 layout."""

    task: str = "tabletop2d"
    """Task family ('/<i>' pins one task); the scripted policies need tabletop2d."""
    episodes: int = 50
    """Episodes per task."""
    out: str = "demos/wm_tabletop2d"
    """Output directory; one `<task-name>_demo.hdf5` per task (demos.task_file_name)."""
    seed: int = 1
    """Episode k of task t resets with a seed derived from (seed, t, k)."""
    image_size: int = 128
    """Frame side in pixels (the policy's and the world model's)."""
    chunk_len: int = 8
    """Actions per plan (the policies re-plan every chunk, as the VLA acts)."""
    noise: float = 0.5
    """Std of Gaussian noise on the scripted expert's x, y and gripper actions (normalised units)."""
    wrong_target_prob: float = 0.6
    """Per chunk: plan for a uniformly drawn other object (grasps on the wrong object: hard negatives)."""
    random_chunk_prob: float = 0.3
    """Per chunk: uniformly random actions instead. With these defaults ~60 % of the episodes succeed,
    in ~40 env steps on average (measured, 100 episodes at 64 px)."""
    policy_dir: str | None = None
    """Act with a saved VLAPolicy (VLAPolicy.save, e.g. sft.py's) by sampling, instead of the scripted mix."""
    env_options: str = "{}"
    """Env options as JSON (envs/tabletop2d.py)."""


def collect(cfg: Collect) -> dict:
    """Run the episodes (serially: tabletop2d steps at thousands per second) and write one file per task."""
    from demos import DemoWriter, task_file_name
    from envs.tabletop2d import expert_chunk

    family, pinned = parse_task(cfg.task)
    options = json.loads(cfg.env_options)
    policy = None
    if cfg.policy_dir:
        from vla_policy import VLAPolicy

        policy = VLAPolicy.load(cfg.policy_dir).eval()
        instructions = None
    elif family != "tabletop2d":
        raise SystemExit("world_model collect: the scripted policies need tabletop2d; pass --policy-dir for others")
    env = make_env(family, image_size=cfg.image_size, seed=0, **options)
    spec = env.spec
    if policy is not None:
        instructions = policy.tokenizer.encode(list(spec.instructions), policy.cfg.max_instruction_tokens)
    tasks = [pinned] if pinned is not None else list(range(spec.num_tasks))
    summary = {"task": cfg.task, "policy": cfg.policy_dir or "scripted mix", "tasks": {}}
    start = time.time()
    for t in tasks:
        path = Path(cfg.out) / task_file_name(spec.instructions[t])
        successes, lengths = [], []
        with DemoWriter(path, spec.instructions[t], task=f"{family}/{t}", task_id=t, env_name=family,
                        env_kwargs={"image_size": cfg.image_size, **options}) as writer:
            for k in range(cfg.episodes):
                env_seed, policy_seed = np.random.SeedSequence([cfg.seed, WM_SEED_STREAM, t, k]).generate_state(2)
                rng = np.random.default_rng(int(policy_seed))
                obs = env.reset(task_id=t, seed=int(env_seed))
                images, actions, proprio, done, info = [], [], [], False, {"success": False}
                while not done:
                    if policy is not None:
                        with torch.no_grad():
                            chunk = policy.act(torch.from_numpy(obs["image"])[None, None], instructions[[t]],
                                               generator=torch.Generator().manual_seed(int(rng.integers(2**31))),
                                               proprio=torch.from_numpy(np.asarray(obs["proprio"], np.float32))[None])
                        chunk = chunk["actions"][0].float().numpy()
                    elif rng.random() < cfg.random_chunk_prob:
                        chunk = rng.uniform(-1, 1, (cfg.chunk_len, 7))
                    else:
                        others = [o for o in range(spec.num_tasks) if o != t]
                        target = int(rng.choice(others)) if rng.random() < cfg.wrong_target_prob else None
                        chunk = expert_chunk(env, cfg.chunk_len, cfg.noise, rng, task_id=target)
                    for action in chunk:
                        images.append(obs["image"])
                        proprio.append(obs["proprio"])
                        actions.append(action)
                        obs, _, terminated, truncated, info = env.step(action)
                        done = terminated or truncated
                        if done:
                            break
                writer.add_episode(np.stack(images), np.stack(actions), np.stack(proprio), bool(info["success"]),
                                   terminated=bool(terminated))
                successes.append(bool(info["success"]))
                lengths.append(len(actions))
        summary["tasks"][str(t)] = {"file": path.name, "episodes": len(successes),
                                    "success_rate": float(np.mean(successes)), "mean_length": float(np.mean(lengths))}
    summary["seconds"] = round(time.time() - start, 1)
    env.close()
    return summary


# ===================================================================================================
# Command line
# ===================================================================================================
@dataclass
class Train:
    """Train the denoiser and the reward model on demonstration files (demos.py's layout, ours or LIBERO's)."""

    data: tuple[str, ...] = ("demos/wm_tabletop2d",)
    """HDF5 files or directories of them (successes and failures: the reward model needs both)."""
    task: str = "tabletop2d"
    """Env family the model is for: its instructions number the tasks (the reward model's task input)."""
    exp_name: str = "wm"
    """Name of the experiment; part of the run name."""
    seed: int = 1
    """Seed of initialisation, batch order and noise."""
    run_dir: str | None = None
    """Tensorboard logs and summary.json (default runs/<task>__<exp_name>__<seed>__<time>)."""
    out: str | None = None
    """Where the world model is written (atomically); default <run_dir>/world_model."""
    init: str | None = None
    """Continue from a saved world model (its architecture and optimiser replace --model.*)."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:N."""
    threads: int = 0
    """torch CPU threads (0: torch's default). On cores shared with other work use 1 (sft.py's note)."""
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    """Architecture and diffusion settings."""
    total_updates: int = 20_000
    """Optimiser steps."""
    max_minutes: float = 0.0
    """Also stop after this many minutes of training (0: no limit)."""
    batch_size: int = 32
    """Transitions per update."""
    lr: float = 1e-4
    """Peak learning rate (reference.md section 5)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    warmup_updates: int = 500
    """Linear learning-rate warm-up, then constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    success_fraction: float = 0.125
    """Share of each batch drawn from the success transitions, importance-weighted back to their real
    frequency in the reward loss (SuccessSampler); 0: plain uniform batches."""
    holdout_fraction: float = 0.1
    """Episodes held out for evaluation (by a hash of file and demo name: `eval` finds the same ones)."""
    log_every_updates: int = 50
    """Training scalars and a progress line every this many updates."""
    eval_every_updates: int = 0
    """Held-out evaluation every this many updates (0: only at the end)."""
    eval_windows: int = 256
    """Held-out start steps per evaluation."""


@dataclass
class Eval:
    """Quality of a saved world model on real data: frame PSNR / SSIM, open-loop PSNR by horizon, reward model."""

    checkpoint: str
    """A directory written by WorldModel.save (e.g. <run>/world_model)."""
    data: tuple[str, ...] = ("demos/wm_tabletop2d",)
    """HDF5 files or directories of them."""
    split: Literal["heldout", "all"] = "heldout"
    """Episodes to score: those `train` held out (same --holdout-fraction), or all (a separate test set)."""
    holdout_fraction: float = 0.1
    """As given to `train`."""
    horizons: tuple[int, ...] = (1, 2, 4, 8)
    """Open-loop horizons (env steps)."""
    windows: int = 512
    """Start steps scored (a random subset of the transitions)."""
    seed: int = 0
    """Seed of the window choice and the sampler noise."""
    strip: str | None = None
    """PNG of the `real | imagined | difference` strip (default <checkpoint>/eval_strip.png)."""
    run_dir: str | None = None
    """Also write the metrics and the strip to tensorboard here (tags wm/...)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train(args: Train) -> dict:
    """Offline training; returns the summary (also in <run_dir>/summary.json and the model's train.json)."""
    from torch.utils.tensorboard import SummaryWriter

    start_time = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    cfg = load_config(args.init) if args.init else args.model
    spec = env_spec(args.task, image_size=cfg.image_size)
    if not cfg.instructions:
        cfg.instructions = spec.instructions
    if cfg.proprio_dim < 0:
        cfg.proprio_dim = spec.proprio_dim
    run_dir = Path(args.run_dir or f"runs/{args.task.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(start_time)}")
    out = Path(args.out) if args.out else run_dir / "world_model"
    train_eps, heldout_eps = split_episodes(read_episodes(args.data, cfg.image_size), args.holdout_fraction)
    if not train_eps or not heldout_eps:
        raise SystemExit(f"world_model train: {len(train_eps)} training and {len(heldout_eps)} held-out episodes; "
                         "collect more or change --holdout-fraction")
    try:  # before any training or output
        check_instructions(train_eps + heldout_eps, cfg.instructions,
                           f"--init {args.init}" if args.init else f"--task {args.task}")
    except ValueError as error:
        raise SystemExit(f"world_model train: {error}") from None
    data = TransitionData(train_eps, cfg.instructions, cfg.context_frames)
    heldout = TransitionData(heldout_eps, cfg.instructions, cfg.context_frames)
    if cfg.proprio_dim and data.proprio.shape[1] != cfg.proprio_dim:
        raise SystemExit(f"world_model train: the data hold {data.proprio.shape[1]}-D proprio, the model predicts "
                         f"{cfg.proprio_dim}-D (--model.proprio-dim; 0: none)")
    model = WorldModel.load(args.init, device) if args.init else WorldModel(cfg).to(device)
    previous = Path(args.init or "") / "train.json"
    updates_before = json.loads(previous.read_text()).get("updates_total", 0) if args.init and previous.is_file() else 0
    trainer = WorldModelTrainer(model, args.lr, args.weight_decay, args.warmup_updates, args.max_grad_norm)
    if args.init and load_optimizer_state(args.init, trainer.optimizer):
        log("wm", f"optimiser state from {args.init}")
    params = sum(p.numel() for p in model.parameters())
    log("wm", f"{len(train_eps)} training episodes ({len(data)} transitions, {int(data.success.sum())} successes), "
              f"{len(heldout_eps)} held out; {params / 1e6:.2f} M parameters "
              f"(denoiser {sum(p.numel() for p in model.denoiser.parameters()) / 1e6:.2f} M); device {device}")
    writer = SummaryWriter(str(run_dir))
    writer.add_text("args", f"```\n{json.dumps(asdict(args), indent=1, default=str)}\n```")
    sampler = SuccessSampler(data, args.batch_size, args.success_fraction, torch.Generator().manual_seed(args.seed))
    window: dict[str, list[float]] = defaultdict(list)
    history: list[tuple[int, float, float]] = []
    window_start, interrupted = time.perf_counter(), False
    deadline = start_time + args.max_minutes * 60 if args.max_minutes > 0 else math.inf
    metrics = {}
    restore_signals = interrupt_on_stop_signals()
    try:
        while trainer.update < args.total_updates and time.time() < deadline:
            for key, value in trainer.train_step(sampler.sample()).items():
                window[key].append(value)
            update = trainer.update
            if update % args.log_every_updates == 0:
                scalars = {key: float(np.mean(values)) for key, values in window.items()}
                scalars["perf/wm_samples_per_s"] = len(window["wm/loss"]) * args.batch_size / (
                    time.perf_counter() - window_start)
                for key, value in scalars.items():
                    writer.add_scalar(key, value, update)
                history.append((update, scalars["wm/denoiser_loss"], scalars["wm/reward_loss"]))
                proprio = f" proprio {scalars['wm/proprio_loss']:.2e}" if "wm/proprio_loss" in scalars else ""
                log("wm", f"update {update} denoiser {scalars['wm/denoiser_loss']:.4f} reward "
                          f"{scalars['wm/reward_loss']:.4f}{proprio} ({scalars['perf/wm_samples_per_s']:.0f} "
                          f"transitions/s)")
                window, window_start = defaultdict(list), time.perf_counter()
            if args.eval_every_updates and update % args.eval_every_updates == 0:
                metrics, image = evaluate(model, heldout, windows=args.eval_windows, seed=args.seed)
                log_evaluation(writer, metrics, image, update)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was learnt
        interrupted = True
        log("wm", f"interrupted at update {trainer.update}; evaluating and saving")
    finally:
        restore_signals()
    metrics, image = evaluate(model, heldout, windows=args.eval_windows, seed=args.seed)
    log_evaluation(writer, metrics, image, trainer.update)
    write_png(image, run_dir / "wm_strip.png")
    summary = {"updates": trainer.update, "updates_total": updates_before + trainer.update, "interrupted": interrupted, "data": list(args.data),
               "train_episodes": len(train_eps), "heldout_episodes": len(heldout_eps),
               "holdout_fraction": args.holdout_fraction, "loss_history": history, "heldout": metrics,
               "parameters": params, "wall_seconds": round(time.time() - start_time, 1), "world_model": str(out)}
    model.save(out, extra={"args": asdict(args), **summary}, optimizer=trainer.optimizer)
    writer.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(format_table(metrics, (1, 2, 4, 8)))
    log("wm", f"world model -> {out}")
    return summary


def evaluate_command(args: Eval) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = WorldModel.load(args.checkpoint, resolve_device(args.device))
    episodes = read_episodes(args.data, model.cfg.image_size)
    if args.split == "heldout":
        episodes = split_episodes(episodes, args.holdout_fraction)[1]
    if not episodes:
        raise SystemExit("world_model eval: no episodes to score (check --data, --split, --holdout-fraction)")
    data = TransitionData(episodes, model.cfg.instructions, model.cfg.context_frames)
    metrics, image = evaluate(model, data, args.horizons, args.windows, args.seed)
    path = write_png(image, args.strip or Path(args.checkpoint) / "eval_strip.png")
    if args.run_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.run_dir) as writer:
            log_evaluation(writer, metrics, image, 0)
    print(format_table(metrics, args.horizons))
    print(f"strip (rows = steps: real | imagined | difference): {path}")
    print(json.dumps({"episodes": len(episodes), **metrics}))
    return metrics


def main(argv: list[str] | None = None) -> int:
    cmd = tyro.extras.subcommand_cli_from_dict({"collect": Collect, "train": Train, "eval": Eval}, args=argv)
    if isinstance(cmd, Collect):
        summary = collect(cmd)
        print(json.dumps(summary, indent=1))
    elif isinstance(cmd, Train):
        summary = train(cmd)
        return 130 if summary["interrupted"] else 0
    else:
        evaluate_command(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
