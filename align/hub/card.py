"""Model and dataset cards for align stages: YAML metadata, prose, metrics, curves, samples, lineage.

Everything here is pure: it reads a stage dir (`align_stage.json` and, for adapters, `adapter_config.json`) and returns
a card. Network and file writes live in `upload.py`, the curves PNG by `evaluation/plots.py`. The lineage a card
shows (parents, their Hub repos, the base model) is found by `lineage.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData, constants

from align.errors import AlignError
from align.evaluation.plots import has_curves
from align.evaluation.stage_metrics import format_value
from align.hub.lineage import (
    Link,
    adapter_base,
    base_model_of,
    is_hub_id,
    known_repo,
    lineage,
    model_link,
    resolve_parent_path,
)
from align.io import STAGE_FILE, read_stage_info
from align.stages import registry

CURVES_FILE = "training_curves.png"

# What the metrics align writes mean; anything else is listed by name alone.
METRIC_HELP = {
    "eval_loss": "held-out cross-entropy (nats per token)",
    "perplexity": "exp(eval_loss)",
    "entropy_floor": "entropy of the tiny world's text: the lowest eval_loss any model can reach",
    "eval_loss_above_floor": "eval_loss - entropy_floor (0 is perfect)",
    "gold_score": "mean gold-labeler score of this model's responses to held-out prompts",
    "parent_gold_score": "the same, for the parent model",
    "gold_score_sampled": "gold_score with each prompt answered several times at temperature 1 (the mean)",
    "parent_gold_score_sampled": "the same, for the parent model",
    "gold_win_rate_sampled": "share of held-out prompts where this model's sampled score beats the parent's",
    "eval_mean_token_accuracy": "held-out next-token accuracy on the trained tokens",
    "train_loss": "mean training loss over the run",
}


# Card text


def _numeric(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _is_eval_metric(name: str) -> bool:
    # model-index is for evaluation results: leave out training loss, runtime and throughput.
    return not (name.startswith("train_") or name.endswith(("_runtime", "_per_second")) or name == "tokens_per_second")


def _fence(text: str) -> str:
    """`text` in a fenced block that its own backticks cannot close."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def _clip(text: Any, n: int = 1000) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f" … ({len(text) - n} more characters)"


def _link(link: Link, endpoint: str, this: bool) -> str:
    if link.model is not None:
        if link.repo_id and link.repo_id != link.model:  # a local or GGUF copy of a Hub repo (model_hub_id)
            return f"base model [{link.repo_id}]({endpoint}/{link.repo_id}), from its copy `{Path(link.model).name}`"
        if link.repo_id:
            return f"base model [{link.model}]({endpoint}/{link.model})"
        return f"base model `{Path(link.model).name}` (a local model, not on the Hub)"
    name = f"**{link.stage}**"
    if this:
        return f"{name}: this repo"
    if link.repo_id:
        return f"{name}: [{link.repo_id}]({endpoint}/{link.repo_id})"
    where = f"local dir `{link.path.name}`" if link.path is not None else "local dir"
    return f"{name}: {where}, not on the Hub" + ("" if link.found else " (not found on this machine)")


def _parent_link(child: Link, parent: Mapping[str, Any], pushed: Mapping[str, str], endpoint: str) -> Link:
    if "path" in parent:
        path = resolve_parent_path(child.path, parent) if child.path is not None else None
        repo = known_repo(path, pushed, endpoint) if path is not None else None
        return Link(stage=parent.get("stage"), path=path or Path(str(parent["path"])), repo_id=repo, found=bool(path))
    return model_link(parent)


def lineage_markdown(chain: list[Link], info: Mapping[str, Any], endpoint: str, pushed: Mapping[str, str]) -> str:
    lines = ["## Lineage", "", "Oldest first; each entry was trained from the one above it.", ""]
    root = read_stage_info(chain[0].path) if chain and chain[0].model is None and chain[0].found else None
    if root is not None and root.get("parent") is None:
        lines.append("0. random initialization (trained from scratch)")
    for i, link in enumerate(chain):
        lines.append(f"{i + 1}. {_link(link, endpoint, this=i == len(chain) - 1)}")
    main = info.get("parent") or {}
    others = [p for p in info.get("parents") or [] if isinstance(p, Mapping) and p and p != main]
    if others and chain:
        lines += ["", "Also used to train this stage:", ""]
        lines += [f"- {_link(_parent_link(chain[-1], p, pushed, endpoint), endpoint, this=False)}" for p in others]
    return "\n".join(lines)


def _metrics_markdown(metrics: Mapping[str, Any] | None) -> str:
    nums = _numeric(metrics)
    if not nums:
        return "## Metrics\n\nThis stage recorded no metrics."
    lines = ["## Metrics", "", "| metric | value | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {format_value(v)} | {METRIC_HELP.get(k, '')} |" for k, v in nums.items()]
    return "\n".join(lines)


def _samples_markdown(samples: list[Any] | None, limit: int = 5) -> str:
    if not samples:
        return ""
    shown = min(limit, len(samples))
    lines = ["## Sample outputs", "", f"The first {shown} of {len(samples)} samples saved by the stage.", ""]
    for i, s in enumerate(samples[:limit]):
        if not isinstance(s, Mapping):
            lines += [f"**Sample {i + 1}**", "", _fence(_clip(s)), ""]
            continue
        extra = ", ".join(f"{k} = {format_value(v)}" for k, v in s.items() if k not in ("prompt", "response", "text"))
        lines.append(f"**Sample {i + 1}**" + (f" ({extra})" if extra else ""))
        lines.append("")
        for key in ("prompt", "response", "text"):
            if key in s:
                lines += [f"{key.capitalize()}:", "", _fence(_clip(s[key])), ""]
    return "\n".join(lines).rstrip()


def _recipe_markdown(info: Mapping[str, Any]) -> str:
    recipe = info.get("recipe")
    if not recipe:
        return ""
    sha = info.get("recipe_sha256")
    body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=119).rstrip()
    summary = "Resolved recipe" + (f" (sha256 `{sha[:12]}`)" if sha else "")
    return "\n".join(
        ["## Recipe", "", "<details>", f"<summary>{summary}</summary>", "", "```yaml", body, "```", "", "</details>"]
    )


def _data_markdown(info: Mapping[str, Any], dataset_repo: str | None, endpoint: str, kind_prefix: str) -> str:
    data = info.get("data")
    if not isinstance(data, Mapping) or not data:
        return ""
    name = data.get("name")
    shown = f"[{dataset_repo}]({endpoint}/{kind_prefix}{dataset_repo})" if dataset_repo else f"`{name}`"
    lines = ["## Training data", "", f"- dataset: {shown}"]
    if data.get("rows") is not None:
        lines.append(f"- rows: {data['rows']}")
    if data.get("fingerprint"):
        lines.append(f"- fingerprint: `{data['fingerprint']}`")
    return "\n".join(lines)


def _versions_markdown(info: Mapping[str, Any]) -> str:
    versions = info.get("versions")
    if not versions:
        return ""
    lines = ["## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions.items()]
    return "\n".join(lines)


def usage_markdown(stage: str, repo_id: str, adapter: bool, has_chat_template: bool, likelihood: bool = False) -> str:
    if stage == "classify":
        code = f'''from transformers import pipeline

classifier = pipeline("text-classification", model="{repo_id}")
print(classifier("a text to classify"))
print(classifier({{"text": "a premise", "text_pair": "a hypothesis"}}))  # pair models'''
        note = (
            "The tokenizer adds GPT-1's start, delimiter and extract tokens itself. A similarity model was trained on "
            "both orders of a pair, logits summed; a multiple-choice model gives one score per (text, choice) pair."
        )
    elif stage == "reward":
        if has_chat_template:
            text = """messages = [
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time..."},
]
text = tokenizer.apply_chat_template(messages, tokenize=False)  # the format the reward model was trained on"""
        else:
            text = 'text = "Tell me a story. Once upon a time..."  # prompt followed by response'
        register = "import align.models.modeling_reward  # registers LikelihoodRewardModel (pip install align)\n"
        register = register if likelihood else ""
        code = f'''import torch
{register}from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")
{text}
inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    reward = model(**inputs).logits[0, 0].item()  # a scalar; compare rewards of responses to the same prompt
print(reward)'''
        note = "The model outputs one scalar per (prompt, response): score responses in the format it was trained on."
        if likelihood:
            note += (
                " It is align's LikelihoodRewardModel: a scalar head plus learned weights on its own language model's "
                "mean/min log-probability of the response's tokens. It loads once `align.models.modeling_reward` is "
                "imported, or without align from the `modeling_reward.py` in this repo with `trust_remote_code=True`."
            )
    elif adapter:
        code = f'''from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # downloads the base model named in adapter_config.json
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
inputs = tokenizer("Once upon a time", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))'''
        note = "This repo holds a PEFT (LoRA) adapter, not full weights: it loads on top of its base model."
    elif has_chat_template:
        code = f'''from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}")
messages = [{{"role": "user", "content": "Tell me a story."}}]
print(generator(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])'''
        note = "The tokenizer carries the chat template the model was trained with, so `pipeline` formats messages."
    else:
        code = f'''from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}")
print(generator("Once upon a time", max_new_tokens=64)[0]["generated_text"])'''
        note = ""
    return "\n".join(["## How to use", "", note, "", "```python", code, "```"]).replace("\n\n\n", "\n\n")


def is_likelihood_reward(stage_dir: Path) -> bool:
    from align.models.modeling_reward import MODEL_TYPE  # start-up time: it loads torch, which `align push` needs not

    try:
        return json.loads((stage_dir / "config.json").read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def _has_chat_template(stage_dir: Path) -> bool:
    if (stage_dir / "chat_template.jinja").is_file() or (stage_dir / "chat_template.json").is_file():
        return True
    cfg = stage_dir / "tokenizer_config.json"
    try:
        return bool(cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    except json.JSONDecodeError:
        return False


def _require_info(stage_dir: Path) -> dict[str, Any]:
    info = read_stage_info(stage_dir)
    if info is None:
        raise AlignError(
            f"{stage_dir}: not a finished align stage: no {STAGE_FILE}. Run the stage to the end (the file is written "
            "last), or point at a stage output dir."
        )
    return info


def _hub_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _data_hub_id(info: Mapping[str, Any], stage_dir: Path, pushed: Mapping[str, str], endpoint: str) -> str | None:
    """The Hub dataset the stage trained on: a pushed rank dir, or the data name when it is a Hub id."""
    data = info.get("data")
    if not isinstance(data, Mapping) or not data.get("name"):
        return None
    name = str(data["name"])
    # The recorded path, else a sibling of the same name: a run dir moved after training.
    for cand in (Path(name), Path(stage_dir).resolve().parent / Path(name).name):
        if (cand / STAGE_FILE).is_file():
            return known_repo(cand, pushed, endpoint)
    return name if is_hub_id(name) else None


def build_model_card(
    stage_dir: str | os.PathLike,
    *,
    repo_id: str,
    parent_repo_id: str | None = None,
    pushed: Mapping[str, str] | None = None,
    endpoint: str | None = None,
    curves: bool | None = None,
):
    """The `README.md` of a pushed model stage (pretrain, sft, reward, ppo; full weights or a PEFT adapter).

    Args:
        repo_id: the repo the card will live in (usage snippet, model-index name).
        parent_repo_id: Hub repo of the parent stage, when the caller pushed it (overrides what lineage finds).
        pushed: resolved local stage dir -> Hub repo id, for stages pushed earlier in this session (push_run).
        endpoint: Hub URL for links; default `HF_ENDPOINT` or huggingface.co.
        curves: whether `training_curves.png` is uploaded beside the card; default: when `log_history` has data.

    Returns:
        `huggingface_hub.ModelCard`.
    """
    stage_dir = Path(stage_dir)
    info = _require_info(stage_dir)
    stage = str(info.get("stage"))
    record = registry.find(stage)
    if record is not None and record.repo_type == "dataset":
        raise AlignError(f"{stage_dir}: a {stage} stage is a dataset, not a model. Use build_dataset_card.")
    pushed = pushed or {}
    endpoint = _hub_endpoint(endpoint)
    adapter = (stage_dir / "adapter_config.json").is_file() and not _has_full_weights(stage_dir)
    chain = lineage(stage_dir, pushed, endpoint, parent_repo_id=parent_repo_id)
    base = base_model_of(chain)
    if adapter and base is None:
        declared = adapter_base(stage_dir)
        base = declared if is_hub_id(declared) else None
    pipeline_tag = record.pipeline_tag if record is not None else "text-generation"
    dataset = _data_hub_id(info, stage_dir, pushed, endpoint)
    data_name = (info.get("data") or {}).get("name") if isinstance(info.get("data"), Mapping) else None
    tags = ["align", stage, *(record.card_tags if record is not None else ())]
    if adapter:
        tags += ["peft", "lora"]
    evals = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset or str(data_name or "unknown"),
            dataset_name=str(data_name or dataset or "unknown"),
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in _numeric(info.get("metrics")).items()
        if _is_eval_metric(name)
    ]
    card_data = ModelCardData(
        base_model=base,
        datasets=[dataset] if dataset else None,
        tags=tags,
        pipeline_tag=pipeline_tag,
        library_name="peft" if adapter else "transformers",
        model_name=repo_id,
        eval_results=evals or None,
    )
    if curves is None:
        curves = has_curves(info.get("log_history"))
    name = repo_id.split("/")[-1]
    intro = f"The **{stage}** stage of an InstructGPT-style chain, trained with `align`"
    intro += f", from [{base}]({endpoint}/{base})." if base else "."
    if adapter:
        intro += " This repo holds a PEFT adapter; load it on top of its base model."
    parts = [
        f"# {name}",
        intro,
        "## What this stage did\n\n" + _about(record, stage),
        lineage_markdown(chain, info, endpoint, pushed),
        _metrics_markdown(info.get("metrics")),
        f"## Training curves\n\n![training curves]({CURVES_FILE})" if curves else "",
        _samples_markdown(info.get("samples")),
        usage_markdown(stage, repo_id, adapter, _has_chat_template(stage_dir), is_likelihood_reward(stage_dir)),
        _data_markdown(info, dataset, endpoint, "datasets/"),
        _recipe_markdown(info),
        _versions_markdown(info),
    ]
    body = "\n\n".join(p for p in parts if p) + "\n"
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def build_dataset_card(
    stage_dir: str | os.PathLike,
    *,
    repo_id: str,
    parent_repo_id: str | None = None,
    pushed: Mapping[str, str] | None = None,
    endpoint: str | None = None,
):
    """The `README.md` of a pushed rank stage (comparison data): a `huggingface_hub.DatasetCard`."""
    stage_dir = Path(stage_dir)
    info = _require_info(stage_dir)
    stage = str(info.get("stage"))
    record = registry.find(stage)
    pushed = pushed or {}
    endpoint = _hub_endpoint(endpoint)
    chain = lineage(stage_dir, pushed, endpoint, parent_repo_id=parent_repo_id)
    sampler = base_model_of(chain)
    files = sorted(p.name for p in stage_dir.iterdir() if p.is_file())
    saved = "state.json" in files or "dataset_dict.json" in files
    if saved:
        usage = f'''from datasets import load_from_disk
from huggingface_hub import snapshot_download

ds = load_from_disk(snapshot_download("{repo_id}", repo_type="dataset"))  # a `save_to_disk` folder'''
    else:
        usage = f'''from datasets import load_dataset

ds = load_dataset("{repo_id}")'''
    card_data = DatasetCardData(
        pretty_name=repo_id.split("/")[-1],
        tags=["align", stage, *(record.card_tags if record is not None else ())],
        task_categories=["text-generation"],
    )
    if sampler:
        card_data["base_model"] = sampler  # not a dataset-card standard field: the policy that sampled the responses
    intro = "Comparison data from the **rank** stage of an InstructGPT-style chain, made with `align`"
    intro += f": responses sampled from [{sampler}]({endpoint}/{sampler})." if sampler else "."
    parts = [
        f"# {repo_id.split('/')[-1]}",
        intro,
        "## What this stage did\n\n" + _about(record, stage),
        lineage_markdown(chain, info, endpoint, pushed),
        _metrics_markdown(info.get("metrics")),
        _samples_markdown(info.get("samples")),
        "\n".join(["## How to use", "", "```python", usage, "```"]),
        _recipe_markdown(info),
        _versions_markdown(info),
    ]
    body = "\n\n".join(p for p in parts if p) + "\n"
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _about(record: registry.Stage | None, stage: str) -> str:
    """The card's "What this stage did" paragraph: the stage record's `about`."""
    return (record.about if record is not None else "") or f"The `{stage}` stage."


def _has_full_weights(stage_dir: Path) -> bool:
    return (stage_dir / "model.safetensors").is_file() or (stage_dir / "model.safetensors.index.json").is_file()
