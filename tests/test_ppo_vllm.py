"""`generation_backend: vllm` on the CPU, with a fake vLLM: TRL's VLLMGeneration (engine setup, weight push, sampling
parameters) runs unchanged over a stand-in `vllm.LLM` whose model is a tiny llama of the policy's shape with its own
random weights, so it samples like the policy only through the weights pushed to it before each rollout."""

import importlib
import os
from types import SimpleNamespace

import pytest
import torch
from tiny_stages import tiny_policy  # tests/ is on sys.path

from align.errors import AlignError
from align.models.modeling import wordlevel_tokenizer
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_models import plain_model_state

WORDS = ["good", "bad", "a", "b", "c", "d", "e", "f"]
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV_AT_IMPORT = {k: os.environ.get(k) for k in DIST_ENV}
PROMPTS = [{"prompt": " ".join(WORDS[i % 8] for i in range(j, j + 1 + j % 4))} for j in range(32)]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """vLLM's `LLM` as TRL's colocated VLLMGeneration uses it: `generate`, `reset_prefix_cache`, and the driver
    worker's `model.load_weights` for the weight push."""

    make_net = None  # set by the test: builds the engine's own model

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs
        self.net = FakeLLM.make_net()
        self.pushes: list[list[str]] = []  # the parameter names of each push
        self.current: list[str] = []
        self.calls: list[tuple[int, FakeSamplingParams]] = []
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

    def load_weights(self, weights):
        state = self.net.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)
            self.current.append(name)

    def reset_prefix_cache(self):  # TRL calls it once, at the end of each push
        self.pushes.append(self.current)
        self.current = []

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.calls.append((len(prompts), sampling_params))
        sp, out = sampling_params, []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            seq = self.net.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    temperature=sp.temperature, max_new_tokens=sp.max_tokens,
                                    min_new_tokens=sp.min_tokens, eos_token_id=sp.stop_token_ids,
                                    pad_token_id=0)  # fmt: skip
            completion = seq[0, ids.shape[1] :].tolist()
            for i, t in enumerate(completion):  # vLLM stops at the stop token, and returns it
                if t in sp.stop_token_ids:
                    completion = completion[: i + 1]
                    break
            out.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                       outputs=[SimpleNamespace(token_ids=completion, logprobs=None)]))  # fmt: skip
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    vg = importlib.import_module("trl.generation.vllm_generation")
    monkeypatch.setattr(importlib.import_module("trl.import_utils"), "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vg, "SamplingParams", FakeSamplingParams, raising=False)
    monkeypatch.setattr("align.trainers.ppo_vllm._cuda", lambda: True)
    # TRL's engine setup sets these in os.environ; the setenv registers each for removal at teardown (a delenv of an
    # absent key registers nothing), so later tests' subprocesses do not see a process group to join
    for key in DIST_ENV:
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return FakeLLM


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, num_mini_batches=1, num_ppo_epochs=1,
                learning_rate=1e-2, max_new_tokens=6, min_new_tokens=2, save_strategy="no", report_to="none",
                use_cpu=True, disable_tqdm=True, seed=1, bf16=False, value_model_init="policy_lora",
                generation_backend="vllm")  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)


def count_good(prompts, responses):
    return torch.tensor([r.split().count("good") / 6 for r in responses])


def test_rollouts_come_from_the_engine_with_the_policys_merged_weights(tmp_path, fake_vllm):
    from peft import LoraConfig

    tok = wordlevel_tokenizer(WORDS)
    torch.manual_seed(0)
    policy = tiny_policy(tok, SIZES)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    fake_vllm.make_net = lambda: (torch.manual_seed(123), tiny_policy(tok, SIZES))[1]  # other weights than the policy
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = PPOTrainer(args(tmp_path), policy, processing_class=tok, train_dataset=PROMPTS, reward_fn=count_good,
                         peft_config=lora)  # fmt: skip
    engine = trainer.vllm.llm
    assert engine.kwargs["gpu_memory_utilization"] == 0.3 and engine.kwargs["distributed_executor_backend"]
    trainer.train()

    # one generate call per update, all 8 prompts, with the rollout's sampling settings
    assert [n for n, _ in engine.calls] == [8, 8]
    sp = engine.calls[0][1]
    assert (sp.max_tokens, sp.min_tokens, sp.temperature, sp.n) == (6, 2, trainer.args.temperature, 1)
    assert sp.stop_token_ids == [tok.eos_token_id] and sp.logprobs is None
    # the weights were pushed before each rollout: the backbone and head under plain names, no adapter tensors
    pushes = engine.pushes
    assert len(pushes) == 2
    assert "model.embed_tokens.weight" in pushes[0] and not any("lora" in n for n in pushes[0])
    # after one more push the engine holds exactly the policy with its adapter merged
    trainer.vllm.sync_weights()
    merged = plain_model_state(trainer.policy, trainer.policy.active_adapter)
    got = engine.net.state_dict()
    for name in got:
        torch.testing.assert_close(got[name], merged[name], msg=name)
    assert any(not torch.equal(merged[n], base_before[n]) for n in merged if n in base_before)  # the LoRA moved it
    # the frozen base itself is back (merge, push, unmerge), up to float rounding
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in trainer.policy.named_parameters() if "lora_" not in n}  # fmt: skip
    for name, before in base_before.items():
        torch.testing.assert_close(base[name], before, atol=1e-6, rtol=0, msg=name)
    # the responses are the engine's: at least min_new_tokens each, at most max_new_tokens
    lengths = [h["ppo/response_length"] for h in trainer.state.log_history if "ppo/response_length" in h]
    assert lengths and all(2 <= x <= 6 for x in lengths)


def test_vllm_missing_or_no_gpu_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    import_utils = importlib.import_module("trl.import_utils")
    tok = wordlevel_tokenizer(WORDS)
    policy = tiny_policy(tok, SIZES)
    monkeypatch.setattr(import_utils, "is_vllm_available", lambda *a, **k: False)
    with pytest.raises(AlignError, match=r"needs vLLM .* pip install 'vllm>=0.22,<=0.31'.*generation_backend: "):
        PPOTrainer(args(tmp_path, value_model_init="policy"), policy, processing_class=tok, train_dataset=PROMPTS,
                   reward_fn=count_good)  # fmt: skip
    monkeypatch.setattr(import_utils, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr("align.trainers.ppo_vllm._cuda", lambda: False)
    with pytest.raises(AlignError, match="runs on CUDA GPUs only; set generation_backend: transformers"):
        PPOTrainer(args(tmp_path, value_model_init="policy"), policy, processing_class=tok, train_dataset=PROMPTS,
                   reward_fn=count_good)  # fmt: skip


def test_the_engine_leaves_no_distributed_environment_behind():
    # runs after the engine test: TRL's RANK / WORLD_SIZE / MASTER_PORT would make later subprocesses join a group
    assert {k: os.environ.get(k) for k in DIST_ENV} == ENV_AT_IMPORT


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="generation_backend .sglang. is unknown; use one of transformers, align, "):
        args("/tmp/x", generation_backend="sglang")
