"""The tiny world's grammar: lexicon, the story generator that knows its exact probabilities, and the world model.

One generator function (`_story`) serves three purposes through the `Chooser` it is given:
- sampling: every random choice is drawn and its `-log p` added up, so a story comes with its exact NLL;
- parsing: the same code is re-run reading the choices back from the words (`story_nll`). The grammar is
  unambiguous by construction: every choice is announced by the next word (each option has a distinct key word,
  at most one option is "any other word"), so the words determine the choices and the NLL is exact;
- forcing: demonstrations need stories with given entities; forced choices are filtered and re-normalized.

`parse_sentence` and `World` are the labeler's side: a sentence recognizer and a state tracker (who is where, who
holds what, moods) that checks each sentence against the world. Tests check that every generated story is
recognized and consistent sentence by sentence, so the generator and the labeler cannot drift apart.

Text conventions: lowercase words separated by single spaces, punctuation as separate words.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

# Lexicon. Names carry their pronoun: a pronoun must agree with the last named subject (a learnable dependency).
NAMES: dict[str, str] = {
    **dict.fromkeys("tom sam ben max leo jack tim dan bob joe".split(), "he"),
    **dict.fromkeys("anna mia lily emma zoe kate lucy amy eva ruth".split(), "she"),
}
PRONOUNS = ("he", "she")
COLORS = tuple("red blue green yellow pink black white brown gray purple".split())
SIZES = ("big", "small", "little", "new")
NOUNS = tuple("ball box book cup hat kite bag doll car drum boat key pear cake sock shoe pen bell coin lamp".split())
PLACES = tuple("park garden school shop forest kitchen library house farm zoo field street market yard".split())
MOODS = ("happy", "sad", "tired", "hungry", "angry")
NUMBERS = ("one", "two", "three", "four", "five", "six")
MOVES = ("goes", "runs", "walks")  # three verbs, one meaning: real randomness the LM cannot predict
STORY_WORDS = (*MOVES, *"then is in the to finds a has meets gives drops takes plays with feels .".split())
# Words that only occur in instructions and answers.
PROMPT_WORDS = tuple(
    "write story about and , sentence sentences that ends : read question ? where what does have".split()
)
PROMPT_WORDS += tuple("color who how feel it".split())

EOS = "<eos>"  # the parse-mode sentinel after the last word; never emitted as text

# P(story ends | k sentences so far): a story has 2-6 sentences; the EOS token has to learn this hazard.
END_PROB = {1: 0.0, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, 6: 1.0}
THEN_PROB = 0.2  # optional "then" opening a later sentence
PRONOUN_PROB = 0.7  # later sentences name the hero by pronoun (else by name)
SIZE_PROBS = ((None, 0.5), ("big", 0.125), ("small", 0.125), ("little", 0.125), ("new", 0.125))
TAIL_PROB = 0.75  # "finds a ... in the P .", "meets anna in the P .": P is the hero's place once known (a copy)
# Unnormalized action weights; an action is offered only when the world allows it (`_actions`).
ACTION_WEIGHTS = {
    "goes": 1.5,
    "runs": 0.75,
    "walks": 0.75,
    "finds": 2.0,
    "meets": 2.0,
    "gives": 3.0,
    "drops": 1.5,
    "takes": 2.5,
    "plays": 2.0,
    "feels": 2.0,
}
INTRO_PROBS = (("is", 0.25), ("goes", 0.15), ("runs", 0.05), ("walks", 0.05), ("finds", 0.25), ("has", 0.25))
# Moods follow the last event (causality the LM can learn): getting things makes happy, losing them sad.
# Probabilities of (happy, sad, tired, hungry, angry).
MOOD_AFTER = {
    "finds": (0.6, 0.05, 0.15, 0.1, 0.1),
    "has": (0.5, 0.1, 0.15, 0.15, 0.1),
    "takes": (0.6, 0.05, 0.15, 0.1, 0.1),
    "gives": (0.7, 0.1, 0.1, 0.05, 0.05),
    "plays": (0.6, 0.05, 0.2, 0.1, 0.05),
    "meets": (0.6, 0.1, 0.1, 0.1, 0.1),
    "drops": (0.05, 0.5, 0.15, 0.1, 0.2),
    "goes": (0.2, 0.1, 0.4, 0.2, 0.1),
    "runs": (0.2, 0.05, 0.5, 0.2, 0.05),
    "walks": (0.3, 0.1, 0.3, 0.2, 0.1),
    "is": (0.2, 0.2, 0.2, 0.2, 0.2),
}


class NoParse(Exception):
    """The words are not a story the grammar can produce."""


class Reject(Exception):
    """Forced choices cannot be met in this draw; the caller draws again."""


class Chooser:
    """Makes (sampling, forcing) or reads back (parsing) the generator's choices and sums their -log p in nats.

    Options are `(key, p, value)`: `key` is the word that follows the choice (`EOS` for the end of the text, None
    for "any other word", a tuple for the next few words), which is what makes parsing possible.
    """

    __slots__ = ("rng", "words", "pos", "nats", "force", "k", "parse")

    def __init__(self, rng: random.Random | None = None, words: list[str] | None = None, force=None):
        self.rng = rng
        self.parse = words is not None
        self.words: list[str] = words if words is not None else []
        self.pos = 0
        self.nats = 0.0
        self.force: dict = force or {}
        self.k = 0  # current sentence number (1-based), for forced choices keyed (tag, k)

    def emit(self, word: str) -> None:
        if not self.parse:
            self.words.append(word)
        elif self.pos < len(self.words) and self.words[self.pos] == word:
            self.pos += 1
        else:
            raise NoParse

    def pick(self, tag: str, options) -> Any:
        if self.parse:
            nxt = self.words[self.pos] if self.pos < len(self.words) else EOS
            chosen = None
            for opt in options:
                key = opt[0]
                if key == nxt or (isinstance(key, tuple) and tuple(self.words[self.pos : self.pos + len(key)]) == key):
                    chosen = opt
                    break
                if key is None:
                    chosen = opt
            if chosen is None or chosen[1] <= 0.0:
                raise NoParse
            self.nats -= math.log(chosen[1])
            return chosen[2]
        if self.force:
            options = self._forced(tag, options)
        r = self.rng.random()
        cum = 0.0
        last = None
        for opt in options:
            if opt[1] <= 0.0:
                continue
            cum += opt[1]
            last = opt
            if r < cum:
                break
        # `last` is also the fallback when rounding leaves the cumulative sum a hair below r.
        self.nats -= math.log(last[1])
        return last[2]

    def _forced(self, tag: str, options):
        want = self.force.get((tag, self.k), _UNSET)
        if want is _UNSET:
            want = self.force.pop(tag, _UNSET)  # tag-only forcing applies to the first such choice
        if want is _UNSET:
            return options
        ok = [o for o in options if (o[2] in want if isinstance(want, (set, frozenset)) else o[2] == want)]
        total = sum(o[1] for o in ok)
        if not ok:
            raise Reject
        if total <= 0.0:  # a forced zero-probability option (e.g. ending after one sentence): keep it, uniformly
            return [(o[0], 1.0 / len(ok), o[2]) for o in ok]
        return [(o[0], o[1] / total, o[2]) for o in ok]


_UNSET = object()
_NAME_OPTS = tuple((n, 1.0 / len(NAMES), n) for n in NAMES)
_COLOR_OPTS = tuple((c, 1.0 / len(COLORS), c) for c in COLORS)
_SIZE_OPTS = tuple((s, p, s) for s, p in SIZE_PROBS)  # key None for "no size": the next word is a color
_INTRO_OPTS = tuple((a, p, a) for a, p in INTRO_PROBS)
_THEN_OPTS = (("then", THEN_PROB, True), (None, 1.0 - THEN_PROB, False))
END_OPTS = {k: ((EOS, p, True), (None, 1.0 - p, False)) for k, p in END_PROB.items()}
_MOOD_OPTS = {a: tuple((m, p, m) for m, p in zip(MOODS, ps, strict=True)) for a, ps in MOOD_AFTER.items()}


def _uniform(keys) -> tuple:
    keys = tuple(keys)
    return tuple((k, 1.0 / len(keys), k) for k in keys)


@dataclass
class Hero:
    """The generator's state: the story's one subject (the hero) and what the world looks like around them."""

    name: str
    loc: str | None = None
    held: str | None = None  # noun of the held object
    present: list[str] = field(default_factory=list)  # people met at the current place
    nouns: list[str] = field(default_factory=list)  # nouns already in the story: objects stay distinguishable
    dropped: dict[str, str | None] = field(default_factory=dict)  # noun -> place where it lies
    last: str = "is"  # last action, conditions the mood
    colors: dict[str, str] = field(default_factory=dict)  # noun -> color: `the red ball` names it again


def _np(ch: Chooser, st: Hero) -> None:
    """`[size] color noun`; the noun is new to the story so that `the noun` always names one object."""
    size = ch.pick("size", _SIZE_OPTS)
    if size is not None:
        ch.emit(size)
    color = ch.pick("color", _COLOR_OPTS)
    ch.emit(color)
    noun = ch.pick("noun", _uniform(n for n in NOUNS if n not in st.nouns))
    ch.emit(noun)
    st.nouns.append(noun)
    st.colors[noun] = color
    st.held = noun


def _the(ch: Chooser, st: Hero, noun: str) -> None:
    """`the <color> <noun>`: an object of the story named again, with the color it was introduced with. Copying
    the color is how the model learns to look back in a text (measured: without these copies, a model pretrained
    on the corpus put chance probability on a color or place it had read; with them copying forms)."""
    ch.emit("the")
    ch.emit(st.colors[noun])
    ch.emit(noun)


def _tail(ch: Chooser, st: Hero) -> None:
    """Optional `in the P` after `finds a ...` or `meets X`: a new place while the hero's place is unknown, else
    that place again (copied from earlier in the text, as colors are by `_the`)."""
    if ch.pick("tail", (("in", TAIL_PROB, True), (".", 1.0 - TAIL_PROB, False))):
        ch.emit("in")
        if st.loc is None:
            _place(ch, st)
        else:
            ch.emit("the")
            ch.emit(st.loc)


def _place(ch: Chooser, st: Hero) -> None:
    ch.emit("the")
    place = ch.pick("place", _uniform(p for p in PLACES if p != st.loc))
    ch.emit(place)
    if place != st.loc:
        st.present = []  # the people met stay behind
    st.loc = place


def _actions(st: Hero) -> tuple:
    """The actions the world allows now, with normalized probabilities, keyed by their verb."""
    ok = list(MOVES)
    if st.held is None:
        ok.append("finds")
        if any(place == st.loc for place in st.dropped.values()):
            ok.append("takes")
    if not st.present:
        ok.append("meets")
    if st.held is not None and st.present:
        ok.append("gives")
    if st.held is not None:
        ok.append("drops")
    if st.held is not None or st.present:
        ok.append("plays")
    if st.last != "feels":
        ok.append("feels")
    total = sum(ACTION_WEIGHTS[a] for a in ok)
    return tuple((a, ACTION_WEIGHTS[a] / total, a) for a in ok)


def emit_sentence(ch: Chooser, st: Hero) -> None:
    """One sentence after the first: `[then] (pronoun | name) verb ... .`"""
    if ch.pick("then", _THEN_OPTS):
        ch.emit("then")
    pron = NAMES[st.name]
    ch.emit(ch.pick("subj", ((pron, PRONOUN_PROB, pron), (st.name, 1.0 - PRONOUN_PROB, st.name))))
    act = ch.pick("act", _actions(st))
    ch.emit(act)
    if act in MOVES:
        ch.emit("to")
        _place(ch, st)
    elif act == "finds":
        ch.emit("a")
        _np(ch, st)
        _tail(ch, st)
    elif act == "meets":
        friend = ch.pick("meet", _uniform(n for n in NAMES if n != st.name))
        ch.emit(friend)
        _tail(ch, st)
        st.present.append(friend)
    elif act == "gives":
        _the(ch, st, st.held)
        ch.emit("to")
        ch.emit(ch.pick("give_to", _uniform(st.present)))
        st.held = None
    elif act == "drops":
        _the(ch, st, st.held)
        st.dropped[st.held] = st.loc
        st.held = None
    elif act == "takes":
        here = [n for n, place in st.dropped.items() if place == st.loc]
        noun = ch.pick("take", tuple((("the", st.colors[n], n), 1.0 / len(here), n) for n in here))
        _the(ch, st, noun)
        del st.dropped[noun]
        st.held = noun
    elif act == "plays":
        ch.emit("with")
        opts = (["the"] if st.held is not None else []) + st.present
        what = ch.pick("play", _uniform(opts))
        if what == "the":
            _the(ch, st, st.held)
        else:
            ch.emit(what)
    else:  # feels
        ch.emit(ch.pick("mood", _MOOD_OPTS[st.last]))
    st.last = act
    ch.emit(".")


def emit_intro(ch: Chooser, st: Hero) -> None:
    """The first sentence names the hero: `name (is in | goes to) the P .` or `name (finds | has) a NP .`"""
    ch.emit(st.name)
    act = ch.pick("intro", _INTRO_OPTS)
    ch.emit(act)
    if act == "is":
        ch.emit("in")
        _place(ch, st)
    elif act in MOVES:
        ch.emit("to")
        _place(ch, st)
    else:
        ch.emit("a")
        _np(ch, st)
        if act == "finds":
            _tail(ch, st)
    st.last = act
    ch.emit(".")


def _story(ch: Chooser) -> None:
    """The whole story, including the end-of-story event after each sentence."""
    ch.k = 1
    st = Hero(ch.pick("name", _NAME_OPTS))
    emit_intro(ch, st)
    while not ch.pick("end", END_OPTS[ch.k]):
        ch.k += 1
        emit_sentence(ch, st)


def sample_story(rng: random.Random) -> tuple[str, float]:
    """One story and its exact negative log-likelihood in nats (every choice, including the end event)."""
    ch = Chooser(rng)
    _story(ch)
    return " ".join(ch.words), ch.nats


def forced_story(rng: random.Random, force: dict, tries: int = 2000) -> list[str]:
    """A story whose forced choices are met (`force`: `tag` or `(tag, sentence)` -> value or set of values).

    Returns the words. Draws again when a forced choice cannot be met; raises RuntimeError after `tries` draws,
    which means the forcing is impossible (a bug in the caller).
    """
    for _ in range(tries):
        ch = Chooser(rng, force=dict(force))
        try:
            _story(ch)
        except Reject:
            continue
        return ch.words
    raise RuntimeError(f"tinyworld: no story meets the forced choices {force}")


def story_nll(text: str) -> float:
    """Exact NLL (nats) of `text` under the story generator, end event included; `math.inf` if it cannot occur."""
    ch = Chooser(words=text.split())
    try:
        _story(ch)
    except NoParse:
        return math.inf
    if ch.pos != len(ch.words):
        return math.inf
    return ch.nats


# The labeler's side: sentence recognizer and world tracker.


def _parse_np(w: tuple) -> tuple | None:
    """`[size] color noun` -> (size | None, color, noun)."""
    if len(w) == 3 and w[0] in SIZES and w[1] in COLORS and w[2] in NOUNS:
        return (w[0], w[1], w[2])
    if len(w) == 2 and w[0] in COLORS and w[1] in NOUNS:
        return (None, w[0], w[1])
    return None


def _parse_the(w: tuple) -> tuple | None:
    """`the [color] noun` -> (noun, color | None): an object named again (stories always say its color)."""
    if len(w) == 3 and w[0] == "the" and w[1] in COLORS and w[2] in NOUNS:
        return (w[2], w[1])
    if len(w) == 2 and w[0] == "the" and w[1] in NOUNS:
        return (w[1], None)
    return None


def parse_sentence(w: tuple, fragments: bool = False) -> tuple | None:
    """Recognize one sentence (its words without the final `.`); None when it is not a sentence of the world.

    Story sentences return `(verb, subject, *args)`; an object named again (`the red ball` or `the ball`) gives
    `noun, color | None` among the args. With `fragments`, answer forms are recognized too:
    `("color_is", noun | "it", color)` for `the ball is red` / `it is red`, `("frag_place", p)` for `in the park`,
    `("frag_np", np)` for `a red ball`, `("frag", word)` for a lone color, name or mood.
    """
    n = len(w)
    if n == 0:
        return None
    if w[0] == "then":
        w, n = w[1:], n - 1
        if n < 2 or (w[0] not in NAMES and w[0] not in PRONOUNS):
            return None
    s = w[0]
    if n >= 2 and (s in NAMES or s in PRONOUNS):
        v = w[1]
        if v == "is" and n == 5 and w[2] == "in" and w[3] == "the" and w[4] in PLACES:
            return ("is", s, w[4])
        if v in MOVES and n == 5 and w[2] == "to" and w[3] == "the" and w[4] in PLACES:
            return ("goes", s, w[4])
        if v == "finds" and n >= 5 and w[2] == "a":
            if w[-3:-1] == ("in", "the") and w[-1] in PLACES:
                np = _parse_np(w[3:-3])
                return ("finds", s, np, w[-1]) if np else None
            np = _parse_np(w[3:])
            return ("finds", s, np, None) if np else None
        if v == "has" and n >= 4:
            if w[2] == "a":
                np = _parse_np(w[3:])
                return ("has", s, np) if np else None
            obj = _parse_the(w[2:])
            return ("has_the", s, *obj) if obj else None
        if v == "meets" and n >= 3 and w[2] in NAMES:
            if n == 3:
                return ("meets", s, w[2], None)
            return ("meets", s, w[2], w[5]) if n == 6 and w[3:5] == ("in", "the") and w[5] in PLACES else None
        if v == "gives" and n >= 6 and w[-2] == "to" and w[-1] in NAMES:
            obj = _parse_the(w[2:-2])
            return ("gives", s, obj[0], w[-1], obj[1]) if obj else None
        if v in ("drops", "takes"):
            obj = _parse_the(w[2:])
            return (v, s, *obj) if obj else None
        if v == "plays" and n >= 4 and w[2] == "with":
            if n == 4 and w[3] in NAMES:
                return ("plays", s, w[3], None, None)
            obj = _parse_the(w[3:])
            return ("plays", s, "the", *obj) if obj else None
        if v == "feels" and n == 3 and w[2] in MOODS:
            return ("feels", s, w[2])
    if not fragments:
        return None
    if n == 4 and w[0] == "the" and w[1] in NOUNS and w[2] == "is" and w[3] in COLORS:
        return ("color_is", w[1], w[3])
    if n == 3 and w[0] == "it" and w[1] == "is" and w[2] in COLORS:
        return ("color_is", "it", w[2])
    if n == 3 and w[0] == "in" and w[1] == "the" and w[2] in PLACES:
        return ("frag_place", w[2])
    if n >= 3 and w[0] == "a":
        np = _parse_np(w[1:])
        return ("frag_np", np) if np else None
    if n == 1 and (s in COLORS or s in NAMES or s in MOODS):
        return ("frag", s)
    return None


@dataclass
class _Person:
    loc: str | None = None
    holds: str | None = None  # noun
    mood: str | None = None
    met: set = field(default_factory=set)  # people met at the current place


class World:
    """What a story has established: people (place, held object, mood), objects (size, color, holder).

    `apply(parsed)` checks one parsed sentence against the world's rules and updates the world when it holds:
    a pronoun refers to the last named subject and must agree with it; `the [color] noun` is an object the subject
    holds (of that color);
    nobody goes where they already are, finds a thing while holding one, gives to someone not met here, or takes
    a thing that was not dropped here; the same person does not `feel` twice in a row; every object has its own noun.
    """

    def __init__(self) -> None:
        self.people: dict[str, _Person] = {}
        self.objects: dict[str, tuple] = {}  # noun -> (size, color)
        self.dropped: dict[str, str | None] = {}  # noun -> place where it lies
        self.last_subject: str | None = None
        self.last_act: tuple | None = None

    def resolve(self, subject: str) -> str | None:
        if subject in NAMES:
            return subject
        last = self.last_subject
        return last if last is not None and NAMES[last] == subject else None

    def person(self, name: str) -> _Person:
        if name not in self.people:
            self.people[name] = _Person()
        return self.people[name]

    def apply(self, parsed: tuple | None) -> bool:
        if parsed is None or len(parsed) < 2 or parsed[1] is None:
            return False
        verb = parsed[0]
        if verb.startswith("frag") or verb == "color_is":
            return False
        x = self.resolve(parsed[1])
        if x is None or not self.color_ok(parsed):
            return False
        me = self.person(x)
        if verb == "is":
            if me.loc is not None and me.loc != parsed[2]:
                return False
            me.loc = parsed[2]
        elif verb == "goes":
            if me.loc == parsed[2]:
                return False
            me.loc, me.met = parsed[2], set()
        elif verb in ("finds", "has"):
            size, color, noun = parsed[2]
            place = parsed[3] if verb == "finds" else None
            if me.holds is not None or noun in self.objects:
                return False
            if place is not None:
                if me.loc is not None and me.loc != place:
                    return False
                me.loc = place
            self.objects[noun] = (size, color)
            me.holds = noun
        elif verb == "has_the":
            if me.holds != parsed[2]:
                return False
        elif verb == "meets":
            other, place = parsed[2], parsed[3]
            if other == x or other in me.met:
                return False
            if place is not None:
                if me.loc is not None and me.loc != place:
                    return False
                if me.loc is None:
                    me.met = set()
                me.loc = place
            me.met.add(other)
            self.person(other).loc = me.loc
        elif verb == "gives":
            noun, other = parsed[2], parsed[3]
            if me.holds != noun or other not in me.met:
                return False
            me.holds = None
            self.person(other).holds = noun
        elif verb == "drops":
            if me.holds != parsed[2]:
                return False
            me.holds = None
            self.dropped[parsed[2]] = me.loc
        elif verb == "takes":
            noun = parsed[2]
            if me.holds is not None or noun not in self.dropped or self.dropped[noun] != me.loc:
                return False
            del self.dropped[noun]
            me.holds = noun
        elif verb == "plays":
            if parsed[2] == "the":
                if me.holds != parsed[3]:
                    return False
            elif parsed[2] not in me.met:
                return False
        elif verb == "feels":
            if self.last_act == (x, "feels"):
                return False
            me.mood = parsed[2]
        else:
            return False
        self.last_subject = x
        self.last_act = (x, verb)
        return True

    def color_ok(self, parsed: tuple) -> bool:
        """An object named again with a color (in a parsed sentence) must be the color it was introduced with."""
        verb = parsed[0]
        if verb not in ("has_the", "gives", "drops", "takes", "plays") or parsed[-1] is None:
            return True
        noun = parsed[-2] if verb != "gives" else parsed[2]
        return noun in self.objects and self.objects[noun][1] == parsed[-1]

    def holder(self, noun: str) -> str | None:
        for name, p in self.people.items():
            if p.holds == noun:
                return name
        return None


def split_sentences(words: list[str]) -> tuple[list[tuple], tuple | None]:
    """Complete sentences (words before each `.`, `.` dropped) and the dangling words after the last `.` (or None)."""
    out, cur = [], []
    for w in words:
        if w == ".":
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(w)
    return out, (tuple(cur) if cur else None)


def vocabulary() -> list[str]:
    """Every word any tiny-world text can contain, sorted."""
    words = set(NAMES) | set(PRONOUNS) | set(COLORS) | set(SIZES) | set(NOUNS) | set(PLACES) | set(MOODS)
    words |= set(NUMBERS) | set(STORY_WORDS) | set(PROMPT_WORDS)
    return sorted(words)
