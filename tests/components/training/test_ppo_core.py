"""The PPO math of components/training/ppo_rollout.py on small hand-made tensors.

Each expectation is worked out in the test, in plain Python over lists, from the formula the function
claims (Ziegler et al. 2019; Schulman et al. 2016 and 2017), never by calling the code under test.
Padded positions hold large garbage values so that any leak of padding into a result shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from components.training.ppo_rollout import PPOSettings, gae, masked_whiten, next_kl_coef, ppo_losses, token_rewards

GARBAGE = 9.0  # what padded positions hold in every input below


def _gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The recursion A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, over one
    unpadded response, with V after the last token = 0 (a finished episode)."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


# ---------------------------------------------------------------- GAE

def test_gae_follows_the_recursion_with_a_zero_value_after_the_last_token_and_ignores_padding():
    rows = [  # (rewards, values) of the real tokens; the second row is padded to width 4
        ([0.1, -0.2, 0.0, 1.0], [0.3, 0.2, -0.4, 0.5]),
        ([0.5, 2.0], [0.4, -0.1]),
    ]
    width, gamma, lam = 4, 0.9, 0.8
    rewards = torch.tensor([r + [GARBAGE] * (width - len(r)) for r, _ in rows])
    values = torch.tensor([v + [GARBAGE] * (width - len(v)) for _, v in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])

    adv, ret = gae(rewards, values, mask, gamma, lam)

    for i, (r, v) in enumerate(rows):
        expected = _gae_by_hand(r, v, gamma, lam)
        n = len(r)
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx([a + b for a, b in zip(expected, v)], abs=1e-6)
        assert adv[i, n:].tolist() == [0.0] * (width - n)  # padding: zero advantage
    # The last real token of the padded row: delta = r - V, nothing bootstrapped from the 9s after it.
    assert float(adv[1, 1]) == pytest.approx(2.0 - (-0.1))
    # The full row's last token too: no value past the tensor's end.
    assert float(adv[0, 3]) == pytest.approx(1.0 - 0.5)


def test_gae_special_cases_lambda_one_is_the_return_minus_the_value_lambda_zero_the_td_error():
    r, v = [0.5, -1.0, 2.0], [0.2, 0.7, -0.3]
    rewards, values, mask = torch.tensor([r + [GARBAGE]]), torch.tensor([v + [GARBAGE]]), torch.tensor([[1, 1, 1, 0]])
    gamma = 0.5

    mc, _ = gae(rewards, values, mask, gamma, lam=1.0)
    discounted_returns = [sum(gamma ** k * r[t + k] for k in range(len(r) - t)) for t in range(len(r))]
    # 0.5 - 0.5 + 0.5, -1 + 1, 2
    assert discounted_returns == pytest.approx([0.5, 0.0, 2.0])
    assert mc[0, :3].tolist() == pytest.approx([g - vt for g, vt in zip(discounted_returns, v)], abs=1e-6)

    td, _ = gae(rewards, values, mask, gamma, lam=0.0)
    assert td[0, :3].tolist() == pytest.approx([0.5 + 0.5 * 0.7 - 0.2, -1.0 + 0.5 * -0.3 - 0.7, 2.0 + 0.0 - -0.3],
                                               abs=1e-6)


# ---------------------------------------------------------------- whitening

def test_whitening_uses_the_masked_positions_only_and_does_not_add_the_mean_back():
    x = torch.tensor([[1.0, 2.0, 3.0, GARBAGE], [5.0, GARBAGE, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    real = [1.0, 2.0, 3.0, 5.0]
    mean = sum(real) / len(real)  # 2.75
    var = sum((a - mean) ** 2 for a in real) / len(real)  # population variance: 2.1875
    assert (mean, var) == pytest.approx((2.75, 2.1875))

    out = masked_whiten(x, mask)

    expected = [(a - mean) / math.sqrt(var + 1e-8) for a in real]
    assert out[mask.bool()].tolist() == pytest.approx(expected, abs=1e-6)
    assert out[~mask.bool()].tolist() == [0.0] * 4
    # Mean 0 (not shifted back to 2.75) and variance 1 over the real positions.
    assert float(out[mask.bool()].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(out[mask.bool()].var(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # Bessel's correction would have given other numbers: the test tells the two apart.
    unbiased = sum((a - mean) ** 2 for a in real) / (len(real) - 1)
    assert out[0, 0].item() != pytest.approx((1.0 - mean) / math.sqrt(unbiased), abs=1e-3)


# ---------------------------------------------------------------- clipped policy loss

def _settings(**overrides) -> PPOSettings:
    return PPOSettings(**{"cliprange": 0.2, "cliprange_value": 0.2, **overrides})


def test_policy_loss_is_the_pessimistic_min_of_clipped_and_unclipped_objectives():
    eps = 0.2
    # (advantage, ratio): every combination of sign and side of the clip range, then one inside it.
    tokens = [(1.0, 1.5), (-1.0, 0.5), (2.0, 0.5), (-1.0, 1.5), (0.5, 1.1)]
    old_lp = [-1.0, -2.0, -0.5, -1.5, -0.7]
    new_lp = [o + math.log(ratio) for o, (_, ratio) in zip(old_lp, tokens)]
    pad = 1  # one padded position with garbage in every input
    advantages = torch.tensor([[a for a, _ in tokens] + [GARBAGE] * pad])
    old = torch.tensor([old_lp + [GARBAGE] * pad])
    new = torch.tensor([new_lp + [-GARBAGE] * pad], requires_grad=True)
    mask = torch.tensor([[1] * len(tokens) + [0] * pad])
    zeros = torch.zeros_like(old)

    policy_loss, _, stats = ppo_losses(new, zeros, old, zeros, advantages, zeros, mask, _settings(cliprange=eps))

    def clipped(ratio):
        return min(max(ratio, 1 - eps), 1 + eps)

    objective = [min(a * ratio, a * clipped(ratio)) for a, ratio in tokens]  # PPO's L^CLIP per token
    assert objective == pytest.approx([1.2, -0.8, 1.0, -1.5, 0.55])
    assert policy_loss.item() == pytest.approx(-sum(objective) / len(tokens), abs=1e-6)
    optimistic = [max(a * ratio, a * clipped(ratio)) for a, ratio in tokens]  # min and max swapped
    assert policy_loss.item() != pytest.approx(-sum(optimistic) / len(tokens), abs=1e-3)
    # Clipping is active (the clipped term is the smaller objective) on the first two tokens.
    assert stats["clip_fraction"] == pytest.approx(2 / 5)

    # Gradient: none where the clipped term was taken outside the range; -A * ratio / n elsewhere.
    policy_loss.backward()
    expected_grad = [0.0 if a * clipped(ratio) < a * ratio else -a * ratio / len(tokens) for a, ratio in tokens]
    assert new.grad[0, : len(tokens)].tolist() == pytest.approx(expected_grad, abs=1e-6)
    assert float(new.grad[0, len(tokens):].abs().sum()) == 0.0


# ---------------------------------------------------------------- clipped value loss

def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_squared_errors():
    clip = 0.2
    # (old value, new value, return)
    tokens = [
        (0.0, 1.0, 1.0),  # new value is right but moved past the clip: the clipped error (0.8^2) counts
        (0.0, -1.0, 1.0),  # moved the wrong way past the clip: the unclipped error (2^2) is larger
        (0.0, 0.1, 0.5),  # inside the clip range: both errors are the same
        (0.5, 0.0, 0.0),  # moved toward the return past the clip: clipped 0.3^2
    ]
    pad = 2
    old_v = torch.tensor([[o for o, _, _ in tokens] + [GARBAGE] * pad])
    new_v = torch.tensor([[n for _, n, _ in tokens] + [-GARBAGE] * pad], requires_grad=True)
    returns = torch.tensor([[r for _, _, r in tokens] + [GARBAGE] * pad])
    mask = torch.tensor([[1] * len(tokens) + [0] * pad])
    lp = torch.zeros_like(old_v)

    _, value_loss, stats = ppo_losses(lp, new_v, lp, old_v, lp, returns, mask, _settings(cliprange_value=clip))

    def clipped(o, n):
        return o + min(max(n - o, -clip), clip)

    squared = [max((n - r) ** 2, (clipped(o, n) - r) ** 2) for o, n, r in tokens]
    assert squared == pytest.approx([0.64, 4.0, 0.16, 0.09])
    assert value_loss.item() == pytest.approx(0.5 * sum(squared) / len(tokens), abs=1e-6)
    unclipped_only = [(n - r) ** 2 for _, n, r in tokens]
    smaller = [min((n - r) ** 2, (clipped(o, n) - r) ** 2) for o, n, r in tokens]
    assert value_loss.item() != pytest.approx(0.5 * sum(unclipped_only) / len(tokens), abs=1e-3)
    assert value_loss.item() != pytest.approx(0.5 * sum(smaller) / len(tokens), abs=1e-3)
    assert stats["value_clip_fraction"] == pytest.approx(2 / 4)

    # Where the clipped error is taken, the new value gets no gradient (the clipped prediction is constant).
    value_loss.backward()
    expected_grad = [0.0 if (clipped(o, n) - r) ** 2 > (n - r) ** 2 else (n - r) / len(tokens) for o, n, r in tokens]
    assert new_v.grad[0, : len(tokens)].tolist() == pytest.approx(expected_grad, abs=1e-6)
    assert float(new_v.grad[0, len(tokens):].abs().sum()) == 0.0


# ---------------------------------------------------------------- per-token KL reward

def test_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_answer_token():
    kl_coef = 0.1
    rows = [  # (policy logprobs, reference logprobs, score) of the real tokens; padded to width 4
        ([-1.0, -0.5, -2.0, -0.1], [-1.5, -0.5, -1.0, -0.3], 3.0),
        ([-0.2, -0.9], [-0.4, -0.6], -2.0),
        ([-1.2], [-1.0], 0.5),
    ]
    width = 4

    def padded(key, fill):
        return torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows])

    mask = torch.tensor([[1] * len(row[0]) + [0] * (width - len(row[0])) for row in rows])
    scores = torch.tensor([row[2] for row in rows])

    rewards, kl = token_rewards(scores, padded(0, -GARBAGE), padded(1, -2 * GARBAGE), mask, kl_coef)

    for i, (lp, ref, score) in enumerate(rows):
        n = len(lp)
        per_token_kl = [a - b for a, b in zip(lp, ref)]
        expected = [-kl_coef * k for k in per_token_kl]
        expected[-1] += score  # the score lands on the last answer token
        assert kl[i].tolist() == pytest.approx(per_token_kl + [0.0] * (width - n), abs=1e-6)
        assert rewards[i, :n].tolist() == pytest.approx(expected, abs=1e-6)
        assert rewards[i, n:].tolist() == [0.0] * (width - n)  # nothing on the padding after it
    assert float(rewards[1, 1]) == pytest.approx(-0.1 * (-0.9 - -0.6) - 2.0)  # a KL below 0 adds to the reward


# ---------------------------------------------------------------- adaptive KL controller

@pytest.mark.parametrize(("kl", "error"), [
    (5.5, 0.1),  # above target, inside the clip: e = kl / target - 1
    (20.0, 0.2),  # far above: clipped at +0.2
    (4.5, -0.1),  # below target, inside the clip
    (0.5, -0.2),  # far below: clipped at -0.2
    (5.0, 0.0),  # at target: unchanged
])
def test_adaptive_kl_is_zieglers_proportional_controller_with_a_clipped_error(kl, error):
    target, horizon, n, coef = 5.0, 1000, 50, 0.2
    settings = PPOSettings(adaptive_kl=True, target_kl=target, kl_horizon=horizon)
    assert min(max(kl / target - 1, -0.2), 0.2) == pytest.approx(error)  # the table above, by hand
    expected = coef * (1 + error * n / horizon)  # beta <- beta (1 + K_beta e), K_beta = n / horizon
    assert next_kl_coef(coef, kl, n, settings) == pytest.approx(expected, rel=1e-12)
    assert (next_kl_coef(coef, kl, n, settings) > coef) == (kl > target)


def test_fixed_kl_coefficient_does_not_move():
    assert next_kl_coef(0.2, 50.0, 50, PPOSettings(adaptive_kl=False, target_kl=5.0)) == 0.2


# ---------------------------------------------------------------- the missing-EOS penalty

@pytest.mark.parametrize("penalty", [None, 0.5])
def test_missing_eos_penalty_lowers_only_the_score_of_a_response_cut_without_its_stop_token(penalty):
    """run_ppo's scoring (ppo._score) on two responses: the first ends with a stop token, the second ran to
    max_new_tokens without one. Only the second loses the penalty; None changes nothing."""
    from types import SimpleNamespace

    from components.training import ppo
    from components.training.ppo_rollout import Rollout

    eos, pad = 2, 0
    response = torch.tensor([[5, eos, pad], [6, 7, 8]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ro = Rollout(query=torch.tensor([[3], [4]]), query_mask=torch.ones(2, 1, dtype=torch.long), response=response,
                 response_mask=mask, logprobs=torch.zeros(2, 3), ref_logprobs=torch.zeros(2, 3),
                 values=torch.zeros(2, 3), entropy=0.0, generate_seconds=0.0)
    run = SimpleNamespace(reward=None, device=torch.device("cpu"), eos_ids={eos})
    tokenizer = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [" ".join(map(str, i)) for i in ids])
    seen = {}

    def reward_fn(prompts, completions, completion_ids, **_):
        seen["ids"] = completion_ids
        return [1.0, 1.0]

    settings = PPOSettings(max_new_tokens=3, missing_eos_penalty=penalty)
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    scores, parts = ppo._score(run, tokenizer, rows, ro, settings, reward_fn, (1.0, 2.0))
    assert seen["ids"] == [[5, eos], [6, 7, 8]]
    assert scores.tolist() == [2.0, 2.0 - (penalty or 0.0)]
    assert parts["unfinished_fraction"] == 0.5 and parts["score_fn_mean"] == 1.0
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        PPOSettings(missing_eos_penalty=-1.0)
