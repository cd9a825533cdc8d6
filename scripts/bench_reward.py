"""Reward-model training throughput: align's ranking trainer vs TRL's RewardTrainer on the same K-way data.

Workload (InstructGPT step 2): 512 groups of K = 4 ranked responses (~48 tokens each, ~60 with prompt and chat
template), GPT-2-style model 4 layers / 256 hidden / 4 heads, vocab 4096, one epoch, 8 groups per optimizer step.
(a) `RankingRewardTrainer`: one batch element per group, each response forwarded once (4 sequences per group).
(b) `trl.RewardTrainer`: each group expanded to its C(4,2) = 6 chosen/rejected pairs (12 sequences per group),
    48 pairs per step, so both take the same optimizer steps over the same comparisons.
Same init, lr, precision (fp32 by default: CPUs without avx512_bf16/AMX emulate bf16 ~15x slower; `--bf16` for
autocast on both), gradient checkpointing off and dropout off for both. Data is synthetic but learnable (reward =
occurrences of one word); held-out pair accuracy is measured the same way for both (`align.trainers.reward.score`).
Prints ONE JSON line with medians over `--repeats` runs (runs alternate a/b so machine load hits both alike).

    python scripts/bench_reward.py            # full: 512 groups, 3 repeats
    python scripts/bench_reward.py --quick    # smoke: 64 groups, 1 repeat

Goal: ranking >= 2.5x TRL's groups/s at >= TRL's pair accuracy. The dev machine is shared: absolute times are
indicative, the ratio less so.
"""

import os

# Before torch is imported: on a shared 2-core machine, spinning OpenMP threads make timings swing 3-10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(2)


def make_groups(n: int, k: int, resp_len: int, vocab_words: list[str], seed: int) -> list[dict]:
    """n groups of k responses of `resp_len` words; response quality = occurrences of "good" (distinct per group)."""
    rng = random.Random(seed)
    fillers = [w for w in vocab_words if w != "good"]
    rows = []
    for _ in range(n):
        counts = rng.sample(range(0, 13), k)
        responses = []
        for c in counts:
            words = ["good"] * c + rng.choices(fillers, k=resp_len - c)
            rng.shuffle(words)
            responses.append(" ".join(words))
        prompt = " ".join(rng.choices(fillers, k=8))
        rows.append({"prompt": prompt, "responses": responses, "ranking": sorted(range(k), key=lambda i: -counts[i])})
    return rows


def new_model(args, tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        n_positions=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2ForSequenceClassification(config)


def count_rows(model) -> list[int]:
    rows: list[int] = []

    def hook(module, a, kwargs, output):
        rows.append(kwargs["input_ids"].shape[0])

    model.register_forward_hook(hook, with_kwargs=True)
    return rows


def common_args(args, out: str) -> dict:
    return dict(
        output_dir=out,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        bf16=args.bf16,
        gradient_checkpointing=False,  # TRL's default True costs ~20-30% here; off for both
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=None,
        seed=0,
    )


def held_out_accuracy(model, tokenizer, test_rows: list[dict]) -> float:
    from align.data.rankings import ranking_to_ranks
    from align.rl.ranking import pair_accuracy
    from align.trainers.reward import score

    prompts = [r["prompt"] for r in test_rows for _ in r["responses"]]
    responses = [x for r in test_rows for x in r["responses"]]
    k = len(test_rows[0]["responses"])
    rewards = score(model, tokenizer, prompts, responses, batch_size=64).view(len(test_rows), k)
    ranks = torch.tensor([ranking_to_ranks(r["ranking"], k, where="bench") for r in test_rows])
    return pair_accuracy(rewards, ranks).item()


def run_ranking(args, tokenizer, train: list[dict], test: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback

    from align.data.rankings import tokenize_rankings
    from align.trainers.reward import RankingRewardTrainer
    from align.trainers.reward_config import RankingRewardConfig

    data = tokenize_rankings(Dataset.from_list(train), tokenizer, max_length=None, source="bench")
    model = new_model(args, tokenizer)
    rows = count_rows(model)
    with tempfile.TemporaryDirectory() as out:
        cfg = RankingRewardConfig(**common_args(args, out), per_device_train_batch_size=args.groups_per_step)
        trainer = RankingRewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the JSON line is the only output
        runtime = trainer.train().metrics["train_runtime"]
    seqs = sum(rows)
    return {
        "groups_per_s": len(train) / runtime,
        "seqs_per_group": seqs / len(train),
        "pair_accuracy": held_out_accuracy(model, tokenizer, test),
    }


def run_trl(args, tokenizer, train: list[dict], test: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    from align.data.rankings import encode_for_reward

    # Same token ids as (a): each response encoded once, then every ordered pair of the group (C(K,2) rows).
    pairs = []
    for r in train:
        ids = [encode_for_reward(tokenizer, r["prompt"], x) for x in r["responses"]]
        for win, lose in itertools.combinations(r["ranking"], 2):  # ranking is best -> worst: win beats lose
            pairs.append({"chosen_ids": ids[win], "rejected_ids": ids[lose]})
    pairs_per_group = len(pairs) // len(train)
    model = new_model(args, tokenizer)
    rows = count_rows(model)
    with tempfile.TemporaryDirectory() as out:
        cfg = RewardConfig(
            **common_args(args, out), per_device_train_batch_size=args.groups_per_step * pairs_per_group
        )
        trainer = RewardTrainer(
            model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)
        runtime = trainer.train().metrics["train_runtime"]
    return {
        "groups_per_s": len(train) / runtime,
        "seqs_per_group": sum(rows) / len(train),
        "pair_accuracy": held_out_accuracy(model, tokenizer, test),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=512)
    p.add_argument("--test-groups", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--response-tokens", type=int, default=48)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (default fp32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 groups, 32 held out, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.groups, args.test_groups, args.repeats = 64, 32, 1
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    from align.models.modeling import wordlevel_tokenizer

    words = ["good"] + [f"w{i}" for i in range(args.vocab - 8)]  # + 7 special/chat tokens
    tokenizer = wordlevel_tokenizer(words)
    assert len(tokenizer) == args.vocab, len(tokenizer)
    train = make_groups(args.groups, args.k, args.response_tokens, words, seed=1)
    test = make_groups(args.test_groups, args.k, args.response_tokens, words, seed=2)

    results: dict[str, list[dict]] = {"ranking": [], "trl": []}
    for _ in range(args.repeats):
        results["ranking"].append(run_ranking(args, tokenizer, train, test))
        results["trl"].append(run_trl(args, tokenizer, train, test))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    line = {
        "bench": "reward",
        "groups": args.groups,
        "k": args.k,
        "response_tokens": args.response_tokens,
        "model": f"gpt2 {args.layers}L/{args.hidden}H/{args.heads}h vocab {args.vocab}",
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "groups_per_step": args.groups_per_step,
        "repeats": args.repeats,
        "ranking_groups_per_s": round(med("ranking", "groups_per_s"), 2),
        "trl_groups_per_s": round(med("trl", "groups_per_s"), 2),
        "ratio": round(med("ranking", "groups_per_s") / med("trl", "groups_per_s"), 2),
        "ranking_seqs_per_group": med("ranking", "seqs_per_group"),
        "trl_seqs_per_group": med("trl", "seqs_per_group"),
        "ranking_pair_accuracy": round(med("ranking", "pair_accuracy"), 4),
        "trl_pair_accuracy": round(med("trl", "pair_accuracy"), 4),
        "all_groups_per_s": {k: [round(r["groups_per_s"], 2) for r in v] for k, v in results.items()},
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
