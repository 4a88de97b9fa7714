"""transformers' ModelTesterMixin (tests/test_modeling_common.py of the installed version's source distribution) run
on our three model classes, as an in-library model's test file runs it. tests/test_transformers_common.py copies this
file next to the fetched common tests and runs it with pytest; it is not collected from here.

The source distribution ships neither tests/generation/test_utils.py (GenerationTesterMixin) nor
tests/exporters/test_export.py (ExportTesterMixin), which test_modeling_common.py imports: the runner puts empty
stand-ins there, so no generate or export test of transformers runs (tests/test_modeling.py, test_hf_clients.py
and test_export.py cover those here).
"""

import unittest

import torch
from transformers.models.auto import modeling_auto

from hybrid_rnn_lm import (
    HybridRnnLmConfig,
    HybridRnnLmForCausalLM,
    HybridRnnLmForSequenceClassification,
    HybridRnnLmModel,
)

from .test_configuration_common import ConfigTester
from .test_modeling_common import ModelTesterMixin, ids_tensor

# An in-library model is listed in the auto mappings; the common tests read them (e.g. to build labels).
modeling_auto.MODEL_MAPPING_NAMES["hybrid_rnn_lm"] = "HybridRnnLmModel"
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["hybrid_rnn_lm"] = "HybridRnnLmForCausalLM"
modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["hybrid_rnn_lm"] = "HybridRnnLmForSequenceClassification"


class HybridRnnLmModelTester:
    def __init__(self, parent, rnn_type, attention_layers, batch_size=13, seq_length=7, vocab_size=99):
        self.parent = parent
        self.rnn_type = rnn_type
        self.attention_layers = attention_layers
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = True

    def get_config(self):
        return HybridRnnLmConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            rnn_type=self.rnn_type,
            attention_layers=self.attention_layers,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            num_labels=3,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids}


class HybridRnnLmGruModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (HybridRnnLmModel, HybridRnnLmForCausalLM, HybridRnnLmForSequenceClassification)
    # GenerationTesterMixin is not in the source distribution, so no generate test runs here (see the docstring).
    all_generative_model_classes = ()
    # The check of _init_weights runs for every model of 2023 on; this file has no copyright year to read.
    test_can_init_all_missing_weights_before_2023 = True
    rnn_type, attention_layers = "gru", "all"

    def setUp(self):
        self.model_tester = HybridRnnLmModelTester(self, self.rnn_type, self.attention_layers)
        self.config_tester = ConfigTester(self, config_class=HybridRnnLmConfig, hidden_size=32)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_attention_outputs(self):
        """As transformers' Jamba, Bamba, Zamba and FalconH1 tests override it: attention weights come for the blocks
        with attention only, one (batch, heads, length, length) tensor each, asked for by argument or by the config."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        if config.attention_layer_indices == list(range(config.num_hidden_layers)):
            return super().test_attention_outputs()  # every block has attention: the common test applies as is
        batch, length = inputs["input_ids"].shape
        expected = (batch, config.num_attention_heads, length, length)
        for model_class in self.all_model_classes:
            model = model_class._from_config(config, attn_implementation="eager").eval()
            with torch.no_grad():
                by_argument = model(**inputs, output_attentions=True).attentions
                model.config.output_attentions = True
                by_config = model(**inputs).attentions
            for attentions in (by_argument, by_config):
                self.assertEqual(len(attentions), len(config.attention_layer_indices))
                self.assertEqual([tuple(weights.shape) for weights in attentions], [expected] * len(attentions))

    def _check_caches_are_equal(self, cache, other):
        """As transformers' Mamba test does: an attention-free cache has no sequence length to compare (DynamicCache
        refuses get_seq_length there), so the recurrent states are compared."""
        for layer_idx in range(len(cache.layers)):
            torch.testing.assert_close(cache.get_recurrent_state(layer_idx), other.get_recurrent_state(layer_idx))


class HybridRnnLmLstmModelTest(HybridRnnLmGruModelTest):
    rnn_type, attention_layers = "lstm", 2  # attention in the 2nd block only


class HybridRnnLmMinGruModelTest(HybridRnnLmGruModelTest):
    rnn_type, attention_layers = "mingru", "all"


class HybridRnnLmMinLstmModelTest(HybridRnnLmGruModelTest):
    rnn_type, attention_layers = "minlstm", "none"  # recurrence only
    has_attentions = False  # as transformers' Mamba and xLSTM tests declare
