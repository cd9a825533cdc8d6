"""Verifiable instructions: everyday requests with checkable constraints and their gold checker (IFEval-style).

Modelled on IFEval (Zhou et al. 2023, https://arxiv.org/abs/2311.07911) and the RLVR part of Tülu 3 (Lambert et
al. 2024, https://arxiv.org/abs/2411.15124): a request ("Describe your favourite park.") followed by 1-3 instruction
sentences ("Answer with at most 60 words. Do not use any commas in your response."), each rendered from a
`Constraint` whose check is a deterministic function of the response. The checker sees only the prompt TEXT, as
align's rank stage calls a labeler, so every instruction sentence is an exact template that `parse_constraints`
reads back with a regex.

    python -m align.data.verifiable --split test --n 200 --out data/ifeval_test.jsonl
    # recipe: labeler: align.data.verifiable:labeler      dataset_name: data/ifeval_train.jsonl

Scores, in [0, 1]: each constraint gives a `value`, 1 exactly when it passes; failing counts earn partial credit so
that K sampled responses rarely tie (rankings need an order): "at least n" earns count / n, "at most n" earns
1 - (count - n) / n (floored at 0), "exactly n" earns half of 1 - |count - n| / n. `score` is the mean value over the
prompt's constraints; `score(..., strict=True)` is the mean of pass/fail (IFEval's instruction-level accuracy,
Tülu 3's binary verifiable reward), and `score_detail(...)["all_passed"]` is IFEval's prompt-level accuracy. `labeler`
(graded) and `strict_labeler` (pass/fail) have the rank stage's `labeler(prompt, responses) -> scores` signature.

Tolerance, as in IFEval's checks: the response is stripped of surrounding whitespace first; keywords, the avoided
word, the start word, the end phrase and the repeated request match case-insensitively (words on word boundaries,
phrases with whitespace runs collapsed). An empty or whitespace-only response fails EVERY constraint, "no commas"
and "avoid word" included: an empty answer follows no instruction, and rewarding it would teach RL to stop at once.

Held-out split: `test` prompts use topics that never appear in `train` (`TEST_TOPICS`) and, when they hold 2+
constraints, at least one held-out kind pair (`HELD_OUT_PAIRS`: crc32 of the sorted pair "a+b" is 0 mod 5), which
`train` prompts never hold; so no test combination of 2+ kinds is a train combination or part of one. Single
constraints appear in both splits (every kind must be learnable).

Two tasks (`TASKS`). `full`: all 19 kinds, 1-3 per prompt, answers up to ~128 tokens (the GPU recipe). `short`: the 9
kinds a response settles within its first ~48 tokens (`SHORT_KINDS`: no commas, lowercase, a <<title>>, a given
first word, a keyword included or avoided, placeholders, quotation marks, JSON), 1-2 per prompt, requests that ask for
a brief answer, and the kinds drawn so each is used about equally often (the least used kind first) in both splits,
so test and train share one mix; its test split holds out topics only. It is what 2 CPU cores can teach.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from align.errors import AlignError
from align.io import atomic_write_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
RELATIONS = ("at least", "at most")

# Counts are kept small so that a 135M instruct model satisfies some of them by chance: the RL gain must be
# measurable from a non-zero start.
WORD_COUNTS = {"at least": (20, 30, 40, 60, 80), "at most": (40, 60, 80, 100, 120)}
SENTENCE_COUNTS = {"at least": (3, 4, 5), "at most": (3, 4, 5, 6)}
PARAGRAPH_COUNTS = (2, 3)
BULLET_COUNTS = (2, 3, 4)
CAPITAL_COUNTS = (2, 3, 4)
PLACEHOLDER_COUNTS = (1, 2, 3)
LETTER_COUNTS = (3, 4, 5, 6)
LETTERS = ("b", "f", "g", "k", "p", "v", "w", "y")
# Pools are disjoint (tests check it) so that a keyword is never also the avoided word, and neither the start words,
# the end phrases nor any topic contains an avoided word or a comma.
KEYWORDS = ("today", "friend", "plan", "simple", "morning", "weekend", "patience", "budget", "careful", "together",
            "surprise", "reason", "example", "honest", "quiet", "habit", "energy", "choice", "memory", "calm")
AVOID_WORDS = ("very", "really", "just", "basically", "actually", "nice", "amazing", "definitely", "stuff", "good",
               "literally", "thing", "important")
START_WORDS = ("Sure", "Honestly", "Today", "Imagine", "Well", "First", "Hello", "Remember")
END_PHRASES = ("Is there anything else I can help with?", "Have a great day!", "Thanks for reading.",
               "Let me know what you think.", "That is all for now.", "I hope this helps.", "Take care.",
               "See you soon.")
REQUEST_FORMS = ("{T}.", "Please {t}.", "Could you {t}?", "I need your help: {t}.")
# The short task's requests ask for a brief answer, so that one fits in 64 new tokens and a closing quote or brace is
# reached; they hold no comma (a "no commas" prompt must not contain one).
SHORT_REQUEST_FORMS = ("Briefly {t}.", "{T} in two sentences.", "Could you briefly {t}?", "In a few words: {t}.")

TRAIN_TOPICS = (
    "write a short email to your landlord about a broken heater", "describe your favourite park",
    "give tips for a first job interview", "explain how to make a cup of tea",
    "write a thank-you note to a neighbour who watered your plants", "describe a rainy afternoon at home",
    "suggest ideas for a cheap birthday party", "explain why sleep matters for students",
    "write a message inviting friends to a picnic", "give advice on keeping a houseplant alive",
    "describe the view from your window", "explain how to plan a weekly grocery list",
    "write a short review of a local bakery", "give tips for learning to ride a bike",
    "describe your morning routine", "write a note asking a coworker to swap shifts",
    "explain how to save money on groceries", "suggest ways to spend a quiet Sunday",
    "describe a favourite childhood toy", "give tips for a long car trip with kids",
    "write an apology to a friend for missing their call", "explain how to clean a kitchen quickly",
    "describe a busy train station", "give advice to someone starting to run",
    "write a short welcome message for a new team member", "explain how to pack for a weekend trip",
    "describe the smell of fresh bread", "suggest healthy snacks for the office",
    "write a reminder to your roommate about taking out the trash", "give tips for studying for an exam",
    "describe a walk along the beach", "explain how to care for a new puppy",
    "write a short speech for a friend's birthday dinner", "give advice on choosing a used car",
    "describe your ideal weekend breakfast", "explain how to write a shopping budget",
    "write a complaint to a store about a late delivery", "suggest games to play on a rainy day",
    "describe a street market in summer", "give tips for staying focused while working from home",
    "write a postcard to your grandmother from a holiday", "explain how to start a small vegetable garden",
    "describe your first day at a new school", "give advice on making new friends in a new city",
    "write a note to a teacher about a sick child", "explain how to prepare for a power cut",
    "describe a snowy morning in town", "suggest ways to reduce plastic at home",
    "write a short message congratulating a friend on a new job", "give tips for taking better phone photos",
    "describe a visit to the dentist", "explain how to organise a messy closet",
    "write an invitation to a book club meeting", "give advice on getting up early",
    "describe your favourite meal", "explain how to change a flat bicycle tyre",
    "write a short note to thank a bus driver", "suggest ways to keep cool during a heat wave",
    "describe a local library", "give tips for hosting a dinner party",
    "write a message to a neighbour about a noisy party", "explain how to make a simple sandwich",
    "describe a trip to the zoo", "give advice on learning a new language",
)
TEST_TOPICS = (
    "write an email to your manager asking for a day off", "describe a thunderstorm at night",
    "give tips for moving to a new flat", "explain how to bake simple cookies",
    "write a note to your mail carrier about a lost parcel", "describe your favourite cafe",
    "suggest ways to make a small room feel bigger", "give advice on preparing for a marathon",
    "write a short letter to a pen pal", "explain how to wash a wool sweater",
    "describe a farmers market in autumn", "give tips for a first camping trip",
    "write a message asking a friend to return a borrowed book", "explain how to water a lawn in summer",
    "describe a crowded bus ride to work", "suggest ideas for a family movie night",
    "give advice on talking to a shy child", "write a thank-you card to a nurse",
    "explain how to set up a bird feeder", "describe the sounds of a city at dawn",
)

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
# A period after single-letter initials (P.S., e.g., U.S.) or a title does not end a sentence.
_ABBREVIATION = re.compile(r"(?:\b[A-Za-z]\.)+$|\b(?:Mr|Mrs|Ms|Dr|St|vs)\.$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)])\s+")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_DIVIDER = re.compile(r"(?<!\*)\*\*\*(?!\*)")
_FENCED = re.compile(r"```[ \t]*[A-Za-z]*[ \t]*\n?(.*?)\s*```", re.DOTALL)
_TITLE = re.compile(r"<<([^<>\n]+)>>")
_POSTSCRIPT = re.compile(r"^[ \t]*p\.[ \t]?s\.[ \t]*\S", re.IGNORECASE | re.MULTILINE)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")


class UnknownPromptError(AlignError, ValueError):
    """A prompt holding no instruction sentence this module renders (so no constraint to check)."""


# Counting


def count_words(text: str) -> int:
    """Runs of letters/digits, with ' ’ or - inside (don't, first-time: one word); punctuation and markdown are not."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentences: pieces ending in . ! ? (or a line break) holding a letter or digit; initials such as P.S. don't end
    one, so a bullet, a title line or a P.S. line each count as one."""
    n = 0
    for line in text.splitlines():
        pending = ""
        for piece in _SENTENCE_END.split(line.strip()):
            pending = f"{pending} {piece}" if pending else piece
            if not _ABBREVIATION.search(piece):
                n += bool(re.search(r"\w", pending))
                pending = ""
        n += bool(re.search(r"\w", pending))
    return n


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w'’-]){re.escape(word)}(?![\w'’-])", text, re.IGNORECASE) is not None


def _graded(count: int, n: int, relation: str) -> float:
    """1 when `count` meets `relation n`, else the partial credit of the module docstring (always < 1)."""
    if relation == "at least":
        return 1.0 if count >= n else count / n
    if relation == "at most":
        return 1.0 if count <= n else max(0.0, 1 - (count - n) / n)
    return 1.0 if count == n else 0.5 * max(0.0, 1 - abs(count - n) / n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Constraints

# A template field's text in a prompt: `instruction()` fills the template, `pattern` (compiled from the same
# template) reads the fields back, so rendering and parsing cannot drift apart.
_FIELD_PATTERNS = {"relation": "at least|at most", "n": r"\d+", "word": r"\w+", "phrase": '[^"]+', "letter": "[a-z]"}


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELD_PATTERNS[p]})"
                              for i, p in enumerate(parts)))


@dataclass(frozen=True)
class Constraint:
    """One verifiable instruction: `instruction()` renders it, `value(response)` grades it, `check` = value is 1."""

    kind: ClassVar[str] = ""
    template: ClassVar[str] = ""  # the instruction sentence, {field} for each parameter
    pattern: ClassVar[re.Pattern[str]]
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}  # field -> values `sample` draws from

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.template and "pattern" not in cls.__dict__:
            cls.pattern = _template_pattern(cls.template)

    def instruction(self) -> str:
        """The sentence appended to the request; `pattern` reads it back."""
        return self.template.format(**asdict(self))

    def grade(self, text: str) -> float:
        """Value in [0, 1] of a stripped, non-empty response: 1 exactly when the constraint holds."""
        raise NotImplementedError

    def value(self, response: str) -> float:
        """Graded value in [0, 1]; 0 for an empty or whitespace-only response (see the module docstring)."""
        text = response.strip()
        return 0.0 if not text else min(1.0, max(0.0, float(self.grade(text))))

    def check(self, response: str) -> bool:
        """Whether `response` follows the instruction."""
        return self.value(response) == 1.0

    def to_dict(self) -> dict[str, Any]:
        """`{"kind": ..., **params}`, JSON-ready (tuples become lists)."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"kind": self.kind, **params}

    @classmethod
    def from_match(cls, m: re.Match[str], request: str) -> Constraint:
        """The constraint whose instruction `m` matched; `request` is the prompt text before the instructions."""
        return cls(**{k: int(v) if k == "n" else v for k, v in m.groupdict().items()})

    @classmethod
    def sample(cls, rng: random.Random, request: str) -> Constraint:
        """Random parameters for a prompt whose request is `request`."""
        return cls(**{k: rng.choice(v) for k, v in cls.choices.items()})


KINDS: dict[str, type[Constraint]] = {}


def _register(cls: type[Constraint]) -> type[Constraint]:
    KINDS[cls.kind] = cls
    return cls


def _caps_share(text: str, case: str) -> float:
    """1 if `text` has a letter and equals text.lower() (`case` "lower") or text.upper(), else half the share of its
    words that do."""
    words = [w for w in _WORD.findall(text) if any(c.isalpha() for c in w)]
    if not words:
        return 0.0
    if text == getattr(text, case)():
        return 1.0
    return 0.5 * sum(w == getattr(w, case)() for w in words) / len(words)


@_register
@dataclass(frozen=True)
class WordCount(Constraint):
    """The response has at least / at most n words (`count_words`)."""

    relation: str
    n: int
    kind: ClassVar[str] = "word_count"
    template: ClassVar[str] = "Answer with {relation} {n} words."
    counts: ClassVar[dict[str, tuple[int, ...]]] = WORD_COUNTS

    def grade(self, text: str) -> float:
        return _graded(count_words(text), self.n, self.relation)

    @classmethod
    def sample(cls, rng: random.Random, request: str) -> Constraint:
        relation = rng.choice(RELATIONS)
        return cls(relation, rng.choice(cls.counts[relation]))


@_register
@dataclass(frozen=True)
class SentenceCount(WordCount):
    """The response has at least / at most n sentences (`count_sentences`)."""

    kind: ClassVar[str] = "sentence_count"
    template: ClassVar[str] = "Your response must contain {relation} {n} sentences."
    counts: ClassVar[dict[str, tuple[int, ...]]] = SENTENCE_COUNTS

    def grade(self, text: str) -> float:
        return _graded(count_sentences(text), self.n, self.relation)


@_register
@dataclass(frozen=True)
class Paragraphs(Constraint):
    """Exactly n non-empty paragraphs split by `***`; a leading or trailing divider is ignored, an empty inner one
    fails."""

    n: int
    kind: ClassVar[str] = "paragraphs"
    template: ClassVar[str] = (
        "Write exactly {n} paragraphs and separate them with the markdown divider *** on its own line."
    )
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"n": PARAGRAPH_COUNTS}

    def grade(self, text: str) -> float:
        parts = [p.strip() for p in _DIVIDER.split(text)]
        parts = parts[bool(parts) and not parts[0]:]
        parts = parts[: len(parts) - (bool(parts) and not parts[-1])]
        return _graded(len(parts), self.n, "exactly") if all(parts) else 0.0


@_register
@dataclass(frozen=True)
class Bullets(Constraint):
    """Exactly n lines starting with `* ` or `- ` (after indentation); a `***` divider is not a bullet."""

    n: int
    kind: ClassVar[str] = "bullets"
    template: ClassVar[str] = 'Use exactly {n} bullet points, each on its own line starting with "* ".'
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"n": BULLET_COUNTS}

    def grade(self, text: str) -> float:
        return _graded(len(_BULLET.findall(text)), self.n, "exactly")


@_register
@dataclass(frozen=True)
class Keywords(Constraint):
    """Every keyword appears as a whole word, any case; value = share present."""

    keywords: tuple[str, ...]
    kind: ClassVar[str] = "keywords"
    pattern: ClassVar[re.Pattern[str]] = re.compile(r'Include the keywords? ("\w+"(?: and "\w+")?) in your response\.')

    def __post_init__(self) -> None:
        object.__setattr__(self, "keywords", tuple(self.keywords))  # from JSON the keywords arrive as a list

    def instruction(self) -> str:
        quoted = " and ".join(f'"{k}"' for k in self.keywords)
        return f"Include the keyword{'s' if len(self.keywords) > 1 else ''} {quoted} in your response."

    def grade(self, text: str) -> float:
        return sum(has_word(text, k) for k in self.keywords) / len(self.keywords)

    @classmethod
    def from_match(cls, m: re.Match[str], request: str) -> Constraint:
        return cls(tuple(re.findall(r'"(\w+)"', m[1])))

    @classmethod
    def sample(cls, rng: random.Random, request: str) -> Constraint:
        return cls(tuple(rng.sample(KEYWORDS, rng.choice((1, 2)))))


@_register
@dataclass(frozen=True)
class AvoidWord(Constraint):
    """The word does not appear as a whole word, any case (other forms such as "things" for "thing" are allowed)."""

    word: str
    kind: ClassVar[str] = "avoid_word"
    template: ClassVar[str] = 'Do not use the word "{word}" anywhere in your response.'
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"word": AVOID_WORDS}

    def grade(self, text: str) -> float:
        return 0.0 if has_word(text, self.word) else 1.0


@_register
@dataclass(frozen=True)
class Lowercase(Constraint):
    """No uppercase letter, and at least one letter; value otherwise half the share of words without capitals."""

    kind: ClassVar[str] = "lowercase"
    template: ClassVar[str] = "Write your entire response in lowercase letters; no capital letters are allowed."

    def grade(self, text: str) -> float:
        return _caps_share(text, "lower")


@_register
@dataclass(frozen=True)
class Uppercase(Constraint):
    """No lowercase letter, and at least one letter; value otherwise half the share of words without lowercase."""

    kind: ClassVar[str] = "uppercase"
    template: ClassVar[str] = "Write your entire response in capital letters only."

    def grade(self, text: str) -> float:
        return _caps_share(text, "upper")


@_register
@dataclass(frozen=True)
class CapitalWords(Constraint):
    """At least n words of 2+ letters written in capitals only ("I", "A" and the P of P.S. don't count)."""

    n: int
    kind: ClassVar[str] = "capital_words"
    template: ClassVar[str] = "Write at least {n} words entirely in capital letters for emphasis."
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"n": CAPITAL_COUNTS}

    def grade(self, text: str) -> float:
        caps = [w for w in _WORD.findall(text) if sum(c.isalpha() for c in w) >= 2 and w == w.upper()]
        return _graded(len(caps), self.n, "at least")


@_register
@dataclass(frozen=True)
class EndPhrase(Constraint):
    """The response ends with the phrase, any case, whitespace runs collapsed; 0.5 if it appears elsewhere."""

    phrase: str
    kind: ClassVar[str] = "end_phrase"
    template: ClassVar[str] = 'End your response with the exact phrase "{phrase}" and nothing after it.'
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"phrase": END_PHRASES}

    def grade(self, text: str) -> float:
        body, phrase = _norm(text), _norm(self.phrase)
        return 1.0 if body.endswith(phrase) else 0.5 if phrase in body else 0.0


@_register
@dataclass(frozen=True)
class StartWord(Constraint):
    """The first word, after any leading punctuation or markdown (quotes, `*`, `#`), is the word, any case."""

    word: str
    kind: ClassVar[str] = "start_word"
    template: ClassVar[str] = 'Start your response with the word "{word}".'
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"word": START_WORDS}

    def grade(self, text: str) -> float:
        first = _WORD.search(text)
        return float(first is not None and first.group().lower() == self.word.lower())


@_register
@dataclass(frozen=True)
class Json(Constraint):
    """The whole response (optionally inside ``` or ```json fences) parses as a JSON object or list."""

    kind: ClassVar[str] = "json"
    template: ClassVar[str] = (
        "Format your entire response as valid JSON (an object or a list); you may wrap it in a markdown code block."
    )

    def grade(self, text: str) -> float:
        fenced = _FENCED.fullmatch(text)
        try:
            doc = json.loads(fenced[1] if fenced else text)
        except ValueError:
            return 0.0
        # A bare number or string is valid JSON too, but a one-token answer is not what the instruction asks for.
        return float(isinstance(doc, (dict, list)))


@_register
@dataclass(frozen=True)
class Title(Constraint):
    """Somewhere a title `<<...>>` on one line with non-blank text inside."""

    kind: ClassVar[str] = "title"
    template: ClassVar[str] = "Include a title wrapped in double angular brackets, such as <<my title>>."

    def grade(self, text: str) -> float:
        return float(any(t.strip() for t in _TITLE.findall(text)))


@_register
@dataclass(frozen=True)
class NoCommas(Constraint):
    """No comma (ASCII or full-width); value otherwise 0.5 / the number of commas."""

    kind: ClassVar[str] = "no_commas"
    template: ClassVar[str] = "Do not use any commas in your response."

    def grade(self, text: str) -> float:
        commas = text.count(",") + text.count("，")
        return 1.0 if commas == 0 else 0.5 / commas


@_register
@dataclass(frozen=True)
class Postscript(Constraint):
    """A line starts with P.S. (any case, "P. S." too) followed by text; its position is not checked, as in IFEval."""

    kind: ClassVar[str] = "postscript"
    template: ClassVar[str] = "At the end of your response, add a postscript starting with P.S."

    def grade(self, text: str) -> float:
        return float(_POSTSCRIPT.search(text) is not None)


@_register
@dataclass(frozen=True)
class RepeatRequest(Constraint):
    """The response starts with the request (any case, whitespace collapsed) and goes on; 0.5 if it is elsewhere."""

    request: str
    kind: ClassVar[str] = "repeat_request"
    # The request is not in the sentence: the parser takes it from the prompt text before the first instruction.
    template: ClassVar[str] = (
        "First repeat the request word for word without change (only the request, not these instructions), "
        "then give your answer."
    )

    def grade(self, text: str) -> float:
        body, request = _norm(text), _norm(self.request)
        if body.startswith(request):
            return 1.0 if re.search(r"\w", body[len(request):]) else 0.5
        return 0.5 if request in body else 0.0

    @classmethod
    def from_match(cls, m: re.Match[str], request: str) -> Constraint:
        if not request:
            raise UnknownPromptError(
                f"prompt {m.string[:60]!r}: asks to repeat the request, but no request comes before the instructions."
            )
        return cls(request)

    @classmethod
    def sample(cls, rng: random.Random, request: str) -> Constraint:
        return cls(request)


@_register
@dataclass(frozen=True)
class Quotation(Constraint):
    """The response starts and ends with a double quote (straight or curly) and holds a word inside."""

    kind: ClassVar[str] = "quotation"
    template: ClassVar[str] = "Wrap your entire response in double quotation marks."

    def grade(self, text: str) -> float:
        return float(len(text) >= 2 and text[0] in '"“' and text[-1] in '"”' and bool(_WORD.search(text[1:-1])))


@_register
@dataclass(frozen=True)
class LetterFrequency(Constraint):
    """The letter appears at least n times, any case."""

    letter: str
    n: int
    kind: ClassVar[str] = "letter_frequency"
    template: ClassVar[str] = 'In your response, the letter "{letter}" should appear at least {n} times.'
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"letter": LETTERS, "n": LETTER_COUNTS}

    def grade(self, text: str) -> float:
        return _graded(text.lower().count(self.letter), self.n, "at least")


@_register
@dataclass(frozen=True)
class Placeholders(Constraint):
    """At least n placeholders: square brackets holding text on one line, such as [name]."""

    n: int
    kind: ClassVar[str] = "placeholders"
    pattern: ClassVar[re.Pattern[str]] = re.compile(
        r"Include at least (?P<n>\d+) placeholders? in square brackets, such as \[name\]\."
    )
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"n": PLACEHOLDER_COUNTS}

    def instruction(self) -> str:
        return f"Include at least {_plural(self.n, 'placeholder')} in square brackets, such as [name]."

    def grade(self, text: str) -> float:
        return _graded(len(_PLACEHOLDER.findall(text)), self.n, "at least")


def from_dict(row: dict[str, Any]) -> Constraint:
    """The constraint of a `{"kind": ..., **params}` dict (as `Constraint.to_dict` and `make_prompts` write it)."""
    params = dict(row)
    kind = params.pop("kind", None)
    if kind not in KINDS:
        raise AlignError(f"constraint {row!r}: unknown kind {kind!r}. Known kinds: {', '.join(KINDS)}.")
    return KINDS[kind](**params)


# Which kinds may share a prompt

# Pairs no response can satisfy, or that read as contradictory (an "exact phrase" or a request to repeat "without
# change" next to "all capitals"; P.S. next to "no capitals"), or whose whole-response shapes clash (JSON vs
# bullets, a quoted response vs lines starting with "* ").
_CONFLICTS = {
    "lowercase": ("uppercase", "capital_words", "postscript", "repeat_request", "end_phrase"),
    "uppercase": ("capital_words", "repeat_request", "end_phrase", "json"),
    "json": ("bullets", "paragraphs", "title", "postscript", "end_phrase", "start_word", "quotation",
             "repeat_request", "sentence_count", "no_commas"),
    "quotation": ("bullets", "end_phrase", "repeat_request"),
    "end_phrase": ("postscript",),
    "start_word": ("repeat_request", "title"),
    "bullets": ("paragraphs",),
}
CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset((a, b)) for a, bs in _CONFLICTS.items() for b in bs)
COMPATIBLE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    p for p in itertools.combinations(sorted(KINDS), 2) if frozenset(p) not in CONFLICTS
)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    p for p in COMPATIBLE_PAIRS if zlib.crc32("+".join(p).encode()) % 5 == 0
)


def held_out(kinds: Sequence[str]) -> bool:
    """Whether a combination of kinds is test-only: it holds a pair of `HELD_OUT_PAIRS` (single kinds never are)."""
    return any(p in HELD_OUT_PAIRS for p in itertools.combinations(sorted(kinds), 2))


def compatible(constraints: Sequence[Constraint]) -> bool:
    """Whether one response can satisfy all `constraints` (kind pairs, then counts); make_prompts keeps only those."""
    by = {c.kind: c for c in constraints}
    if len(by) != len(constraints):
        return False
    if any(frozenset(p) in CONFLICTS for p in itertools.combinations(by, 2)):
        return False
    request = by["repeat_request"].request if "repeat_request" in by else ""
    if "avoid_word" in by:
        word = by["avoid_word"].word
        texts = [request, *(k for k in getattr(by.get("keywords"), "keywords", ()))]
        texts += [getattr(by.get("end_phrase"), "phrase", ""), getattr(by.get("start_word"), "word", "")]
        if any(has_word(t, word) for t in texts):
            return False
    if "no_commas" in by and "," in request:
        return False
    # The fewest sentences a response can have: one per bullet or paragraph, plus the title, P.S., repeated request
    # and end phrase lines.
    units = max(getattr(by.get("bullets"), "n", 1), getattr(by.get("paragraphs"), "n", 1))
    sentences = units + sum(k in by for k in ("title", "postscript", "repeat_request", "end_phrase"))
    extra_words = (len(getattr(by.get("keywords"), "keywords", ())) + getattr(by.get("capital_words"), "n", 0)
                   + getattr(by.get("placeholders"), "n", 0) + getattr(by.get("letter_frequency"), "n", 0)
                   + count_words(request) + count_words(getattr(by.get("end_phrase"), "phrase", "")))
    s, w = by.get("sentence_count"), by.get("word_count")
    if s is not None and s.relation == "at most" and s.n < sentences:
        return False
    if s is not None and s.relation == "at least":
        sentences = max(sentences, s.n)
    if w is not None and w.relation == "at most" and w.n < 6 * sentences + extra_words:
        return False
    # Satisfiable, but 80 words in 3 sentences reads as a trick, not a request.
    if w is not None and s is not None and w.relation == "at least" and s.relation == "at most" and w.n > 20 * s.n:
        return False
    return True


# Prompts


def render(request: str, constraints: Sequence[Constraint]) -> str:
    """The prompt: the request, then one instruction sentence per constraint."""
    return " ".join([request.strip(), *(c.instruction() for c in constraints)])


def _request(rng: random.Random, topic: str, forms: Sequence[str] = REQUEST_FORMS) -> str:
    return rng.choice(forms).format(T=topic[0].upper() + topic[1:], t=topic)


SHORT_KINDS = ("avoid_word", "json", "keywords", "lowercase", "no_commas", "placeholders", "quotation", "start_word",
               "title")
TASKS = ("full", "short")


def _sample_short(rng: random.Random, request: str, used: dict[str, int]) -> list[Constraint]:
    """1-2 compatible constraints of `SHORT_KINDS`: the least used kind so far (ties drawn), then half the time one
    more drawn among the kinds compatible with it; `used` counts kinds across the prompts made so far."""
    least = min(used.values())
    first = rng.choice([k for k in SHORT_KINDS if used[k] == least])
    kinds = [first]
    if rng.random() < 0.5:
        kinds.append(rng.choice([k for k in SHORT_KINDS if k != first and frozenset((k, first)) not in CONFLICTS]))
    for _ in range(1000):
        constraints = [KINDS[kind].sample(rng, request) for kind in kinds]
        if compatible(constraints):
            for kind in kinds:
                used[kind] += 1
            return constraints
    raise RuntimeError(f"no compatible parameters for {kinds} and {request!r} in 1000 draws")  # our bug, not yours


def _sample_constraints(rng: random.Random, request: str, split: str) -> list[Constraint]:
    k = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    kinds = sorted(KINDS)
    for _ in range(10_000):
        chosen = rng.sample(kinds, k)
        if k >= 2 and held_out(chosen) != (split == "test"):
            continue
        constraints = [KINDS[kind].sample(rng, request) for kind in chosen]
        if compatible(constraints):
            return constraints
    raise RuntimeError(f"no compatible set of {k} constraints for {request!r} in 10000 draws")  # our bug, not yours


def make_prompts(n: int, *, split: str = "train", seed: int = 0, task: str = "full") -> list[dict[str, Any]]:
    """`n` rows `{"prompt", "constraints": [{"kind", **params}], "topic"}` of `split`, the same for the same seed.

    Topics cycle through the split's list in a seeded order (each epoch reshuffled), so every topic is used before
    any repeats. `task="full"`: each prompt holds 1-3 compatible constraints, test combinations of 2+ kinds held out;
    `task="short"`: 1-2 of `SHORT_KINDS`, balanced, a brief request (module docstring).
    """
    if split not in SPLITS:
        raise AlignError(f"make_prompts: unknown split {split!r}. Use one of {', '.join(SPLITS)}.")
    if task not in TASKS:
        raise AlignError(f"make_prompts: unknown task {task!r}. Use one of {', '.join(TASKS)}.")
    if n < 0:
        raise AlignError(f"make_prompts: n = {n}. Ask for 0 or more prompts.")
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and Python versions.
    rng = random.Random(f"align.verifiable:{split}:{seed}" + ("" if task == "full" else f":{task}"))
    topics = TRAIN_TOPICS if split == "train" else TEST_TOPICS
    rows, order, used = [], [], dict.fromkeys(SHORT_KINDS, 0)
    for _ in range(n):
        if not order:
            order = list(topics)
            rng.shuffle(order)
        topic = order.pop()
        if task == "short":
            request = _request(rng, topic, SHORT_REQUEST_FORMS)
            constraints = _sample_short(rng, request, used)
        else:
            request = _request(rng, topic)
            constraints = _sample_constraints(rng, request, split)
        rows.append({
            "prompt": render(request, constraints),
            "constraints": [c.to_dict() for c in constraints],
            "topic": topic,
        })
    return rows


def parse_constraints(prompt: str) -> list[Constraint]:
    """The constraints rendered in `prompt`, in the order they appear; the text before the first is the request."""
    found = sorted(((m.start(), m, cls) for cls in KINDS.values() for m in cls.pattern.finditer(prompt)),
                   key=lambda t: t[0])
    if not found:
        raise UnknownPromptError(
            f"prompt {prompt[:60]!r}: holds no verifiable instruction this checker knows. Make prompts with "
            "align.data.verifiable.make_prompts, or use another labeler for other prompts."
        )
    request = prompt[: found[0][0]].strip()
    return [cls.from_match(m, request) for _, m, cls in found]


# Checker


def score_detail(prompt: str, response: str) -> dict[str, Any]:
    """`{"score", "strict_score", "all_passed", "constraints": [{"kind", "instruction", "passed", "value", "params"}]}`
    for `response` to `prompt`; `score` is the mean value, `strict_score` the share passed."""
    entries = []
    for c in parse_constraints(prompt):
        value = c.value(response)
        params = c.to_dict()
        del params["kind"]
        entries.append(
            {"kind": c.kind, "instruction": c.instruction(), "passed": value == 1.0, "value": value, "params": params}
        )
    return {
        "score": sum(e["value"] for e in entries) / len(entries),
        "strict_score": sum(e["passed"] for e in entries) / len(entries),
        "all_passed": all(e["passed"] for e in entries),
        "constraints": entries,
    }


def score(prompt: str, response: str, *, strict: bool = False) -> float:
    """Mean over the prompt's constraints of each value in [0, 1] (`strict`: of pass = 1 / fail = 0)."""
    values = [c.value(response) for c in parse_constraints(prompt)]
    if strict:
        values = [float(v == 1.0) for v in values]
    return sum(values) / len(values)


def labeler(prompt: str, responses: list[str]) -> list[float]:
    """Graded score of each response, for `labeler: align.data.verifiable:labeler` in a rank recipe."""
    constraints = parse_constraints(prompt)
    return [sum(c.value(r) for c in constraints) / len(constraints) for r in responses]


def strict_labeler(prompt: str, responses: list[str]) -> list[float]:
    """Share of constraints passed by each response (Tülu 3's binary verifiable reward, averaged per prompt)."""
    constraints = parse_constraints(prompt)
    return [sum(c.check(r) for c in constraints) / len(constraints) for r in responses]


# Files


def write_dataset(path: str, n: int, *, split: str = "train", seed: int = 0, task: str = "full") -> int:
    """Write `make_prompts(n, split=split, seed=seed, task=task)` as JSON Lines to `path` (atomically); returns the
    row count."""
    rows = make_prompts(n, split=split, seed=seed, task=task)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """`python -m align.data.verifiable --split test --n 200 --out data/ifeval_test.jsonl`."""
    parser = argparse.ArgumentParser(
        prog="python -m align.data.verifiable",
        description="Write IFEval-style prompts with verifiable constraints as JSON Lines ({prompt, constraints, "
        "topic}) for align rank / ppo `dataset_name`; score them with `labeler: align.data.verifiable:labeler`.",
    )
    parser.add_argument("--split", choices=SPLITS, default="train", help="train, or test (held-out topics and pairs)")
    parser.add_argument("--n", type=int, default=1000, help="number of prompts (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of topics, forms and constraints (default 0)")
    parser.add_argument("--task", choices=TASKS, default="full",
                        help="full: all 19 kinds; short: the 9 settled within ~48 tokens, balanced (default full)")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: ask for at least 1 prompt")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    rows = write_dataset(args.out, args.n, split=args.split, seed=args.seed, task=args.task)
    logger.info("wrote %d %s prompts to %s", rows, args.split, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
