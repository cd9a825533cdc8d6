"""`align sft`: same training example from every format, response-only labels, loss falls, LoRA adapter and merge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

TINY_PRETRAIN = {
    "model_type": "llama",
    "model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "tinyworld_stories": 300,
    "max_length": 64,
    "max_steps": 4,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "report_to": "none",
    "eval_strategy": "no",
    "save_strategy": "no",
    "num_samples": 0,
}
TINY_SFT = {
    "dataset_name": "tinyworld",
    "tinyworld_demos": 96,
    "dataset_test_size": 16,
    "max_length": 64,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "report_to": "none",
    "eval_strategy": "no",
    "save_strategy": "no",
    "gold_eval_prompts": 8,
    "gold_eval_max_new_tokens": 8,
    "dataloader_num_workers": 0,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished (barely trained) tiny pretrain stage: the parent every SFT test starts from."""
    from align.config import parse_config
    from align.stages.pretrain import run

    out = tmp_path_factory.mktemp("pretrain") / "out"
    return run(parse_config("pretrain", [], overrides={**TINY_PRETRAIN, "output_dir": str(out)}))


def _sft_cfg(pretrained: Path, out: Path, **over):
    from align.config import parse_config

    return parse_config("sft", [], overrides={**TINY_SFT, "model_name_or_path": str(pretrained),
                                              "output_dir": str(out), **over})


def _trainer(pretrained: Path, tmp_path: Path, ds, **over):
    """SFTTrainer exactly as the stage builds it, on `ds` (already standardized)."""
    from trl import SFTTrainer

    from align.models.modeling import load_model_and_tokenizer

    cfg = _sft_cfg(pretrained, tmp_path / "sft", **over)
    model, tok = load_model_and_tokenizer(cfg)
    return SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok), tok


ONE_DEMO = {
    "messages": {"messages": [{"role": "user", "content": "where is tom ?"},
                              {"role": "assistant", "content": "tom is in the park ."}]},
    "prompt_completion": {"prompt": "where is tom ?", "completion": "tom is in the park ."},
    "alpaca": {"instruction": "where is tom ?", "input": "", "output": "tom is in the park ."},
    "sharegpt": {"conversations": [{"from": "human", "value": "where is tom ?"},
                                   {"from": "gpt", "value": "tom is in the park ."}]},
}


def _example(pretrained, tmp_path, fmt):
    from align.data.formats import standardize

    ds, _ = standardize(datasets.Dataset.from_list([ONE_DEMO[fmt]]), source=fmt)
    trainer, tok = _trainer(pretrained, tmp_path, ds.select_columns(["prompt", "completion"]))
    return trainer, tok, trainer.train_dataset[0]


def test_every_format_gives_the_same_training_example(pretrained, tmp_path):
    examples = {fmt: _example(pretrained, tmp_path / fmt, fmt)[2] for fmt in ONE_DEMO}
    ref = examples["messages"]
    for fmt, ex in examples.items():
        assert ex["input_ids"] == ref["input_ids"], fmt
        assert ex["labels"] == ref["labels"], fmt


def test_labels_cover_the_response_only(pretrained, tmp_path):
    trainer, tok, ex = _example(pretrained, tmp_path, "prompt_completion")
    batch = trainer.data_collator([ex])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # By hand: the chat template renders  <s> <|user|> where is tom ? <|assistant|>  | tom is in the park . </s>
    words = ["<s>", "<|user|>", "where", "is", "tom", "?", "<|assistant|>", "tom", "is", "in", "the", "park", ".",
             "</s>"]
    assert tok.convert_ids_to_tokens(ids) == words
    prompt_len = words.index("<|assistant|>") + 1
    assert labels[:prompt_len] == [-100] * prompt_len  # prompt tokens are ignored by the loss
    assert labels[prompt_len:] == ids[prompt_len:]  # the response and its EOS are learned


def test_full_sequence_loss_switch(pretrained, tmp_path):
    from align.data.formats import standardize

    ds, _ = standardize(datasets.Dataset.from_list([ONE_DEMO["prompt_completion"]]), source="d")
    trainer, _ = _trainer(pretrained, tmp_path, ds.select_columns(["prompt", "completion"]),
                          completion_only_loss=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["labels"][0].tolist() == batch["input_ids"][0].tolist()


def test_sft_stage_lowers_loss_and_records_gold_scores(pretrained, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from align.stages.sft import run

    out = run(_sft_cfg(pretrained, tmp_path / "sft", max_steps=12, eval_strategy="steps", eval_steps=12))
    info = json.loads((out / "align_stage.json").read_text())
    assert info["stage"] == "sft" and info["parent"] == {"stage": "pretrain", "path": str(pretrained.resolve())}
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    m = info["metrics"]
    assert 0.0 <= m["gold_score"] <= 1.0 and 0.0 <= m["parent_gold_score"] <= 1.0 and "eval_loss" in m
    assert len(info["gold_scores"]) == len(info["parent_gold_scores"]) == 8
    # and sampled: 4 answers per prompt at temperature 1, each prompt scored by their mean (PPO's baseline)
    assert len(info["gold_scores_sampled"]) == 8
    assert m["gold_score_sampled"] == pytest.approx(sum(info["gold_scores_sampled"]) / 8)
    assert not (out / "training_args.bin").exists()
    # Loads in a pipeline, and chats with the saved chat template.
    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "where is tom ?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.rstrip().endswith("<|assistant|>")
    gen = pipeline("text-generation", model=str(out))
    reply = gen([{"role": "user", "content": "where is tom ?"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def test_lora_adapter_reloads_and_merged_equals_adapter(pretrained, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.stages.sft import run

    lora = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"],
            "learning_rate": 5e-2, "max_steps": 4, "gold_eval_prompts": 0}
    out = run(_sft_cfg(pretrained, tmp_path / "sft", merge_adapter=True, **lora))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    adapted = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    ids = tok("tom sees a red ball .", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)  # the adapter learned something
    gen = adapted.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3 or tok.eos_token_id in gen[0].tolist()


def _align(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, env=env)


def test_alpaca_jsonl_with_lora_from_the_cli(pretrained, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    names = ["tom", "amy"] * 20
    rows = [{"instruction": f"where is {n} ?", "input": "", "output": f"{n} is in the park ."} for n in names]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_SFT, "dataset_name": str(data), "model_name_or_path": str(pretrained),
                                      "output_dir": str(tmp_path / "out"), "max_steps": 3, "use_peft": True,
                                      "lora_target_modules": ["q_proj", "v_proj"], "dataset_test_size": 0}))
    result = _align("sft", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "out" / "align_stage.json").read_text())
    assert info["data"]["name"] == str(data) and info["peft"] == {"adapter": True, "merged": False}
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_empty_assistant_turn_is_one_line_naming_file_and_row(pretrained, tmp_path):
    data = tmp_path / "demos.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    data.write_text("\n".join(json.dumps(r) for r in [good, good, bad]) + "\n")
    result = _align("sft", "--model_name_or_path", str(pretrained), "--dataset_name", str(data),
                    "--output_dir", str(tmp_path / "out"), "--dataset_test_size", "0")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "demos.jsonl:3" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "align_stage.json").exists()


def test_qlora_on_cpu_is_a_clear_error(pretrained, tmp_path):
    result = _align("sft", "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "out"),
                    "--use_peft", "--load_in_4bit")
    assert result.returncode == 2
    assert "CUDA GPU" in result.stderr.strip().splitlines()[-1]
