"""VisualRWKV for Hugging Face transformers. Importing the package registers its classes with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_visualrwkv import VisualRWKVConfig, VisualRWKVTextConfig
from .data import LlavaDataset, VisualRWKVDataCollator
from .modeling_rwkv6 import VisualRWKVForCausalLM, VisualRWKVTextModel
from .modeling_visualrwkv import (
    VisualRWKVForConditionalGeneration,
    VisualRWKVModel,
    VisualRWKVPreTrainedModel,
)
from .processing_visualrwkv import VisualRWKVProcessor
from .tokenization_rwkv_world import RwkvWorldTokenizer
from .training import LORA_TARGETS, freeze_for_training, lora_config

AutoConfig.register(VisualRWKVTextConfig.model_type, VisualRWKVTextConfig, exist_ok=True)
AutoModel.register(VisualRWKVTextConfig, VisualRWKVTextModel, exist_ok=True)
AutoModelForCausalLM.register(VisualRWKVTextConfig, VisualRWKVForCausalLM, exist_ok=True)
AutoTokenizer.register(VisualRWKVTextConfig, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)

AutoConfig.register(VisualRWKVConfig.model_type, VisualRWKVConfig, exist_ok=True)
AutoModel.register(VisualRWKVConfig, VisualRWKVModel, exist_ok=True)
AutoModelForImageTextToText.register(VisualRWKVConfig, VisualRWKVForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(VisualRWKVConfig, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
AutoProcessor.register(VisualRWKVConfig, VisualRWKVProcessor, exist_ok=True)

__all__ = [
    "LORA_TARGETS",
    "LlavaDataset",
    "RwkvWorldTokenizer",
    "VisualRWKVConfig",
    "VisualRWKVDataCollator",
    "VisualRWKVForCausalLM",
    "VisualRWKVForConditionalGeneration",
    "VisualRWKVModel",
    "VisualRWKVPreTrainedModel",
    "VisualRWKVProcessor",
    "VisualRWKVTextConfig",
    "VisualRWKVTextModel",
    "freeze_for_training",
    "lora_config",
]
