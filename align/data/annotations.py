"""Annotations from `align rank serve`: the append-only log of what annotators did, replayed into their current
rankings; the pairwise agreement between annotators (InstructGPT reports ~73 %); the policies that turn several
annotators' rankings of one group into rankings rows.

The log is JSONL, one record a line, never rewritten (an undo is a record of its own), so a crash or kill loses at
most the line being written, which the server never acknowledged:

    {"kind": "header", "format": "align-annotations/1", "source": SHEET, "created": ISO time}
    {"kind": "submit", "id": SUBMISSION, "annotator": NAME, "group": ID, "ranking": [[2], [0, 1]],
     "flags": [[], ["unsafe"], []], "prompt": str, "responses": [K str], "group_sha256": hex, "time": ISO time}
    {"kind": "undo", "id": SUBMISSION, "annotator": NAME, "group": ID, "time": ISO time}
    {"kind": "skip", "annotator": NAME, "group": ID, "time": ISO time}

A submission carries its prompt and responses, so the log alone is a dataset (`align rank import LOG`), and the
sha256 of both, so a sheet changed after it was ranked is refused rather than silently mismatched.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.rankings import ranking_to_ranks
from align.errors import AlignError

FORMAT = "align-annotations/1"
KINDS = ("header", "submit", "undo", "skip")
NAME_RE = re.compile(r"^[\w][\w .@'-]{0,63}$")  # letters, digits, space . @ ' - _; 1 to 64 characters
SUBMISSION_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
DISAGREEMENT_POLICIES = ("majority", "per_annotator")


def group_sha256(prompt: str, responses: Sequence[str]) -> str:
    """The fingerprint of a group's content, recorded with every submission."""
    return hashlib.sha256(json.dumps([prompt, list(responses)], ensure_ascii=False).encode("utf-8")).hexdigest()


def check_annotator(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AlignError(
            f"{where}: annotator {name!r} is not a name of 1-64 letters, digits, spaces or . @ ' - _. Use e.g. 'ana'."
        )
    return name


def ranks_of(ranking: Sequence[Sequence[int]], k: int) -> list[int]:
    """Per-response position of a validated best -> worst ranking: [[2], [0, 1]] -> [1, 1, 0]."""
    out = [0] * k
    for pos, block in enumerate(ranking):
        for i in block:
            out[i] = pos
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Replay: the log -> each annotator's current rankings


@dataclass
class Replay:
    """The state the log describes: active submissions per (annotator, group), each annotator's undo stack, skips."""

    active: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    stack: dict[str, list[str]] = field(default_factory=dict)  # annotator -> active submission ids, oldest first
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # annotator -> group -> order of its last skip
    ids: dict[str, dict[str, Any]] = field(default_factory=dict)  # every submission id ever written -> its record
    header: dict[str, Any] | None = None
    records: int = 0

    def apply(self, rec: dict[str, Any], where: str) -> None:
        """Apply one record (validated by `check_record`); AlignError naming `where` if it contradicts the log."""
        self.records += 1
        kind = rec["kind"]
        if kind == "header":
            self.header = rec
            return
        who, group = rec["annotator"], rec["group"]
        key = (who, group)
        if kind == "submit":
            if rec["id"] in self.ids:
                raise AlignError(f"{where}: submission {rec['id']} appears twice. Remove the repeated line.")
            if key in self.active:
                raise AlignError(
                    f"{where}: {who} ranks group {group} again without undoing the earlier submission "
                    f"({self.active[key]['id']}). Remove one of the two lines."
                )
            self.ids[rec["id"]] = rec
            self.active[key] = rec
            self.stack.setdefault(who, []).append(rec["id"])
            self.skipped.get(who, {}).pop(group, None)
        elif kind == "undo":
            current = self.active.get(key)
            if current is None or current["id"] != rec["id"]:
                raise AlignError(
                    f"{where}: undo of submission {rec['id']}, which is not {who}'s active ranking of group {group}. "
                    "Remove the line."
                )
            del self.active[key]
            self.stack[who].remove(rec["id"])
        else:  # skip
            skips = self.skipped.setdefault(who, {})
            skips.pop(group, None)
            skips[group] = self.records

    def annotators(self) -> list[str]:
        return sorted({who for who, _ in self.active})

    def by_group(self) -> dict[str, dict[str, dict[str, Any]]]:
        """group -> annotator -> active submission."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (who, group), rec in self.active.items():
            out.setdefault(group, {})[who] = rec
        return out


def check_record(rec: Any, where: str) -> dict[str, Any]:
    """One log line's object, its fields and types checked (the ranking against its responses)."""
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
        kind = rec.get("kind") if isinstance(rec, dict) else type(rec).__name__
        raise AlignError(f"{where}: record kind {kind!r}, expected one of {', '.join(KINDS)}. Fix or remove the line.")
    if rec["kind"] == "header":
        if rec.get("format") != FORMAT:
            raise AlignError(f"{where}: format {rec.get('format')!r}, expected {FORMAT!r}: not a rank serve log.")
        return rec
    check_annotator(rec.get("annotator"), where)
    if not isinstance(rec.get("group"), str) or not rec["group"]:
        raise AlignError(f"{where}: 'group' is {rec.get('group')!r}, expected a group id string. Fix the line.")
    if rec["kind"] == "skip":
        return rec
    if not isinstance(rec.get("id"), str) or not SUBMISSION_RE.match(rec["id"]):
        raise AlignError(f"{where}: 'id' is {rec.get('id')!r}, expected a submission id. Fix the line.")
    if rec["kind"] == "undo":
        return rec
    prompt, responses = rec.get("prompt"), rec.get("responses")
    if not (isinstance(prompt, str) and isinstance(responses, list) and all(isinstance(r, str) for r in responses)):
        raise AlignError(f"{where}: a submission needs 'prompt' (str) and 'responses' (list of str). Fix the line.")
    ranking = rec.get("ranking")
    ranking_to_ranks(ranking, len(responses), where=where)
    if not all(isinstance(b, list) for b in ranking):
        raise AlignError(f"{where}: 'ranking' must list blocks, e.g. [[2], [0, 1]]. Fix the line.")
    flags = rec.get("flags")
    if not (isinstance(flags, list) and len(flags) == len(responses)
            and all(isinstance(f, list) and all(isinstance(x, str) for x in f) for f in flags)):  # fmt: skip
        raise AlignError(f"{where}: 'flags' must hold one list of flag names per response. Fix the line.")
    if rec.get("group_sha256") != group_sha256(prompt, responses):
        raise AlignError(f"{where}: 'group_sha256' does not match the prompt and responses; the line was edited.")
    return rec


def read_log(path: Path) -> tuple[Replay, int]:
    """Replay the log at `path`: (state, byte length of its complete lines). A last line without its newline is a
    write cut short by a crash, never acknowledged to the annotator; it is left out (the caller may cut it off)."""
    data = path.read_bytes() if path.exists() else b""
    complete = data.rfind(b"\n") + 1
    replay = Replay()
    for n, raw in enumerate(data[:complete].split(b"\n")[:-1], 1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AlignError(f"{where}: not a JSON line ({e}). Fix or remove the line.") from None
        replay.apply(check_record(rec, where), where)
    return replay, complete


def is_annotation_log(path: Path) -> bool:
    """Whether `path` is an `align rank serve` log (its first line is our header), not a ranking sheet."""
    try:
        with path.open("rb") as f:
            first = f.readline()
        rec = json.loads(first.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(rec, dict) and rec.get("kind") == "header" and rec.get("format") == FORMAT


# ---------------------------------------------------------------------------------------------------------------------
# Agreement


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int]:
    """(agreeing, compared) over the C(K, 2) response pairs of two annotators' ranks of one group (0 = best).

    A pair both order the same way, or both tie, agrees (1); opposite orders disagree (0); a tie against an order
    counts 1/2, as `align rank`'s gold agreement counts a tie."""
    agree = 0.0
    k = len(a)
    for i in range(k):
        for j in range(i + 1, k):
            sa = (a[i] > a[j]) - (a[i] < a[j])
            sb = (b[i] > b[j]) - (b[i] < b[j])
            agree += 1.0 if sa == sb else 0.0 if sa == -sb else 0.5
    return agree, k * (k - 1) // 2


def agreement(replay: Replay) -> dict[str, Any]:
    """Pairwise inter-annotator agreement over every group at least two annotators ranked: for each group, each pair
    of its annotators, each pair of responses, `pair_agreement`; the share that agrees (InstructGPT's figure: 72.6 %
    between its training labelers). Also per pair of annotators. `value` is None while no group has two rankings."""
    agree = total = 0.0
    groups = 0
    per_pair: dict[tuple[str, str], list[float]] = {}
    for _, rankings in sorted(replay.by_group().items()):
        names = sorted(rankings)
        if len(names) < 2:
            continue
        groups += 1
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                rx, ry = rankings[names[x]], rankings[names[y]]
                k = len(rx["responses"])
                got, n = pair_agreement(ranks_of(rx["ranking"], k), ranks_of(ry["ranking"], k))
                agree, total = agree + got, total + n
                acc = per_pair.setdefault((names[x], names[y]), [0.0, 0])
                acc[0] += got
                acc[1] += n
    pairs = [{"annotators": list(p), "agreement": a / n if n else None, "comparisons": n}
             for p, (a, n) in sorted(per_pair.items())]  # fmt: skip
    return {"value": agree / total if total else None, "comparisons": int(total), "groups": groups, "pairs": pairs}


# ---------------------------------------------------------------------------------------------------------------------
# Disagreements: several annotators' rankings of one group -> rows


def merge(replay: Replay, policy: str, order: Iterable[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """(rankings rows, groups dropped) under `policy`, groups in `order` (default: first submission first).

    `per_annotator`: one row per annotator and group, `annotator` named; every judgment is kept and the reward model
    sees the disagreement as conflicting pairs. `majority`: one row per group, the ranking more than half of its
    annotators submitted exactly, `annotators` its voters; a group without one is dropped and counted. Rows carry
    `flags` (per response, the union over the row's annotators)."""
    if policy not in DISAGREEMENT_POLICIES:
        raise AlignError(f"disagreement {policy!r}: choose one of {', '.join(DISAGREEMENT_POLICIES)}.")
    by_group = replay.by_group()
    if order is None:
        written = {sid: n for n, sid in enumerate(replay.ids)}
        first = {g: min(written[r["id"]] for r in recs.values()) for g, recs in by_group.items()}
        order = sorted(by_group, key=first.__getitem__)
    rows, dropped = [], 0
    for group in order:
        recs = by_group.get(group)
        if not recs:
            continue
        first_rec = recs[min(recs)]
        base = {"prompt": first_rec["prompt"], "responses": first_rec["responses"]}
        if policy == "per_annotator":
            rows += [{**base, "ranking": r["ranking"], "flags": r["flags"], "annotator": who, "group": group}
                     for who, r in sorted(recs.items())]  # fmt: skip
            continue
        votes: dict[str, list[str]] = {}
        for who, r in sorted(recs.items()):
            votes.setdefault(json.dumps(r["ranking"]), []).append(who)
        ranking, voters = max(votes.items(), key=lambda kv: len(kv[1]))
        if 2 * len(voters) <= len(recs):
            dropped += 1
            continue
        flags = [sorted({f for r in recs.values() for f in r["flags"][i]}) for i in range(len(base["responses"]))]
        rows.append({**base, "ranking": json.loads(ranking), "flags": flags, "annotators": voters, "group": group})
    return rows, dropped

