"""Untrained tiny llama stage dirs for the stage tests (tests/ is on sys.path): a policy saved as an "sft" stage, a
reward model saved as a "reward" stage, with one tokenizer. The stages must run here, not learn."""

from pathlib import Path

from align.io import write_stage_info


def tiny_policy(tok, sizes: dict):
    """A random llama causal LM over `tok`'s vocabulary, with align's generation defaults."""
    from align.models import modeling

    policy = modeling.new_causal_lm("llama", sizes, tok, max_length=128)
    modeling.set_generation_defaults(policy, tok)
    return policy


def tiny_reward_model(tok, sizes: dict, offset: float = 0.25):
    """A random llama reward model (one score) over `tok`'s vocabulary, with `align_reward_offset` set."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), num_labels=1, max_position_embeddings=128,
                                                    tie_word_embeddings=False, **sizes, **ids))  # fmt: skip
    rm.config.align_reward_offset = offset
    return rm


def save_stage(path: Path, model, tok, stage: str, *, parent=None, recipe=None, metrics=None, **extra) -> Path:
    """`model` and `tok` saved to `path` as a finished align `stage` (its align_stage.json last)."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, stage, parent=parent, recipe=recipe or {}, data=None, metrics=metrics or {}, **extra)
    return path
