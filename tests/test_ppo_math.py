"""align.rl.ppo: every function against hand-computed numbers, masked values never leak (hypothesis), controllers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalty,
    last_valid_index,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    response_mask,
    value_loss,
)
from align.trainers.ppo_config import PPOConfig

T, F = True, False
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Masks and statistics


def test_response_mask():
    # row 0: EOS (2) at index 1 -> tokens 0..1 count, the pad after it not (even a second EOS); row 1: no EOS
    mask, has_eos = response_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_token_ids=2)
    assert mask.tolist() == [[T, T, F, F], [T, T, T, T]]
    assert has_eos.tolist() == [T, F]
    # several EOS ids (e.g. Llama 3's <|eot_id|> and <|end_of_text|>): the first of either ends the response
    mask, has_eos = response_mask(torch.tensor([[5, 9, 2], [3, 3, 3]]), eos_token_ids=[2, 9])
    assert mask.tolist() == [[T, T, F], [T, T, T]]
    assert has_eos.tolist() == [T, F]


def test_last_valid_index():
    assert last_valid_index(torch.tensor([[T, T, F], [T, F, F], [T, T, T]])).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="no valid token"):
        last_valid_index(torch.tensor([[T, F], [F, F]]))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[T, T, F], [T, F, F]])
    # (1 + 2 + 4) / 3 = 7/3 ; rows: (1 + 2) / 2 = 1.5, 4 / 1 = 4
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7 / 3))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_var():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([T, T, T, F])
    # mean 2, squared deviations [1, 0, 1]: biased 2/3, unbiased 2/2 = 1
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2 / 3))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs at least 2"):
        masked_var(x, torch.tensor([T, F, F, F]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    mask = torch.tensor([[T, T, T, F]])
    # mean 2, unbiased var 1 -> (x - 2) / 1 = [-1, 0, 1]; masked position 0 (not nan)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False: (x - 2) / 1 + 2 = x
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    # std 2: x = [0, 2, 4] -> mean 2, unbiased var (4 + 0 + 4) / 2 = 4 -> [-1, 0, 1]
    torch.testing.assert_close(
        masked_whiten(torch.tensor([[0.0, 2.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool)),
        torch.tensor([[-1.0, 0.0, 1.0]]),
    )


# ---------------------------------------------------------------------------------------------------------------------
# KL and rewards


def test_kl_penalty():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    # log ratio = [1, -1, 0]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    # k3 = (e^-lr - 1) + lr: e^-1 - 1 + 1 = 0.3678794 ; e^1 - 1 - 1 = 0.7182818 ; 0
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([[0.3678794, 0.7182818, 0.0]]))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref, "k2")


def test_per_token_rewards():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.5, 1.0, 3.0], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[T, T, T], [T, T, F]])
    # -0.1 * kl on valid tokens; the score lands on the last valid one:
    # row 0: [-0.05, -0.1, -0.3 + 2 = 1.7] ; row 1: [-0.02, -0.04 - 1 = -1.04, 0 (masked: the 9.0 never counts)]
    expected = torch.tensor([[-0.05, -0.1, 1.7], [-0.02, -1.04, 0.0]])
    torch.testing.assert_close(per_token_rewards(scores, kl, mask, kl_coef=0.1), expected)


# ---------------------------------------------------------------------------------------------------------------------
# GAE


def test_gae_no_discount():
    # delta = [0 + .5 - .5, 1 - .5] = [0, .5]; A = [0 + .5, .5]
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))


def test_gae_discounted_with_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 0.5, 7.0]])
    mask = torch.tensor([[T, T, T, F]])
    # gamma = lam = .5; the episode ends at t=2 (V_3 bootstraps as 0, the masked 9 and 7 are ignored):
    # t=2: delta = 2 + .5*0 - .5 = 1.5                 A2 = 1.5
    # t=1: delta = 0 + .5*.5 - 1 = -.75                A1 = -.75 + .25*1.5 = -.375
    # t=0: delta = 1 + .5*1 - .5 = 1                   A0 = 1 + .25*(-.375) = .90625
    # returns = A + V = [1.40625, .625, 2.0, 0]
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.90625, -0.375, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.40625, 0.625, 2.0, 0.0]]))


def test_gae_lam_zero_is_td0():
    # lam = 0: A_t = delta_t = r_t + V_{t+1} - V_t = [0 + 2 - 1, 1 + 0 - 2] = [1, -1]
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]]), gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def test_policy_loss():
    old = torch.zeros(1, 4)
    # ratios [1.1, 1.5, 0.5] + a masked nan; eps = .2 -> clipped ratios [1.1, 1.2, 0.8]
    logprobs = torch.tensor([[math.log(1.1), math.log(1.5), math.log(0.5), NAN]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[T, T, T, F]])
    # per token max(-A r, -A clip(r)): [max(-1.1, -1.1), max(-1.5, -1.2), max(.5, .8)] = [-1.1, -1.2, .8]
    # loss = (-1.1 - 1.2 + .8) / 3 = -.5 ; clipped term larger on tokens 1, 2 -> clipfrac 2/3
    # approx_kl = .5 * mean(ln(1.1)^2, ln(1.5)^2, ln(.5)^2) = .5 * (.0090840 + .1644019 + .4804530) / 3 = .1089898
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.5))
    torch.testing.assert_close(clipfrac, torch.tensor(2 / 3))
    torch.testing.assert_close(approx_kl, torch.tensor(0.1089898))
    # gradient flows only through the unclipped token: d/dlp (-A e^lp) / 3 = -1.1 / 3; the masked nan gets 0, not nan
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.1 / 3, 0.0, 0.0, 0.0]]))


def test_value_loss():
    values = torch.tensor([[1.0, 2.0, 0.0, NAN]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[1.5, 1.0, 1.0, 3.0]])
    mask = torch.tensor([[T, T, T, F]])
    # V_clip = old + clip(V - old, +-.2) = [.7, .7, .3]
    # (V - R)^2 = [.25, 1, 1] ; (V_clip - R)^2 = [.64, .09, .49] ; max = [.64, 1, 1]
    # loss = .5 * 2.64 / 3 = .44 ; the clipped error is larger on token 0 only -> 1/3
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.44))
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -9.0]])
    mask = torch.tensor([[T, T, T, F]])
    # residual [0, 0, 1]: mean 1/3, var ((1/3)^2 * 2 + (2/3)^2) / 3 = 2/9 ; Var(returns) = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    torch.testing.assert_close(explained_variance(values, returns, mask), torch.tensor(2 / 3))
    assert math.isnan(explained_variance(values, torch.ones(1, 4), mask))  # constant returns: undefined


# ---------------------------------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = .5 clipped to .2; 64 episodes -> beta = .1 * (1 + .2 * 64 / 10000) = .100128
    assert ctl.update(9.0, n_steps=64) == pytest.approx(0.100128)
    # KL 6.6: error .1 (inside the clip) -> .100128 * (1 + .1 * 100 / 10000) = .100128 * 1.001 = .100228128
    assert ctl.update(6.6, n_steps=100) == pytest.approx(0.100228128)
    # KL 0: error -1 clipped to -.2 -> * (1 - .2 * 50 / 10000) = * .999
    assert ctl.update(0.0, n_steps=50) == pytest.approx(0.100228128 * 0.999)
    state = ctl.state_dict()
    fresh = AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    fresh.load_state_dict(state)
    assert (fresh.value, fresh.target, fresh.horizon) == (ctl.value, 6.0, 10000.0)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, n_steps=64) == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("kl_coef", -0.1, "kl_coef -0.1 is negative"),
        ("kl_target", 0.0, "kl_target 0.0 is too small"),
        ("kl_horizon", 0, "kl_horizon 0 is too small"),
    ],
)
def test_controller_settings_are_checked_by_the_config(tmp_path, key, value, message):
    # never silently clamped to 0: the config (the one place PPO's keys are validated) refuses them
    with pytest.raises(ValueError, match=message):
        PPOConfig(output_dir=str(tmp_path), **{key: value})


# ---------------------------------------------------------------------------------------------------------------------
# Invariant: what sits at masked positions changes nothing

B, L = 2, 4
finite = st.floats(-5, 5, allow_nan=False, width=32)
garbage = st.one_of(finite, st.just(NAN), st.just(float("inf")), st.just(-float("inf")))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(finite, min_size=5 * B * L, max_size=5 * B * L),
    junk=st.lists(garbage, min_size=5 * B * L, max_size=5 * B * L),
    lengths=st.lists(st.integers(1, L), min_size=B, max_size=B).filter(lambda ls: sum(ls) >= 2),
)
def test_masked_values_do_not_leak(data, junk, lengths):
    mask = torch.arange(L).expand(B, L) < torch.tensor(lengths)[:, None]  # right padding, as responses
    clean = torch.tensor(data).view(5, B, L)
    dirty = torch.where(mask, clean, torch.tensor(junk).view(5, B, L))

    def run(x):
        a, b, c, d, e = x
        adv, ret = gae(a, b, mask, gamma=0.9, lam=0.8)
        outs = [masked_mean(a, mask), masked_mean(a, mask, dim=1), masked_var(a, mask), adv, ret]
        outs += [masked_whiten(a, mask), per_token_rewards(e[:, 0], kl_penalty(a, b, "k3"), mask, 0.1)]
        outs += list(policy_loss(c, d, e, mask, 0.2)) + list(value_loss(c, d, e, mask, 0.2))
        return [o.masked_fill(~mask, 0.0) if o.shape == mask.shape else o for o in outs]

    for got, want in zip(run(dirty), run(clean), strict=True):
        torch.testing.assert_close(got, want, equal_nan=False)
