"""The maths of the learner against direct reference implementations (float64, plain loops)."""

import math

import numpy as np
import pytest
import torch

from accerl import (AlgorithmArgs, compute_gae, effective_tokens, gipo_trust_weight, hindsight_copies, lr_lambda,
                    policy_objective)


def reference_gae(rewards, values, bootstrap, terminated, truncated, trunc_values, gamma, lam):
    """Textbook GAE, one env at a time, written as a plain loop over Python floats."""
    N, T = len(rewards), len(rewards[0])
    adv = np.zeros((N, T))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            if terminated[n][t]:
                next_v = 0.0
            elif truncated[n][t]:
                next_v = trunc_values[n][t]
            elif t == T - 1:
                next_v = bootstrap[n]
            else:
                next_v = values[n][t + 1]
            delta = rewards[n][t] + gamma * next_v - values[n][t]
            episode_continues = not (terminated[n][t] or truncated[n][t])
            running = delta + gamma * lam * (running if episode_continues else 0.0)
            adv[n, t] = running
    return adv


def test_gae_matches_reference_loop_with_terminations_and_truncations_inside_segments():
    g = torch.Generator().manual_seed(0)
    N, T = 5, 16
    rewards = torch.rand(N, T, generator=g)
    values = torch.randn(N, T, generator=g)
    bootstrap = torch.randn(N, generator=g)
    trunc_values = torch.randn(N, T, generator=g)
    terminated = torch.zeros(N, T, dtype=torch.bool)
    truncated = torch.zeros(N, T, dtype=torch.bool)
    terminated[0, 3] = terminated[1, 15] = terminated[2, 7] = True  # mid-segment and last step
    truncated[0, 10] = truncated[2, 0] = truncated[3, 15] = truncated[4, 5] = True
    terminated[4, 6] = True  # a one-step episode right after a truncation
    adv, ret = compute_gae(rewards, values, bootstrap, terminated, truncated, trunc_values, 0.97, 0.9)
    ref = reference_gae(rewards.double().tolist(), values.double().tolist(), bootstrap.double().tolist(),
                        terminated.tolist(), truncated.tolist(), trunc_values.double().tolist(), 0.97, 0.9)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), ref + values.numpy(), rtol=1e-5, atol=1e-5)


def test_gae_does_not_leak_across_episode_boundaries():
    # a huge reward after a reset must not change the advantage of the steps before the reset
    T = 6
    values = torch.zeros(1, T)
    rewards = torch.zeros(1, T)
    rewards[0, 4] = 1000.0
    for flag in ("terminated", "truncated"):
        term = torch.zeros(1, T, dtype=torch.bool)
        trunc = torch.zeros(1, T, dtype=torch.bool)
        (term if flag == "terminated" else trunc)[0, 2] = True
        adv, _ = compute_gae(rewards, values, torch.zeros(1), term, trunc, torch.zeros(1, T), 0.99, 0.95)
        assert torch.all(adv[0, :3] == 0), flag
        assert adv[0, 3] > 0


def _reference_gipo(logp, old_logp, adv, sigma):
    """-mean(w * rho * A) with w = exp(-(ln rho)^2 / (2 sigma^2)) on the detached ratio, in float64."""
    logp = logp.detach().double().requires_grad_(True)
    rho = torch.exp(logp - old_logp.double())
    ln_rho_sg = torch.log(torch.clamp(rho.detach(), min=1e-9))
    w = torch.exp(-(ln_rho_sg ** 2) / (2 * sigma ** 2))
    loss = -(w * rho * adv.double()).mean()
    loss.backward()
    return loss.item(), logp.grad


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0, 2.0])
def test_gipo_loss_and_gradient_equal_float64_formula(sigma):
    g = torch.Generator().manual_seed(1)
    B, K = 32, 56
    old_logp = -torch.rand(B, K, generator=g) * 6
    logp = (old_logp + torch.randn(B, K, generator=g) * 0.8).requires_grad_(True)
    adv = torch.randn(B, 1, generator=g).expand(B, K)  # a chunk's advantage shared by its tokens
    algo = AlgorithmArgs(gipo_sigma=sigma)
    per_token, diag = policy_objective("gipo", logp, old_logp, adv, algo)
    loss = per_token.mean()
    loss.backward()
    ref_loss, ref_grad = _reference_gipo(logp, old_logp, adv, sigma)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logp.grad.double(), ref_grad, rtol=1e-4, atol=1e-8)
    # gradient = w * rho * A * grad log pi / (B K): check it element-wise against the closed form
    rho = torch.exp(logp.detach().double() - old_logp.double())
    w = torch.exp(-torch.log(rho) ** 2 / (2 * sigma ** 2))
    torch.testing.assert_close(logp.grad.double(), -(w * rho * adv.double()) / (B * K), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(diag["w"].double(), w, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0, 2.0])
def test_gipo_effective_weight_never_exceeds_its_bound(sigma):
    # u = w * rho peaks at rho = exp(sigma^2) with value exp(sigma^2 / 2): GIPO's implicit trust region
    log_ratio = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    ratio = torch.exp(log_ratio)
    u = gipo_trust_weight(ratio, sigma) * ratio
    bound = math.exp(sigma ** 2 / 2)
    assert u.max().item() <= bound * (1 + 1e-12)
    assert u.max().item() == pytest.approx(bound, rel=1e-6)
    assert log_ratio[u.argmax()].item() == pytest.approx(sigma ** 2, abs=1e-3)


@pytest.mark.parametrize("loss", ["gipo", "ppo-clip", "sapo", "no-clip"])
def test_objectives_stay_finite_for_extreme_log_ratios(loss):
    """A token the behaviour policy almost never took, now likely (ln rho = 200), or the reverse: float32
    exp would give inf and GIPO's w * rho = 0 * inf = NaN without the clamp; loss and gradient stay finite."""
    logp = torch.tensor([-0.01, -200.0, -0.5], requires_grad=True)
    behaviour_logp = torch.tensor([-200.01, -0.01, -0.5])
    per_token, diag = policy_objective(loss, logp, behaviour_logp, torch.tensor([1.0, -1.0, 0.5]), AlgorithmArgs())
    per_token.mean().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(logp.grad).all(), (per_token, logp.grad)
    assert torch.isfinite(diag["ratio"]).all()
    if loss == "gipo":  # far outside the trust region: no gradient; at rho = 1: the plain policy gradient
        assert logp.grad[0] == 0 and logp.grad[1] == 0 and logp.grad[2] != 0


def test_trust_weight_clamps_tiny_ratios():
    w = gipo_trust_weight(torch.tensor([0.0, 1e-30, 1.0]), 0.5)
    assert torch.isfinite(w).all() and w[2] == 1.0 and w[0] == w[1]


def test_ppo_clip_sapo_and_no_clip_match_their_formulas():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(64, 7, generator=g) * 5
    new = old + torch.randn(64, 7, generator=g) * 0.5
    adv = torch.randn(64, 1, generator=g).expand(64, 7)
    rho = torch.exp(new - old)
    algo = AlgorithmArgs(clip_eps=0.2, sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    ppo, _ = policy_objective("ppo-clip", new, old, adv, algo)
    torch.testing.assert_close(ppo, -torch.minimum(rho * adv, rho.clamp(0.8, 1.2) * adv))
    noclip, _ = policy_objective("no-clip", new, old, adv, algo)
    torch.testing.assert_close(noclip, -rho * adv)
    sapo, _ = policy_objective("sapo", new, old, adv, algo)
    tau = torch.where(adv > 0, 1.0, 2.0)
    torch.testing.assert_close(sapo, -(4 / tau) * torch.sigmoid(tau * (rho - 1)) * adv)
    # at rho = 1 every objective has the plain policy-gradient slope A * grad log pi
    for kind in ("gipo", "ppo-clip", "sapo", "no-clip"):
        logp = old.clone().requires_grad_(True)
        policy_objective(kind, logp, old, adv, algo)[0].sum().backward()
        torch.testing.assert_close(logp.grad, -adv, msg=kind)


def test_learning_rate_schedule_warms_up_then_decays_to_floor():
    algo = AlgorithmArgs(warmup_updates=10, lr_decay_updates=100, min_lr_ratio=0.1)
    f = lr_lambda(algo)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(10_000) == pytest.approx(0.1)
    delayed = lr_lambda(algo, delay=5)  # the policy group with --critic-warmup-updates 5
    assert [delayed(u) for u in range(5)] == [0.0] * 5
    assert [delayed(u + 5) for u in (0, 9, 60, 110)] == [pytest.approx(f(u)) for u in (0, 9, 60, 110)]


def test_effective_tokens_keep_executed_steps_of_used_dims():
    active = torch.tensor([True, True, False, False, False, False, True])
    mask = effective_tokens(torch.tensor([8, 3, 0]), 8, active)
    assert mask.shape == (3, 8, 7)
    assert mask[0].sum() == 8 * 3 and mask[1].sum() == 3 * 3  # 3 of 8 steps ran before the episode ended
    assert not mask[1, 3:].any() and mask[1, :3][:, [0, 1, 6]].all() and not mask[:, :, 2:6].any()
    assert mask[2].sum() == 8 * 3  # no step count recorded: every step kept


def test_hindsight_copies_relabel_only_episodes_that_met_another_tasks_goal():
    N, T, L = 3, 6, 4
    instructions = torch.arange(4 * L).view(4, L) + 100  # task j's tokens: 100 + 4j ...
    batch = {"task_id": torch.ones(N, T, dtype=torch.long), "achieved_task": torch.full((N, T), -1),
             "terminated": torch.zeros(N, T, dtype=torch.bool), "truncated": torch.zeros(N, T, dtype=torch.bool),
             "reward": torch.zeros(N, T), "mask": torch.ones(N, T, dtype=torch.bool),
             "instruction": instructions[1].expand(N, T, L).clone(), "logp": torch.randn(N, T, 8, 7),
             "bootstrap_value": torch.zeros(N)}
    # segment 0: rows 0-1 end an episode truncated, rows 2-4 an episode that grasped task 3's object, row 5 goes on
    batch["truncated"][0, 1] = True
    batch["terminated"][0, 4], batch["achieved_task"][0, 4] = True, 3
    # segment 1: a success (achieved == own task): nothing to relabel; segment 2: a wrong grasp of 0 at row 0
    batch["terminated"][1, 2], batch["achieved_task"][1, 2], batch["reward"][1, 2] = True, 1, 1.0
    batch["terminated"][2, 0], batch["achieved_task"][2, 0] = True, 0
    batch["mask"][2, 0] = False  # a dropped row stays dropped in its copy
    copies = hindsight_copies(batch, instructions)
    assert copies["reward"].shape == (2, T) and "bootstrap_value" not in copies  # segments 0 and 2 only
    assert copies["mask"].tolist() == [[False, False, True, True, True, False], [False] * T]
    assert torch.equal(copies["instruction"][0, 2:5], instructions[3].expand(3, L))
    assert torch.equal(copies["instruction"][0, [0, 1, 5]], instructions[1].expand(3, L))
    assert copies["task_id"][0].tolist() == [1, 1, 3, 3, 3, 1] and copies["task_id"][1, 0] == 0
    assert copies["reward"][0].tolist() == [0, 0, 0, 0, 1, 0] and copies["reward"][1, 0] == 1.0
    assert torch.equal(copies["logp"], batch["logp"][[0, 2]])  # what the behaviour policy did, kept
    assert batch["reward"][0, 4] == 0 and torch.equal(batch["instruction"][0, 3], instructions[1])  # not in place
    batch["achieved_task"][0, 4] = batch["achieved_task"][2, 0] = -1
    assert hindsight_copies(batch, instructions) is None
