"""VisualRWKV for Hugging Face transformers. Importing the package registers its classes with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_rwkv6 import Rwkv6Config
from .configuration_visualrwkv import VisualRWKVConfig
from .data import LlavaDataset, VisualRWKVDataCollator
from .modeling_rwkv6 import Rwkv6ForCausalLM, Rwkv6Model
from .modeling_visualrwkv import (
    VisualRWKVForConditionalGeneration,
    VisualRWKVModel,
    VisualRWKVPreTrainedModel,
)
from .processing_visualrwkv import VisualRWKVProcessor
from .tokenization_rwkv_world import RwkvWorldTokenizer
from .training import LORA_TARGETS, freeze_for_training, lora_config

AutoConfig.register(Rwkv6Config.model_type, Rwkv6Config, exist_ok=True)
# Folders saved under an older model type load as the current class (which then saves under the current name).
for legacy_model_type in Rwkv6Config.legacy_model_types:
    CONFIG_MAPPING.register(legacy_model_type, Rwkv6Config, exist_ok=True)
AutoModel.register(Rwkv6Config, Rwkv6Model, exist_ok=True)
AutoModelForCausalLM.register(Rwkv6Config, Rwkv6ForCausalLM, exist_ok=True)
AutoTokenizer.register(Rwkv6Config, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)

AutoConfig.register(VisualRWKVConfig.model_type, VisualRWKVConfig, exist_ok=True)
AutoModel.register(VisualRWKVConfig, VisualRWKVModel, exist_ok=True)
AutoModelForImageTextToText.register(VisualRWKVConfig, VisualRWKVForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(VisualRWKVConfig, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
AutoProcessor.register(VisualRWKVConfig, VisualRWKVProcessor, exist_ok=True)

__all__ = [
    "LORA_TARGETS",
    "LlavaDataset",
    "Rwkv6Config",
    "Rwkv6ForCausalLM",
    "Rwkv6Model",
    "RwkvWorldTokenizer",
    "VisualRWKVConfig",
    "VisualRWKVDataCollator",
    "VisualRWKVForConditionalGeneration",
    "VisualRWKVModel",
    "VisualRWKVPreTrainedModel",
    "VisualRWKVProcessor",
    "freeze_for_training",
    "lora_config",
]
