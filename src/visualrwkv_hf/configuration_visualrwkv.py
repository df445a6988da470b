"""Configurations: the RWKV-6 ("Finch", x060) language model, and (later) the VisualRWKV model around it."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


def default_intermediate_size(hidden_size: int) -> int:
    """The original's channel-mix width: 3.5 x d_model rounded down to a multiple of 32."""
    return int((hidden_size * 3.5) // 32 * 32)


@strict
class VisualRWKVTextConfig(PreTrainedConfig):
    r"""
    Configuration of the RWKV-6 ("Finch", x060) World language model used by VisualRWKV.

    Sizes left as `None` take the original's derived defaults: `intermediate_size = int(3.5 * hidden_size) // 32 * 32`,
    `time_mix_extra_dim = 32` (64 from `hidden_size >= 4096`), `time_decay_extra_dim = 64` (128 from 4096).

    Args:
        vocab_size: Tokens in the embedding and the head (RWKV World: 65536).
        hidden_size: Model width `C` (`d_model`).
        num_hidden_layers: Number of RWKV-6 blocks.
        head_size: Channels per WKV head `N`; heads `H = hidden_size / head_size`.
        intermediate_size: Channel-mix width `d_ffn`.
        time_mix_extra_dim: Rank `R` of the data-dependent token-shift LoRA (`time_maa_w1/w2`).
        time_decay_extra_dim: Rank `D` of the data-dependent decay LoRA (`time_decay_w1/w2`).
        head_size_divisor: Sets the per-head GroupNorm epsilon to `layer_norm_epsilon * head_size_divisor**2`.
        layer_norm_epsilon: Epsilon of the LayerNorms.
        wkv_chunk_size: Chunk length of the parallel WKV form used for sequences (prefill and training).
    """

    model_type = "visualrwkv_text"
    base_config_key = "text_config"

    vocab_size: int = 65536
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    head_size: int = 64
    intermediate_size: int | None = None
    time_mix_extra_dim: int | None = None
    time_decay_extra_dim: int | None = None
    head_size_divisor: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    wkv_chunk_size: int = 64
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 261
    tie_word_embeddings: bool = False

    # Per layer, the cache keeps two token-shift vectors (time-mix and channel-mix inputs) as "conv" states.
    number_of_conv_states = 2

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "head_size_divisor"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.head_size != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `head_size` ({self.head_size}): "
                "RWKV-6 splits the model width into heads of `head_size` channels."
            )
        large = self.hidden_size >= 4096
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.time_mix_extra_dim is None:
            self.time_mix_extra_dim = 64 if large else 32
        if self.time_decay_extra_dim is None:
            self.time_decay_extra_dim = 128 if large else 64
        for name in ("intermediate_size", "time_mix_extra_dim", "time_decay_extra_dim", "wkv_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.tie_word_embeddings:
            raise ValueError("RWKV-6's head is not tied to its embedding: `tie_word_embeddings` must be False.")
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def group_norm_epsilon(self) -> float:
        return self.layer_norm_epsilon * self.head_size_divisor**2

    @property
    def layer_types(self) -> list[str]:
        # Read by transformers' DynamicCache to build one recurrent (LinearAttentionLayer) cache layer per block.
        return ["linear_attention"] * self.num_hidden_layers


__all__ = ["VisualRWKVTextConfig", "default_intermediate_size"]
