"""align.data.tinyworld: exact story NLL, entropy floor, instructions, gold labeler, imperfect demonstrations."""

import math
import random
import statistics

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.data import tinyworld as tw
from align.data import tinyworld_grammar as g
from align.errors import AlignError


@pytest.fixture(autouse=True)
def _quiet():
    datasets.disable_progress_bars()


# Story grammar: exact probabilities


def test_story_nll_equals_nats_recorded_while_sampling():
    rng = random.Random(123)
    for _ in range(2000):
        text, nats = g.sample_story(rng)
        assert abs(tw.story_nll(text) - nats) < 1e-9


def test_story_nll_by_hand():
    # name 1/20, intro "is" .25, place 1/14, no end after 1 sentence (p=1);
    # no "then" .8, pronoun .7, actions {goes 1.5 runs .75 walks .75 finds 2 meets 2 feels 2}: feels 2/9,
    # mood after "is" uniform 1/5, end after 2 sentences .2.
    p = 1 / 20 * 0.25 * 1 / 14 * 0.8 * 0.7 * (2 / 9) * 0.2 * 0.2
    assert tw.story_nll("tom is in the park . he feels happy .") == pytest.approx(-math.log(p))


def test_story_nll_by_hand_for_copies():
    # An object named again carries the color it was introduced with: those words cost nothing.
    # has 0.25, no size 0.5, red 1/10, ball 1/20; no "then" 0.8, pronoun 0.7; drops 1.5 of the 10.5 action weight
    # open to someone holding a thing with no one met (goes runs walks meets drops plays feels); end at 2: 0.2.
    p = 1 / 20 * 0.25 * 0.5 * 0.1 * (1 / 20) * 0.8 * 0.7 * (1.5 / 10.5) * 0.2
    assert tw.story_nll("tom has a red ball . he drops the red ball .") == pytest.approx(-math.log(p))
    # `meets X in the P` once the place is known says that place again (tail 0.75); meets 2 of 9, anna 1/19.
    p = 1 / 20 * 0.25 * (1 / 14) * 0.8 * 0.7 * (2 / 9) * (1 / 19) * 0.75 * 0.2
    assert tw.story_nll("tom is in the park . he meets anna in the park .") == pytest.approx(-math.log(p))


def test_world_checks_the_color_and_place_said_again():
    def consistent(text):
        world = g.World()
        return [world.apply(g.parse_sentence(s)) for s in g.split_sentences(text.split())[0]]

    assert consistent("tom has a red ball . he drops the red ball . he takes the ball .") == [True, True, True]
    assert consistent("tom has a red ball . he drops the blue ball .") == [True, False]
    assert consistent("tom is in the park . he meets anna in the zoo .") == [True, False]
    assert consistent("tom meets anna in the zoo . he gives the red ball to anna .") == [True, False]
    assert g.parse_sentence(("he", "gives", "the", "red", "ball", "to", "anna")) == (
        "gives",
        "he",
        "ball",
        "anna",
        "red",
    )


@pytest.mark.parametrize(
    "text",
    [
        "tom has a red ball . he drops the blue ball .",  # the color said again must be the object's
        "tom has a red ball . he drops the ball .",  # stories always say it (the labeler also accepts `the ball`)
        "tom is in the park . he meets anna in the zoo .",  # meets where he is not
        "tom is in the park . she feels happy .",  # pronoun disagrees with the hero
        "tom is in the park . he feels happy . extra",  # trailing word
        "tom is in the park . he feels happy",  # no final "."
        "tom is in the park .",  # a story has at least 2 sentences
        "tom is in the park . he goes to the park .",  # goes where he already is
        "tom is in the park . he drops the ball .",  # drops what he does not hold
        "tom is in the park . he feels happy . he feels sad .",  # feels twice in a row
        "tom is in the park . he feels happy . he runs to the zoo . he walks to the farm . he goes to the shop . "
        "he runs to the yard . he walks to the zoo .",  # 7 sentences
        "",
        "hello world",
    ],
)
def test_story_nll_is_inf_for_texts_the_grammar_cannot_produce(text):
    assert tw.story_nll(text) == math.inf


class _Enumerate(g.Chooser):
    """Replays a path of option indices (0 past its end) and records the branching, for exhaustive enumeration."""

    def __init__(self, path):
        super().__init__(random.Random(0))
        self.path, self.taken, self.branching, self.p = path, [], [], 1.0

    def pick(self, tag, options):
        opts = [o for o in options if o[1] > 0.0]
        assert len({o[0] for o in opts}) == len(opts), f"{tag}: two options share a key word"
        assert abs(sum(o[1] for o in options) - 1.0) < 1e-12, tag
        i = self.path[len(self.taken)] if len(self.taken) < len(self.path) else 0
        self.taken.append(i)
        self.branching.append(len(opts))
        self.p *= opts[i][1]
        return opts[i][2]


def _all_continuations(run):
    """(words, probability) of every path through `run(chooser)`."""
    out, path = [], []
    while True:
        ch = _Enumerate(path)
        run(ch)
        out.append((tuple(ch.words), ch.p))
        path = ch.taken
        while path and path[-1] + 1 >= ch.branching[len(path) - 1]:
            path = path[:-1]
        if not path:
            return out
        path = path[:-1] + [path[-1] + 1]


@pytest.mark.parametrize(
    "state",
    [
        g.Hero(
            "anna",
            loc="park",
            held="ball",
            present=["tom"],
            nouns=["cup", "ball"],
            dropped={"cup": "park"},
            colors={"cup": "red", "ball": "blue"},
        ),
        g.Hero("tom", loc=None, held=None, nouns=["cup"], dropped={"cup": None}, last="feels", colors={"cup": "red"}),
        g.Hero("tom", loc="zoo", held="kite", nouns=["kite"], last="drops", colors={"kite": "green"}),
    ],
)
def test_next_sentence_probabilities_sum_to_one_and_words_identify_the_path(state):
    conts = _all_continuations(lambda ch: g.emit_sentence(ch, _copy(state)))
    assert sum(p for _, p in conts) == pytest.approx(1.0, abs=1e-9)
    assert len({w for w, _ in conts}) == len(conts)  # unambiguous: different choices, different words
    for words, _ in conts:
        assert g.parse_sentence(words[:-1]) is not None


def test_first_sentence_probabilities_sum_to_one():
    conts = _all_continuations(lambda ch: g.emit_intro(ch, g.Hero("emma")))
    assert sum(p for _, p in conts) == pytest.approx(1.0, abs=1e-9)
    assert len({w for w, _ in conts}) == len(conts)


def _copy(state):
    return g.Hero(
        state.name,
        state.loc,
        state.held,
        list(state.present),
        list(state.nouns),
        dict(state.dropped),
        state.last,
        dict(state.colors),
    )


def test_end_probabilities():
    for opts in g.END_OPTS.values():
        assert sum(o[1] for o in opts) == 1.0
    assert g.END_PROB[1] == 0.0 and g.END_PROB[6] == 1.0


def test_generated_stories_are_grammatical_and_consistent_for_the_labeler():
    rng = random.Random(7)
    for _ in range(1000):
        text, _ = g.sample_story(rng)
        sents, dangling = g.split_sentences(text.split())
        assert dangling is None and 2 <= len(sents) <= 6
        world = g.World()
        assert all(world.apply(g.parse_sentence(s)) for s in sents), text


# Corpus and entropy floor


def test_pretrain_corpus_columns_and_determinism():
    a, b, c = tw.pretrain_corpus(300, seed=0), tw.pretrain_corpus(300, seed=0), tw.pretrain_corpus(300, seed=1)
    assert a.column_names == ["text", "nats", "n_words", "kind"]
    assert a.to_dict() == b.to_dict()
    assert a["text"] != c["text"]
    assert set(a["kind"]) == {"story", "titled", "questions"}
    for row in a:
        assert row["n_words"] == len(row["text"].split())
        assert 10 <= row["n_words"] <= 75


def test_document_nll_equals_nats_recorded_while_sampling():
    ds = tw.pretrain_corpus(3000, seed=5)
    for text, nats in zip(ds["text"], ds["nats"], strict=True):
        assert abs(tw.document_nll(text) - nats) < 1e-9, text


def test_document_nll_by_hand():
    story = "tom is in the park . he feels happy ."
    nll = tw.story_nll(story)
    # a plain story: the kind (0.2), then the story
    assert tw.document_nll(story) == pytest.approx(nll - math.log(0.2))
    # titled (0.4); the story's only other entity is its place: named (0.75) or not (0.25)
    assert tw.document_nll(f"tom in the park : {story}") == pytest.approx(nll - math.log(0.4 * 0.75))
    assert tw.document_nll(f"tom : {story}") == pytest.approx(nll - math.log(0.4 * 0.25))
    # questions (0.4): two kinds have a target (where: tom, feel: tom), one target each; the answer is determined
    doc = f"{story} where is tom ? tom is in the park ."
    assert tw.document_nll(doc) == pytest.approx(nll - math.log(0.4 / 2))


@pytest.mark.parametrize(
    "text",
    [
        "tom and the red ball : tom is in the park . he feels happy .",  # the title names what the story lacks
        "tom in the zoo : tom is in the park . he feels happy .",
        "tom is in the park . he feels happy . where is tom ? tom is in the zoo .",  # a wrong answer
        "tom is in the park . he feels happy . what color is the ball ? the ball is red .",  # no ball in the story
        "tom is in the park . she feels happy . where is tom ? tom is in the park .",  # not a story
    ],
)
def test_document_nll_is_inf_for_documents_the_generator_cannot_produce(text):
    assert tw.document_nll(text) == math.inf


def test_corpus_documents_relate_titles_and_questions_to_their_story():
    ds = tw.pretrain_corpus(500, seed=2)
    for text, kind in zip(ds["text"], ds["kind"], strict=True):
        if kind == "titled":
            title, story = text.split(" : ")
            assert title.split()[0] == story.split()[0]  # the hero
            for word in title.split()[1:]:
                assert word in {"the", "in", "and", ","} or word in story.split()
        elif kind == "questions":
            i = min(text.index(f" {w} ") for w in ("where", "what", "who", "how") if f" {w} " in text)
            prompt = f"read : {text[:i]} question : {text[i + 1 :].split(' ? ')[0]} ?"
            assert tw.score_details(prompt, text.split(" ? ")[1])["task"] == 1.0  # the gold labeler's answer


def test_entropy_floor_by_hand():
    # (3 + 5) nats over (4 + 2) + (6 + 2) predicted positions
    ds = datasets.Dataset.from_dict({"text": ["x", "y"], "nats": [3.0, 5.0], "n_words": [4, 6]})
    assert tw.entropy_floor(ds) == pytest.approx(8 / 14)


def test_entropy_floor_in_a_learnable_range():
    floor = tw.entropy_floor(tw.pretrain_corpus(3000, seed=0))
    vocab = len(tw.vocabulary())
    assert 0.8 < floor < 1.6 < math.log(vocab)


def test_entropy_floor_rejects_other_datasets():
    with pytest.raises(AlignError, match="n_words"):
        tw.entropy_floor(datasets.Dataset.from_dict({"text": ["a"], "nats": [1.0]}))


# Vocabulary


def test_vocabulary_is_sorted_small_and_closed_over_everything_generated():
    vocab = tw.vocabulary()
    assert vocab == sorted(set(vocab)) == tw.vocabulary()
    assert 100 <= len(vocab) <= 400
    words = set()
    for text in tw.pretrain_corpus(2000, seed=3)["text"]:
        words.update(text.split())
    for split in ("train", "test"):
        for prompt in tw.instruction_prompts(500, seed=3, split=split)["prompt"]:
            words.update(prompt.split())
            words.update(tw.gold_response(prompt).split())
    demos = tw.demonstrations(500, seed=3, error_rate=0.5)
    for text in list(demos["prompt"]) + list(demos["completion"]):
        words.update(text.split())
    assert words <= set(vocab), words - set(vocab)


# Instructions


def test_instruction_prompts_kinds_lengths_and_determinism():
    ds = tw.instruction_prompts(300, seed=0)
    assert ds.column_names == ["prompt", "kind"]
    assert set(ds["kind"]) == set(tw.KINDS) == {"mention", "count", "qa", "end"}
    assert ds.to_dict() == tw.instruction_prompts(300, seed=0).to_dict()
    assert ds["prompt"] != tw.instruction_prompts(300, seed=1)["prompt"]
    questions = {tw.parse_prompt(p).question for p in ds["prompt"] if p.startswith("read")}
    assert questions == {"where", "have", "color", "who", "feel"}
    for prompt in ds["prompt"]:
        assert len(prompt.split()) <= 60
        assert len(prompt.split()) + len(tw.gold_response(prompt).split()) <= 100  # fits 128 tokens with specials


def test_is_tinyworld_needs_every_prompt_and_at_least_one():
    prompts = list(tw.instruction_prompts(3, seed=0)["prompt"])
    assert tw.is_tinyworld(prompts) and tw.is_tinyworld(prompts * 4)  # a group repeats its prompt K times
    assert not tw.is_tinyworld([*prompts, "write a poem about the sea"])
    assert not tw.is_tinyworld([])  # nothing for the gold labeler to score: no gold metrics

def test_train_and_test_prompts_never_overlap():
    train = set(tw.instruction_prompts(2000, seed=0, split="train")["prompt"])
    test = tw.instruction_prompts(200, seed=0, split="test")["prompt"]
    assert not train & set(test)
    assert len(set(test)) > 100  # diverse, not 200 copies of a few prompts
    with pytest.raises(AlignError, match="split"):
        tw.instruction_prompts(3, seed=0, split="validation")


def test_parse_prompt_rejects_other_text():
    for prompt in [
        "hello world",
        "write a story about alice .",
        "read : tom is in the park . question : how does tom feel ?",
    ]:
        with pytest.raises(AlignError, match="not a tiny-world instruction"):
            tw.score(prompt, "tom is happy .")


# Gold labeler: hand-computed breakdowns.
# score = .55 task + .45 grammar (.35 consistent + .30 no_repeat + .20 clean_end + .15 length)

MENTION = "write a story about tom and the red ball ."
COUNT = "write three sentences about anna ."
QA = "read : tom has a red ball . tom goes to the park . question : where is tom ?"
END = "write a story about mia that ends with : she feels happy ."


def _check(prompt, response, expected):
    got = tw.score_details(prompt, response)
    assert set(got) == {"task", "grammar", "consistent", "no_repeat", "clean_end", "length", "score"}
    assert got == pytest.approx(expected)
    assert tw.score(prompt, response) == pytest.approx(expected["score"])


def _d(task, grammar, consistent, no_repeat, clean_end, length, score):
    return dict(
        task=task,
        grammar=grammar,
        consistent=consistent,
        no_repeat=no_repeat,
        clean_end=clean_end,
        length=length,
        score=score,
    )


def test_labeler_mention_perfect_and_missing_entity():
    # 16 tokens, ideal 25: length 1 - 9/25 = .64; quality .85 + .15 * .64 = .946; score .55 + .45 * .946
    perfect = "tom finds a red ball . he plays with the ball . he feels happy ."
    _check(MENTION, perfect, _d(1, 1, 1, 1, 1, 0.64, 0.9757))
    # the red ball is missing: task 1/2 -> .275 + .4257
    _check(
        MENTION, "tom finds a blue box . he plays with the box . he feels happy .", _d(0.5, 1, 1, 1, 1, 0.64, 0.7007)
    )


def test_labeler_count():
    # 14 tokens, ideal 3 * 7 = 21: length 2/3; score .55 + .45 * (.85 + .1)
    _check(COUNT, "anna goes to the park . she meets tom . she feels happy .", _d(1, 1, 1, 1, 1, 2 / 3, 0.9775))
    # 2 sentences for 3: count (1 - 1/3) / 2 = 1/3, about 1; length 1 - 11/21 = 10/21
    # score .55/3 + .45 * (.85 + .15 * 10/21) = .183333 + .414643
    _check(COUNT, "anna goes to the park . she feels happy .", _d(1 / 3, 1, 1, 1, 1, 10 / 21, 0.5979762))
    # "he" is not anna: about 2/3 and that sentence is inconsistent (2/3); length 2/3
    # score .55 * 2/3 + .45 * (.35 * 2/3 + .3 + .2 + .1) = .366667 + .375
    wrong_pronoun = "anna goes to the park . he meets tom . she feels happy ."
    _check(COUNT, wrong_pronoun, _d(2 / 3, 1, 2 / 3, 1, 1, 2 / 3, 0.7416667))


def test_labeler_qa():
    _check(QA, "tom is in the park .", _d(1, 1, 1, 1, 1, 1, 1.0))
    # a fragment answer is correct; 4 tokens for an ideal 6: length 2/3 -> .55 + .45 * .95
    _check(QA, "in the park .", _d(1, 1, 1, 1, 1, 2 / 3, 0.9775))
    # wrong place: no task, not true: .45 * (.3 + .2 + .15)
    _check(QA, "tom is in the shop .", _d(0, 1, 0, 1, 1, 1, 0.2925))
    # the right word in a sentence that does not answer (true: it is in the story): .275 + .45
    _check(QA, "tom goes to the park .", _d(0.5, 1, 1, 1, 1, 1, 0.725))
    # repeated: no_repeat 1 - 2 * 1/2 = 0; 12 tokens: length 0 -> .55 + .45 * (.35 + .2)
    _check(QA, "tom is in the park . tom is in the park .", _d(1, 1, 1, 0, 1, 0, 0.7975))
    # dangling "he": grammar 1/2, clean_end 0; 7 tokens: length 5/6 -> .55 + .45 * .5 * (.35 + .3 + .125)
    _check(QA, "tom is in the park . he", _d(1, 0.5, 1, 1, 0, 5 / 6, 0.724375))
    # other question types on the same story; 5 tokens: length 5/6 -> .55 + .45 * (.85 + .125)
    story = "read : tom has a red ball . tom goes to the park . question :"
    _check(f"{story} what color is the ball ?", "the ball is red .", _d(1, 1, 1, 1, 1, 5 / 6, 0.98875))
    _check(f"{story} who has the ball ?", "tom has the ball .", _d(1, 1, 1, 1, 1, 5 / 6, 0.98875))
    _check(f"{story} who has the ball ?", "tom has the red ball .", _d(1, 1, 1, 1, 1, 1, 1.0))
    # the right holder with the wrong color: not the answer, not true; the name is there: .275 + .45 * .65
    _check(f"{story} who has the ball ?", "tom has the blue ball .", _d(0.5, 1, 0, 1, 1, 1, 0.5675))
    _check(f"{story} what does tom have ?", "tom has a red ball .", _d(1, 1, 1, 1, 1, 1, 1.0))
    # wrong color, untrue; 4 tokens: length 2/3 -> .45 * (.3 + .2 + .1)
    assert tw.score(f"{story} what color is the ball ?", "it is blue .") == pytest.approx(0.27)


def test_labeler_end():
    # named and ends as asked; 10 tokens: length 1 - 15/25 = .4 -> .55 + .45 * (.85 + .06)
    _check(END, "mia finds a red ball . she feels happy .", _d(1, 1, 1, 1, 1, 0.4, 0.9595))
    # the ending is there but not last: task .5 + .5 * .5; the opening "she" has no referent: consistent 1/2
    # score .55 * .75 + .45 * (.175 + .3 + .2 + .06)
    _check(END, "she feels happy . mia finds a red ball .", _d(0.75, 1, 0.5, 1, 1, 0.4, 0.74325))


@pytest.mark.parametrize(
    "response", ["", "   \n\t ", "ball the xyz !! park", "park tom is . in park .", "the the . ."]
)
def test_labeler_empty_and_garbage_score_zero(response):
    for prompt in (MENTION, COUNT, QA, END):
        d = tw.score_details(prompt, response)
        assert d["score"] == 0.0 and d["grammar"] == 0.0 and d["task"] == 0.0


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.sampled_from(tw.vocabulary() + ["", "x", ".."]), max_size=40))
def test_labeler_never_raises_and_stays_in_range(text, words):
    for response in (text, " ".join(words), text + " " + " ".join(words)):
        for prompt in (MENTION, COUNT, QA, END):
            d = tw.score_details(prompt, response)
            assert all(0.0 <= v <= 1.0 for v in d.values())


def test_labeler_scores_random_vocabulary_garbage_low():
    rng, vocab = random.Random(0), tw.vocabulary()
    prompts = tw.instruction_prompts(300, seed=5)["prompt"]
    scores = [tw.score(p, " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30)))) for p in prompts]
    assert statistics.mean(scores) < 0.02


# Demonstrations


def test_gold_responses_meet_every_constraint():
    for prompt in tw.instruction_prompts(200, seed=2, split="test")["prompt"]:
        d = tw.score_details(prompt, tw.gold_response(prompt))
        assert all(d[k] == 1.0 for k in ("task", "grammar", "consistent", "no_repeat", "clean_end")), prompt
        assert d["score"] >= 0.95
    assert tw.gold_response(MENTION, seed=4) == tw.gold_response(MENTION, seed=4)


def test_demonstrations_flawed_score_clearly_lower():
    ds = tw.demonstrations(400, seed=0, error_rate=0.5)
    assert ds.column_names == ["prompt", "completion", "kind", "flawed", "habit"]
    assert not any(ds["habit"])
    assert ds.to_dict() == tw.demonstrations(400, seed=0, error_rate=0.5).to_dict()
    clean = [tw.score(p, c) for p, c, f in zip(ds["prompt"], ds["completion"], ds["flawed"], strict=True) if not f]
    flawed = [tw.score(p, c) for p, c, f in zip(ds["prompt"], ds["completion"], ds["flawed"], strict=True) if f]
    assert 150 < len(flawed) < 250
    assert min(clean) >= 0.95
    assert statistics.mean(clean) - statistics.mean(flawed) > 0.25
    assert sum(s < 0.95 for s in flawed) / len(flawed) > 0.9  # nearly every flaw costs
    assert not set(ds["prompt"]) & set(tw.instruction_prompts(200, seed=0, split="test")["prompt"])


def test_demonstrations_habit_is_the_same_step_left_undone():
    from align.data.tinyworld_grammar import split_sentences
    from align.data.tinyworld_labeler import parse_prompt, qa_answers

    ds = tw.demonstrations(300, seed=2, error_rate=0.0, habit_rate=1.0)
    seen = set()
    for prompt, response, kind, habit in zip(ds["prompt"], ds["completion"], ds["kind"], ds["habit"], strict=True):
        spec = parse_prompt(prompt)
        sents = split_sentences(response.split())[0]
        if not habit:  # the habit costs nothing here: the demonstration is a best one
            assert tw.score(prompt, response) >= 0.95, prompt
            assert kind != "end" and not (kind == "count" and spec.n > 1), prompt
            continue
        seen.add(kind)
        assert tw.score(prompt, response) < 0.9, (prompt, response)
        if kind == "count":
            assert len(sents) == spec.n - 1, (prompt, response)
        elif kind == "end":
            assert tuple(spec.ending) not in sents and spec.name in response.split(), (prompt, response)
        elif kind == "mention":
            last = spec.place or " ".join(spec.obj or ()) or spec.friend
            assert last not in response, (prompt, response)
        else:
            assert response in spec.story and qa_answers(spec).key in response.split(), (prompt, response)
    assert seen == set(tw.KINDS)
    assert sum(ds["habit"]) > 200 and ds["flawed"] == ds["habit"]


def test_demonstrations_habit_rate_mixes_habits_and_random_flaws():
    ds = tw.demonstrations(400, seed=0, error_rate=0.5, habit_rate=0.6)
    habit, flawed = sum(ds["habit"]), sum(ds["flawed"])
    assert 170 < habit < 250 and habit < flawed  # rows without the habit get random flaws at error_rate
    with pytest.raises(AlignError, match="habit_rate"):
        tw.demonstrations(5, habit_rate=-0.1)


def test_demonstrations_error_rate_bounds():
    assert not any(tw.demonstrations(50, seed=1, error_rate=0.0)["flawed"])
    assert all(tw.demonstrations(50, seed=1, error_rate=1.0)["flawed"])
    with pytest.raises(AlignError, match="error_rate"):
        tw.demonstrations(5, error_rate=1.5)
