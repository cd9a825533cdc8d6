"""The tiny world: align's embedded, self-generated data for running the whole InstructGPT chain offline.

Because we generate the world we can measure honestly:
- `pretrain_corpus`: stories from a probabilistic grammar that records the exact NLL of each story, so
  `entropy_floor` is the best mean loss any causal LM can reach on it;
- `instruction_prompts`: instructions with checkable constraints (kinds `mention`, `count`, `qa`, `end`);
- `score` / `score_details`: the hidden gold labeler (stand-in for human labelers; ranks and evaluates, never
  trains directly);
- `demonstrations`: SFT data written by deliberately imperfect demonstrators (a share of realistic flaws).

Text is lowercase words separated by single spaces, punctuation as separate words; every word is in `vocabulary()`.
The grammar lives in `tinyworld_grammar`, the instructions and labeler in `tinyworld_labeler`.
"""

from __future__ import annotations

import logging
import random
import zlib

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
    parse_prompt,
    qa_answers,
    render,
    score,
    score_details,
)
from align.errors import AlignError

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "demonstrations",
    "entropy_floor",
    "gold_response",
    "instruction_prompts",
    "pretrain_corpus",
    "sample_story",
    "score",
    "score_details",
    "story_nll",
    "vocabulary",
]

KIND_PROBS = (("mention", 0.3), ("count", 0.25), ("qa", 0.3), ("end", 0.15))
TEST_SHARE = 10  # one prompt text in TEST_SHARE is held out (by hash), so train and test prompts never overlap
QA_MAX_WORDS = 40  # keeps a QA prompt under ~50 words, prompt + answer well under 128 tokens


# Pretraining corpus


def pretrain_corpus(n_stories: int = 20_000, seed: int = 0):
    """`n_stories` generated stories.

    Columns: `text`, `nats` (exact -log p of the story under the generator, end event included), `n_words`.
    """
    import datasets

    rng = random.Random(f"tinyworld-stories-{seed}")
    texts, nats, n_words = [], [], []
    for _ in range(n_stories):
        text, nll = sample_story(rng)
        texts.append(text)
        nats.append(nll)
        n_words.append(text.count(" ") + 1)
    return datasets.Dataset.from_dict({"text": texts, "nats": nats, "n_words": n_words})


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
    world = World()
    for s in split_sentences(words)[0]:
        world.apply(parse_sentence(s))
    people = world.people
    options = {
        "where": [x for x, p in people.items() if p.loc is not None],
        "have": [x for x, p in people.items() if p.holds is not None],
        "color": list(world.objects),
        "who": [n for n in world.objects if world.holder(n) is not None],
        "feel": [x for x, p in people.items() if p.mood is not None],
    }
    kinds = [q for q in options if options[q]]
    q = rng.choice(kinds)
    return Spec("qa", story=" ".join(words), question=q, target=rng.choice(sorted(options[q])))


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
    import datasets

    specs = _split_specs(random.Random(f"tinyworld-prompts-{split}-{seed}"), n, split)
    return datasets.Dataset.from_dict({"prompt": [render(s) for s in specs], "kind": [s.kind for s in specs]})


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


def demonstrations(n: int, seed: int = 0, error_rate: float = 0.3):
    """`n` SFT demonstrations on train prompts: columns `prompt`, `completion`, `kind`, `flawed`.

    With probability `error_rate` a demonstration has one realistic flaw (see `_flaw`), as imperfect human
    demonstrators would: SFT imitates them, and ranking + PPO have something to improve.
    """
    import datasets

    if not 0.0 <= error_rate <= 1.0:
        raise AlignError(f"tinyworld.demonstrations: error_rate {error_rate} is not in [0, 1]. Use e.g. 0.3.")
    rng = random.Random(f"tinyworld-demos-{seed}")
    rows: dict[str, list] = {"prompt": [], "completion": [], "kind": [], "flawed": []}
    for spec in _split_specs(rng, n, "train"):
        prompt = render(spec)
        gold = gold_response(prompt, seed=rng.randrange(1 << 30))
        flawed = rng.random() < error_rate
        rows["prompt"].append(prompt)
        rows["completion"].append(_flaw(spec, gold, rng) if flawed else gold)
        rows["kind"].append(spec.kind)
        rows["flawed"].append(flawed)
    return datasets.Dataset.from_dict(rows)
