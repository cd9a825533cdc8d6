"""PPOTrainer end to end on tiny GPT-2 models: learning, exact resume, LoRA reference, NaN guard, saved outputs."""

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    TrainerCallback,
)

from align.errors import AlignError
from align.models.modeling import cpu_has_native_bf16, wordlevel_tokenizer
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig

torch.set_num_threads(1)
WORDS = ["good", "bad", "a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def tok():
    return wordlevel_tokenizer(WORDS)


def gpt2_config(tok, **kw):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sizes = {"vocab_size": len(tok), "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}
    return GPT2Config(**{**sizes, **ids, **kw})


def models(tok, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(tok)), GPT2ForSequenceClassification(gpt2_config(tok, num_labels=1))


def count_good(prompts, responses):
    """Toy reward: share of the 6 response slots that hold the word 'good'."""
    return torch.tensor([r.split().count("good") / 6 for r in responses])


# 1 to 4 words: rollouts mix prompt lengths, so left padding is exercised
PROMPTS = [{"prompt": " ".join(WORDS[i % 8] for i in range(j, j + 1 + j % 4))} for j in range(32)]


def make_args(out, **kw):
    base = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
        learning_rate=3e-3, max_new_tokens=6, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=1, bf16=False,  # pinned numerics: float32, whatever the CPU
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


def make_trainer(tok, args, seed=0, **kw):
    policy, value = models(tok, seed)
    kw.setdefault("reward_fn", count_good)
    kw.setdefault("value_model", value)
    return PPOTrainer(args, policy, processing_class=tok, train_dataset=PROMPTS, **kw)


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ---------------------------------------------------------------------------------------------------------------------
# Learning


def test_short_run_raises_reward(tmp_path, tok):
    trainer = make_trainer(tok, make_args(tmp_path, max_steps=16))
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    scores = history(trainer, "ppo/score")
    assert len(scores) == 16
    # a random policy says 'good' ~1/19 of the time; PPO should make it the habit
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3, scores
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())
    last = trainer.state.log_history[-1]
    for key in ("ppo/kl", "ppo/reward", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/policy_loss",
                "ppo/value_loss", "ppo/explained_variance", "ppo/response_length", "ppo/eos_rate", "ppo/kl_coef",
                "time/generation", "time/sampling", "time/scoring", "time/training"):  # fmt: skip
        assert key in last, key
    assert trainer.ref_policy is not None and not any(p.requires_grad for p in trainer.ref_policy.parameters())


def test_old_logprobs_from_generate_match_a_forward_pass(tmp_path, tok):
    # The rollout takes the old logprobs from generate's (KV-cache) logits; the PPO epochs recompute them with a
    # full forward. They must agree, or the first ratio is not 1 and clipping starts on noise.
    from align.rl.ppo import response_mask
    from align.trainers.ppo_rollout import forward_logprobs

    trainer = make_trainer(tok, make_args(tmp_path))
    assert trainer._use_gen_logits
    seq, prompt_mask, responses, old = trainer.generate(trainer.train_prompts[0][:8])
    mask, _ = response_mask(responses, tok.eos_token_id)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    again = forward_logprobs(trainer.policy, seq, attn, pos, responses, temperature=trainer.args.temperature,
                             batch_size=3, accelerator=trainer.accelerator)  # fmt: skip
    torch.testing.assert_close(old[mask], again[mask], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Rollout


def rollout_of(trainer, ref_policy, scores):
    """`make_rollout` on the trainer's first 8 prompts with its models and args, scored `scores` (8,)."""
    from align.trainers.ppo_rollout import make_rollout

    seen = []

    def score_fn(prompts, responses):
        seen.append((prompts, responses))
        return torch.tensor(scores)

    ids, texts = trainer.train_prompts[0][:8], trainer.train_prompts[1][:8]
    rollout = make_rollout(trainer.policy, ref_policy, trainer.value_model, trainer.processing_class, ids, texts,
                           score_fn, args=trainer.args, kl_coef=0.1,
                           eos_token_ids=trainer.eos_token_ids, accelerator=trainer.accelerator,
                           use_gen_logits=True)  # fmt: skip
    assert seen == [(texts, rollout.response_texts)] and rollout.prompts == texts
    return rollout


def test_rollout_holds_aligned_tensors_and_instructgpt_rewards(tmp_path, tok):
    from align.rl.ppo import response_mask
    from align.trainers.ppo_rollout import forward_logprobs

    trainer = make_trainer(tok, make_args(tmp_path, missing_eos_penalty=0.3))
    ref = copy.deepcopy(trainer.policy)
    with torch.no_grad():
        ref.lm_head.weight.add_(0.5 * torch.randn_like(ref.lm_head.weight))  # a reference that differs: KL != 0
    scores = [0.5, -0.5, 1.0, 0.0, 0.25, 2.0, -1.0, 0.75]
    r = rollout_of(trainer, ref, scores)
    B, P, T = 8, r.prompt_length, r.responses.shape[1]
    assert r.query_responses.shape == r.attention_mask.shape == r.position_ids.shape == (B, P + T)
    for x in (r.mask, r.logprobs, r.ref_logprobs, r.values, r.kl, r.rewards, r.advantages, r.returns):
        assert x.shape == (B, T)
    assert torch.equal(r.query_responses[:, P:], r.responses)
    mask, has_eos = response_mask(r.responses, tok.eos_token_id)
    assert torch.equal(r.mask, mask) and torch.equal(r.has_eos, has_eos)
    assert torch.equal(r.attention_mask[:, P:].bool(), r.mask)
    # the ref logprobs are the reference's, the old ones the policy's (from generate's logits)
    fwd = dict(temperature=trainer.args.temperature, batch_size=8, accelerator=trainer.accelerator)
    ids, attn, pos = r.query_responses, r.attention_mask, r.position_ids
    torch.testing.assert_close(r.ref_logprobs, forward_logprobs(ref, ids, attn, pos, r.responses, **fwd))
    torch.testing.assert_close(r.logprobs[r.mask], forward_logprobs(trainer.policy, ids, attn, pos, r.responses,
                                                                    **fwd)[r.mask], atol=1e-5, rtol=1e-5)  # fmt: skip
    assert r.kl[r.mask].abs().sum() > 0.1 and not r.kl[~r.mask].any()
    # score - 0.3 without EOS; reward per response = score - beta * KL (InstructGPT Eq. 2), 0 past each response
    torch.testing.assert_close(r.raw_scores, torch.tensor(scores))
    torch.testing.assert_close(r.scores, torch.tensor(scores) - 0.3 * (~r.has_eos).float())
    torch.testing.assert_close(r.rewards.sum(1), r.scores - 0.1 * r.kl.sum(1))
    for x in (r.rewards, r.advantages, r.returns):
        assert not x[~r.mask].any()
    # advantages whitened over the valid tokens only
    torch.testing.assert_close(r.advantages[r.mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(r.advantages[r.mask].std(), torch.tensor(1.0))


def test_rollout_with_the_policy_as_reference_rewards_only_the_clipped_score(tmp_path, tok):
    trainer = make_trainer(tok, make_args(tmp_path, reward_clip=0.3))
    scores = [0.5, -0.5, 1.0, 0.0, 0.25, 2.0, -1.0, 0.1]
    r = rollout_of(trainer, copy.deepcopy(trainer.policy), scores)
    torch.testing.assert_close(r.scores, torch.tensor([0.3, -0.3, 0.3, 0.0, 0.25, 0.3, -0.3, 0.1]))
    torch.testing.assert_close(r.kl, torch.zeros_like(r.kl), atol=1e-5, rtol=0)
    # the whole reward sits on each response's last token
    last = r.mask.sum(1) - 1
    torch.testing.assert_close(r.rewards[torch.arange(8), last], r.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(r.rewards.abs().sum(1), r.scores.abs(), atol=1e-5, rtol=0)


def test_rollout_refuses_prompts_longer_than_the_policy_allows(tmp_path, tok):
    trainer = make_trainer(tok, make_args(tmp_path, max_new_tokens=60))  # 64 positions: prompts of 1-4 words fail
    with pytest.raises(AlignError, match=r"exceeds the policy's 64 positions. Set max_prompt_length <= 4"):
        rollout_of(trainer, None, [0.0] * 8)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_continues_step_count_and_kl_controller(tmp_path, tok):
    kw = dict(adaptive_kl=True, kl_target=0.5, kl_horizon=50, lr_scheduler_type="constant", save_steps=2)
    full = make_trainer(tok, make_args(tmp_path / "full", max_steps=4, save_strategy="steps", **kw))
    full.train()

    # "killed" after 2 updates: the run stops at max_steps=2 with checkpoint-2 written
    first = make_trainer(tok, make_args(tmp_path / "cut", max_steps=2, save_strategy="steps", **kw))
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "value_model" / "config.json").is_file()
    saved = json.loads((ckpt / "ppo_state.json").read_text())
    assert saved["global_step"] == 2 and saved["kl_controller"]["value"] != 0.05  # the controller moved
    # a save that crashed half-way (no trainer_state.json) is never resumed from
    (tmp_path / "cut" / "checkpoint-3").mkdir()

    # the same starting models (the reference is the initial policy, passed again as a user would)
    second = make_trainer(tok, make_args(tmp_path / "cut", max_steps=4, save_strategy="steps", **kw))
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    assert history(second, "step") == [1, 2, 3, 4]
    # the KL coefficient used at update 3 is the one saved at update 2, updated once more
    assert history(second, "ppo/kl_coef")[2] == pytest.approx(history(full, "ppo/kl_coef")[2])
    assert second.kl_ctl.value == pytest.approx(full.kl_ctl.value)
    # same prompts, same RNG, same weights: the resumed run replays the uninterrupted one
    torch.testing.assert_close(history(second, "ppo/score"), history(full, "ppo/score"))
    for (name, a), b in zip(full.policy.named_parameters(), second.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_deepspeed_zero3_is_refused_naming_what_works(tmp_path, tok, monkeypatch):
    # accelerate enables DeepSpeed only with GPUs: give its state a ZeRO-3 plugin once the Accelerator exists
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    init = Accelerator.__init__

    def with_zero3(self, *args, **kwargs):
        init(self, *args, **kwargs)
        monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", SimpleNamespace(zero_stage=3))

    monkeypatch.setattr(Accelerator, "__init__", with_zero3)
    with pytest.raises(AlignError, match=r"ZeRO-3 is not supported .* FSDP2 \(recipes/accelerate_configs/fsdp.yaml\)"):
        make_trainer(tok, make_args(tmp_path))


def test_nan_reward_stops_naming_step_and_metric(tmp_path, tok):
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        r = count_good(prompts, responses)
        if len(calls) == 3:
            r[0] = float("nan")
        return r

    trainer = make_trainer(tok, make_args(tmp_path, save_strategy="steps", save_steps=1), reward_fn=flaky)
    with pytest.raises(AlignError, match=r"update 3: ppo/score is nan or inf.*checkpoint-2"):
        trainer.train()
    assert not (tmp_path / "checkpoint-3").exists()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA, reward model, value init


def test_lora_policy_uses_disabled_adapter_as_reference(tmp_path, tok):
    from peft import LoraConfig

    policy, value = models(tok)
    base = {n: p.detach().clone() for n, p in policy.named_parameters()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    args = make_args(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = PPOTrainer(args, policy, value_model=value, processing_class=tok, train_dataset=PROMPTS,
                         reward_fn=count_good, peft_config=peft_config)  # fmt: skip
    assert trainer.ref_policy is None  # no second copy of the weights
    trainer.train()
    assert history(trainer, "ppo/kl")[0] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: policy == reference
    assert abs(history(trainer, "ppo/kl")[-1]) > 1e-4
    for name, p in trainer.policy.get_base_model().named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(p, base[name.replace(".base_layer", "")], msg=name)
    trainer.save_model(tmp_path / "merged", merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_reward_model_scores_with_its_own_format_and_offset(tmp_path, tok):
    from align.data.rankings import encode_for_reward

    policy, _ = models(tok)
    torch.manual_seed(1)
    reward = GPT2ForSequenceClassification(gpt2_config(tok, num_labels=1))
    reward.config.align_reward_offset = 0.5
    trainer = PPOTrainer(make_args(tmp_path), policy, reward_model=reward, processing_class=tok, train_dataset=PROMPTS)
    # value_model_init 'reward' (default): the value model starts as a copy of the reward model
    torch.testing.assert_close(trainer.value_model.score.weight, reward.score.weight)
    assert trainer.value_model.score.weight.data_ptr() != reward.score.weight.data_ptr()
    ids = encode_for_reward(tok, "a b", "good c")
    expected = reward(input_ids=torch.tensor([ids])).logits[0, 0] - 0.5
    torch.testing.assert_close(trainer.score(["a b"], ["good c"])[0], expected)
    trainer.train()  # the reward-model path runs end to end


def test_likelihood_reward_model_scores_and_gives_a_plain_value_model(tmp_path, tok):
    """A LikelihoodRewardModel scores rollouts whole (head + likelihood terms); the value model starts from its body
    and head only, as a plain GPT2ForSequenceClassification."""
    from align.data.rankings import encode_for_reward
    from align.models.modeling import ensure_chat_template, generation_marker
    from align.models.modeling_reward import LikelihoodRewardModel

    policy, _ = models(tok)
    chat_tok = copy.deepcopy(tok)
    ensure_chat_template(chat_tok)
    torch.manual_seed(2)
    lm = GPT2LMHeadModel(gpt2_config(chat_tok))
    marker = generation_marker(chat_tok)
    reward = LikelihoodRewardModel.from_causal_lm(lm, features=["mean", "min"], response_marker=marker)
    reward.config.get_text_config().pad_token_id = chat_tok.pad_token_id
    args = make_args(tmp_path, max_steps=1)
    trainer = PPOTrainer(args, policy, reward_model=reward, processing_class=tok, reward_tokenizer=chat_tok,
                         train_dataset=PROMPTS)  # fmt: skip
    assert type(trainer.value_model).__name__ == "GPT2ForSequenceClassification"
    torch.testing.assert_close(trainer.value_model.score.weight, reward.score.weight)
    torch.testing.assert_close(trainer.value_model.transformer.wte.weight, reward.model.wte.weight)
    ids = encode_for_reward(chat_tok, "a b", "good c")
    with torch.no_grad():
        expected = reward(input_ids=torch.tensor([ids])).logits[0, 0]
        feats = reward.features(torch.tensor([ids]), reward.model(torch.tensor([ids])).last_hidden_state,
                                torch.tensor([len(ids) - 1]))  # fmt: skip
    assert (feats < 0).all()  # the likelihood terms are in the score
    torch.testing.assert_close(trainer.score(["a b"], ["good c"])[0], expected)
    trainer.train()


def test_value_init_from_reward_needs_the_policy_tokenizer(tmp_path, tok):
    other = wordlevel_tokenizer([f"w{i}" for i in range(40)])  # the reward model's own tokenizer
    policy = GPT2LMHeadModel(gpt2_config(tok))
    reward = GPT2ForSequenceClassification(gpt2_config(other, num_labels=1))
    with pytest.raises(AlignError, match="value_model_init: policy"):
        PPOTrainer(make_args(tmp_path), policy, reward_model=reward, processing_class=tok, reward_tokenizer=other,
                   train_dataset=PROMPTS)  # fmt: skip
    # value_model_init 'policy': the policy's backbone under a fresh scalar head
    args = make_args(tmp_path, value_model_init="policy", max_steps=1)
    trainer = PPOTrainer(args, policy, reward_model=reward, processing_class=tok, reward_tokenizer=other,
                         train_dataset=PROMPTS)  # fmt: skip
    torch.testing.assert_close(trainer.value_model.transformer.wte.weight, policy.transformer.wte.weight)
    # responses are decoded and re-tokenized for the reward model (out-of-vocabulary words are <unk> there)
    trainer.train()
    # an explicit value model too small for the policy's vocabulary
    with pytest.raises(AlignError, match="embedding rows"):
        PPOTrainer(
            make_args(tmp_path),
            policy,
            reward_fn=count_good,
            processing_class=tok,
            train_dataset=PROMPTS,
            value_model=GPT2ForSequenceClassification(gpt2_config(other, num_labels=1, vocab_size=8)),
        )


def test_ptx_eval_and_callbacks(tmp_path, tok, caplog):
    seen = []

    class Stop(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(logs["step"])

        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 2

    ptx = [{"text": "a b c d e f"}, {"text": "good bad good"}]
    args = make_args(tmp_path, max_steps=5, ptx_coef=0.5, eval_strategy="steps", eval_steps=1, learning_rate=2e-5,
                     logging_steps=1)  # fmt: skip
    trainer = make_trainer(tok, args, ptx_dataset=_ds(ptx), eval_dataset=PROMPTS[:5], callbacks=[Stop()],
                           eval_fn=lambda prompts, responses: float(len(prompts)))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="align.trainers.ppo"):
        trainer.train()
    # linear decay over max_steps=5: 2e-5 * 4/5 after update 1; the log line keeps significant digits, not decimals
    assert "'ppo/lr': 1.6e-05" in caplog.text
    assert trainer.state.global_step == 2  # the callback stopped it
    assert history(trainer, "eval/gold_score") == [5.0, 5.0]
    assert all(v > 0 for v in history(trainer, "ppo/ptx_loss"))
    assert seen and seen[-1] == 2


def test_critic_warmup_trains_the_value_model_alone(tmp_path, tok):
    """critic_warmup_steps 1: update 1 leaves every policy weight bit for bit (its AdamW state empty) and moves the
    value model; update 2 trains both."""
    snapshots = {}
    holder = []

    def params(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            t = holder[0]
            opt = getattr(t.optimizer, "optimizer", t.optimizer)  # accelerate's wrapper, or the optimizer itself
            with_state = [sum(1 for p in g["params"] if opt.state.get(p)) for g in opt.param_groups]
            snapshots[state.global_step] = (params(t.policy), params(t.value_model), with_state)

    args = make_args(tmp_path, max_steps=2, critic_warmup_steps=1, logging_steps=1)
    trainer = make_trainer(tok, args, callbacks=[Snap()])
    holder.append(trainer)
    policy0, value0 = params(trainer.policy), params(trainer.value_model)
    trainer.train()
    (policy1, value1, state1), (policy2, _, state2) = snapshots[1], snapshots[2]
    assert all(torch.equal(policy0[n], policy1[n]) for n in policy0)
    assert any(not torch.equal(value0[n], value1[n]) for n in value0)
    assert any(not torch.equal(policy1[n], policy2[n]) for n in policy1)
    n_policy, n_value = (len(g["params"]) for g in trainer.optimizer.param_groups)
    assert state1 == [0, n_value] and state2 == [n_policy, n_value]  # group 0 is the policy's
    assert history(trainer, "ppo/critic_warmup") == [1.0, 0.0]


def _ds(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Saved outputs


def test_saved_policy_loads_in_pipeline(tmp_path, tok):
    from transformers import pipeline

    trainer = make_trainer(tok, make_args(tmp_path, max_steps=1))
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("a b", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("a b")
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="kl_coef -0.1 is negative"):
        PPOConfig(output_dir=str(tmp_path), kl_coef=-0.1)
    with pytest.raises(ValueError, match="max_steps 10 and total_episodes 64 both set"):
        PPOConfig(output_dir=str(tmp_path), max_steps=10, total_episodes=64)
    with pytest.raises(ValueError, match="temperature 0"):
        PPOConfig(output_dir=str(tmp_path), temperature=0)
    with pytest.raises(ValueError, match="save_strategy 'epoch' is not supported"):
        PPOConfig(output_dir=str(tmp_path), save_strategy="epoch")


def test_config_batch_arithmetic(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_mini_batches=3, total_episodes=100, use_cpu=True)  # fmt: skip
    # mini-batch 4 * 2 = 8, rollout 8 * 3 = 24 per process; 2 processes -> 48 per update; ceil(100 / 48) = 3
    assert (args.local_mini_batch_size, args.local_batch_size) == (8, 24)
    assert args.num_updates(num_prompts=10, world_size=2) == 3
    assert args.bf16 is cpu_has_native_bf16()  # auto on a CPU: bf16 exactly where the CPU computes it natively


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_follows_the_cpu(tmp_path, monkeypatch, native):
    import torch

    from align.models import modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    args = PPOConfig(output_dir=str(tmp_path), max_steps=1)
    assert (args.bf16, args.use_cpu) == ((True, True) if native else (False, False))
    summary = modeling.precision_summary(args)
    assert summary.startswith("cpu, bf16 autocast over float32 weights (auto: the CPU has native bf16" if native
                              else "cpu, float32 (auto: no native bf16 on this CPU")  # fmt: skip
    pinned = PPOConfig(output_dir=str(tmp_path), max_steps=1, bf16=False)
    assert pinned.bf16 is False and modeling.precision_summary(pinned) == "cpu, float32 (bf16: false in the recipe)"


# ---------------------------------------------------------------------------------------------------------------------
# Two processes


TWO_RANKS = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_ppo_trainer import make_trainer, make_args, history, wordlevel_tokenizer, WORDS
tok = wordlevel_tokenizer(WORDS)
trainer = make_trainer(tok, make_args({out!r}, max_steps=2, per_device_train_batch_size=4, save_strategy="steps",
                                      save_steps=2))
assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
trainer.train()
rank = trainer.accelerator.process_index
checksum = sum(float(p.double().sum()) for p in trainer.policy.parameters())
ev = history(trainer, "ppo/explained_variance")
open({out!r} + f"/done_{{rank}}", "w").write(repr((history(trainer, "ppo/episodes"), round(checksum, 6), ev)))
"""


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(TWO_RANKS.format(tests=str(Path(__file__).parent), out=str(tmp_path))))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = subprocess.run([*launcher, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks finished; 2 updates x 2 processes x (4 x 2 mini-batches) prompts = 16, 32 episodes; the ranks
    # sampled different prompts, yet hold the same weights: gradients were all-reduced
    done = [eval((tmp_path / f"done_{r}").read_text()) for r in (0, 1)]
    assert done[0][0] == done[1][0] == [16.0, 32.0]
    assert done[0][1] == done[1][1]
    # explained variance over the tokens of both ranks (gathered), not each rank's own
    assert done[0][2] == done[1][2] and len(done[0][2]) == 2
    assert (tmp_path / "checkpoint-2" / "rng_state_1.pth").is_file()
