"""align.data.rankings (formatting, tokenization) and align.trainers.reward (collator with literal tensors,
RankingRewardTrainer, score/offset).

Tiny models from configs and a WordLevel tokenizer built here; the data's gold order is learnable: a response's
reward is the number of times it says "good".
"""

import json
import logging
import random

import pytest
import torch
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from align.data.rankings import encode_for_reward, format_for_reward, ranking_to_ranks, tokenize_rankings
from align.errors import AlignError
from align.rl.ranking import kendall_tau, pair_accuracy, ranking_loss, top1_accuracy
from align.trainers.reward import (
    RankingCollator,
    RankingRewardTrainer,
    reward_offset,
    scatter_rewards,
    score,
)
from align.trainers.reward_config import RankingRewardConfig

torch.set_num_threads(1)

WORDS = ["<pad>", "</s>", "<unk>", "<s>", "good", "q", "u:", "a:"] + [f"w{i}" for i in range(12)]
PAD, EOS, UNK, BOS, GOOD, Q = range(6)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def w(i: int) -> int:
    return WORDS.index(f"w{i}")


def llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=PAD,
    )
    return LlamaForSequenceClassification(config)


def goodness_data(n: int, k: int | tuple[int, ...], seed: int) -> Dataset:
    """n groups of k responses (k may vary per row) of 5 words; gold ranking = more "good" is better."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kk = rng.choice(k) if isinstance(k, tuple) else k
        counts = rng.sample(range(5), kk)
        responses = []
        for c in counts:
            words = ["good"] * c + [f"w{rng.randrange(12)}" for _ in range(5 - c)]
            rng.shuffle(words)
            responses.append(" ".join(words))
        ranking = sorted(range(kk), key=lambda i: -counts[i])
        rows.append({"prompt": f"q w{rng.randrange(12)}", "responses": responses, "ranking": ranking})
    return Dataset.from_list(rows)


def config(tmp_path, **kw) -> RankingRewardConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        bf16=False,  # the CPU may lack native bf16 (emulated: ~15x slower)
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=0,
    )
    return RankingRewardConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------------
# Formatting and tokenization


def test_format_for_reward_plain(tokenizer):
    assert format_for_reward(tokenizer, "q w1", "good w2") == "q w1 good w2</s>"
    # no template: the tokenizer's own special tokens (none for this post-processor) + text, EOS read last
    assert encode_for_reward(tokenizer, "q w1", "good w2") == [Q, w(1), GOOD, w(2), EOS]
    # left truncation keeps the response's end
    assert encode_for_reward(tokenizer, "q w1", "good w2", max_length=3) == [GOOD, w(2), EOS]


def test_format_for_reward_chat_template(tokenizer):
    templated = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )
    templated.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ 'u: ' if m['role'] == 'user' else 'a: ' }}"
        "{{ m['content'] }} {% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    assert format_for_reward(templated, "q w1", "good") == "<s>u: q w1 a: good </s>"
    # the template renders BOS itself: it appears once
    user, assistant = WORDS.index("u:"), WORDS.index("a:")
    assert encode_for_reward(templated, "q w1", "good") == [BOS, user, Q, w(1), assistant, GOOD, EOS]


def test_tokenize_rankings_rankings_pairs_and_ties(tokenizer, tmp_path):
    # Through a JSONL file as `align rank` writes it: a tie list beside plain indices loads as datasets' Json type.
    path = tmp_path / "rank.jsonl"
    rows = [
        {"prompt": "q", "responses": ["w1", "good", "w2"], "ranking": [1, [0, 2]]},
        {"prompt": "q", "responses": ["w1", "good"], "ranking": [1, 0]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ranked = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    out = tokenize_rankings(ranked, tokenizer, max_length=None)
    assert out.column_names == ["input_ids", "ranks", "length"]
    assert out[0] == {"input_ids": [[Q, w(1), EOS], [Q, GOOD, EOS], [Q, w(2), EOS]], "ranks": [1, 0, 1], "length": 3}
    assert out[1] == {"input_ids": [[Q, w(1), EOS], [Q, GOOD, EOS]], "ranks": [1, 0], "length": 3}

    pairs = Dataset.from_list([{"prompt": "q", "chosen": "good", "rejected": "w1", "margin": 2.0}])
    out = tokenize_rankings(pairs, tokenizer, max_length=None)
    assert out[0] == {"input_ids": [[Q, GOOD, EOS], [Q, w(1), EOS]], "ranks": [0, 1], "length": 3, "margin": 2.0}


def test_group_by_length_sees_each_groups_longest_sequence(tokenizer, tmp_path):
    """Trainer's LengthGroupedSampler gets the group's longest sequence, not len(input_ids) = K; also for
    pre-tokenized data without a length column, and under another `length_column_name`."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rows = [{"prompt": "q", "responses": ["w1 " * n + "good", "w2"], "ranking": [0, 1]} for n in (5, 1, 3, 0)]
    longest = [n + 3 for n in (5, 1, 3, 0)]  # Q, n x w1, good, EOS
    raw = Dataset.from_list(rows)
    bare = tokenize_rankings(raw, tokenizer, max_length=None).remove_columns("length")
    for data, column in ((raw, "length"), (bare, "length"), (raw, "n_tokens")):
        args = config(tmp_path, train_sampling_strategy="group_by_length", length_column_name=column)
        trainer = RankingRewardTrainer(model=llama(), args=args, train_dataset=data, processing_class=tokenizer)
        sampler = trainer._get_train_sampler(trainer._remove_unused_columns(trainer.train_dataset))
        assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == longest


def test_tokenize_rankings_truncation_warns_with_count(tokenizer, caplog):
    ds = Dataset.from_list(
        [
            {"prompt": "q w1 w2 w3", "responses": ["good", "w4 w5"], "ranking": [0, 1]},  # 6 and 7 tokens
            {"prompt": "q", "responses": ["good", "w4"], "ranking": [1, 0]},  # 3 and 3 tokens
        ]
    )
    with caplog.at_level(logging.WARNING, logger="align.data.rankings"):
        out = tokenize_rankings(ds, tokenizer, max_length=5, source="rank.jsonl")
    assert out[0]["input_ids"] == [[w(1), w(2), w(3), GOOD, EOS], [w(2), w(3), w(4), w(5), EOS]]
    assert out[1]["input_ids"] == [[Q, GOOD, EOS], [Q, w(4), EOS]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 responses are longer than max_length=5" in warnings[0]


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "lists response 0 twice"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, "index 2 is out of range"),
        ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "covers 2 of 3 responses"),
        ({"prompt": "q", "responses": ["a"], "ranking": [0]}, "a ranking needs at least 2"),
        ({"prompt": "q", "responses": ["a", " "], "ranking": [0, 1]}, "'responses[1]' is empty"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [[0, 1]]}, "all 2 responses are tied"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' is int"),
        ({"prompt": "q", "text": "a"}, "columns present: ['prompt', 'text']"),
    ],
)
def test_tokenize_rankings_errors_name_file_and_row(tokenizer, row, what):
    ds = Dataset.from_list([row])
    with pytest.raises(AlignError) as e:
        tokenize_rankings(ds, tokenizer, max_length=None, source="data/rank.jsonl")
    assert str(e.value).startswith("data/rank.jsonl:1: ")
    assert what in str(e.value)


def test_tokenize_rankings_error_row_number(tokenizer):
    ds = Dataset.from_list(
        [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}] * 16
        + [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 5]}]
    )
    with pytest.raises(AlignError, match=r"^data/rank.jsonl:17: 'ranking' index 5"):
        tokenize_rankings(ds, tokenizer, max_length=None, source="data/rank.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Collator


def test_collator_literal_tensors():
    features = [
        {"input_ids": [[5, 6, 7], [8], [9, 10]], "ranks": [0, 2, 1], "margin": 0.5},
        {"input_ids": [[11, 12], [13, 14, 15, 16]], "ranks": [1, 0], "margin": 0.0},
    ]
    batch = RankingCollator(pad_token_id=0)(features)
    assert sorted(batch) == ["attention_mask", "input_ids", "margin", "ranks"]
    # 5 rows: one per present response, none for group 2's absent third response
    torch.testing.assert_close(
        batch["input_ids"],
        torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 0, 0], [11, 12, 0, 0], [13, 14, 15, 16]]),
    )
    torch.testing.assert_close(
        batch["attention_mask"],
        torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
    )
    torch.testing.assert_close(batch["ranks"], torch.tensor([[0, 2, 1], [1, 0, -1]]))
    torch.testing.assert_close(batch["margin"], torch.tensor([0.5, 0.0]))

    no_margin = [{k: v for k, v in f.items() if k != "margin"} for f in features]
    batch = RankingCollator(pad_token_id=3, pad_to_multiple_of=8)(no_margin)
    assert "margin" not in batch
    assert batch["input_ids"].shape == (5, 8)
    torch.testing.assert_close(batch["input_ids"][1], torch.tensor([8, 3, 3, 3, 3, 3, 3, 3]))


def test_scatter_rewards_follows_ranks():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    grid = scatter_rewards(scores, torch.tensor([[0, 2, 1], [1, 0, -1]]))
    nan = float("nan")
    torch.testing.assert_close(grid, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, nan]]), equal_nan=True)
    grid[0, 1].backward()
    torch.testing.assert_close(scores.grad, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="4 scores for 5 present"):
        scatter_rewards(scores[:4], torch.tensor([[0, 2, 1], [1, 0, -1]]))


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


def test_config_validates_ranking_loss(tmp_path):
    with pytest.raises(ValueError, match="ranking_loss='listwise'.*pairwise, plackett_luce"):
        config(tmp_path, ranking_loss="listwise")


def test_trainer_learns_the_ranking(tokenizer, tmp_path):
    model = llama(seed=3)  # at init this one orders the eval pairs about at chance (0.44)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RankingRewardTrainer(
        model=model,
        args=config(tmp_path, max_steps=40),
        train_dataset=goodness_data(96, (2, 3, 4), seed=1),  # K varies: padded groups
        eval_dataset=goodness_data(32, 3, seed=2),
        processing_class=tokenizer,
    )
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.6 * losses[0], losses
    assert end["eval_loss"] < start["eval_loss"]
    assert start["eval_pair_accuracy"] < 0.6 < 0.9 < end["eval_pair_accuracy"], (start, end)
    assert {"eval_top1_accuracy", "eval_kendall_tau"} <= set(end)
    assert end["eval_kendall_tau"] > 0.7
    assert "pair_accuracy" in trainer.state.log_history[0]  # train-time metric next to the loss
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_each_response_is_forwarded_once(tokenizer, tmp_path, model_type):
    if model_type == "gpt2":
        torch.manual_seed(0)
        gpt2 = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=1)
        model = GPT2ForSequenceClassification(gpt2)
    else:
        model = llama()
    data = goodness_data(12, (2, 3, 4), seed=3)
    n_responses = sum(len(r) for r in data["responses"])
    calls, rows = [], []

    def count(module, args, kwargs, output):
        calls.append(1)
        rows.append(kwargs["input_ids"].shape[0])

    model.register_forward_hook(count, with_kwargs=True)
    trainer = RankingRewardTrainer(
        model=model,
        args=config(tmp_path, per_device_train_batch_size=4, num_train_epochs=1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(calls) == 3  # 12 groups / 4 per batch: one forward per batch
    assert sum(rows) == n_responses  # every response once, nothing for padded slots
    assert model.config.pad_token_id == PAD


def _train_two_steps(tokenizer, tmp_path, batch: int, accumulation: int, loss: str = "pairwise"):
    # Pre-tokenized data (used as is) where 3 groups are all tied: they have no pair, so micro-batches hold unequal
    # numbers of counted groups, and only an exact normalization (sum / groups in the accumulated batch) matches the
    # big batch; Trainer's default (mean per micro-batch / accumulation steps) would not.
    data = tokenize_rankings(goodness_data(16, (2, 3, 4), seed=4), tokenizer, max_length=None)
    data = data.map(
        lambda row, i: {"ranks": [0] * len(row["ranks"]) if i % 5 == 0 else row["ranks"]}, with_indices=True
    )
    model = llama(seed=1)
    trainer = RankingRewardTrainer(
        model=model,
        args=config(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            logging_steps=1,
            ranking_loss=loss,
            center_rewards_coefficient=0.01,
            optim="sgd",  # gradients compare directly: Adam would normalize a difference away
            learning_rate=0.1,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["pairwise", "plackett_luce"])
def test_gradient_accumulation_matches_larger_batch(tokenizer, tmp_path, loss):
    losses_big, params_big = _train_two_steps(tokenizer, tmp_path, batch=8, accumulation=1, loss=loss)
    losses_acc, params_acc = _train_two_steps(tokenizer, tmp_path, batch=4, accumulation=2, loss=loss)
    torch.testing.assert_close(torch.tensor(losses_acc), torch.tensor(losses_big), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params_acc, params_big, rtol=1e-4, atol=1e-5)
    # and the steps moved the weights (the comparison is not between two untouched models)
    assert not torch.allclose(params_big, torch.cat([p.detach().flatten() for p in llama(seed=1).parameters()]))


def test_evaluate_metrics_match_direct_scoring(tokenizer, tmp_path):
    # K varies and eval batches are small, so Trainer pads predictions/labels across batches with -100: the metrics
    # must equal those computed from `score` on the raw rows.
    data = goodness_data(10, (2, 3, 4), seed=5)
    model = llama(seed=3)
    trainer = RankingRewardTrainer(
        model=model,
        args=config(tmp_path, per_device_eval_batch_size=3),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    k_max = max(len(r) for r in data["responses"])
    rewards = torch.full((len(data), k_max), float("nan"))
    ranks = torch.full((len(data), k_max), -1)
    for g, row in enumerate(data):
        k = len(row["responses"])
        rewards[g, :k] = score(model, tokenizer, [row["prompt"]] * k, row["responses"])
        ranks[g, :k] = torch.tensor(ranking_to_ranks(row["ranking"], k, where="test"))
    assert metrics["eval_pair_accuracy"] == pytest.approx(pair_accuracy(rewards, ranks).item(), abs=1e-6)
    assert metrics["eval_top1_accuracy"] == pytest.approx(top1_accuracy(rewards, ranks).item(), abs=1e-6)
    assert metrics["eval_kendall_tau"] == pytest.approx(kendall_tau(rewards, ranks).item(), abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(ranking_loss(rewards, ranks).item(), rel=0.05)  # batch-mean of means


def test_plackett_luce_rejects_margin(tokenizer, tmp_path):
    pairs = Dataset.from_list([{"prompt": "q", "chosen": "good", "rejected": "w1", "margin": 1.0}])
    with pytest.raises(AlignError, match="'margin' column but ranking_loss='plackett_luce'"):
        RankingRewardTrainer(
            model=llama(),
            args=config(tmp_path, ranking_loss="plackett_luce"),
            train_dataset=pairs,
            processing_class=tokenizer,
        )


def test_rejects_multi_label_model(tokenizer, tmp_path):
    model = llama()
    model.config.num_labels = 2
    with pytest.raises(AlignError, match="num_labels=2"):
        RankingRewardTrainer(
            model=model, args=config(tmp_path), train_dataset=goodness_data(4, 2, 0), processing_class=tokenizer
        )


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and the offset


def test_score_batches_agree_and_offset_roundtrips(tokenizer, tmp_path):
    model = llama(seed=2)
    prompts = ["q w1", "q", "q w2 w3 w4", "q w5"]
    responses = ["good", "w1 w2 w3 good good", "w6", "good w7"]
    one_by_one = score(model, tokenizer, prompts, responses, batch_size=1)
    batched = score(model, tokenizer, prompts, responses, batch_size=3)  # right padding must not change a score
    torch.testing.assert_close(batched, one_by_one)
    assert one_by_one.shape == (4,) and one_by_one.std() > 0

    offset = reward_offset(model, tokenizer, prompts, responses, batch_size=2)
    assert offset == pytest.approx(one_by_one.mean().item(), abs=1e-6)
    model.config.align_reward_offset = offset
    centered = score(model, tokenizer, prompts, responses)
    torch.testing.assert_close(centered, one_by_one - offset)
    assert abs(centered.mean().item()) < 1e-5
    with pytest.raises(ValueError, match="at least one"):
        reward_offset(model, tokenizer, [], [])
    torch.testing.assert_close(score(model, tokenizer, prompts, responses, offset=0.0), one_by_one)

    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    loaded_tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "rm")
    assert loaded.config.align_reward_offset == pytest.approx(offset)
    torch.testing.assert_close(score(loaded, loaded_tok, prompts, responses), centered)


# ---------------------------------------------------------------------------------------------------------------------
# An encoder reward model (issue 19): a BERT with its own WordPiece tokenizer (no EOS, no chat template) reads
# (prompt, response) as the tokenizer's sentence pair, `[CLS] prompt [SEP] response [SEP]`, in training and scoring.

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLS, SEP = 2, 3


@pytest.fixture(scope="module")
def bert_tok():
    from tokenizers import normalizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator([" ".join(WORDS[4:])] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]")  # fmt: skip


def bert_config(tok, **kw):
    from transformers import BertConfig

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertConfig(vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id, **sizes, **kw)


@pytest.fixture(scope="module")
def bert_dir(bert_tok, tmp_path_factory):
    """A tiny BERT encoder (no task head, as all-MiniLM-L6-v2 is saved) and its WordPiece tokenizer."""
    from transformers import BertModel

    path = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    BertModel(bert_config(bert_tok)).save_pretrained(path)
    bert_tok.save_pretrained(path)
    return path


def test_is_encoder_rule(bert_tok, tokenizer):
    from transformers import BertConfig, PreTrainedConfig, T5Config

    from align.models.modeling import is_encoder
    from align.models.modeling_reward import LikelihoodRewardConfig

    assert is_encoder(BertConfig()) and is_encoder(BertConfig(architectures=["BertForSequenceClassification"]))
    # bert is in transformers' causal-LM mapping too: a decoder BERT is caught by is_decoder / its architecture
    assert not is_encoder(BertConfig(is_decoder=True))
    assert not is_encoder(BertConfig(architectures=["BertLMHeadModel"]))
    assert not any(is_encoder(c) for c in (LlamaConfig(), GPT2Config(), T5Config()))
    assert not is_encoder(LikelihoodRewardConfig(text_config=LlamaConfig().to_dict()))
    # a model type transformers does not know: no EOS and no chat template make it an encoder
    assert is_encoder(PreTrainedConfig(), bert_tok) and not is_encoder(PreTrainedConfig(), tokenizer)


def test_encoder_reads_prompt_and_response_as_a_pair(bert_tok):
    assert bert_tok.tokenize("q w1 good w2 w3") == ["q", "w1", "good", "w2", "w3"]
    q, w1, good, w2, w3 = bert_tok.convert_tokens_to_ids(["q", "w1", "good", "w2", "w3"])
    expected = [CLS, q, w1, SEP, good, w2, SEP]
    assert encode_for_reward(bert_tok, "q w1", "good w2", pair=True) == expected
    assert encode_for_reward(bert_tok, "q w1", "good w2") == expected  # no EOS, no chat template: the pair
    assert encode_for_reward(bert_tok, "q w1", "", pair=True) == [CLS, q, w1, SEP, SEP]  # still a pair
    # longest first, from the end (as transformers cuts pairs): 9 tokens -> 7, the prompt loses 2; [CLS] stays
    assert encode_for_reward(bert_tok, "q w1 w2 w3", "good w2", max_length=7, pair=True) == expected
    ds = Dataset.from_list([{"prompt": "q w1 w2 w3", "chosen": "good w2", "rejected": "w3"}])
    out = tokenize_rankings(ds, bert_tok, max_length=7, pair=True)
    assert out[0]["input_ids"] == [expected, [CLS, q, w1, w2, SEP, w3, SEP]]  # 8 tokens -> 7


def _encoder_stage(model, rows: list[dict], tmp_path, **over):
    from align.config import parse_config
    from align.stages.reward import run

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(tmp_path / "reward"),
              "dataset_test_size": 0.25, "max_length": 32, "num_train_epochs": 4, "per_device_train_batch_size": 8,
              "learning_rate": 3e-3, "logging_steps": 2, "save_strategy": "no", "bf16": False, "use_cpu": True,
              "report_to": "none", "disable_tqdm": True, "seed": 0, **over}  # fmt: skip
    return run(parse_config("reward", [], overrides=recipe))


@pytest.mark.parametrize("shape", ["rankings", "pairs"])
def test_encoder_reward_stage_trains_saves_and_scores(bert_dir, bert_tok, tmp_path, caplog, shape):
    """Before: jinja2 UndefinedError: 'eos_token' is undefined (align's chat template installed on a BERT)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from align.evaluation.score import load_scorer
    from align.io import read_stage_info

    rows = goodness_data(48, 3, seed=5).to_list()  # K = 3
    if shape == "pairs":
        rows = [{"prompt": r["prompt"], "chosen": r["responses"][r["ranking"][0]],
                 "rejected": r["responses"][r["ranking"][-1]]} for r in rows]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="align.stages.reward"):
        out = _encoder_stage(bert_dir, rows, tmp_path)
    assert "formats (prompt, response) as the tokenizer's sentence pair, tokenizer(prompt, response) = [CLS] prompt " \
           "[SEP] response [SEP]" in caplog.text  # fmt: skip
    info = read_stage_info(out)
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses[-1] < losses[0], losses
    saved = AutoTokenizer.from_pretrained(out)
    assert not saved.chat_template and saved.get_vocab() == bert_tok.get_vocab()  # kept as it was

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert isinstance(model, BertForSequenceClassification)
    prompts, responses = ["q w1", "q w2"], ["good good w3", "w4 w5"]
    scores = load_scorer(str(out), device="cpu", raw=True)(prompts, responses)
    with torch.no_grad():
        direct = [model(input_ids=torch.tensor([bert_tok(p, r)["input_ids"]])).logits[0, 0].item()
                  for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    assert scores == pytest.approx(direct, abs=1e-5)


def test_likelihood_features_on_an_encoder_is_one_line(bert_dir, tmp_path, capsys):
    """Before: RuntimeError: Error(s) in loading state_dict for BertModel (LikelihoodRewardModel.from_causal_lm)."""
    from align.cli import main as align_main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in goodness_data(8, 3, seed=6).to_list()))
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(f"model_name_or_path: {bert_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n"
                      "likelihood_features: [mean, min]\nuse_cpu: true\nreport_to: none\n")  # fmt: skip
    assert align_main(["reward", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {bert_dir}: likelihood_features need a causal LM (its LM head scores the response's tokens), and "
        "this is a bert encoder (BertModel). Drop likelihood_features to train it with a scalar head, or start from "
        "a causal LM (e.g. the SFT stage)."
    ]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ppo_scores_rollouts_with_the_encoder_pair(bert_tok, tmp_path):
    """The PPO trainer scores (prompt, response) with the reward model's own tokenizer: an encoder gets the pair."""
    from transformers import BertForSequenceClassification, GPT2LMHeadModel

    from align.models.modeling import wordlevel_tokenizer
    from align.trainers.ppo import PPOTrainer
    from align.trainers.ppo_config import PPOConfig

    tok = wordlevel_tokenizer(["good", "q", "w1", "w2"])  # the policy's tokenizer
    gpt2 = dict(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(**gpt2))
    value = GPT2ForSequenceClassification(GPT2Config(**gpt2, num_labels=1))
    reward = BertForSequenceClassification(bert_config(bert_tok, num_labels=1))
    reward.config.align_reward_offset = 0.25
    args = PPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_mini_batches=1,
                     num_ppo_epochs=1, max_new_tokens=4, save_strategy="no", report_to="none", use_cpu=True,
                     bf16=False, disable_tqdm=True, seed=1)  # fmt: skip
    trainer = PPOTrainer(args, policy, reward_model=reward, value_model=value, processing_class=tok,
                         reward_tokenizer=bert_tok, train_dataset=[{"prompt": "q w1"}] * 4)  # fmt: skip
    ids = bert_tok("q w1", "good w2")["input_ids"]  # [CLS] q w1 [SEP] good w2 [SEP]
    seen = []  # what the reward model is fed (a random BERT scores "[CLS] q w1 good w2 [SEP]" almost the same)
    reward.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    with torch.no_grad():
        expected = reward.eval()(input_ids=torch.tensor([ids])).logits[0, 0] - 0.25
    torch.testing.assert_close(trainer.score(["q w1"], ["good w2"])[0], expected)
    assert seen[-1].tolist() == [ids]
    trainer.train()  # rollouts scored by the encoder end to end
    # every rollout as a pair, an empty response too ("[CLS] q w1 [SEP] [SEP]")
    assert all((batch[:, 0] == CLS).all() and ((batch == SEP).sum(1) == 2).all() for batch in seen[2:])


def test_score_learning_rate_gives_the_head_its_own_rate(tokenizer, tmp_path):
    model = llama(seed=3)
    trainer = RankingRewardTrainer(model=model, args=config(tmp_path, learning_rate=1e-4, score_learning_rate=0.5,
                                                           max_steps=1, weight_decay=0.1),
                                   train_dataset=goodness_data(8, 3, seed=1), processing_class=tokenizer)  # fmt: skip
    optimizer = trainer.create_optimizer()
    head = [g for g in optimizer.param_groups if g.get("score_head")]
    assert [p is model.score.weight for g in head for p in g["params"]] == [True]
    assert head[0]["lr"] == 0.5 and head[0]["weight_decay"] == 0.1  # the decay of the group it came from
    rest = [p for g in optimizer.param_groups if not g.get("score_head") for p in g["params"]]
    assert len(rest) == sum(1 for _ in model.parameters()) - 1
    assert all(g["lr"] == 1e-4 for g in optimizer.param_groups if not g.get("score_head"))
    assert trainer.create_optimizer() is optimizer and len(optimizer.param_groups) == 3  # split once
    before = model.score.weight.detach().clone()
    trainer.train()
    # constant schedule: AdamW's first step moves each weight by lr (|m / sqrt(v)| = 1) plus lr * decay * w
    moved = (model.score.weight - before).abs()
    assert moved.max().item() == pytest.approx(0.5 * (1 + 0.1 * before.abs()).max().item(), rel=0.05)


def test_score_learning_rate_needs_a_score_head(tokenizer, tmp_path):
    model = llama(seed=3)
    model.score.weight.requires_grad_(False)
    trainer = RankingRewardTrainer(model=model, args=config(tmp_path, score_learning_rate=0.5, max_steps=1),
                                   train_dataset=goodness_data(8, 3, seed=1), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(AlignError, match="no trainable `score` head"):
        trainer.create_optimizer()
