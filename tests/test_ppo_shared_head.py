"""`value_model_init: policy_head`: a value head on the policy's own last hidden state, so one forward and one backward
serve the policy and the value loss. On tiny llamas (LoRA and full): the forward, the gradients the loss implies, one
backbone call per micro-batch, the optimizer's groups and the critic's warm-up, exact resume, saved outputs, errors."""

import json

import pytest
import torch
from tiny_stages import tiny_policy  # tests/ is on sys.path

from align.errors import AlignError
from align.models import memory_plan as mp
from align.models.modeling import wordlevel_tokenizer
from align.rl.ppo import value_loss
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_models import VALUE_HEAD_FILE, PolicyValueHead, policy_logits, value_head_forward

torch.set_num_threads(1)
WORDS = ["good", "bad", "a", "b", "c", "d", "e", "f"]
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
PROMPTS = [{"prompt": " ".join(WORDS[i % 8] for i in range(j, j + 1 + j % 4))} for j in range(32)]


@pytest.fixture(scope="module")
def tok():
    return wordlevel_tokenizer(WORDS)


def count_good(prompts, responses):
    return torch.tensor([r.split().count("good") / 6 for r in responses])


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")  # fmt: skip


def make_args(out, **kw):
    base = dict(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
        learning_rate=1e-2, max_new_tokens=6, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=1, bf16=False, value_model_init="policy_head",
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


def make_trainer(tok, args, seed=0, peft=True, **kw):
    torch.manual_seed(seed)
    policy = tiny_policy(tok, SIZES)
    return PPOTrainer(args, policy, processing_class=tok, train_dataset=PROMPTS, reward_fn=count_good,
                      peft_config=lora() if peft else None, **kw)  # fmt: skip


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def backbone(trainer):
    base = trainer.policy.get_base_model() if trainer.is_peft else trainer.policy
    return base.model


def _randomize_lora_b(trainer):
    """Non-zero LoRA B (at init B = 0: the adapter changes nothing, and a forward that skipped it would not show)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _inputs(trainer, n=4):
    from align.rl.ppo import response_mask

    seq, prompt_mask, responses, _ = trainer.generate(trainer.train_prompts[0][:n])
    mask, _ = response_mask(responses, trainer.eos_token_ids)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return seq, attn, pos, responses, mask


def _reference_values(trainer, seq, attn, pos, T):
    """Values as TRL's AutoModelForCausalLMWithValueHead computed them: the head on `hidden_states[-1]` of a policy
    forward with output_hidden_states (a path independent of the LM-head hook the trainer uses)."""
    out = trainer.policy(input_ids=seq, attention_mask=attn, position_ids=pos, output_hidden_states=True,
                         use_cache=False)  # fmt: skip
    return trainer.value_model.score(out.hidden_states[-1][:, -T - 1 : -1]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# The forward


@pytest.mark.parametrize("peft", [True, False])
def test_one_forward_gives_the_policys_logits_and_values_of_its_last_hidden_state(tmp_path, tok, peft):
    trainer = make_trainer(tok, make_args(tmp_path), peft=peft)
    head = trainer.value_model
    assert isinstance(head, PolicyValueHead) and head.policy is trainer.policy
    assert list(head.state_dict()) == ["score.weight"] and (trainer.ref_policy is None) == peft
    if peft:
        _randomize_lora_b(trainer)  # so the values must read the hidden state after the adapter
    seq, attn, pos, responses, _ = _inputs(trainer)
    T = responses.shape[1]
    with torch.no_grad():
        logits, values = head.logits_and_values(seq, attn, pos, T)
        torch.testing.assert_close(logits, policy_logits(trainer.policy, seq, attn, pos, T))
        torch.testing.assert_close(values, _reference_values(trainer, seq, attn, pos, T))
        # values alone (a rollout whose old logprobs came from generate): the backbone, without the LM head
        torch.testing.assert_close(value_head_forward(head, seq, attn, pos, T), values)
        if peft:  # the adapter is read: the base alone gives other values
            with trainer.policy.disable_adapter():
                assert not torch.allclose(head.logits_and_values(seq, attn, pos, T)[1], values)
    assert values.shape == (4, T) and values.dtype == torch.float32


def test_head_starts_as_a_sequence_classification_head(tmp_path, tok):
    # Linear(hidden, 1) without bias, normal with std initializer_range (0.02), as transformers' score heads
    trainer = make_trainer(tok, make_args(tmp_path))
    w = trainer.value_model.score.weight
    assert w.shape == (1, SIZES["hidden_size"]) and trainer.value_model.score.bias is None
    assert 0.005 < float(w.std()) < 0.05 and w.requires_grad


@pytest.mark.parametrize("std", [0.0, 0.3])
def test_value_head_std_draws_the_fresh_head(tmp_path, tok, std):
    trainer = make_trainer(tok, make_args(tmp_path, value_head_std=std))
    w = trainer.value_model.score.weight
    if std == 0:  # zeros: every first value is 0, so the first advantages are the returns themselves
        assert torch.count_nonzero(w) == 0 and w.requires_grad
        seq, attn, pos, responses, _ = _inputs(trainer)
        with torch.no_grad():
            values = value_head_forward(trainer.value_model, seq, attn, pos, responses.shape[1])
        assert torch.count_nonzero(values) == 0
    else:  # 32 draws of N(0, 0.3): their std within [0.2, 0.4]
        assert 0.2 < float(w.std()) < 0.4


# ---------------------------------------------------------------------------------------------------------------------
# Gradients: what the loss says


class StepRecorder:
    """Wraps the optimizer's step: the gradients each step was given (after clipping), by parameter name."""

    def __init__(self, trainer):
        self.names = {id(p): n for n, p in trainer.policy.named_parameters()}
        self.names.update({id(p): f"head.{n}" for n, p in trainer.value_model.named_parameters()})
        self.steps: list[dict[str, torch.Tensor | None]] = []
        opt = trainer.optimizer
        step = opt.step

        def recording_step(*a, **k):
            self.steps.append({self.names[id(p)]: None if p.grad is None else p.grad.clone()
                               for g in opt.param_groups for p in g["params"]})  # fmt: skip
            return step(*a, **k)

        opt.step = recording_step


def _one_step_args(tmp_path, **kw):
    """One micro-batch = the whole rollout, one epoch, one optimizer step, no clipping: the step's gradients are
    those of one loss on the rollout."""
    return make_args(tmp_path, per_device_train_batch_size=8, num_mini_batches=1, num_ppo_epochs=1,
                     max_grad_norm=1e9, **kw)  # fmt: skip


def test_with_vf_coef_0_the_head_gets_no_gradient_and_the_adapter_the_policy_loss(tmp_path, tok):
    trainer = make_trainer(tok, _one_step_args(tmp_path, vf_coef=0.0))
    _randomize_lora_b(trainer)
    rec = StepRecorder(trainer)
    rollout, _, _ = trainer._rollout(1)
    trainer._train_on(rollout, 1)
    (grads,) = rec.steps
    # loss = pg + 0 * vf: the head is in the graph (its gradient is a tensor) and that tensor is 0
    assert torch.count_nonzero(grads["head.score.weight"]) == 0
    adapter = {n: g for n, g in grads.items() if "lora_" in n}
    assert adapter and all(g is not None for g in adapter.values())
    assert sum(float(g.abs().sum()) for g in adapter.values()) > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_without_a_policy_loss_the_adapter_gets_vf_coef_times_the_value_loss_gradient(tmp_path, tok, checkpointing):
    """Advantages 0: the clipped policy loss is 0 with gradient 0, so the one backward holds vf_coef * d(vf) alone.
    It is compared with d(vf) from an independent forward (TRL's output_hidden_states path), and the head's gradient
    with the hand formula: d/dw 0.5 * mean_t (w.h_t - R_t)^2 = mean_t (v_t - R_t) h_t (the clip is inactive: the
    rollout's values are the current ones)."""
    vf_coef = 0.5
    trainer = make_trainer(tok, _one_step_args(tmp_path, vf_coef=vf_coef, gradient_checkpointing=checkpointing))
    _randomize_lora_b(trainer)
    rec = StepRecorder(trainer)
    rollout, _, _ = trainer._rollout(1)
    rollout.advantages.zero_()

    # the reference, before the step changes the weights: the value loss of an independent forward over the same
    # rollout, and its gradient
    r = rollout
    T = r.responses.shape[1]
    out = trainer.policy(input_ids=r.query_responses, attention_mask=r.attention_mask, position_ids=r.position_ids,
                         output_hidden_states=True, use_cache=False)  # fmt: skip
    hidden = out.hidden_states[-1][:, -T - 1 : -1]
    values = trainer.value_model.score(hidden).squeeze(-1)
    vf, _ = value_loss(values, r.values, r.returns, r.mask, trainer.args.cliprange_value)
    (vf_coef * vf).backward()
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    expected = {rec.names[id(p)]: p.grad.clone() for p in params}
    trainer.optimizer.zero_grad(set_to_none=True)

    trainer._train_on(rollout, 1)
    (grads,) = rec.steps
    adapter = [n for n in expected if "lora_" in n]
    assert adapter and all(float(expected[n].abs().sum()) > 0 for n in adapter)
    for n in [*adapter, "head.score.weight"]:
        torch.testing.assert_close(grads[n], expected[n], msg=lambda m, n=n: f"{n}: {m}")
    # the head by hand: vf_coef * mean over the valid tokens of (v - R) * h
    m = r.mask
    err = (values - r.returns).detach()[m]  # (n,) over the valid tokens
    by_hand = vf_coef * (err.unsqueeze(-1) * hidden.detach()[m]).sum(0) / m.sum()
    torch.testing.assert_close(grads["head.score.weight"][0], by_hand)


def test_full_policy_gets_both_gradients_in_its_trunk(tmp_path, tok):
    # without LoRA the trunk is the whole policy: the value loss moves the same weights as the policy loss
    trainer = make_trainer(tok, _one_step_args(tmp_path, vf_coef=0.5), peft=False)
    rec = StepRecorder(trainer)
    rollout, _, _ = trainer._rollout(1)
    rollout.advantages.zero_()
    trainer._train_on(rollout, 1)
    (grads,) = rec.steps
    trunk = [n for n in grads if n.startswith("model.layers.0.")]
    assert trunk and all(grads[n] is not None and float(grads[n].abs().sum()) > 0 for n in trunk)
    assert float(grads["head.score.weight"].abs().sum()) > 0


# ---------------------------------------------------------------------------------------------------------------------
# One forward


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(("init", "per_micro", "per_chunk"), [("policy_head", 1, 2), ("policy_lora", 2, 3)])
def test_one_backbone_call_per_micro_batch(tmp_path, tok, init, per_micro, per_chunk):
    """Training: one backbone call per micro-batch (policy_lora: two, the policy's and the critic's). Rollout with
    old logprobs from a forward (as under bf16): logprobs + values in one call, the reference (adapters off) in a
    second, per chunk (policy_lora: three). generation_backend align samples from its own merged copy."""
    args = make_args(tmp_path, value_model_init=init, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_mini_batches=2, num_ppo_epochs=2, local_rollout_forward_batch_size=8,
                     generation_backend="align")  # fmt: skip
    trainer = make_trainer(tok, args)
    trainer._use_gen_logits = False
    calls = _count_calls(backbone(trainer))
    rollout, _, _ = trainer._rollout(1)
    assert len(calls) == per_chunk * 2  # 16 prompts in chunks of 8
    calls.clear()
    trainer._train_on(rollout, 1)
    assert len(calls) == per_micro * 2 * 2 * 2  # epochs x mini-batches x accumulation


def test_optimizer_groups_and_critic_warmup_train_the_head_alone(tmp_path, tok):
    # group 0: the policy (its adapter: the trunk's trainable part); group 1: the head. During the warm-up the
    # policy's gradients are dropped, so the trunk stays and only the head moves.
    trainer = make_trainer(tok, make_args(tmp_path, max_steps=1, critic_warmup_steps=1))
    groups = [{id(p) for p in g["params"]} for g in trainer.optimizer.param_groups]
    assert groups[1] == {id(trainer.value_model.score.weight)}
    assert groups[0] == {id(p) for p in trainer.policy.parameters() if p.requires_grad}
    policy_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    head_before = trainer.value_model.score.weight.detach().clone()
    trainer.train()
    for n, p in trainer.policy.named_parameters():
        torch.testing.assert_close(p, policy_before[n], rtol=0, atol=0, msg=n)
    assert not torch.equal(trainer.value_model.score.weight, head_before)


def test_value_learning_rate_is_the_value_groups_own(tmp_path, tok):
    # learning_rate 1e-2, value_learning_rate 0.5, constant: Adam's first steps move each head weight by about the
    # rate (m / sqrt(v) = +-1), 4 steps at most (2 epochs x 2 mini-batches); the policy is held by the warm-up
    args = make_args(tmp_path, max_steps=1, critic_warmup_steps=1, value_learning_rate=0.5,
                     lr_scheduler_type="constant")  # fmt: skip
    trainer = make_trainer(tok, args)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 0.5]
    head_before = trainer.value_model.score.weight.detach().clone()
    trainer.train()
    moved = (trainer.value_model.score.weight - head_before).abs().max().item()
    assert 0.3 < moved <= 4 * 0.5 + 1e-6
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 0.5]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and saved outputs


def test_resume_restores_the_head(tmp_path, tok):
    kw = dict(lr_scheduler_type="constant", save_steps=2, save_strategy="steps", gradient_checkpointing=True)
    full = make_trainer(tok, make_args(tmp_path / "full", max_steps=4, **kw))
    full.train()
    first = make_trainer(tok, make_args(tmp_path / "cut", max_steps=2, **kw))
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert sorted(p.name for p in (ckpt / "value_model").iterdir()) == [VALUE_HEAD_FILE]
    second = make_trainer(tok, make_args(tmp_path / "cut", max_steps=4, **kw))
    second.train(resume_from_checkpoint=True)
    assert history(second, "step") == [1, 2, 3, 4]
    torch.testing.assert_close(history(second, "ppo/score"), history(full, "ppo/score"))
    torch.testing.assert_close(history(second, "ppo/value_loss"), history(full, "ppo/value_loss"))
    torch.testing.assert_close(second.value_model.score.weight, full.value_model.score.weight)


def test_resume_refuses_a_head_of_another_layout(tmp_path, tok):
    # a policy_lora checkpoint also holds value_model/value_head.safetensors, but that head read the critic's adapter
    other = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, value_model_init="policy_lora")
    make_trainer(tok, other).train()
    trainer = make_trainer(tok, make_args(tmp_path, max_steps=2))
    with pytest.raises(AlignError, match="no value head written with value_model_init 'policy_head'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


@pytest.mark.parametrize("merge", [False, True])
def test_saved_policy_loads_in_pipeline_with_the_head_beside_it(tmp_path, tok, merge):
    from safetensors.torch import load_file
    from transformers import pipeline

    trainer = make_trainer(tok, make_args(tmp_path, max_steps=1))
    _randomize_lora_b(trainer)
    out = tmp_path / "final"
    trainer.save_model(out, merge_adapter=merge)
    assert not (out / "value_model").exists()
    head = load_file(out / VALUE_HEAD_FILE)
    torch.testing.assert_close(head["weight"], trainer.value_model.score.weight.detach())
    if merge:
        gen = pipeline("text-generation", model=str(out), device="cpu")
        assert gen("a b", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("a b")
    else:  # the adapter alone
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Memory plan and errors


def test_memory_plan_gives_the_head_no_forward_and_no_activations():
    shape = mp.ModelShape(layers=2, hidden=32, intermediate=64, heads=2, kv_heads=2, vocab=10, gated_mlp=True)
    stats = {"policy": (1000, 100, "float32", 4000, 400), "reference": (0, 0, "float32", 0, 0),
             "value": (32, 32, "float32", 128, 128)}  # fmt: skip
    kw = dict(rollout_batch=4, micro_batch=4, prompt_length=8, max_new_tokens=8, act_bytes=4, gen_logits=False,
              checkpointing=False)  # fmt: skip
    shapes = {"policy": shape, "reference": None, "value": None}
    head_lines, head_peak = mp.ppo_plan(shapes, stats, value_in_policy=True, **kw)
    lora_lines, lora_peak = mp.ppo_plan(shapes, stats, **kw)
    value = {x.role: x for x in head_lines}["value"]
    assert value.peak_bytes == 0 and "no forward of its own" in value.note
    # the backward of the critic on the policy's base holds its own activations (2 x 16 tokens): gone here
    assert lora_peak - head_peak == mp.saved_activation_bytes(shape, 4, 16, 4, False)


def test_a_value_model_given_too_is_refused(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    value = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), num_labels=1, **SIZES))
    with pytest.raises(AlignError, match="value model was given too"):
        make_trainer(tok, make_args(tmp_path), value_model=value)


def test_stage_config_takes_policy_head_with_or_without_peft(tmp_path):
    from align.config import parse_config

    base = {"model_name_or_path": "m", "reward_model_path": "r", "output_dir": str(tmp_path),
            "value_model_init": "policy_head"}  # fmt: skip
    assert parse_config("ppo", [], overrides=base).value_model_init == "policy_head"
    assert parse_config("ppo", [], overrides={**base, "use_peft": True}).use_peft
    with pytest.raises(AlignError, match="value_model_init 'policy_head' builds the value model on the policy, and "
                                         "value_model_path 'v' names one too; drop one"):  # fmt: skip
        parse_config("ppo", [], overrides={**base, "value_model_path": "v"})
