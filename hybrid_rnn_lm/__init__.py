"""hybrid_rnn_lm: a hybrid recurrent + attention causal language model for transformers.

Importing the package registers it with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `AutoModelForSequenceClassification` resolve to it.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_hybrid_rnn_lm import HybridRnnLmConfig
from .modeling_hybrid_rnn_lm import (
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

__version__ = "0.1.0"

__all__ = [
    "HybridRnnLmConfig",
    "HybridRnnLmForCausalLM",
    "HybridRnnLmForSequenceClassification",
    "HybridRnnLmModel",
    "HybridRnnLmPreTrainedModel",
]
