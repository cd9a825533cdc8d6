"""Reward model from K-way rankings (InstructGPT step 2) on transformers' Trainer: collator, `RankingRewardTrainer`,
and scoring. The rows, their tokenization and the reward model's text format are in `align.data.rankings`.

TRL's RewardTrainer knows only chosen/rejected pairs: a group of K ranked responses expanded to its C(K, 2) pairs
runs every response through the model K - 1 times (K = 4: 12 forward sequences instead of 4). Here each batch element
is a whole group, every response is scored once, and the loss is taken over all of the group's pairs
(`align.rl.ranking`). Ouyang et al. 2022, Sec. 3.5: https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from peft import get_peft_model
from transformers import EvalPrediction, Trainer

from align.data.padding import pad_right
from align.data.rankings import encode_for_reward, tokenize_rankings
from align.errors import AlignError
from align.models import memory_plan as mp
from align.models.modeling import is_encoder
from align.rl.ranking import (
    has_pairs,
    kendall_tau,
    pair_accuracy,
    pairwise_center_penalty,
    plackett_luce_loss,
    ranking_loss,
    top1_accuracy,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class RankingCollator:
    """Groups of K_g tokenized responses -> one batch that scores every present response exactly once.

    Returns
        `input_ids`, `attention_mask`: `(N, T)`, right-padded, N = sum of the groups' K_g. Absent responses (groups
            with fewer than K_max) get no row at all, so no forward pass is spent on padding; their place is known
            from `ranks`: row n is the n-th entry with rank >= 0 of `ranks` in row-major order (see `scatter_rewards`).
        `ranks`: `(G, K_max)` long, -1 where a group has no response.
        `margin`: `(G,)` float, when the features carry one.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        k_max = max(len(f["ranks"]) for f in features)
        ranks = torch.full((len(features), k_max), -1, dtype=torch.long)
        seqs: list[Sequence[int]] = []
        for g, f in enumerate(features):
            if len(f["input_ids"]) != len(f["ranks"]):
                raise ValueError(f"group {g}: {len(f['input_ids'])} responses but {len(f['ranks'])} ranks")
            ranks[g, : len(f["ranks"])] = torch.as_tensor(f["ranks"], dtype=torch.long)
            seqs.extend(f["input_ids"])
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id, self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "ranks": ranks}
        with_margin = ["margin" in f and f["margin"] is not None for f in features]
        if any(with_margin):
            if not all(with_margin):
                raise ValueError("some groups of the batch have a margin and some do not")
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float)
        return batch


def scatter_rewards(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Place the `(N,)` scores of the present responses into a `(G, K)` grid, nan where `ranks` < 0."""
    present = ranks >= 0
    if scores.numel() != int(present.sum()):
        raise ValueError(f"{scores.numel()} scores for {int(present.sum())} present responses")
    grid = torch.full(ranks.shape, float("nan"), dtype=scores.dtype, device=scores.device)
    return grid.masked_scatter(present, scores)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


def compute_ranking_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`pair_accuracy`, `top1_accuracy`, `kendall_tau` from predictions `(G, K)` rewards and label_ids `(G, K)` ranks.

    Trainer prefixes them: `eval_pair_accuracy`, ... Padding is any negative rank (-1 from the collator, -100 from
    Trainer's cross-batch padding).
    """
    rewards = torch.as_tensor(eval_pred.predictions).float()
    ranks = torch.as_tensor(eval_pred.label_ids).long()
    return {
        "pair_accuracy": pair_accuracy(rewards, ranks).item(),
        "top1_accuracy": top1_accuracy(rewards, ranks).item(),
        "kendall_tau": kendall_tau(rewards, ranks).item(),
    }


def _with_adapter(model, peft_config, args):
    """`model` wrapped by peft for `peft_config` (as TRL's RewardTrainer): LoRA adapters + a trainable score head."""
    if is_peft_model(model):
        raise AlignError(
            "RankingRewardTrainer: got a PeftModel and a peft_config. Merge the model's adapter first "
            "(merge_and_unload()), or pass no peft_config to train the adapter it has."
        )
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    if task_type != "SEQ_CLS":
        raise AlignError(
            f"RankingRewardTrainer: peft_config.task_type is {task_type!r}; a reward model needs 'SEQ_CLS', so that "
            "peft trains and saves the new score head with the adapter (LoraConfig(task_type='SEQ_CLS', ...))."
        )
    if getattr(args, "gradient_checkpointing", False):
        # The frozen embeddings' outputs need grads for checkpointed blocks to backpropagate into the adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def plan_memory(model, args, train_dataset) -> tuple[list, int]:
    """Log the reward model's memory plan for its largest micro-batch (`per_device_train_batch_size` groups of the
    most responses, all padded to the longest) and, on CUDA, refuse when it does not fit (models/memory_plan.py)."""
    length = getattr(args, "length_column_name", None) or "length"
    k_max = max(len(r) for r in train_dataset["ranks"])
    seq_len = max(train_dataset[length])
    sequences = args.per_device_train_batch_size * k_max
    half = bool(args.bf16 or args.fp16) or next(model.parameters()).element_size() == 2
    checkpointing = bool(getattr(args, "gradient_checkpointing", False))
    lines, peak = mp.reward_plan(mp.model_shape(model), mp.param_stats(model.parameters()), sequences=sequences,
                                 seq_len=seq_len, act_bytes=2 if half else 4, checkpointing=checkpointing)  # fmt: skip
    if args.process_index == 0:
        mp.log_plan("reward", lines, peak, f"micro-batch of {sequences} sequences ({args.per_device_train_batch_size} "
                    f"groups x {k_max}) of up to {seq_len} tokens")  # fmt: skip
    fixes = ["lower per_device_train_batch_size (raising gradient_accumulation_steps) or max_length"]
    if not any("lora_" in n for n, _ in model.named_parameters()):
        fixes.append("train LoRA (use_peft: true)")
    if not half:
        fixes.append("set bf16: true")
    if not checkpointing:
        fixes.append("set gradient_checkpointing: true")
    resident = mp.resident_bytes(model.parameters(), args.device)
    mp.check_fits("reward", peak, args.device, resident, "To fit: " + "; or ".join(fixes) + ".")
    return lines, peak


class RankingRewardTrainer(Trainer):
    """`transformers.Trainer` for a reward model (sequence classification, num_labels=1) on K-way rankings.

    One batch element = one ranked group; `compute_loss` runs the model once on all present responses of the batch,
    reshapes the scores to `(G, K)` and applies `args.ranking_loss` (+ `center_rewards_coefficient` as in TRL).
    Datasets may be raw rankings/pairs (tokenized here with `tokenize_rankings`) or already tokenized.

    `peft_config` (a `peft.LoraConfig` with task_type SEQ_CLS, as TRL's RewardTrainer takes it) trains LoRA adapters
    and the score head instead of every weight.

    Gradient accumulation is exact: the loss is the sum of per-group losses divided by the number of groups in the
    whole accumulated batch (`num_items_in_batch`, counted by `_get_num_items_in_batch`), so micro-batches of unequal
    size weigh each group the same as one large batch would.
    """

    # compute_loss divides by the accumulated batch's group count itself: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
    ):
        if processing_class is None:
            raise ValueError("RankingRewardTrainer needs processing_class (the reward model's tokenizer)")
        if getattr(model.config, "num_labels", None) != 1:
            raise AlignError(
                f"{type(model).__name__}: num_labels={model.config.num_labels}; a reward model outputs one score. "
                "Load it with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)."
            )
        if processing_class.pad_token is None:
            # As TRL: a sequence-classification model finds the last real token by its pad id, so one must exist.
            processing_class.pad_token = processing_class.eos_token
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        # An encoder reads (prompt, response) as the tokenizer's pair (`encode_for_reward`); decided from its config
        self.pair_encoding = is_encoder(model.config, processing_class)
        if peft_config is not None:
            model = _with_adapter(model, peft_config, args)
        if getattr(args, "disable_dropout", True):
            # Dropout makes the K scores of a group noisy relative to each other (TRL disables it for reward models).
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

        with args.main_process_first(desc="tokenizing rankings"):
            pair = self.pair_encoding
            train_dataset = self._prepare(train_dataset, processing_class, args, "train", pair)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare(v, processing_class, args, k, pair) for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare(eval_dataset, processing_class, args, "eval", pair)
        if train_dataset is not None:
            self.memory_plan = plan_memory(model, args, train_dataset)
        if data_collator is None:
            pad_multiple = getattr(args, "pad_to_multiple_of", None)
            data_collator = RankingCollator(processing_class.pad_token_id, pad_multiple)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or compute_ranking_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # `ranks` plays the role of labels: evaluation collects them next to the predicted rewards.
        self.label_names = ["ranks"]
        self.can_return_loss = True
        self._train_logs: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, model=None):
        """Trainer's optimizer; with `score_learning_rate`, the score head's parameters move to groups of their own
        at that rate (each keeps its weight decay; the scheduler scales every group's rate alike)."""
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "score_learning_rate", None)
        if lr is None or any(group.get("score_head") for group in optimizer.param_groups):
            return optimizer
        head = {id(p) for n, p in (model or self.model).named_parameters() if "score" in n.split(".")}
        moved = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in head]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine, "lr": lr,
                              "score_head": True})  # fmt: skip
        if not moved:
            raise AlignError("score_learning_rate: the model has no trainable `score` head; unset it.")
        for group in moved:
            optimizer.add_param_group(group)
        return optimizer

    @staticmethod
    def _prepare(ds, tokenizer, args, name: str, pair: bool | None = None):
        if ds is None:
            return None
        if "input_ids" not in ds.column_names:  # raw rankings or pairs; tokenized data is used as is
            ds = tokenize_rankings(
                ds,
                tokenizer,
                getattr(args, "max_length", None),
                source=name,
                num_proc=getattr(args, "dataset_num_proc", None),
                pair=pair,
            )
        length = getattr(args, "length_column_name", None) or "length"
        if length not in ds.column_names:
            # Trainer's group_by_length would take len(input_ids) = K, the same for every group: give the real one
            ds = ds.map(lambda row: {length: max(len(ids) for ids in row["input_ids"])})
        if "margin" in ds.column_names and getattr(args, "ranking_loss", "pairwise") != "pairwise":
            raise AlignError(
                f"{name}: the data has a 'margin' column but ranking_loss={args.ranking_loss!r} has no margin term. "
                "Use ranking_loss: pairwise, or drop the column."
            )
        return ds

    def _set_signature_columns_if_needed(self):
        # Keep the ranking columns (Trainer would keep only the model's forward arguments).
        if self._signature_columns is None:
            self._signature_columns = [
                "input_ids",
                "ranks",
                "margin",
                getattr(self.args, "length_column_name", "length"),
            ]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Groups with a pair across the accumulated micro-batches (and processes): the loss's denominator."""
        if not batch_samples or "ranks" not in batch_samples[0]:
            return None
        n = sum(has_pairs(b["ranks"]).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ranks = inputs["ranks"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = scatter_rewards(outputs.logits.squeeze(-1), ranks)  # (G, K), nan where absent
        if getattr(self.args, "ranking_loss", "pairwise") == "plackett_luce":
            per_group = plackett_luce_loss(rewards, ranks, reduction="none")
        else:
            per_group = ranking_loss(rewards, ranks, inputs.get("margin"), reduction="none")
        coef = getattr(self.args, "center_rewards_coefficient", None)
        if coef is not None:
            per_group = per_group + coef * pairwise_center_penalty(rewards, ranks, reduction="none")

        if num_items_in_batch is None:  # evaluation, or a direct call: this batch's mean
            loss = per_group.sum() / has_pairs(ranks).sum().clamp(min=1)
        else:
            # clamp: an accumulated batch of only all-tied groups (possible with hand-made tokenized data) gives 0
            loss = per_group.sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over processes, but the denominator already counts all processes' groups.
                loss = loss * self.accelerator.num_processes

        if model.training:
            self._train_logs["pair_accuracy"].append(pair_accuracy(rewards.detach(), ranks).item())
            self._train_logs["mean_reward"].append(rewards.detach().nanmean().item())
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, rewards `(G, K)` nan-padded, ranks `(G, K)` -1-padded) for `compute_ranking_metrics`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["rewards"].detach(), inputs["ranks"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A raw dataset passed here directly is tokenized like the one given at init (as TRL's RewardTrainer does).
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = self._prepare(
                eval_dataset, self.processing_class, self.args, metric_key_prefix, self.pair_encoding
            )
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_logs:  # a training log: add the batch metrics since the last one
            logs.update({k: sum(v) / len(v) for k, v in self._train_logs.items()})
            self._train_logs.clear()
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 16,
    offset: float | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Rewards `(N,)` (float32, CPU) of N (prompt, response) pairs, minus `offset`.

    `offset` None: `model.config.align_reward_offset` (0.0 if absent), so SFT samples average about 0 (the reward
    stage stores the mean score of SFT samples there, see `reward_offset`). Texts are built with `encode_for_reward`,
    as in training (an encoder: the pair encoding); batches are sorted by length so little compute goes to padding.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if offset is None:
        offset = float(getattr(model.config, "align_reward_offset", 0.0) or 0.0)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        # Needed to find each row's last real token; same choice as the trainer (pad, else EOS).
        text_config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    pair = is_encoder(model.config, tokenizer)
    seqs = [encode_for_reward(tokenizer, p, r, max_length, pair=pair) for p, r in zip(prompts, responses, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = next(model.parameters()).device
    out = torch.empty(len(seqs), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = pad_right([seqs[i] for i in idx], text_config.pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            out[idx] = logits.squeeze(-1).float().cpu()
    finally:
        model.train(was_training)
    return out - offset


def reward_offset(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16, max_length=None
) -> float:
    """Mean raw score of (prompt, response) samples, e.g. SFT outputs: store it as `model.config.align_reward_offset`
    so that `score` centers them at 0 (InstructGPT adds a bias so labeler demonstrations score 0 on average before RL,
    Sec. 3.5; align uses the SFT model's samples, what PPO starts from)."""
    if not prompts:
        raise ValueError("reward_offset needs at least one (prompt, response) sample")
    return score(model, tokenizer, prompts, responses, batch_size, offset=0.0, max_length=max_length).mean().item()
