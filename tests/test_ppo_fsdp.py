"""PPO under FSDP2 on 2 CPU gloo processes: accelerate's `fully_shard` of the policy + value wrapper (decoder layers
one unit each), generation and scoring on gathered parameters, checkpoints that resume exactly, and final outputs
that load as plain models. Both layouts: a full policy with a separate value model, and LoRA on one shared base.

accelerate 1.16 turns FSDP on only for GPU-type distributed runs (`AcceleratorState`: FSDP is set inside the
MULTI_GPU/... branch); on CPU ranks an FSDP plugin silently gives DDP. The script below sets accelerate's FSDP2
state right before `prepare`: from there the sharding is accelerate's and torch's own, as on GPUs."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_prepare = Accelerator.prepare
def prepare(self, *args, **kwargs):
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True)
    return _prepare(self, *args, **kwargs)
Accelerator.prepare = prepare

from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from align.trainers.sharding import full_parameters
layout, out = {layout!r}, {out!r}
if layout == "separate":
    from test_ppo_trainer import make_trainer, make_args, history, WORDS
else:
    from test_ppo_shared_base import make_trainer, make_args, history, WORDS
from align.models.modeling import wordlevel_tokenizer
tok = wordlevel_tokenizer(WORDS)
kw = dict(lr_scheduler_type="constant", save_strategy="steps", save_steps=2, per_device_train_batch_size=4,
          max_new_tokens=8)

def weights(trainer):
    with full_parameters(trainer.model):  # gathered: every rank sees the whole model
        return {{n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}}

initial = weights(make_trainer(tok, make_args(out + "/initial", max_steps=1)))
full = make_trainer(tok, make_args(out + "/full", max_steps=4, **kw))
assert full.accelerator.num_processes == 2, full.accelerator.num_processes
units = [m for m in full.model.modules() if isinstance(m, FSDPModule)]
assert len(units) > 2, len(units)  # the root and each decoder layer of both models
assert all(isinstance(p, DTensor) for p in full.model.parameters())
full.train()
full.save_model(out + "/final")
if layout == "shared":  # LoRA merged into the base, from the gathered parameters
    full.save_model(out + "/merged", merge_adapter=True)
with full_parameters(full.model), torch.no_grad():
    logits = full.policy(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
cut = make_trainer(tok, make_args(out + "/cut", max_steps=2, **kw))
cut.train()
resumed = make_trainer(tok, make_args(out + "/cut", max_steps=4, **kw))
resumed.train(resume_from_checkpoint=True)
a, b = weights(full), weights(resumed)
rank = full.accelerator.process_index
if rank == 0:
    torch.save(a, out + "/full_weights.pt")
    torch.save(logits, out + "/logits.pt")
json.dump({{
    "units": len(units),
    "steps": history(resumed, "step"),
    "score_full": history(full, "ppo/score"),
    "score_resumed": history(resumed, "ppo/score"),
    "max_weight_diff": max(float((a[n] - b[n]).abs().max()) for n in a),
    "moved": max(float((a[n] - initial[n]).abs().max()) for n in a),
}}, open(out + f"/rank{{rank}}.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_ppo_under_fsdp2_on_two_cpu_ranks_trains_saves_and_resumes_exactly(tmp_path, layout):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    script = tmp_path / "fsdp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path),
                                                    layout=layout)))  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = subprocess.run([*launcher, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == [1, 2, 3, 4]
        # the resumed run replays the uninterrupted one: same scores (both ranks' responses), same weights
        assert r["score_resumed"] == pytest.approx(r["score_full"], abs=1e-6)
        assert r["max_weight_diff"] < 1e-6, r["max_weight_diff"]
        assert r["moved"] > 1e-4  # and training changed them: the comparison is not of two untouched models
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert (ckpt / "fsdp_trainable.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()

    # the final outputs are plain models with the trained (gathered) weights
    final = tmp_path / "final"
    trained = torch.load(tmp_path / "full_weights.pt")
    if layout == "separate":
        policy = AutoModelForCausalLM.from_pretrained(final)
        got = dict(policy.named_parameters())
        for name, w in trained.items():
            if name.startswith("policy."):
                torch.testing.assert_close(got[name.removeprefix("policy.")], w, msg=name)
    else:  # the policy's adapter only (peft's names: no adapter name), not the critic's
        from safetensors.torch import load_file

        saved = load_file(final / "adapter_model.safetensors")
        policy_lora = {n: w for n, w in trained.items() if n.startswith("policy.") and ".default." in n}
        assert saved and len(saved) == len(policy_lora)
        for name, w in policy_lora.items():
            torch.testing.assert_close(saved[name.removeprefix("policy.").replace(".default.", ".")], w, msg=name)
        policy = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # the saved policy (merged, for LoRA) computes what the trained sharded one did
    with torch.no_grad():
        got = policy(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    torch.testing.assert_close(got, torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=1e-4)
    value = AutoModelForSequenceClassification.from_pretrained(final / "value_model")
    assert value.config.num_labels == 1
