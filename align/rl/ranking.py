"""Reward-model losses and metrics for K-way rankings (InstructGPT step 2). Imports only torch.

A batch holds G comparison groups (one prompt each) of up to K responses:

- `rewards` `(G, K)` float: the reward model's score of each response. Values at padded positions are ignored
  (they may be nan: they are replaced by 0 before any arithmetic, so neither values nor gradients leak).
- `ranks` `(G, K)` long: the labeler's rank of each response, lower = better, equal = tie, negative = padding
  (response absent; the collator pads with -1, Trainer's evaluation loop pads with -100).

A pair (w, l) of a group counts when both responses are present and rank_w < rank_l (w strictly better); tied
responses form no pair. Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
Sec. 3.5 / Eq. 1: https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Pairs


def valid_mask(ranks: torch.Tensor) -> torch.Tensor:
    """`(G, K)` bool: True where a response is present (rank >= 0)."""
    return ranks >= 0


def pair_mask(ranks: torch.Tensor) -> torch.Tensor:
    """`(G, K, K)` bool: `[g, w, l]` is True when responses w and l are present and w is strictly better than l.

    Each group with K strictly ordered responses has C(K, 2) True entries; ties and padding add none.
    """
    valid = valid_mask(ranks)
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # [g, w, l]: rank_w < rank_l
    return better & valid.unsqueeze(2) & valid.unsqueeze(1)


def has_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """`(G,)` bool: groups with at least one non-tied pair (the groups a loss can learn from)."""
    return pair_mask(ranks).flatten(1).any(dim=1)


def _safe(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    # masked_fill has zero gradient at the filled positions, so nan/inf rewards of absent responses reach neither
    # the loss nor the gradients of present ones (a plain `where` after the subtraction would leak nan * 0 = nan).
    return rewards.masked_fill(~valid_mask(ranks), 0.0)


def _reduce(per_group: torch.Tensor, ranks: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_group
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}; use 'mean' or 'none'.")
    counted = has_pairs(ranks)
    # A batch with no pair at all (only possible with hand-built tensors: the data loader rejects all-tied groups)
    # gives 0 with a gradient graph, so a training step stays well defined.
    return per_group.sum() / counted.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def ranking_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    margin: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """InstructGPT's pairwise ranking loss: per group, mean over its pairs of -log sigmoid(r_w - r_l - margin).

    loss = -1 / C(K, 2) * E_group[ sum_{(w, l) in group} log sigmoid(r_w - r_l - margin) ]   (Ouyang et al., Eq. 1)

    Why per-group mean, then mean over groups: InstructGPT trains "on all C(K, 2) comparisons from each prompt as a
    single batch element"; shuffling the pairs as independent examples made the reward model overfit, because the
    pairs of one prompt are strongly correlated. Each group therefore weighs the same whatever its K, and its pairs are
    normalized by their count (C(K, 2) without ties; fewer with ties). For K = 2 this is exactly TRL's RewardTrainer
    loss -log sigmoid(r_chosen - r_rejected - margin). `margin` follows TRL (Llama 2, Touvron et al. 2023, Eq. 2:
    https://arxiv.org/abs/2307.09288): the winner must lead by at least about `margin`.

    Args:
        rewards: `(G, K)` scores; padded positions ignored.
        ranks: `(G, K)` long, lower = better, equal = tie, negative = padding.
        margin: `(G,)` or None; applied to every pair of the group.
        reduction: "mean" (scalar: mean over groups that have a pair) or "none" (`(G,)`, 0 for pairless groups).
    """
    r = _safe(rewards, ranks)
    pairs = pair_mask(ranks)  # (G, K, K)
    diff = r.unsqueeze(2) - r.unsqueeze(1)  # [g, w, l] = r_w - r_l
    if margin is not None:
        diff = diff - margin.to(diff.dtype).view(-1, 1, 1)
    nll = -F.logsigmoid(diff) * pairs
    n_pairs = pairs.flatten(1).sum(dim=1)
    per_group = nll.flatten(1).sum(dim=1) / n_pairs.clamp(min=1)
    return _reduce(per_group, ranks, reduction)


def plackett_luce_loss(rewards: torch.Tensor, ranks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Listwise negative log-likelihood of each group's ranking under Plackett-Luce, averaged over groups.

    P(ranking) = prod_i exp(r_i) / sum_{j ranked at or below i} exp(r_j)   (Plackett 1975; Luce 1959; used for reward
    models by Zhu et al. 2023, https://arxiv.org/abs/2301.11270, Sec. 4)

    Ties use Breslow's approximation (Breslow 1974, the standard for tied event times in the Cox model, whose partial
    likelihood has this same form): every member of a tied block is drawn against the same set, i.e. all responses
    not ranked above the block, the block included. Without ties this is the exact Plackett-Luce likelihood; for K = 2
    it equals -log sigmoid(r_w - r_l). The sum over a group's positions is not divided by K (a likelihood, unlike
    `ranking_loss`); groups are averaged like `ranking_loss`, and an all-tied group (no pair) contributes nothing.

    Args:
        rewards: `(G, K)` scores; padded positions ignored.
        ranks: `(G, K)` long, lower = better, equal = tie, negative = padding.
        reduction: "mean" (scalar over groups that have a pair) or "none" (`(G,)`, 0 for pairless groups).
    """
    valid = valid_mask(ranks)
    r = _safe(rewards, ranks)
    # risk[g, i, j]: j is still "in the urn" when i is drawn (present and not ranked above i).
    risk = (ranks.unsqueeze(1) >= ranks.unsqueeze(2)) & valid.unsqueeze(1)
    denom = torch.logsumexp(r.unsqueeze(1).masked_fill(~risk, float("-inf")), dim=2)  # (G, K)
    # Absent responses have an empty risk set (logsumexp = -inf); zero them before the subtraction.
    nll = (denom.masked_fill(~valid, 0.0) - r) * valid
    per_group = nll.sum(dim=1) * has_pairs(ranks)
    return _reduce(per_group, ranks, reduction)


def pairwise_center_penalty(rewards: torch.Tensor, ranks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per group, mean over its pairs of (r_w + r_l)^2: TRL's `center_rewards_coefficient` term generalized to K.

    Eisenstein et al. 2023, Eq. 2 (https://arxiv.org/abs/2312.09244) pushes rewards toward mean zero; for K = 2 this
    equals TRL's `mean((r_chosen + r_rejected) ** 2)`. Args as `ranking_loss`.
    """
    r = _safe(rewards, ranks)
    pairs = pair_mask(ranks)
    total = (r.unsqueeze(2) + r.unsqueeze(1)) ** 2 * pairs
    per_group = total.flatten(1).sum(dim=1) / pairs.flatten(1).sum(dim=1).clamp(min=1)
    return _reduce(per_group, ranks, reduction)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (no gradients; all return a 0-dim float tensor, nan when no group/pair qualifies)


@torch.no_grad()
def pair_accuracy(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Fraction of all non-tied pairs (pooled over groups) whose rewards agree with the ranking; reward ties count 0.5.

    Args: rewards `(G, K)`, ranks `(G, K)` (see module docstring). For K = 2 this is TRL's `accuracy` (except that
    TRL counts a reward tie as wrong).
    """
    r = _safe(rewards, ranks).float()
    pairs = pair_mask(ranks)
    diff = r.unsqueeze(2) - r.unsqueeze(1)
    score = (diff > 0).float() + 0.5 * (diff == 0).float()
    return score[pairs].mean()


@torch.no_grad()
def top1_accuracy(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per group: is the highest-reward response among the best-ranked ones? Mean over groups that have a pair.

    When several responses share the highest reward, the group scores the fraction of them that are best-ranked
    (a constant reward model thus scores (#best / K), not an accidental 1 from argmax picking index 0).
    Args: rewards `(G, K)`, ranks `(G, K)`.
    """
    valid = valid_mask(ranks)
    r = rewards.float().masked_fill(~valid, float("-inf"))
    top = (r == r.max(dim=1, keepdim=True).values) & valid
    best_rank = ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max).min(dim=1, keepdim=True).values
    best = (ranks == best_rank) & valid
    per_group = (top & best).sum(dim=1).float() / top.sum(dim=1).clamp(min=1)
    return per_group[has_pairs(ranks)].mean()


@torch.no_grad()
def kendall_tau(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between rewards and the ranking, per group, averaged over groups that have a pair.

    tau_b = (concordant - discordant) / sqrt((n0 - ties_in_ranks) * (n0 - ties_in_rewards)), n0 = n(n-1)/2 over the
    group's n present responses (Kendall 1945; scipy.stats.kendalltau's default variant). A group whose rewards are
    all equal predicts no order and scores 0 (scipy would return nan and poison the mean).
    Args: rewards `(G, K)`, ranks `(G, K)`.
    """
    valid = valid_mask(ranks)
    r = _safe(rewards, ranks).float()
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    both = both & torch.ones_like(both[0]).triu(diagonal=1)  # unordered pairs i < j
    # Lower rank = better, higher reward = better: a pair is concordant when the signs agree after flipping one.
    s_rank = torch.sign(ranks.unsqueeze(1) - ranks.unsqueeze(2)).float()  # [g, i, j] = sign(rank_j - rank_i)
    s_reward = torch.sign(r.unsqueeze(2) - r.unsqueeze(1))  # sign(r_i - r_j)
    num = (s_rank * s_reward * both).flatten(1).sum(dim=1)
    untied_rank = ((s_rank != 0) & both).flatten(1).sum(dim=1).float()
    untied_reward = ((s_reward != 0) & both).flatten(1).sum(dim=1).float()
    denom = torch.sqrt(untied_rank * untied_reward)
    tau = torch.where(denom > 0, num / denom.clamp(min=1e-12), torch.zeros_like(num))
    return tau[has_pairs(ranks)].mean()
