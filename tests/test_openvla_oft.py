"""OpenVLA-OFT backend (openvla_oft.py) on a MINIATURE checkpoint with the real layout and file formats.

The test writes, like a downloaded OpenVLA-OFT LIBERO checkpoint: config.json (auto_map, model_type "openvla",
norm_stats, text_config), configuration_prismatic.py / modeling_prismatic.py / processing_prismatic.py (remote
code: a tiny Prismatic-like model with OpenVLA's class and attribute names: a fused 6-channel vision-backbone
stand-in, the fused projector, a Llama decoder from AutoModelForCausalLM; with the parts that break on
transformers 5.x: the `_supports_sdpa` property, the timm version check, the zero-argument `tie_weights`),
model.safetensors, preprocessor_config.json, dataset_statistics.json, tokenizer files (a Llama-like vocabulary:
<unk> <s> </s> ▁ ..., <PAD> added after the base vocabulary, action tokens = its last 256 ids) and OFT's
separate action_head--*.pt / proprio_projector--*.pt (DDP "module." prefixes).

References are computed here, independently of openvla_oft.py: the test's own copies of the modules, OFT's
batch-1 sequence [BOS][patches][proprio][prompt[1:]][56 zero slots][STOP] with full bidirectional attention,
the readout slice [NUM_PATCHES + NUM_PROMPT_TOKENS, + 56) of predict_action, argmax over the last 256 ids.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from openvla_oft import OpenVLAOFTPolicy, RemoteCodeError, center_crop_uint8

BASE_VOCAB = 512          # Llama: 32000
PAD_TO = 64               # OpenVLA pads the embedding table to a multiple of 64 (32001 -> 32064)
CHUNK, DIM, PROPRIO = 8, 7, 8
HIDDEN = 64
PATCH = 32                # 224 / 32 = 7 x 7 patches per image

# The vision backbone and projector of the miniature: written into modeling_prismatic.py AND exec'd by the test
# for its reference computation. OpenVLA's names: featurizer (DINOv2, channels 0-2) and fused_featurizer (SigLIP,
# channels 3-5); a featurizer returns its second-to-last block's patch tokens, as OpenVLA patches timm's forward.
VISION_SRC = '''
class TinyPatchEmbed(nn.Module):
    def __init__(self, width, patch, image_size):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.num_patches = (image_size // patch) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TinyFeaturizer(nn.Module):
    """Stand-in for a timm ViT (OpenVLA: vit_large_patch14_reg4_dinov2 / vit_so400m_patch14_siglip_224)."""

    def __init__(self, width, patch, image_size, depth=3):
        super().__init__()
        self.embed_dim = width
        self.patch_embed = TinyPatchEmbed(width, patch, image_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth))

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks[:-1]:       # second-to-last layer's features, as OpenVLA's featurizers
            x = x + block(x)
        return x


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, use_fused_vision_backbone, image_sizes, width, patch):
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.num_images_in_input = 1
        self.featurizer = TinyFeaturizer(width, patch, image_sizes[0])
        self.embed_dim = self.featurizer.embed_dim
        if use_fused_vision_backbone:
            self.fused_featurizer = TinyFeaturizer(width, patch, image_sizes[1])
            self.embed_dim += self.fused_featurizer.embed_dim

    def get_num_patches(self):
        return self.featurizer.patch_embed.num_patches

    def get_num_images_in_input(self):
        return self.num_images_in_input

    def set_num_images_in_input(self, num_images_in_input):
        self.num_images_in_input = num_images_in_input

    def forward(self, pixel_values):
        if not self.use_fused_vision_backbone:
            return self.featurizer(pixel_values)
        patches = []
        for image in torch.split(pixel_values, [6] * self.num_images_in_input, dim=1):
            regular, fused = torch.split(image, [3, 3], dim=1)
            patches.append(torch.cat([self.featurizer(regular), self.fused_featurizer(fused)], dim=2))
        return torch.cat(patches, dim=1)


class PrismaticProjector(nn.Module):
    def __init__(self, use_fused_vision_backbone, vision_dim, llm_dim):
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if not use_fused_vision_backbone:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()
            self.act_fn2 = nn.GELU()

    def forward(self, img_patches):
        x = self.fc2(self.act_fn1(self.fc1(img_patches)))
        if self.use_fused_vision_backbone:
            x = self.fc3(self.act_fn2(x))
        return x
'''

CONFIG_SRC = '''"""configuration_prismatic.py (miniature): OpenVLA's config classes."""
from transformers import PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING


class PrismaticConfig(PretrainedConfig):
    model_type = "prismatic"
    is_composition = False

    def __init__(self, vision_backbone_id="tiny-dinosiglip-224px", llm_backbone_id="tiny-llama",
                 arch_specifier="no-align+fused-gelu-mlp", use_fused_vision_backbone=None,
                 image_resize_strategy="resize-naive", text_config=None, llm_max_length=2048, pad_token_id=32000,
                 pad_to_multiple_of=64, output_projector_states=False, image_sizes=(224, 224),
                 timm_model_ids=None, timm_override_act_layers=None, vision_width=32, patch_size=32, **kwargs):
        self.vision_backbone_id, self.llm_backbone_id = vision_backbone_id, llm_backbone_id
        self.arch_specifier = arch_specifier
        self.use_fused_vision_backbone = (use_fused_vision_backbone if use_fused_vision_backbone is not None
                                          else vision_backbone_id.startswith(("dinoclip", "dinosiglip", "tiny-dino")))
        self.image_resize_strategy = image_resize_strategy
        self.image_sizes = list(image_sizes)
        self.timm_model_ids = timm_model_ids or ["tiny-dinov2", "tiny-siglip"]
        self.timm_override_act_layers = timm_override_act_layers or [None, None]
        self.vision_width, self.patch_size = vision_width, patch_size
        self.llm_max_length, self.pad_to_multiple_of = llm_max_length, pad_to_multiple_of
        self.output_projector_states = output_projector_states
        self.text_config = (CONFIG_MAPPING[text_config["model_type"]](**text_config) if text_config is not None
                            else CONFIG_MAPPING["llama"]())
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class OpenVLAConfig(PrismaticConfig):
    model_type = "openvla"

    def __init__(self, norm_stats=None, n_action_bins=256, **kwargs):
        self.norm_stats, self.n_action_bins = norm_stats, n_action_bins
        super().__init__(**kwargs)
'''

MODELING_SRC = ('''"""modeling_prismatic.py (miniature): OpenVLA-OFT's class and attribute names, tiny sizes."""
from typing import ClassVar, List

import numpy as np
import timm
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .configuration_prismatic import OpenVLAConfig, PrismaticConfig

# OFT keeps these in prismatic/vla/constants.py (ACTION_TOKEN_BEGIN_IDX = 31743 for Llama-2).
IGNORE_INDEX = -100
ACTION_TOKEN_BEGIN_IDX = ''' + str(BASE_VOCAB - 257) + '''
STOP_INDEX = 2
NUM_ACTIONS_CHUNK = ''' + str(CHUNK) + '''
ACTION_DIM = ''' + str(DIM) + '''
''' + VISION_SRC + '''

class PrismaticPreTrainedModel(PreTrainedModel):
    config_class: PretrainedConfig = PrismaticConfig
    base_model_prefix: str = "model"
    supports_gradient_checkpointing: bool = True
    _no_split_modules: ClassVar[List[str]] = ["PrismaticProjector"]
    _skip_keys_device_placement: str = "past_key_values"
    _supports_flash_attn_2: bool = True

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)

    @property
    def _supports_sdpa(self) -> bool:
        return self.language_model._supports_sdpa


class PrismaticForConditionalGeneration(PrismaticPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if config.use_fused_vision_backbone is None:
            raise ValueError("Missing config field `use_fused_vision_backbone`")
        if timm.__version__ not in {"0.9.10", "0.9.11", "0.9.12", "0.9.16"}:
            raise NotImplementedError("TIMM Version must be >= 0.9.10 and < 1.0.0 (breaking)")
        self.vision_backbone = PrismaticVisionBackbone(config.use_fused_vision_backbone, config.image_sizes,
                                                       config.vision_width, config.patch_size)
        self.projector = PrismaticProjector(config.use_fused_vision_backbone, vision_dim=self.vision_backbone.embed_dim,
                                            llm_dim=config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config,
                                                               attn_implementation=config._attn_implementation)
        self.vocab_size = config.text_config.vocab_size
        self.pad_token_id = config.pad_token_id
        self.llm_dim = config.text_config.hidden_size
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    def _process_action_masks(self, labels):
        seen = torch.cumsum(labels != IGNORE_INDEX, dim=1)
        is_action = labels > ACTION_TOKEN_BEGIN_IDX
        current = (1 <= seen) & (seen <= ACTION_DIM) & is_action
        following = (seen > ACTION_DIM) & is_action
        return current | following

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        embeddings = self.get_input_embeddings()(input_ids)
        embeddings = embeddings * ~self._process_action_masks(labels).unsqueeze(-1)
        patches = self.projector(self.vision_backbone(pixel_values))
        sequence = torch.cat([embeddings[:, :1], patches, embeddings[:, 1:]], dim=1)
        mask = torch.cat([attention_mask[:, :1], torch.ones(patches.shape[:2], dtype=attention_mask.dtype,
                          device=attention_mask.device), attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=sequence, attention_mask=mask, output_hidden_states=True)


class OpenVLAForActionPrediction(PrismaticForConditionalGeneration):
    config_class: PretrainedConfig = OpenVLAConfig

    def __init__(self, config):
        super().__init__(config)
        self.norm_stats = config.norm_stats
        self.bins = np.linspace(-1, 1, config.n_action_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.vocab_size = self.config.text_config.vocab_size - self.config.pad_to_multiple_of

    def get_action_stats(self, unnorm_key=None):
        unnorm_key = unnorm_key or next(iter(self.norm_stats))
        return self.norm_stats[unnorm_key]["action"]
''')

PROCESSING_SRC = '''"""processing_prismatic.py (miniature placeholder; the backend never runs it)."""
'''


# ---------------------------------------------------------------------------------------------------------
# OFT's separate heads, as in prismatic/models (the test's own copies)
# ---------------------------------------------------------------------------------------------------------

class MLPResNetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList([MLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    def __init__(self, input_dim, hidden_dim, action_dim):
        super().__init__()
        self.model = MLPResNet(2, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, hidden):
        return self.model(hidden.reshape(hidden.shape[0], CHUNK, -1))


class ProprioProjector(nn.Module):
    def __init__(self, llm_dim, proprio_dim):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act_fn1(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------
# The miniature checkpoint
# ---------------------------------------------------------------------------------------------------------

STATS = {"libero_spatial_no_noops": {
    "action": {"q01": [-0.75, -0.66, -0.94, -0.11, -0.21, -0.18, 0.0],
               "q99": [0.94, 0.88, 0.93, 0.10, 0.18, 0.15, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {"q01": [-0.2, -0.3, 0.0, 2.9, -0.5, -0.4, 0.0, -0.04],
                "q99": [0.2, 0.3, 1.2, 3.3, 0.5, 0.4, 0.04, 0.0],
                "mask": [True] * 8}}}


def _build_tokenizer(directory):
    """Llama-like tokenizer files: tokenizer.json (<unk>=0 <s>=1 </s>=2, "▁" and single characters, no merges,
    fillers up to BASE_VOCAB whose last 256 are the action tokens, "<PAD>" added at BASE_VOCAB, BOS added by the
    post-processor) plus OpenVLA's transformers-4.40 tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    chars = ["▁", "\n", *[chr(c) for c in range(33, 127)]]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    vocab |= {f"<filler_{i}>": i for i in range(len(vocab), BASE_VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # Llama-2's tokenizer.json: normaliser prepends "▁" and maps spaces to "▁", no pre-tokenizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<PAD>", special=True, normalized=False)])
    assert tok.token_to_id("<PAD>") == BASE_VOCAB and tok.get_vocab_size(with_added_tokens=False) == BASE_VOCAB
    tok.save(str(directory / "tokenizer.json"))
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {k: {**special, "content": v} for k, v in
         (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<PAD>"), ("unk_token", "<unk>"))}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": False, "model_max_length": 2048, "pad_token": "<PAD>",
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}))


def build_checkpoint(directory):
    """Write the miniature OpenVLA-OFT checkpoint; return the test's copies of its modules."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    text_config = dict(model_type="llama", vocab_size=BASE_VOCAB + PAD_TO, hidden_size=HIDDEN, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=BASE_VOCAB, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
                       tie_word_embeddings=False)
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "model_type": "openvla", "arch_specifier": "no-align+fused-gelu-mlp", "llm_backbone_id": "tiny-llama",
        "vision_backbone_id": "tiny-dinosiglip-224px", "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive", "image_sizes": [224, 224], "n_action_bins": 256,
        "norm_stats": STATS, "pad_to_multiple_of": PAD_TO, "pad_token_id": BASE_VOCAB, "text_config": text_config,
        "timm_model_ids": ["tiny-dinov2", "tiny-siglip"], "timm_override_act_layers": [None, None],
        "vision_width": 32, "patch_size": PATCH, "torch_dtype": "float32", "transformers_version": "4.40.1"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "configuration_prismatic.py").write_text(CONFIG_SRC)
    (directory / "modeling_prismatic.py").write_text(MODELING_SRC)
    (directory / "processing_prismatic.py").write_text(PROCESSING_SRC)
    (directory / "dataset_statistics.json").write_text(json.dumps(STATS))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]], "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]], "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
        "processor_class": "PrismaticProcessor", "use_fused_vision_backbone": True}))
    _build_tokenizer(directory)

    ns = {"nn": nn, "torch": torch}
    exec(VISION_SRC, ns)
    vision = ns["PrismaticVisionBackbone"](True, [224, 224], 32, PATCH)
    projector = ns["PrismaticProjector"](True, vision.embed_dim, HIDDEN)
    text = dict(text_config)
    text.pop("model_type")
    llama = LlamaForCausalLM(LlamaConfig(**text, attn_implementation="sdpa"))
    with torch.no_grad():  # sharper action logits than 0.02-std init: argmax margins well above rounding
        llama.lm_head.weight.mul_(20)
    state = {f"vision_backbone.{k}": v for k, v in vision.state_dict().items()}
    state |= {f"projector.{k}": v for k, v in projector.state_dict().items()}
    state |= {f"language_model.{k}": v for k, v in llama.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})

    head = L1RegressionActionHead(HIDDEN, 96, DIM)
    with torch.no_grad():
        head.model.fc2.weight.mul_(20)
    proprio = ProprioProjector(HIDDEN, PROPRIO)
    torch.save({f"module.{k}": v for k, v in head.state_dict().items()}, directory / "action_head--100_checkpoint.pt")
    torch.save({f"module.{k}": v for k, v in proprio.state_dict().items()},
               directory / "proprio_projector--100_checkpoint.pt")
    return types.SimpleNamespace(vision=vision.eval(), projector=projector.eval(), llama=llama.eval(),
                                 head=head.eval(), proprio=proprio.eval())


@pytest.fixture(scope="module")
def fake_timm():
    """The real remote code imports timm and rejects timm outside 0.9.x; here timm is a stub at 1.0.29 (the GPU
    image's version), so the loader's version bypass is exercised."""
    saved = sys.modules.get("timm")
    stub = types.ModuleType("timm")
    stub.__version__ = "1.0.29"
    sys.modules["timm"] = stub
    yield stub
    if saved is None:
        sys.modules.pop("timm", None)
    else:
        sys.modules["timm"] = saved


@pytest.fixture(scope="module")
def mini(tmp_path_factory, fake_timm):
    directory = tmp_path_factory.mktemp("oft") / "accerl_mini_openvla_oft"
    directory.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the other core stays with the simulator / other processes
    yield directory, build_checkpoint(directory)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# The reference: OFT's predict_action computation for ONE observation, by hand, from the test's own modules
# ---------------------------------------------------------------------------------------------------------

def normalize_proprio(proprio):
    stats = STATS["libero_spatial_no_noops"]["proprio"]
    low, high = np.array(stats["q01"]), np.array(stats["q99"])
    return np.clip(2 * (proprio - low) / (high - low + 1e-8) - 1, -1, 1)


@torch.no_grad()
def reference(mods, images, prompt_ids, proprio=None):
    """images uint8 (cams, 224, 224, 3); prompt_ids: [BOS ... ▁]. Returns (hidden (56, D), logits (56, V))."""
    pixels = []
    for image in images:
        x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        dino = (x - mean[:, None, None]) / std[:, None, None]
        pixels += [dino, (x - 0.5) / 0.5]
    mods.vision.set_num_images_in_input(len(images))
    patches = mods.projector(mods.vision(torch.cat(pixels)[None]))
    if proprio is not None:
        token = mods.proprio(torch.tensor(normalize_proprio(proprio), dtype=torch.float32)[None])
        patches = torch.cat([patches, token[:, None]], dim=1)
    num_patches, num_prompt = patches.shape[1], len(prompt_ids) - 1
    ids = torch.tensor([prompt_ids + [1] * (CHUNK * DIM) + [2]])            # placeholders, then STOP
    embeddings = mods.llama.get_input_embeddings()(ids)
    embeddings[:, len(prompt_ids): len(prompt_ids) + CHUNK * DIM] = 0       # action slots: zero inputs
    sequence = torch.cat([embeddings[:, :1], patches, embeddings[:, 1:]], dim=1)
    mask = torch.ones(1, 1, sequence.shape[1], sequence.shape[1], dtype=torch.bool)  # OFT: all bidirectional
    out = mods.llama(inputs_embeds=sequence, attention_mask=mask, output_hidden_states=True)
    span = slice(num_patches + num_prompt, num_patches + num_prompt + CHUNK * DIM)
    return out.hidden_states[-1][0, span], out.logits[0, span]


def openvla_decode(logits):
    """OpenVLA's discrete decoding over the last 256 ids of the unpadded vocabulary -> normalised actions."""
    ids = BASE_VOCAB - 256 + logits[:, BASE_VOCAB - 256: BASE_VOCAB].argmax(-1).numpy()
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    return centers[np.clip(BASE_VOCAB - ids - 1, 0, 254)].reshape(CHUNK, DIM)


INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "Open the top drawer"]


def _images(batch, cams, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, cams, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

def test_remote_code_needs_explicit_consent(mini):
    directory, _ = mini
    with pytest.raises(RemoteCodeError, match=r"trust_remote_code=True"):
        OpenVLAOFTPolicy.load(str(directory))


def test_token_head_matches_openvla_decoding_and_gipo_step(mini, tmp_path):
    directory, mods = mini
    policy = OpenVLAOFTPolicy.load(str(directory), trust_remote_code=True, head="tokens", use_proprio=False,
                                   dtype="float32", trainable="lora", lora_rank=4)
    with torch.device("meta"):  # transformers 5.x's remote-code loading must not leave torch.linspace poisoned
        assert torch.linspace(-1, 1, 3).is_meta and torch.arange(3).is_meta
    tok = policy.tokenizer
    assert tok.decode(tok.encode(INSTRUCTIONS[:1], 128)[0]).startswith(
        "In: What action should the robot take to pick up the black bowl and place it on the plate?\nOut:")
    ids = tok.encode(INSTRUCTIONS, max_len=112)
    assert int(ids[0, 0]) == 1 and tok.empty_id == 3 and tok.pad_id == BASE_VOCAB
    images = _images(2, 2)  # two cameras (third-person + wrist), already 224 px: the processor's resize is a no-op

    out = policy.act(torch.from_numpy(images), ids, greedy=True)
    assert out["action_tokens"].shape == (2, CHUNK, DIM) and out["log_probs"].shape == (2, CHUNK, DIM, 256)
    assert out["logp"].shape == (2, CHUNK, DIM) and out["value"].shape == (2,)
    for row in range(2):  # each padded row of the batch = OFT's batch-1 computation
        prompt = [int(i) for i in ids[row] if int(i) != tok.pad_id]
        _, logits = reference(mods, images[row], prompt)
        expected = openvla_decode(logits)
        np.testing.assert_allclose(out["normalized_actions"][row].numpy(), expected, atol=1e-6)
        ref_log_probs = logits[:, BASE_VOCAB - 256: BASE_VOCAB].flip(-1).log_softmax(-1).reshape(CHUNK, DIM, 256)
        torch.testing.assert_close(out["log_probs"][row], ref_log_probs, atol=2e-4, rtol=1e-4)
    # env convention: dims 0-5 as normalised, gripper (unnormalised, 1 = open) -> 1 - 2x
    np.testing.assert_allclose(out["actions"][..., :6], out["normalized_actions"][..., :6])
    np.testing.assert_allclose(out["actions"][..., 6], 1 - 2 * out["normalized_actions"][..., 6], atol=1e-6)
    stats = STATS["libero_spatial_no_noops"]["action"]
    assert policy.action_stats["q01"] == pytest.approx(stats["q01"]) and policy.action_stats["mask"] == stats["mask"]
    raw = policy.unnormalize_actions(out["normalized_actions"])
    low, high = np.array(stats["q01"]), np.array(stats["q99"])
    np.testing.assert_allclose(raw[..., :6], 0.5 * (out["normalized_actions"][..., :6].double().numpy() + 1)
                               * (high[:6] - low[:6] + 1e-8) + low[:6], atol=1e-6)

    # One GIPO update (reference.md section 4): sampled chunk, re-scored by the learner, w stop-gradient.
    generator = torch.Generator().manual_seed(0)
    behaviour = policy.act(torch.from_numpy(images), ids, greedy=False, generator=generator)
    optimizer = torch.optim.AdamW([{"params": policy.policy_parameters(), "lr": 1e-2},
                                   {"params": policy.value_parameters(), "lr": 1e-2}])
    assert all(p.requires_grad for p in policy.policy_parameters())
    assert not any(p.requires_grad for p in policy.model.vision_backbone.parameters())  # LoRA: base frozen
    advantages = torch.tensor([1.0, -1.0])[:, None, None].expand(2, CHUNK, DIM)
    policy.train()
    new = policy.evaluate(torch.from_numpy(images), ids, behaviour["action_tokens"])
    rho = (new["logp"] - behaviour["logp"]).exp()
    assert (rho - 1).abs().max() < 1e-4  # same weights: act and evaluate agree
    sigma = 0.5
    w = torch.exp(-torch.log(rho.detach().clamp_min(1e-9)) ** 2 / (2 * sigma ** 2))
    loss = -(w * rho * advantages).mean() + 0.5 * (new["value"] - torch.tensor([1.0, 0.0])).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    lora_b = [p for n, p in policy.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_b)
    assert policy.token_head.weight.grad.abs().sum() > 0 and all(p.grad is not None for p in policy.value_parameters())
    optimizer.step()
    policy.eval()
    after = policy.evaluate(torch.from_numpy(images), ids, behaviour["action_tokens"])
    gain = ((after["logp"] - behaviour["logp"]) * advantages).mean()
    assert gain > 0  # the update moved log-probs in the direction of the advantages

    # save -> load: base checkpoint + the trainable tensors give the same policy
    policy.save(str(tmp_path / "saved"))
    reloaded = OpenVLAOFTPolicy.load(str(tmp_path / "saved"), trust_remote_code=True)
    again = reloaded.evaluate(torch.from_numpy(images), ids, behaviour["action_tokens"])
    torch.testing.assert_close(again["logp"], after["logp"], atol=1e-5, rtol=1e-5)


def test_regression_head_with_proprio(mini):
    directory, mods = mini
    policy = OpenVLAOFTPolicy.load(str(directory), trust_remote_code=True, dtype="float32", trainable="heads")
    assert policy.head == "regression" and policy.proprio_projector is not None
    tok = policy.tokenizer
    ids = tok.encode(INSTRUCTIONS, max_len=tok.num_tokens(INSTRUCTIONS[0]))
    images = _images(2, 1, seed=1)
    proprio = np.random.default_rng(2).normal(0, 0.2, (2, PROPRIO))
    with pytest.raises(ValueError, match="proprio"):
        policy.act(torch.from_numpy(images), ids, greedy=True)
    out = policy.act(torch.from_numpy(images), ids, greedy=torch.tensor([True, False]),
                     generator=torch.Generator().manual_seed(0), proprio=torch.from_numpy(proprio))
    prompt = [int(i) for i in ids[0] if int(i) != tok.pad_id]
    hidden, _ = reference(mods, images[0], prompt, proprio[0])
    with torch.no_grad():
        mean = mods.head.predict_action(hidden[None])[0]                   # OFT's L1 action
    np.testing.assert_allclose(out["normalized_actions"][0].numpy(), mean.clamp(-1, 1).numpy(), atol=1e-5)
    # the distribution: a discretised Gaussian around the regressed mean, sigma = regression_init_std
    centres = (torch.arange(256) + 0.5) / 128 - 1
    expected = (-0.5 * ((centres - mean[..., None]) / 0.05) ** 2).log_softmax(-1)
    # rtol 1e-3: far-tail bins have log-probs near -70, where float32 rounding of the two routes differs by
    # ~1e-4 relative (torch 2.13); a sigma off by 1 % would move them by 2 %
    torch.testing.assert_close(out["log_probs"][0], expected, atol=1e-4, rtol=1e-3)
    assert out["log_probs"].shape == (2, CHUNK, DIM, 256)
    # a sampled row acts with bin centres; its logp is that of its tokens
    np.testing.assert_allclose(out["normalized_actions"][1], centres[out["action_tokens"][1]])
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert "log_std" in names and any(n.startswith("regression_head.") for n in names)
    assert not any(n.startswith("model.") for n in names)                   # "heads": the VLA stays frozen
    ev = policy.evaluate(torch.from_numpy(images), ids, out["action_tokens"], proprio=torch.from_numpy(proprio))
    (-(ev["logp"].mean()) + ev["value"].pow(2).mean()).backward()
    assert policy.log_std.grad is not None and policy.regression_head.model.fc2.weight.grad.abs().sum() > 0


def test_image_processing_resize_and_center_crop(mini):
    directory, _ = mini
    # the released dtype (bf16), the other attention layout, gradient checkpointing: they run and train
    policy = OpenVLAOFTPolicy.load(str(directory), trust_remote_code=True, head="tokens", use_proprio=False,
                                   center_crop=True, attention="prefix_causal", gradient_checkpointing=True,
                                   lora_rank=2)
    assert policy.model.get_input_embeddings().weight.dtype == torch.bfloat16
    small = torch.from_numpy(_images(1, 2, size=128, seed=3))
    pixels = policy.pixel_values(small)
    assert pixels.shape == (1, 12, 224, 224)
    ids = policy.tokenizer.encode(INSTRUCTIONS[1:], 80)
    out = policy.act(small, ids, greedy=True)
    assert torch.isfinite(out["log_probs"]).all()
    policy.train()
    policy.evaluate(small, ids, out["action_tokens"])["logp"].mean().backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if n.endswith("lora_B"))
    pickle.loads(pickle.dumps(policy.tokenizer))  # env workers get it through a pickle
    # centre crop = TF crop_and_resize with box sqrt(0.9) of the side, bilinear on TF's sample grid, uint8 x 255.5
    image = np.random.default_rng(4).integers(0, 256, (9, 7), dtype=np.uint8).astype(np.float64)
    h, w = image.shape
    side = math.sqrt(0.9)
    y1 = x1 = (1 - side) / 2
    expected = np.zeros_like(image)
    for i in range(h):
        for j in range(w):
            y = (y1 + i * side / (h - 1)) * (h - 1)
            x = (x1 + j * side / (w - 1)) * (w - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            dy, dx = y - y0, x - x0
            y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            v = ((1 - dy) * ((1 - dx) * image[y0, x0] + dx * image[y0, x1_])
                 + dy * ((1 - dx) * image[y1_, x0] + dx * image[y1_, x1_])) / 255
            expected[i, j] = min(math.floor(min(max(v, 0), 1) * 255.5), 255)
    got = center_crop_uint8(torch.from_numpy(image).float().expand(1, 3, h, w))[0, 0].numpy()
    assert np.abs(got - expected).max() <= 1  # float32 vs float64 at a floor boundary


def test_prompt_too_long_is_an_error(mini):
    directory, _ = mini
    from openvla_oft import OFTPromptTokenizer

    tok = OFTPromptTokenizer.load(str(directory), vocab_size=BASE_VOCAB)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode([INSTRUCTIONS[0]], max_len=10)
    assert tok.action_token_ids(torch.tensor([0, 255])).tolist() == [BASE_VOCAB - 1, BASE_VOCAB - 256]


def test_missing_prismatic_package_is_named(mini, tmp_path):
    """Real OFT checkpoints' modeling_prismatic.py imports OFT's `prismatic` package: without it, say so."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("prismatic") is not None:
        pytest.skip("a prismatic package is installed here")
    directory, _ = mini
    copy = tmp_path / "needs_prismatic"
    shutil.copytree(directory, copy)
    source = (copy / "modeling_prismatic.py").read_text()
    (copy / "modeling_prismatic.py").write_text(source.replace(
        "import timm\n", "import timm\nfrom prismatic.vla.constants import ACTION_DIM  # noqa\n", 1))
    with pytest.raises(ImportError, match="openvla-oft"):
        OpenVLAOFTPolicy.load(str(copy), trust_remote_code=True, dtype="float32")


def test_make_policy_builds_the_oft_backend(mini):
    """vla_policy.make_policy (the pipeline's factory) loads a checkpoint with --policy.backend openvla-oft:
    remote code only with consent; --policy.lora-rank sets the adapters' rank."""
    from vla_policy import PolicyConfig, make_policy

    directory, _ = mini
    cfg = PolicyConfig(backend="openvla-oft", checkpoint=str(directory), chunk_len=CHUNK, action_dim=DIM)
    with pytest.raises(RemoteCodeError):
        make_policy(cfg)
    policy = make_policy(PolicyConfig(backend="openvla-oft", checkpoint=str(directory), trust_remote_code=True,
                                      chunk_len=CHUNK, action_dim=DIM, lora_rank=4))
    assert isinstance(policy, OpenVLAOFTPolicy) and policy.cfg.trainable == "lora" and policy.cfg.lora_rank == 4
    assert policy.cfg.chunk_len == CHUNK and policy.cfg.num_action_slots == CHUNK * DIM


# ---------------------------------------------------------------------------------------------------------
# accerl.py running the backend (--policy.backend openvla-oft) on tabletop2d
# ---------------------------------------------------------------------------------------------------------

TABLETOP_PROPRIO = 3      # tabletop2d's [x, y, gripper]


@pytest.fixture(scope="module")
def mini_tabletop(mini, tmp_path_factory):
    """The miniature with a proprio projector and proprio statistics for tabletop2d's 3-D state (the LIBERO ones
    take OFT's 8-D state; accerl refuses a mismatch)."""
    import shutil

    directory, _ = mini
    copy = tmp_path_factory.mktemp("oft_tabletop") / "accerl_mini_openvla_oft_tabletop2d"
    shutil.copytree(directory, copy)
    torch.manual_seed(1)
    projector = ProprioProjector(HIDDEN, TABLETOP_PROPRIO)
    (copy / "proprio_projector--100_checkpoint.pt").unlink()
    torch.save({f"module.{k}": v for k, v in projector.state_dict().items()},
               copy / "proprio_projector--200_checkpoint.pt")
    stats = json.loads((copy / "dataset_statistics.json").read_text())
    stats["libero_spatial_no_noops"]["proprio"] = {"q01": [0.0] * 3, "q99": [1.0] * 3, "mask": [True] * 3}
    (copy / "dataset_statistics.json").write_text(json.dumps(stats))
    return copy


def oft_args(run_dir, policy_checkpoint, **overrides):
    """A tiny serial accerl run of the OFT backend on tabletop2d; overrides by field name, the first group that has
    it (experiment, policy, env, workers, algorithm: `checkpoint` is --eval-only's)."""
    from accerl import Args, ExperimentArgs, WorkersArgs, derive_and_check
    from vla_policy import PolicyConfig

    args = Args(experiment=ExperimentArgs(mode="serial", total_env_steps=300, run_dir=str(run_dir), log_every_s=1e9,
                                          checkpoint_every_updates=0),
                policy=PolicyConfig(backend="openvla-oft", checkpoint=str(policy_checkpoint), trust_remote_code=True,
                                    image_size=32),
                workers=WorkersArgs(num_env_workers=1, envs_per_worker=2, segment_len=8, segments_per_update=2,
                                    eval_every_updates=0, final_eval_episodes=2, eval_episodes_per_task=1))
    for name, value in overrides.items():
        group = next(g for g in (args.experiment, args.policy, args.env, args.workers, args.algorithm)
                     if hasattr(g, name))
        setattr(group, name, value)
    return derive_and_check(args)


def run_in_process(args):
    from accerl import Run

    run = Run(args)
    return run, run.run()  # serial: every role stepped in this process


def test_accerl_serial_entry_script_trains_the_oft_checkpoint(mini_tabletop, tmp_path):
    """The entry script's command line `accerl.py --mode serial --policy.backend openvla-oft ...`, parsed and run
    in this process (its main(), as `python accerl.py` does): it trains (updates > 0), evaluates and writes
    summary.json; checkpoints hold the trainable tensors only. (The miniature's remote code imports timm: the
    `fake_timm` stub, active through mini_tabletop.)"""
    import accerl
    import checkpoint as ckpt

    run_dir = tmp_path / "run"
    argv = ["--mode", "serial", "--run-dir", str(run_dir),
            "--policy.backend", "openvla-oft", "--policy.checkpoint", str(mini_tabletop), "--policy.trust-remote-code",
            "--policy.image-size", "32", "--num-env-workers", "1", "--envs-per-worker", "2", "--segment-len", "8",
            "--segments-per-update", "2", "--total-env-steps", "300", "--eval-every-updates", "0",
            "--final-eval-episodes", "2", "--log-every-s", "1000"]
    assert accerl.main(accerl.cli_with_preset(accerl.Args, argv)) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["updates"] >= 2 and summary["global_env_step"] >= 300
    assert summary["final_eval"]["episodes"] == 2
    # the instruction buffer was widened to the longest OFT prompt of tabletop2d's instructions
    from envs import env_spec
    from openvla_oft import OFTPromptTokenizer

    tok = OFTPromptTokenizer.load(str(mini_tabletop))
    longest = max(tok.num_tokens(text) for text in env_spec("tabletop2d", 32).instructions)
    assert json.loads((run_dir / "args.json").read_text())["policy"]["max_instruction_tokens"] == longest > 32
    model, _, _, meta = ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(run_dir)))
    assert meta["update"] == summary["updates"]
    assert model and all(".lora_" in n or not n.startswith("model.") for n in model)  # no frozen base weight
    assert "log_std" in model and any(n.startswith("proprio_projector.") for n in model)


def test_accerl_wiring_of_the_oft_backend(mini_tabletop, tmp_path):
    """In-process serial runs: env workers encode with the checkpoint's prompt tokenizer, the env receives the
    policy's [-1, 1] actions (gripper 1 - 2x, not de-normalised), weight sync carries only the trainable tensors,
    resume and --eval-only need the remote-code consent again and continue from the trainable-only checkpoint."""
    from accerl import Run

    args = oft_args(tmp_path / "run", mini_tabletop)
    run, code = run_in_process(args)
    assert code == 0
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["updates"] >= 1
    policy = OpenVLAOFTPolicy.load(str(mini_tabletop), trust_remote_code=True, dtype="float32")
    assert policy.head == "regression" and policy.proprio_dim == TABLETOP_PROPRIO
    # weight sync: the broadcast's layout is the trainable tensors, nothing of the frozen base
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(run.shared.weights.names) == trainable
    assert sum(t.numel() for t in run.shared.weights.tensors.values()) < 0.5 * policy.num_parameters()

    storage, spec = run.shared.storage, run.spec
    acted = storage.env_steps > 0                                           # rows whose chunk the env executed
    acted[run.first_eval_segment:] = False
    assert acted.sum() > 10
    # instruction tokens: the checkpoint's OpenVLA prompt of the row's task
    prompts = policy.tokenizer.encode(list(spec.instructions), args.policy.max_instruction_tokens)
    assert torch.equal(storage.instruction[acted], prompts[storage.task_id[acted]])
    assert policy.tokenizer.decode(storage.instruction[acted][0]).startswith("In: What action should the robot take to")
    assert storage.proprio[acted].abs().sum() > 0
    # actions: sampled bin centres of [-1, 1] for dims 0-5 (the env de-normalises), gripper x -> 1 - 2x
    centres = (storage.action_tokens[acted].double() + 0.5) / 128 - 1
    actions = storage.actions[acted].double()
    torch.testing.assert_close(actions[..., :6], centres[..., :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(actions[..., 6], 1 - 2 * centres[..., 6], atol=1e-6, rtol=0)

    # --resume and --eval-only: the policy comes from the run, the consent to run its code from this command line
    with pytest.raises(SystemExit, match="trust-remote-code"):
        Run(oft_args(tmp_path / "ignored", mini_tabletop, resume=str(run.run_dir), trust_remote_code=False))
    resumed, code = run_in_process(oft_args(tmp_path / "ignored", mini_tabletop, resume=str(run.run_dir),
                                            total_env_steps=600, final_eval_episodes=0))
    assert code == 0
    assert json.loads((run.run_dir / "summary.json").read_text())["updates"] > summary["updates"]
    evaluated, code = run_in_process(oft_args(tmp_path / "eval", mini_tabletop, eval_only=True,
                                              checkpoint=str(run.run_dir)))
    assert code == 0 and evaluated.final_eval["episodes"] == spec.num_tasks


def test_accerl_refuses_bad_oft_combinations(mini, mini_tabletop, tmp_path):
    """Clear errors before anything runs: no checkpoint, no consent to run its code, a proprio projector of
    another robot state, action statistics other than those the env de-normalises with."""
    from accerl import Run

    directory, _ = mini
    with pytest.raises(SystemExit, match="no such directory"):
        oft_args(tmp_path / "a", tmp_path / "missing")
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        oft_args(tmp_path / "a", tmp_path)
    with pytest.raises(SystemExit, match="trust-remote-code"):
        oft_args(tmp_path / "a", mini_tabletop, trust_remote_code=False)
    with pytest.raises(SystemExit, match="8-D proprio.*3-D"):  # LIBERO's 8-D projector on tabletop2d
        Run(oft_args(tmp_path / "a", directory)).build(serial=True)
    try:
        from envs import env_spec

        env_spec("libero_spatial", 32)
    except Exception:  # the LIBERO stack is not installed (tests/libero_stack.py)
        return
    # the miniature's statistics are libero_spatial's rounded: the env would scale every action wrongly
    with pytest.raises(SystemExit, match="action statistics"):
        oft_args(tmp_path / "a", directory, task="libero_spatial")
