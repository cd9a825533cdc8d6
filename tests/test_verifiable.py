"""align.data.verifiable: IFEval-style constraints, their checks on hand-written answers, prompts, parse, checker."""

import itertools
import json
import random

import pytest

from align.data import verifiable as v
from align.errors import AlignError

# Hand-written answers, one passing and one failing per kind


PASS_FAIL = {
    "word_count_at_least": (
        v.WordCount("at least", 20),
        "A park is a calm green place where families walk their dogs and children play on the swings all day long.",
        "A small park with a pond.",
    ),
    "word_count_at_most": (
        v.WordCount("at most", 10),
        "The park is quiet and green.",
        "The park near my flat is quiet and green with a pond and tall old trees.",
    ),
    "sentence_count_at_least": (
        v.SentenceCount("at least", 3),
        "I love the park. It is green! Do you go there?",
        "I love the park. It is green.",
    ),
    "sentence_count_at_most": (
        v.SentenceCount("at most", 2),
        "Dr. Lee walks there daily. It is calm.",
        "It is calm. It is green. It is big.",
    ),
    "paragraphs": (
        v.Paragraphs(3),
        "The park opens at dawn.\n***\nChildren play on the swings.\n***\nAt night the gates close.",
        "The park opens at dawn.\n***\nChildren play on the swings.",
    ),
    "bullets": (
        v.Bullets(3),
        "Here are my tips:\n* Arrive early.\n- Dress neatly.\n  * Ask one question.",
        "Here are my tips:\n* Arrive early.\n* Dress neatly.\n1. Ask one question.",
    ),
    "keywords": (
        v.Keywords(("budget", "plan")),
        "Make a PLAN first and keep to your Budget.",
        "Make a plan first; budgets help.",  # "budgets" is not the keyword "budget"
    ),
    "avoid_word": (
        v.AvoidWord("very"),
        "The heater is everywhere cold and broken.",  # "every" inside "everywhere" is not the word
        "The heater is Very cold.",
    ),
    "lowercase": (
        v.Lowercase(),
        "my favourite park has a pond. p.s. bring bread!",
        "my favourite park has a pond near Main street.",
    ),
    "uppercase": (
        v.Uppercase(),
        "MY FAVOURITE PARK HAS A POND 2 STREETS AWAY!",
        "MY FAVOURITE PARK HAS A POND near the road.",
    ),
    "capital_words": (
        v.CapitalWords(2),
        "Be ON TIME and smile.",
        "I think a Smile helps. A calm voice too.",  # "I" and "A" are one letter long
    ),
    "end_phrase": (
        v.EndPhrase("Have a great day!"),
        "Thanks for the note.\nHAVE A  GREAT DAY!",
        "Have a great day! Thanks for the note.",
    ),
    "start_word": (
        v.StartWord("Honestly"),
        '"Honestly, the bakery is the best in town."',
        "I honestly think the bakery is the best in town.",
    ),
    "json": (
        v.Json(),
        '```json\n{"tips": ["arrive early", "dress neatly"]}\n```',
        'Sure! {"tips": ["arrive early"]}',
    ),
    "title": (
        v.Title(),
        "<<A Walk in the Park>>\nThe park is green.",
        "<< >>\nA Walk in the Park: the park is green.",
    ),
    "no_commas": (
        v.NoCommas(),
        "The heater broke on Monday and the flat is cold.",
        "The heater broke on Monday, and the flat is cold.",
    ),
    "postscript": (
        v.Postscript(),
        "See you at the picnic.\n\nP.S. Bring a blanket.",
        "See you at the picnic. PS bring a blanket.",
    ),
    "repeat_request": (
        v.RepeatRequest("Describe your favourite park."),
        "describe your  favourite park.\nMy favourite park has a pond.",
        "My favourite park has a pond.",
    ),
    "quotation": (
        v.Quotation(),
        '"My favourite park has a pond."',
        '"My favourite park has a pond.',
    ),
    "letter_frequency": (
        v.LetterFrequency("k", 3),
        "Keep the kitchen neat: bake cookies.",  # K, k, k
        "Keep the kitchen neat.",
    ),
    "placeholders": (
        v.Placeholders(2),
        "Dear [landlord name], the heater at [address] is broken.",
        "Dear landlord, the heater at [address] is broken.",
    ),
}


def test_pass_fail_cases_cover_every_kind():
    assert {c.kind for c, _, _ in PASS_FAIL.values()} == set(v.KINDS)
    assert len(v.KINDS) >= 14


@pytest.mark.parametrize("name", sorted(PASS_FAIL))
def test_hand_written_pass(name):
    constraint, good, _ = PASS_FAIL[name]
    assert constraint.check(good)
    assert constraint.value(good) == 1.0
    assert constraint.check(good + "  \n\n")  # trailing whitespace never matters


@pytest.mark.parametrize("name", sorted(PASS_FAIL))
def test_hand_written_fail(name):
    constraint, _, bad = PASS_FAIL[name]
    assert not constraint.check(bad)
    assert 0.0 <= constraint.value(bad) < 1.0


@pytest.mark.parametrize("response", ["", "   ", "\n\t \n"])
@pytest.mark.parametrize("name", sorted(PASS_FAIL))
def test_empty_response_fails_every_constraint(name, response):
    # Decision (module docstring): "avoid word" and "no commas" fail too, or RL would learn to answer nothing.
    constraint = PASS_FAIL[name][0]
    assert constraint.value(response) == 0.0
    assert not constraint.check(response)


# Counting and partial credit


def test_count_words():
    assert v.count_words("Don't stop: a first-time visit, 3 times!") == 7  # don't stop a first-time visit 3 times
    assert v.count_words("* - *** <<>> ,.;") == 0


def test_count_sentences():
    assert v.count_sentences("One. Two! Three? Four") == 4
    assert v.count_sentences("Mr. Smith lives in the U.S. now. He is happy.") == 2
    assert v.count_sentences("<<Title>>\n* first tip\n* second tip\n***\nP.S. Bye.") == 4
    assert v.count_sentences('She said "hi." Then left.') == 2


def test_partial_credit_by_hand():
    twenty = " ".join(["word"] * 20)
    assert v.WordCount("at least", 40).value(twenty) == pytest.approx(0.5)  # 20 / 40
    assert v.WordCount("at most", 10).value(" ".join(["word"] * 15)) == pytest.approx(0.5)  # 1 - 5 / 10
    assert v.WordCount("at most", 10).value(twenty) == 0.0  # 1 - 10 / 10
    assert v.Bullets(4).value("* a\n* b") == pytest.approx(0.25)  # 0.5 * (1 - 2 / 4)
    assert v.Paragraphs(2).value("one\n***\n\n***\ntwo") == 0.0  # an empty paragraph in between
    assert v.Paragraphs(2).value("***\none\n***\ntwo\n***") == 1.0  # leading / trailing divider ignored
    assert v.NoCommas().value("a, b, c") == pytest.approx(0.25)  # 0.5 / 2 commas
    assert v.Keywords(("plan", "budget")).value("A plan.") == pytest.approx(0.5)
    assert v.EndPhrase("Take care.").value("Take care. See you.") == 0.5  # present, not at the end
    assert v.RepeatRequest("Describe a park.").value("Describe a park.") == 0.5  # repeated, no answer after
    assert v.Lowercase().value("Hello there my friend") == pytest.approx(0.375)  # 0.5 * 3 / 4 words
    assert v.LetterFrequency("k", 4).value("kk") == pytest.approx(0.5)


def test_json_edge_cases():
    j = v.Json()
    assert j.check('  [1, 2, 3]  ')
    assert j.check('```\n{"a": 1}\n```')
    assert not j.check('"just a string"')  # valid JSON, but not an object or a list
    assert not j.check("```json\n{'a': 1}\n```")  # single quotes are not JSON


def test_value_is_one_exactly_when_check_passes():
    rng = random.Random(0)
    pieces = ["* tip", "***", "P.S. hi", "<<T>>", "HELLO", "well,", "[name]", '"', "Have a great day!", "kk", "\n"]
    responses = [" ".join(rng.choices(pieces, k=rng.randint(1, 12))) for _ in range(200)]
    for row in v.make_prompts(60, seed=5):
        for c in v.parse_constraints(row["prompt"]):
            for r in responses:
                value = c.value(r)
                assert 0.0 <= value <= 1.0
                assert (value == 1.0) == c.check(r)


# Prompts: round trip, splits, conflicts, determinism


def test_every_kind_renders_and_parses_back():
    request = "Describe your favourite park."
    for constraint, _, _ in PASS_FAIL.values():
        prompt = v.render(request, [constraint])
        assert v.parse_constraints(prompt) == [constraint]


@pytest.mark.parametrize("split", v.SPLITS)
def test_parse_round_trip_many_seeds(split):
    kinds = set()
    for seed in range(8):
        for row in v.make_prompts(100, split=split, seed=seed):
            want = [v.from_dict(c) for c in row["constraints"]]
            assert v.parse_constraints(row["prompt"]) == want
            assert [c.to_dict() for c in want] == row["constraints"]
            assert json.loads(json.dumps(row)) == row
            kinds |= {c.kind for c in want}
    assert kinds == set(v.KINDS)  # every kind is generated (and so round-tripped) in both splits


def test_topics_counts_and_disjoint():
    assert len(set(v.TRAIN_TOPICS)) == len(v.TRAIN_TOPICS) >= 60
    assert len(set(v.TEST_TOPICS)) == len(v.TEST_TOPICS) >= 20
    assert not set(v.TRAIN_TOPICS) & set(v.TEST_TOPICS)
    train = {r["topic"] for s in range(3) for r in v.make_prompts(200, split="train", seed=s)}
    test = {r["topic"] for s in range(3) for r in v.make_prompts(200, split="test", seed=s)}
    assert train == set(v.TRAIN_TOPICS) and test == set(v.TEST_TOPICS)


def test_test_combinations_never_appear_in_train():
    def combos(split):
        return [frozenset(c["kind"] for c in r["constraints"]) for s in range(5)
                for r in v.make_prompts(200, split=split, seed=s)]

    train, test = combos("train"), combos("test")
    test_multi = {c for c in test if len(c) >= 2}
    assert test_multi and all(v.held_out(sorted(c)) for c in test_multi)
    assert not any(v.held_out(sorted(c)) for c in train)
    # No test combination of 2+ kinds is a train combination, nor part of one.
    assert not any(t <= c for t in test_multi for c in train)
    assert 10 <= len(v.HELD_OUT_PAIRS) < len(v.COMPATIBLE_PAIRS) // 2


def test_exclusion_table():
    pairs = {frozenset(p) for p in v.CONFLICTS}
    for must in [("lowercase", "uppercase"), ("json", "bullets"), ("json", "paragraphs"), ("quotation", "end_phrase"),
                 ("capital_words", "lowercase"), ("start_word", "repeat_request")]:
        assert frozenset(must) in pairs
    assert all(len(p) == 2 and p <= set(v.KINDS) for p in pairs)
    assert not pairs & {frozenset(p) for p in v.COMPATIBLE_PAIRS}
    for split in v.SPLITS:
        for row in v.make_prompts(300, split=split, seed=11):
            kinds = [c["kind"] for c in row["constraints"]]
            assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)
            assert not any(frozenset(p) in pairs for p in itertools.combinations(kinds, 2))


def test_compatible_rejects_count_clashes():
    assert not v.compatible([v.SentenceCount("at most", 3), v.Bullets(4)])
    # 7 lines (4 bullets, title, P.S., the request) of ~6 words each, plus the request's 4 words, exceed 40 words.
    too_long = [v.WordCount("at most", 40), v.Bullets(4), v.Title(), v.Postscript(),
                v.RepeatRequest("Describe a park.")]
    assert not v.compatible(too_long)
    assert v.compatible(too_long[:-1])
    assert not v.compatible([v.WordCount("at least", 80), v.SentenceCount("at most", 3)])  # > 20 words a sentence
    assert not v.compatible([v.Keywords(("plan",)), v.AvoidWord("plan")])
    assert not v.compatible([v.Lowercase(), v.Uppercase()])
    assert not v.compatible([v.Bullets(2), v.Bullets(3)])
    assert v.compatible([v.SentenceCount("at most", 4), v.Bullets(3)])


def test_pools_never_clash():
    avoid = set(v.AVOID_WORDS)
    assert not avoid & set(v.KEYWORDS)
    texts = [*v.TRAIN_TOPICS, *v.TEST_TOPICS, *v.END_PHRASES, *v.START_WORDS, *v.REQUEST_FORMS]
    assert not [(t, w) for t in texts for w in avoid if v.has_word(t, w)]
    assert not [t for t in [*texts, *v.KEYWORDS] if "," in t or '"' in t]


def _witness(constraints):
    """A response built to satisfy every constraint in `constraints` (the proof that a sampled set is satisfiable)."""
    by = {c.kind: c for c in constraints}
    get = by.get
    tokens = list(getattr(get("keywords"), "keywords", ()))
    tokens += ["WOW", "YES", "NOW", "HEY"][: getattr(get("capital_words"), "n", 0)]
    tokens += ["[name]"] * getattr(get("placeholders"), "n", 0)
    if "letter_frequency" in by:
        tokens.append(by["letter_frequency"].letter * by["letter_frequency"].n)
    extras = sum(k in by for k in ("title", "postscript", "repeat_request", "end_phrase"))
    units = getattr(get("bullets"), "n", 0) or getattr(get("paragraphs"), "n", 0) or 1
    s = get("sentence_count")
    body_n = max(units, (s.n - extras) if s is not None and s.relation == "at least" else 1)

    def build(pad):
        first = ["we", "walk", "to", "the", "park", *tokens, *(["then", "rest"] * pad)[:pad]]
        if "start_word" in by:
            first.insert(0, by["start_word"].word)
        sentences = [" ".join(first) + "."] + ["we walk to the park."] * (body_n - 1)
        groups = [[x] for x in sentences[: units - 1]] + [sentences[units - 1:]]
        if "json" in by:
            return json.dumps({"answer": " ".join(sentences)})
        if "bullets" in by:
            body = "\n".join("* " + " ".join(g) for g in groups)
        else:
            body = "\n***\n".join(" ".join(g) for g in groups)
        lines = [getattr(get("repeat_request"), "request", None), "<<a calm day>>" if "title" in by else None, body,
                 "P.S. see you." if "postscript" in by else None, getattr(get("end_phrase"), "phrase", None)]
        text = "\n".join(x for x in lines if x)
        text = text.lower() if "lowercase" in by else text.upper() if "uppercase" in by else text
        return f'"{text}"' if "quotation" in by else text

    text = build(0)
    w = get("word_count")
    if w is not None and w.relation == "at least":
        text = build(max(0, w.n - v.count_words(text)))
    return text


@pytest.mark.parametrize("split", v.SPLITS)
def test_every_sampled_set_is_satisfiable(split):
    for seed in range(4):
        for row in v.make_prompts(150, split=split, seed=seed):
            constraints = v.parse_constraints(row["prompt"])
            response = _witness(constraints)
            detail = v.score_detail(row["prompt"], response)
            assert detail["all_passed"], (row["prompt"], response, detail)
            assert v.score(row["prompt"], response) == 1.0


def test_make_prompts_deterministic_by_seed():
    assert v.make_prompts(40, seed=3) == v.make_prompts(40, seed=3)
    assert v.make_prompts(40, seed=3) != v.make_prompts(40, seed=4)
    assert v.make_prompts(40, split="test", seed=3) == v.make_prompts(40, split="test", seed=3)
    assert v.make_prompts(0) == []
    row = v.make_prompts(1)[0]
    assert set(row) == {"prompt", "constraints", "topic"}


def test_make_prompts_bad_arguments():
    with pytest.raises(AlignError, match="unknown split 'dev'"):
        v.make_prompts(3, split="dev")
    with pytest.raises(AlignError, match="n = -1"):
        v.make_prompts(-1)
    with pytest.raises(AlignError, match="unknown kind 'bold'"):
        v.from_dict({"kind": "bold"})


# Checker


PROMPT = (
    "Describe your favourite park. Use exactly 2 bullet points, each on its own line starting with \"* \". "
    "Do not use any commas in your response. Include the keywords \"calm\" and \"morning\" in your response."
)


def test_score_detail_by_hand():
    response = "* The park is calm in the morning.\n* Ducks swim, and kids play."
    detail = v.score_detail(PROMPT, response)
    assert [e["kind"] for e in detail["constraints"]] == ["bullets", "no_commas", "keywords"]
    assert [e["passed"] for e in detail["constraints"]] == [True, False, True]
    assert [e["value"] for e in detail["constraints"]] == [1.0, 0.5, 1.0]  # one comma: 0.5 / 1
    assert detail["constraints"][1]["instruction"] == "Do not use any commas in your response."
    assert detail["constraints"][2]["params"] == {"keywords": ["calm", "morning"]}
    assert detail["score"] == pytest.approx(2.5 / 3) == v.score(PROMPT, response)
    assert detail["strict_score"] == pytest.approx(2 / 3) == v.score(PROMPT, response, strict=True)
    assert not detail["all_passed"]


def test_score_is_mean_of_details_and_in_unit_interval():
    rows = v.make_prompts(40, split="test", seed=2)
    responses = ["", "ok", "* a\n* b", '"HELLO, WORLD" P.S. bye', "<<t>> one. two. three. Take care."]
    for row in rows:
        for r in responses:
            detail = v.score_detail(row["prompt"], r)
            values = [e["value"] for e in detail["constraints"]]
            assert 0.0 <= detail["score"] <= 1.0
            assert detail["score"] == pytest.approx(sum(values) / len(values)) == v.score(row["prompt"], r)


def test_labeler_signature_and_rank_stage_loading():
    from align.stages.rank import function_labeler

    responses = ["* The park is calm in the morning.\n* Ducks swim.", "A park.", ""]
    scores = v.labeler(PROMPT, responses)
    assert isinstance(scores, list) and len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2] == 0.0
    assert v.strict_labeler(PROMPT, responses) == [1.0, pytest.approx(1 / 3), 0.0]  # "A park." has no comma
    rank_labeler = function_labeler("align.data.verifiable:labeler")
    assert rank_labeler([PROMPT], [responses]) == [scores]


def test_unknown_prompt_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="Tell me a joke about cats"):
        v.score("Tell me a joke about cats, please.", "No.")
    with pytest.raises(AlignError, match="no verifiable instruction"):
        v.labeler("Tell me a joke.", ["No."])
    with pytest.raises(ValueError, match="no request comes before"):
        v.parse_constraints(v.RepeatRequest("x").instruction())


# Files


def test_write_dataset_and_main(tmp_path):
    out = tmp_path / "data" / "ifeval_test.jsonl"
    assert v.main(["--split", "test", "--n", "7", "--seed", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == v.make_prompts(7, split="test", seed=1)
    assert v.write_dataset(str(tmp_path / "train.jsonl"), 3) == 3
    with pytest.raises(SystemExit):
        v.main(["--n", "0", "--out", str(out)])
