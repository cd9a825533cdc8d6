"""`align bon`: best-of-n at inference. The policy answers each held-out prompt n times, the reward model keeps its
favourite, and the gold labeler scores the kept answers against the policy's own greedy and sampled answers.

    align bon --config recipes/tiny/bon.yaml
    align bon --config recipes/tiny/bon.yaml --best_of_n 16 --output_dir runs/tiny/bon16

Nothing is trained: what best-of-n buys comes from the reward model alone, at n times the sampling. Beside the pick's
gold score the stage records that of an oracle pick (the gold-best of the n: what a perfect reward model would buy)
and of a random pick (the mean of the n: the policy sampled), so the reward model's worth is the share of the gap
between the two it closes. The pick, the scores and the sampling live in `align.evaluation.best_of_n`.

The output dir, and why. Best-of-n is a policy plus a reward model plus a rule, not new weights, and a Hugging Face
`pipeline()` loads one model. So the dir holds a copy of the policy's files (config, safetensors, tokenizer,
generation config: `pipeline("text-generation", model=DIR)` loads it, as every stage's output does, and answers as the
policy), `bon_config.json` (n, temperature, answer length and the reward model's path: with the policy, what
best-of-n inference needs), `best_of_n.jsonl` (every answer with its reward and gold score, and the picks: the
audit of the figures) and align_stage.json last, with the reward model in its lineage. A copy, not a hard link: a
rerun of the SFT stage rewrites its files in place, which would change a linked copy under the recorded figures.
While it samples, the answers go to `best_of_n.partial.jsonl` after every generate call, and a rerun resumes there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from align.config import parse_config
from align.errors import AlignError
from align.evaluation import best_of_n
from align.evaluation.compare import ParentScores, score_parent, start_stage
from align.evaluation.gold import model_fingerprint, win_rate
from align.evaluation.methods import reward_groups
from align.evaluation.score import load_scorer
from align.io import STAGE_FILE, atomic_write_json, atomic_write_text, parent_of, read_stage_info, stage_lifecycle
from align.models import modeling
from align.stages.lifecycle import finish_stage, hold_push

logger = logging.getLogger(__name__)

CONFIG_FILE = "bon_config.json"
ANSWERS_FILE = "best_of_n.jsonl"
PARTIAL_FILE = "best_of_n.partial.jsonl"
# A policy dir's files that are not the policy: its own stage marker, lock and card, Trainer's pickled arguments.
NOT_COPIED = {STAGE_FILE, "README.md", "training_args.bin"}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("bon", argv)
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Lineage and files


def labels_used(reward_model_path: str) -> tuple[dict[str, Any], float | None]:
    """The reward stage's align_stage.json and the ranked groups it was trained on (its data's `rows`; None for a
    reward model that is not an align stage). AlignError when the path is an align stage of another kind."""
    info = read_stage_info(reward_model_path) or {}
    if info and info.get("stage") != "reward":
        raise AlignError(f"reward_model_path {reward_model_path}: an align '{info.get('stage')}' stage, not a reward "
                         "model. Point it at the output of `align reward` (e.g. runs/tiny/reward).")  # fmt: skip
    groups = reward_groups(info)
    return info, None if groups is None else float(groups)


def copy_policy(cfg, policy, tokenizer, output_dir: Path) -> None:
    """The policy's files in `output_dir`: copied from a local model dir (exactly the weights that sampled), else (a
    Hub id, a .gguf file) saved as safetensors with its tokenizer."""
    source = Path(cfg.model_name_or_path)
    if not source.is_dir():
        policy.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        return
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in NOT_COPIED:
            shutil.copy2(path, output_dir / path.name)
    if cfg.tokenizer_name_or_path:
        tokenizer.save_pretrained(output_dir)


def write_answers(output_dir: Path, prompts: list[str], answers: list[list[str]], found: best_of_n.Choices) -> None:
    """One line per prompt: its answers, their rewards and gold scores, and the index of each draw's pick."""
    fields = zip(prompts, answers, found.rewards, found.gold, found.picks, strict=True)
    rows = [{"prompt": p, "answers": a, "rewards": r, "gold_scores": g, "picks": k} for p, a, r, g, k in fields]
    atomic_write_text(output_dir / ANSWERS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sampling_key(cfg, prompts: list[str], draws: int) -> dict[str, Any]:
    """What the sampled answers depend on: a checkpoint of other settings is not resumed from."""
    return {"model": model_fingerprint(cfg.model_name_or_path) or cfg.model_name_or_path, "prompts": prompts,
            "n": cfg.best_of_n * draws, "temperature": cfg.temperature, "max_new_tokens": cfg.gold_eval_max_new_tokens,
            "seed": cfg.seed, "batch_size": cfg.generation_batch_size,
            "backend": cfg.generation_backend}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def compare(found: best_of_n.Choices, parent: ParentScores) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, per-prompt fields of align_stage.json) of the picks against the parent.

    Best-of-n's answers are sampled by nature: its `gold_scores` and `gold_scores_sampled` are the same per-prompt
    scores of the picks (the mean over the draws). The twins are recorded so that the report compares them with the
    parent's greedy answers (`gold_win_rate`) and with its sampled ones (`gold_win_rate_sampled`).
    """
    picked, oracle, random = found.picked(), found.oracle(), found.random()
    metrics = {
        "parent_gold_score": parent.score,
        "gold_score": best_of_n.mean(picked),
        "gold_win_rate": win_rate(picked, parent.scores),
        "gold_score_oracle": best_of_n.mean(oracle),
        "gold_score_random": best_of_n.mean(random),
        "reward_picked": best_of_n.mean(found.picked_reward()),
        "reward_random": best_of_n.mean(found.mean_reward()),
    }
    extra: dict[str, Any] = {"parent_gold_scores": parent.scores, "gold_scores": picked}
    if parent.sampled is not None:
        metrics["parent_gold_score_sampled"] = best_of_n.mean(parent.sampled)
        metrics["gold_score_sampled"] = metrics["gold_score"]
        metrics["gold_win_rate_sampled"] = win_rate(picked, parent.sampled)
        extra.update(parent_gold_scores_sampled=parent.sampled, gold_scores_sampled=picked)
    # The share of the random-to-oracle gap the reward model's pick closes: 1 = a perfect reward model, 0 = chance.
    gap = metrics["gold_score_oracle"] - metrics["gold_score_random"]
    if gap > 0:
        metrics["oracle_gap_closed"] = (metrics["gold_score"] - metrics["gold_score_random"]) / gap
    extra.update(gold_scores_oracle=oracle, gold_scores_random=random)
    return metrics, extra


def kl_metrics(n: int, temperature: float) -> dict[str, float]:
    """`kl_bound`, log n - (n - 1) / n: the KL of the picks to the distribution the n answers were sampled from, and
    `kl_to_parent`, the same, when that distribution is the policy itself (temperature 1).

    Best-of-n has no model of the picked answers whose log-probabilities `align.evaluation.kl.sampled_kl` could read;
    its KL is bounded instead (Stiennon et al. 2020; Beirami et al. 2024). At another temperature the answers come
    from a sharpened or flattened policy, whose own KL to the parent the bound does not cover: no `kl_to_parent`.
    """
    bound = best_of_n.kl_bound(n)
    if temperature != 1.0:
        logger.warning("bon: temperature %g: the KL bound %.3f is to the policy at that temperature, not to the "
                       "policy itself; kl_to_parent is not recorded.", temperature, bound)  # fmt: skip
        return {"kl_bound": bound}
    return {"kl_bound": bound, "kl_to_parent": bound}


def samples(prompts: list[str], answers: list[list[str]], found: best_of_n.Choices, k: int = 4) -> list[dict]:
    """The first `k` prompts' first picks with their gold scores, for the card (as the other stages' `samples`)."""
    return [{"prompt": p, "response": a[picks[0]], "gold_score": g[picks[0]], "reward": r[picks[0]]}
            for p, a, picks, g, r in list(zip(prompts, answers, found.picks, found.gold, found.rewards,
                                               strict=True))[:k]]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    gold = start_stage(cfg, temperature=0.0)  # seed; a bad gold_labeler fails first; config logged
    output_dir = Path(cfg.output_dir)
    reward_info, labels = labels_used(cfg.reward_model_path)  # a wrong reward_model_path fails before sampling
    draws = max(cfg.gold_eval_samples, 1)
    start = time.perf_counter()

    # ---- The policy, and its own gold scores (the SFT stage's, reused when they were made the same way)
    device = "cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu"
    policy, tokenizer = modeling.load_model_and_tokenizer(cfg)
    policy.to(device)
    parent = score_parent(gold, policy, tokenizer, parent=cfg.model_name_or_path, reuse=True, sampled=True)

    # ---- Sample n answers per prompt and draw (resumable: best_of_n.partial.jsonl)
    output_dir.mkdir(parents=True, exist_ok=True)
    answers = best_of_n.sample_answers(policy, tokenizer, gold.prompts, n=cfg.best_of_n * draws,
                                       max_new_tokens=cfg.gold_eval_max_new_tokens, seed=cfg.seed,
                                       temperature=cfg.temperature, batch_size=cfg.generation_batch_size,
                                       backend=cfg.generation_backend, checkpoint=output_dir / PARTIAL_FILE,
                                       key=sampling_key(cfg, gold.prompts, draws))  # fmt: skip
    sample_seconds = time.perf_counter() - start
    copy_policy(cfg, policy, tokenizer, output_dir)
    del policy  # the reward model's turn

    # ---- Pick with the reward model, score with the gold labeler
    reward = load_scorer(cfg.reward_model_path, batch_size=cfg.per_device_eval_batch_size, device=device,
                         trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    found = best_of_n.choose(gold.prompts, answers, n=cfg.best_of_n, reward=reward, labeler=gold.labeler)
    metrics, extra = compare(found, parent)
    metrics.update(kl_metrics(cfg.best_of_n, cfg.temperature))  # a bound: best-of-n has no model to read a KL from
    if labels is not None:
        metrics["labels_used"] = labels
    runtime = time.perf_counter() - start
    # trains nothing: its cost is at inference, n answers per prompt (runtime: this stage's sampling and scoring)
    metrics.update(best_of_n=float(cfg.best_of_n), draws=float(draws), train_runtime=0.0, runtime=runtime,
                   sample_seconds=sample_seconds)  # fmt: skip
    logger.info("bon: best-of-%d gold %.4f (random pick %.4f, oracle %.4f; parent greedy %.4f), win-rate over the "
                "parent's greedy answers %.3f; KL bound %.3f nats.", cfg.best_of_n, metrics["gold_score"],
                metrics["gold_score_random"], metrics["gold_score_oracle"], metrics["parent_gold_score"],
                metrics["gold_win_rate"], metrics["kl_bound"])  # fmt: skip

    # ---- Save: the answers, the inference settings, then align_stage.json last
    write_answers(output_dir, gold.prompts, answers, found)
    atomic_write_json(output_dir / CONFIG_FILE, {
        "best_of_n": cfg.best_of_n, "temperature": cfg.temperature, "max_new_tokens": cfg.gold_eval_max_new_tokens,
        "reward_model_path": str(Path(cfg.reward_model_path).resolve()) if Path(cfg.reward_model_path).exists()
        else cfg.reward_model_path,
        "policy": "this dir (a copy of model_name_or_path)",
    })  # fmt: skip
    push_to_hub = hold_push(cfg)
    finish_stage(
        output_dir,
        "bon",
        cfg,
        push_to_hub,
        parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
        data={"name": cfg.dataset_name, "rows": len(gold.prompts), "answers_per_prompt": cfg.best_of_n * draws},
        metrics={k: float(v) for k, v in metrics.items()},
        reward_model={**parent_of(cfg.reward_model_path), "data": reward_info.get("data")},
        gold_labeler=gold.labeler.name,
        samples=samples(gold.prompts, answers, found),
        **extra,
    )
    (output_dir / PARTIAL_FILE).unlink(missing_ok=True)
    logger.info("bon: wrote %s", output_dir)
    return output_dir
