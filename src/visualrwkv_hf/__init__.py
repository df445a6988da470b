"""VisualRWKV for Hugging Face transformers. Importing the package registers its classes with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_rwkv7 import Rwkv7Config
from .configuration_visualrwkv import VisualRWKVConfig, VisualRWKVTextConfig
from .data import LlavaDataset, VisualRWKVDataCollator
from .modeling_rwkv6 import VisualRWKVForCausalLM, VisualRWKVTextModel
from .modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7Model, Rwkv7PreTrainedModel
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

AutoConfig.register(Rwkv7Config.model_type, Rwkv7Config, exist_ok=True)
AutoModel.register(Rwkv7Config, Rwkv7Model, exist_ok=True)
AutoModelForCausalLM.register(Rwkv7Config, Rwkv7ForCausalLM, exist_ok=True)
AutoTokenizer.register(Rwkv7Config, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)

AutoConfig.register(VisualRWKVConfig.model_type, VisualRWKVConfig, exist_ok=True)
AutoModel.register(VisualRWKVConfig, VisualRWKVModel, exist_ok=True)
AutoModelForImageTextToText.register(VisualRWKVConfig, VisualRWKVForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(VisualRWKVConfig, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
AutoProcessor.register(VisualRWKVConfig, VisualRWKVProcessor, exist_ok=True)

__all__ = [
    "LORA_TARGETS",
    "LlavaDataset",
    "Rwkv7Config",
    "Rwkv7ForCausalLM",
    "Rwkv7Model",
    "Rwkv7PreTrainedModel",
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
