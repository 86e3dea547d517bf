"""OpenVLA-OFT backend: a real (downloaded) OpenVLA / OpenVLA-OFT checkpoint behind the `VLAPolicy` interface.

    policy = OpenVLAOFTPolicy.load("openvla-7b-oft-finetuned-libero-spatial", trust_remote_code=True)
    ids = policy.tokenizer.encode(["put the bowl on the plate"], max_len=64)   # env worker, no model
    out = policy.act(images, ids, greedy=False, proprio=proprio)               # inference
    out = policy.evaluate(images, ids, out["action_tokens"], proprio=proprio)  # learner

accerl.py runs it (`--policy.backend openvla-oft --policy.checkpoint DIR --policy.trust-remote-code`): before any of
the checkpoint's code runs, `check_checkpoint` and `checkpoint_action_stats` read only its files; env workers
encode with `load_prompt_tokenizer` (the same tokenizer, no model); `load` inside `torch.device("meta")` builds a
skeleton without reading weights (the weight broadcast's layout: the trainable tensors, `proprio_dim`).

Same methods and shapes as `vla_policy.VLAPolicy`: `act` -> action_tokens (B, chunk, dim) long, actions,
logp (B, chunk, dim), log_probs (B, chunk, dim, 256), value (B,); `evaluate` -> logp, entropy, log_probs,
value; `forward` -> (logits, value); `policy_parameters`, `value_parameters`, `save`, `load`, `tokenizer`.
Only `act` and `evaluate` (and `forward`) take one extra keyword, `proprio` (B, proprio_dim) raw robot state,
needed by checkpoints that ship a proprio projector (OFT's LIBERO ones: 8-D eef pos + axis-angle + gripper qpos).

What a checkpoint directory holds (OpenVLA-OFT's HF layout) and what is read from it:
- config.json with `auto_map` and `model_type` "openvla", plus configuration_prismatic.py,
  modeling_prismatic.py (remote code: run ONLY with `trust_remote_code=True`; never without), the weights
  (model.safetensors or shards), tokenizer files, preprocessor_config.json (means/stds/sizes),
  dataset_statistics.json (q01/q99/mask per dataset; the model's norm_stats),
  action_head--*.pt and proprio_projector--*.pt (OFT's separate heads; read with weights_only=True).
- The model object must have OpenVLA's attributes: `vision_backbone` (fused DINOv2 + SigLIP on 6 channels
  per image, `set_num_images_in_input`), `projector`, `language_model` (a Llama causal LM). Nothing else of
  the remote code runs after construction: the sequence is built here, batched, from those parts.

Loading on transformers 5.x (platform.md, "Real OpenVLA / OpenVLA-OFT checkpoints"): the model class comes
from the config's `auto_map` through `get_class_from_dynamic_module` (AutoModelForVision2Seq is gone);
the `_supports_sdpa` property is shadowed by a class attribute; Prismatic's zero-argument `tie_weights`
override is wrapped (5.x calls it with keywords); Prismatic's timm version check is bypassed while the
model is built; torch's device-context cache is protected from transformers' temporary `torch.linspace`
wrapper (`_keep_device_constructors`); everything is read with `local_files_only=True` (no network).
OFT's modeling code imports its `prismatic` package: install the openvla-oft repository (no-deps) first.

The forward pass is OFT's `predict_action` (modeling_prismatic.py, L1-regression / discrete branch), batched:

    [BOS] [vision patches of every image] [proprio token]? [prompt[1:] ... pads] [56 zero slots] [STOP]

with the prompt "In: What action should the robot take to {instruction}?\\nOut:" plus the empty token "▁"
(Llama id 29871) that predict_action appends; the 56 slot inputs are zero embeddings, STOP is "</s>".
Attention is fully bidirectional over the valid tokens (what OFT's forked transformers does at inference:
moojink/openvla-oft issue 89), passed as a 4-D mask; positions skip the pads, so a padded row computes
what batch size 1 computes. The 56 hidden states OFT reads are those BEFORE each action token (the last
prompt token and slots 0..54: predict_action's `NUM_PATCHES + NUM_PROMPT_TOKENS` offset, finetune.py's
`labels[:, 1:]` shift); slot j = chunk step j // action_dim, dimension j % action_dim.

Two action distributions (reference.md section 3; both give 256 logits per action dimension):
- "tokens": OpenVLA's LM head cut to the 256 action rows (AcceRL). Bin k <-> vocabulary id
  `vocab_size - 1 - k` (OpenVLA's ActionTokenizer: id = vocab_size - digitize(a)), so k grows with the action;
  bin k decodes to OpenVLA's bin centre `centers[min(k, 254)]` (255 centres of linspace(-1, 1, 256)).
  (predict_action takes its argmax over the whole vocabulary and clips the id into the action range; the
  two differ only where a non-action id would win.)
- "regression": OFT's deterministic L1 MLP head gives the mean mu (B, chunk, dim); the distribution is a
  discretised Gaussian over 256 uniform bins of [-1, 1], logit_k = -(c_k - mu)^2 / (2 sigma_d^2), with a
  learned log sigma per dimension. Greedy returns mu itself (OFT's evaluation action), sampling a bin centre.
The critic (both heads): attention pooling over the DETACHED 56 readout states -> LayerNorm -> MLP -> value.

Actions: `act()["normalized_actions"]` is the model's [-1, 1]-normalised output (OpenVLA's `normalized_actions`);
`act()["actions"]` is the same in the project's env convention: dims the statistics normalise are left as
they are (the env de-normalises with q01/q99; `action_stats` exposes the checkpoint's), and the gripper
(last dim, not normalised, dataset convention 1 = open, 0 = close) becomes g = 1 - 2x (> 0 closes: OpenVLA's
LIBERO evaluation's normalize_gripper_action + invert_gripper_action, binarised by the env).
`unnormalize_actions` gives OpenVLA's `_unnormalize_actions` (raw robot units) for other consumers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import json
import math
import os
import re
import types
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vla_policy import AttentionPoolValueHead, _building_on_meta, _linear_fp32, _sample_categorical

Head = Literal["auto", "tokens", "regression"]
Attention = Literal["bidirectional", "prefix_causal"]
Trainable = Literal["all", "lora", "heads"]
Normalization = Literal["bounds_q99", "bounds"]

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt (OFT's run_libero_eval / get_vla_action), filled with the lower-cased instruction."""
DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CENTER_CROP_AREA = 0.9
"""OFT evaluates with a centre crop of 90 % of the AREA (side sqrt(0.9)), resized back (dlimp's crop)."""
PRISMATIC_TIMM_VERSIONS = ("0.9.10", "0.9.11", "0.9.12", "0.9.16")
"""The timm versions Prismatic's constructor accepts; its timm 1.x use works (platform.md)."""
MODEL_AUTO_KEYS = ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")
SAVED_CONFIG = "accerl_policy.json"
SAVED_WEIGHTS = "policy.safetensors"


class RemoteCodeError(RuntimeError):
    """The checkpoint needs its own Python code and the caller did not allow it (trust_remote_code=True)."""


@dataclass
class OpenVLAOFTConfig:
    """How to load and use an OpenVLA / OpenVLA-OFT checkpoint (`OpenVLAOFTPolicy.load` takes these as keywords)."""

    checkpoint: str = ""
    """Local checkpoint directory (OpenVLA-OFT's HF layout). Never downloaded."""
    trust_remote_code: bool = False
    """Run the checkpoint's modeling_prismatic.py / configuration_prismatic.py. Required: those files ARE the
    model definition. Never saved with the policy: every load must pass it again."""
    head: Head = "auto"
    """Action distribution: "tokens" (LM head cut to the 256 action rows, parallel decoding), "regression"
    (discretised Gaussian around OFT's L1 MLP head), "auto" (regression iff an action_head--*.pt ships)."""
    chunk_len: int = 8
    """Actions per chunk (OFT's NUM_ACTIONS_CHUNK; LIBERO 8, ALOHA 25). Not stored in the checkpoint."""
    action_dim: int = 7
    """Action dimensions (OFT's ACTION_DIM; LIBERO 7). Checked against the statistics and the head."""
    num_bins: int = 256
    """Bins per dimension (OpenVLA's n_action_bins)."""
    unnorm_key: str | None = None
    """Which dataset's statistics (dataset_statistics.json key, e.g. "libero_spatial_no_noops"); None: the
    only one."""
    normalization: Normalization = "bounds_q99"
    """Which statistics map actions and proprio to [-1, 1]: "bounds_q99" (q01 / q99: OFT's LIBERO and Bridge
    constants) or "bounds" (min / max: OFT's ALOHA constants). Not stored in the checkpoint."""
    use_proprio: bool | None = None
    """Feed the proprio token (needs proprio_projector--*.pt); None: iff the projector ships."""
    center_crop: bool = False
    """Centre-crop 90 % of the image area and resize back, as OFT evaluates checkpoints trained with crop
    augmentation (all its LIBERO ones: run_libero_eval --center_crop True)."""
    attention: Attention = "bidirectional"
    """"bidirectional": every valid token sees every valid token (OFT's forked transformers at inference).
    "prefix_causal": causal among BOS + vision + prompt, the slots and STOP see everything."""
    trainable: Trainable = "lora"
    """"lora": LoRA adapters on the decoder's linear layers + heads + proprio projector (a 7.5 B model does not
    fit full AdamW on one 80 GB card); "heads": action head, proprio projector and critic only; "all"."""
    lora_rank: int = 32
    """LoRA rank (OFT fine-tuned with 32)."""
    lora_alpha: float = 16.0
    """LoRA scale alpha / rank (OFT: alpha = min(rank, 16))."""
    value_hidden: int = 512
    """Critic MLP width."""
    regression_init_std: float = 0.05
    """Initial sigma of the discretised Gaussian around the L1 head (normalised units; a bin is 2 / 256 wide)."""
    env_gripper: bool = True
    """`actions` in the env convention: the last (gripper) dim, if the statistics leave it unnormalised, maps
    x -> 1 - 2x (dataset 1 = open -> env -1 = open). False: `actions` = `normalized_actions`."""
    lowercase: bool = True
    """Lower-case instructions before prompting (OFT does)."""
    dtype: str = "bfloat16"
    """Weights dtype of the loaded model ("bfloat16" as released, "float32" for CPU tests). Heads, LoRA and
    critic stay float32."""
    attn_implementation: str = "sdpa"
    """Decoder attention kernel; must accept a 4-D mask ("sdpa" or "eager", not flash attention)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (the learner on a 7.5 B model)."""

    def __post_init__(self) -> None:
        for name, choices in (("head", Head), ("attention", Attention), ("trainable", Trainable),
                              ("normalization", Normalization)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {get_args(choices)}")
        if self.attn_implementation.startswith("flash"):
            raise ValueError("attn_implementation: flash attention ignores the 4-D mask the action slots need")

    @property
    def num_action_slots(self) -> int:
        """Decoder positions read for actions: one per action token (OFT parallel decoding)."""
        return self.chunk_len * self.action_dim


# ---------------------------------------------------------------------------------------------------------
# Image preprocessing (PrismaticImageProcessor + OFT's evaluation-time centre crop), on uint8 batches
# ---------------------------------------------------------------------------------------------------------


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) 0..255 float -> (N, 3, size, size), bicubic with antialiasing (the processor's PIL bicubic
    resize; torch's antialiased kernel follows PIL's), rounded to whole 8-bit values as PIL returns them."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def center_crop_uint8(images: torch.Tensor, area: float = CENTER_CROP_AREA) -> torch.Tensor:
    """OFT's `crop_and_resize` (TF): keep the centred box of `area` x the image area, resize it back to the same
    size with `tf.image.crop_and_resize`'s bilinear sampling (sample i at y1 (H-1) + i (y2-y1)(H-1)/(h-1)),
    then `convert_image_dtype` back to uint8 (x * 255.5, truncated). (N, 3, H, W) 0..255 float in and out."""
    n, _, h, w = images.shape
    side = math.sqrt(area)
    lo = (1 - side) / 2
    # grid_sample with align_corners=True maps -1 / +1 to pixel 0 / size-1: the same endpoints as TF's boxes.
    ys = torch.linspace(2 * lo - 1, 2 * (lo + side) - 1, h, dtype=torch.float32, device=images.device)
    xs = torch.linspace(2 * lo - 1, 2 * (lo + side) - 1, w, dtype=torch.float32, device=images.device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).expand(n, h, w, 2)
    out = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (out.clamp_(0, 1) * 255.5).floor_().clamp_(0, 255)


# ---------------------------------------------------------------------------------------------------------
# OFT's separate heads (prismatic/models/action_heads.py, projectors.py): same module names, so their
# state dicts load as saved (minus DDP's "module." prefix)
# ---------------------------------------------------------------------------------------------------------


class _MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(_MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionHead(nn.Module):
    """OFT's L1RegressionActionHead: the action_dim slot states of one chunk step, concatenated, -> MLP-ResNet ->
    that step's action_dim normalised actions (no squashing: the gripper dim regresses 0 / 1)."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.model = _MLPResNet(num_blocks, llm_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, slot_states: torch.Tensor) -> torch.Tensor:
        """(B, chunk * action_dim, D) -> (B, chunk, action_dim)."""
        batch = slot_states.shape[0]
        return self.model(slot_states.reshape(batch, -1, self.action_dim * slot_states.shape[-1]))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "L1RegressionHead":
        hidden_dim, in_dim = state["model.fc1.weight"].shape
        action_dim = state["model.fc2.weight"].shape[0]
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.mlp_resnet_blocks\.(\d+)\.", k))}
        head = cls(in_dim // action_dim, hidden_dim, action_dim, num_blocks=len(blocks))
        _load_state(head, state)
        return head


class ProprioProjector(nn.Module):
    """OFT's ProprioProjector: normalised robot state -> one LLM-width token appended after the vision patches."""

    def __init__(self, llm_dim: int, proprio_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ProprioProjector":
        llm_dim, proprio_dim = state["fc1.weight"].shape
        projector = cls(llm_dim, proprio_dim)
        _load_state(projector, state)
        return projector


def _load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load_state_dict; into a meta skeleton only the names and shapes are checked (no copy, no warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        module.load_state_dict(state, strict=True)


def load_torch_component(path: str) -> dict[str, torch.Tensor]:
    """A head saved by OFT's finetune.py (`torch.save(module.state_dict())`, DDP-wrapped): tensors only, never
    pickled code (weights_only=True); DDP's "module." prefix removed."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def find_component(directory: str, name: str) -> str | None:
    """OFT names its heads `<name>--<step>_checkpoint.pt`; None if absent, an error if several."""
    found = sorted(glob.glob(os.path.join(directory, f"{name}--*.pt")))
    if len(found) > 1:
        raise ValueError(f"{directory} holds several {name} files {[os.path.basename(f) for f in found]}: keep one")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------
# LoRA (forward hooks: base weights keep their checkpoint names; adapters add `<linear>.lora_A/B`)
# ---------------------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    delta = F.linear(F.linear(x.to(module.lora_A.dtype), module.lora_A), module.lora_B) * module.lora_scale
    return output + delta.to(output.dtype)


def add_lora(root: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Adapters W x + (alpha / r) B A x on every nn.Linear under `root` named in `targets`; B = 0 at start
    (the model is unchanged), A ~ Kaiming uniform (as peft). float32. Returns how many layers got one."""
    count = 0
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and not hasattr(module, "lora_A"):
            device = module.weight.device
            module.lora_A = nn.Parameter(torch.empty(rank, module.in_features, device=device))
            module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=device))
            nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            module.lora_scale = alpha / rank
            module.register_forward_hook(_lora_hook)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: the checkpoint's Llama tokenizer behind InstructionTokenizer's interface
# ---------------------------------------------------------------------------------------------------------


class OFTPromptTokenizer:
    """Instruction -> OpenVLA prompt ids, right-padded: `[BOS] In: What action ... {instruction}?\\nOut: ▁ pad...`.

    Runs the checkpoint's tokenizer.json with the `tokenizers` library: the pipeline OpenVLA's fast Llama
    tokenizer executed under transformers 4.40 (normaliser, BPE with byte fallback, "<s> $A" post-processor),
    whatever transformers 5.x's tokenizer classes now rebuild. The trailing "▁" (Llama's empty piece, id 29871)
    is what predict_action appends when the prompt does not already end with it. Same interface as
    `vla_policy.InstructionTokenizer` (encode, decode, num_tokens, pad_id, action_token_ids, save, load);
    picklable, needs no model, so env workers can encode.
    """

    EMPTY_PIECE = "▁"
    SPECIALS_FILE = "tokenizer_config.json"

    def __init__(self, tokenizer, specials: dict[str, str | None], vocab_size: int | None = None, num_bins: int = 256,
                 lowercase: bool = True, template: str = PROMPT):
        self._tok = tokenizer
        self.specials = dict(specials)
        self.num_bins = num_bins
        self.lowercase = lowercase
        self.template = template
        ids = {name: (tokenizer.token_to_id(tok) if tok else None) for name, tok in specials.items()}
        self.bos_id, self.eos_id, self.unk_id = ids.get("bos_token"), ids.get("eos_token"), ids.get("unk_token")
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("the checkpoint's tokenizer has no bos or eos token (OpenVLA's Llama tokenizer has both)")
        self.pad_id = ids.get("pad_token") if ids.get("pad_token") is not None else -1
        # Unpadded vocabulary without added tokens (OpenVLA: 32000; <PAD> is 32000, the embedding table 32064).
        self.base_vocab_size = tokenizer.get_vocab_size(with_added_tokens=False)
        self.vocab_size = vocab_size if vocab_size is not None else self.base_vocab_size
        self.first_action_id = self.vocab_size - num_bins
        empty = tokenizer.token_to_id(self.EMPTY_PIECE)
        self.empty_id = None if empty is None or empty == self.unk_id else int(empty)

    def prompt(self, instruction: str) -> str:
        return self.template.format(instruction=instruction.lower() if self.lowercase else instruction)

    def _ids(self, instruction: str) -> list[int]:
        ids = list(self._tok.encode(self.prompt(instruction), add_special_tokens=True).ids)
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id, *ids]
        if self.empty_id is not None and ids[-1] != self.empty_id:
            ids.append(self.empty_id)
        return ids

    def encode(self, texts: list[str], max_len: int) -> torch.LongTensor:
        """Instructions -> (B, max_len) long prompt ids, right-padded with `pad_id`. A prompt longer than
        `max_len` is an error (a cut prompt loses its "?\\nOut:" ending): size max_len with `num_tokens`."""
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self._ids(text)
            if len(ids) > max_len:
                raise ValueError(f"prompt of {len(ids)} tokens > max_len {max_len}: {text!r}")
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def num_tokens(self, text: str) -> int:
        """Length of the encoded prompt of `text` (BOS and the empty piece included)."""
        return len(self._ids(text))

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """One row of ids -> text, pads and special tokens dropped."""
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=True)

    def action_token_ids(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin indices -> vocabulary ids (OpenVLA's numbering: bin k is id vocab_size - 1 - k)."""
        return self.vocab_size - 1 - bins.long()

    def save(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json with the special tokens (what `load` reads)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, self.SPECIALS_FILE), "w") as f:
            json.dump({k: v for k, v in self.specials.items() if v}, f, indent=2)

    @classmethod
    def load(cls, directory: str, **kwargs) -> "OFTPromptTokenizer":
        """The checkpoint's tokenizer.json and its special tokens (tokenizer_config.json, special_tokens_map.json),
        offline, no remote code; without tokenizer.json, the backend of transformers' AutoTokenizer."""
        from tokenizers import Tokenizer

        specials: dict[str, str | None] = {}
        for name in ("special_tokens_map.json", cls.SPECIALS_FILE):  # the second wins, as in transformers
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path) as f:
                    entries = json.load(f)
                for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    value = entries.get(key)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if value:
                        specials[key] = value
        path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(path):
            tokenizer = Tokenizer.from_file(path)
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            if not hasattr(hf, "backend_tokenizer"):
                raise ValueError(f"{directory}: no tokenizer.json and no fast tokenizer to take it from")
            tokenizer = hf.backend_tokenizer
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                specials.setdefault(key, getattr(hf, key, None))
        return cls(tokenizer, specials, **kwargs)


def load_prompt_tokenizer(directory: str, num_bins: int = 256) -> OFTPromptTokenizer:
    """The prompt tokenizer `OpenVLAOFTPolicy.load(directory, num_bins=...)` gives its policy, built without the
    model and without remote code (env workers encode instructions with it): the base checkpoint's tokenizer
    files, lower-casing as a `save` directory recorded (default: as OFT, on)."""
    lowercase = OpenVLAOFTConfig.lowercase
    saved = os.path.join(directory, SAVED_CONFIG)
    if os.path.isfile(saved):
        with open(saved) as f:
            lowercase = json.load(f)["config"].get("lowercase", lowercase)
    return OFTPromptTokenizer.load(base_checkpoint(directory), num_bins=num_bins, lowercase=lowercase)


# ---------------------------------------------------------------------------------------------------------
# Loading the remote-code model on transformers 5.x
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timm_version_bypass():
    """Prismatic's constructor raises NotImplementedError outside timm 0.9.x; the timm 1.x API it uses works
    (platform.md). Report an accepted version while the model is built, then restore the real one."""
    try:
        import timm
    except ImportError:  # the remote code will say that it needs timm
        yield
        return
    real = getattr(timm, "__version__", None)
    if real in PRISMATIC_TIMM_VERSIONS:
        yield
        return
    timm.__version__ = PRISMATIC_TIMM_VERSIONS[-1]
    try:
        yield
    finally:
        timm.__version__ = real


@contextlib.contextmanager
def _keep_device_constructors():
    """transformers 5.x builds remote-code models inside `torch.device("meta")` while it has replaced
    `torch.linspace` by a wrapper (initialization.meta_device_safe_creation_ops). If that is the first time torch's
    DeviceContext builds its (lru-cached) set of factory functions, the set holds the wrapper, and for the rest of
    the process `torch.linspace` ignores every `with torch.device(...)` (e.g. VLAPolicy built on meta). Build the
    set before (public API), and rebuild it after, in case an earlier load already cached the wrapper."""
    with torch.device("cpu"):
        torch.empty(0)
    try:
        yield
    finally:
        from torch.utils import _device

        if hasattr(_device, "_device_constructors") and hasattr(_device._device_constructors, "cache_clear"):
            _device._device_constructors.cache_clear()


def _patch_for_transformers5(model_class: type) -> None:
    """Make a Prismatic class constructible by transformers 5.x's from_pretrained (idempotent)."""
    # `_supports_sdpa` is a property reading `self.language_model`, which PreTrainedModel.__init__ queries before
    # the language model exists: a plain class attribute on the subclass shadows the property.
    if any(isinstance(k.__dict__.get("_supports_sdpa"), property) for k in model_class.__mro__):
        model_class._supports_sdpa = True
    # Prismatic overrides `tie_weights(self)`; 5.x calls tie_weights(missing_keys=..., recompute_mapping=...).
    original = model_class.tie_weights
    parameters = inspect.signature(original).parameters
    takes_keywords = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_keywords and "missing_keys" not in parameters:
        def tie_weights(self, *args, **kwargs):
            return original(self)
        model_class.tie_weights = tie_weights


def _remote_class(reference: str, directory: str):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(reference, directory, local_files_only=True)
    except ImportError as exc:
        hint = ""
        if "prismatic" in str(exc):
            hint = (" OpenVLA-OFT's modeling code imports its `prismatic` package: install the openvla-oft "
                    "repository (pip install --no-deps -e <openvla-oft>) so that it is importable.")
        raise ImportError(f"{directory}: the checkpoint's remote code needs a missing package: {exc}.{hint}") from exc


def _remote_code_files(directory: str) -> list[str]:
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.py")))


def base_checkpoint(directory: str) -> str:
    """The OpenVLA / OpenVLA-OFT checkpoint behind `directory`: itself, or the base checkpoint a `save` directory
    records (absolute paths)."""
    directory = os.path.abspath(directory)
    saved = os.path.join(directory, SAVED_CONFIG)
    if os.path.isfile(saved):
        with open(saved) as f:
            return os.path.abspath(json.load(f)["config"]["checkpoint"])
    return directory


def check_checkpoint(directory: str, trust_remote_code: bool = False) -> tuple[dict, str]:
    """What `load` checks before any of the checkpoint's code runs, reading only config.json: the directory is
    an OpenVLA checkpoint (or a `save` directory whose base is one), and its remote code is allowed. Raises
    FileNotFoundError, ValueError or RemoteCodeError (the checkpoint's Python files named); returns the base
    checkpoint's (auto_map, model class key)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    base = base_checkpoint(directory)
    config_path = os.path.join(base, "config.json")
    if not os.path.isfile(config_path):
        where = f" (the base checkpoint {directory} was saved from)" if base != os.path.abspath(directory) else ""
        raise FileNotFoundError(f"{base}{where} is not a checkpoint directory (no config.json)")
    with open(config_path) as f:
        raw = json.load(f)
    auto_map = raw.get("auto_map") or {}
    model_key = next((k for k in MODEL_AUTO_KEYS if k in auto_map), None)
    if "AutoConfig" not in auto_map or model_key is None:
        raise ValueError(f"{config_path}: no auto_map with AutoConfig and a model class (model_type "
                         f"{raw.get('model_type')!r}): not an OpenVLA / OpenVLA-OFT checkpoint")
    if not trust_remote_code:
        raise RemoteCodeError(
            f"{base} defines its model in Python files that ship with it "
            f"({', '.join(_remote_code_files(base))}; "
            f"config auto_map: {auto_map[model_key]}). Loading it runs that code. If you trust this checkpoint, "
            "pass trust_remote_code=True (accerl: --policy.trust-remote-code).")
    return auto_map, model_key


def load_openvla_model(directory: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.bfloat16,
                       attn_implementation: str = "sdpa"):
    """The checkpoint's PrismaticForConditionalGeneration / OpenVLAForActionPrediction with its weights, offline.
    Raises RemoteCodeError before any of the checkpoint's code runs unless `trust_remote_code`. Inside
    `with torch.device("meta")`: the model built from its config, no weights read (a skeleton for shapes)."""
    auto_map, model_key = check_checkpoint(directory, trust_remote_code)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every call below is local_files_only
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config_class = _remote_class(auto_map["AutoConfig"], directory)
    model_class = _remote_class(auto_map[model_key], directory)
    _patch_for_transformers5(model_class)
    config = config_class.from_pretrained(directory, local_files_only=True)
    with _timm_version_bypass(), _keep_device_constructors():
        if _building_on_meta():  # from_pretrained refuses a meta device context: build from the config
            model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        else:
            model = model_class.from_pretrained(directory, config=config, dtype=dtype, local_files_only=True,
                                                attn_implementation=attn_implementation)
    missing = [name for name in ("vision_backbone", "projector", "language_model") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} from {directory} lacks {missing}: not a Prismatic / OpenVLA model")
    return model.eval()


def load_norm_stats(directory: str, config) -> dict:
    """dataset_statistics.json (what OFT's get_vla loads into vla.norm_stats), else the config's norm_stats."""
    path = os.path.join(directory, "dataset_statistics.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return dict(getattr(config, "norm_stats", None) or {})


def select_action_stats(norm_stats: dict, unnorm_key: str | None = None,
                        normalization: Normalization = "bounds_q99") -> dict:
    """The action statistics of `unnorm_key` (None: the only dataset): {"key", "low", "high", "mask"} (lists), low /
    high = q01 / q99 ("bounds_q99") or min / max ("bounds")."""
    keys = sorted(norm_stats)
    key = unnorm_key
    if key is None:
        if len(keys) != 1:
            raise ValueError(f"the checkpoint has statistics for {keys}: pass unnorm_key")
        key = keys[0]
    if key not in norm_stats:
        raise ValueError(f"unnorm_key {key!r} not in the checkpoint's statistics {keys}")
    lo_key, hi_key = ("q01", "q99") if normalization == "bounds_q99" else ("min", "max")
    action = norm_stats[key]["action"]
    if lo_key not in action or hi_key not in action:
        raise ValueError(f"normalization={normalization!r} but the action statistics of {key} have no "
                         f"{lo_key} / {hi_key}")
    low, high = list(action[lo_key]), list(action[hi_key])
    return {"key": key, "low": low, "high": high, "mask": list(action.get("mask", [True] * len(low)))}


def checkpoint_action_stats(directory: str, unnorm_key: str | None = None,
                            normalization: Normalization = "bounds_q99") -> dict:
    """`OpenVLAOFTPolicy.action_stats` of a policy loaded from `directory`, read without the model or its remote
    code: the base checkpoint's dataset_statistics.json, else config.json's norm_stats (`select_action_stats`)."""
    base = base_checkpoint(directory)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    return select_action_stats(load_norm_stats(base, types.SimpleNamespace(**config)), unnorm_key, normalization)


# ---------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------


class OpenVLAOFTPolicy(nn.Module):
    """An OpenVLA / OpenVLA-OFT checkpoint with VLAPolicy's interface (module docstring). Build with `load`."""

    def __init__(self, model: nn.Module, tokenizer: OFTPromptTokenizer, cfg: OpenVLAOFTConfig,
                 norm_stats: dict, image_norm: list[tuple[tuple[float, ...], tuple[float, ...]]], input_size: int,
                 action_head_state: dict | None = None, proprio_state: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.input_size = input_size
        self.register_buffer("pixel_mean", torch.tensor([m for m, _ in image_norm], dtype=torch.float32).flatten(),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor([s for _, s in image_norm], dtype=torch.float32).flatten(),
                             persistent=False)
        self.channels_per_image = 3 * len(image_norm)
        llm_dim = model.get_input_embeddings().weight.shape[1]

        # Action statistics (OpenVLA's _unnormalize_actions with OFT's ACTION_PROPRIO_NORMALIZATION_TYPE).
        stats = select_action_stats(norm_stats, cfg.unnorm_key, cfg.normalization)
        key, low, high = stats["key"], stats["low"], stats["high"]
        lo_key, hi_key = ("q01", "q99") if cfg.normalization == "bounds_q99" else ("min", "max")
        self.unnorm_key = key
        if len(low) != cfg.action_dim:
            raise ValueError(f"action_dim={cfg.action_dim} but the statistics of {key} have {len(low)} dims")
        self.register_buffer("action_low", torch.tensor(low, dtype=torch.float64), persistent=False)
        self.register_buffer("action_high", torch.tensor(high, dtype=torch.float64), persistent=False)
        self.register_buffer("action_mask", torch.tensor(stats["mask"], dtype=torch.bool), persistent=False)
        proprio_stats = norm_stats[key].get("proprio") or {}

        # Heads.
        head = cfg.head
        if head == "auto":
            head = "regression" if action_head_state is not None else "tokens"
        if head == "regression" and action_head_state is None:
            raise ValueError("head='regression' needs the checkpoint's action_head--*.pt (OFT's L1 head)")
        self.head = head
        vocab_size = tokenizer.vocab_size
        if head == "tokens":
            # The LM head cut to the 256 action rows, in bin order (bin k = id vocab_size - 1 - k), float32.
            lm_head = model.get_output_embeddings()
            ids = vocab_size - 1 - torch.arange(cfg.num_bins)
            self.token_head = nn.Linear(llm_dim, cfg.num_bins, bias=lm_head.bias is not None)
            with torch.no_grad():
                self.token_head.weight.copy_(lm_head.weight[ids].float())
                if lm_head.bias is not None:
                    self.token_head.bias.copy_(lm_head.bias[ids].float())
            edges = torch.linspace(-1, 1, cfg.num_bins, dtype=torch.float64)
            centres = (edges[:-1] + edges[1:]) / 2                       # OpenVLA's 255 bin centres
            table = centres[torch.arange(cfg.num_bins).clamp(max=cfg.num_bins - 2)]
        else:
            self.regression_head = L1RegressionHead.from_state_dict(action_head_state).float()
            if self.regression_head.action_dim != cfg.action_dim:
                raise ValueError(f"the action head predicts {self.regression_head.action_dim} dims, "
                                 f"action_dim={cfg.action_dim}")
            self.log_std = nn.Parameter(torch.full((cfg.action_dim,), math.log(cfg.regression_init_std)))
            table = (torch.arange(cfg.num_bins, dtype=torch.float64) + 0.5) * (2.0 / cfg.num_bins) - 1.0
        self.register_buffer("bin_centres", table.float(), persistent=False)

        use_proprio = cfg.use_proprio if cfg.use_proprio is not None else proprio_state is not None
        if use_proprio and proprio_state is None:
            raise ValueError("use_proprio=True but the checkpoint ships no proprio_projector--*.pt")
        self.proprio_projector = ProprioProjector.from_state_dict(proprio_state).float() if use_proprio else None
        if use_proprio:
            if lo_key not in proprio_stats or hi_key not in proprio_stats:
                raise ValueError(f"use_proprio=True but the statistics of {key} have no proprio {lo_key} / {hi_key}")
            self.register_buffer("proprio_low", torch.tensor(proprio_stats[lo_key], dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("proprio_high", torch.tensor(proprio_stats[hi_key], dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("proprio_mask", torch.tensor(
                proprio_stats.get("mask", [True] * len(proprio_stats[lo_key])), dtype=torch.bool), persistent=False)
        self.value_head = AttentionPoolValueHead(llm_dim, cfg.value_hidden)
        self._set_trainable()

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str, trust_remote_code: bool = False, device: torch.device | str = "cpu",
             **options) -> "OpenVLAOFTPolicy":
        """From an OpenVLA / OpenVLA-OFT checkpoint directory, or from a directory `save` wrote (which records its
        base checkpoint; pass checkpoint=... if that moved). `options`: OpenVLAOFTConfig fields."""
        directory = os.path.abspath(directory)
        saved = os.path.join(directory, SAVED_CONFIG)
        meta = _building_on_meta()  # a skeleton (names, shapes, dtypes): no weights read, nothing to move
        if os.path.isfile(saved):
            with open(saved) as f:
                fields = json.load(f)["config"]
            cfg = OpenVLAOFTConfig(**{**fields, **options, "trust_remote_code": trust_remote_code})
            policy = cls._from_checkpoint(cfg)
            if not meta:
                policy = policy.to(device)
                policy._load_trainable(os.path.join(directory, SAVED_WEIGHTS))
            return policy
        cfg = OpenVLAOFTConfig(**{**options, "checkpoint": directory, "trust_remote_code": trust_remote_code})
        policy = cls._from_checkpoint(cfg)
        return policy if meta else policy.to(device)

    @classmethod
    def _from_checkpoint(cls, cfg: OpenVLAOFTConfig) -> "OpenVLAOFTPolicy":
        directory = cfg.checkpoint
        # Refuse remote code first, before anything else is read.
        model = load_openvla_model(directory, cfg.trust_remote_code, getattr(torch, cfg.dtype), cfg.attn_implementation)
        config = model.config
        text_vocab = config.text_config.vocab_size
        vocab_size = text_vocab - getattr(config, "pad_to_multiple_of", 0)   # OpenVLAForActionPrediction.vocab_size
        tokenizer = OFTPromptTokenizer.load(directory, vocab_size=vocab_size, num_bins=cfg.num_bins,
                                            lowercase=cfg.lowercase)
        if tokenizer.base_vocab_size != vocab_size:
            raise ValueError(f"tokenizer vocabulary {tokenizer.base_vocab_size} != model vocabulary {vocab_size} "
                             "(text_config.vocab_size - pad_to_multiple_of): cannot place the action tokens")
        image_norm, input_size = cls._image_settings(directory, config)
        action_path = find_component(directory, "action_head")
        proprio_path = find_component(directory, "proprio_projector")
        unsupported = [n for n in ("noisy_action_projector", "vision_backbone") if find_component(directory, n)]
        if unsupported:
            raise NotImplementedError(f"{directory} ships {unsupported}: OFT's diffusion head and FiLM vision "
                                      "backbone (ALOHA) are not supported; the L1 and token heads are")
        action_state = None
        if action_path is not None and cfg.head != "tokens":
            action_state = load_torch_component(action_path)
            if any("noise" in k or "time_encoder" in k for k in action_state):
                raise NotImplementedError(f"{action_path}: a diffusion action head; only OFT's L1 head is supported")
        proprio_state = load_torch_component(proprio_path) if proprio_path and cfg.use_proprio is not False else None
        policy = cls(model, tokenizer, cfg, load_norm_stats(directory, config), image_norm, input_size,
                     action_state, proprio_state)
        if cfg.gradient_checkpointing:
            lm = model.language_model
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
                lm.activation_checkpointing_enable({"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return policy

    @staticmethod
    def _image_settings(directory: str, config) -> tuple[list, int]:
        """Per-backbone (mean, std) and the input side, from preprocessor_config.json (PrismaticImageProcessor's
        means / stds / input_sizes), else OpenVLA's defaults: DINOv2 then SigLIP when fused, SigLIP alone."""
        fused = bool(getattr(config, "use_fused_vision_backbone", True))
        norm = [(DINOV2_MEAN, DINOV2_STD), (SIGLIP_MEAN, SIGLIP_STD)] if fused else [(SIGLIP_MEAN, SIGLIP_STD)]
        size = int((getattr(config, "image_sizes", None) or [224])[0])
        path = os.path.join(directory, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                pre = json.load(f)
            if "means" in pre and "stds" in pre:
                norm = [(tuple(m), tuple(s)) for m, s in zip(pre["means"], pre["stds"])]
            if pre.get("input_sizes"):
                size = int(pre["input_sizes"][0][-1])
            strategy = pre.get("image_resize_strategy", "resize-naive")
            if strategy != "resize-naive":
                raise NotImplementedError(f"{path}: image_resize_strategy {strategy!r} (OpenVLA uses resize-naive)")
        if len(norm) != (2 if fused else 1):
            raise ValueError(f"{len(norm)} image normalisations for a {'fused' if fused else 'single'} vision backbone")
        return norm, size

    def _set_trainable(self) -> None:
        """Policy group: LoRA / everything / nothing of the base, plus the action head (and log sigma) and the
        proprio projector; the unused full LM head never trains. Critic: the value head."""
        cfg = self.cfg
        for p in self.model.parameters():
            p.requires_grad_(cfg.trainable == "all")
        self.model.get_output_embeddings().requires_grad_(False)
        if cfg.trainable == "lora":
            decoder = self.model.language_model.get_decoder()
            if add_lora(decoder, cfg.lora_rank, cfg.lora_alpha) == 0:
                raise ValueError(f"no LoRA target {LORA_TARGETS} in the language model")

    # -- parameter groups ---------------------------------------------------------------------------------

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters (value learning rate)."""
        return list(self.value_head.parameters())

    def policy_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the actor (policy learning rate); frozen base weights are not listed."""
        value_ids = {id(p) for p in self.value_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in value_ids]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- observation processing ---------------------------------------------------------------------------

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, cams, H, W, 3) -> (B, cams * 6, S, S) float32: per image resize to S (bicubic), optional
        centre crop, /255, then DINOv2 mean/std on channels 0-2 and SigLIP 0.5/0.5 on 3-5 (fused backbone)."""
        batch, cams = images.shape[:2]
        x = images.flatten(0, 1).permute(0, 3, 1, 2).float()                # (B * cams, 3, H, W), 0..255
        x = resize_uint8(x, self.input_size)
        if self.cfg.center_crop:
            x = center_crop_uint8(x)
        x = x / 255.0
        copies = self.channels_per_image // 3
        x = (x.repeat(1, copies, 1, 1) - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        return x.reshape(batch, cams * self.channels_per_image, self.input_size, self.input_size)

    @property
    def proprio_dim(self) -> int:
        """Length of the raw robot state `act` / `evaluate` read (`proprio=`); 0: the policy takes none."""
        return 0 if self.proprio_projector is None else self.proprio_projector.fc1.in_features

    def normalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        """OFT's normalize_proprio: 2 (x - low) / (high - low + 1e-8) - 1 where masked, clipped to [-1, 1]."""
        p = proprio.float()
        scaled = 2 * (p - self.proprio_low) / (self.proprio_high - self.proprio_low + 1e-8) - 1
        return torch.where(self.proprio_mask, scaled, p).clamp(-1, 1)

    def _attention_mask(self, key_valid: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """(B, 1, T, T) bool, True = may attend; transformers 5.x passes a 4-D mask through unchanged.
        Each query also sees itself, so a pad row is never empty (an all-masked row gives NaN, which would then
        leak through the zero attention weights of later layers)."""
        total = key_valid.shape[1]
        idx = torch.arange(total, device=key_valid.device)
        if self.cfg.attention == "bidirectional":
            rule = torch.ones(total, total, dtype=torch.bool, device=key_valid.device)
        else:
            rule = (idx[None, :] <= idx[:, None]) | (idx >= prefix_len)[:, None]
        mask = (rule[None] & key_valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=key_valid.device)
        return mask[:, None]

    def _trunk(self, images: torch.Tensor, instruction_tokens: torch.Tensor,
               proprio: torch.Tensor | None) -> torch.Tensor:
        """The 56 readout hidden states (B, chunk * dim, D) OFT's heads read, in the model's dtype."""
        cfg, model = self.cfg, self.model
        embed = model.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        images = torch.as_tensor(images).to(device, non_blocking=True)
        tokens = torch.as_tensor(instruction_tokens).to(device, non_blocking=True).long()
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, cams, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        batch, cams = images.shape[:2]
        if cams > 1 and self.channels_per_image != 6:
            raise ValueError("several images per observation need the fused vision backbone (as OFT)")

        backbone = model.vision_backbone
        if hasattr(backbone, "set_num_images_in_input"):
            backbone.set_num_images_in_input(cams)
        else:
            backbone.num_images_in_input = cams
        vision = model.projector(backbone(self.pixel_values(images).to(dtype)))  # (B, cams * patches, D)
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError("this checkpoint takes proprio: pass proprio=(B, proprio_dim) raw robot state")
            state = self.normalize_proprio(torch.as_tensor(proprio).to(device))
            vision = torch.cat([vision, self.proprio_projector(state).to(dtype)[:, None]], dim=1)

        # Drop pad columns no row uses; every row must start with BOS (the tokenizer writes it).
        valid = tokens != self.tokenizer.pad_id
        used = valid.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 0
        tokens, valid = tokens[:, :length], valid[:, :length]
        if length == 0 or not bool((tokens[:, 0] == self.tokenizer.bos_id).all()):
            raise ValueError("instruction_tokens must be OFTPromptTokenizer.encode output (BOS first)")
        text = embed(torch.where(valid, tokens, self.tokenizer.bos_id))
        n_slots = cfg.num_action_slots
        slots = torch.zeros(batch, n_slots, text.shape[-1], dtype=dtype, device=device)
        stop = embed(torch.full((batch, 1), self.tokenizer.eos_id, dtype=torch.long, device=device))
        # [BOS] [vision (+ proprio)] [prompt[1:] + pads] [slots] [STOP], as predict_action (right pads instead of none)
        embeds = torch.cat([text[:, :1], vision.to(dtype), text[:, 1:], slots, stop], dim=1)
        ones = torch.ones(batch, vision.shape[1], dtype=torch.bool, device=device)
        key_valid = torch.cat([valid[:, :1], ones, valid[:, 1:], torch.ones(batch, n_slots + 1, dtype=torch.bool,
                                                                            device=device)], dim=1)
        position_ids = (key_valid.long().cumsum(1) - 1).clamp_min(0)   # pads skipped: batch 1's positions
        prefix_len = vision.shape[1] + length
        hidden = model.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=self._attention_mask(key_valid, prefix_len),
            position_ids=position_ids, use_cache=False).last_hidden_state
        # Readout j: the position before action token j -> the last valid prompt token, then slots 0 .. n-2.
        last_prompt = vision.shape[1] + valid.sum(1) - 1                # index of the row's last prompt token
        j = torch.arange(n_slots, device=device)
        index = torch.where(j[None] == 0, last_prompt[:, None], prefix_len + j[None] - 1)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    # -- forward ------------------------------------------------------------------------------------------

    def _heads(self, images, instruction_tokens, proprio=None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        states = self._trunk(images, instruction_tokens, proprio)
        batch = states.shape[0]
        out = {"value": self.value_head(states.detach())}
        if self.head == "tokens":
            logits = _linear_fp32(states, self.token_head)
            out["logits"] = logits.reshape(batch, cfg.chunk_len, cfg.action_dim, cfg.num_bins)
        else:
            with torch.autocast(states.device.type, enabled=False):
                mean = self.regression_head.predict_action(states.float())                 # (B, chunk, dim)
                std = self.log_std.clamp(math.log(1e-3), math.log(2.0)).exp()
                z = (self.bin_centres - mean[..., None]) / std[:, None]
                out["logits"] = -0.5 * z * z                                                # discretised Gaussian
                out["mean"] = mean
        return out

    def forward(self, images: torch.Tensor, instruction_tokens: torch.Tensor,
                proprio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits float32 (B, chunk, dim, bins), value float32 (B,)), as VLAPolicy.forward."""
        out = self._heads(images, instruction_tokens, proprio)
        return out["logits"], out["value"]

    @torch.no_grad()
    def act(self, images: torch.Tensor, instruction_tokens: torch.Tensor, greedy: bool | torch.Tensor = False,
            generator: torch.Generator | None = None, proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """VLAPolicy.act: "action_tokens" (B, chunk, dim) bins, "actions" (env convention, see module docstring),
        "logp", "log_probs" (B, chunk, dim, bins), "value" (B,); plus "normalized_actions" (the model's output).
        Greedy rows of the regression head act with the regressed mean itself (OFT's action)."""
        out = self._heads(images, instruction_tokens, proprio)
        log_probs = out["logits"].log_softmax(-1)
        argmax = log_probs.argmax(-1)
        if isinstance(greedy, bool):
            row_greedy = torch.full((argmax.shape[0], 1, 1), greedy, dtype=torch.bool, device=argmax.device)
        else:
            row_greedy = torch.as_tensor(greedy, dtype=torch.bool, device=argmax.device).view(-1, 1, 1)
        tokens = argmax if isinstance(greedy, bool) and greedy else torch.where(
            row_greedy, argmax, _sample_categorical(log_probs, generator))
        normalized = self.bin_centres[tokens]
        if "mean" in out:
            normalized = torch.where(row_greedy, out["mean"].clamp(-1, 1), normalized)
        return {
            "action_tokens": tokens,
            "actions": self.to_env_actions(normalized),
            "normalized_actions": normalized,
            "logp": log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
            "log_probs": log_probs,
            "value": out["value"],
        }

    def evaluate(self, images: torch.Tensor, instruction_tokens: torch.Tensor, action_tokens: torch.Tensor,
                 proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """VLAPolicy.evaluate: "logp", "entropy" (B, chunk, dim), "log_probs", "value" with gradients."""
        out = self._heads(images, instruction_tokens, proprio)
        log_probs = out["logits"].log_softmax(-1)
        action_tokens = torch.as_tensor(action_tokens).to(log_probs.device).long()
        logp = log_probs.gather(-1, action_tokens.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return {"logp": logp, "entropy": entropy, "log_probs": log_probs, "value": out["value"]}

    # -- actions ------------------------------------------------------------------------------------------

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bins -> normalised actions (the head's bin centres)."""
        return self.bin_centres[tokens.long().to(self.bin_centres.device)]

    @property
    def action_stats(self) -> dict:
        """The checkpoint's action statistics the env needs to de-normalise: key, low / high (q01 / q99 or
        min / max per `normalization`), also under the names q01 / q99, and mask (lists)."""
        low, high = self.action_low.tolist(), self.action_high.tolist()
        return {"key": self.unnorm_key, "normalization": self.cfg.normalization, "low": low, "high": high,
                "q01": low, "q99": high, "mask": self.action_mask.tolist()}

    def unnormalize_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        """OpenVLA's `_unnormalize_actions`: 0.5 (x + 1)(high - low + 1e-8) + low where masked, else x (float64)."""
        x = torch.as_tensor(normalized).to(self.action_low.device, torch.float64)
        raw = 0.5 * (x + 1) * (self.action_high - self.action_low + 1e-8) + self.action_low
        return torch.where(self.action_mask, raw, x)

    def to_env_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised model actions -> the project's env convention (module docstring): the unnormalised gripper
        (last dim, 1 = open, 0 = close) becomes 1 - 2x (> 0 closes)."""
        actions = normalized.float()
        if self.cfg.env_gripper and not bool(self.action_mask[-1]):
            actions = torch.cat([actions[..., :-1], 1 - 2 * actions[..., -1:]], dim=-1)
        return actions

    # -- persistence --------------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What fine-tuning changed: every trainable tensor (LoRA, heads, log sigma, critic; all weights with
        trainable="all"). The frozen base is the checkpoint's."""
        return {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if p.requires_grad}

    def save(self, directory: str) -> None:
        """Write accerl_policy.json (the options and the absolute base checkpoint path, never the remote-code
        consent) and policy.safetensors (`trainable_state_dict`). `load(directory, trust_remote_code=True)`
        rebuilds the policy from the base checkpoint plus these tensors."""
        os.makedirs(directory, exist_ok=True)
        fields = dataclasses.asdict(self.cfg)
        fields["checkpoint"] = os.path.abspath(self.cfg.checkpoint)
        fields["trust_remote_code"] = False
        with open(os.path.join(directory, SAVED_CONFIG), "w") as f:
            json.dump({"backend": "openvla-oft", "config": fields}, f, indent=2)
        save_file(self.trainable_state_dict(), os.path.join(directory, SAVED_WEIGHTS))

    def _load_trainable(self, path: str) -> None:
        state = load_file(path)
        params = dict(self.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        unknown, missing = set(state) - set(params), trainable - set(state)
        if unknown or missing:
            raise ValueError(f"{path} does not match this policy: unknown {sorted(unknown)[:5]}, "
                             f"missing {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
