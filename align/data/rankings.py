"""Rankings data (InstructGPT step 2): rows, their rankings, and the text a reward model reads for them.

A row is `{"prompt", "responses": [K str], "ranking": [indices best -> worst, ties as lists]}` (what `align rank`
writes), or a pair `{"prompt", "chosen", "rejected", optional "margin"}` (the K = 2 case). A ranking is written
`2>0=3>1` in a labeler's sheet. Every (prompt, response) reaches the reward model through `encode_for_reward`, the
same at training time (`align.trainers.reward`) and at scoring time (PPO, `align score`, `align inspect`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import datasets

from align.errors import AlignError

logger = logging.getLogger(__name__)

# Between prompt and response when the tokenizer has no chat template. One space, as TRL's implicit-prompt format
# concatenates; PPO and `align score` format with the same functions, so train-time and score-time texts match.
REWARD_SEPARATOR = " "


# ---------------------------------------------------------------------------------------------------------------------
# Rankings


def ranking_to_ranks(ranking: list, k: int, *, where: str) -> list[int]:
    """Per-response ranks (0 = best, tied responses share a rank) from a best-to-worst `ranking` of `k` responses.

    `ranking` lists response indices best -> worst; an element may be a list of tied indices:
    `[2, [0, 3], 1]` -> ranks `[1, 2, 0, 1]` (response 2 best, 0 and 3 tie second, 1 last).
    Raises AlignError naming `where` (e.g. `data/rank.jsonl:17`) on anything that is not a full ranking of k responses.
    """
    if k < 2:
        raise AlignError(f"{where}: {k} response(s); a ranking needs at least 2. Drop the row or add responses.")
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise AlignError(
            f"{where}: 'ranking' is {ranking!r}, expected a non-empty list of response indices best -> worst, "
            "e.g. [2, [0, 3], 1]. Fix the row."
        )
    ranks = [-1] * k
    seen = 0
    for position, block in enumerate(ranking):
        members = list(block) if isinstance(block, (list, tuple)) else [block]
        if not members:
            raise AlignError(f"{where}: 'ranking' position {position} is an empty tie list. Remove it.")
        for i in members:
            if isinstance(i, bool) or not isinstance(i, int):
                raise AlignError(
                    f"{where}: 'ranking' holds {i!r} ({type(i).__name__}), expected an int index or a list of "
                    "tied int indices. Fix the row."
                )
            if not 0 <= i < k:
                raise AlignError(
                    f"{where}: 'ranking' index {i} is out of range for {k} responses. Use indices 0..{k - 1}."
                )
            if ranks[i] != -1:
                raise AlignError(f"{where}: 'ranking' lists response {i} twice. Each index appears exactly once.")
            ranks[i] = position
            seen += 1
    if seen != k:
        missing = [i for i, r in enumerate(ranks) if r == -1]
        raise AlignError(
            f"{where}: 'ranking' covers {seen} of {k} responses (missing {missing}); responses and ranking lengths "
            "differ. Rank every response (ties as a list, e.g. [0, [1, 2]])."
        )
    if len(ranking) == 1:
        raise AlignError(
            f"{where}: all {k} responses are tied, so there is no pair to learn from. Drop the row or break a tie."
        )
    return ranks


def format_ranking(ranking: Sequence[Sequence[int]]) -> str:
    """[[2], [0, 3], [1]] -> "2>0=3>1"."""
    return ">".join("=".join(str(i) for i in block) for block in ranking)


def parse_ranking(value: Any, *, where: str) -> list[list[int]]:
    """A sheet's `ranking` cell ("2>0=3>1", or a JSON list like [2, [0, 3], 1]) as a list of blocks best -> worst.

    Only the syntax is checked here; `ranking_to_ranks` checks the indices against the responses."""
    example = "e.g. 2>0=3>1 (response 2 best, 0 and 3 tied, 1 worst)"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AlignError(
            f"{where}: 'ranking' is empty; the row was not ranked. Fill it in, {example}, or delete the row."
        )
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise AlignError(
                f"{where}: 'ranking' {value!r} is not a valid JSON list. Write it as {example}."
            ) from None
    if isinstance(value, list):
        return [list(b) if isinstance(b, list) else [b] for b in value]
    if not isinstance(value, str):
        raise AlignError(f"{where}: 'ranking' is {value!r} ({type(value).__name__}); write it as {example}.")
    blocks = []
    for part in value.replace(" ", "").split(">"):
        members = part.split("=")
        if not all(m.isdigit() for m in members):
            raise AlignError(
                f"{where}: 'ranking' {value!r} is not response numbers joined by '>' and '='. Write it as {example}."
            )
        blocks.append([int(m) for m in members])
    return blocks


# ---------------------------------------------------------------------------------------------------------------------
# Formatting: the SAME functions at training and at scoring time (PPO, `align score`)


def _render(tokenizer, prompt: str, response: str) -> tuple[str, bool]:
    """(text, used_chat_template)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False), True
    # No template: TRL appends EOS to non-conversational preference data, so the score is read at a fixed end token.
    return prompt + REWARD_SEPARATOR + response + (tokenizer.eos_token or ""), False


def format_for_reward(tokenizer, prompt: str, response: str) -> str:
    """The text a reward model scores for (prompt, response).

    With a chat template: the template applied to [user: prompt, assistant: response], no generation prompt (align's
    template ends the assistant turn with EOS). Without one: `prompt + " " + response + eos_token`.
    Tokenize it with `encode_for_reward` (a template renders its own special tokens, so no BOS is added twice).
    An encoder reward model reads no single text but the pair (see `encode_for_reward`'s `pair`).
    """
    return _render(tokenizer, prompt, response)[0]


def reward_format(tokenizer, pair: bool) -> str:
    """How (prompt, response) reaches the reward model, in words (the reward stage logs it once)."""
    if pair:
        # The pair of "x" and "y", their tokens named: e.g. "[CLS] prompt [SEP] response [SEP]" for BERT.
        ids = encode_for_reward(tokenizer, "x", "y", pair=True)
        want = [(tokenizer("x", add_special_tokens=False)["input_ids"], "prompt"),
                (tokenizer("y", add_special_tokens=False)["input_ids"], "response")]  # fmt: skip
        parts, i = [], 0
        while i < len(ids):
            if want and want[0][0] and ids[i : i + len(want[0][0])] == want[0][0]:
                parts.append(want[0][1])
                i += len(want.pop(0)[0])
            else:
                parts.append(tokenizer.convert_ids_to_tokens(ids[i]))
                i += 1
        shape = " ".join(parts)
        return f"the tokenizer's sentence pair, tokenizer(prompt, response) = {shape} (an encoder: no chat template)"
    if getattr(tokenizer, "chat_template", None):
        return "its chat template applied to [user: prompt, assistant: response]"
    return f"prompt + {REWARD_SEPARATOR!r} + response + EOS {tokenizer.eos_token!r} (no chat template)"


def reads_pairs(tokenizer) -> bool:
    """The tokenizer's half of `align.models.modeling.is_encoder`, for when there is no model config to read: an
    encoder's tokenizer has no EOS token and no chat template (nothing to end a response or mark a turn with, as
    BERT's WordPiece tokenizers), so (prompt, response) is its sentence pair. False for no tokenizer."""
    if tokenizer is None:
        return False
    return tokenizer.eos_token is None and not getattr(tokenizer, "chat_template", None)


def encode_for_reward(
    tokenizer, prompt: str, response: str, max_length: int | None = None, *, pair: bool | None = None
) -> list[int]:
    """Token ids of `format_for_reward`, cut from the left to the last `max_length` tokens (None: no cut).

    Left, not right: the sequence-classification head reads the last token, so right-truncation would cut the
    response's end (and EOS) and make responses that differ only there score identically; dropping the start of the
    prompt keeps what the score depends on most.

    `pair` True, for an encoder reward model (`align.models.modeling.is_encoder`): `tokenizer(prompt, response)`, the
    tokenizer's sentence-pair encoding (`[CLS] prompt [SEP] response [SEP]` for BERT), cut as transformers cuts
    pairs (longest first, from the right): an encoder's head reads the first token, [CLS], which must stay.
    None: decided from the tokenizer alone; callers that have the model pass `is_encoder(model.config, tokenizer)`.
    """
    if pair is None:
        pair = reads_pairs(tokenizer)
    if pair:
        response = response or " "  # transformers reads an empty second text as none: "[CLS] prompt [SEP]" alone
        if max_length is None:
            return tokenizer(prompt, response)["input_ids"]
        return tokenizer(prompt, response, truncation="longest_first", max_length=max_length)["input_ids"]
    text, templated = _render(tokenizer, prompt, response)
    # Chat templates render BOS themselves; transformers' docs advise add_special_tokens=False for their output.
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> groups -> token ids


def parse_ranking_row(row: dict[str, Any], *, where: str) -> tuple[str, list[str], list[int], float | None]:
    """(prompt, responses, ranks, margin) of one row, validated; AlignError naming `where` otherwise.

    Rows: `{"prompt", "responses": [K str], "ranking": [indices best -> worst, ties as lists]}`, or pair data
    `{"prompt", "chosen", "rejected", optional "margin"}` (the K = 2 case: responses [chosen, rejected], ranks [0, 1]).
    """
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise AlignError(f"{where}: 'prompt' is {type(prompt).__name__}, expected a string. Fix the row.")
    if not prompt.strip():
        raise AlignError(
            f"{where}: 'prompt' is empty; responses are ranked for a prompt. Write the prompt or drop the row."
        )
    if row.get("responses") is not None:
        responses = row["responses"]
        if not isinstance(responses, (list, tuple)):
            raise AlignError(f"{where}: 'responses' is {type(responses).__name__}, expected a list of strings.")
        responses = list(responses)
        ranks = ranking_to_ranks(row.get("ranking"), len(responses), where=where)
        fields = [f"responses[{i}]" for i in range(len(responses))]
    elif row.get("chosen") is not None or row.get("rejected") is not None:
        responses = [row.get("chosen"), row.get("rejected")]
        ranks = [0, 1]
        fields = ["chosen", "rejected"]
    else:
        present = sorted(k for k, v in row.items() if v is not None)
        raise AlignError(
            f"{where}: no 'responses'/'ranking' and no 'chosen'/'rejected' (columns present: {present}). "
            "Give rankings {prompt, responses, ranking} or pairs {prompt, chosen, rejected}."
        )
    for name, text in zip(fields, responses, strict=True):
        if not isinstance(text, str):
            raise AlignError(f"{where}: '{name}' is {type(text).__name__}, expected a string. Fix the row.")
        if not text.strip():
            raise AlignError(f"{where}: '{name}' is empty; an empty response cannot be ranked. Drop or fix the row.")
    margin = row.get("margin")
    if "margin" in row:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise AlignError(
                f"{where}: 'margin' is {margin!r}, expected a finite number. Give every row a margin, or none."
            )
        margin = float(margin)
    return prompt, responses, ranks, margin


# The ways `ranking_pairs` turns one ranked group into chosen/rejected pairs (DPO's `ranking_pairs` key; the reward
# stage's `ranking_as_pairs` uses "all").
PAIR_MODES = ("all", "best_vs_rest", "adjacent")


def _pair_kept(mode: str, chosen_rank: int, rejected_rank: int) -> bool:
    """Whether (chosen, rejected) with these ranks (0 = best; tied responses share one) is a pair under `mode`."""
    if chosen_rank >= rejected_rank:  # a tie, or the wrong way round: never a pair
        return False
    if mode == "all":
        return True
    if mode == "best_vs_rest":
        return chosen_rank == 0
    return rejected_rank == chosen_rank + 1  # adjacent: ranks are block positions, so +1 is the next lower block


def ranking_pairs(ds, mode: str = "all", *, per_group: int | None = None, seed: int = 0):
    """Each ranked group -> `{prompt, chosen, rejected}` rows (`margin` kept when present), with `group` the 0-based
    row it came from. Rows must be valid (`parse_ranking_row`); pair rows are groups of 2.

    mode: "all": every pair of responses with a strict preference (at most C(K,2) per group); "best_vs_rest": each
    best-ranked response against every response ranked lower (K-1 when the best is alone); "adjacent": each response
    against each response of the next lower rank (K-1 when there are no ties). Tied responses are never a pair with
    each other: under "all" a tie group pairs with everything above and below it, under "best_vs_rest" each tied best
    response pairs with every lower one (and a tie lower down is rejected against the best only), under "adjacent" each
    member pairs with the rank above and the rank below. Pairs are in group order, then chosen index, then rejected
    index.

    per_group: keep at most this many of each group's pairs, drawn without replacement (seeded by `seed` and the
    group's row: the same rows and seed give the same pairs), kept in the order above. A budget for
    large K: "all" gives C(K,2) pairs a group, 36 at K = 9, and each costs DPO a forward and backward of two
    sequences. None keeps every pair.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"ranking_pairs: mode {mode!r}; expected one of {PAIR_MODES}")
    if per_group is not None and per_group < 1:
        raise ValueError(f"ranking_pairs: per_group {per_group!r}; expected None or >= 1")
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "group": []}
    has_margin = "margin" in ds.column_names
    if has_margin:
        out["margin"] = []
    for i, row in enumerate(ds):
        prompt, responses, ranks, margin = parse_ranking_row(row, where=f"row {i + 1}")
        kept = [(w, b) for w, rw in enumerate(ranks) for b, rb in enumerate(ranks) if _pair_kept(mode, rw, rb)]
        if per_group is not None and len(kept) > per_group:
            drawn = random.Random(f"{seed}:{i}").sample(range(len(kept)), per_group)
            kept = [kept[j] for j in sorted(drawn)]
        for w, b in kept:
            out["prompt"].append(prompt)
            out["chosen"].append(responses[w])
            out["rejected"].append(responses[b])
            out["group"].append(i)
            if has_margin:
                out["margin"].append(margin)
    return datasets.Dataset.from_dict(out)


def tokenize_rankings(
    ds,
    tokenizer,
    max_length: int | None,
    *,
    source: str = "dataset",
    num_proc: int | None = None,
    pair: bool | None = None,
):
    """Rankings (or pairs) -> Dataset with `input_ids` (K lists of ids), `ranks` (K ints), `length` (the group's
    longest sequence: Trainer's `train_sampling_strategy: group_by_length` batches groups of similar length) and, if
    given, `margin`.

    Every response is encoded with `encode_for_reward` (`pair`: see there); responses longer than `max_length` keep
    their last `max_length` tokens (an encoder's pair: cut longest first) and one warning gives their count. Errors
    name `<source>:<1-based row>`.
    """
    columns = list(ds.column_names)
    has_margin = "margin" in columns
    if pair is None:
        pair = reads_pairs(tokenizer)

    def encode(prompt: str, response: str) -> tuple[list[int], bool]:
        """(ids, whether they were cut to max_length)."""
        ids = encode_for_reward(tokenizer, prompt, response, pair=pair)
        if max_length is None or len(ids) <= max_length:
            return ids, False
        return encode_for_reward(tokenizer, prompt, response, max_length, pair=pair), True

    def tokenize(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "ranks": [], "length": [], "num_truncated": []}
        if has_margin:
            out["margin"] = []
        for j, i in enumerate(indices):
            row = {c: batch[c][j] for c in columns}
            prompt, responses, ranks, margin = parse_ranking_row(row, where=f"{source}:{i + 1}")
            encoded = [encode(prompt, r) for r in responses]
            cut = [ids for ids, _ in encoded]
            out["input_ids"].append(cut)
            out["ranks"].append(ranks)
            out["length"].append(max(len(ids) for ids in cut))
            out["num_truncated"].append(sum(was_cut for _, was_cut in encoded))
            if has_margin:
                out["margin"].append(margin)
        return out

    ds = ds.map(
        tokenize,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        num_proc=num_proc,
        desc=f"Tokenizing {source} rankings",
    )
    truncated = sum(ds["num_truncated"])
    ds = ds.remove_columns("num_truncated")
    if truncated:
        total = sum(len(r) for r in ds["ranks"])
        how = (
            "cut prompt and response longest first, from the end (the tokenizer's pair truncation)"
            if pair
            else f"kept their last {max_length} tokens (the prompt's start is cut)"
        )
        logger.warning(
            "%s: %d of %d responses are longer than max_length=%d tokens; %s. Raise max_length to keep them whole.",
            source,
            truncated,
            total,
            max_length,
            how,
        )
    return ds
