"""VisualRWKV for Hugging Face transformers. Importing the package registers its classes with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_visualrwkv import VisualRWKVTextConfig
from .modeling_rwkv6 import VisualRWKVForCausalLM, VisualRWKVPreTrainedModel, VisualRWKVTextModel

AutoConfig.register(VisualRWKVTextConfig.model_type, VisualRWKVTextConfig, exist_ok=True)
AutoModel.register(VisualRWKVTextConfig, VisualRWKVTextModel, exist_ok=True)
AutoModelForCausalLM.register(VisualRWKVTextConfig, VisualRWKVForCausalLM, exist_ok=True)

__all__ = [
    "VisualRWKVForCausalLM",
    "VisualRWKVPreTrainedModel",
    "VisualRWKVTextConfig",
    "VisualRWKVTextModel",
]
