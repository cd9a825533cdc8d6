"""The run report: `report.md`, a self-contained `report.html` (plots embedded as PNG) and `report.json`.

    align run recipes/tiny/chain.yaml                  # writes the report after the last stage
    align run recipes/tiny/chain.yaml --report_only    # rebuilds it from the stage dirs

Everything comes from the stages' `align_stage.json` files, so the report agrees with them by construction:
- a metrics table per stage (pretraining loss vs the entropy floor, SFT and PPO gold scores, reward-model accuracy);
- training curves (pretraining and SFT loss, reward-model held-out accuracy, PPO reward / KL / gold score per update);
- headline numbers: the gold labeler's win-rate of SFT over the pretrained model and of PPO over SFT, per held-out
  prompt (ties count half; `gold.win_rate`), from the per-prompt scores each stage recorded on the same
  prompts with the same greedy decoding, next to PPO's KL;
- the lecture's comparison made concrete: the first `examples` held-out prompts answered by the pretrained, SFT and
  PPO models side by side, each answer with its gold score and reward-model score (generated here, greedily).

Report options (the `report:` mapping of a chain recipe): `examples` (prompts shown side by side, default 6; 0 = none)
and `prompts_file` (own data: a file with a `prompt` column to take them from; tiny world: its held-out prompts).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from align.config import config_class, did_you_mean
from align.data import sources, tinyworld
from align.data.load import load_data, require_columns
from align.data.tinyworld import GOLD
from align.errors import AlignError
from align.evaluation import methods
from align.evaluation.gold import heldout_prompts, load_gold_labeler, paired_interval, win_rate
from align.evaluation.plots import bar_panel, figure, line_panel
from align.evaluation.plots import png as to_png
from align.evaluation.score import load_scorer
from align.evaluation.stage_metrics import format_value, table_rows
from align.generation.generate import generate
from align.hub import is_hub_id
from align.inspect.attention import default_output_dir
from align.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_stage_info, same_path
from align.models.modeling import load_causal_lm, load_tokenizer
from align.stages import registry

logger = logging.getLogger(__name__)

OPTIONS = {"examples": int, "prompts_file": str}
# The recurrent baseline: recipes/tiny/chain.yaml's optional entry `pretrain_lstm` (or `align pretrain --config
# recipes/tiny/pretrain_lstm.yaml`) writes it beside the chain's stages; the report sets it beside the Transformer.
LSTM_DIR = "pretrain_lstm"
MODELS = ("pretrain", "sft", "ppo")  # the stages that answer prompts
# PPO's parent when it is not the chain's SFT stage (e.g. an instruct model off the Hub or a GGUF file).
PARENT = "parent"
_LABELS = {LSTM_DIR: "LSTM baseline", PARENT: "parent"}  # the names the report shows that are no stage


def label(name: str) -> str:
    """How the report names a model: its stage record's `label` ("SFT"), or the LSTM baseline's, or PPO's parent's."""
    return _LABELS.get(name) or registry.get(name).display


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated report options (see the module docstring); errors name `where` and the key."""
    out = {"examples": 6, "prompts_file": None}
    for key, value in options.items():
        if key not in OPTIONS:
            raise AlignError(f"{where}: unknown report key '{key}'{did_you_mean(key, list(OPTIONS))}")
        kind = OPTIONS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise AlignError(f"{where}: report.{key} is {value!r}, expected {kind.__name__}.")
        if key == "examples" and value < 0:
            raise AlignError(f"{where}: report.examples is {value}; use 0 (none) or more.")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Numbers


def load_stages(root: Path) -> dict[str, dict[str, Any]]:
    """`{dir name: align_stage.json}` of the finished stages in `root/<name>`: the chain's stages in chain order, the
    LSTM baseline's (`root/pretrain_lstm`) after pretrain, then any other stage dir (a chain's variant entry, e.g.
    `classify_random`) by name."""
    stages = registry.names()
    found = {}
    for stage in (stages[0], LSTM_DIR, *stages[1:]):
        info = read_stage_info(root / stage)
        if info is not None:
            found[stage] = info
    known = set(found) | {LSTM_DIR, *stages}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in known) if root.is_dir() else []:
        info = read_stage_info(sub)
        if info is not None and info.get("stage") in stages:
            found[sub.name] = info
    return found


def stage_of(name: str, info: dict[str, Any]) -> str:
    """The stage a dir holds: its name for the chain's own, else what its align_stage.json says (a variant)."""
    return name if registry.find(name) is not None else str(info.get("stage"))


def headline(root: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gold scores per model, win-rates (from the per-prompt scores the stages recorded) and PPO's KL."""
    out: dict[str, Any] = {"gold_score": {}}
    sft, ppo = stages.get("sft"), stages.get("ppo")
    if sft and "gold_scores" in sft:
        out["gold_score"]["pretrain"] = sft["metrics"]["parent_gold_score"]
        out["gold_score"]["sft"] = sft["metrics"]["gold_score"]
        out["gold_win_rate_sft_vs_pretrain"] = win_rate(sft["gold_scores"], sft["parent_gold_scores"])
        out["held_out_prompts"] = {"sft_vs_pretrain": len(sft["gold_scores"])}
    if ppo and "gold_scores" in ppo:
        parent = ppo.get("parent") or {}
        parent_path = parent.get("path")
        # `vs`: the chain's SFT stage, or (no SFT stage: e.g. PPO straight on an instruct model) PPO's own parent.
        vs = "sft" if sft or same_path(parent_path, root / "sft") else PARENT
        if vs == "sft" and not same_path(parent_path, root / "sft"):
            logger.warning(
                "report: the PPO stage was not trained from %s; its win-rate is over its own parent.", root / "sft"
            )
        if vs == PARENT:
            out["gold_score"][PARENT] = ppo["metrics"]["parent_gold_score"]
            # a stage dir, or a base model: named by its Hub id when the stage recorded one (model_hub_id)
            out["ppo_parent"] = parent_path or parent.get("hub_id") or parent.get("model")
        out["gold_labeler"] = ppo.get("gold_labeler", GOLD)
        out["gold_score"]["ppo"] = ppo["metrics"]["gold_score"]
        out[f"gold_win_rate_ppo_vs_{vs}"] = win_rate(ppo["gold_scores"], ppo["parent_gold_scores"])
        out[f"gold_diff_ppo_vs_{vs}"] = paired_interval(ppo["gold_scores"], ppo["parent_gold_scores"])
        out.setdefault("held_out_prompts", {})[f"ppo_vs_{vs}"] = len(ppo["gold_scores"])
        if "gold_scores_sampled" in ppo:
            out["gold_score_sampled"] = {
                vs: ppo["metrics"]["parent_gold_score_sampled"],
                "ppo": ppo["metrics"]["gold_score_sampled"],
            }
            out[f"gold_win_rate_ppo_vs_{vs}_sampled"] = win_rate(
                ppo["gold_scores_sampled"], ppo["parent_gold_scores_sampled"]
            )
            out[f"gold_diff_ppo_vs_{vs}_sampled"] = paired_interval(
                ppo["gold_scores_sampled"], ppo["parent_gold_scores_sampled"]
            )
            out["gold_eval_samples"] = _resolved(stages, "ppo", "gold_eval_samples")
        if ppo.get("gold_pass_rates") and ppo.get("parent_gold_pass_rates"):
            # Per constraint (kind), greedy answers: where PPO gained and where it lost.
            out["gold_pass_rates"] = {vs: ppo["parent_gold_pass_rates"], "ppo": ppo["gold_pass_rates"]}
            if ppo.get("gold_pass_counts"):  # the same held-out prompts for both: one count per constraint
                out["gold_pass_counts"] = ppo["gold_pass_counts"]
    if ppo:
        out["ppo_reward"] = ppo["metrics"].get("reward")
        out["ppo_kl"] = ppo["metrics"].get("kl")
    if "reward" in stages:
        out["reward_pair_accuracy"] = stages["reward"]["metrics"].get("pair_accuracy")
    best = best_of_n_reference(root, ppo)
    if best:
        out["best_of_n"] = best
    if LSTM_DIR in stages:
        out["lstm_vs_transformer"] = lstm_comparison(stages)
    classifiers = classify_comparison(stages)
    if classifiers:
        out["classifiers"] = classifiers
    embeddings = embeddings_inspection(root, stages)
    if embeddings:
        out["embeddings"] = embeddings
    if not out["gold_score"]:
        del out["gold_score"]
    return out


def best_of_n_reference(root: Path, ppo: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest `best_of_<n>.json` beside the stages (`python -m
    align.evaluation.best_of_n`), if it is of this PPO stage's
    parent and prompts: `{n, gold_score, win_rate_vs_parent_greedy, ppo_win_rate_vs_best_of_n}`."""
    if not ppo or "parent_gold_scores" not in ppo:
        return None
    for file in sorted(root.glob("best_of_*.json"), key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not same_path(data.get("ppo_dir"), root / "ppo") or data.get("prompts") != len(ppo["parent_gold_scores"]):
            continue
        return {"n": data["n"], "gold_score": data["gold_score_best_of_n"],
                "win_rate_vs_parent_greedy": data["win_rate_vs_parent_greedy"],
                "ppo_win_rate_vs_best_of_n": data.get("ppo_win_rate_vs_best_of_n"), "file": file.name}  # fmt: skip
    return None


def lstm_comparison(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`{"transformer"|"lstm": {metric: value}}`: held-out loss, entropy floor, copy loss near and far, parameters."""
    out = {}
    for name, stage in (("transformer", "pretrain"), ("lstm", LSTM_DIR)):
        if stage not in stages:
            continue
        metrics = stages[stage].get("metrics") or {}
        keys = ("eval_loss", "entropy_floor", "copy_loss_near", "copy_loss_far")
        row = {k: metrics[k] for k in keys if k in metrics}
        params = (stages[stage].get("model") or {}).get("parameters")
        if params is not None:
            row["parameters"] = params
        out[name] = row
    return out


def classify_comparison(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per classifier dir (`classify` and its variants): GPT-1's two claims side by side, i.e. the init
    (pretrained or random) and `lm_aux_coef`, with the held-out metrics and the task."""
    rows = []
    for name, info in stages.items():
        if stage_of(name, info) != "classify":
            continue
        recipe, metrics = info.get("recipe") or {}, info.get("metrics") or {}
        task = sources.task_label(recipe.get("dataset_name"), recipe.get("tinyworld_task"))
        if recipe.get("tinyworld_heldout_places"):
            task = f"{task}, held-out places"
        init = "random" if recipe.get("random_init") else "pretrained"
        if recipe.get("averaged_embeddings"):
            source = (info.get("averaged_embeddings") or {}).get("space", "model")
            init = f"averaged embeddings ({'random init' if source == 'random_init' else source})"
        row = {"dir": name, "init": init,
               "lm_aux_coef": recipe.get("lm_aux_coef"), "task": task,
               "steps": recipe.get("max_steps"), "seed": recipe.get("seed")}  # fmt: skip
        keys = ("accuracy", "f1", "matthews_correlation", "majority_accuracy")
        row.update({k: metrics[k] for k in keys if k in metrics})
        rows.append(row)
    return rows


def embeddings_inspection(root: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The figures of `align inspect embeddings` on one of the run's models (`root/embeddings/`, else the command's
    default dir for a stage, `runs/inspect/<root--stage>/`), each space's class scores and first neighbours; None
    when it was not run."""
    dirs = [root / "embeddings"] + [default_output_dir(str(root / name)) for name in stages]
    for folder in dirs:
        try:
            data = json.loads((folder / "embeddings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        spaces = []
        for space in data.get("spaces") or []:
            keys = (
                "nn_agreement",
                "nn_agreement_chance",
                "knn5_agreement",
                "kmeans_purity",
                "kmeans_purity_chance",
                "silhouette",
            )
            grouping = {k: space["class_grouping"].get(k) for k in keys} if space.get("class_grouping") else None
            neighbours = {w: [n for n, _ in v["top"][:5]] for w, v in list(space["neighbours"].items())[:4]}
            analogies = [{k: a[k] for k in ("query", "expected", "rank")} for a in space.get("analogies") or []]
            spaces.append({"name": space["name"], "source": space["source"], "class_grouping": grouping,
                           "neighbours": neighbours, "analogies": analogies, "png": space.get("png")})  # fmt: skip
        return {"dir": str(folder), "model": data.get("model"), "spaces": spaces}
    return None


def _embedding_lines(emb: dict[str, Any]) -> list[str]:
    lines = []
    for s in emb["spaces"]:
        g = s["class_grouping"]
        if g:
            lines.append(f"Embeddings, {s['name']}: grammar classes, 1-NN agreement {g['nn_agreement']:.3f} (chance "
                         f"{g['nn_agreement_chance']:.3f}), k-means purity {g['kmeans_purity']:.3f} (chance "
                         f"{g['kmeans_purity_chance']:.3f})" + (f", silhouette {g['silhouette']:+.3f}."
                         if g.get("silhouette") is not None else "."))  # fmt: skip
    return lines


def metrics_table(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows `{stage, metric, label, value}` of the per-stage table (`stage`: the dir name)."""
    rows = []
    for stage, info in stages.items():
        metrics = info.get("metrics") or {}
        for key, row_label in table_rows(stage_of(stage, info)):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                rows.append({"stage": stage, "metric": key, "label": row_label, "value": float(value)})
        runtime = metrics.get("train_runtime") or metrics.get("runtime")
        if isinstance(runtime, (int, float)):
            rows.append({"stage": stage, "metric": "train_runtime", "label": "training time (s)", "value": runtime})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Side by side


def example_prompts(stages: dict[str, dict[str, Any]], options: dict[str, Any]) -> list[str]:
    n = options["examples"]
    if n == 0:
        return []
    if options["prompts_file"]:
        ds = load_data(options["prompts_file"], split="train")
        require_columns(ds, ["prompt"], options["prompts_file"])
        return [str(p) for p in ds["prompt"][:n]]
    for stage in ("ppo", "sft"):
        if _tinyworld(stages, stage):
            return heldout_prompts(n, seed=int(stages[stage]["data"].get("seed") or 0))
    return []


def _resolved(stages: dict[str, dict[str, Any]], stage: str, key: str) -> Any:
    """A stage's value of `key`: its recorded recipe (the keys the user set), else its config's default."""
    recipe = (stages.get(stage) or {}).get("recipe") or {}
    if key in recipe:
        return recipe[key]
    fields = {f.name: f.default for f in dataclasses.fields(config_class(stage))}
    return fields.get(key)


def _tinyworld(stages: dict[str, dict[str, Any]], stage: str) -> bool:
    """Whether `stage` ran on tiny-world prompts (its lineage's data entry; recipes hold only the keys users set)."""
    return sources.has_gold(((stages.get(stage) or {}).get("data") or {}).get("name"))


def side_by_side(root: Path, stages: dict[str, dict[str, Any]], prompts: list[str]) -> list[dict[str, Any]]:
    """Each prompt answered greedily by each model stage present (and PPO's parent when the chain has no SFT stage);
    gold score (tiny world, or PPO's `gold_labeler`) and reward-model score."""
    if not prompts:
        return []
    gold = all(_tinyworld(stages, s) for s in ("sft", "ppo") if s in stages)
    spec = (stages.get("ppo") or {}).get("gold_labeler")
    labeler = load_gold_labeler(spec) if spec and not gold else None
    last = "ppo" if "ppo" in stages else "sft"
    max_new_tokens = int(_resolved(stages, last, "gold_eval_max_new_tokens") or 64)
    models = [(s, str(root / s)) for s in MODELS if s in stages]
    parent = ((stages.get("ppo") or {}).get("parent") or {}).get("path")
    if parent and "sft" not in stages and not any(same_path(parent, root / s) for s in MODELS):
        models.insert(0, (PARENT, str(parent)))
    answers: dict[str, list[str]] = {}
    for stage, path in models:
        tokenizer = load_tokenizer(path)
        if not tokenizer.chat_template:
            logger.info("report: %s has no chat template; its answers are left out.", path)
            continue
        model = load_causal_lm(path, dtype="float32")
        answers[stage] = [
            r[0]
            for r in generate(model, tokenizer, prompts, chat=True, max_new_tokens=max_new_tokens, temperature=0.0)
        ]
        del model
    rm_scores: dict[str, list[float]] = {}
    if "reward" in stages:
        scorer = load_scorer(str(root / "reward"), device="cpu")
        for stage, responses in answers.items():
            rm_scores[stage] = scorer(prompts, responses)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt, "answers": {}}
        for stage, responses in answers.items():
            entry: dict[str, Any] = {"response": responses[i]}
            if gold:
                entry["gold_score"] = tinyworld.score(prompt, responses[i])
            elif labeler is not None:
                entry["gold_score"] = labeler.score(prompt, responses[i])
            if stage in rm_scores:
                entry["reward"] = rm_scores[stage][i]
            row["answers"][stage] = entry
        if gold:
            row["gold_response"] = tinyworld.gold_response(prompt)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def gold_curve(
    history: list[dict[str, Any]] | None, parent: float | None, final: float | None
) -> list[dict[str, Any]]:
    """PPO's held-out gold score per update as `{step, eval/gold_score}` rows: the parent's score at step 0 (the
    policy before any update), the in-run evaluations logged in `history`, and the final evaluation at the last
    update when the run did not evaluate there (a run with `eval_strategy: no` still gets two points)."""
    rows = [{"step": r.get("step", 0), "eval/gold_score": r["eval/gold_score"]}
            for r in history or [] if "eval/gold_score" in r]  # fmt: skip
    if parent is not None and (not rows or rows[0]["step"] > 0):
        rows.insert(0, {"step": 0, "eval/gold_score": parent})
    last = max((r.get("step", 0) for r in history or []), default=0)
    if final is not None and (not rows or rows[-1]["step"] < last):
        rows.append({"step": last, "eval/gold_score": final})
    return rows


def plots(stages: dict[str, dict[str, Any]], top: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """`{name: (caption, png)}` for each plot that has data."""
    out: dict[str, tuple[str, bytes]] = {}
    for stage, keys, caption in (
        ("pretrain", [("loss", "train"), ("eval_loss", "held-out")], "Pretraining loss (nats/token)"),
        ("sft", [("loss", "train"), ("eval_loss", "held-out")], "SFT loss on demonstrations"),
    ):
        if stage in stages:
            fig, (ax,) = figure(1)  # one panel carries its own title
            floor = (stages[stage]["metrics"].get("entropy_floor"), "entropy floor") if stage == "pretrain" else None
            if line_panel(ax, stages[stage].get("log_history"), keys, caption, floor):
                out[f"{stage}_loss"] = (caption, to_png(fig))
    if "reward" in stages:
        history = stages["reward"].get("log_history")
        fig, (ax1, ax2) = figure(2, title="Reward model")
        a = line_panel(ax1, history, [("loss", "train")], "ranking loss")
        b = line_panel(
            ax2,
            history,
            [
                ("eval_pair_accuracy", "pair accuracy"),
                ("eval_top1_accuracy", "top-1 accuracy"),
                ("eval_gold_agreement", "agreement with gold"),
            ],
            "held-out accuracy",
        )
        if a or b:
            out["reward_curves"] = ("Reward model: training loss and held-out accuracy", to_png(fig))
    if "ppo" in stages:
        history = stages["ppo"].get("log_history")
        metrics = stages["ppo"].get("metrics") or {}
        sft_gold = (top.get("gold_score") or {}).get("sft", (top.get("gold_score") or {}).get(PARENT))
        if sft_gold is None:  # a chain without an SFT stage: the parent (e.g. an instruct model) PPO started from
            sft_gold = metrics.get("parent_gold_score")
        gold_history = gold_curve(history, sft_gold, metrics.get("gold_score"))
        fig, axes = figure(3, 2, title="PPO, per update")
        drawn = [
            line_panel(
                axes[0],
                history,
                [("ppo/rm_score", "reward model's own"), ("ppo/score", "optimized (penalty, clip)")],
                "reward-model score",
            ),
            line_panel(axes[1], history, [("ppo/kl", "KL to SFT")], "KL(policy || SFT)"),
            line_panel(
                axes[2],
                gold_history,
                [("eval/gold_score", "PPO")],
                "gold score, held-out prompts",
                (sft_gold, "parent") if sft_gold is not None else None,
            ),
            line_panel(axes[3], history, [("ppo/response_length", "rollout")], "response length (tokens)"),
            line_panel(axes[4], history, [("ppo/eos_rate", "rollout")], "answers that end (EOS rate)"),
            line_panel(axes[5], history, [("ppo/explained_variance", "critic")], "explained variance"),
        ]
        if any(drawn):
            out["ppo_curves"] = (
                "PPO: reward-model score, KL, held-out gold score, response length, EOS rate and the critic's "
                "explained variance per update",
                to_png(fig),
            )
    gold = top.get("gold_score") or {}
    if gold:
        fig, (ax,) = figure(1)
        colors = {"pretrain": "#9e9e9e", "sft": "#5c8ddb", PARENT: "#5c8ddb", "ppo": "#e07b39"}
        sampled = top.get("gold_score_sampled") or {}
        bar_panel(
            ax,
            [label(s) for s in gold] + [f"{label(s)}\nsampled" for s in sampled],
            list(gold.values()) + list(sampled.values()),
            [colors[s] for s in gold] + [colors[s] for s in sampled],
            title="Gold labeler, held-out prompts",
            ylabel="mean gold score",
            faded=len(sampled),
        )
        caption = "Mean gold score of each model on the same held-out prompts"
        if sampled:
            caption += " (greedy; `sampled`: the mean over answers sampled at temperature 1)"
        out["gold_scores"] = (caption, to_png(fig))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _diff_line(diff: dict[str, float], view: str, vs: str) -> str:
    return (
        f"PPO minus {label(vs)}, per prompt, {view}: {diff['mean']:+.3f} (paired 95% interval {diff['low']:+.3f} "
        f"to {diff['high']:+.3f})."
    )


def headline_lines(top: dict[str, Any]) -> list[str]:
    lines = []
    vs = PARENT if f"gold_win_rate_ppo_vs_{PARENT}" in top else "sft"
    parent = str(top.get("ppo_parent"))
    name = f"its parent ({parent if is_hub_id(parent) else Path(parent).name})" if vs == PARENT else "SFT"
    labeler = "gold labeler" if top.get("gold_labeler", GOLD) == GOLD else f"checker {top['gold_labeler']}"
    if f"gold_win_rate_ppo_vs_{vs}" in top:
        kl = top.get("ppo_kl")
        at_kl = f", at KL {kl:.3f} nats." if kl is not None else "."
        rate, n = top[f"gold_win_rate_ppo_vs_{vs}"], top["held_out_prompts"][f"ppo_vs_{vs}"]
        lines.append(f"PPO beats {name} on {rate:.1%} of {n} held-out prompts ({labeler}, ties count half){at_kl}")
        if f"gold_diff_ppo_vs_{vs}" in top:
            lines.append(_diff_line(top[f"gold_diff_ppo_vs_{vs}"], "greedy", vs))
        if vs == PARENT:
            gold = top["gold_score"]
            lines.append(f"Mean score, greedy: parent {gold[PARENT]:.3f}, PPO {gold['ppo']:.3f}.")
    if f"gold_win_rate_ppo_vs_{vs}_sampled" in top:
        rate, k, gold = top[f"gold_win_rate_ppo_vs_{vs}_sampled"], top["gold_eval_samples"], top["gold_score_sampled"]
        lines.append(
            f"Sampled at temperature 1 ({k} answers per prompt, each prompt scored by their mean), PPO beats {name} "
            f"on {rate:.1%} of the prompts; mean gold score {label(vs)} {gold[vs]:.3f}, PPO {gold['ppo']:.3f}."
        )
        if f"gold_diff_ppo_vs_{vs}_sampled" in top:
            lines.append(_diff_line(top[f"gold_diff_ppo_vs_{vs}_sampled"], "sampled", vs))
    if top.get("best_of_n"):
        best = top["best_of_n"]
        versus = best["ppo_win_rate_vs_best_of_n"]
        lines.append(
            f"Reference, best-of-{best['n']} by the reward model from PPO's parent (no training, {best['n']}x the "
            f"samples): mean score {best['gold_score']:.3f}, beats the parent's greedy answer on "
            f"{best['win_rate_vs_parent_greedy']:.1%}"
            + ("." if versus is None else f"; PPO's greedy answer beats it on {versus:.1%}.")  # fmt: skip
        )
    if "gold_win_rate_sft_vs_pretrain" in top:
        rate, n = top["gold_win_rate_sft_vs_pretrain"], top["held_out_prompts"]["sft_vs_pretrain"]
        lines.append(f"SFT beats the pretrained model on {rate:.1%} of the {n} held-out prompts.")
    for name, row in (top.get("lstm_vs_transformer") or {}).items():
        if "eval_loss" not in row:
            continue
        line = f"{'Transformer' if name == 'transformer' else 'LSTM baseline'}: held-out loss {row['eval_loss']:.4f}"
        if "entropy_floor" in row:
            line += f" (floor {row['entropy_floor']:.4f})"
        if "parameters" in row:
            line += f", {row['parameters'] / 1e6:.2f}M parameters"
        if "copy_loss_near" in row and "copy_loss_far" in row:
            line += f"; copy loss near {row['copy_loss_near']:.3f}, far {row['copy_loss_far']:.3f} nats"
        lines.append(line + ".")
    for row in top.get("classifiers") or []:
        if "accuracy" not in row:
            continue
        scores = f"held-out accuracy {row['accuracy']:.3f}" + (f", F1 {row['f1']:.3f}" if "f1" in row else "")
        if row["init"].startswith("averaged"):
            lines.append(f"Classifier {row['dir']} ({row['task']}, logistic regression on {row['init']}): {scores}.")
            continue
        lines.append(f"Classifier {row['dir']} ({row['task']}, {row['init']} init, lm_aux_coef {row['lm_aux_coef']}, "
                     f"{row['steps']} steps): {scores}.")  # fmt: skip
    if top.get("embeddings"):
        lines += _embedding_lines(top["embeddings"])
    gold = top.get("gold_score") or {}
    if gold:
        lines.append("Mean gold score: " + ", ".join(f"{label(s)} {v:.3f}" for s, v in gold.items()) + ".")
    return lines


def _pass_rates(top: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column labels, rows `[constraint, rate per model...]`) of the per-constraint pass-rate table, or empty."""
    rates = top.get("gold_pass_rates") or {}
    if not rates:
        return [], []
    models = list(rates)
    kinds = sorted({k for r in rates.values() for k in r})
    rows = [[k, *(f"{rates[m][k]:.1%}" if k in rates[m] else "n/a" for m in models)] for k in kinds]
    counts = top.get("gold_pass_counts") or {}
    if counts:
        rows = [[*row, str(counts.get(row[0], "n/a"))] for row in rows]
    return [label(m) for m in models] + (["answers"] if counts else []), rows


def _markdown(root: Path, stages, top, table, examples, figures) -> str:
    out = [f"# align run report: `{root}`", ""]
    out += [f"- {line}" for line in headline_lines(top)] + [""]
    out += ["## Metrics", "", "| stage | metric | value |", "|---|---|---|"]
    out += [f"| {r['stage']} | {r['label']} | {format_value(r['value'])} |" for r in table]
    out += ["", *methods.markdown(top.get("methods") or [])]
    columns, rows = _pass_rates(top)
    if rows:
        out += ["", "## Pass rate per constraint (greedy answers, held-out prompts)", ""]
        out += ["| constraint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "## Training curves", ""]
    for name, (caption, _) in figures.items():
        out += [f"![{caption}](report_files/{name}.png)", "", f"*{caption}*", ""]
    if examples:
        models = [s for s in (PARENT, *MODELS) if s in examples[0]["answers"]]
        out += ["## The same prompts, answered by each model", ""]
        out += ["| prompt | " + " | ".join(label(s) for s in models) + " |", "|---" * (len(models) + 1) + "|"]
        for row in examples:
            cells = [_cell_md(row["answers"][s]) for s in models]
            out.append(f"| {_md_escape(row['prompt'])} | " + " | ".join(cells) + " |")
        out += ["", "Scores: gold = the hidden gold labeler (0-1); RM = the reward model (0 = SFT's average).", ""]
    out += _embeddings_md(top.get("embeddings"))
    out += ["## Stages", ""]
    for stage, info in stages.items():
        out.append(f"- **{stage}**: `{root / stage}` (recipe sha256 `{info.get('recipe_sha256', '')[:12]}`)")
    return "\n".join(out) + "\n"


def _embeddings_md(emb: dict[str, Any] | None) -> list[str]:
    """The embedding section (`align inspect embeddings`): class scores, neighbours, analogy ranks, the maps."""
    if not emb:
        return []
    out = ["## What the input embeddings learned", "", f"`align inspect embeddings` on `{emb['model']}` "
           f"(all figures: `{emb['dir']}/embeddings.json`, the page: `embeddings.html`).", ""]  # fmt: skip
    grouped = [s for s in emb["spaces"] if s["class_grouping"]]
    if grouped:
        out += [
            "| space | 1-NN class agreement (chance) | 5-NN | k-means purity (chance) | silhouette |",
            "|---|---|---|---|---|",
        ]
        for s in grouped:
            g = s["class_grouping"]
            out.append(
                f"| {s['name']} | {g['nn_agreement']:.3f} ({g['nn_agreement_chance']:.3f}) | "
                f"{g['knn5_agreement']:.3f} | {g['kmeans_purity']:.3f} ({g['kmeans_purity_chance']:.3f}) | "
                f"{_signed(g.get('silhouette'))} |"
            )
        out.append("")
    words = list(emb["spaces"][0]["neighbours"]) if emb["spaces"] else []
    if words:
        out += ["| word | " + " | ".join(s["name"] for s in emb["spaces"]) + " |", "|---" * (len(emb["spaces"]) + 1)
                + "|"]  # fmt: skip
        for w in words:
            out.append(f"| {_md_escape(w)} | " + " | ".join(_md_escape(", ".join(s["neighbours"].get(w, [])))
                                                          for s in emb["spaces"]) + " |")  # fmt: skip
        out.append("")
    for s in emb["spaces"]:
        for a in s["analogies"]:
            if a["expected"]:
                out.append(f"- {s['name']}: {a['query']} = {a['expected']}: rank {a['rank'] or 'n/a'}")
        if s["png"]:
            out += ["", f"![{s['name']}](report_files/{s['png']})", ""]
    return out + [""]


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _scores(entry: dict[str, Any]) -> str:
    parts = []
    if "gold_score" in entry:
        parts.append(f"gold {entry['gold_score']:.2f}")
    if "reward" in entry:
        parts.append(f"RM {entry['reward']:+.2f}")
    return " · ".join(parts)


def _cell_md(entry: dict[str, Any]) -> str:
    return f"{_md_escape(entry['response']) or '(empty)'} <br>*{_scores(entry)}*"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.35em .6em;vertical-align:top;
text-align:left;font-size:.92em}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.head li{font-size:1.1em;margin:.3em 0}.score{color:#666;font-size:.85em}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}img{max-width:100%}"""


def _html(root: Path, stages, top, table, examples, figures) -> str:
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>align report: {e(str(root))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>align run report: <code>{e(str(root))}</code></h1>",
        "<ul class='head'>",
    ]
    out += [f"<li>{e(line)}</li>" for line in headline_lines(top)] + ["</ul>"]
    out += ["<h2>Metrics</h2><table><tr><th>stage</th><th>metric</th><th>value</th></tr>"]
    out += [
        f"<tr><td>{e(r['stage'])}</td><td>{e(r['label'])}</td><td class='num'>{e(format_value(r['value']))}</td></tr>"
        for r in table
    ]
    out += ["</table>", *methods.html_table(top.get("methods") or [], e)]
    columns, rows = _pass_rates(top)
    if rows:
        out += ["<h2>Pass rate per constraint (greedy answers, held-out prompts)</h2><table><tr><th>constraint</th>"]
        out += [f"<th>{e(c)}</th>" for c in columns] + ["</tr>"]
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows] + ["</table>"]
    out += ["<h2>Training curves</h2>"]
    for caption, png in figures.values():
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    if examples:
        models = [s for s in (PARENT, *MODELS) if s in examples[0]["answers"]]
        out += ["<h2>The same prompts, answered by each model</h2><table><tr><th>prompt</th>"]
        out += [f"<th>{e(label(s))}</th>" for s in models] + ["</tr>"]
        for row in examples:
            cells = "".join(
                f"<td>{e(row['answers'][s]['response']) or '<i>(empty)</i>'}<br>"
                f"<span class='score'>{e(_scores(row['answers'][s]))}</span></td>"
                for s in models
            )
            out.append(f"<tr><td>{e(row['prompt'])}</td>{cells}</tr>")
        out += [
            "</table><p class='score'>gold = the hidden gold labeler (0-1); RM = the reward model, centered so "
            "SFT samples average 0.</p>"
        ]
    emb = top.get("embeddings")
    if emb:
        out.append("<h2>What the input embeddings learned</h2><table><tr><th>space</th><th>1-NN class agreement "
                   "(chance)</th><th>k-means purity (chance)</th><th>neighbours</th></tr>")  # fmt: skip
        for s in emb["spaces"]:
            g = s["class_grouping"]
            cells = (
                [
                    f"{g['nn_agreement']:.3f} ({g['nn_agreement_chance']:.3f})",
                    f"{g['kmeans_purity']:.3f} ({g['kmeans_purity_chance']:.3f})",
                ]
                if g
                else ["n/a", "n/a"]
            )
            near = "; ".join(f"{w}: {', '.join(n)}" for w, n in s["neighbours"].items())
            out.append(f"<tr><td>{e(s['name'])}</td>" + "".join(f"<td>{c}</td>" for c in cells)
                       + f"<td>{e(near)}</td></tr>")  # fmt: skip
        out.append("</table>")
        for s in emb["spaces"]:
            png = Path(emb["dir"]) / s["png"] if s["png"] else None
            if png is not None and png.is_file():
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                out.append(
                    f"<figure><img alt='{e(s['name'])}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(s['name'])}: 2-D map (PCA) of the input embeddings</figcaption></figure>"
                )
    out += ["<h2>Stages</h2><ul>"]
    out += [f"<li><b>{e(s)}</b>: <code>{e(str(root / s))}</code></li>" for s in stages] + ["</ul></body></html>"]
    return "\n".join(out) + "\n"


def write_report(root: str | os.PathLike, options: dict[str, Any] | None = None) -> list[Path]:
    """Write `report.md`, `report.html`, `report.json` (and `report_files/*.png` for the markdown) in `root`."""
    root = Path(root)
    options = check_options(options or {}, "report")
    stages = load_stages(root)
    if not stages:
        raise AlignError(f"{root}: no finished stage (no */align_stage.json) to report on. Run the chain first.")
    top = headline(root, stages)
    top["methods"] = methods.method_rows(root, stages)
    table = metrics_table(stages)
    examples = side_by_side(root, stages, example_prompts(stages, options))
    figures = plots(stages, top)
    files = root / "report_files"
    for name, (_, png) in figures.items():
        atomic_write_bytes(files / f"{name}.png", png)
    for space in (top.get("embeddings") or {}).get("spaces", []):
        png = Path(top["embeddings"]["dir"]) / space["png"] if space["png"] else None
        if png is not None and png.is_file():
            atomic_write_bytes(files / space["png"], png.read_bytes())
    data = {
        "output_root": str(root),
        **{
            k: top[k]
            for k in (
                "gold_win_rate_ppo_vs_sft",
                "gold_win_rate_sft_vs_pretrain",
                "gold_win_rate_ppo_vs_sft_sampled",
                f"gold_win_rate_ppo_vs_{PARENT}",
                f"gold_win_rate_ppo_vs_{PARENT}_sampled",
            )
            if k in top
        },
        "headline": top,
        "metrics": table,
        "stages": {
            s: {"dir": str(root / s), "recipe_sha256": i.get("recipe_sha256"), "metrics": i.get("metrics")}
            for s, i in stages.items()
        },
        "examples": examples,
        "plots": {
            name: {"caption": caption, "file": f"report_files/{name}.png"} for name, (caption, _) in figures.items()
        },
    }
    out = [root / "report.md", root / "report.html", root / "report.json"]
    atomic_write_text(out[0], _markdown(root, stages, top, table, examples, figures))
    atomic_write_text(out[1], _html(root, stages, top, table, examples, figures))
    atomic_write_json(out[2], json.loads(json.dumps(data, default=float)))
    for line in headline_lines(top):
        logger.info("%s", line)
    return out
