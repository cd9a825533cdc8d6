"""`align inspect attention MODEL`: every layer's and head's attention weights, and whether they rank tokens as
gradients do.

    align inspect attention runs/tiny/pretrain --text "tom finds a red"
    align inspect attention runs/tiny/sft --prompt "write a story about tom ." --response "tom has a red"
    align inspect attention runs/tiny/reward --prompt P --response R        # which tokens its score reads

Writes to --output_dir (default `runs/inspect/<MODEL>`, each `/` written `--`; never inside the model dir, which
`align push` uploads whole):
  attention_layer_NN.png   one per layer: a grid of heads, key tokens across, query tokens down
  attention.html           one self-contained page (weights embedded as JSON, no CDN) switching layer and head
  attention.json           per-head entropy and Spearman correlation, the attribution per token, the summary
  attention.safetensors    the weights themselves, `attentions` (layers, heads, T, T)

The question of Jain & Wallace 2019 ("Attention is not Explanation", https://arxiv.org/abs/1902.10186), with numbers:
the target is the logit of the next token the model predicts at the last position (a causal LM; `--target` picks
another token) or the score (a reward model). Each input token's attribution is input x gradient: the embedding
times the target's gradient with respect to it, summed over the hidden dimension (Shrikumar et al. 2016,
https://arxiv.org/abs/1605.01713). Per head, the Spearman rank correlation between the attention the query position
(the last token; [CLS] for an encoder) pays to each input token and |attribution| (the magnitude: attention weights
are >= 0 and carry no sign; the signed values are in attention.json). A head whose rho is near 0 attends to other
tokens than those the output is sensitive to. Attention is one view of the computation, not the explanation: it
leaves out the value vectors, the MLPs and the residual stream; gradients are a local, linear view of their own.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from align.data.rankings import REWARD_SEPARATOR, encode_for_reward
from align.errors import AlignError
from align.generation.generate import use_chat
from align.inspect.attention_files import CAVEAT, describe_target, write_outputs
from align.io import read_stage_info
from align.models.modeling import is_encoder, load_causal_lm, load_pretrained, load_tokenizer, max_positions
from align.models.modeling_reward import MODEL_TYPE

logger = logging.getLogger(__name__)

TOP_K = 5


# ---------------------------------------------------------------------------------------------------------------------
# Math (torch only)


def attention_entropy(attn):
    """Entropy in nats of each attention row: `(..., T)` weights summing to 1 -> `(...)`. 0 log 0 = 0."""
    p = attn.double()
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def rankdata(x):
    """1-based ranks of a 1-d tensor, ties given their average rank (scipy.stats.rankdata's "average")."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # the last (1-based) rank of each group of equal values
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation of two equal-length 1-d tensors: Pearson's r of their average ranks. None when it
    is undefined (fewer than 2 values, or one side constant)."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.numel() != ry.numel():
        raise ValueError(f"spearman: {rx.numel()} values against {ry.numel()}")
    if rx.numel() < 2:
        return None
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = (dx.square().sum() * dy.square().sum()).sqrt()
    if denom == 0:
        return None
    return float((dx * dy).sum() / denom)


# ---------------------------------------------------------------------------------------------------------------------
# Model: one forward for the weights, one backward for the attribution


@dataclass
class AttentionResult:
    """What one forward/backward read. `attentions` (L, H, T, T) float32 on CPU, rows = query positions;
    `attribution` (T,) signed input x gradient of the target; `query` the position whose row is compared."""

    token_ids: list[int]
    tokens: list[str]
    attentions: Any
    attribution: Any
    query: int
    target: dict[str, Any]
    causal: bool
    notes: list[str] = field(default_factory=list)


def model_kind(config, stage: str | None) -> str:
    """ "classifier" (a reward model: `*ForSequenceClassification` or align's LikelihoodRewardModel) or "causal_lm"."""
    archs = getattr(config, "architectures", None) or []
    if stage == "reward" or getattr(config, "model_type", None) == MODEL_TYPE:
        return "classifier"
    if any(a.endswith("ForSequenceClassification") or a == "LikelihoodRewardModel" for a in archs):
        return "classifier"
    return "causal_lm"


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        text = tokenizer.decode([i])
        out.append(text if text.strip() else piece)  # a space or newline token shows as its vocabulary entry
    return out


def _target_id(tokenizer, target: str) -> int:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if target in tokenizer.get_vocab():
        ids = [tokenizer.convert_tokens_to_ids(target)]
    if len(ids) != 1:
        raise AlignError(
            f"--target {target!r}: {len(ids)} tokens ({tokenizer.convert_ids_to_tokens(ids)}), expected one. Give a "
            "single token of the vocabulary."
        )
    return ids[0]


def attention_and_attribution(
    model, tokenizer, input_ids: list[int], *, kind: str, target: str | None = None, where: str = "model"
) -> AttentionResult:
    """Attention weights of every layer/head and the input x gradient of the target, for one unpadded sequence.

    Args:
        input_ids: T token ids, as the model reads them (special tokens included).
        kind: "causal_lm" (target: the logit of `target`, default the argmax next token, at the last position) or
            "classifier" (target: the score; with several labels, `target` names one, default the argmax).
    AlignError when the model returns no attention weights (an architecture without eager attention).
    """
    out, captured, base = _forward(model, input_ids, kind)
    attn, notes = _attention_weights(model, out, captured, base, where)
    value, tgt, query = _target_value(model, tokenizer, out, input_ids, kind=kind, target=target)
    value.backward()
    emb = captured["embeddings"]
    attribution = (emb * emb.grad).sum(-1)[0].detach().float().cpu()  # (T,)
    return AttentionResult(
        token_ids=list(input_ids),
        tokens=_token_strings(tokenizer, list(input_ids)),
        attentions=attn,
        attribution=attribution,
        query=query,
        target=tgt,
        causal=not is_encoder(model.config, tokenizer),
        notes=notes,
    )


def _forward(model, input_ids: list[int], kind: str):
    """(output, captured, base model): one forward pass with attentions, the embedding output replaced by a leaf
    tensor (`captured["embeddings"]`) and the base model's output kept (`captured["base"]`)."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    model.eval()
    model.requires_grad_(False)  # only the embeddings' output needs a gradient
    captured: dict[str, Any] = {}

    def leaf_embeddings(module, args, output):
        # A leaf in place of the embedding output: its .grad is d target / d embedding, and input_ids still reach
        # models that read them beyond the embeddings (LikelihoodRewardModel's features).
        leaf = output.detach().requires_grad_(True)
        captured["embeddings"] = leaf
        return leaf

    def base_outputs(module, args, output):
        captured["base"] = output

    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    hooks = [model.get_input_embeddings().register_forward_hook(leaf_embeddings)]
    if isinstance(base, torch.nn.Module) and base is not model:
        hooks.append(base.register_forward_hook(base_outputs))
    kwargs: dict[str, Any] = {"use_cache": False} if kind == "causal_lm" else {}
    try:
        with torch.enable_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, captured, base


def _attention_weights(model, out, captured: dict[str, Any], base, where: str):
    """((L, H, T, T) attention weights, notes): the model's own, else its base model's (with a note saying so)."""
    notes = []
    attentions = getattr(out, "attentions", None)
    if not attentions and "base" in captured:
        attentions = getattr(captured["base"], "attentions", None)
        if attentions:
            notes.append(
                f"{type(model).__name__} returns no attentions itself: the weights are its base model's "
                f"({type(base).__name__}); the attribution is of {type(model).__name__}'s own output."
            )
    if not attentions or any(a is None for a in attentions):
        impl = getattr(model.config, "_attn_implementation", None)
        raise AlignError(
            f"{where}: {type(model).__name__} returned no attention weights (attn_implementation={impl!r}, "
            "output_attentions=True): its attention runs only in a fused kernel (SDPA/flash), which never forms them. "
            "Inspect a model whose architecture has eager attention (llama, gpt2, bert, ...)."
        )
    return torch.stack([a[0] for a in attentions]).detach().float().cpu(), notes


def _target_value(model, tokenizer, out, input_ids: list[int], *, kind: str, target: str | None):
    """(the scalar to attribute, its description, the query position whose attention row is shown)."""
    config = model.config
    if kind == "causal_lm":
        logits = out.logits[0, -1].float()
        tid = _target_id(tokenizer, target) if target is not None else int(logits.argmax())
        value = logits[tid]
        prob = float(logits.detach().softmax(-1)[tid])
        tgt = {
            "kind": "next_token_logit",
            "token": tokenizer.convert_ids_to_tokens([tid])[0],
            "id": tid,
            "logit": float(value.detach()),
            "prob": prob,
            "chosen": "argmax" if target is None else "--target",
        }
        return value, tgt, len(input_ids) - 1
    logits = out.logits[0].float()
    if logits.numel() == 1:
        if target is not None:
            raise AlignError(f"--target {target!r}: this reward model has one score; drop --target.")
        value = logits[0]
        tgt = {"kind": "score", "value": float(value.detach()), "note": "raw: align_reward_offset not subtracted"}
    else:
        labels = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if target is None:
            idx = int(logits.argmax())
        elif target in labels or target.isdigit():
            idx = labels.get(target, int(target) if target.isdigit() else -1)
        else:
            idx = -1
        if not 0 <= idx < logits.numel():
            raise AlignError(f"--target {target!r}: not a label of this classifier; use one of {sorted(labels)}.")
        value = logits[idx]
        tgt = {"kind": "class_logit", "label": idx, "logit": float(value.detach())}
    return value, tgt, _score_position(config, tokenizer, input_ids)


def _score_position(config, tokenizer, input_ids: list[int]) -> int:
    """Where a sequence classifier reads its score: [CLS] (0) for an encoder, else the last non-pad token, the rule
    of transformers' `*ForSequenceClassification`."""
    if is_encoder(config, tokenizer):
        return 0
    pad = config.get_text_config().pad_token_id
    real = [i for i, t in enumerate(input_ids) if t != pad] if pad is not None else []
    return real[-1] if real else len(input_ids) - 1


def head_statistics(result: AttentionResult, positions: list[int]) -> dict[str, Any]:
    """Per head: entropy (nats, mean over query positions) and Spearman rho between the query row's weights over
    `positions` and |attribution| there; mean/max/min over heads; top-5 tokens of the best and worst head."""
    attn, imp = result.attentions, result.attribution.abs()
    entropy = attention_entropy(attn).mean(-1)  # (L, H)
    n_layers, n_heads = attn.shape[:2]
    rows = attn[:, :, result.query, positions]  # (L, H, N)
    heads = []
    for layer in range(n_layers):
        for head in range(n_heads):
            rho = spearman(rows[layer, head], imp[positions])
            heads.append({"layer": layer, "head": head, "entropy": float(entropy[layer, head]), "spearman": rho})
    defined = [h for h in heads if h["spearman"] is not None]

    def top(weights) -> list[dict[str, Any]]:
        order = sorted(range(len(positions)), key=lambda i: -float(weights[i]))[:TOP_K]
        return [
            {"position": positions[i], "token": result.tokens[positions[i]], "value": float(weights[i])} for i in order
        ]

    summary: dict[str, Any] = {
        "heads_defined": len(defined),
        "heads": len(heads),
        "compared_positions": positions,
        "top_attributed": top(imp[positions]),
    }
    if defined:
        best = max(defined, key=lambda h: h["spearman"])
        worst = min(defined, key=lambda h: h["spearman"])
        summary.update(
            spearman_mean=sum(h["spearman"] for h in defined) / len(defined),
            spearman_max=best["spearman"],
            spearman_min=worst["spearman"],
        )
        for name, h in (("best", best), ("worst", worst)):
            summary[name] = {**h, "top_attended": top(rows[h["layer"], h["head"]])}
    else:
        summary.update(spearman_mean=None, spearman_max=None, spearman_min=None, best=None, worst=None)
    return {"heads": heads, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------------
# Command


def default_output_dir(model: str) -> Path:
    """`runs/inspect/<model>`, its path's `/` written `--` (as the Hub cache names repos): one dir per model, and
    never inside a stage dir, which `align push` uploads whole."""
    name = "--".join(p for p in Path(model).as_posix().split("/") if p not in ("", ".", ".."))
    return Path("runs") / "inspect" / (name or "model")


def encode_input(
    tokenizer, config, *, kind: str, text: str | None, prompt: str | None, response: str | None, chat: bool
) -> tuple[list[int], str]:
    """(token ids, the text they spell). `text`: tokenized as is (with the tokenizer's special tokens, e.g. BOS).
    (prompt, response) to a reward model: `encode_for_reward`, the reward stage's format; to a causal LM with `chat`:
    the chat template's user turn and generation prompt, then the response (what PPO's policy reads)."""
    if text is not None:
        return tokenizer(text, verbose=False)["input_ids"], text
    if kind == "classifier":
        ids = encode_for_reward(tokenizer, prompt, response, pair=is_encoder(config, tokenizer))
        return ids, tokenizer.decode(ids)
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        rendered += response or ""
        return tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"], rendered
    joined = prompt + REWARD_SEPARATOR + response if response else prompt
    return tokenizer(joined, verbose=False)["input_ids"], joined


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise AlignError(f"align inspect attention: {message}. See `align inspect attention --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="align inspect attention",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="A stage output dir (pretrain/sft/ppo: a causal LM; reward: a reward model), a model dir or a Hub id.",
    )
    p.add_argument("--text", default=None, help="Text to read, tokenized as is (BOS added as the tokenizer does).")
    p.add_argument("--prompt", default=None, help="Prompt, formatted as the stages do (chat template).")
    p.add_argument("--response", default=None, help="Response after --prompt (a reward model needs one).")
    p.add_argument(
        "--chat",
        choices=["auto", "yes", "no"],
        default="auto",
        help="Causal LMs: wrap --prompt in the chat template; auto = as `align generate` decides.",
    )
    p.add_argument(
        "--target",
        default=None,
        help="Causal LM: the next token whose logit is attributed (default: the "
        "predicted one). Classifier with several labels: a label name or index.",
    )
    p.add_argument("--output_dir", default=None, help="Default: runs/inspect/<MODEL, '/' as '--'>.")
    p.add_argument(
        "--skip_special_tokens",
        action="store_true",
        help="Leave special tokens (BOS, chat markers, EOS) "
        "out of the correlation and top-5 lists; attention sinks on BOS often dominate them.",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="float32 by default: rows sum to 1 within 1e-6 and gradients keep their small values.",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ...; default: CUDA when available.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code (off by default).")
    return p


def _check_args(args) -> None:
    if args.text is not None and (args.prompt is not None or args.response is not None):
        raise AlignError("align inspect attention: give --text, or --prompt (and --response), not both.")
    if args.text is None and args.prompt is None:
        raise AlignError("align inspect attention: nothing to read. Pass --text TEXT or --prompt P [--response R].")
    if args.response is not None and args.prompt is None:
        raise AlignError("align inspect attention: --response needs --prompt.")


def load_config_and_tokenizer(model: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """(config, tokenizer, kind) of a stage dir, model dir or Hub id: all the checks need, before the weights load."""
    info = read_stage_info(model)
    config = load_pretrained(
        AutoConfig, model, what="a model config", revision=revision, trust_remote_code=trust_remote_code
    )
    kind = model_kind(config, info.get("stage") if info else None)
    tokenizer = load_tokenizer(model, revision=revision, trust_remote_code=trust_remote_code)
    return config, tokenizer, kind


def load_model(
    model: str,
    kind: str,
    *,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The model with eager attention: SDPA and flash attention never form the weights `output_attentions` returns."""
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "attn_implementation": "eager"}
    if kind == "causal_lm":
        net = load_causal_lm(model, dtype=torch_dtype, **common)
    else:
        net = load_pretrained(
            AutoModelForSequenceClassification, model, what="a reward model", dtype=torch_dtype, **common
        )
    return net.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load(
    model: str,
    *,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """(model with eager attention, tokenizer, config, kind)."""
    config, tokenizer, kind = load_config_and_tokenizer(model, revision=revision, trust_remote_code=trust_remote_code)
    net = load_model(model, kind, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code)
    return net, tokenizer, config, kind


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    config, tokenizer, kind = load_config_and_tokenizer(
        args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    if kind == "classifier" and args.prompt is not None and args.response is None:
        raise AlignError(f"{args.model}: a reward model scores a (prompt, response) pair; add --response R.")
    chat = kind == "causal_lm" and args.prompt is not None and use_chat(args.model, tokenizer, args.chat)
    if chat and not tokenizer.chat_template:
        raise AlignError(f"{args.model}: the tokenizer has no chat template. Use --chat no, or --text.")
    ids, text = encode_input(
        tokenizer, config, kind=kind, text=args.text, prompt=args.prompt, response=args.response, chat=chat
    )
    limit = max_positions(config)
    if limit is not None and len(ids) > limit:
        raise AlignError(
            f"{args.model}: the input is {len(ids)} tokens, more than the model's {limit} positions. Shorten the text."
        )
    model = load_model(
        args.model,
        kind,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    result = attention_and_attribution(model, tokenizer, ids, kind=kind, target=args.target, where=args.model)
    positions = list(range(len(ids))) if not result.causal else list(range(result.query + 1))
    if args.skip_special_tokens:
        special = set(tokenizer.all_special_ids)
        positions = [p for p in positions if ids[p] not in special]
    if len(positions) < 2:
        raise AlignError(
            f"{args.model}: {len(positions)} token(s) to compare; a rank correlation needs at least 2. "
            "Give a longer text (or drop --skip_special_tokens)."
        )
    stats = head_statistics(result, positions)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
    written = write_outputs(result, stats, output_dir, model=args.model, text=text)
    print(summary_text(result, stats, output_dir, n_png=len(written) - 3))
    return 0


def summary_text(result: AttentionResult, stats: dict[str, Any], output_dir: Path, n_png: int) -> str:
    """What the command prints: shape, target, the correlation, top-5 tokens of the best and worst head, files."""
    s = stats["summary"]
    n_layers, n_heads, length = result.attentions.shape[:3]

    def tokens(items) -> str:
        return ", ".join(f"{i['token']!r}@{i['position']} {i['value']:.3f}" for i in items)

    lines = [
        f"{n_layers} layers x {n_heads} heads, {length} tokens. {describe_target(result)}",
        "attribution: input x gradient of the target on the input embeddings, summed over the hidden dim; "
        "correlated as |value|.",
        *result.notes,
    ]
    if s["spearman_mean"] is None:
        lines.append("Spearman(attention, |attribution|): undefined for every head (constant weights or attribution).")
    else:
        lines.append(
            f"Spearman(attention from position {result.query}, |attribution|) over {len(s['compared_positions'])} "
            f"tokens: mean {s['spearman_mean']:+.3f}, max {s['spearman_max']:+.3f} "
            f"(layer {s['best']['layer']} head {s['best']['head']}), min {s['spearman_min']:+.3f} "
            f"(layer {s['worst']['layer']} head {s['worst']['head']}) [{s['heads_defined']}/{s['heads']} heads]"
        )
        lines.append(f"top-{TOP_K} attributed:          {tokens(s['top_attributed'])}")
        for name in ("best", "worst"):
            h = s[name]
            lines.append(
                f"top-{TOP_K} attended, {name:<5} head L{h['layer']}H{h['head']}: {tokens(h['top_attended'])}"
            )
    lines.append(f"wrote {output_dir}/: attention.json, attention.html, attention.safetensors, {n_png} layer PNG(s)")
    lines.append(CAVEAT)
    return "\n".join(lines)
