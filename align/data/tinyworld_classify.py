"""Tiny-world classification tasks for `align classify` (GPT-1's discriminative fine-tuning), labels read off the
world state, so they are exactly known.

Each task is one of GPT-1's input transformations (Radford et al. 2018, Sec. 3.3 and Fig. 1,
https://cdn.openai.com/research-covers/language-unsupervised/language_understanding_paper.pdf):

- `happy`, single text: `text` (a story with a `feels` sentence); label `yes` if the hero's last mood is happy,
  else `no`.
- `entail`, pair (premise, hypothesis): `text` (a story), `text_pair` (`tom is in the park .`); label `entailment`
  if the hero ends there, else `contradiction`.
- `same_place`, similarity (a symmetric pair): `text`, `text_pair` (two stories); label `same` if both heroes end
  in the same place, else `different`.
- `where`, multiple choice: `text` (a story + `where is tom ?`), `choices` (4 answers); label the index of the
  true one.

`places` (held-out transfer): rows whose every place, in the story and in the pair or choices, is one of `places`
(`where`: the 4 choices are exactly those places; `entail`: the hypothesis names one; `same_place`: both stories
end in one), or, with `avoid`, rows that mention none of them. `split_by_place` builds a training set that never
mentions `HELDOUT_PLACES` and a held-out set about them, so only pretraining can have taught the model those words.

Stories come from the grammar's generator (`tinyworld_grammar.sample_story`), so their text is pretraining text;
labels come from replaying each story through `World` (the gold labeler's state tracker). Classes are balanced
(`where`: the true answer's position is uniform), and examples are unique, so a held-out split never repeats a
training example.
"""

from __future__ import annotations

import random
from typing import Any

import datasets

from align.data.tinyworld_grammar import PLACES, World, parse_sentence, sample_story, split_sentences

# task -> the input format it is (align.data.classification.INPUT_FORMATS)
TASKS: dict[str, str] = {"happy": "single", "entail": "pair", "same_place": "similarity", "where": "multiple_choice"}
NUM_CHOICES = 4  # `where`: the true place and 3 others
HELDOUT_PLACES = PLACES[-NUM_CHOICES:]  # `split_by_place`: the places no training row mentions


def final_state(story: str) -> tuple[str, str | None, str | None]:
    """(hero, the hero's place at the end or None, the hero's last mood or None), replayed through `World`."""
    words = story.split()
    sentences, _ = split_sentences(words)
    world = World()
    for s in sentences:
        if not world.apply(parse_sentence(s)):
            raise ValueError(f"not a consistent tiny-world story: {story!r}")
    hero = words[0]
    person = world.person(hero)
    return hero, person.loc, person.mood


def _stories(rng: random.Random, places: tuple[str, ...] | None = None, avoid: bool = False):
    """(story, hero, final place, final mood), forever. With `places`: only stories whose hero ends in one of them
    (`avoid`: stories that mention none of them)."""
    banned = set(places or ()) if avoid else set()
    while True:
        story, _ = sample_story(rng)
        if banned and banned & set(story.split()):
            continue
        hero, loc, mood = final_state(story)
        if places and not avoid and loc not in places:
            continue
        yield story, hero, loc, mood


def examples(task: str, n: int, seed: int = 0, places: tuple[str, ...] | None = None,
             avoid: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """`n` unique, class-balanced examples of `task` (rows with the columns listed above); `places`, `avoid`: see
    the module's docstring."""
    if task not in TASKS:
        raise ValueError(f"unknown tiny-world classification task {task!r}; choose one of {', '.join(TASKS)}")
    if places is not None and task == "happy":
        raise ValueError("tiny world: `happy` asks about moods, not places; held-out places need entail, same_place "
                         "or where")  # fmt: skip
    part = f"-{'avoid' if avoid else 'only'}-{'-'.join(places)}" if places else ""  # the unrestricted rows as before
    rng = random.Random(f"classify-{task}-{seed}{part}")
    pool = tuple(p for p in PLACES if p not in places) if places and avoid else (places or PLACES)
    make = {"happy": _happy, "entail": _entail, "same_place": _same_place, "where": _where}[task]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    labels = _labels(task)
    quota = {label: n // len(labels) + (i < n % len(labels)) for i, label in enumerate(labels)}
    stories = _stories(rng, places, avoid)
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            break
        row = make(rng, stories, pool)
        if row is None:
            continue
        key = repr(sorted(row.items()))
        label = row["label"]
        if key in seen or quota[label] == 0:
            continue
        seen.add(key)
        quota[label] -= 1
        out.append(row)
    if len(out) < n:
        raise ValueError(f"tiny world: only {len(out)} unique {task} examples found of the {n} asked; ask fewer")
    rng.shuffle(out)
    return out


def dataset(task: str, n: int, seed: int = 0):
    """`examples` as a `datasets.Dataset`."""
    rows = examples(task, n, seed)
    return datasets.Dataset.from_list(rows)


def split_by_place(task: str, n_train: int, n_test: int, seed: int = 0):
    """A `datasets.DatasetDict`: `train` rows that never mention `HELDOUT_PLACES`, `test` rows about them only."""
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_list(examples(task, n_train, seed, places=HELDOUT_PLACES, avoid=True)),
        "test": datasets.Dataset.from_list(examples(task, n_test, seed, places=HELDOUT_PLACES)),
    })  # fmt: skip


def _labels(task: str) -> list[Any]:
    return {"happy": ["yes", "no"], "entail": ["entailment", "contradiction"], "same_place": ["same", "different"],
            "where": list(range(NUM_CHOICES))}[task]  # fmt: skip


def _happy(rng, stories, pool) -> dict[str, Any] | None:
    story, _, _, mood = next(stories)
    if mood is None:  # no `feels` sentence: the question has no answer
        return None
    return {"text": story, "label": "yes" if mood == "happy" else "no"}


def _entail(rng, stories, pool) -> dict[str, Any] | None:
    story, hero, loc, _ = next(stories)
    if loc is None:
        return None
    place = loc if rng.random() < 0.5 else rng.choice([p for p in pool if p != loc])
    return {"text": story, "text_pair": f"{hero} is in the {place} .",
            "label": "entailment" if place == loc else "contradiction"}  # fmt: skip


def _same_place(rng, stories, pool) -> dict[str, Any] | None:
    a, _, loc_a, _ = next(stories)
    if loc_a is None:
        return None
    want_same = rng.random() < 0.5
    for _ in range(200):
        b, _, loc_b, _ = next(stories)
        if loc_b is not None and (loc_b == loc_a) == want_same:
            return {"text": a, "text_pair": b, "label": "same" if want_same else "different"}
    return None


def _where(rng, stories, pool) -> dict[str, Any] | None:
    story, hero, loc, _ = next(stories)
    if loc is None:
        return None
    places = [loc, *rng.sample([p for p in pool if p != loc], NUM_CHOICES - 1)]
    rng.shuffle(places)
    return {"text": f"{story} where is {hero} ?", "choices": [f"{hero} is in the {p} ." for p in places],
            "label": places.index(loc)}  # fmt: skip
