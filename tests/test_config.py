"""Config: defaults, derived layer pattern, JSON round trip and one clear error per invalid field."""

import pytest

from hybrid_rnn_lm import HybridRnnLmConfig


def test_defaults_give_a_small_model_with_attention():
    config = HybridRnnLmConfig()
    assert config.model_type == "hybrid_rnn_lm"
    assert config.rnn_type == "gru"
    assert config.attention_layer_indices == list(range(config.num_hidden_layers))
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.tie_word_embeddings is True
    assert config.layer_types == ["hybrid"] * config.num_hidden_layers


@pytest.mark.parametrize(
    ("attention_layers", "window", "expected_types"),
    [
        ("none", None, ["linear_attention"] * 4),
        ("all", None, ["hybrid"] * 4),
        ("all", 16, ["hybrid_sliding"] * 4),
        (2, None, ["linear_attention", "hybrid", "linear_attention", "hybrid"]),
        ([0, 3], 8, ["hybrid_sliding", "linear_attention", "linear_attention", "hybrid_sliding"]),
    ],
    ids=["none", "all", "window", "every-2nd", "explicit-list"],
)
def test_attention_layout_is_data(attention_layers, window, expected_types):
    config = HybridRnnLmConfig(num_hidden_layers=4, attention_layers=attention_layers, attention_window=window)
    assert config.layer_types == expected_types
    assert config.sliding_window == window


def test_eos_token_id_may_be_a_list():
    assert HybridRnnLmConfig(vocab_size=10, eos_token_id=[2, 3]).eos_token_id == [2, 3]
    with pytest.raises(
        ValueError, match=r"eos_token_id: must be None or an id in \[0, vocab_size=10\), got \[2, 12\]"
    ):
        HybridRnnLmConfig(vocab_size=10, eos_token_id=[2, 12])


def test_json_round_trip(tmp_path):
    config = HybridRnnLmConfig(
        rnn_type="lstm", attention_layers=[1], attention_window=32, hidden_dropout=0.1, hidden_act="relu2"
    )
    config.save_pretrained(tmp_path)
    loaded = HybridRnnLmConfig.from_pretrained(tmp_path)
    for field in ("rnn_type", "attention_layers", "attention_window", "hidden_dropout", "layer_types", "hidden_act"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"hidden_size": 30, "num_attention_heads": 4},
            "HybridRnnLmConfig.num_attention_heads: 4 heads do not divide",
        ),
        ({"rnn_type": "transformer"}, "HybridRnnLmConfig.rnn_type: must be one of 'rnn', 'gru', 'lstm'"),
        ({"attention_window": 0}, "HybridRnnLmConfig.attention_window: must be None (full attention) or an integer"),
        (
            {"num_hidden_layers": 2, "attention_layers": [0, 5]},
            "HybridRnnLmConfig.attention_layers: layer indices [5]",
        ),
        ({"attention_layers": "some"}, "HybridRnnLmConfig.attention_layers: must be 'all', 'none'"),
        ({"num_hidden_layers": 2, "attention_layers": 3}, "HybridRnnLmConfig.attention_layers: every-k-th layer"),
        ({"hidden_size": 0}, "HybridRnnLmConfig.hidden_size: must be a positive integer"),
        ({"vocab_size": -5}, "HybridRnnLmConfig.vocab_size: must be a positive integer"),
        ({"num_hidden_layers": 0}, "HybridRnnLmConfig.num_hidden_layers: must be a positive integer"),
        ({"hidden_dropout": 1.5}, "HybridRnnLmConfig.hidden_dropout: must be a probability"),
        (
            {"vocab_size": 10, "eos_token_id": 10},
            "HybridRnnLmConfig.eos_token_id: must be None or an id in [0, vocab_size=10), got 10",
        ),
        ({"vocab_size": 10**9}, "HybridRnnLmConfig.vocab_size: 1,000,000,000 is more than 16,777,216 tokens"),
        ({"use_residual": "no"}, "HybridRnnLmConfig.use_residual: must be True or False, got 'no'"),
        ({"bidirectional": 1}, "HybridRnnLmConfig.bidirectional: must be True or False, got 1"),
        ({"layer_norm_eps": float("nan")}, "HybridRnnLmConfig.layer_norm_eps: must be a finite number > 0, got nan"),
        ({"initializer_range": float("inf")}, "HybridRnnLmConfig.initializer_range: must be a finite number > 0"),
        ({"scan_chunk_size": 0}, "HybridRnnLmConfig.scan_chunk_size: must be a positive integer"),
        ({"hidden_act": "swiglu"}, "HybridRnnLmConfig.hidden_act: must be one of transformers' activations (gelu, "),
    ],
    ids=lambda value: None if isinstance(value, dict) else value.split(":")[0].split(".")[-1],
)
def test_invalid_values_name_the_field(fields, message):
    with pytest.raises(ValueError) as error:
        HybridRnnLmConfig(**fields)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
