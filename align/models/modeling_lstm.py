"""An LSTM language model: the recurrent baseline the Transformer replaced (issue 18), trained by `align pretrain`.

    embedding -> stacked nn.LSTM (dropout between layers) -> LayerNorm -> output projection tied to the embedding

An LSTM reads a text one token at a time and keeps everything it knows about the past in a fixed-size memory cell
`c` (written through input gates, kept through forget gates) and its output `h`. Two costs follow, the ones the
lecture holds against RNNs: the steps of a sequence run one after another (a Transformer computes all positions at
once), and a fact read 40 tokens ago must survive 40 gated updates of the cell to be used (attention looks it up
directly). `align.inspect.copy_probe.copy_loss_by_distance` measures the second on tiny-world copies.

Generation carries the state `(h, c)` as the cache, as Mamba and RWKV carry theirs: after the prompt each step feeds
only the new token. A padded prompt is read as if it were alone: its real tokens are packed
(`pack_padded_sequence`), so pads never enter the state, whether they are on the left (generation) or the right.

The classes register with `AutoConfig` / `AutoModelForCausalLM` when this module is imported, and saved dirs hold
this file (config.json's `auto_map`), so `from_pretrained(dir, trust_remote_code=True)` loads them without align;
this file therefore imports only torch and transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "align_lstm"
# The output field that holds the cache: `cache` since transformers 5.x renamed it, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LSTMLMConfig(PreTrainedConfig):
    """`hidden_size`: the embedding, cell and output width (one width: the output projection is the embedding);
    `num_hidden_layers`: stacked LSTM layers; `dropout`: between LSTM layers (nn.LSTM's `dropout`)."""

    model_type = MODEL_TYPE

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def lstm_parameters(hidden_size: int, vocab_size: int, layers: int) -> int:
    """Parameters of an `LSTMForCausalLM` with tied embeddings: embedding `V*H`, per layer `4H*(H + H)` weights and
    two `4H` biases (nn.LSTM keeps b_ih and b_hh), the final LayerNorm `2H`."""
    h = hidden_size
    return vocab_size * h + layers * (8 * h * h + 8 * h) + 2 * h


def lstm_sizes_for(params: int, vocab_size: int, layers: int = 2) -> dict[str, int]:
    """`model_config` sizes of an LSTM with about `params` parameters (a Transformer's count, to compare at the same
    budget): the `hidden_size` whose `lstm_parameters` is closest, from the positive root of
    `8L*H^2 + (V + 8L + 2)*H - params = 0`."""
    if params <= 0 or vocab_size <= 0 or layers <= 0:
        raise ValueError(f"lstm_sizes_for: params {params}, vocab_size {vocab_size}, layers {layers}: all must be > 0")
    a, b = 8 * layers, vocab_size + 8 * layers + 2
    root = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    best = min({max(1, math.floor(root)), max(1, math.ceil(root))},
               key=lambda h: abs(lstm_parameters(h, vocab_size, layers) - params))  # fmt: skip
    return {"hidden_size": best, "num_hidden_layers": layers}


class LSTMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LSTMLMConfig
    base_model_prefix = "model"  # no separate body module: `base_model` is the model itself
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    _is_stateful = True  # the state cannot be rewound: generate() refuses assisted decoding
    _supports_cache_class = False  # the cache is the LSTM's (h, c), not a transformers Cache

    def __init__(self, config: LSTMLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lstm = nn.LSTM(
            config.hidden_size,
            config.hidden_size,
            num_layers=config.num_hidden_layers,
            dropout=config.dropout if config.num_hidden_layers > 1 else 0.0,  # nn.LSTM warns on 1 layer
            batch_first=True,
        )
        # A final norm, as GPT-2's ln_f and Llama's norm: `h = o * tanh(c)` lies in (-1, 1), so with tied weights the
        # logits' scale could only grow through the embedding norms, which are also the LSTM's input; the norm's gain
        # sets the output scale on its own. It also keeps the comparison with the Transformer to the mixer alone.
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: forward returns its own state

    def _init_weights(self, module):
        super()._init_weights(module)  # embedding N(0, 0.02), LSTM xavier weights and zero biases, norm (1, 0)
        if isinstance(module, nn.LSTM):
            h = module.hidden_size
            for name, bias in module.named_parameters():
                # Forget-gate bias 1 (Jozefowicz et al. 2015, https://proceedings.mlr.press/v37/jozefowicz15.pdf):
                # the cell starts by keeping its memory, not halving it each step. Gate order in nn.LSTM: i, f, g, o.
                # A slice loses transformers' "loaded from a checkpoint" flag, so it is checked here, as transformers
                # checks it for an embedding's padding row.
                if name.startswith("bias_ih") and not getattr(bias, "_is_hf_initialized", False):
                    with torch.no_grad():
                        bias[h : 2 * h].fill_(1.0)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _run_lstm(self, x: torch.Tensor, mask: torch.Tensor | None, state):
        """LSTM over `x` `(B, T, H)` from `state`; `mask` `(B, T)` True at real tokens, one contiguous span per row.
        Returns outputs `(B, T, H)` (zeros at pads) and the state `(h, c)`, each `(L, B, H)`, after each row's last
        real token."""
        if mask is None or bool(mask.all()):
            return self.lstm(x, state)
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device)
        lengths = mask.sum(1)  # (B,)
        start = torch.where(lengths > 0, mask.int().argmax(1), 0)  # first real token of each row
        inside = (positions >= start[:, None]) & (positions < (start + lengths)[:, None])
        if not bool((inside == mask).all()):
            raise ValueError("LSTMForCausalLM: attention_mask must mark one contiguous span per row (left or right "
                             "padding); pads between real tokens cannot be skipped by a recurrence")  # fmt: skip
        # Shift each row so its real tokens start at 0, pack them, and shift the outputs back.
        gather = ((positions[None, :] + start[:, None]) % t)[..., None].expand_as(x)  # (B, T, H)
        packed = nn.utils.rnn.pack_padded_sequence(
            x.gather(1, gather), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, state = self.lstm(packed, state)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)  # (B, T, H)
        back = ((positions[None, :] - start[:, None]) % t)[..., None].expand_as(out)
        return out.gather(1, back), state

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Next-token logits `(B, T, V)` of `input_ids` `(B, T)` read after the state `cache` (`past_key_values`, its
        older name): `(h, c)`, each `(num_hidden_layers, B, hidden_size)`. With `labels` `(B, T)` the loss is the mean
        cross-entropy of token t+1 at position t (labels shifted inside, -100 ignored), as in HF causal LMs."""
        if input_ids is None:
            raise ValueError("LSTMForCausalLM needs input_ids")
        state = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        t = input_ids.shape[1]
        # The mask's last T columns: in generation it covers the prompt and every token fed so far.
        mask = attention_mask[:, -t:].bool() if attention_mask is not None else None

        x = self.embed_tokens(input_ids)  # (B, T, H)
        out, state = self._run_lstm(x, mask, state)  # (B, T, H); (h, c) each (L, B, H)
        logits = self.lm_head(self.norm(out))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: tuple(state) if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        state = kwargs.get("cache", kwargs.get("past_key_values"))
        if state is not None:
            input_ids = input_ids[:, -1:]  # the state holds every earlier token: feed only the new one
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": state, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs["cache"] = outputs.get(CACHE_FIELD)  # every transformers 5.x keeps it under our key
        model_kwargs.pop("past_key_values", None)
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: the state of the beams kept, in their new order (the batch is dim 1 of `(L, B, H)`); None
        with `use_cache=False` (transformers calls this whenever the `cache` key exists, even holding None)."""
        if cache is None:
            return None
        return tuple(s.index_select(1, beam_idx.to(s.device)) for s in cache)


AutoConfig.register(MODEL_TYPE, LSTMLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LSTMLMConfig, LSTMForCausalLM, exist_ok=True)
# save_pretrained also copies this file next to the weights (config.json's auto_map names it): without align,
# `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the model from there.
LSTMLMConfig.register_for_auto_class()
LSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
