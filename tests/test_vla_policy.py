"""The policy interface (vla_policy.py): shapes, sampling maths, attention masking, persistence, gradients.

Small batches of the default architecture; the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from vla_policy import (InstructionTokenizer, PolicyConfig, VLAPolicy, actions_to_tokens, policy_autocast,
                        spatial_softmax, tokens_to_actions)

LAYOUTS = ["per_step", "per_dim"]
INSTRUCTIONS = ["pick up the red block", "push the blue ball left"]


def make_policy(**overrides) -> VLAPolicy:
    torch.manual_seed(0)
    return VLAPolicy(PolicyConfig(**overrides)).eval()


def make_inputs(policy: VLAPolicy, batch: int = 2, seed: int = 0):
    cfg = policy.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, cfg.num_cameras, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, generator=g)
    texts = (INSTRUCTIONS * batch)[:batch]
    return images, policy.tokenizer.encode(texts, cfg.max_instruction_tokens)


def randomise_action_head(policy: VLAPolicy) -> None:
    """The initial head is near-uniform by design; masking tests need logits that visibly depend on the input."""
    with torch.no_grad():
        policy.action_head.weight.normal_(std=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread that gets descheduled makes
    every parallel region wait (3x slower test runs were seen under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=LAYOUTS)
def policy(request) -> VLAPolicy:
    return make_policy(layout=request.param)


# -- tokenizer and bins ----------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_layout():
    tok = InstructionTokenizer()
    assert tok.vocab_size == 3 + 256 + 256
    ids = tok.encode(["put the mug on the plate", "café ☕", ""], max_len=32)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert tok.decode(ids[0]) == "put the mug on the plate"
    assert tok.decode(ids[1]) == "café ☕"  # multi-byte UTF-8 survives byte-level tokens
    assert ids[2, :2].tolist() == [tok.bos_id, tok.eos_id] and (ids[2, 2:] == tok.pad_id).all()
    assert (ids[0, 1:25] - 3).tolist() == list(b"put the mug on the plate")  # byte b has id 3 + b
    # Truncation keeps bos + the first max_len - 2 bytes + eos.
    cut = tok.encode(["abcdefghij"], max_len=6)[0]
    assert cut.tolist() == [tok.bos_id, *(3 + b for b in b"abcd"), tok.eos_id]
    assert tok.num_tokens("abcdefghij") == 12
    # Action tokens are the last 256 ids, in bin order; text can never produce them.
    action_ids = tok.action_token_ids(torch.arange(256))
    assert action_ids.tolist() == list(range(tok.vocab_size - 256, tok.vocab_size))
    assert int(tok.encode(["<act_5> <|pad|>"], 32).max()) < tok.first_action_id
    # Env workers receive it through pickle; saving and loading keep every id.
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode(["put the mug"], 16), tok.encode(["put the mug"], 16))


def test_tokenizer_save_load(tmp_path):
    tok = InstructionTokenizer()
    tok.save(str(tmp_path))
    loaded = InstructionTokenizer.load(str(tmp_path))
    assert (loaded.pad_id, loaded.vocab_size, loaded.first_action_id) == (tok.pad_id, tok.vocab_size,
                                                                           tok.first_action_id)
    assert torch.equal(loaded.encode(INSTRUCTIONS, 32), tok.encode(INSTRUCTIONS, 32))


def test_action_bins_roundtrip():
    bins = torch.arange(256)
    centres = tokens_to_actions(bins)
    assert centres.dtype == torch.float32
    assert torch.allclose(centres[[0, -1]], torch.tensor([-1 + 1 / 256, 1 - 1 / 256]))
    assert torch.equal(actions_to_tokens(centres), bins)
    # Any action inside a bin maps to that bin; the ends and out-of-range values clip.
    assert torch.equal(actions_to_tokens(centres + 0.99 / 256), bins)
    assert torch.equal(actions_to_tokens(centres - 0.99 / 256), bins)
    assert actions_to_tokens(torch.tensor([-1.0, 1.0, -3.0, 3.0])).tolist() == [0, 255, 0, 255]


# -- act / evaluate --------------------------------------------------------------------------------------


def test_act_shapes_and_sampling_maths(policy):
    images, tokens = make_inputs(policy, batch=3)
    out = policy.act(images, tokens, generator=torch.Generator().manual_seed(0))
    shapes = {"action_tokens": (3, 8, 7), "actions": (3, 8, 7), "logp": (3, 8, 7), "log_probs": (3, 8, 7, 256),
              "value": (3,)}
    for key, shape in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == (torch.long if key == "action_tokens" else torch.float32), key
    assert 0 <= out["action_tokens"].min() and out["action_tokens"].max() < 256
    assert torch.equal(out["actions"], tokens_to_actions(out["action_tokens"]))
    assert out["actions"].abs().max() < 1
    assert torch.allclose(out["log_probs"].exp().sum(-1), torch.ones(3, 8, 7), atol=1e-5)
    gathered = out["log_probs"].gather(-1, out["action_tokens"].unsqueeze(-1)).squeeze(-1)
    assert torch.equal(out["logp"], gathered)
    # The near-uniform initial head: every bin starts with probability ~1/256 (broad exploration).
    assert (out["log_probs"] + math.log(256)).abs().max() < 0.1


def test_greedy_is_argmax_and_mixes_per_row(policy):
    images, tokens = make_inputs(policy, batch=2)
    greedy = policy.act(images, tokens, greedy=True)
    assert torch.equal(greedy["action_tokens"], greedy["log_probs"].argmax(-1))
    mixed = policy.act(images, tokens, greedy=torch.tensor([True, False]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed["action_tokens"][0], greedy["action_tokens"][0])
    # A near-uniform 256-way sample over 56 tokens never equals the argmax.
    assert not torch.equal(mixed["action_tokens"][1], greedy["action_tokens"][1])


def test_sampling_follows_the_distribution():
    policy = make_policy(action_head="linear")
    with torch.no_grad():  # a peaked, known distribution: bin 3 for every token
        policy.action_head.bias.view(7, 256)[:, 3] = 4.0
    images, tokens = make_inputs(policy, batch=8)
    out = policy.act(images, tokens, generator=torch.Generator().manual_seed(0))
    p3 = out["log_probs"][..., 3].exp().mean().item()
    freq3 = (out["action_tokens"] == 3).float().mean().item()
    assert abs(freq3 - p3) < 0.06, (freq3, p3)  # 448 draws, std ~0.02


def test_evaluate_matches_act(policy):
    images, tokens = make_inputs(policy, batch=2)
    out = policy.act(images, tokens)
    ev = policy.evaluate(images, tokens, out["action_tokens"])
    assert set(ev) == {"logp", "entropy", "log_probs", "value"}
    assert ev["logp"].shape == ev["entropy"].shape == (2, 8, 7) and ev["log_probs"].shape == (2, 8, 7, 256)
    assert all(v.dtype == torch.float32 for v in ev.values())
    assert torch.allclose(ev["logp"], out["logp"], atol=1e-6)
    assert torch.allclose(ev["log_probs"], out["log_probs"], atol=1e-6)
    assert torch.allclose(ev["value"], out["value"], atol=1e-6)
    assert torch.allclose(ev["entropy"], torch.full((2, 8, 7), math.log(256)), atol=1e-2)
    assert ev["logp"].requires_grad


def test_evaluate_under_bf16_autocast_keeps_float32_heads():
    policy = make_policy()
    images, tokens = make_inputs(policy, batch=2)
    actions = torch.randint(0, 256, (2, 8, 7))
    with policy_autocast("cpu", cpu_bf16=True):
        ev = policy.evaluate(images, tokens, actions)
    assert all(v.dtype == torch.float32 for v in ev.values())
    ev["logp"].sum().backward()
    assert policy.action_head.weight.grad is not None
    ref = policy.evaluate(images, tokens, actions)
    assert (ev["logp"] - ref["logp"]).abs().max() < 0.05  # bf16 trunk, float32 head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_under_cuda_autocast():
    policy = make_policy().cuda()
    images, tokens = make_inputs(policy, batch=2)
    with policy_autocast("cuda"):
        ev = policy.evaluate(images.cuda(), tokens.cuda(), torch.zeros(2, 8, 7, dtype=torch.long, device="cuda"))
    assert all(v.dtype == torch.float32 for v in ev.values())


def test_other_options_run():
    for overrides in ({"num_cameras": 2}, {"value_pooling": "prompt"}, {"prefix_attention": "bidirectional"},
                      {"vision_token_merge": 1}):
        policy = make_policy(**overrides)
        images, tokens = make_inputs(policy, batch=2)
        out = policy.act(images, tokens)
        assert out["log_probs"].shape == (2, 8, 7, 256) and out["value"].shape == (2,), overrides
    with pytest.raises(ValueError, match="layout"):
        PolicyConfig(layout="per_token")
    with pytest.raises(ValueError, match="uint8"):
        policy.act(images.float(), tokens)


def test_builds_on_meta_device():
    """The launcher builds a skeleton on the meta device to size buffers without allocating weights."""
    with torch.device("meta"):
        skeleton = VLAPolicy(PolicyConfig())
    assert skeleton.action_slots.is_meta and skeleton.num_parameters() == make_policy().num_parameters()


# -- attention masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,prefix_attention", [("per_step", "causal"), ("per_dim", "causal"),
                                                     ("per_step", "bidirectional")])
def test_action_slots_attend_bidirectionally(layout, prefix_attention):
    """OFT parallel decoding: a later action slot's input changes an earlier slot's output (the custom 4-D
    mask really reaches the decoder: under the stock causal mask slot 0 could not see the last slot), while
    the prefix never sees the action slots."""
    policy = make_policy(layout=layout, prefix_attention=prefix_attention, value_pooling="prompt")
    randomise_action_head(policy)
    images, tokens = make_inputs(policy)
    logits, value = policy(images, tokens)
    with torch.no_grad():
        policy.action_slots[-1].add_(torch.randn(policy.cfg.hidden))
    logits2, value2 = policy(images, tokens)
    assert (logits2[:, 0, 0] - logits[:, 0, 0]).abs().max() > 1e-3  # first step (first token), earlier slot
    assert torch.allclose(value2, value, atol=1e-6)  # prompt pooling reads the prefix only


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_is_masked(layout):
    """A row's outputs do not depend on its padding: alone (no pads once the model trims unused columns) or
    next to a longer instruction (pads inside the sequence), and whatever the pad embedding holds."""
    policy = make_policy(layout=layout)
    randomise_action_head(policy)
    images, _ = make_inputs(policy)
    short, long = "push it", "pick up the red block and put it in the bowl"
    alone_logits, alone_value = policy(images[:1], policy.tokenizer.encode([short], 48))
    pair = policy.tokenizer.encode([short, long], 48)
    pair_logits, pair_value = policy(images, pair)
    assert torch.allclose(pair_logits[:1], alone_logits, atol=1e-4)
    assert torch.allclose(pair_value[:1], alone_value, atol=1e-5)
    with torch.no_grad():
        policy.decoder.embed_tokens.weight[policy.tokenizer.pad_id].normal_(std=10.0)
    assert torch.allclose(policy(images, pair)[0], pair_logits, atol=1e-5)
    # ...whereas the instruction itself matters.
    other = policy.tokenizer.encode([long, short], 48)
    assert (policy(images, other)[0] - pair_logits).abs().max() > 1e-3


# -- persistence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_roundtrip(tmp_path, layout):
    policy = make_policy(layout=layout, decoder_layers=2)
    images, tokens = make_inputs(policy)
    policy.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    torch.manual_seed(123)  # a different random init, overwritten by the load
    loaded = VLAPolicy.load(str(tmp_path)).eval()
    assert loaded.cfg == policy.cfg
    ref, again = policy(images, tokens), loaded(images, tokens)
    assert torch.equal(ref[0], again[0]) and torch.equal(ref[1], again[1])


# -- gradients and parameter groups ----------------------------------------------------------------------


def test_parameter_groups_partition_the_model(policy):
    policy_ids = {id(p) for p in policy.policy_parameters()}
    value_ids = {id(p) for p in policy.value_parameters()}
    assert policy_ids.isdisjoint(value_ids) and value_ids
    assert policy_ids | value_ids == {id(p) for p in policy.parameters()}


def _grads(policy: VLAPolicy, loss: torch.Tensor) -> tuple[bool, bool]:
    """(does the trunk get gradient, does the critic) from `loss`."""
    policy.zero_grad(set_to_none=True)
    loss.backward()

    def has(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    value_ids = {id(p) for p in policy.value_parameters()}
    trunk = [p for p in policy.parameters() if id(p) not in value_ids]
    return has(trunk), has(policy.value_parameters())


@pytest.mark.parametrize("pooling", ["actions", "prompt"])
def test_value_head_is_detached_from_the_trunk(pooling):
    policy = make_policy(value_pooling=pooling).train()
    images, tokens = make_inputs(policy)
    actions = torch.randint(0, 256, (2, 8, 7))
    ev = policy.evaluate(images, tokens, actions)
    assert _grads(policy, ev["value"].square().mean()) == (False, True)
    ev = policy.evaluate(images, tokens, actions)
    assert _grads(policy, -ev["logp"].mean()) == (True, False)
    # The option to let the critic shape the trunk does what it says.
    shared = make_policy(value_pooling=pooling, value_detach=False).train()
    assert _grads(shared, shared.evaluate(images, tokens, actions)["value"].square().mean()) == (True, True)


def test_categorical_sampler_matches_probabilities():
    """The inverse-CDF sampler used by `act` against the distribution it samples (a zero bin included)."""
    from vla_policy import _sample_categorical

    probs = torch.tensor([0.1, 0.0, 0.25, 0.65])
    log_probs = probs.log().expand(20000, 4)
    draws = _sample_categorical(log_probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[1] == 0
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_smooth_head_keeps_bin_order_and_same_logit_shape():
    """Raising one bin through the smooth head raises its neighbours more than far bins."""
    policy = make_policy(action_head="smooth")
    images, tokens = make_inputs(policy, batch=2)
    logits, _ = policy(images, tokens)
    assert logits.shape == (2, 8, 7, 256)
    logp = logits.log_softmax(-1)[:, :, :, 100].sum()
    logp.backward()
    # one gradient step on the head's bias towards bin 100
    with torch.no_grad():
        policy.action_head.bias += 0.5 * policy.action_head.bias.grad
    new = policy(images, tokens)[0].log_softmax(-1)[0, 0, 0]
    old = logits.log_softmax(-1)[0, 0, 0].detach()
    gain = new - old
    assert gain[100] > 0 and gain[95] > 0 and gain[105] > 0
    assert gain[100] > gain[200] and gain[100] > gain[0]


def test_instruction_conditioning_starts_as_identity_and_reaches_its_target():
    """FiLM starts as the identity (the same logits as without it), then makes the vision features of one image
    depend on the instruction; instruction slots make the slot inputs depend on it. FiLM on the SigLIP tower is
    an error, not a silent no-op."""
    torch.manual_seed(0)
    plain = make_policy(vision_tower="resnet", num_cameras=2)
    policy = make_policy(vision_tower="resnet", num_cameras=2, instruction_film=True)
    policy.load_state_dict(plain.state_dict(), strict=False)
    images, tokens = make_inputs(policy, batch=2)
    same_image = images[:1].expand(2, -1, -1, -1, -1)
    pixels = same_image.flatten(0, 1).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.allclose(policy(images, tokens)[0], plain(images, tokens)[0], atol=1e-5)
        for layer in policy.film:
            layer.weight.normal_(0, 0.1)
        features, _ = policy._resnet(pixels, tokens)
    assert not torch.allclose(features[:2], features[2:])  # same pixels, different instructions
    slots_policy = make_policy(vision_tower="resnet", instruction_slots=True)
    codes = slots_policy._instruction_code(tokens)
    assert codes.shape == (2, slots_policy.cfg.hidden) and not torch.allclose(codes[0], codes[1])
    with pytest.raises(ValueError, match="resnet"):
        PolicyConfig(instruction_film=True)


def test_init_scales_and_decoder_bypass():
    """The init options set what they name; the decoder-bypass ablation acts, trains through its MLP (not the
    decoder) or, with keypoints and proprio, through the state MLP, and needs the ResNet tower."""
    policy = make_policy(decoder_init_std=0.0625, embedding_init_std=0.3)
    q = policy.decoder.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.0625) < 0.005
    assert abs(policy.decoder.embed_tokens.weight.std().item() - 0.3) < 0.02
    assert abs(policy.action_slots.std().item() - 0.3) < 0.1
    bypass = make_policy(vision_tower="resnet", bypass_decoder=True)
    images, tokens = make_inputs(bypass, batch=2)
    out = bypass.evaluate(images, tokens, bypass.act(images, tokens)["action_tokens"])
    (out["logp"].sum() + out["value"].sum()).backward()
    assert bypass.bypass_mlp[0].weight.grad.abs().sum() > 0
    assert bypass.decoder.layers[0].self_attn.q_proj.weight.grad is None
    with pytest.raises(ValueError, match="resnet"):
        PolicyConfig(bypass_decoder=True)
    # with keypoints and proprio, the state MLP alone feeds the slots; the critic's gradient reaches the tower
    state = make_policy(vision_tower="resnet", bypass_decoder=True, keypoints=4, instructed_keypoints=True,
                        proprio_dim=3, image_size=64, value_detach=False)
    images, tokens = make_inputs(state, batch=2)
    proprio = torch.randn(2, 3)
    out = state.evaluate(images, tokens, state.act(images, tokens, proprio=proprio)["action_tokens"], proprio=proprio)
    out["value"].sum().backward()
    assert state.state_mlp[0].weight.grad.abs().sum() > 0 and state.keypoint_query.weight.grad.abs().sum() > 0
    assert state.decoder.layers[0].self_attn.q_proj.weight.grad is None and not hasattr(state, "bypass_mlp")


def test_decoder_residual_starts_as_the_state_policy_and_then_trains_the_decoder():
    """decoder_residual: at init the logits and value are exactly those of the decoder-bypass state policy with the
    same weights (the decoder's output gain is zero); after one optimiser step the decoder's output counts and its
    layers get gradient. Needs keypoints or proprio, and excludes bypass_decoder."""
    sizes = dict(vision_tower="resnet", keypoints=4, instructed_keypoints=True, proprio_dim=3, image_size=64,
                 value_detach=False)
    policy = make_policy(decoder_residual=True, **sizes)
    randomise_action_head(policy)
    bypass = make_policy(bypass_decoder=True, **sizes)
    bypass.load_state_dict(policy.state_dict())
    images, tokens = make_inputs(policy, batch=2)
    proprio = torch.randn(2, 3)
    with torch.no_grad():
        logits, value = policy(images, tokens, proprio)
        bypass_logits, bypass_value = bypass(images, tokens, proprio)
    assert torch.allclose(logits, bypass_logits, atol=1e-6) and torch.allclose(value, bypass_value, atol=1e-6)
    assert torch.count_nonzero(policy.decoder.norm.weight) == 0
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-2)
    q = policy.decoder.layers[0].self_attn.q_proj.weight
    for step in range(2):
        optimiser.zero_grad()
        logits, value = policy(images, tokens, proprio)
        (logits.log_softmax(-1)[..., 0].mean() + value.square().mean()).backward()
        if step == 0:
            assert q.grad.abs().sum() == 0 and policy.decoder.norm.weight.grad.abs().sum() > 0
        optimiser.step()
    assert q.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(policy(images, tokens, proprio)[0], bypass(images, tokens, proprio)[0], atol=1e-4)
    with pytest.raises(ValueError, match="keypoints > 0 or proprio_dim > 0"):
        PolicyConfig(vision_tower="resnet", decoder_residual=True)
    with pytest.raises(ValueError, match="exclude each other"):
        PolicyConfig(decoder_residual=True, bypass_decoder=True, **sizes)


# -- keypoints and proprio ---------------------------------------------------------------------------------


def test_spatial_softmax_finds_the_peak():
    """A sharp peak at the top-right cell reads as (x, y) = (1, -1); a flat map reads as the centre (0, 0)."""
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 0, 7] = 10.0  # row 0 (top), column 7 (right)
    points = spatial_softmax(maps, torch.tensor(-3.0))  # temperature e^-3: the softmax is one-hot
    assert points.shape == (1, 4)
    x, y = points[0, :2], points[0, 2:]  # layout [x of every map, y of every map]
    assert torch.allclose(x, torch.tensor([1.0, 0.0]), atol=1e-4)
    assert torch.allclose(y, torch.tensor([-1.0, 0.0]), atol=1e-4)


def test_keypoints_and_proprio_reach_the_actions():
    """A policy with a keypoint readout and proprio: act and evaluate agree, the proprio and the keypoints
    change the logits, gradients reach both, a missing or misshaped proprio is a clear error, and save / load
    keeps it."""
    policy = make_policy(vision_tower="resnet", instruction_film=True, keypoints=4, proprio_dim=3, image_size=64)
    randomise_action_head(policy)
    images, tokens = make_inputs(policy, batch=2)
    proprio = torch.tensor([[0.1, -0.2, 0.3], [0.5, 0.5, -0.5]])
    with torch.no_grad():
        out = policy.act(images, tokens, proprio=proprio)
        again = policy.evaluate(images, tokens, out["action_tokens"], proprio=proprio)
        moved = policy(images, tokens, proprio + 1.0)[0]
    assert torch.allclose(out["logp"], again["logp"], atol=1e-5)
    assert not torch.allclose(moved, policy(images, tokens, proprio)[0].detach())
    evaluated = policy.evaluate(images, tokens, out["action_tokens"], proprio=proprio)
    evaluated["logp"].sum().backward()
    assert policy.keypoint_maps.weight.grad.abs().sum() > 0
    assert policy.state_mlp[0].weight.grad[:, 2 * 4: 2 * 4 + 3].abs().sum() > 0  # the proprio columns
    with pytest.raises(ValueError, match="proprio"):
        policy.act(images, tokens)
    with pytest.raises(ValueError, match=r"\(B=2, 3\)"):
        policy.act(images, tokens, proprio=proprio[:, :2])
    assert policy.proprio_dim == 3 and make_policy().proprio_dim == 0


def test_instructed_keypoints_follow_the_instruction_and_learn():
    """Instructed keypoints: the same image under two instructions gives different keypoints (the query is made
    from the instruction), gradients reach the query, and the stage option picks the map's resolution."""
    policy = make_policy(vision_tower="resnet", keypoints=4, instructed_keypoints=True, keypoint_stage=0,
                         image_size=64)
    images, _ = make_inputs(policy, batch=1)
    pixels = images.flatten(0, 1).permute(0, 3, 1, 2).float().expand(2, -1, -1, -1) / 255
    tokens = policy.tokenizer.encode(["pick up the red block", "pick up the blue triangle"], 32)
    seen = {}
    hook = policy.vision.encoder.stages[0].register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    features, keypoints = policy._resnet(pixels, tokens)
    hook.remove()
    assert seen["shape"][-2:] == (16, 16) and keypoints.shape == (2, 8)  # stride 4 at 64 px; (x, y) x 4
    assert not torch.allclose(keypoints[0], keypoints[1])
    keypoints.sum().backward()
    assert policy.keypoint_query.weight.grad.abs().sum() > 0 and not hasattr(policy, "keypoint_maps")


def test_keypoints_and_proprio_save_load(tmp_path):
    policy = make_policy(vision_tower="resnet", keypoints=2, proprio_dim=3, image_size=64)
    images, tokens = make_inputs(policy)
    proprio = torch.randn(2, 3)
    policy.save(str(tmp_path))
    torch.manual_seed(123)
    loaded = VLAPolicy.load(str(tmp_path)).eval()
    assert loaded.cfg == policy.cfg and loaded.proprio_dim == 3
    assert torch.equal(policy(images, tokens, proprio)[0], loaded(images, tokens, proprio)[0])


@pytest.mark.parametrize("overrides,match", [
    ({"keypoints": 4}, "resnet"),
    ({"vision_tower": "resnet", "keypoints": -1}, ">= 0"),
    ({"vision_tower": "resnet", "instructed_keypoints": True}, "keypoints > 0"),
    ({"vision_tower": "resnet", "keypoints": 4, "keypoint_stage": 4}, "stages 0-3"),
])
def test_keypoint_and_proprio_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**overrides)
