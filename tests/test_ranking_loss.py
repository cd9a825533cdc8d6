"""align.rl.ranking: hand-computed losses and metrics, invariants (hypothesis), rankings -> ranks validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from align.data.rankings import ranking_to_ranks
from align.errors import AlignError
from align.rl.ranking import (
    has_pairs,
    kendall_tau,
    pair_accuracy,
    pair_mask,
    pairwise_center_penalty,
    plackett_luce_loss,
    ranking_loss,
    top1_accuracy,
)


def softplus(x: float) -> float:
    """-log sigmoid(d) = log(1 + exp(-d)) = softplus(-d); plain math, independent of torch."""
    return math.log1p(math.exp(x))


# -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(2) = 0.1269280, -log sigmoid(-1) = 1.3132617
NLS1, NLS2, NLS_M1 = 0.3132617, 0.1269280, 1.3132617


def test_constants():
    assert softplus(-1) == pytest.approx(NLS1, abs=1e-7)
    assert softplus(-2) == pytest.approx(NLS2, abs=1e-7)
    assert softplus(1) == pytest.approx(NLS_M1, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# ranking_to_ranks


@pytest.mark.parametrize(
    ("ranking", "k", "ranks"),
    [
        ([0, 1], 2, [0, 1]),
        ([2, 0, 1], 3, [1, 2, 0]),
        ([2, [0, 3], 1], 4, [1, 2, 0, 1]),  # 2 best; 0 and 3 tie second; 1 last
        ([[1, 2], 0], 3, [1, 0, 0]),
        ([[2], [0, 3], [1]], 4, [1, 2, 0, 1]),  # every block a list: what Arrow stores when all rows have ties
    ],
)
def test_ranking_to_ranks(ranking, k, ranks):
    assert ranking_to_ranks(ranking, k, where="x") == ranks


@pytest.mark.parametrize(
    ("ranking", "k", "what"),
    [
        ([0, 0, 1], 3, "lists response 0 twice"),
        ([0, [1, 0]], 2, "lists response 0 twice"),
        ([0, 3, 1], 3, "index 3 is out of range for 3 responses"),
        ([0, -1], 2, "index -1 is out of range"),
        ([0, 2], 3, "covers 2 of 3 responses (missing [1])"),  # also responses/ranking length mismatch
        ([0], 1, "1 response(s); a ranking needs at least 2"),
        ([[0, 1, 2]], 3, "all 3 responses are tied"),
        ([0, "1"], 2, "holds '1' (str)"),
        ([0, True], 2, "holds True (bool)"),
        ([0, []], 2, "empty tie list"),
        (None, 2, "expected a non-empty list"),
    ],
)
def test_ranking_to_ranks_errors(ranking, k, what):
    with pytest.raises(AlignError) as e:
        ranking_to_ranks(ranking, k, where="data/rank.jsonl:17")
    assert str(e.value).startswith("data/rank.jsonl:17: ")
    assert what in str(e.value)


def test_pair_construction_with_ties():
    # ranking [2, [0, 3], 1] -> ranks [1, 2, 0, 1]: pairs (w, l) = (2,0) (2,3) (2,1) (0,1) (3,1); 5 = C(4,2) - 1 tie
    ranks = torch.tensor([ranking_to_ranks([2, [0, 3], 1], 4, where="x")])
    expected = torch.tensor(
        [
            [
                [False, True, False, False],  # 0 beats 1
                [False, False, False, False],  # 1 beats nobody
                [True, True, False, True],  # 2 beats 0, 1, 3
                [False, True, False, False],  # 3 beats 1
            ]
        ]
    )
    torch.testing.assert_close(pair_mask(ranks), expected)
    # padding (-1) and an all-tied group form no pair
    torch.testing.assert_close(pair_mask(torch.tensor([[0, -1], [0, 0]])), torch.zeros(2, 2, 2, dtype=torch.bool))
    torch.testing.assert_close(
        has_pairs(torch.tensor([[0, 1, -1], [0, 0, -1], [-1, -1, -1]])), torch.tensor([True, False, False])
    )


# ---------------------------------------------------------------------------------------------------------------------
# ranking_loss


def test_ranking_loss_k3_hand_computed():
    # ranks [0, 1, 2], rewards [2, 1, 0]: pairs r0-r1 = 1, r0-r2 = 2, r1-r2 = 1
    # loss = (NLS1 + NLS2 + NLS1) / C(3,2) = (0.3132617 + 0.1269280 + 0.3132617) / 3 = 0.2511505
    loss = ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(loss, torch.tensor(0.2511505))


def test_ranking_loss_k3_with_tie():
    # ranks [0, 1, 1] (1 and 2 tie), rewards [1, 0, 2]: pairs (0,1): r0-r1 = 1, (0,2): r0-r2 = -1; the tie adds none
    # loss = (NLS1 + NLS_M1) / 2 = (0.3132617 + 1.3132617) / 2 = 0.8132617
    loss = ranking_loss(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0, 1, 1]]))
    torch.testing.assert_close(loss, torch.tensor(0.8132617))


def test_ranking_loss_is_mean_of_group_means():
    # group 1 (K=2, padded): [1, 0] -> NLS1 = 0.3132617; group 2 (K=3): 0.2511505 (above)
    # mean over groups = 0.2822061; pooling the 4 pairs would give (2 * 0.3132617 * 2 + 0.1269280) / 4 = 0.2917283
    rewards = torch.tensor([[1.0, 0.0, 9.0], [2.0, 1.0, 0.0]])
    ranks = torch.tensor([[0, 1, -1], [0, 1, 2]])
    torch.testing.assert_close(ranking_loss(rewards, ranks), torch.tensor(0.2822061))
    torch.testing.assert_close(ranking_loss(rewards, ranks, reduction="none"), torch.tensor([0.3132617, 0.2511505]))
    # a group without pairs (all tied) is left out of the mean, not averaged in as 0
    rewards = torch.tensor([[2.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 0, 0]])
    for loss in (ranking_loss, plackett_luce_loss):
        torch.testing.assert_close(loss(rewards, ranks), loss(rewards[:1], ranks[:1]))


def test_ranking_loss_margin():
    # rewards [1, 0], margin 0.5: -log sigmoid(1 - 0.5) = log(1 + e^-0.5) = 0.4740770
    # K=3 [2, 1, 0], margin 1: pairs 1-1 = 0, 2-1 = 1, 1-1 = 0 -> (2 * 0.6931472 + 0.3132617) / 3 = 0.5665187
    rewards = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    ranks = torch.tensor([[0, 1, -1], [0, 1, 2]])
    loss = ranking_loss(rewards, ranks, margin=torch.tensor([0.5, 1.0]), reduction="none")
    torch.testing.assert_close(loss, torch.tensor([0.4740770, 0.5665187]))


def test_ranking_loss_no_pairs_is_zero_with_graph():
    rewards = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = ranking_loss(rewards, torch.tensor([[0, 0]]))
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(0.0))
    torch.testing.assert_close(rewards.grad, torch.zeros(1, 2))


def test_reduction_is_checked():
    with pytest.raises(ValueError, match="reduction='sum'"):
        ranking_loss(torch.zeros(1, 2), torch.tensor([[0, 1]]), reduction="sum")


floats = st.floats(-20, 20, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(floats, floats, st.floats(0, 3, width=32)), min_size=1, max_size=6))
def test_k2_equals_trl_pairwise(rows):
    chosen, rejected, margin = (torch.tensor(c) for c in zip(*rows, strict=True))
    rewards = torch.stack([chosen, rejected], dim=1)
    ranks = torch.tensor([[0, 1]] * len(rows))
    trl = -F.logsigmoid(chosen - rejected).mean()  # TRL RewardTrainer.compute_loss
    torch.testing.assert_close(ranking_loss(rewards, ranks), trl)
    trl_margin = -F.logsigmoid(chosen - rejected - margin).mean()
    torch.testing.assert_close(ranking_loss(rewards, ranks, margin=margin), trl_margin)
    torch.testing.assert_close(plackett_luce_loss(rewards, ranks), trl)  # PL of 2 items is Bradley-Terry
    torch.testing.assert_close(pairwise_center_penalty(rewards, ranks), torch.mean((chosen + rejected) ** 2))


@st.composite
def ranked_batches(draw):
    """rewards (G, K), ranks (G, K) with ties and -1 padding (at least 2 present responses per group)."""
    g = draw(st.integers(1, 4))
    k = draw(st.integers(2, 5))
    rewards = torch.tensor(draw(st.lists(st.lists(floats, min_size=k, max_size=k), min_size=g, max_size=g)))
    ranks = []
    for _ in range(g):
        present = draw(st.integers(2, k))
        ranks.append(draw(st.lists(st.integers(0, 3), min_size=present, max_size=present)) + [-1] * (k - present))
    return rewards, torch.tensor(ranks)


LOSSES = [ranking_loss, plackett_luce_loss, pairwise_center_penalty]
METRICS = [pair_accuracy, top1_accuracy, kendall_tau]


@settings(max_examples=60, deadline=None)
@given(ranked_batches(), st.sampled_from([float("nan"), float("inf"), -1e4, 7.0]))
def test_padding_does_not_leak(batch, junk):
    rewards, ranks = batch
    other = rewards.masked_fill(ranks < 0, junk)
    for fn in LOSSES:
        a = rewards.clone().requires_grad_()
        b = other.clone().requires_grad_()
        la, lb = fn(a, ranks), fn(b, ranks)
        torch.testing.assert_close(la, lb, equal_nan=True)
        la.backward()
        lb.backward()
        torch.testing.assert_close(a.grad, b.grad)
        assert torch.all(b.grad[ranks < 0] == 0)
    for fn in METRICS:
        torch.testing.assert_close(fn(rewards, ranks), fn(other, ranks), equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(ranked_batches(), st.randoms(use_true_random=False))
def test_permuting_responses_with_ranks_changes_nothing(batch, rnd):
    rewards, ranks = batch
    perm = list(range(rewards.shape[1]))
    rnd.shuffle(perm)
    for fn in LOSSES + METRICS:
        torch.testing.assert_close(fn(rewards[:, perm], ranks[:, perm]), fn(rewards, ranks), equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------------
# Plackett-Luce


def test_plackett_luce_k3_hand_computed():
    # ranks [0, 1, 2], rewards [2, 1, 0]:
    # NLL = [log(e^2 + e^1 + e^0) - 2] + [log(e^1 + e^0) - 1] + [0 - 0]
    #     = [log(11.1073379) - 2] + [log(3.7182818) - 1] = 0.4076060 + 0.3132617 = 0.7208677
    loss = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(loss, torch.tensor(0.7208677))


def test_plackett_luce_breslow_ties():
    # ranks [0, 0, 1] (0 and 1 tie first), rewards [2, 1, 0]: both drawn against {0, 1, 2}
    # NLL = [log(11.1073379) - 2] + [log(11.1073379) - 1] + [0 - 0] = 0.4076060 + 1.4076060 = 1.8152120
    loss = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 0, 1]]))
    torch.testing.assert_close(loss, torch.tensor(1.8152120))


def test_plackett_luce_prefers_correct_order():
    ranks = torch.tensor([[0, 1, 2]])
    right = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]]), ranks)
    wrong = plackett_luce_loss(torch.tensor([[0.0, 1.0, 2.0]]), ranks)
    assert right < wrong


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def test_pair_accuracy():
    # group 1 ranks [0,1,2], rewards [3,1,2]: (0,1) right, (0,2) right, (1,2) wrong (1 < 2) -> 2 of 3
    # group 2 ranks [0,1,-1], rewards [5,5,_]: reward tie -> 0.5;  pooled: (2 + 0.5) / 4 = 0.625
    rewards = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, float("nan")]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, -1]])
    torch.testing.assert_close(pair_accuracy(rewards, ranks), torch.tensor(0.625))
    torch.testing.assert_close(pair_accuracy(rewards[:1], ranks[:1]), torch.tensor(2 / 3))


def test_top1_accuracy():
    # g1: argmax reward = response 2, rank 0 (best) -> 1;  g2: argmax = response 0, rank 1 -> 0
    # g3: rewards tie at the top (responses 0, 1), only 0 is best -> 1/2;  g4: 1 and 2 tie best, argmax 2 -> 1
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    ranks = torch.tensor([[2, 1, 0], [1, 0, 2], [0, 1, 2], [1, 0, 0]])
    torch.testing.assert_close(top1_accuracy(rewards, ranks), torch.tensor((1 + 0 + 0.5 + 1) / 4))
    # padding: the padded position's huge reward does not count
    torch.testing.assert_close(
        top1_accuracy(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[1, 0, -1]])), torch.tensor(1.0)
    )


def test_kendall_tau_b():
    # ranks [0, 1, 1, 2], rewards [4, 3, 1, 2]; pairs: (0,1) c, (0,2) c, (0,3) c, (1,2) tied rank, (1,3) c, (2,3) d
    # tau_b = (C - D) / sqrt((n0 - ties_rank) (n0 - ties_reward)) = (4 - 1) / sqrt((6 - 1)(6 - 0)) = 3 / sqrt(30)
    tau = kendall_tau(torch.tensor([[4.0, 3.0, 1.0, 2.0]]), torch.tensor([[0, 1, 1, 2]]))
    torch.testing.assert_close(tau, torch.tensor(3 / math.sqrt(30)))
    # perfect, reversed, constant (no order predicted: 0), and the mean over groups
    ranks = torch.tensor([[0, 1, 2]] * 3)
    rewards = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(kendall_tau(rewards, ranks), torch.tensor(0.0))
    torch.testing.assert_close(kendall_tau(rewards[:1], ranks[:1]), torch.tensor(1.0))
    torch.testing.assert_close(kendall_tau(rewards[1:2], ranks[1:2]), torch.tensor(-1.0))
