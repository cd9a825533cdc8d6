"""Pretraining throughput of align's real path (model builder + HF Trainer), printed as one JSON line.

Workload (issue 3): GPT-2-style model, 4 layers / 256 hidden / 4 heads, context 256, batch 8, vocab 4096, random
tokens. Reference: nanoGPT's own loop does ~4,100 tok/s on this shape in fp32 on the 2-core dev machine; goal >= 6,000.
Machines differ, so the same model also runs in a plain nanoGPT-style loop here (`plain_loop_tokens_per_second`):
`trainer_vs_plain_loop` is the share of this machine's bare speed that the Trainer path keeps.

    python scripts/bench_pretrain.py                    # bf16 autocast where the CPU has native bf16, else fp32
    python scripts/bench_pretrain.py --precision fp32   # the nanoGPT comparison

bf16 autocast pays only on CPUs with native bf16 (avx512_bf16 / AMX): on an AVX2-only CPU it is emulated and was
measured ~15x slower than fp32 (20 s vs 1.2 s per step on this shape), so `auto` picks fp32 there.
"""

import os

# Before torch is imported: on a shared 2-core machine, spinning OpenMP threads make timings swing 3-10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def one_run(args) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from align.models.modeling import new_causal_lm, wordlevel_tokenizer

    tokenizer = wordlevel_tokenizer([f"w{i}" for i in range(args.vocab - 7)])  # 7 special/chat tokens
    assert len(tokenizer) == args.vocab, len(tokenizer)
    sizes = {
        "n_embd": args.hidden,
        "n_layer": args.layers,
        "n_head": args.heads,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    model = new_causal_lm("gpt2", sizes, tokenizer, args.context)
    g = torch.Generator().manual_seed(0)
    n_rows = args.batch * (args.steps + 1)
    ids = torch.randint(0, args.vocab, (n_rows, args.context), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=3e-4,
            bf16=args.bf16,
            use_cpu=True,
            optim=args.optim,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=ds, data_collator=default_data_collator, callbacks=[StepTimer()]
        )
        trainer.train()
    steady = times[args.warmup :]
    return {"tokens_per_second": args.batch * args.context * len(steady) / sum(steady)}


def plain_loop_run(args) -> dict:
    """The same model and data in a nanoGPT-style loop (forward, backward, clip, fused AdamW step): what this machine
    does with no framework around it, so the Trainer path's overhead is measured here rather than assumed."""
    from align.models.modeling import new_causal_lm, wordlevel_tokenizer

    tokenizer = wordlevel_tokenizer([f"w{i}" for i in range(args.vocab - 7)])
    sizes = {
        "n_embd": args.hidden,
        "n_layer": args.layers,
        "n_head": args.heads,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    model = new_causal_lm("gpt2", sizes, tokenizer, args.context).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    steady = times[args.warmup :]
    return {"tokens_per_second": args.batch * args.context * len(steady) / sum(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="Untimed warm-up steps.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    args = p.parse_args()
    from align.models.modeling import cpu_has_native_bf16

    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_has_native_bf16())
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    runs, plain = [], []
    for _ in range(args.repeats):  # alternate, so machine load hits both alike
        runs.append(one_run(args)["tokens_per_second"])
        plain.append(plain_loop_run(args)["tokens_per_second"])
    print(
        json.dumps(
            {
                "bench": "pretrain",
                "tokens_per_second": round(statistics.median(runs), 1),
                "runs": [round(r, 1) for r in runs],
                "plain_loop_tokens_per_second": round(statistics.median(plain), 1),
                "trainer_vs_plain_loop": round(statistics.median(runs) / statistics.median(plain), 3),
                "goal_tokens_per_second": 6000,
                "nanogpt_fp32_reference": 4100,
                "precision": "bf16 autocast" if args.bf16 else "fp32",
                "optim": args.optim,
                "shape": {
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "heads": args.heads,
                    "context": args.context,
                    "batch": args.batch,
                    "vocab": args.vocab,
                },
                "threads": args.threads,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
