"""What the RWKV language models of this package (and VisualRWKV around them) share: the recurrent cache's slots and
their accessors, token shift and padding, the cache checks, the backbone's input handling, one `PreTrainedModel` base
for the flags, and the generation glue.

Recurrent state lives in transformers' `DynamicCache(config=...)`, one `LinearAttentionLayer` per block (the config's
`layer_types`, see `RecurrentLayersMixin`). Its conv state `TIME_MIX_SHIFT` holds the last time-mix input, conv state
`CHANNEL_MIX_SHIFT` the last channel-mix input, and its recurrent state `WKV_STATE` the float32 WKV matrix
(B, H, N, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_recurrent_attention_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .decode_graph import decode_graph
from .loading import StrictLoadingMixin
from .ops import DecodeLinear
from .ops.loss import causal_lm_loss

# The slots of a block's cache layer. Updates of conv slot 0 count the positions the cache has seen
# (`cache.get_seq_length()`), which `generate` relies on to feed only the unseen part of a prompt.
TIME_MIX_SHIFT = 0
CHANNEL_MIX_SHIFT = 1
WKV_STATE = 0


def mask_padding(hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions, so that what earlier blocks left there feeds nothing (the time-mix also masks their key
    and decay: a padded step leaves the WKV state untouched)."""
    if padding_mask is None:
        return hidden_states
    return hidden_states * padding_mask[:, :, None].to(hidden_states.dtype)


def token_shift(
    hidden_states: torch.Tensor,
    cache: Cache | None,
    layer_idx: int,
    slot: int,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Returns x_{t-1} for every t (the cached last token, or zeros, before t = 0) and caches the new last token in conv
    slot `slot` (`TIME_MIX_SHIFT` or `CHANNEL_MIX_SHIFT`) of block `layer_idx`: a one-column "conv" state (B, C, 1).

    With a `padding_mask` ((B, T), 0 = padding) padding is skipped wherever it lies: x_{t-1} is the last real position
    before t (the cached last token, or zeros, if the row has none before t in this call), and the cache keeps the
    row's last real token (its previous value if the row has none in this call). So a row padded on the left, in the
    middle or on the right, or continuing a cache after padding, computes at its real positions and leaves in the
    cache exactly what it does alone.
    """
    if padding_mask is not None:
        return _token_shift_over_padding(hidden_states, cache, layer_idx, slot, padding_mask)
    if cache is None or not cache.has_previous_state(layer_idx, slot):
        if cache is not None:
            cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, slot, conv_kernel_size=1)
        return F.pad(hidden_states[:, :-1], (0, 0, 1, 0))
    # (B, C, 1 + T): the cached last token, then this call's positions; one copy, as the shift itself needs
    window = cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, slot, conv_kernel_size=1)
    return window[..., :-1].transpose(1, 2).to(hidden_states.dtype)


def _token_shift_over_padding(
    hidden_states: torch.Tensor, cache: Cache | None, layer_idx: int, slot: int, padding_mask: torch.Tensor
) -> torch.Tensor:
    """`token_shift` for a call holding padding: one running maximum over the real positions and one gather."""
    B, T, C = hidden_states.shape
    if cache is not None and cache.has_previous_state(layer_idx, slot):
        window = cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, slot, conv_kernel_size=1)
        window = window.transpose(1, 2).to(hidden_states.dtype)
    else:
        if cache is not None:  # marks the slot as seen and counts this call's positions, padding included
            cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, slot, conv_kernel_size=1)
        window = F.pad(hidden_states, (0, 0, 1, 0))
    # window[:, i] holds position i - 1 (i = 0: the cached last token or zeros). source[:, t] is the window index of
    # the last real position before t (0 if none), and its last column that of the row's last real position.
    real_index = torch.arange(1, T + 1, device=padding_mask.device) * padding_mask.bool()
    source = F.pad(real_index.cummax(dim=1).values, (1, 0))
    shifted = window.gather(1, source[:, :, None].expand(B, T + 1, C))
    if cache is not None:
        # the update above cached position T - 1, which may be padding: keep the last real token instead
        cache.get_conv_state(layer_idx, slot).copy_(shifted[:, -1:].transpose(1, 2))
    return shifted[:, :-1]


def previous_wkv_state(cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """Block `layer_idx`'s WKV state from the previous call, or None. Read it before this call's time-mix token shift,
    which marks the layer as having a previous state."""
    return None if cache is None else cache.get_recurrent_state(layer_idx, WKV_STATE)


def store_wkv_state(cache: Cache | None, layer_idx: int, state: torch.Tensor) -> None:
    if cache is not None:
        cache.update_recurrent_state(state, layer_idx, WKV_STATE)


def check_cache(cache: Cache, num_layers: int, batch_size: int) -> None:
    """Refuses a cache the blocks cannot continue from, with the reason, instead of failing inside a block."""
    layers = getattr(cache, "layers", None) or []
    if len(layers) != num_layers or not all(isinstance(layer, LinearAttentionLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(
            f"`cache` must hold one recurrent `LinearAttentionLayer` per block ({num_layers}), as "
            "`DynamicCache(config=model.config)` builds (or pass none: the model creates it); got a "
            f"{type(cache).__name__} with {len(layers)} layers {kinds}. A `DynamicCache()` without the config "
            "holds attention layers."
        )
    state = layers[0].conv_states[TIME_MIX_SHIFT]
    if state is not None and state.shape[0] != batch_size:
        rows = state.shape[0]
        raise ValueError(
            f"The cache holds {rows} rows, this call {batch_size}: a cache continues the rows it was filled with. "
            "Beam search and `num_return_sequences` run several rows per prompt; repeat the cache's rows to match "
            f"first: `cache.reorder_cache(torch.arange({rows}).repeat_interleave({max(batch_size // rows, 1)}))`."
        )
    if state is not None and state.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            "This cache was filled under `torch.inference_mode()`, and torch allows no in-place update of its tensors "
            "outside it: continue it under `torch.inference_mode()` too (`generate` alone runs under "
            "`torch.no_grad()`), or pass `copy.deepcopy(cache)`, whose tensors are ordinary ones."
        )
    if any(layer.record_past for layer in layers):
        raise ValueError(
            "Assisted / speculative decoding (`assistant_model`, `prompt_lookup_num_tokens`, ...) is not supported: "
            "RWKV is stateful, and its recurrent state cannot be rolled back to drop rejected draft tokens. "
            "Generate without it."
        )


def check_prompt_continues_cache(cache: Cache | None, next_sequence_length) -> None:
    """
    `generate` continues a cache with the prompt positions it has not seen (`next_sequence_length`, None when the
    prompt holds only new tokens): at least one must be left, or the cache has already been used past this prompt.
    """
    if cache is None or next_sequence_length is None or int(next_sequence_length) > 0:
        return
    seen = int(cache.get_seq_length())
    raise ValueError(
        f"The cache has already seen {seen} positions, but the prompt has {seen + int(next_sequence_length)}: "
        "`generate` feeds only the positions of the prompt the cache has not seen, so the prompt must be the whole "
        "sequence (what the cache has seen, then new tokens). `generate` and `forward` update a cache in place; to "
        "start several prompts from one cache, pass `copy.deepcopy(cache)` each time."
    )


def recurrent_backbone_inputs(
    model: PreTrainedModel,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.FloatTensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    use_cache: bool | None,
) -> tuple[torch.FloatTensor, Cache | None, torch.Tensor | None]:
    """
    An RWKV backbone's forward inputs, checked: (the input embeddings, the cache to read and update or None, the
    (batch, seq) padding mask of this call's positions or None when nothing is padded).

    `use_cache` defaults to `config.use_cache` in eval mode and to no cache in training (transformers'
    `merge_with_config_defaults` would build one in training too, held in the autograd graph for nothing); gradient
    checkpointing turns it off, as the replayed blocks would update the cache twice.
    """
    config = model.config
    use_cache = use_cache if use_cache is not None else (config.use_cache and not model.training)
    if model.gradient_checkpointing and model.training:
        use_cache = False
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    if inputs_embeds.shape[1] == 0:
        raise ValueError("The input sequence is empty: RWKV needs at least one token per call.")
    if not use_cache:
        cache = None
    elif cache is None:
        cache = DynamicCache(config=config)
    else:
        check_cache(cache, config.num_hidden_layers, inputs_embeds.shape[0])
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != inputs_embeds.shape[0]):
        raise ValueError(
            f"`attention_mask` must be (batch, seq) = {tuple(inputs_embeds.shape[:2])} (or cover the cached positions "
            f"too, (batch, past + seq)), got {tuple(attention_mask.shape)}."
        )
    padding_mask = create_recurrent_attention_mask(config, inputs_embeds, attention_mask, cache=cache)
    return inputs_embeds, cache, padding_mask


class RwkvPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """The flags every model of this package shares (RWKV language models and VisualRWKV)."""

    base_model_prefix = "model"
    # `loss_function` (transformers' property) returns this unless set otherwise: transformers' causal-LM loss
    # without a full log-softmax kept for the backward (ops/loss.py)
    _loss_function = staticmethod(causal_lm_loss)
    supports_gradient_checkpointing = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # transformers answers False for class names containing "rwkv" (its RWKV-4 keeps a state of its own). Ours
        # lives in `DynamicCache(config=...)` (`LinearAttentionLayer`s), which `generate` then builds itself.
        return True

    def get_compiled_call(self, compile_config):
        # generate() asks for this on its decode steps with a static cache on CUDA (cache_implementation="static"):
        # the one-token step as a CUDA graph (decode_graph.py) instead of torch.compile, which cannot trace the WKV ops
        return decode_graph(self)


class RecurrentGenerationMixin(GenerationMixin):
    """`generate` for a model whose cache is a recurrent state: a prompt continuing a cache must extend what the cache
    has seen (transformers' own `prepare_inputs_for_generation` does the rest: slicing the prompt to its unseen part,
    and dropping `pixel_values` after the prefill)."""

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        if is_first_iteration:
            check_prompt_continues_cache(cache, next_sequence_length)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


__all__ = [
    "CHANNEL_MIX_SHIFT",
    "TIME_MIX_SHIFT",
    "WKV_STATE",
    "RecurrentGenerationMixin",
    "RwkvPreTrainedModel",
    "check_cache",
    "mask_padding",
    "previous_wkv_state",
    "recurrent_backbone_inputs",
    "store_wkv_state",
    "token_shift",
]


class RwkvForCausalLM(RwkvPreTrainedModel, RecurrentGenerationMixin):
    """An RWKV language model (`model`, the family's `backbone_class`) with its untied language-modelling head: the
    head, its forward and the embedding accessors every family shares. A family's class derives from its own
    `PreTrainedModel` and this one, `class Rwkv6ForCausalLM(Rwkv6PreTrainedModel, RwkvForCausalLM)`."""

    backbone_class: type[nn.Module]
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = DecodeLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.model.embeddings = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """
        Args:
            labels: (batch, seq) next-token targets, shifted inside; -100 is ignored. Extra keyword arguments (such
                as Trainer's `num_items_in_batch`) reach `loss_function`.
            logits_to_keep: Compute logits for the last `n` positions only (0 = all), or for the given indices.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
