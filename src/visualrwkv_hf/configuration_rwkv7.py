"""Configuration of the RWKV-7 ("Goose", x070) language model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_rwkv_common import ModelTypeCheckMixin, RecurrentLayersMixin
from .tokenization_rwkv_world import PAD_TOKEN_ID, TURN_END_TOKEN_ID

# (factor, power) of each LoRA's rank formula in BlinkDL's x070 training code, by config field.
LOW_RANK_FORMULAS = {
    "decay_low_rank_dim": (1.8, 0.5),
    "a_low_rank_dim": (1.8, 0.5),
    "v_low_rank_dim": (1.3, 0.5),
    "gate_low_rank_dim": (0.6, 0.8),
}


def default_low_rank_dim(hidden_size: int, factor: float, power: float) -> int:
    """BlinkDL's rank formula max(32, round(factor * C^power / 32) * 32) (Python's round, as there)."""
    return max(32, int(round(factor * hidden_size**power / 32) * 32))


@strict
class Rwkv7Config(ModelTypeCheckMixin, RecurrentLayersMixin, PreTrainedConfig):
    r"""
    Configuration of an RWKV-7 ("Goose", x070) language model, as BlinkDL's RWKV-7 World / G1 models and the
    VisualRWKV-7 language model.

    LoRA ranks left as `None` take the formula of BlinkDL's current training code, max(32, round(f * C^p / 32) * 32)
    with (f, p) = (1.8, 0.5) decay, (1.8, 0.5) a, (1.3, 0.5) value residual, (0.6, 0.8) gate; files trained before
    2025-02 used fixed ranks 64 / 64 / 32 / 128 (the converter reads every rank from the tensor shapes).

    Args:
        vocab_size: Tokens in the embedding and the head (RWKV World: 65536).
        hidden_size: Model width `C`.
        num_hidden_layers: Number of RWKV-7 blocks.
        head_size: Channels per WKV head `N`; heads `H = hidden_size / head_size`.
        intermediate_size: Channel-mix width (default 4 x `hidden_size`).
        decay_low_rank_dim: Rank of the decay LoRA (`w1`, `w2`).
        a_low_rank_dim: Rank of the in-context learning rate LoRA (`a1`, `a2`).
        v_low_rank_dim: Rank of the value-residual LoRA (`v1`, `v2`; blocks 1 and up).
        gate_low_rank_dim: Rank of the output gate LoRA (`g1`, `g2`).
        head_size_divisor: Sets the per-head GroupNorm epsilon to `layer_norm_epsilon * head_size_divisor**2`.
        layer_norm_epsilon: Epsilon of the LayerNorms.
        wkv_chunk_size: Chunk length (a power of two) of the chunked WKV7 form used for sequences (prefill and
            training); one-token steps run the step form.
    """

    # Not fla's "rwkv7", which flash-linear-attention registers for its own classes.
    model_type = "visualrwkv_rwkv7"

    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    head_size: int = 64
    intermediate_size: int | None = None
    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    head_size_divisor: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    wkv_chunk_size: int = 32
    use_cache: bool = True
    pad_token_id: int | None = PAD_TOKEN_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = TURN_END_TOKEN_ID
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.pop_model_type(kwargs)
        self.check_sizes("RWKV-7")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name, (factor, power) in LOW_RANK_FORMULAS.items():
            if getattr(self, name) is None:
                setattr(self, name, default_low_rank_dim(self.hidden_size, factor, power))
        for name in ("intermediate_size", *LOW_RANK_FORMULAS, "wkv_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.wkv_chunk_size & (self.wkv_chunk_size - 1):
            raise ValueError(f"`wkv_chunk_size` must be a power of two, got {self.wkv_chunk_size}.")
        if self.tie_word_embeddings:
            raise ValueError("RWKV-7's head is not tied to its embedding: `tie_word_embeddings` must be False.")
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def group_norm_epsilon(self) -> float:
        return self.layer_norm_epsilon * self.head_size_divisor**2


__all__ = ["Rwkv7Config"]
