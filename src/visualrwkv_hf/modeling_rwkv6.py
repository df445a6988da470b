"""The RWKV-6 ("Finch", x060) language model: time-mix, channel-mix, blocks, text model and causal-LM head.

Recurrent state lives in transformers' `DynamicCache`, one `LinearAttentionLayer` per block: conv state 0 holds the
last time-mix input (the ln1 output), conv state 1 the last channel-mix input (the ln2 output), and recurrent
state 0 the float32 WKV matrix (B, H, N, N).
"""


from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_visualrwkv import VisualRWKVTextConfig
from .decode_graph import decode_graph
from .loading import StrictLoadingMixin
from .ops import WKV6
from .ops.loss import causal_lm_loss
from .ops.mixing import relu_squared, slot_lerp

# Slot order of the data-dependent token-shift LoRA (time_maa_w1 columns / time_maa_w2 rows), as in the original.
TIME_MIX_SLOTS = ("w", "k", "v", "r", "g")


def mask_padding(hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions so they feed nothing into a token shift or the WKV state."""
    if padding_mask is None:
        return hidden_states
    return hidden_states * padding_mask[:, :, None].to(hidden_states.dtype)


def token_shift(
    hidden_states: torch.Tensor, cache: Cache | None, layer_idx: int, state_idx: int
) -> torch.Tensor:
    """
    Returns x_{t-1} for every t (the cached last token, or zeros, before t = 0) and caches the new last token.

    Every position goes through the cache layer's `update_conv_state`, which keeps the last one (a one-column "conv"
    state (B, C, 1)) and, for state 0, counts them: `cache.get_seq_length()` is then the number of positions the
    cache has seen (padding included), which `generate` relies on to feed only the unseen part of a prompt.
    """
    if cache is None or not cache.has_previous_state(layer_idx, state_idx):
        if cache is not None:
            cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, state_idx, conv_kernel_size=1)
        return F.pad(hidden_states[:, :-1], (0, 0, 1, 0))
    # (B, C, 1 + T): the cached last token, then this call's positions; one copy, as the shift itself needs
    window = cache.update_conv_state(hidden_states.transpose(1, 2), layer_idx, state_idx, conv_kernel_size=1)
    return window[..., :-1].transpose(1, 2).to(hidden_states.dtype)


class VisualRWKVTimeMix(nn.Module):
    """RWKV-6 time mixing: data-dependent token shift and decay, the WKV6 recurrence, per-head GroupNorm, gate."""

    def __init__(self, config: VisualRWKVTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.chunk_size = config.wkv_chunk_size
        C, R, D = config.hidden_size, config.time_mix_extra_dim, config.time_decay_extra_dim
        self.time_maa_x = nn.Parameter(torch.empty(C))
        self.time_maa_w = nn.Parameter(torch.empty(C))
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_v = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.time_maa_g = nn.Parameter(torch.empty(C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, len(TIME_MIX_SLOTS) * R))
        self.time_maa_w2 = nn.Parameter(torch.empty(len(TIME_MIX_SLOTS), R, C))
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, D))
        self.time_decay_w2 = nn.Parameter(torch.empty(D, C))
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.att_receptance = nn.Linear(C, C, bias=False)
        self.att_key = nn.Linear(C, C, bias=False)
        self.att_value = nn.Linear(C, C, bias=False)
        self.att_gate = nn.Linear(C, C, bias=False)
        self.att_output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, C, eps=config.group_norm_epsilon)
        # stateless: the compiled kernel where one builds, else the torch op; `kernels.kernelize` can swap it
        self.wkv = WKV6()

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        output_scale: float = 1.0,
    ) -> torch.Tensor:
        """`output_scale`: a power of two the output is scaled by (the float16 guard, see `VisualRWKVBlock`)."""
        B, T, C = hidden_states.shape
        H, N = self.num_heads, self.head_size
        layer = cache.layers[self.layer_idx] if cache is not None else None
        # Read the WKV state before token_shift marks this layer as having a previous state.
        initial_state = None
        if layer is not None and layer.is_recurrent_states_initialized[0] and cache.has_previous_state(self.layer_idx, 0):
            initial_state = layer.recurrent_states[0]

        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, 0) - x
        slots = len(TIME_MIX_SLOTS)
        lora = torch.tanh(torch.addcmul(x, dx, self.time_maa_x) @ self.time_maa_w1)
        # All five slots at once (few large ops rather than many small ones: the decode step is overhead-bound):
        # one batched matmul gives every slot's weight maa_s + m_s (the add fused into the product), one
        # elementwise pass x_s = x + dx * (maa_s + m_s).
        maa = torch.stack([self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g])
        lora = lora.view(B * T, slots, -1).transpose(0, 1)
        weights = torch.baddbmm(maa.unsqueeze(1), lora, self.time_maa_w2).view(slots, B, T, C)
        x_w, x_k, x_v, x_r, x_g = slot_lerp(x, dx, weights, overwrite_weights=True)

        r = self.att_receptance(x_r)
        k = self.att_key(x_k)
        v = self.att_value(x_v)
        g = F.silu(self.att_gate(x_g))
        decay_lora = torch.tanh(x_w.reshape(B * T, C) @ self.time_decay_w1)
        w = torch.addmm(self.time_decay, decay_lora, self.time_decay_w2).view(B, T, C)
        if padding_mask is not None:
            # A padded step must leave the state untouched: k is already 0 there, and decay exp(-exp(-inf)) = 1.
            w = w.masked_fill(~padding_mask.bool()[:, :, None], float("-inf"))

        y, state = self.wkv(
            r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w.view(B, T, H, N),
            self.time_faaaa, initial_state, self.chunk_size,
        )
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx, 0)
        # y stays float32 through the GroupNorm: rounding it first costs far more than the recurrence's own error.
        # The output scale rides on its affine parameters: scaling by a power of two is exact, so this equals
        # scaling the output projection's weight (BlinkDL's way) at no extra pass over y.
        weight, bias = self.ln_x.weight.float(), self.ln_x.bias.float()
        if output_scale != 1.0:
            weight, bias = weight * output_scale, bias * output_scale
        y = F.group_norm(y.reshape(B * T, C), H, weight, bias, self.ln_x.eps).view(B, T, C)
        return self.att_output(y.to(g.dtype) * g)


class VisualRWKVChannelMix(nn.Module):
    """RWKV-6 channel mixing: token shift, squared-ReLU feed-forward, sigmoid receptance gate."""

    def __init__(self, config: VisualRWKVTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, F_ = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.ffn_key = nn.Linear(C, F_, bias=False)
        self.ffn_receptance = nn.Linear(C, C, bias=False)
        self.ffn_value = nn.Linear(F_, C, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        output_scale: float = 1.0,
    ) -> torch.Tensor:
        """`output_scale`: a power of two the output is scaled by (the float16 guard, see `VisualRWKVBlock`)."""
        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, 1) - x
        k = relu_squared(self.ffn_key(torch.addcmul(x, dx, self.time_maa_k)))
        if output_scale != 1.0:
            k = k * output_scale  # before the value projection, whose own output may be past the float16 range
        return torch.sigmoid(self.ffn_receptance(torch.addcmul(x, dx, self.time_maa_r))) * self.ffn_value(k)


class VisualRWKVBlock(GradientCheckpointingLayer):
    def __init__(self, config: VisualRWKVTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.layer_norm_epsilon
        # Block 0 normalises the embeddings first (the original's ln0).
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=eps) if layer_idx == 0 else None
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = VisualRWKVTimeMix(config, layer_idx)
        self.feed_forward = VisualRWKVChannelMix(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        rescale_every: int = 0,
    ) -> torch.Tensor:
        """
        `rescale_every` > 0: the float16 overflow guard (`VisualRWKVTextConfig.rescale_every`). The residual stream
        arrives at scale 2^-k, k = layer_idx // rescale_every; both mixers' outputs are scaled to match, and the
        stream is halved after every `rescale_every`-th block. The mixers see it through LayerNorms, which undo the
        scale, so the cached token-shift and WKV states are those of the unscaled model.
        """
        scale = 0.5 ** (self.layer_idx // rescale_every) if rescale_every else 1.0
        if self.pre_norm is not None:
            hidden_states = self.pre_norm(hidden_states)
        hidden_states = hidden_states + self.attention(self.attn_norm(hidden_states), cache, padding_mask, scale)
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states), cache, padding_mask, scale)
        if rescale_every and (self.layer_idx + 1) % rescale_every == 0:
            hidden_states = hidden_states * 0.5
        return hidden_states


def fp16_rescale_every(config: VisualRWKVTextConfig, hidden_states: torch.Tensor, training: bool) -> int:
    """The float16 guard's period for a forward pass: `config.rescale_every` in float16 inference, else 0 (off)."""
    if training or not config.rescale_every:
        return 0
    device_type = hidden_states.device.type
    float16 = hidden_states.dtype == torch.float16 or (
        torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    )
    return config.rescale_every if float16 else 0


def run_block_in_order(
    block: VisualRWKVBlock,
    hidden_states: torch.Tensor,
    cache: Cache | None,
    padding_mask: torch.Tensor | None,
    gather_index: torch.LongTensor | None,
    rescale_every: int = 0,
) -> torch.Tensor:
    """
    Runs `block` reading the positions in the order `gather_index` (a (batch, seq) permutation: step t reads position
    `gather_index[b, t]`; None: as they are), so its token shifts and recurrence follow that order, and returns each
    output at its original position. `rescale_every`: the float16 guard's period (see `VisualRWKVBlock.forward`).
    """
    if gather_index is None:
        return block(hidden_states, cache, padding_mask, rescale_every)
    index = gather_index[:, :, None].expand_as(hidden_states)
    if padding_mask is not None:
        padding_mask = padding_mask.gather(1, gather_index)
    outputs = block(hidden_states.gather(1, index), cache, padding_mask, rescale_every)
    return torch.empty_like(outputs).scatter_(1, index, outputs)


def positions_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions the head is applied to: the last `n` (0 = all) or the given indices (generate asks for 1)."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep]


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
    state = layers[0].conv_states[0]
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


@dataclass
class VisualRWKVTextModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: Output of the final LayerNorm, (batch, seq, hidden).
        cache: Recurrent state after the last position; pass it back with the next tokens to continue.
        hidden_states: With `output_hidden_states`, the embeddings and every block's output. Under the float16 guard
            (`config.rescale_every`) block `i`'s output is returned as it flows, divided by
            2^((i + 1) // rescale_every).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VisualRWKVCausalLMOutput(ModelOutput):
    """
    Args:
        loss: Next-token cross-entropy, when `labels` are given.
        logits: Head outputs, (batch, seq, vocab), float32.
        cache: Recurrent state after the last position.
        hidden_states: With `output_hidden_states`, the embeddings and every block's output (under the float16
            guard, scaled as in `VisualRWKVTextModelOutput`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class VisualRWKVTextPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config: VisualRWKVTextConfig
    base_model_prefix = "model"
    # `loss_function` (transformers' property) returns this unless set otherwise: transformers' causal-LM loss
    # without a full log-softmax kept for the backward (ops/loss.py)
    _loss_function = staticmethod(causal_lm_loss)
    _no_split_modules = ["VisualRWKVBlock"]
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

    @torch.no_grad()
    def _init_weights(self, module):
        """The original RWKV-6 initialisation for the mixing and decay parameters (layer-depth dependent)."""
        super()._init_weights(module)
        config = self.config.get_text_config()
        if isinstance(module, (VisualRWKVTimeMix, VisualRWKVChannelMix)):
            n_layer = config.num_hidden_layers
            ratio_0_to_1 = module.layer_idx / max(n_layer - 1, 1)
            ratio_1_to_almost_0 = 1.0 - module.layer_idx / n_layer
            C = config.hidden_size
            ddd = torch.arange(C, dtype=torch.float32) / C
            shift_mix = 1.0 - ddd.pow(ratio_1_to_almost_0)
            receptance_mix = 1.0 - ddd.pow(0.5 * ratio_1_to_almost_0)
        if isinstance(module, VisualRWKVTimeMix):
            for param in (module.time_maa_x, module.time_maa_w, module.time_maa_k):
                init.copy_(param, shift_mix)
            init.copy_(module.time_maa_v, shift_mix - 0.3 * ratio_0_to_1)
            init.copy_(module.time_maa_r, receptance_mix)
            init.copy_(module.time_maa_g, receptance_mix)
            init.uniform_(module.time_maa_w1, -1e-4, 1e-4)
            init.uniform_(module.time_maa_w2, -1e-2, 1e-2)
            n = torch.arange(C, dtype=torch.float32)
            init.copy_(module.time_decay, -6.0 + 5.0 * (n / max(C - 1, 1)).pow(0.7 + 1.3 * ratio_0_to_1))
            init.uniform_(module.time_decay_w1, -1e-4, 1e-4)
            init.uniform_(module.time_decay_w2, -1e-2, 1e-2)
            bonus = ratio_0_to_1 * (1.0 - n / max(C - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
            init.copy_(module.time_faaaa, bonus.view(module.num_heads, module.head_size))
            init.ones_(module.ln_x.weight)
            init.zeros_(module.ln_x.bias)
        elif isinstance(module, VisualRWKVChannelMix):
            init.copy_(module.time_maa_k, shift_mix)
            init.copy_(module.time_maa_r, shift_mix)


class VisualRWKVTextModel(VisualRWKVTextPreTrainedModel):
    """The RWKV-6 backbone: embedding, blocks, final LayerNorm."""

    def __init__(self, config: VisualRWKVTextConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(VisualRWKVBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        block_gather_indices: Sequence[torch.LongTensor | None] | None = None,
        **kwargs,
    ) -> tuple | VisualRWKVTextModelOutput:
        """
        Args:
            attention_mask: (batch, seq) with 1 for real tokens and 0 for padding; padded positions leave every token
                shift and WKV state untouched, so a left-padded row computes exactly what it computes alone. May
                also cover cached positions (batch, past + seq): only its last `seq` columns are used.
            cache: Recurrent state from a previous call (updated in place); created when `use_cache` and none is
                given. `past_key_values=` and `cache_params=` are accepted as deprecated names for it, as in
                transformers' models.
            block_gather_indices: Per block, the order in which it reads the positions (see `run_block_in_order`),
                or None to read them as they are. VisualRWKV uses it for image scanning.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError("The input sequence is empty: RWKV needs at least one token per call.")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if cache is not None:
            check_cache(cache, len(self.blocks), inputs_embeds.shape[0])

        padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != inputs_embeds.shape[0]:
                raise ValueError(
                    f"`attention_mask` must be (batch, seq) = {tuple(inputs_embeds.shape[:2])}, got {tuple(attention_mask.shape)}."
                )
            padding_mask = attention_mask[:, -inputs_embeds.shape[1] :]
            if bool(padding_mask.all()):
                padding_mask = None  # nothing padded: skip the masking work

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        gather_indices = block_gather_indices if block_gather_indices is not None else [None] * len(self.blocks)
        rescale_every = fp16_rescale_every(self.config, hidden_states, self.training)
        for block, gather_index in zip(self.blocks, gather_indices, strict=True):
            hidden_states = run_block_in_order(
                block, hidden_states, cache, padding_mask, gather_index, rescale_every
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_out(hidden_states)

        output = VisualRWKVTextModelOutput(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states
        )
        return output if return_dict else output.to_tuple()


class VisualRWKVForCausalLM(VisualRWKVTextPreTrainedModel, GenerationMixin):
    """RWKV-6 with its (untied) language-modelling head."""

    _tied_weights_keys = {}

    def __init__(self, config: VisualRWKVTextConfig):
        super().__init__(config)
        self.model = VisualRWKVTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.model.embeddings = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration:
            check_prompt_continues_cache(kwargs.get("cache"), kwargs.get("next_sequence_length"))
        # After the prefill every row feeds one real token: the mask carries no more information.
        elif model_inputs.get("cache") is not None:
            model_inputs["attention_mask"] = None
        return model_inputs

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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | VisualRWKVCausalLMOutput:
        """
        Args:
            labels: (batch, seq) next-token targets, shifted inside; -100 is ignored. Extra keyword arguments (such
                as Trainer's `num_items_in_batch`) reach `loss_function`.
            logits_to_keep: Compute logits for the last `n` positions only (0 = all), or for the given indices.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(positions_to_keep(outputs.last_hidden_state, logits_to_keep)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = VisualRWKVCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "VisualRWKVBlock",
    "VisualRWKVChannelMix",
    "VisualRWKVForCausalLM",
    "VisualRWKVTextModel",
    "VisualRWKVTextPreTrainedModel",
    "VisualRWKVTimeMix",
]
