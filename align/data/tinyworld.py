"""The tiny world: align's embedded, self-generated data for running the whole InstructGPT chain offline.

Because we generate the world we can measure honestly:
- `pretrain_corpus`: documents (a story from a probabilistic grammar, alone, under a title or followed by a question
  and its answer) whose exact NLL is recorded (`document_nll` reads it back), so `entropy_floor` is the best mean
  loss any causal LM can reach on it;
- `instruction_prompts`: instructions with checkable constraints (kinds `mention`, `count`, `qa`, `end`);
- `score` / `score_details`: the hidden gold labeler (stand-in for human labelers; ranks and evaluates, never
  trains directly);
- `demonstrations`: SFT data written by deliberately imperfect demonstrators: a habit (the same step left undone,
  e.g. one sentence fewer than asked) in most of them, plus a share of random flaws.

Why the habit: InstructGPT's premise is that comparisons teach what demonstrations do not. With random flaws only
(30%), SFT's most likely answer was already the demonstrators' best, so greedy decoding removed the noise and left
rankings nothing to teach (measured on recipes/tiny, Intel Xeon 2-core, one run each: PPO beat SFT on 52% and 50% of
held-out prompts greedy, seeds 42 and 1). A habit shown in ~70% of demonstrations is what SFT's mode does; the right
answers it samples the rest of the time rank higher, and PPO can move the mode there. The gold labeler is unchanged.

Text is lowercase words separated by single spaces, punctuation as separate words; every word is in `vocabulary()`.
The grammar lives in `tinyworld_grammar`, the instructions and labeler in `tinyworld_labeler`.
"""

from __future__ import annotations

import logging
import math
import random
import zlib
from collections.abc import Sequence

import datasets

from align.data import load
from align.data.tinyworld_grammar import (
    COLORS,
    MOODS,
    NAMES,
    NOUNS,
    PLACES,
    World,
    forced_story,
    parse_sentence,
    sample_story,
    split_sentences,
    story_nll,
    vocabulary,
)
from align.data.tinyworld_labeler import (
    DETAIL_KEYS,
    KINDS,
    Spec,
    gold_answer,
    join_items,
    parse_prompt,
    qa_answers,
    render,
    score,
    score_details,
)
from align.errors import AlignError

logger = logging.getLogger(__name__)

__all__ = [
    "GOLD",
    "KINDS",
    "TINYWORLD",
    "demonstrations",
    "document_nll",
    "entropy_floor",
    "gold_response",
    "instruction_prompts",
    "is_tinyworld",
    "pretrain_corpus",
    "sample_story",
    "score",
    "score_details",
    "story_nll",
    "vocabulary",
]

TINYWORLD = "tinyworld"  # the `dataset_name` (and `ptx_dataset_name`) that stands for this world's data
GOLD = "gold"  # the labeler name (`labeler`, `gold_labeler`, `align score`) that stands for its gold labeler
KIND_PROBS = (("mention", 0.3), ("count", 0.25), ("qa", 0.3), ("end", 0.15))
TEST_SHARE = 10  # one prompt text in TEST_SHARE is held out (by hash), so train and test prompts never overlap
QA_MAX_WORDS = 40  # keeps a QA prompt under ~50 words, prompt + answer well under 128 tokens


# Pretraining corpus

# A document is a story, alone or related to a short text by it, as web text relates titles and reading exercises to
# the text they belong to. Plain stories never reward copying a color or a place from one part of a text into
# another, and a model pretrained on them alone learns no such copying before SFT: it then cannot write about what a
# prompt names or answer from the prompt's story (measured, SFT greedy on held-out prompts: all requested entities
# named in 11% of `mention` prompts, `qa` answered in 11%). Stories copy too (`the red ball`, `in the park` again:
# see tinyworld_grammar), and titled and questioned documents are the majority. Measured with recipes/tiny, against
# the previous corpus (40% plain stories, no copies in them) and its recipe: the pretrained model's P(right color) at
# a `what color` answer 0.10 -> 0.93, P(right place) at `where` 0.07 -> 0.87.
DOC_KINDS = (("story", 0.2), ("titled", 0.4), ("questions", 0.4))
TITLE_ENTITY_PROB = 0.75  # a titled story's title names each of its other entities with this probability
QUESTION_WORDS = ("where", "what", "who", "how")  # no story word: a question starts where its story ends


def _title_entities(words: list[str]) -> list[tuple[str, str]]:
    """The entities a title can name besides the hero, in title order: the first friend met, the first object
    (`the <color> <noun>`) and the first place of the story, each only if the story has one."""
    found: dict[str, str] = {}
    for i, w in enumerate(words):
        if w == "meets":
            found.setdefault("friend", words[i + 1])
        elif w in COLORS and i + 1 < len(words) and words[i + 1] in NOUNS:
            found.setdefault("obj", f"the {w} {words[i + 1]}")
        elif w in PLACES:
            found.setdefault("place", w)
    return [(k, found[k]) for k in ("friend", "obj", "place") if k in found]


def _title(hero: str, named: list[tuple[str, str]]) -> str:
    items = [hero] + [v for k, v in named if k != "place"]
    place = "".join(f" in the {v}" for k, v in named if k == "place")
    return f"{join_items(items)}{place} :"


def _question_options(story_words: list[str]) -> dict[str, list[str]]:
    """The questions a story answers: kind -> sorted targets (kinds without a target left out)."""
    world = World()
    for s in split_sentences(story_words)[0]:
        world.apply(parse_sentence(s))
    people = world.people
    options = {
        "where": [x for x, p in people.items() if p.loc is not None],
        "have": [x for x, p in people.items() if p.holds is not None],
        "color": list(world.objects),
        "who": [n for n in world.objects if world.holder(n) is not None],
        "feel": [x for x, p in people.items() if p.mood is not None],
    }
    return {q: sorted(t) for q, t in options.items() if t}


def _question_and_answer(story: str, question: str, target: str) -> str:
    """`<question> ? <answer>`: the question as an instruction prompt words it, and its full-sentence answer."""
    spec = Spec("qa", story=story, question=question, target=target)
    return f"{render(spec).split(' question : ')[1]} {gold_answer(spec)}"


def _document(rng: random.Random) -> tuple[str, float, str]:
    """One document, its exact NLL (nats) under this generator, and its kind."""
    kind = _pick(rng, DOC_KINDS)
    story, nats = sample_story(rng)
    nats -= math.log(dict(DOC_KINDS)[kind])
    words = story.split()
    if kind == "titled":
        named = []
        for entity in _title_entities(words):
            keep = rng.random() < TITLE_ENTITY_PROB
            nats -= math.log(TITLE_ENTITY_PROB if keep else 1.0 - TITLE_ENTITY_PROB)
            named += [entity] if keep else []
        return f"{_title(words[0], named)} {story}", nats, kind
    if kind == "questions":
        options = _question_options(words)
        question = rng.choice(list(options))
        target = rng.choice(options[question])
        nats += math.log(len(options)) + math.log(len(options[question]))
        return f"{story} {_question_and_answer(story, question, target)}", nats, kind
    return story, nats, kind


def document_nll(text: str) -> float:
    """Exact NLL (nats) of a `pretrain_corpus` document under its generator; `math.inf` if it cannot occur.

    The inverse of `_document`, read back from the words alone (as `story_nll` is for stories), so tests can check
    that the recorded `nats`, and with them `entropy_floor`, are exact.
    """
    words = text.split()
    p_kind = dict(DOC_KINDS)
    if ":" in words:  # titled: `<title> : <story>`
        i = words.index(":")
        story = " ".join(words[i + 1 :])
        nll = story_nll(story)
        if nll == math.inf:
            return nll
        entities = _title_entities(words[i + 1 :])
        for mask in range(1 << len(entities)):
            named = [e for j, e in enumerate(entities) if mask >> j & 1]
            if _title(words[i + 1], named) == " ".join(words[: i + 1]):
                named_nats = -len(named) * math.log(TITLE_ENTITY_PROB)
                unnamed_nats = -(len(entities) - len(named)) * math.log(1.0 - TITLE_ENTITY_PROB)
                return nll - math.log(p_kind["titled"]) + named_nats + unnamed_nats
        return math.inf
    starts = [j for j, w in enumerate(words) if w in QUESTION_WORDS]
    if not starts:
        return story_nll(text) - math.log(p_kind["story"])
    story = " ".join(words[: starts[0]])
    nll = story_nll(story)
    if nll == math.inf:
        return nll
    options = _question_options(story.split())
    for question, targets in options.items():
        for target in targets:
            if f"{story} {_question_and_answer(story, question, target)}" == " ".join(words):
                return nll - math.log(p_kind["questions"]) + math.log(len(options)) + math.log(len(targets))
    return math.inf


def pretrain_corpus(n_stories: int = 20_000, seed: int = 0):
    """`n_stories` generated documents, one story each: plain (20%), under a title naming its hero and some of its
    entities (40%: `tom and the red ball in the park : tom finds ...`), or followed by a question about it and the
    answer (40%: `... where is tom ? tom is in the park .`).

    Columns: `text`, `nats` (exact -log p of the document under the generator, end event included), `n_words`,
    `kind` (`story`, `titled`, `questions`).
    """
    rng = random.Random(f"tinyworld-documents-{seed}")
    rows: dict[str, list] = {"text": [], "nats": [], "n_words": [], "kind": []}
    for _ in range(n_stories):
        text, nats, kind = _document(rng)
        rows["text"].append(text)
        rows["nats"].append(nats)
        rows["n_words"].append(text.count(" ") + 1)
        rows["kind"].append(kind)
    return datasets.Dataset.from_dict(rows)


def pretrain_split(n_stories: int, seed: int, test_size: float | int | None):
    """(train, held-out) of `pretrain_corpus(n_stories, seed)`, split as `align pretrain` splits it (split seed 0):
    what the pretraining stage trained on, rebuilt (word2vec reads the same documents, none held out)."""
    ds = pretrain_corpus(n_stories, seed=seed)
    return load.train_test({"train": ds}, train_split="train", test_split="test", test_size=test_size, seed=0)


def entropy_floor(ds) -> float:
    """Best achievable mean NLL per token (nats) of a causal LM on the packed stream `<bos> w1 .. wn <eos> <bos> ..`.

    A story contributes `n_words + 2` predicted positions (its words, its EOS, and the next BOS, which always
    follows an EOS and so costs 0 nats) and exactly `nats` nats (the EOS carries the end-of-story event), so
    `entropy_floor = sum(nats) / sum(n_words + 2)`. A model's eval loss minus this is what it has left to learn.
    It is a lower bound: where a block boundary cuts a story, the model cannot see the story's start.

    Args:
        ds: a `pretrain_corpus` dataset (or a split of it): columns `nats` and `n_words`.
    """
    names = getattr(ds, "column_names", None) or list(ds)
    missing = [c for c in ("nats", "n_words") if c not in names]
    if missing:
        raise AlignError(
            f"tinyworld.entropy_floor: columns {missing} missing (present: {list(names)}). "
            "Pass a dataset made by tinyworld.pretrain_corpus."
        )
    tokens = sum(n + 2 for n in ds["n_words"])
    if tokens == 0:
        raise AlignError("tinyworld.entropy_floor: the dataset has no rows. Pass at least one story.")
    return float(sum(ds["nats"])) / tokens


# Instructions


def _pick(rng: random.Random, weighted) -> str:
    r, cum = rng.random(), 0.0
    for item, p in weighted:
        cum += p
        if r < cum:
            return item
    return weighted[-1][0]


def _qa_spec(rng: random.Random) -> Spec | None:
    """A corpus-like story of 2-4 sentences and a question it answers (None: draw again)."""
    k = rng.randint(2, 4)
    words = forced_story(rng, {("end", j): j == k for j in range(1, k + 1)})
    if len(words) > QA_MAX_WORDS:
        return None
    options = _question_options(words)
    q = rng.choice(list(options))
    return Spec("qa", story=" ".join(words), question=q, target=rng.choice(options[q]))


def _sample_spec(rng: random.Random) -> Spec:
    kind = _pick(rng, KIND_PROBS)
    names = sorted(NAMES)
    name = rng.choice(names)
    if kind == "mention":
        others = [n for n in names if n != name]
        friend = rng.choice(others) if rng.random() < 0.5 else None
        obj = (rng.choice(COLORS), rng.choice(NOUNS)) if rng.random() < 0.5 else None
        place = rng.choice(PLACES) if rng.random() < 0.5 else None
        return Spec("mention", name=name, friend=friend, obj=obj, place=place)
    if kind == "count":
        return Spec("count", name=name, n=rng.randint(1, 5), style=rng.randint(0, 1))
    if kind == "end":
        subject = name if rng.random() < 0.5 else NAMES[name]
        if rng.random() < 0.5:
            ending = (subject, "feels", rng.choice(MOODS))
        else:
            ending = (subject, "goes", "to", "the", rng.choice(PLACES))
        return Spec("end", name=name, ending=ending)
    while True:
        spec = _qa_spec(rng)
        if spec is not None:
            return spec


def _is_test(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % TEST_SHARE == 0


def _split_specs(rng: random.Random, n: int, split: str):
    """`n` instructions of `split`: train and test draw from disjoint streams and disjoint prompt texts."""
    if split not in ("train", "test"):
        raise AlignError(f"tinyworld.instruction_prompts: split {split!r} is unknown. Use 'train' or 'test'.")
    want_test = split == "test"
    out = []
    while len(out) < n:
        spec = _sample_spec(rng)
        if _is_test(render(spec)) == want_test:
            out.append(spec)
    return out


def instruction_prompts(n: int, seed: int, split: str = "train"):
    """`n` instruction prompts: columns `prompt`, `kind`. Test prompts never occur among train prompts."""
    specs = _split_specs(random.Random(f"tinyworld-prompts-{split}-{seed}"), n, split)
    return datasets.Dataset.from_dict({"prompt": [render(s) for s in specs], "kind": [s.kind for s in specs]})


def is_tinyworld(prompts: Sequence[str]) -> bool:
    """Whether every prompt is a tiny-world instruction, so that the gold labeler can score the responses to them.

    False for no prompts: callers use the answer to decide whether to compute gold metrics, and there is nothing to
    score (a gold agreement over zero pairs has no value)."""
    try:
        for p in set(prompts):  # each prompt once: a ranked group repeats its prompt K times
            parse_prompt(p)
    except AlignError:
        return False
    return bool(prompts)


# Demonstrations


def _story_force(spec: Spec, rng: random.Random) -> dict:
    """Forced choices that make a story likely to follow `spec` (the caller still checks with the labeler)."""
    force: dict = {"name": spec.name}
    if spec.kind == "mention":
        if spec.obj:
            force.update(color=spec.obj[0], noun=spec.obj[1])
        if spec.friend:
            force["meet"] = spec.friend
        if spec.place:
            force["place"] = spec.place
    elif spec.kind == "count":
        force.update({("end", j): j == spec.n for j in range(1, spec.n + 1)})
    elif spec.kind == "end":
        k = rng.randint(2, 4)
        force.update({("end", j): j == k for j in range(1, k + 1)})
        subject, verb = spec.ending[0], spec.ending[1]
        force.update({("then", k): False, ("subj", k): subject, ("act", k): verb})
        force[("mood", k) if verb == "feels" else ("place", k)] = spec.ending[-1]
    return force


def _story_response(spec: Spec, rng: random.Random, force: dict, accept) -> str:
    prompt = render(spec)
    for _ in range(2000):
        text = " ".join(forced_story(rng, force))
        if accept(score_details(prompt, text)):
            return text
    raise RuntimeError(f"tinyworld: no story satisfies {prompt!r}")


def _perfect(d: dict) -> bool:
    """Meets every constraint; `length` is a soft preference (see `tinyworld_labeler`), so it is left out."""
    return all(d[k] == 1.0 for k in DETAIL_KEYS if k != "length")


def gold_response(prompt: str, seed: int = 0) -> str:
    """A best response to a tiny-world instruction (meets every constraint), deterministic in (prompt, seed)."""
    spec = parse_prompt(prompt)
    if spec.kind == "qa":
        return gold_answer(spec)
    rng = random.Random(f"tinyworld-gold-{seed}-{prompt}")
    # Half the ideal length or better: a best response scores >= 0.966 (length weighs 0.45 * 0.15).
    return _story_response(spec, rng, _story_force(spec, rng), lambda d: _perfect(d) and d["length"] >= 0.5)


def _flaw(spec: Spec, gold: str, rng: random.Random) -> str:
    """`gold` with one realistic flaw: half the time a repeated sentence or a last sentence cut off, else a wrong
    answer (`qa`), a missing entity (`mention`), one sentence too many or too few (`count`), no required ending."""
    sents = [s + " ." for s in gold[:-2].split(" . ")]
    flaws = ["repeat", "cut"]
    if spec.kind == "qa":
        flaws += ["wrong", "wrong"]
    else:
        flaws += [spec.kind, spec.kind]
    flaw = rng.choice(flaws)
    if flaw == "repeat":
        i = rng.randrange(len(sents))
        return " ".join(sents[: i + 1] + [sents[i]] + sents[i + 1 :])
    if flaw == "cut":
        words = gold.split()[:-1]
        return " ".join(words[: max(1, len(words) - rng.randint(0, 2))])
    if flaw == "wrong":
        qa = qa_answers(spec)
        pool = {"where": PLACES, "have": COLORS, "color": COLORS, "who": sorted(NAMES), "feel": MOODS}
        old = qa.key if spec.question != "have" else qa.world.objects[qa.key][1]
        new = rng.choice([w for w in pool[spec.question] if w != old and w != spec.target])
        return " ".join(new if w == old else w for w in gold.split())
    sub = random.Random(rng.random())
    if flaw == "mention":  # leave out one of the requested entities
        missing = rng.choice([e for e in ("friend", "obj", "place") if getattr(spec, e)] or ["name"])
        if missing == "name":
            reduced = Spec("mention", name=rng.choice([n for n in sorted(NAMES) if n != spec.name]))
        else:
            reduced = Spec(**{**spec.__dict__, missing: None})
        return _missing(spec, reduced, sub)
    if flaw == "count":
        n = spec.n + rng.choice([-1, 1]) if spec.n > 1 else 2
        wrong = Spec("count", name=spec.name, n=n, style=spec.style)
        return _story_response(wrong, sub, _story_force(wrong, sub), _perfect)
    return _no_ending(spec, Spec("count", name=spec.name, n=rng.randint(2, 4)), sub)


def _missing(spec: Spec, reduced: Spec, rng: random.Random) -> str:
    """A perfect answer to the `reduced` instruction that misses something `spec` asks for."""
    prompt = render(spec)
    for _ in range(2000):
        text = " ".join(forced_story(rng, _story_force(reduced, rng)))
        if _perfect(score_details(render(reduced), text)) and score_details(prompt, text)["task"] < 1.0:
            return text
    raise RuntimeError(f"tinyworld: no flawed story for {prompt!r}")


def _no_ending(spec: Spec, plain: Spec, rng: random.Random) -> str:
    """A good story about the subject that does not end as `spec` asks."""
    for _ in range(2000):
        text = " ".join(forced_story(rng, _story_force(plain, rng)))
        if tuple(spec.ending) not in split_sentences(text.split())[0]:
            return text
    raise RuntimeError(f"tinyworld: no flawed story for {render(spec)!r}")


def _habit(spec: Spec, gold: str, rng: random.Random) -> str:
    """`gold` as the demonstrators' one habit gets it wrong: they stop a step short, the same way every time.

    `count`: one sentence fewer than asked (n >= 2); `end`: the story stops before its required last sentence;
    `mention`: the last entity the instruction lists is left out (the place, else the object, else the friend);
    `qa`: the story's sentence holding the answer is quoted instead of answering the question. The habit is kept
    only where it costs the gold score something (>= 0.1); elsewhere (e.g. `count` with n = 1) `gold` is returned.
    """
    prompt = render(spec)
    sents = [s + " ." for s in gold[:-2].split(" . ")]
    habit = gold
    if spec.kind == "count" and spec.n >= 2:
        short = Spec("count", name=spec.name, n=spec.n - 1, style=spec.style)
        habit = _story_response(short, rng, _story_force(short, rng), _perfect)
    elif spec.kind == "end" and len(sents) > 1:
        habit = " ".join(sents[:-1])
    elif spec.kind == "mention":
        last = next((e for e in ("place", "obj", "friend") if getattr(spec, e)), None)
        if last is not None:
            habit = _missing(spec, Spec(**{**spec.__dict__, last: None}), rng)
    elif spec.kind == "qa":
        key = qa_answers(spec).key
        story = [s + " ." for s in spec.story[:-2].split(" . ")]
        evidence = [s for s in story if key in s.split()]
        if evidence:
            habit = evidence[-1]
    return habit if score(prompt, habit) <= score(prompt, gold) - 0.1 else gold


def demonstrations(n: int, seed: int = 0, error_rate: float = 0.3, habit_rate: float = 0.0):
    """`n` SFT demonstrations on train prompts: columns `prompt`, `completion`, `kind`, `flawed`, `habit`.

    Two kinds of imperfection, as human demonstrators have:
    - with probability `habit_rate` a demonstration shows the demonstrators' habit (`_habit`): the same step left
      undone every time. Above ~0.5 it is what SFT's most likely answer does, so greedy decoding keeps it; the
      rarer right answers are still sampled, and rankings reveal them: the headroom InstructGPT's comparisons are
      for (recipes/tiny uses 0.7);
    - otherwise, with probability `error_rate`, one random flaw (`_flaw`): noise that greedy decoding of an SFT
      model already removes.
    `flawed` marks either kind, `habit` the first.
    """
    for key, rate in (("error_rate", error_rate), ("habit_rate", habit_rate)):
        if not 0.0 <= rate <= 1.0:
            raise AlignError(f"tinyworld.demonstrations: {key} {rate} is not in [0, 1]. Use e.g. 0.3.")
    rng = random.Random(f"tinyworld-demos-{seed}")
    rows: dict[str, list] = {"prompt": [], "completion": [], "kind": [], "flawed": [], "habit": []}
    for spec in _split_specs(rng, n, "train"):
        prompt = render(spec)
        gold = gold_response(prompt, seed=rng.randrange(1 << 30))
        completion = gold
        if habit_rate and rng.random() < habit_rate:  # habit_rate 0 draws nothing: demonstrations stay as they were
            completion = _habit(spec, gold, rng)
        habit = completion != gold
        flawed = habit or rng.random() < error_rate
        if flawed and not habit:
            completion = _flaw(spec, gold, rng)
        rows["prompt"].append(prompt)
        rows["completion"].append(completion)
        rows["kind"].append(spec.kind)
        rows["flawed"].append(flawed)
        rows["habit"].append(habit)
    return datasets.Dataset.from_dict(rows)
