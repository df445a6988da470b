"""VisualRWKV for Hugging Face transformers. Importing the package registers its classes with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_visualrwkv import VisualRWKVTextConfig
from .modeling_rwkv6 import VisualRWKVForCausalLM, VisualRWKVPreTrainedModel, VisualRWKVTextModel
from .tokenization_rwkv_world import RwkvWorldTokenizer

AutoConfig.register(VisualRWKVTextConfig.model_type, VisualRWKVTextConfig, exist_ok=True)
AutoModel.register(VisualRWKVTextConfig, VisualRWKVTextModel, exist_ok=True)
AutoModelForCausalLM.register(VisualRWKVTextConfig, VisualRWKVForCausalLM, exist_ok=True)
AutoTokenizer.register(VisualRWKVTextConfig, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)

__all__ = [
    "RwkvWorldTokenizer",
    "VisualRWKVForCausalLM",
    "VisualRWKVPreTrainedModel",
    "VisualRWKVTextConfig",
    "VisualRWKVTextModel",
]
