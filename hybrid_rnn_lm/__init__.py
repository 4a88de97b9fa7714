"""hybrid_rnn_lm: a hybrid recurrent + attention causal language model for transformers.

Importing the package registers it with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `AutoModelForSequenceClassification` resolve to it.
"""

import importlib.util

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_hybrid_rnn_lm import HybridRnnLmConfig
from .modeling_hybrid_rnn_lm import (
    LORA_TARGET_MODULES,
    HybridRnnLmForCausalLM,
    HybridRnnLmForSequenceClassification,
    HybridRnnLmModel,
    HybridRnnLmPreTrainedModel,
)

AutoConfig.register(HybridRnnLmConfig.model_type, HybridRnnLmConfig, exist_ok=True)
AutoModel.register(HybridRnnLmConfig, HybridRnnLmModel, exist_ok=True)
AutoModelForCausalLM.register(HybridRnnLmConfig, HybridRnnLmForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridRnnLmConfig, HybridRnnLmForSequenceClassification, exist_ok=True)

# save_pretrained / push_to_hub copy the code and write auto_map, so a folder loads with trust_remote_code.
HybridRnnLmConfig.register_for_auto_class()
HybridRnnLmModel.register_for_auto_class("AutoModel")
HybridRnnLmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HybridRnnLmForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

# peft: LoraConfig() without target_modules looks the model type up in this table (as for in-library models).
if importlib.util.find_spec("peft") is not None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(HybridRnnLmConfig.model_type, LORA_TARGET_MODULES)

__version__ = "0.1.0"

__all__ = [
    "LORA_TARGET_MODULES",
    "HybridRnnLmConfig",
    "HybridRnnLmForCausalLM",
    "HybridRnnLmForSequenceClassification",
    "HybridRnnLmModel",
    "HybridRnnLmPreTrainedModel",
]
