"""Configuration of the RWKV-6 ("Finch", x060) World language model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_rwkv_common import ModelTypeCheckMixin, RecurrentLayersMixin
from .tokenization_rwkv_world import PAD_TOKEN_ID, TURN_END_TOKEN_ID


def default_intermediate_size(hidden_size: int) -> int:
    """The original's channel-mix width: 3.5 x d_model rounded down to a multiple of 32."""
    return int((hidden_size * 3.5) // 32 * 32)


@strict
class Rwkv6Config(ModelTypeCheckMixin, RecurrentLayersMixin, PreTrainedConfig):
    r"""
    Configuration of the RWKV-6 ("Finch", x060) World language model, alone or as VisualRWKV's language model.

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
        wkv_chunk_size: Chunk length (a power of two) of the torch parallel WKV form used for sequences (prefill and
            training) when the compiled kernel is not in use; 16 measured fastest on CPUs.
        rescale_every: The float16 overflow guard of BlinkDL's inference (`RESCALE_LAYER`, 6 for fp16) and
            transformers' RWKV-4: in float16 inference (float16 activations or float16 autocast, in `eval()` mode)
            the residual stream is halved after every `rescale_every`-th block, and block `i` scales its time-mix
            and channel-mix outputs by 2^-(i // rescale_every) (on the inputs of their output projections, so the
            weights themselves never change). Released models' residual streams grow past float16's largest value
            (65504) in the later layers; with the guard they stay finite. The final LayerNorm undoes the scale up to
            its epsilon (each halving weighs it 4x more, negligible at the residual's size), so the result is within
            float16 rounding of the unscaled one. Float32, bfloat16 and training (`train()` mode) never rescale:
            their outputs are bit-identical whatever the value. 0 turns the guard off.
    """

    # Not fla's "rwkv6", which flash-linear-attention registers for its own classes.
    model_type = "visualrwkv_rwkv6"
    legacy_model_types = ("visualrwkv_text",)
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
    wkv_chunk_size: int = 16
    rescale_every: int = 6
    use_cache: bool = True
    pad_token_id: int | None = PAD_TOKEN_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = TURN_END_TOKEN_ID
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.pop_model_type(kwargs)
        self.check_sizes("RWKV-6")
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
        if self.rescale_every < 0:
            raise ValueError(
                f"`rescale_every` must be 0 (no float16 rescaling) or a positive number of blocks, got "
                f"{self.rescale_every}."
            )
        if self.wkv_chunk_size & (self.wkv_chunk_size - 1):
            raise ValueError(f"`wkv_chunk_size` must be a power of two, got {self.wkv_chunk_size}.")
        if self.tie_word_embeddings:
            raise ValueError("RWKV-6's head is not tied to its embedding: `tie_word_embeddings` must be False.")
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def group_norm_epsilon(self) -> float:
        return self.layer_norm_epsilon * self.head_size_divisor**2


__all__ = ["Rwkv6Config"]
