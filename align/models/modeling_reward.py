"""A reward model that also reads its own language model's likelihood of the response.

    reward = score(h_last) + sum_f w_f * f(log p(response tokens | prompt, earlier tokens))

`score(h_last)` is the usual scalar head on the last token (`*ForSequenceClassification`, InstructGPT's reward model).
The features `f` are the `mean` and/or `min` over the response's tokens (its EOS included) of their log-probabilities
under the model's own LM head; the weights `w_f` are learned with everything else by the ranking loss. The body starts
as the SFT model, so at the start the features are the SFT model's own judgement of the response: Codex ranked its
samples by mean token log-probability; here a trained head is added to it and both keep learning.

Why: a small reward model must learn from rankings alone to check an answer against the prompt (the right name from
a story, every entity an instruction asks for), while the SFT model it starts from already predicts that answer. On
the tiny world the SFT model's mean log-probability alone orders held-out `qa` pairs as the gold labeler does 94% of
the time where the scalar head reached 76%.

The response is found by the chat template's generation marker (`response_marker`: the token ids
`add_generation_prompt` appends), last occurrence; a sequence without it has features 0. The class registers with
`AutoConfig` / `AutoModelForSequenceClassification` when this module is imported (align imports it wherever it loads a
reward model): `AutoModelForSequenceClassification.from_pretrained(dir)` then loads it like any reward model, and
`to_sequence_classifier()` gives the plain head model (PPO's value model starts from it). Saved dirs also hold this
file, so `from_pretrained(dir, trust_remote_code=True)` loads them where align is not installed; this file therefore
imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

MODEL_TYPE = "align_likelihood_reward"
FEATURES = ("mean", "min")


def feature_error(features) -> str | None:
    """Why `features` is not a valid `likelihood_features` list, or None."""
    features = list(features or [])
    if not features or any(f not in FEATURES for f in features) or len(set(features)) != len(features):
        return f"likelihood_features {features}: list {' and/or '.join(FEATURES)}, each once"
    return None


class LikelihoodRewardConfig(PreTrainedConfig):
    """`text_config`: the language model's config; `likelihood_features`: a subset of FEATURES, in order;
    `response_marker`: token ids that end the prompt (the chat template's generation prompt); `likelihood_init`: the
    features' starting weight."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    likelihood_features: list[str] | None = None
    response_marker: list[int] | None = None
    likelihood_init: float = 1.0
    tie_word_embeddings: bool = False  # the LM head is the text model's own (tied: its input embeddings)


class LikelihoodRewardModel(PreTrainedModel):
    config_class = LikelihoodRewardConfig
    base_model_prefix = "model"  # the backbone, as in `*ForSequenceClassification` (PPO's value model reads it)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: LikelihoodRewardConfig):
        super().__init__(config)
        text = config.get_text_config()
        if error := feature_error(config.likelihood_features):
            raise ValueError(error)
        if not config.response_marker:
            raise ValueError("response_marker is empty: the token ids that end the prompt are needed")
        self.model = AutoModel.from_config(text)
        self.score = nn.Linear(text.hidden_size, 1, bias=False)
        self.lm_head = None if text.tie_word_embeddings else nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        n = len(config.likelihood_features)
        self.likelihood_weights = nn.Parameter(torch.full((n,), float(config.likelihood_init)))
        self.post_init()

    def _init_weights(self, module):
        # transformers' init functions skip tensors already loaded from a checkpoint
        if module is self.score or module is self.lm_head:
            init.normal_(module.weight, std=getattr(self.config.get_text_config(), "initializer_range", 0.02))
        elif module is self:
            init.constant_(self.likelihood_weights, float(self.config.likelihood_init))

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @classmethod
    def from_causal_lm(cls, lm, *, features, response_marker, likelihood_init: float = 1.0):
        """A reward model whose body (and LM head) are `lm`'s, with a new score head."""
        config = LikelihoodRewardConfig(
            text_config=lm.config.to_dict(),
            likelihood_features=list(features),
            response_marker=[int(i) for i in response_marker],
            likelihood_init=likelihood_init,
            num_labels=1,
        )
        model = cls(config).to(lm.dtype)
        model.model.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
        if model.lm_head is not None:
            model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
        return model

    def to_sequence_classifier(self):
        """The plain `*ForSequenceClassification` with this body and score head (no likelihood terms)."""
        text = self.config.get_text_config().to_dict()
        config = AutoConfig.for_model(**{**text, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}})
        plain = AutoModelForSequenceClassification.from_config(config).to(self.dtype)
        getattr(plain, plain.base_model_prefix).load_state_dict(self.model.state_dict())
        plain.score.load_state_dict(self.score.state_dict())
        return plain.to(self.device)

    def response_mask(self, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """`(B, T)` True at response tokens: after the last `response_marker`, up to the last real token."""
        marker = torch.tensor(self.config.response_marker, device=input_ids.device)
        m = marker.numel()
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        if length < m:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        hits = (input_ids.unfold(1, m, 1) == marker).all(-1)  # (B, T-m+1): the marker starts at i
        ends = torch.where(hits, positions[: length - m + 1] + m - 1, torch.full_like(hits, -1, dtype=torch.long))
        end = ends.max(1).values  # the last marker's last token; -1: none
        found = (end >= 0).unsqueeze(1)
        return found & (positions > end.unsqueeze(1)) & (positions <= last.unsqueeze(1))

    def features(self, input_ids: torch.Tensor, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """`(B, F)` likelihood features (float32) of each sequence's response; 0 where it has none."""
        if self.lm_head is None:
            logits = nn.functional.linear(hidden[:, :-1], self.model.get_input_embeddings().weight)
        else:
            logits = self.lm_head(hidden[:, :-1])
        logits = logits.float()
        targets = input_ids[:, 1:]
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        mask = self.response_mask(input_ids, last)[:, 1:]  # token t is predicted at position t - 1
        count = mask.sum(1)
        out = []
        for name in self.config.likelihood_features:
            if name == "mean":
                out.append((logp * mask).sum(1) / count.clamp(min=1))
            else:
                lowest = torch.where(mask, logp, torch.full_like(logp, torch.inf)).min(1).values
                out.append(torch.where(count > 0, lowest, torch.zeros_like(lowest)))
        return torch.stack(out, dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        if input_ids is None:
            raise ValueError("LikelihoodRewardModel needs input_ids (the features read the response's tokens)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **kwargs)  # fmt: skip
        hidden = out.last_hidden_state
        # The last real token, found as `*ForSequenceClassification` finds it (the last non-pad id).
        pad = self.config.get_text_config().pad_token_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if pad is None:
            last = torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        else:
            last = (positions * (input_ids != pad)).argmax(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        head = self.score(hidden[rows, last]).float()
        feats = self.features(input_ids, hidden, last)
        logits = head + (feats * self.likelihood_weights.float()).sum(-1, keepdim=True)
        return SequenceClassifierOutputWithPast(logits=logits)


AutoConfig.register(MODEL_TYPE, LikelihoodRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(LikelihoodRewardConfig, LikelihoodRewardModel, exist_ok=True)
# save_pretrained also copies this file next to the weights (config.json's auto_map names it): without align,
# `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` loads the model from there.
LikelihoodRewardConfig.register_for_auto_class()
LikelihoodRewardModel.register_for_auto_class("AutoModelForSequenceClassification")
