"""The tiny world's instructions and its gold labeler (the stand-in for human labelers).

An instruction is a `Spec` rendered to text (`render`); the labeler gets only the prompt and response strings, so it
parses the spec back from the prompt (`parse_prompt`) and checks the response against it (`score_details`).

Score, in [0, 1] (weights chosen so the instruction matters most, and so fluent nonsense cannot pass):

    score = 0.55 * task + 0.45 * grammar * (0.35 * consistent + 0.30 * no_repeat + 0.20 * clean_end + 0.15 * length)

- task: the instruction's own constraint (`_task`). `mention`: share of the requested entities named. `count`:
  (1 for exactly n sentences, else (1 - |k - n| / n) / 2) times the share of sentences naming the subject (name or
  its pronoun). `qa`: 1 if the first sentence is an accepted answer (`tom is in the park .`, `he is in the park .`,
  `in the park .`), 0.5 if a later sentence is or any sentence holds the answer word. `end`: 0.5 for naming the
  subject + 0.5 for the required last sentence (0.25 if it is there but not last). Only grammatical sentences
  count, so word salad containing the right words gets nothing.
- grammar: share of the segments (sentences ending in `.`, and dangling words after the last one) that are sentences
  of the world (`parse_sentence`; answer fragments like `in the park .` only for `qa`). It gates the other quality
  terms: garbage scores 0 whatever its length or repetition.
- consistent: share of grammatical sentences consistent with the world: read in order by `World` for stories;
  true of the prompt's story for `qa` (a correct answer, a true statement, or a sentence of the story).
- no_repeat: 1 - 2 * repeated sentences / sentences (floored at 0): one repeat among four costs half.
- clean_end: 1 if the response ends with `.` (no dangling words).
- length: 1 at the kind's ideal number of tokens (`.` included: 25 for stories, 7 per sentence asked for, 6 for
  answers), falling linearly to 0 at 0 or twice the ideal (`_length`). The ideal is a preference, not a
  constraint: it costs a perfect story at most a few hundredths, and it makes ties between different responses
  rare (rankings need an order).

Empty or whitespace responses score 0; no response string can make the labeler raise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from align.data.tinyworld_grammar import (
    COLORS,
    NAMES,
    NOUNS,
    NUMBERS,
    PLACES,
    World,
    parse_sentence,
    split_sentences,
)
from align.errors import AlignError

KINDS = ("mention", "count", "qa", "end")
QUESTIONS = ("where", "have", "color", "who", "feel")
TASK_WEIGHT = 0.55
QUALITY_WEIGHTS = {"consistent": 0.35, "no_repeat": 0.30, "clean_end": 0.20, "length": 0.15}
DETAIL_KEYS = ("task", "grammar", "consistent", "no_repeat", "clean_end", "length")
# Ideal response lengths in tokens: a story of ~4 sentences, 7 tokens per sentence asked for, a one-sentence answer.
IDEAL_TOKENS = {"mention": 25, "end": 25, "qa": 6}
TOKENS_PER_SENTENCE = 7


@dataclass(frozen=True)
class Spec:
    """An instruction. Fields by kind: mention (name, friend?, obj?, place?), count (name, n, style),
    end (name, ending), qa (story, question, target)."""

    kind: str
    name: str | None = None
    friend: str | None = None
    obj: tuple | None = None  # (color, noun)
    place: str | None = None
    n: int = 0
    style: int = 0  # count: 0 "write n sentences about x", 1 "write a story about x in n sentences"
    ending: tuple = ()  # end: the required last sentence's words, without "."
    story: str = ""
    question: str = ""
    target: str = ""  # qa: the person or noun asked about


def join_items(items: list[str]) -> str:
    """`a`, `a and b`, `a , b and c`: how instructions (and corpus titles) list entities."""
    return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]


def render(spec: Spec) -> str:
    """The prompt text of an instruction."""
    if spec.kind == "mention":
        items = [spec.name] + ([spec.friend] if spec.friend else [])
        items += [f"the {spec.obj[0]} {spec.obj[1]}"] if spec.obj else []
        place = f" in the {spec.place}" if spec.place else ""
        return f"write a story about {join_items(items)}{place} ."
    if spec.kind == "count":
        num, noun = NUMBERS[spec.n - 1], "sentence" if spec.n == 1 else "sentences"
        if spec.style == 0:
            return f"write {num} {noun} about {spec.name} ."
        return f"write a story about {spec.name} in {num} {noun} ."
    if spec.kind == "end":
        return f"write a story about {spec.name} that ends with : {' '.join(spec.ending)} ."
    q = {
        "where": f"where is {spec.target}",
        "have": f"what does {spec.target} have",
        "color": f"what color is the {spec.target}",
        "who": f"who has the {spec.target}",
        "feel": f"how does {spec.target} feel",
    }[spec.question]
    return f"read : {spec.story} question : {q} ?"


@functools.lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Spec:
    """The instruction behind a tiny-world prompt (inverse of `render`); AlignError for any other text."""
    spec = _parse_prompt(prompt.split())
    bad = spec is None or not _valid(spec) or render(spec) != " ".join(prompt.split())
    if bad or (spec.kind == "qa" and qa_answers(spec) is None):
        raise AlignError(
            f"tinyworld labeler: {prompt[:80]!r} is not a tiny-world instruction. "
            "Score only prompts from tinyworld.instruction_prompts or tinyworld.demonstrations."
        )
    return spec


def _valid(spec: Spec) -> bool:
    """Entities are words of the world (the render round trip checks the rest of the form)."""
    if spec.kind == "qa":
        return spec.target in (NAMES if spec.question in ("where", "have", "feel") else NOUNS)
    ok = spec.name in NAMES and (spec.friend is None or spec.friend in NAMES)
    ok = ok and (spec.obj is None or (spec.obj[0] in COLORS and spec.obj[1] in NOUNS))
    ok = ok and (spec.place is None or spec.place in PLACES)
    if spec.kind == "end":
        ok = ok and parse_sentence(spec.ending) is not None
    return ok


def _parse_prompt(w: list[str]) -> Spec | None:
    if w[:2] == ["read", ":"] and "question" in w and w[-1:] == ["?"]:
        i = len(w) - 1 - w[::-1].index("question")
        story, q = " ".join(w[2:i]), w[i + 2 : -1]
        for pattern, kind in (
            (["where", "is"], "where"),
            (["what", "color", "is", "the"], "color"),
            (["who", "has", "the"], "who"),
            (["what", "does"], "have"),
            (["how", "does"], "feel"),
        ):
            if q[: len(pattern)] == pattern and len(q) in (len(pattern) + 1, len(pattern) + 2):
                return Spec("qa", story=story, question=kind, target=q[len(pattern)])
        return None
    if w[:1] == ["write"] and len(w) >= 5 and w[1] in NUMBERS and w[3:4] == ["about"]:
        return Spec("count", name=w[4], n=NUMBERS.index(w[1]) + 1, style=0)
    if w[:4] != ["write", "a", "story", "about"] or len(w) < 6 or w[-1] != ".":
        return None
    body = w[4:-1]
    if body[1:4] == ["that", "ends", "with"]:
        return Spec("end", name=body[0], ending=tuple(body[5:]))
    if len(body) == 4 and body[1] == "in" and body[2] in NUMBERS:
        return Spec("count", name=body[0], n=NUMBERS.index(body[2]) + 1, style=1)
    place = None
    if body[-3:-1] == ["in", "the"]:
        place, body = body[-1], body[:-3]
    items = " ".join(body).replace(" , ", " and ").split(" and ")
    friend = obj = None
    for item in items[1:]:
        parts = item.split()
        if len(parts) == 1:
            friend = parts[0]
        elif len(parts) == 3:
            obj = (parts[1], parts[2])
    return Spec("mention", name=items[0], friend=friend, obj=obj, place=place)


@dataclass(frozen=True)
class _QA:
    """A question's accepted answers (word tuples, without `.`), its key word, and the story's world and sentences."""

    accepted: frozenset
    key: str
    world: World
    sentences: frozenset
    person: str | None


@functools.lru_cache(maxsize=4096)
def qa_answers(spec: Spec) -> _QA | None:
    """Read the story into a `World` and list the accepted answers; None when the question has no answer."""
    world = World()
    sents, _ = split_sentences(spec.story.split())
    for s in sents:
        world.apply(parse_sentence(s))
    t, q = spec.target, spec.question
    person = t if t in NAMES else None
    p = world.people.get(t) if person else None
    acc: list[tuple] = []
    key = None
    if q == "where" and p is not None and p.loc is not None:
        key = p.loc
        acc = [(t, "is", "in", "the", key), (NAMES[t], "is", "in", "the", key), ("in", "the", key)]
    elif q == "have" and p is not None and p.holds is not None:
        key = p.holds
        size, color = world.objects[key]
        nps = [(size, color, key), (color, key)] if size else [(color, key)]
        acc = [(s, "has", "a", *np) for np in nps for s in (t, NAMES[t])] + [("a", *np) for np in nps]
    elif q == "color" and t in world.objects:
        key = world.objects[t][1]
        acc = [("the", t, "is", key), ("it", "is", key), (key,)]
    elif q == "who" and world.holder(t) is not None:
        key = world.holder(t)
        acc = [(key, "has", "the", t), (key, "has", "the", world.objects[t][1], t), (key,)]
    elif q == "feel" and p is not None and p.mood is not None:
        key = p.mood
        acc = [(t, "feels", key), (NAMES[t], "feels", key), (key,)]
    if key is None:
        return None
    return _QA(frozenset(acc), key, world, frozenset(sents), person)


def gold_answer(spec: Spec) -> str:
    """The full-sentence answer to a `qa` instruction."""
    qa = qa_answers(spec)
    t = spec.target
    if spec.question == "where":
        return f"{t} is in the {qa.key} ."
    if spec.question == "have":
        size, color = qa.world.objects[qa.key]
        return f"{t} has a {size + ' ' if size else ''}{color} {qa.key} ."
    if spec.question == "color":
        return f"the {t} is {qa.key} ."
    if spec.question == "who":
        return f"{qa.key} has the {t} ."
    return f"{t} feels {qa.key} ."


def _true(qa: _QA, s: tuple, parsed: tuple) -> bool:
    """Whether an answer sentence is true of the prompt's story."""
    if s in qa.accepted or s in qa.sentences:
        return True
    verb = parsed[0]
    if verb.startswith("frag"):
        return False
    if verb == "color_is":
        return parsed[1] in qa.world.objects and qa.world.objects[parsed[1]][1] == parsed[2]
    x = parsed[1]
    if x not in NAMES:  # a pronoun stands for the person asked about
        x = qa.person if qa.person is not None and NAMES[qa.person] == x else None
    p = qa.world.people.get(x)
    if p is None:
        return False
    if verb == "is":
        return p.loc == parsed[2]
    if verb == "has":
        size, color, noun = parsed[2]
        obj = qa.world.objects.get(noun)
        return p.holds == noun and obj[1] == color and size in (None, obj[0])
    if verb == "has_the":  # `he has the ball`, or with its color: `he has the red ball`
        return p.holds == parsed[2] and qa.world.color_ok(parsed)
    if verb == "feels":
        return p.mood == parsed[2]
    return False


def _length(n: int, ideal: int) -> float:
    """1 - |n - ideal| / ideal, floored at 0."""
    return max(0.0, 1.0 - abs(n - ideal) / ideal)


def _mentions(name: str, s: tuple) -> bool:
    return name in s or NAMES.get(name) in s


def _task(spec: Spec, sents: list[tuple], parsed: list, qa: _QA | None) -> float:
    """The instruction's own constraint in [0, 1] (see the module docstring)."""
    good = [s for s, p in zip(sents, parsed, strict=True) if p is not None]
    if spec.kind == "mention":
        wanted = [spec.name] + [e for e in (spec.friend, spec.place) if e]
        found = sum(any(e in s for s in good) for e in wanted)
        if spec.obj:
            found += any(s[i : i + 2] == spec.obj for s in good for i in range(len(s) - 1))
            return found / (len(wanted) + 1)
        return found / len(wanted)
    if spec.kind == "count":
        real = [s for s in sents if s]
        k = len(real)
        if k == 0:
            return 0.0
        count = 1.0 if k == spec.n else max(0.0, 1.0 - abs(k - spec.n) / spec.n) / 2
        about = sum(_mentions(spec.name, s) for s in good if s) / k
        return count * about
    if spec.kind == "end":
        named = 1.0 if any(spec.name in s for s in good) else 0.0
        ending = 1.0 if sents and sents[-1] == spec.ending else 0.5 if spec.ending in sents else 0.0
        return 0.5 * named + 0.5 * ending
    if qa is None:
        return 0.0
    if good and sents[0] in qa.accepted:
        return 1.0
    return 0.5 if any(s in qa.accepted or qa.key in s for s in good) else 0.0


def score_details(prompt: str, response: str) -> dict[str, float]:
    """Gold labeler: each constraint in [0, 1] (`DETAIL_KEYS`) and the weighted `score` (module docstring).

    Deterministic, pure Python, never raises on any response string (prompts must be tiny-world instructions).
    """
    spec = parse_prompt(prompt)
    words = response.split() if isinstance(response, str) else []
    sents, dangling = split_sentences(words)
    qa = qa_answers(spec) if spec.kind == "qa" else None
    parsed = [parse_sentence(s, fragments=qa is not None) for s in sents]
    n_seg = len(sents) + (dangling is not None)
    n_good = sum(p is not None for p in parsed)
    d = dict.fromkeys(DETAIL_KEYS, 0.0)
    d["task"] = _task(spec, sents, parsed, qa)
    if n_seg == 0:
        d["score"] = 0.0
        return d
    d["grammar"] = n_good / n_seg
    if n_good:
        if qa is None:
            world = World()
            ok = sum(world.apply(p) for p in parsed if p is not None)
        else:
            ok = sum(_true(qa, s, p) for s, p in zip(sents, parsed, strict=True) if p is not None)
        d["consistent"] = ok / n_good
    real = [s for s in sents if s]
    if real:
        d["no_repeat"] = max(0.0, 1.0 - 2.0 * (len(real) - len(set(real))) / len(real))
    d["clean_end"] = 1.0 if dangling is None else 0.0
    ideal = TOKENS_PER_SENTENCE * spec.n if spec.kind == "count" else IDEAL_TOKENS[spec.kind]
    d["length"] = _length(len(words), ideal)
    quality = sum(w * d[k] for k, w in QUALITY_WEIGHTS.items())
    d["score"] = TASK_WEIGHT * d["task"] + (1.0 - TASK_WEIGHT) * d["grammar"] * quality
    return d


def score(prompt: str, response: str) -> float:
    """The gold score of `response` to `prompt`, in [0, 1] (see `score_details`)."""
    return score_details(prompt, response)["score"]
