"""`value_model_init: policy_lora`: one frozen base for policy (its LoRA adapter), reference (adapters off) and value
model (a second LoRA adapter + a head), on tiny llamas: training, gradients kept apart (with and without gradient
checkpointing), exact resume, saved outputs, and what the layout holds compared with a separate value model."""

import copy
import json

import pytest
import torch
from tiny_stages import tiny_policy  # tests/ is on sys.path
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align.errors import AlignError
from align.models.modeling import wordlevel_tokenizer
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_models import CRITIC_ADAPTER, SharedBaseCritic, value_head_forward

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
        disable_tqdm=True, seed=1, bf16=False, value_model_init="policy_lora",
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


def make_trainer(tok, args, seed=0, **kw):
    torch.manual_seed(seed)
    policy = tiny_policy(tok, SIZES)
    kw.setdefault("peft_config", lora())
    return PPOTrainer(args, policy, processing_class=tok, train_dataset=PROMPTS, reward_fn=count_good, **kw)


def split_params(trainer):
    """(policy adapter, critic adapter, head, frozen base) parameters by name, as detached copies."""
    critic = {id(p) for p in trainer.value_model.adapter_parameters()}
    out = {"policy": {}, "critic": {}, "head": {}, "base": {}}
    for name, p in trainer.policy.named_parameters():
        kind = "critic" if id(p) in critic else "policy" if p.requires_grad else "base"
        out[kind][name] = p.detach().clone()
    out["head"] = {n: p.detach().clone() for n, p in trainer.value_model.named_parameters()}
    return out


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ---------------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_base_trains_both_adapters_and_the_head_only(tmp_path, tok, checkpointing):
    trainer = make_trainer(tok, make_args(tmp_path, gradient_checkpointing=checkpointing))
    assert isinstance(trainer.value_model, SharedBaseCritic) and trainer.ref_policy is None
    assert set(trainer.policy.peft_config) == {"default", CRITIC_ADAPTER}
    assert trainer.policy.active_adapter == "default"
    before = split_params(trainer)
    assert before["policy"] and before["critic"] and len(before["policy"]) == len(before["critic"])
    # the optimizer steps exactly the two adapters and the head, the policy's in group 0, the critic's in group 1
    groups = [{id(p) for p in g["params"]} for g in trainer.optimizer.param_groups]
    critic_ids = {id(p) for p in trainer.value_model.adapter_parameters()} | {
        id(p) for p in trainer.value_model.parameters()
    }
    assert groups[1] == critic_ids and not groups[0] & critic_ids
    assert len(groups[0]) == len(before["policy"])
    trainer.train()
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/kl"):
        assert all(torch.isfinite(torch.tensor(history(trainer, key)))), key
    assert history(trainer, "ppo/kl")[0] == pytest.approx(0.0, abs=1e-5)  # B = 0: policy == reference at first
    after = split_params(trainer)
    for kind in ("policy", "critic", "head"):
        assert any(not torch.equal(after[kind][n], p) for n, p in before[kind].items()), kind
    for n, p in before["base"].items():
        torch.testing.assert_close(after["base"][n], p, rtol=0, atol=0, msg=n)
    # two adapters that learned different things: the policy's and the critic's weights at the same places differ
    pairs = [(p, after["critic"][n.replace(".default.", f".{CRITIC_ADAPTER}.")]) for n, p in after["policy"].items()]
    assert len(pairs) == len(after["critic"])
    assert all(not torch.allclose(a, b) for a, b in pairs)


def _inputs(trainer):
    ids, _ = trainer.train_prompts
    seq, prompt_mask, responses, _ = trainer.generate(ids[:4])
    from align.rl.ppo import response_mask

    mask, _ = response_mask(responses, trainer.eos_token_ids)
    attn = torch.cat([prompt_mask, torch.ones_like(mask, dtype=torch.long)], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return seq, attn, pos, responses.shape[1]


def _randomize_lora_b(trainer):
    """Non-zero B in both adapters (at init B = 0: either adapter computes the base), so a wrong adapter shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _grads(trainer, inputs, which):
    """Gradients of one loss through the policy+value module: 'policy' (logits only), 'value' (values only)."""
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    logits, values, _ = trainer.model(*inputs)
    loss = {"policy": logits.float().pow(2).mean(), "value": values.pow(2).mean(),
            "both": logits.float().pow(2).mean() + values.pow(2).mean()}[which]  # fmt: skip
    loss.backward()
    named = dict(trainer.policy.named_parameters())
    named.update({f"head.{n}": p for n, p in trainer.value_model.named_parameters()})
    return {n: p.grad.clone() for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_policy_and_value_gradients_stay_apart(tmp_path, tok, checkpointing):
    trainer = make_trainer(tok, make_args(tmp_path, gradient_checkpointing=checkpointing))
    _randomize_lora_b(trainer)
    inputs = _inputs(trainer)
    critic = {n for n, p in trainer.policy.named_parameters()
              if id(p) in {id(q) for q in trainer.value_model.adapter_parameters()}}  # fmt: skip
    policy_grads = _grads(trainer, inputs, "policy")
    assert policy_grads and not set(policy_grads) & critic and not any(n.startswith("head.") for n in policy_grads)
    value_grads = _grads(trainer, inputs, "value")
    assert "head.score.weight" in value_grads
    assert value_grads and set(value_grads) - {"head.score.weight"} <= critic
    # checkpointed or not, the same gradients: each block is recomputed under the adapter its forward used
    both = _grads(trainer, inputs, "both")
    trainer.policy.gradient_checkpointing_disable()
    plain = _grads(trainer, inputs, "both")
    assert set(both) == set(plain)
    for n in plain:
        torch.testing.assert_close(both[n], plain[n], msg=n)


def test_checkpointing_without_the_adapter_context_would_mix_adapters(tmp_path, tok):
    """Why `checkpoint_context` exists: plain non-reentrant checkpointing recomputes the policy's blocks in backward
    with the critic's adapter (the one active last), and the policy's gradients come out wrong."""
    trainer = make_trainer(tok, make_args(tmp_path))
    _randomize_lora_b(trainer)
    inputs = _inputs(trainer)
    plain = _grads(trainer, inputs, "both")
    trainer.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mixed = _grads(trainer, inputs, "both")
    assert max(float((mixed[n] - plain[n]).abs().max()) for n in plain) > 1e-3


def test_value_forward_reads_the_critic_adapter(tmp_path, tok):
    trainer = make_trainer(tok, make_args(tmp_path))
    _randomize_lora_b(trainer)
    seq, attn, pos, T = _inputs(trainer)
    critic = trainer.value_model
    with torch.no_grad():
        values = value_head_forward(critic, seq, attn, pos, T)
        base = trainer.policy.get_base_model().model
        with trainer.policy.disable_adapter():  # the base alone under the same head: other values
            plain = critic.score(base(input_ids=seq, attention_mask=attn, position_ids=pos).last_hidden_state)
    assert values.shape == (4, T)
    assert not torch.allclose(values, plain[:, -T - 1 : -1, 0])
    assert all(m._active_adapter == ["default"] for m in critic._layers)  # the policy's adapter is active again


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and saved outputs


def test_resume_restores_both_adapters_and_the_head(tmp_path, tok):
    kw = dict(lr_scheduler_type="constant", save_steps=2, save_strategy="steps", gradient_checkpointing=True)
    full = make_trainer(tok, make_args(tmp_path / "full", max_steps=4, **kw))
    full.train()
    first = make_trainer(tok, make_args(tmp_path / "cut", max_steps=2, **kw))
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / CRITIC_ADAPTER).exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["target_modules"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"):
        assert (ckpt / "value_model" / name).is_file(), name
    second = make_trainer(tok, make_args(tmp_path / "cut", max_steps=4, **kw))
    second.train(resume_from_checkpoint=True)
    assert history(second, "step") == [1, 2, 3, 4]
    torch.testing.assert_close(history(second, "ppo/score"), history(full, "ppo/score"))
    a, b = split_params(full), split_params(second)
    for kind in ("policy", "critic", "head"):
        for n in a[kind]:
            torch.testing.assert_close(a[kind][n], b[kind][n], msg=n)


def test_resume_refuses_a_checkpoint_of_the_other_layout(tmp_path, tok):
    separate = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, value_model_init="policy")
    make_trainer(tok, separate).train()
    trainer = make_trainer(tok, make_args(tmp_path, max_steps=2))
    with pytest.raises(AlignError, match="not written with value_model_init 'policy_lora'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


@pytest.mark.parametrize("merge", [False, True])
def test_saved_policy_and_value_model_are_plain_models(tmp_path, tok, merge):
    from transformers import pipeline

    trainer = make_trainer(tok, make_args(tmp_path, max_steps=1))
    _randomize_lora_b(trainer)
    out = tmp_path / "final"
    trainer.save_model(out, merge_adapter=merge)
    if merge:
        model = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in n for n, _ in model.named_parameters())
        gen = pipeline("text-generation", model=str(out), device="cpu")
        assert gen("a b", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("a b")
    else:  # the policy's adapter alone, as without the shared base
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 4 and not (out / CRITIC_ADAPTER).exists()
    # value_model/: a plain sequence-classification model that computes the critic's values
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1 and not any("lora" in n for n, _ in value.named_parameters())
    seq, attn, pos, T = _inputs(trainer)
    with torch.no_grad():
        torch.testing.assert_close(value_head_forward(value, seq, attn, pos, T),
                                   value_head_forward(trainer.value_model, seq, attn, pos, T))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# What the layout holds (a structural stand-in for peak memory: no timing, no allocator)


def held(trainer):
    """(parameter tensors, elements, trainable elements, optimizer state elements) the policy+value module holds."""
    params = list(trainer.model.parameters())
    state = sum(t.numel() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return len(params), sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), state


def test_shared_base_holds_one_backbone_where_a_separate_value_model_holds_two(tmp_path, tok):
    shared = make_trainer(tok, make_args(tmp_path / "s", max_steps=1))
    separate = make_trainer(tok, make_args(tmp_path / "p", max_steps=1, value_model_init="policy"))
    shared.train()
    separate.train()
    base = shared.policy.get_base_model()
    lora_params = sum(p.numel() for p in shared.value_model.adapter_parameters())  # = the policy adapter's
    # the backbone's own weights: its parameters less the two adapters the shared one carries
    backbone = sum(p.numel() for p in getattr(base, base.base_model_prefix).parameters()) - 2 * lora_params
    n_s, total_s, train_s, opt_s = held(shared)
    n_p, total_p, train_p, opt_p = held(separate)
    hidden = SIZES["hidden_size"]
    # separate: + a whole backbone copy (all trainable) + head; shared: + the critic adapter + head
    assert total_p - total_s == backbone - lora_params
    assert train_s == 2 * lora_params + hidden and train_p == lora_params + backbone + hidden
    # AdamW keeps exp_avg and exp_avg_sq per trainable element (+ a step scalar per tensor)
    n_train_s = sum(p.requires_grad for p in shared.model.parameters())
    n_train_p = sum(p.requires_grad for p in separate.model.parameters())
    assert opt_s == 2 * train_s + n_train_s and opt_p == 2 * train_p + n_train_p
    assert n_s < n_p


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_shared_base_needs_a_lora_policy_and_no_value_model(tmp_path, tok):
    with pytest.raises(AlignError, match="the policy is not LoRA. Set use_peft: true"):
        make_trainer(tok, make_args(tmp_path), peft_config=None)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    value = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), num_labels=1, **SIZES))
    with pytest.raises(AlignError, match="value model was given too"):
        make_trainer(tok, make_args(tmp_path), value_model=value)
    # a config-only conflict: the config refuses it, before any model is built
    with pytest.raises(ValueError, match="Drop use_reentrant"):
        make_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_stage_config_rejects_policy_lora_without_peft(tmp_path):
    from align.config import parse_config

    base = {"model_name_or_path": "m", "reward_model_path": "r", "output_dir": str(tmp_path),
            "value_model_init": "policy_lora"}  # fmt: skip
    with pytest.raises(AlignError, match="set use_peft: true"):
        parse_config("ppo", [], overrides=base)
    with pytest.raises(AlignError, match="value_model_path 'v' names one too"):
        parse_config("ppo", [], overrides={**base, "use_peft": True, "value_model_path": "v"})
    cfg = parse_config("ppo", [], overrides={**base, "use_peft": True})
    assert cfg.value_model_init == "policy_lora"


def test_a_copy_of_the_critic_is_never_made(tmp_path, tok):
    # the critic keeps the policy outside its submodules: its state dict is the head, and deep copies of the
    # policy+value module would duplicate the base only through the policy itself
    trainer = make_trainer(tok, make_args(tmp_path))
    assert list(trainer.value_model.state_dict()) == ["score.weight"]
    assert trainer.value_model.policy is trainer.policy
    assert copy.copy(trainer.value_model).policy is trainer.policy
