"""Auto classes, save/load round trips, and loading with trust_remote_code where the package is absent."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from hybrid_rnn_lm import (
    HybridRnnLmConfig,
    HybridRnnLmForCausalLM,
    HybridRnnLmForSequenceClassification,
    HybridRnnLmModel,
)
from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES
from hybrid_rnn_lm.modeling_hybrid_rnn_lm import EXPORT_MAX_LENGTH
from tests.isolation import run_without_package
from tests.test_modeling import peaky_model, random_ids, tiny_config


def test_auto_classes_resolve_to_ours():
    config = AutoConfig.for_model("hybrid_rnn_lm", vocab_size=40, hidden_size=16, num_attention_heads=2)
    assert isinstance(config, HybridRnnLmConfig)
    assert type(AutoModel.from_config(config)) is HybridRnnLmModel
    assert type(AutoModelForCausalLM.from_config(config)) is HybridRnnLmForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is HybridRnnLmForSequenceClassification


@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_save_and_reload_gives_identical_logits(tmp_path, rnn_type):
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=4))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert {"configuration_hybrid_rnn_lm.py", "modeling_hybrid_rnn_lm.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    ids = random_ids(2, 9)
    for loader in (HybridRnnLmForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is HybridRnnLmForCausalLM
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    # The tied head stays tied after loading (one tensor, not a copy).
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("rnn_type", ["lstm", "mingru", "minlstm"])
def test_trust_remote_code_loads_without_the_package(tmp_path, rnn_type):
    model = peaky_model(tiny_config(rnn_type, "sliding-window"))
    folder = tmp_path / "exported"
    model.save_pretrained(folder)
    ids = random_ids(1, 6)
    # Same thread count on both sides, so that the floating-point reductions run in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected_logits = model(ids).logits
    finally:
        torch.set_num_threads(threads)
    expected_text = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)

    result = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoModel, AutoModelForSequenceClassification
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ids = torch.tensor({ids.tolist()})
        torch.set_num_threads(1)
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        classifier = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True,
                                                                        num_labels=3)
        print(json.dumps({{"module": type(model).__module__, "cls": type(model).__name__,
                          "logits": logits.tolist(), "generated": generated.tolist(),
                          "base": type(base).__name__, "classifier": type(classifier).__name__}}))
        """,
        cwd=tmp_path,
    )
    assert result["cls"] == "HybridRnnLmForCausalLM"
    assert "transformers_modules" in result["module"], "the class must come from the folder's own code"
    assert torch.equal(torch.tensor(result["logits"]), expected_logits)
    assert result["generated"] == expected_text.tolist()
    assert result["base"] == "HybridRnnLmModel"
    assert result["classifier"] == "HybridRnnLmForSequenceClassification"


@pytest.mark.parametrize("rnn_type", ["rnn", "gru", "lstm"])
def test_weights_missing_from_a_checkpoint_are_initialised(tmp_path, rnn_type):
    model = peaky_model(tiny_config(rnn_type, "all-attention"))
    with torch.no_grad():  # as after training: no parameter is at its initial value any more
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [name for name in weights if ".rnn.rnn." in name and name.startswith("model.layers.0.")]
    assert dropped
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )

    reloaded = HybridRnnLmForCausalLM.from_pretrained(tmp_path)
    rnn = reloaded.model.layers[0].rnn.rnn
    hidden = rnn.hidden_size
    for name, parameter in rnn.named_parameters():
        assert torch.isfinite(parameter).all()
        if name.startswith("weight_hh"):
            # Orthogonal init: every gate's square block has orthonormal rows.
            for gate in parameter.split(hidden, dim=0):
                torch.testing.assert_close(gate @ gate.T, torch.eye(hidden), atol=1e-4, rtol=0)
        elif name.startswith("bias_ih") and rnn_type == "lstm":
            assert torch.equal(parameter[hidden : 2 * hidden], torch.ones(hidden))
            assert parameter[:hidden].abs().max() == 0
        elif name.startswith("bias"):
            assert parameter.abs().max() == 0
    # The weights that were in the file are the saved ones, untouched by initialisation.
    kept = reloaded.state_dict()
    for name, value in model.state_dict().items():
        if name not in dropped:
            assert torch.equal(kept[name], value), f"{name} was overwritten on load"


# ------------------------------------------------------------------------------------------------------------
# torch.export with a dynamic length, torch.compile(fullgraph=True), ONNX
# ------------------------------------------------------------------------------------------------------------


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("rnn_type", ["mingru", "minlstm"])
def test_torch_export_with_a_dynamic_length_reproduces_the_logits(rnn_type):
    """The scan cells export once for every length up to EXPORT_MAX_LENGTH, attention and a left-padding mask
    included; the fused cells' packing cannot be traced."""
    wrapped = Logits(peaky_model(tiny_config(rnn_type, "every-2nd"))).eval()
    ids = random_ids(2, 70)
    length = torch.export.Dim("length", min=2, max=EXPORT_MAX_LENGTH)
    exported = torch.export.export(
        wrapped,
        (ids, torch.ones_like(ids)),
        dynamic_shapes={"input_ids": {1: length}, "attention_mask": {1: length}},
    )
    with torch.no_grad():
        for tokens in (2, 9, 64, 333, 1000):
            other = random_ids(2, tokens, seed=tokens)
            mask = torch.ones_like(other)
            mask[0, : tokens // 3] = 0
            torch.testing.assert_close(exported.module()(other, mask), wrapped(other, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rnn_type", ["mingru", "minlstm"])
def test_compile_fullgraph_with_a_dynamic_length(rnn_type):
    """One graph, no graph break, for any length (the eager backend: graph capture is what fullgraph checks)."""
    wrapped = Logits(peaky_model(tiny_config(rnn_type, "every-2nd"))).eval()
    compiled = torch.compile(wrapped, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for tokens in (5, 37, 130):
            ids = random_ids(2, tokens, seed=tokens)
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            torch.testing.assert_close(compiled(ids, mask), wrapped(ids, mask), atol=1e-5, rtol=0)


class DecodeStep(torch.nn.Module):
    """One token in, its logits and every block's next recurrent state out: the whole generation state is explicit."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *states):
        output = self.model(input_ids=input_ids, recurrent_states=list(states), output_recurrent_states=True)
        return (output.logits[:, -1], *output.recurrent_states)


@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_onnx_decoding_step_with_explicit_state_matches_pytorch(rnn_type, tmp_path):
    """A model without attention exported to ONNX as one decoding step, run for 12 tokens in onnxruntime, feeding
    its states back, agrees with the PyTorch step (with attention the keys/values would be state too)."""
    import numpy as np
    import onnxruntime

    model = peaky_model(tiny_config(rnn_type, "no-attention")).eval()
    step = DecodeStep(model)
    blocks = len(model.model.layers)
    states = [torch.zeros(3, 2 if rnn_type == "lstm" else 1, model.config.hidden_size) for _ in range(blocks)]
    names = [f"state_{index}" for index in range(blocks)]
    torch.onnx.export(
        step,
        (random_ids(3, 1), *states),
        str(tmp_path / "step.onnx"),
        dynamo=True,
        input_names=["input_ids", *names],
        output_names=["logits", *[f"next_{name}" for name in names]],
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"))
    tokens = random_ids(3, 12, seed=3)
    onnx_states = [state.numpy() for state in states]
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            token = tokens[:, t : t + 1]
            logits, *states = step(token, *states)
            onnx_logits, *onnx_states = session.run(
                None, {"input_ids": token.numpy(), **dict(zip(names, onnx_states, strict=True))}
            )
            np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4, rtol=0)
