"""`generation_backend: align`: PPO's rollouts sampled by align's decode loop from the policy's merged copy, synced
before each rollout; a tiny llama with LoRA, 2 updates on the CPU."""

import pytest
import torch
from peft import LoraConfig
from tiny_stages import tiny_policy  # tests/ is on sys.path

import align.trainers.ppo_rollout as rollout_mod
from align.models.modeling import wordlevel_tokenizer
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig

WORDS = ["good", "bad", "a", "b", "c", "d", "e", "f"]
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
PROMPTS = [{"prompt": " ".join(WORDS[i % 8] for i in range(j, j + 1 + j % 4))} for j in range(32)]


def count_good(prompts, responses):
    return torch.tensor([r.split().count("good") / 6 for r in responses])


@pytest.mark.parametrize("bf16", [False, True])
def test_rollouts_come_from_the_synced_merged_copy(tmp_path, monkeypatch, bf16):
    tok = wordlevel_tokenizer(WORDS)
    torch.manual_seed(0)
    policy = tiny_policy(tok, SIZES)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    args = PPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_mini_batches=1,
                     num_ppo_epochs=1, learning_rate=1e-2, max_new_tokens=6, min_new_tokens=2, save_strategy="no",
                     report_to="none", use_cpu=True, disable_tqdm=True, seed=1, bf16=bf16,
                     value_model_init="policy_lora", generation_backend="align")  # fmt: skip
    trainer = PPOTrainer(args, policy, processing_class=tok, train_dataset=PROMPTS, reward_fn=count_good,
                         peft_config=lora)  # fmt: skip
    assert next(trainer.sampler.model.parameters()).dtype == (torch.bfloat16 if bf16 else torch.float32)
    calls = []
    real = rollout_mod.decode

    def counting(model, prompt_ids, **kw):
        calls.append((model, len(prompt_ids), kw["max_new_tokens"], kw["min_new_tokens"]))
        return real(model, prompt_ids, **kw)

    monkeypatch.setattr(rollout_mod, "decode", counting)
    trainer.train()
    # one decode per update over the 8 prompts, on the copy, with the rollout's settings
    assert [(m is trainer.sampler.model, n, t, mn) for m, n, t, mn in calls] == [(True, 8, 6, 2)] * 2
    # the copy holds the policy as training left it (LoRA merged); the adapter moved away from the base
    trainer.sampler.sync()
    x = torch.tensor([tok(PROMPTS[3]["prompt"])["input_ids"]])
    with torch.no_grad():
        ours, theirs = trainer.sampler.model(x).logits.float(), trainer.policy(x).logits.float()
        with trainer.policy.disable_adapter():
            base = trainer.policy(x).logits.float()
    tol = dict(rtol=0.05, atol=0.05) if bf16 else {}
    torch.testing.assert_close(ours, theirs, **tol)
    assert not torch.allclose(theirs, base, atol=1e-3)
    logged = [h for h in trainer.state.log_history if "ppo/response_length" in h]
    assert len(logged) == 2 and all(h["ppo/response_length"] >= 2 for h in logged)
    assert all(0 < h["time/sampling"] <= h["time/generation"] for h in logged)
