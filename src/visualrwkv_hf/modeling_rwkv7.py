"""The RWKV-7 ("Goose", x070) language model: time-mix, channel-mix, blocks, backbone and causal-LM head.

The block is BlinkDL's x070 (`RWKV-v7/rwkv_v7_demo.py`, the `rwkv` package's `RWKV_x070`): static token-shift mixes,
a decay, an in-context learning rate `a` and an output gate from low-rank MLPs, the value residual to block 0's value
("v-first"), the WKV7 generalised delta rule (`ops/wkv7.py`), a per-head GroupNorm and a per-head r.k bonus; the
channel-mix is a squared-ReLU feed-forward without receptance.

The recurrent state is laid out as RWKV-6's, through `modeling_rwkv_common`'s accessors (per block, in transformers'
`DynamicCache`: the two token-shift vectors and the float32 WKV matrix (B, H, N, N), key-major: BlinkDL's state is
its transpose). v-first needs no state: it is block 0's value of the same token.
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

from .configuration_rwkv7 import Rwkv7Config
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
from .ops import DecodeLinear, WKV7
from .ops.mixing import relu_squared

# Order of the static token-shift mixes x_r .. x_g, stacked so that one pass computes every mixed input.
TIME_MIX_SLOTS = ("r", "w", "k", "v", "a", "g")


class Rwkv7TimeMix(nn.Module):
    """RWKV-7 time mixing: token shift, low-rank decay / learning rate / gate / value residual, WKV7, GroupNorm."""

    def __init__(self, config: Rwkv7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.chunk_size = config.wkv_chunk_size
        C = config.hidden_size
        self.x_r = nn.Parameter(torch.empty(C))
        self.x_w = nn.Parameter(torch.empty(C))
        self.x_k = nn.Parameter(torch.empty(C))
        self.x_v = nn.Parameter(torch.empty(C))
        self.x_a = nn.Parameter(torch.empty(C))
        self.x_g = nn.Parameter(torch.empty(C))
        self.w0 = nn.Parameter(torch.empty(C))
        self.w1 = nn.Parameter(torch.empty(C, config.decay_low_rank_dim))
        self.w2 = nn.Parameter(torch.empty(config.decay_low_rank_dim, C))
        self.a0 = nn.Parameter(torch.empty(C))
        self.a1 = nn.Parameter(torch.empty(C, config.a_low_rank_dim))
        self.a2 = nn.Parameter(torch.empty(config.a_low_rank_dim, C))
        # Block 0's value is v-first itself: only later blocks mix towards it.
        if layer_idx > 0:
            self.v0 = nn.Parameter(torch.empty(C))
            self.v1 = nn.Parameter(torch.empty(C, config.v_low_rank_dim))
            self.v2 = nn.Parameter(torch.empty(config.v_low_rank_dim, C))
        self.g1 = nn.Parameter(torch.empty(C, config.gate_low_rank_dim))
        self.g2 = nn.Parameter(torch.empty(config.gate_low_rank_dim, C))
        self.k_k = nn.Parameter(torch.empty(C))
        self.k_a = nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.wkv = WKV7()  # the compiled kernel where one builds, the torch forms otherwise
        self.att_receptance = DecodeLinear(C, C, bias=False)
        self.att_key = DecodeLinear(C, C, bias=False)
        self.att_value = DecodeLinear(C, C, bias=False)
        self.att_output = DecodeLinear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, C, eps=config.group_norm_epsilon)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and v-first (block 0's value, which block 0 computes and the others read)."""
        B, T, C = hidden_states.shape
        H, N = self.num_heads, self.head_size
        initial_state = previous_wkv_state(cache, self.layer_idx)  # before the token shift marks the layer as seen
        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, TIME_MIX_SHIFT, padding_mask) - x
        mixes = torch.stack([getattr(self, f"x_{slot}") for slot in TIME_MIX_SLOTS])
        x_r, x_w, x_k, x_v, x_a, x_g = torch.addcmul(x, dx, mixes[:, None, None]).unbind(0)

        r = self.att_receptance(x_r)
        k = self.att_key(x_k)
        v = self.att_value(x_v)
        # log-log decay, soft-clamped to <= -0.5: each step's decay exp(-exp(w)) lies in (0.545, 1)
        w = -F.softplus(-(self.w0 + torch.tanh(x_w @ self.w1) @ self.w2)) - 0.5
        if self.layer_idx == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v0 + (x_v @ self.v1) @ self.v2))
        iclr = torch.sigmoid(self.a0 + (x_a @ self.a1) @ self.a2)  # the delta rule's in-context learning rate
        g = torch.sigmoid(x_g @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1).view(B, T, C)
        k = k * (1 + (iclr - 1) * self.k_a)
        b = kk * iclr
        if padding_mask is not None:
            # A padded step must leave the state untouched: no key, no delta-rule update, decay exp(-exp(-inf)) = 1.
            pad = ~padding_mask.bool()[:, :, None]
            k, b = k.masked_fill(pad, 0), b.masked_fill(pad, 0)
            w = w.masked_fill(pad, float("-inf"))

        y, state = self.wkv(
            *(t.view(B, T, H, N) for t in (r, w, k, v, -kk, b)), initial_state=initial_state,
            chunk_size=self.chunk_size,
        )
        store_wkv_state(cache, self.layer_idx, state)
        # y stays float32 through the GroupNorm and the bonus: rounding it first costs more than the recurrence's error
        y = F.group_norm(y.reshape(B * T, C), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        bonus = (r * k * self.r_k.view(C)).view(B, T, H, N).sum(-1, keepdim=True, dtype=torch.float32)
        y = y.view(B, T, H, N).addcmul_(bonus, v.view(B, T, H, N)).view(B, T, C)
        return self.att_output(y.to(g.dtype) * g), v_first


class Rwkv7ChannelMix(nn.Module):
    """RWKV-7 channel mixing: token shift and a squared-ReLU feed-forward (no receptance gate, unlike RWKV-6)."""

    def __init__(self, config: Rwkv7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C = config.hidden_size
        self.x_k = nn.Parameter(torch.empty(C))
        self.ffn_key = DecodeLinear(C, config.intermediate_size, bias=False)
        self.ffn_value = DecodeLinear(config.intermediate_size, C, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = mask_padding(hidden_states, padding_mask)
        dx = token_shift(x, cache, self.layer_idx, CHANNEL_MIX_SHIFT, padding_mask) - x
        return self.ffn_value(relu_squared(self.ffn_key(torch.addcmul(x, dx, self.x_k))))


class Rwkv7Block(GradientCheckpointingLayer):
    def __init__(self, config: Rwkv7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.layer_norm_epsilon
        # Block 0 normalises the embeddings first (the original's ln0).
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=eps) if layer_idx == 0 else None
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = Rwkv7TimeMix(config, layer_idx)
        self.feed_forward = Rwkv7ChannelMix(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre_norm is not None:
            hidden_states = self.pre_norm(hidden_states)
        attention, v_first = self.attention(self.attn_norm(hidden_states), v_first, cache, padding_mask)
        hidden_states = hidden_states + attention
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states), cache, padding_mask)
        return hidden_states, v_first


class Rwkv7PreTrainedModel(RwkvPreTrainedModel):
    config: Rwkv7Config
    _no_split_modules = ["Rwkv7Block"]
    # `output_hidden_states=True` returns the embeddings, then every block's output
    _can_record_outputs = {"hidden_states": Rwkv7Block}

    @torch.no_grad()
    def _init_weights(self, module):
        """BlinkDL's x070 initialisation (`RWKV-v7/train_temp/src/model.py`) for the mixing, decay and LoRA parameters
        (layer-depth dependent); Linear layers and norms take transformers' defaults."""
        super()._init_weights(module)
        config = self.config.get_text_config()
        if not isinstance(module, (Rwkv7TimeMix, Rwkv7ChannelMix)):
            return
        n_layer, C = config.num_hidden_layers, config.hidden_size
        ratio_0_to_1 = module.layer_idx / max(n_layer - 1, 1)
        ratio_1_to_almost_0 = 1.0 - module.layer_idx / n_layer
        ddd = torch.arange(C, dtype=torch.float32) / C
        if isinstance(module, Rwkv7ChannelMix):
            init.copy_(module.x_k, 1.0 - ddd.pow(ratio_1_to_almost_0**4))
            return
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            init.copy_(getattr(module, name), 1.0 - ddd.pow(power * ratio_1_to_almost_0))
        n = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        init.copy_(module.w0, -7.0 + 5.0 * n.pow(0.85 + ratio_0_to_1**0.5) + 0.5)
        init.zeros_(module.a0)
        # first LoRA factors start at zero, second ones orthogonal and small: each LoRA starts as its bias alone
        loras = [(module.w1, module.w2), (module.a1, module.a2), (module.g1, module.g2)]
        if module.layer_idx > 0:
            init.ones_(module.v0)
            loras.append((module.v1, module.v2))
        for first, second in loras:
            init.zeros_(first)
            init.orthogonal_(second, gain=0.1)
        init.constant_(module.k_k, 0.85)
        init.ones_(module.k_a)
        init.zeros_(module.r_k)
        init.constant_(module.ln_x.weight, ((1 + module.layer_idx) / n_layer) ** 0.7)
        init.zeros_(module.ln_x.bias)


class Rwkv7Model(Rwkv7PreTrainedModel):
    """The RWKV-7 backbone: embedding, blocks, final LayerNorm."""

    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Rwkv7Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    # The last hidden state stays the last block's output (before `norm_out`), as for RWKV-6.
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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            attention_mask: (batch, seq) with 1 for real tokens and 0 for padding; padded positions leave every token
                shift and WKV state untouched wherever they lie (left, middle, right, or between a cache and new
                tokens), so each row computes at its real positions exactly what it computes alone. May also cover
                cached positions (batch, past + seq): only its last `seq` columns are used.
            cache: Recurrent state from a previous call (updated in place); created when `use_cache` and none is
                given. `past_key_values=` and `cache_params=` are accepted as deprecated names for it.
        """
        inputs_embeds, cache, padding_mask = recurrent_backbone_inputs(
            self, input_ids, inputs_embeds, attention_mask, cache, use_cache
        )
        hidden_states, v_first = inputs_embeds, None
        for block in self.blocks:
            hidden_states, v_first = block(hidden_states, v_first, cache, padding_mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm_out(hidden_states), cache=cache)


class Rwkv7ForCausalLM(Rwkv7PreTrainedModel, RwkvForCausalLM):
    """RWKV-7 with its (untied) language-modelling head."""

    backbone_class = Rwkv7Model


__all__ = [
    "Rwkv7Block",
    "Rwkv7ChannelMix",
    "Rwkv7ForCausalLM",
    "Rwkv7Model",
    "Rwkv7PreTrainedModel",
    "Rwkv7TimeMix",
]
