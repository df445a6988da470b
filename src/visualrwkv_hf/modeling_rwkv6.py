"""The RWKV-6 ("Finch", x060) language model: time-mix, channel-mix, blocks, backbone and causal-LM head.

The recurrent state (two token shifts and the WKV matrix per block) lives in transformers' `DynamicCache`, read and
written through `modeling_rwkv_common`'s accessors.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .configuration_rwkv6 import Rwkv6Config
from .modeling_rwkv_common import (
    CHANNEL_MIX_SHIFT,
    TIME_MIX_SHIFT,
    RwkvForCausalLM,
    RwkvPreTrainedModel,
    mask_padding,
    previous_wkv_state,
    recurrent_backbone_inputs,
    store_wkv_state,
    token_shift,
)
from .ops import DecodeLinear, WKV6
from .ops.mixing import relu_squared, slot_lerp
from .scanning import run_block_in_order

# Slot order of the data-dependent token-shift LoRA (time_maa_w1 columns / time_maa_w2 rows), as in the original.
TIME_MIX_SLOTS = ("w", "k", "v", "r", "g")


class Rwkv6TimeMix(nn.Module):
    """RWKV-6 time mixing: data-dependent token shift and decay, the WKV6 recurrence, per-head GroupNorm, gate."""

    def __init__(self, config: Rwkv6Config, layer_idx: int):
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
        self.att_receptance = DecodeLinear(C, C, bias=False)
        self.att_key = DecodeLinear(C, C, bias=False)
        self.att_value = DecodeLinear(C, C, bias=False)
        self.att_gate = DecodeLinear(C, C, bias=False)
        self.att_output = DecodeLinear(C, C, bias=False)
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
        """`output_scale`: a power of two the output is scaled by (the float16 guard, see `Rwkv6Block`)."""
        B, T, C = hidden_states.shape
        H, N = self.num_heads, self.head_size
        initial_state = previous_wkv_state(cache, self.layer_idx)  # before the token shift marks the layer as seen
        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, TIME_MIX_SHIFT, padding_mask) - x
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
            # A padded step must leave the state untouched: no key, and decay exp(-exp(-inf)) = 1. (Its input is
            # zero, but its token shift is the last real token, so its key is not.)
            pad = ~padding_mask.bool()[:, :, None]
            k, w = k.masked_fill(pad, 0), w.masked_fill(pad, float("-inf"))

        y, state = self.wkv(
            r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w.view(B, T, H, N),
            self.time_faaaa, initial_state, self.chunk_size,
        )
        store_wkv_state(cache, self.layer_idx, state)
        # y stays float32 through the GroupNorm: rounding it first costs far more than the recurrence's own error.
        # The output scale rides on its affine parameters: scaling by a power of two is exact, so this equals
        # scaling the output projection's weight (BlinkDL's way) at no extra pass over y.
        weight, bias = self.ln_x.weight.float(), self.ln_x.bias.float()
        if output_scale != 1.0:
            weight, bias = weight * output_scale, bias * output_scale
        y = F.group_norm(y.reshape(B * T, C), H, weight, bias, self.ln_x.eps).view(B, T, C)
        return self.att_output(y.to(g.dtype) * g)


class Rwkv6ChannelMix(nn.Module):
    """RWKV-6 channel mixing: token shift, squared-ReLU feed-forward, sigmoid receptance gate."""

    def __init__(self, config: Rwkv6Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, F_ = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.ffn_key = DecodeLinear(C, F_, bias=False)
        self.ffn_receptance = DecodeLinear(C, C, bias=False)
        self.ffn_value = DecodeLinear(F_, C, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        output_scale: float = 1.0,
    ) -> torch.Tensor:
        """`output_scale`: a power of two the output is scaled by (the float16 guard, see `Rwkv6Block`)."""
        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, CHANNEL_MIX_SHIFT, padding_mask) - x
        k = relu_squared(self.ffn_key(torch.addcmul(x, dx, self.time_maa_k)))
        if output_scale != 1.0:
            k = k * output_scale  # before the value projection, whose own output may be past the float16 range
        return torch.sigmoid(self.ffn_receptance(torch.addcmul(x, dx, self.time_maa_r))) * self.ffn_value(k)


class Rwkv6Block(GradientCheckpointingLayer):
    def __init__(self, config: Rwkv6Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.layer_norm_epsilon
        # Block 0 normalises the embeddings first (the original's ln0).
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=eps) if layer_idx == 0 else None
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = Rwkv6TimeMix(config, layer_idx)
        self.feed_forward = Rwkv6ChannelMix(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        rescale_every: int = 0,
        gather_index: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        `gather_index`: the order in which this block reads the positions (VisualRWKV's image scanning, see
        `scanning.run_block_in_order`); the output is returned in the original order either way.

        `rescale_every` > 0: the float16 overflow guard (`Rwkv6Config.rescale_every`). The residual stream arrives at
        scale 2^-k, k = layer_idx // rescale_every; both mixers' outputs are scaled to match, and the stream is halved
        after every `rescale_every`-th block. The mixers see it through LayerNorms, which undo the scale, so the
        cached token-shift and WKV states are those of the unscaled model.
        """
        return run_block_in_order(self.step, hidden_states, padding_mask, gather_index, cache, rescale_every)

    def step(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None, cache: Cache | None, rescale_every: int
    ) -> torch.Tensor:
        """The block on positions in the order it reads them."""
        scale = 0.5 ** (self.layer_idx // rescale_every) if rescale_every else 1.0
        if self.pre_norm is not None:
            hidden_states = self.pre_norm(hidden_states)
        hidden_states = hidden_states + self.attention(self.attn_norm(hidden_states), cache, padding_mask, scale)
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states), cache, padding_mask, scale)
        if rescale_every and (self.layer_idx + 1) % rescale_every == 0:
            hidden_states = hidden_states * 0.5
        return hidden_states


def fp16_rescale_every(config: Rwkv6Config, hidden_states: torch.Tensor, training: bool) -> int:
    """The float16 guard's period for a forward pass: `config.rescale_every` in float16 inference, else 0 (off)."""
    if training or not config.rescale_every:
        return 0
    device_type = hidden_states.device.type
    float16 = hidden_states.dtype == torch.float16 or (
        torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    )
    return config.rescale_every if float16 else 0


class Rwkv6PreTrainedModel(RwkvPreTrainedModel):
    config: Rwkv6Config
    _no_split_modules = ["Rwkv6Block"]
    # `output_hidden_states=True` returns the embeddings, then every block's output (in position order); under the
    # float16 guard (`Rwkv6Config.rescale_every`) block `i`'s as it flows, divided by 2^((i + 1) // rescale_every).
    _can_record_outputs = {"hidden_states": Rwkv6Block}

    @torch.no_grad()
    def _init_weights(self, module):
        """The original RWKV-6 initialisation for the mixing and decay parameters (layer-depth dependent)."""
        super()._init_weights(module)
        config = self.config.get_text_config()
        if isinstance(module, (Rwkv6TimeMix, Rwkv6ChannelMix)):
            n_layer = config.num_hidden_layers
            ratio_0_to_1 = module.layer_idx / max(n_layer - 1, 1)
            ratio_1_to_almost_0 = 1.0 - module.layer_idx / n_layer
            C = config.hidden_size
            ddd = torch.arange(C, dtype=torch.float32) / C
            shift_mix = 1.0 - ddd.pow(ratio_1_to_almost_0)
            receptance_mix = 1.0 - ddd.pow(0.5 * ratio_1_to_almost_0)
        if isinstance(module, Rwkv6TimeMix):
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
        elif isinstance(module, Rwkv6ChannelMix):
            init.copy_(module.time_maa_k, shift_mix)
            init.copy_(module.time_maa_r, shift_mix)


class Rwkv6Model(Rwkv6PreTrainedModel):
    """The RWKV-6 backbone: embedding, blocks, final LayerNorm."""

    def __init__(self, config: Rwkv6Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Rwkv6Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    # The last hidden state stays the last block's output (before `norm_out`), at the guard's scale like the others.
    @capture_outputs(tie_last_hidden_states=False)
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        block_gather_indices: list[torch.LongTensor | None] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            attention_mask: (batch, seq) with 1 for real tokens and 0 for padding; padded positions leave every token
                shift and WKV state untouched wherever they lie (left, middle, right, or between a cache and new
                tokens), so each row computes at its real positions exactly what it computes alone. May also cover
                cached positions (batch, past + seq): only its last `seq` columns are used.
            cache: Recurrent state from a previous call (updated in place); created when `use_cache` and none is
                given. `past_key_values=` and `cache_params=` are accepted as deprecated names for it, as in
                transformers' models.
            block_gather_indices: Per block, the order in which it reads the positions (see
                `scanning.run_block_in_order`), or None to read them as they are. VisualRWKV uses it for image
                scanning.
        """
        inputs_embeds, cache, padding_mask = recurrent_backbone_inputs(
            self, input_ids, inputs_embeds, attention_mask, cache, use_cache
        )
        hidden_states = inputs_embeds
        gather_indices = block_gather_indices if block_gather_indices is not None else [None] * len(self.blocks)
        rescale_every = fp16_rescale_every(self.config, hidden_states, self.training)
        for block, gather_index in zip(self.blocks, gather_indices, strict=True):
            hidden_states = block(hidden_states, cache, padding_mask, rescale_every, gather_index)
        return BaseModelOutputWithPast(last_hidden_state=self.norm_out(hidden_states), cache=cache)


class Rwkv6ForCausalLM(Rwkv6PreTrainedModel, RwkvForCausalLM):
    """RWKV-6 with its (untied) language-modelling head."""

    backbone_class = Rwkv6Model


__all__ = [
    "Rwkv6Block",
    "Rwkv6ChannelMix",
    "Rwkv6ForCausalLM",
    "Rwkv6Model",
    "Rwkv6PreTrainedModel",
    "Rwkv6TimeMix",
]
