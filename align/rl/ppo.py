"""PPO for language models (InstructGPT step 3): masked statistics, KL penalty, GAE, clipped losses, KL controllers.
Imports only torch.

One rollout holds B responses of up to T tokens, all tensors `(B, T)` and aligned on response tokens:

- `logprobs`, `ref_logprobs`: log-probability of each sampled token under the policy / the frozen reference.
- `values`: the value model's estimate at each token; `rewards`: per-token reward (KL penalty, + score at the end).
- `advantages`, `returns`: GAE estimates and value targets.
- `mask` bool: True where a token counts (up to and including EOS); False on the right padding after it. Masked
  positions may hold anything (nan included): they are replaced before any arithmetic, so neither values nor
  gradients leak.

Schulman et al. 2017, PPO: https://arxiv.org/abs/1707.06347 ; Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences": https://arxiv.org/abs/1909.08593 ; Ouyang et al. 2022, InstructGPT, Eq. 2:
https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import math
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Masks and masked statistics


def response_mask(
    response_ids: torch.Tensor, eos_token_ids: int | list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): which tokens of each sampled response count, and which responses ended with EOS.

    Args:
        response_ids: `(B, T)` long, generated tokens (anything after the first EOS is padding).
        eos_token_ids: id(s) that end a response; None: no EOS, every token counts.
    Returns:
        mask `(B, T)` bool, True up to and including the first EOS; has_eos `(B,)` bool.
    """
    if eos_token_ids is None:
        return torch.ones_like(response_ids, dtype=torch.bool), torch.zeros(response_ids.shape[0], dtype=torch.bool)
    ids = torch.as_tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    is_eos = torch.isin(response_ids, ids.to(response_ids.device))
    # Number of EOS tokens strictly before each position: 0 means the position is at or before the first EOS.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0, is_eos.any(dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is True (all dims, or along `dim`).

    Args:
        x: `(B, T)` (any shape) float; mask: same shape, bool.
    Returns:
        scalar, or `x` reduced along `dim`. A row with no valid position along `dim` gives nan (0 / 0).
    """
    mask = mask.bool()
    total = x.masked_fill(~mask, 0.0).sum(dim=dim) if dim is not None else x.masked_fill(~mask, 0.0).sum()
    count = mask.sum(dim=dim) if dim is not None else mask.sum()
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the valid positions of `mask` (a scalar); `unbiased` applies Bessel's n / (n - 1).

    Raises ValueError when fewer than 1 (biased) or 2 (unbiased) positions are valid.
    """
    n = int(mask.bool().sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var over {n} valid position(s); unbiased={unbiased} needs at least {1 + unbiased}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`(x - mean) / std` over the valid positions only (padding does not shift the statistics); 0 where masked.

    `shift_mean=False` keeps the mean (scales only), as TRL does for rewards: their sign carries information.
    Args: x `(B, T)` float, mask `(B, T)` bool. Returns `(B, T)`.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and rewards

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    k1 = log p - log p_ref (unbiased, high variance, can be negative per token);
    k3 = (r - 1) - log r with r = p_ref / p (unbiased, always >= 0, lower variance). http://joschu.net/blog/kl-approx.html
    Args: logprobs, ref_logprobs `(B, T)`. Returns `(B, T)`.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` long: index of each row's last True in `mask` `(B, T)`. Raises ValueError for a row with none."""
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of mask has no valid token; every response needs at least one")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return positions.masked_fill(~mask, -1).amax(dim=1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """InstructGPT's reward as per-token rewards: -kl_coef * kl on each valid token, + the score on the last one.

    Args:
        scores: `(B,)` reward model score of each full response; kl: `(B, T)` per-token KL estimate (`kl_penalty`).
        mask: `(B, T)` bool. kl_coef: beta >= 0.
    Returns: `(B, T)`, 0 where masked. (Ouyang et al. 2022, Eq. 2; Ziegler et al. 2019, Sec. 2.2.)
    """
    mask = mask.bool()
    rewards = (-kl_coef * kl).masked_fill(~mask, 0.0)
    last = last_valid_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's valid tokens. https://arxiv.org/abs/1506.02438

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, returns = A + V. The episode ends at
    the last valid token: V and A beyond it are 0 (no bootstrap past EOS or the length limit, as in TRL).
    Args:
        rewards, values: `(B, T)` float. mask: `(B, T)` bool, valid tokens a prefix of each row (right padding);
            None = all valid. gamma: discount, lam: GAE lambda.
    Returns: (advantages, returns), both `(B, T)`, 0 where masked. No gradient flows (targets, not predictions).
    """
    with torch.no_grad():
        if mask is None:
            mask = torch.ones_like(rewards, dtype=torch.bool)
        mask = mask.bool()
        rewards = rewards.masked_fill(~mask, 0.0)
        values = values.masked_fill(~mask, 0.0)
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(rewards[:, 0])
        next_adv = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv = (delta + gamma * lam * next_adv).masked_fill(~mask[:, t], 0.0)
            advantages[:, t] = adv
            next_value, next_adv = values[:, t], adv
        returns = (advantages + values).masked_fill(~mask, 0.0)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, mean over valid tokens. https://arxiv.org/abs/1707.06347 Eq. 7

    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logprobs - old_logprobs).
    Args: logprobs (with grad), old_logprobs, advantages, mask: `(B, T)`; cliprange: eps.
    Returns: (loss, clipfrac = share of tokens where the clipped term is the larger, approx_kl = mean of
        0.5 * (logprobs - old_logprobs)^2, the k2 estimator TRL logs); the last two detached.
    """
    mask = mask.bool()
    # Zero the log-ratio before exp: exp(garbage) at a masked position could be inf, and inf * 0 is nan in backward.
    log_ratio = (logprobs - old_logprobs).masked_fill(~mask, 0.0)
    advantages = advantages.masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-eps).

    As in OpenAI baselines' PPO2 and TRL. Args: values (with grad), old_values, returns, mask: `(B, T)`.
    Returns: (loss, vf_clipfrac = share of tokens where the clipped error is the larger; detached).
    """
    mask = mask.bool()
    values = values.masked_fill(~mask, 0.0)
    old_values = old_values.masked_fill(~mask, 0.0)
    returns = returns.masked_fill(~mask, 0.0)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 = perfect value model, 0 = predicts the mean,
    < 0 = worse than the mean. nan when the returns do not vary. Args: `(B, T)`. Returns a scalar."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if float(var_returns) == 0.0:
        return torch.tensor(math.nan)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)  # >= 0: PPOConfig checks kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive beta that steers the measured KL toward `target` (Ziegler et al. 2019, Sec. 2.2,
    https://arxiv.org/abs/1909.08593): e = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + e * n_steps / horizon.

    `n_steps`: episodes (responses) in the update, so `horizon` is in episodes, as in the paper (10000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        # kl_coef >= 0, target > 0 and horizon > 0: PPOConfig checks them (align.config.VALUE_RULES)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
