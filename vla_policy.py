"""The VLA policy: one interface (`act` for rollouts, `evaluate` for the learner) and its default model.

Everything else in the project talks to the policy only through `VLAPolicy` and `InstructionTokenizer`:

    env worker:  InstructionTokenizer.encode(instructions)          -> instruction_tokens (no model needed)
    inference:   VLAPolicy.act(images, instruction_tokens, greedy)  -> action tokens, actions, logp, log_probs, value
    learner:     VLAPolicy.evaluate(images, instruction_tokens, action_tokens) -> logp, entropy, log_probs, value

The model is OpenVLA-OFT shaped (reference.md section 3), built from transformers configs with random
weights (nothing is downloaded):

    images uint8 (B, cams, H, W, 3) -> SigLIP vision encoder (8 x 8 patches of 16 px at 128 px)
                                    -> 2 x 2 patch merge + MLP projector -> 16 vision tokens per camera
    instruction ids (B, L)          -> decoder token embeddings
    [vision tokens | instruction | action slots] -> Llama decoder, ONE forward pass (parallel decoding)
    action slots' hidden states     -> action head -> logits (B, chunk_len, action_dim, num_bins)
    detached action-slot states     -> attention pooling -> LayerNorm -> MLP -> value (B,)

Two layouts of the action slots:
- "per_step" (default): one slot per chunk step (8), a factorised head maps each slot to 7 x 256 logits.
  7x fewer decoder tokens than OFT; this is what makes the CPU preset fast (platform.md "Small VLA
  policies": 101-120 vs 57-62 inferences/s per core).
- "per_dim": exact OpenVLA-OFT, one slot per action token (8 x 7 = 56); the head is the LM head cut to the
  rows of the last 256 vocabulary ids (the action tokens).

Actions are normalised to [-1, 1] per dimension and discretised into `num_bins` uniform bins; a token is a
bin index and decodes to the bin centre (`tokens_to_actions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaModel, ResNetConfig, ResNetModel, SiglipVisionConfig, SiglipVisionModel

Layout = Literal["per_step", "per_dim"]
ValuePooling = Literal["actions", "prompt"]
PrefixAttention = Literal["causal", "bidirectional"]
ActionHead = Literal["smooth", "linear"]


@dataclass
class PolicyConfig:
    """Shape and size of the policy. The defaults are the CPU "tiny" preset: 5.0 M parameters, ~140
    inferences/s per core in float32 at batch 8 (benchmarks/policy_speed.py)."""

    # observation and action spaces
    image_size: int = 128
    """Square image side in pixels; images must arrive at this size (no resizing inside the model)."""
    num_cameras: int = 1
    """Images per observation, (B, num_cameras, H, W, 3) uint8; camera 0 is the third-person view."""
    chunk_len: int = 8
    """Actions per chunk, all decoded in one forward pass (OFT parallel decoding)."""
    action_dim: int = 7
    """Action dimensions (6-DoF end-effector delta + gripper)."""
    num_bins: int = 256
    """Uniform bins over [-1, 1] per action dimension (OpenVLA: 256)."""
    max_instruction_tokens: int = 32
    """Instruction buffer length: bytes + bos + eos, right-padded, longer text cut (LIBERO's instructions
    need up to ~100). Pad columns no row of a batch uses cost nothing: the model trims them."""
    layout: Layout = "per_step"
    """Action slots: "per_step" (chunk_len slots, factorised 7 x 256 head) or "per_dim" (exact OFT, 56 slots)."""

    # vision encoder (SigLIP from config, random init)
    patch_size: int = 16
    """ViT patch side; 128 px / 16 = 8 x 8 = 64 vision tokens per camera."""
    vision_hidden: int = 192
    """Vision encoder width."""
    vision_layers: int = 3
    """Vision encoder depth."""
    vision_heads: int = 3
    """Vision attention heads (head dim 64)."""
    vision_mlp: int = 768
    """Vision MLP inner width."""
    vision_tower: Literal["siglip", "resnet"] = "siglip"
    """Vision encoder from transformers configs: "siglip" (a ViT, as OpenVLA's towers) or "resnet" (a small
    ResNet whose stride-32 feature map gives (image_size / 32)^2 tokens, plus a 2-D position code)."""
    resnet_widths: tuple[int, ...] = (32, 64, 128, 192)
    """ResNet stage widths (4 stages: stride 32)."""
    instruction_slots: bool = False
    """Add the instruction code (as for FiLM) to every action slot's input embedding, so that an action slot's
    first attention query already asks for what the instruction names (one hop from words to image
    regions instead of two: slot -> instruction -> image). Measured on tabletop2d (docs/RESULTS.md): no faster
    learning, alone or with FiLM; kept for ablations."""
    instruction_film: bool = False
    """Condition the ResNet tower on the instruction (FiLM after every stage, as RT-1's FiLM-EfficientNet):
    the vision tokens then already mark what the instruction names, instead of the decoder having to
    match words to image regions across layers. The instruction code is a mean over its token embeddings
    plus a learned position table, through an MLP; the FiLM layers start at identity. ResNet tower only."""
    vision_position_init: Literal["sincos2d", "random"] = "sincos2d"
    """Initial vision position embeddings: a 2-D sine-cosine code (where a patch is, readable from the
    start: RL from random init learns spatial tasks much faster) or SigLIP's random init. Trainable either way."""
    vision_token_merge: int = 2
    """Merge each m x m block of patch tokens into one decoder token (pixel shuffle, as SmolVLM / Idefics3):
    m = 2 gives 16 instead of 64 vision tokens per camera, and a decoder ~2x cheaper."""

    # decoder LM (Llama from config, random init)
    hidden: int = 256
    """Decoder width (and width of the projected vision tokens)."""
    decoder_layers: int = 3
    """Decoder depth."""
    decoder_heads: int = 4
    """Decoder attention heads (head dim 64)."""
    decoder_mlp: int = 768
    """Decoder SwiGLU inner width."""
    prefix_attention: PrefixAttention = "causal"
    """How vision + instruction tokens attend among themselves: "causal" (a stock LM, as OpenVLA) or
    "bidirectional" (prefix-LM). Action slots always see the whole prefix and each other."""

    # heads
    action_head: ActionHead = "smooth"
    """How a slot's hidden state becomes 256 bin logits per dimension. "linear": one independent row per
    bin (the LM head of OpenVLA). "smooth": a low-rank map onto a fixed basis of Gaussian bumps over the
    bin centres, so raising one bin also raises its neighbours: the bins keep their order, which RL from
    random init needs (a linear head learns each of the 256 bins on its own). Logits keep the same shape."""
    smooth_basis: int = 24
    """Number of Gaussian bumps of the "smooth" head (evenly spaced over [-1, 1], width = spacing)."""
    action_head_init_scale: float = 0.01
    """Std of the initial logits (weights ~ N(0, (scale / sqrt(hidden))^2), zero bias): the initial policy is
    close to uniform over bins, which keeps early RL exploration broad."""
    value_pooling: ValuePooling = "actions"
    """Critic input: "actions" = attention pooling over the action slots (AcceRL), "prompt" = over the
    non-pad vision + instruction tokens."""
    value_hidden: int = 256
    """Critic MLP width."""
    value_detach: bool = True
    """Stop the critic's gradient at the trunk (AcceRL: the critic reads detached hidden states)."""

    def __post_init__(self) -> None:
        self.resnet_widths = tuple(self.resnet_widths)  # JSON round trips give lists
        for name, choices in (("layout", Layout), ("value_pooling", ValuePooling),
                              ("prefix_attention", PrefixAttention), ("action_head", ActionHead)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {get_args(choices)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (self.image_size // self.patch_size) % self.vision_token_merge:
            raise ValueError("the patch grid side must be a multiple of vision_token_merge")
        if self.instruction_film and self.vision_tower != "resnet":
            raise ValueError("instruction_film conditions the ResNet tower: set vision_tower='resnet'")
        if self.max_instruction_tokens < 2:
            raise ValueError("max_instruction_tokens must leave room for bos and eos (>= 2)")

    @property
    def num_action_slots(self) -> int:
        """Decoder positions that carry actions: one per step, or one per action token (OFT)."""
        return self.chunk_len if self.layout == "per_step" else self.chunk_len * self.action_dim

    @property
    def vision_tokens(self) -> int:
        """Vision tokens in the decoder input, over all cameras."""
        if self.vision_tower == "resnet":
            return self.num_cameras * (self.image_size // 2 ** (len(self.resnet_widths) + 1)) ** 2
        return self.num_cameras * (self.image_size // self.patch_size // self.vision_token_merge) ** 2


# ---------------------------------------------------------------------------------------------------------
# Action discretisation: 256 uniform bins over [-1, 1], a token decodes to its bin centre.
# ---------------------------------------------------------------------------------------------------------


def tokens_to_actions(tokens: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """Bin indices (any shape, 0..num_bins-1) -> float32 bin centres in (-1, 1)."""
    return (tokens.to(torch.float32) + 0.5) * (2.0 / num_bins) - 1.0


def actions_to_tokens(actions: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """Continuous actions (clipped to [-1, 1]) -> long bin indices; exact inverse of `tokens_to_actions`."""
    scaled = (actions.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * (num_bins / 2.0)
    return scaled.floor().long().clamp_(0, num_bins - 1)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


class InstructionTokenizer:
    """Byte-level instruction tokenizer, built locally with `tokenizers` (no download, no model).

    Vocabulary: ids 0..2 = pad, bos, eos; 3..258 = the 256 bytes; the LAST `num_bins` ids are the action
    tokens, `<act_k>` = bin k (OpenVLA also puts its action tokens at the end of the vocabulary, though it
    numbers the bins downwards from the last id; from scratch the direction does not matter, so ours go
    upwards). Text can never produce a special or action token: every byte maps to a byte token.

    `encode` gives `[bos] bytes [eos] pad...`; text longer than `max_len - 2` bytes keeps its first
    `max_len - 2` bytes (bos and eos are always present, so the model sees where the text stops).
    Picklable and cheap: env workers encode their task instructions once and send ids with each request.
    """

    PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
    FIRST_BYTE_ID = 3
    FILE = "tokenizer.json"

    def __init__(self, num_bins: int = 256, tokenizer: Tokenizer | None = None):
        self.num_bins = num_bins
        if tokenizer is None:
            vocab = {self.PAD: 0, self.BOS: 1, self.EOS: 2}
            vocab |= {char: self.FIRST_BYTE_ID + byte for byte, char in enumerate(_byte_level_chars())}
            vocab |= {f"<act_{k}>": self.FIRST_BYTE_ID + 256 + k for k in range(num_bins)}
            # BPE without merges over the byte alphabet = one token per byte.
            tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
            tokenizer.decoder = decoders.ByteLevel()
        self._tok = tokenizer
        self.pad_id = tokenizer.token_to_id(self.PAD)
        self.bos_id = tokenizer.token_to_id(self.BOS)
        self.eos_id = tokenizer.token_to_id(self.EOS)
        self.vocab_size = tokenizer.get_vocab_size()
        self.first_action_id = self.vocab_size - num_bins
        if tokenizer.token_to_id(f"<act_{num_bins - 1}>") != self.vocab_size - 1:
            raise ValueError("tokenizer does not end with the action tokens")

    def encode(self, texts: list[str], max_len: int) -> torch.LongTensor:
        """Instructions -> (B, max_len) long ids, `[bos] bytes [eos]` right-padded with `pad_id`."""
        if max_len < 2:
            raise ValueError("max_len must leave room for bos and eos (>= 2)")
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id, *encoding.ids[: max_len - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """One row of ids -> text, dropping pad/bos/eos and action tokens."""
        ids = [int(i) for i in ids if self.FIRST_BYTE_ID <= int(i) < self.first_action_id]
        return self._tok.decode(ids, skip_special_tokens=False)

    def num_tokens(self, text: str) -> int:
        """Length of `text` once encoded without truncation (bytes + bos + eos): size `max_len` with it."""
        return len(text.encode("utf-8")) + 2

    def action_token_ids(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin indices -> vocabulary ids of the action tokens (the last `num_bins` ids)."""
        return bins.long() + self.first_action_id

    def save(self, directory: str) -> None:
        """Write tokenizer.json (the `tokenizers` format)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, self.FILE))

    @classmethod
    def load(cls, directory: str, num_bins: int = 256) -> "InstructionTokenizer":
        """Read tokenizer.json written by `save`."""
        return cls(num_bins, Tokenizer.from_file(os.path.join(directory, cls.FILE)))


def _byte_level_chars() -> list[str]:
    """The printable character that `tokenizers`' ByteLevel pre-tokenizer uses for each byte 0..255 (GPT-2's
    table: printable Latin-1 bytes stand for themselves, the others map in order to U+0100, U+0101, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


# ---------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------


def policy_autocast(device: torch.device | str, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast for the policy's forward: always on CUDA, on CPU only when `cpu_bf16`.

    The heads compute logits, log-softmax and the value in float32 whatever the context. bf16 on CPU is
    ~1.7x faster for inference and ~2x for training here (Zen 4 has avx512_bf16), but its log-probs differ
    from float32 ones (measured: mean |d logp| 0.013, max 0.06 with logits of std 2): if the inference
    process uses it and the learner does not, GIPO sees that difference as off-policy noise.
    """
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_bf16):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _linear_fp32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)` in float32 even under autocast or with a bf16 model: logits feed log-softmax and ratios."""
    with torch.autocast(x.device.type, enabled=False):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def _sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) fixed 2-D sine-cosine position code (MAE / ViT-2D style), row-major patches:
    half of the channels encode the row, half the column, at geometric frequencies."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for grid in (rows, cols):
        angles = grid.reshape(-1, 1) * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1])).float()


def _merge_patches(tokens: torch.Tensor, m: int) -> torch.Tensor:
    """(N, side*side, D) row-major patch tokens -> (N, (side/m)^2, m*m*D): each m x m block concatenated."""
    n, count, dim = tokens.shape
    side = math.isqrt(count)
    blocks = tokens.reshape(n, side // m, m, side // m, m, dim).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, (side // m) ** 2, m * m * dim)


def _sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample from each categorical over the last dim, by inverse CDF: one uniform per token instead of
    one Gumbel per bin (10x cheaper on CPU: 0.3 vs 3.5 ms for a batch of 8 x 56 x 256)."""
    cdf = log_probs.exp().cumsum(-1)
    # Scale by the last cdf entry (1 up to rounding) so that u never lands beyond the final bin.
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    # right=True: the first bin whose cdf exceeds u, so a zero-probability bin is never picked.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(cdf.shape[-1] - 1)


class AttentionPoolValueHead(nn.Module):
    """Critic: attention pooling -> LayerNorm -> MLP -> scalar (AcceRL's value head, reference.md section 3).

    The pooling query is learned (one linear score per token, softmax over the valid tokens), so the critic
    can learn which slots or tokens carry value information. Runs in float32.
    """

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.score = nn.Linear(hidden, 1)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1))
        nn.init.zeros_(self.score.weight)  # start from mean pooling
        nn.init.zeros_(self.score.bias)

    def forward(self, states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """states (B, N, D), valid (B, N) bool or None -> value (B,) float32."""
        with torch.autocast(states.device.type, enabled=False):
            states = states.float()
            scores = _linear_fp32(states, self.score).squeeze(-1)
            if valid is not None:
                scores = scores.masked_fill(~valid, float("-inf"))
            pooled = torch.einsum("bn,bnd->bd", scores.softmax(-1), states)
            return self.mlp(self.norm(pooled)).squeeze(-1)


class VLAPolicy(nn.Module):
    """OFT-style VLA policy (see the module docstring); the only policy interface of the project."""

    def __init__(self, cfg: PolicyConfig | None = None):
        super().__init__()
        cfg = cfg or PolicyConfig()
        self.cfg = cfg
        # A guard, process-wide: denormal floats cost up to 3.6x on these CPUs (platform.md, conv nets) and can
        # appear as weights and activations shrink in training; flushing them to zero changes nothing for RL.
        # (No measurable effect on this model at init.)
        torch.set_flush_denormal(True)
        self.tokenizer = InstructionTokenizer(cfg.num_bins)

        vision_config = SiglipVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            vision_use_head=False, attn_implementation="sdpa",
            hidden_act="gelu")  # exact GELU: 3.5x cheaper than SigLIP's tanh approximation on CPU, no weights to match
        if cfg.vision_tower == "resnet":
            self.vision = ResNetModel(ResNetConfig(
                num_channels=3, embedding_size=cfg.resnet_widths[0], hidden_sizes=list(cfg.resnet_widths),
                depths=[1] * len(cfg.resnet_widths), layer_type="basic", hidden_act="relu"))
            side = cfg.image_size // 2 ** (len(cfg.resnet_widths) + 1)
            self.vision_position = nn.Parameter(_sincos_2d(side, cfg.hidden) * 0.5)
            if cfg.instruction_film:
                self.film = nn.ModuleList(nn.Linear(cfg.hidden, 2 * width) for width in cfg.resnet_widths)
                for layer in self.film:  # identity at init: gamma = 1 + 0, beta = 0
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        else:
            self.vision = SiglipVisionModel(vision_config)
        if cfg.vision_position_init == "sincos2d" and cfg.vision_tower == "siglip":
            with torch.no_grad():
                table = self.vision.embeddings.position_embedding.weight
                table.copy_(_sincos_2d(cfg.image_size // cfg.patch_size, cfg.vision_hidden) * 0.5)
        if cfg.instruction_film or cfg.instruction_slots:
            self.instruction_position = nn.Parameter(torch.zeros(cfg.max_instruction_tokens, cfg.hidden))
            self.instruction_encoder = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        # Two-layer MLP projector into the LM width, as in OpenVLA / LLaVA-1.5.
        merged_width = (cfg.resnet_widths[-1] if cfg.vision_tower == "resnet"
                        else cfg.vision_hidden * cfg.vision_token_merge ** 2)
        self.projector = nn.Sequential(nn.Linear(merged_width, cfg.hidden), nn.GELU(),
                                       nn.Linear(cfg.hidden, cfg.hidden))
        decoder_config = LlamaConfig(
            vocab_size=self.tokenizer.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.decoder_mlp,
            num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_heads,
            num_key_value_heads=cfg.decoder_heads,
            max_position_embeddings=cfg.vision_tokens + cfg.max_instruction_tokens + cfg.num_action_slots,
            pad_token_id=self.tokenizer.pad_id, bos_token_id=self.tokenizer.bos_id,
            eos_token_id=self.tokenizer.eos_id, use_cache=False, attn_implementation="sdpa")
        self.decoder = LlamaModel(decoder_config)
        # Learned inputs of the action slots; OFT feeds placeholder embeddings there, their outputs are read.
        self.action_slots = nn.Parameter(torch.randn(cfg.num_action_slots, cfg.hidden) * 0.02)
        # per_step: a factorised head, one slot -> action_dim x num_bins logits. per_dim: the LM head restricted
        # to the action tokens' rows (row k = vocabulary id first_action_id + k = bin k).
        per_dim_out = cfg.num_bins if cfg.action_head == "linear" else cfg.smooth_basis
        head_out = cfg.action_dim * per_dim_out if cfg.layout == "per_step" else per_dim_out
        self.action_head = nn.Linear(cfg.hidden, head_out)
        if cfg.action_head == "smooth":
            # (bins, basis): bump k evaluated at the centre of bin b; a fixed buffer, saved with the weights
            centres = tokens_to_actions(torch.arange(cfg.num_bins), cfg.num_bins)
            means = torch.linspace(-1, 1, cfg.smooth_basis)
            width = 2 / (cfg.smooth_basis - 1)
            self.register_buffer("bin_basis", torch.exp(-0.5 * ((centres[:, None] - means[None]) / width) ** 2))
        nn.init.normal_(self.action_head.weight, std=cfg.action_head_init_scale / math.sqrt(cfg.hidden))
        nn.init.zeros_(self.action_head.bias)
        self.value_head = AttentionPoolValueHead(cfg.hidden, cfg.value_hidden)

    def train(self, mode: bool = True) -> "VLAPolicy":
        """BatchNorm (ResNet tower) always uses its fixed statistics: batch statistics in the learner but
        not in the inference copy would make the behaviour and learner policies differ on the same input."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # -- parameter groups ---------------------------------------------------------------------------------

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters (value learning rate)."""
        return list(self.value_head.parameters())

    def policy_parameters(self) -> list[nn.Parameter]:
        """Everything but the critic (policy learning rate)."""
        value_ids = {id(p) for p in self.value_parameters()}
        return [p for p in self.parameters() if id(p) not in value_ids]

    # -- forward ------------------------------------------------------------------------------------------

    def _attention_mask(self, key_valid: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """4-D bool mask (B, 1, T, T), True = may attend. transformers 5.x passes a 4-D mask through unchanged.

        Prefix rows (vision + instruction): causal or bidirectional within the prefix, never the action slots.
        Action rows: the whole prefix and all action slots (OFT parallel decoding). Pad keys: never.
        """
        total = key_valid.shape[1]
        idx = torch.arange(total, device=key_valid.device)
        if self.cfg.prefix_attention == "causal":
            prefix_rule = idx[None, :] <= idx[:, None]
        else:
            prefix_rule = (idx[None, :] < prefix_len).expand(total, total)
        rule = torch.where((idx >= prefix_len)[:, None], torch.ones_like(prefix_rule), prefix_rule)
        return (rule[None] & key_valid[:, None, :])[:, None]

    def _trunk(self, images: torch.Tensor, instruction_tokens: torch.Tensor):
        """Shared forward: hidden states of the action slots and of the prefix, with the prefix's validity."""
        cfg = self.cfg
        device = self.action_slots.device
        images = torch.as_tensor(images).to(device, non_blocking=True)
        instruction_tokens = torch.as_tensor(instruction_tokens).to(device, non_blocking=True).long()
        if images.dtype != torch.uint8 or images.shape[1:] != (cfg.num_cameras, cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images must be uint8 (B, {cfg.num_cameras}, {cfg.image_size}, {cfg.image_size}, 3),"
                             f" got {images.dtype} {tuple(images.shape)}")
        batch = images.shape[0]
        # Drop the pad columns that no row needs: outputs do not depend on padding (masked keys, positions that
        # skip pads), and a 20-byte instruction in a 32-token buffer would otherwise cost a fifth of the decoder.
        # (One host sync on GPU; negligible next to the forward.)
        used = (instruction_tokens != self.tokenizer.pad_id).any(0).nonzero()
        instruction_tokens = instruction_tokens[:, : int(used.max()) + 1 if used.numel() else 0]
        # uint8 stays uint8 up to here (shared memory); normalise like SigLIP (mean 0.5, std 0.5) -> [-1, 1].
        pixels = images.flatten(0, 1).permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0)
        if cfg.vision_tower == "resnet":
            features = self._resnet(pixels, instruction_tokens)              # (B * cams, C, h, w)
            vision = self.projector(features.flatten(2).transpose(1, 2)) + self.vision_position
            vision = vision.reshape(batch, cfg.vision_tokens, cfg.hidden)
        else:
            vision = self.vision(pixel_values=pixels).last_hidden_state       # (B * cams, 64, Dv)
            if cfg.vision_token_merge > 1:
                vision = _merge_patches(vision, cfg.vision_token_merge)
            vision = self.projector(vision).reshape(batch, cfg.vision_tokens, cfg.hidden)
        text = self.decoder.embed_tokens(instruction_tokens)                  # (B, L, D)
        slots = self.action_slots.to(text.dtype).expand(batch, -1, -1)
        if cfg.instruction_slots:
            slots = slots + self._instruction_code(instruction_tokens).to(text.dtype)[:, None]
        embeds = torch.cat([vision.to(text.dtype), text, slots], dim=1)

        # Positions skip the pads, so padding an instruction further changes nothing (RoPE is relative).
        text_valid = instruction_tokens != self.tokenizer.pad_id
        n_vision, n_slots = cfg.vision_tokens, cfg.num_action_slots
        arange_v = torch.arange(n_vision, device=device).expand(batch, -1)
        text_pos = n_vision + text_valid.long().cumsum(1) - 1
        slot_pos = (n_vision + text_valid.sum(1, keepdim=True)) + torch.arange(n_slots, device=device)
        position_ids = torch.cat([arange_v, text_pos.clamp_min(n_vision), slot_pos], dim=1)
        key_valid = torch.cat([torch.ones_like(arange_v, dtype=torch.bool), text_valid,
                               torch.ones(batch, n_slots, dtype=torch.bool, device=device)], dim=1)
        prefix_len = n_vision + instruction_tokens.shape[1]
        mask = self._attention_mask(key_valid, prefix_len)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        return hidden[:, prefix_len:], hidden[:, :prefix_len], key_valid[:, :prefix_len]

    def _instruction_code(self, instruction_tokens: torch.Tensor) -> torch.Tensor:
        """(B, D): mean of the instruction's token embeddings plus a position table, through an MLP."""
        valid = (instruction_tokens != self.tokenizer.pad_id).unsqueeze(-1)
        tokens = self.decoder.embed_tokens(instruction_tokens) + self.instruction_position[:instruction_tokens.shape[1]]
        return self.instruction_encoder((tokens * valid).sum(1) / valid.sum(1).clamp_min(1))

    def _resnet(self, pixels: torch.Tensor, instruction_tokens: torch.Tensor) -> torch.Tensor:
        """ResNet feature map (B * cams, C, h, w), FiLM-conditioned on the instruction when configured."""
        if not self.cfg.instruction_film:
            return self.vision(pixel_values=pixels).last_hidden_state
        code = self._instruction_code(instruction_tokens).repeat_interleave(self.cfg.num_cameras, dim=0)
        x = self.vision.embedder(pixels)
        for stage, film in zip(self.vision.encoder.stages, self.film):
            gamma, beta = film(code)[:, :, None, None].chunk(2, dim=1)
            x = stage(x) * (1 + gamma) + beta
        return x

    def forward(self, images: torch.Tensor, instruction_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 (B, cams, H, W, 3), instruction_tokens long (B, L) ->
        (logits float32 (B, chunk_len, action_dim, num_bins), value float32 (B,))."""
        cfg = self.cfg
        slots, prefix, prefix_valid = self._trunk(images, instruction_tokens)
        logits = _linear_fp32(slots, self.action_head)
        if cfg.action_head == "smooth":
            coefficients = logits.reshape(slots.shape[0], cfg.chunk_len, cfg.action_dim, cfg.smooth_basis)
            with torch.autocast(coefficients.device.type, enabled=False):
                logits = coefficients @ self.bin_basis.float().T
        logits = logits.reshape(slots.shape[0], cfg.chunk_len, cfg.action_dim, cfg.num_bins)
        if cfg.value_pooling == "actions":
            critic_in, critic_valid = slots, None
        else:
            critic_in, critic_valid = prefix, prefix_valid
        if cfg.value_detach:
            critic_in = critic_in.detach()
        return logits, self.value_head(critic_in, critic_valid)

    @torch.no_grad()
    def act(self, images: torch.Tensor, instruction_tokens: torch.Tensor, greedy: bool | torch.Tensor = False,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pick an action chunk: sample every token, or take the argmax where `greedy` (bool or (B,) bool).

        Returns "action_tokens" long (B, chunk, dim) bins, "actions" float32 (B, chunk, dim) bin centres in
        [-1, 1], "logp" float32 (B, chunk, dim) of the taken bins, "log_probs" float32 (B, chunk, dim, bins)
        (the behaviour distribution the KL term needs), "value" float32 (B,).
        """
        logits, value = self(images, instruction_tokens)
        log_probs = logits.log_softmax(-1)
        argmax = log_probs.argmax(-1)
        if isinstance(greedy, bool):
            tokens = argmax if greedy else _sample_categorical(log_probs, generator)
        else:  # per row (a tensor, array or list of B bools, or one 0-d flag)
            greedy = torch.as_tensor(greedy, dtype=torch.bool, device=argmax.device).view(-1, 1, 1)
            tokens = torch.where(greedy, argmax, _sample_categorical(log_probs, generator))
        return {
            "action_tokens": tokens,
            "actions": tokens_to_actions(tokens, self.cfg.num_bins),
            "logp": log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
            "log_probs": log_probs,
            "value": value,
        }

    def evaluate(self, images: torch.Tensor, instruction_tokens: torch.Tensor,
                 action_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Re-score stored actions with gradients (learner). Returns "logp" and "entropy" (B, chunk, dim),
        "log_probs" (B, chunk, dim, bins) and "value" (B,), all float32."""
        logits, value = self(images, instruction_tokens)
        log_probs = logits.log_softmax(-1)
        action_tokens = torch.as_tensor(action_tokens).to(log_probs.device).long()
        logp = log_probs.gather(-1, action_tokens.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return {"logp": logp, "entropy": entropy, "log_probs": log_probs, "value": value}

    # -- persistence --------------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write model.safetensors, config.json and tokenizer.json (no pickle anywhere)."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=2)
        self.tokenizer.save(directory)

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu") -> "VLAPolicy":
        """Rebuild a policy written by `save` (strict: every tensor must match)."""
        with open(os.path.join(directory, "config.json")) as f:
            cfg = PolicyConfig(**json.load(f))
        policy = cls(cfg)
        policy.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
        if os.path.exists(os.path.join(directory, InstructionTokenizer.FILE)):
            policy.tokenizer = InstructionTokenizer.load(directory, cfg.num_bins)
        return policy.to(device)

    def num_parameters(self) -> int:
        """Trainable parameter count (the decoder's unused action-token embedding rows included)."""
        return sum(p.numel() for p in self.parameters())
