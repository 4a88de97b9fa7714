"""The parallel-scan cells (mingru / minlstm): the scan against its sequential reference, numerics, padding, LoRA,
initialisation. And the GRU's and tanh RNN's training paths (hand-written backwards) against torch's cells."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from hybrid_rnn_lm import HybridRnnLmForCausalLM
from hybrid_rnn_lm.modeling_hybrid_rnn_lm import (
    _chunked_scan,
    gated_scan,
    gru_training_forward,
    linear_recurrence_reference,
    linear_recurrence_scan,
    linear_recurrence_scan_traceable,
    masked_scan_coefficients,
    rnn_training_forward,
    scan_gate_bias,
)
from tests.test_modeling import peaky_model, random_ids, tiny_config

CHUNK = 8
SCAN_TYPES = ["mingru", "minlstm"]


def gates_and_inputs(length: int, seed: int = 0, batch: int = 3, width: int = 5):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, length, width, generator=generator)  # gates in (0, 1), as the cells make them
    b = torch.randn(batch, length, width, generator=generator)
    h0 = torch.randn(batch, width, generator=generator)
    return a, b, h0


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 257])
def test_scan_equals_the_sequential_reference_forward_and_gradients(length, with_state):
    a, b, h0 = gates_and_inputs(length)
    inputs = [a, b, h0] if with_state else [a, b]
    fast_inputs = [t.clone().requires_grad_() for t in inputs]
    slow_inputs = [t.clone().requires_grad_() for t in inputs]
    fast = linear_recurrence_scan(*fast_inputs, chunk_size=CHUNK)
    slow = linear_recurrence_reference(*slow_inputs)
    assert fast.shape == (3, length, 5)
    assert (fast - slow).abs().max().item() <= 1e-5
    weights = torch.randn_like(fast)  # a loss that weighs every output differently
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    for fast_input, slow_input in zip(fast_inputs, slow_inputs):
        # From a zero state the first gate multiplies zero: no gradient path at all, or a zero gradient.
        fast_grad = torch.zeros_like(fast_input) if fast_input.grad is None else fast_input.grad
        assert (fast_grad - slow_input.grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 257, 1000])
def test_the_traceable_scan_equals_the_sequential_reference(length, with_state):
    """The export / compile path (fixed chunks of 64, chunk states from a matrix of gate products), with a
    forget-everything gate (a document start) in the middle."""
    a, b, h0 = gates_and_inputs(length)
    a[:, length // 2] = 0.0
    initial = h0 if with_state else None
    expected = linear_recurrence_reference(a, b, initial)
    assert (linear_recurrence_scan_traceable(a, b, initial) - expected).abs().max() <= 1e-5


def cell_inputs(num_gates: int, length: int, seed: int = 0, batch: int = 3, width: int = 5):
    """An input projection, an initial state, document starts and a left-padding mask for a scan cell."""
    generator = torch.Generator().manual_seed(seed)
    projected = 2 * torch.randn(batch, length, (num_gates + 1) * width, generator=generator)
    h0 = torch.randn(batch, width, generator=generator)
    starts = torch.rand(batch, length, generator=generator) < 0.1
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[0, : length // 3] = False  # row 0 left-padded
    return projected, h0, starts, padding


@pytest.mark.parametrize("masks", [False, True], ids=["no-masks", "document-starts-and-padding"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 257])
@pytest.mark.parametrize("num_gates", [1, 2], ids=SCAN_TYPES)
def test_fused_cell_equals_gates_then_the_sequential_reference(num_gates, length, with_state, masks):
    """The training path (gates, masks and scan in one autograd node with a hand-written backward) against autograd
    through the plain gate formulas and the sequential loop: outputs and the gradients of the projection and of the
    initial state."""
    projected, h0, starts, padding = cell_inputs(num_gates, length)
    starts, padding = (starts, padding) if masks else (None, None)
    fast_inputs = [projected.clone().requires_grad_(), h0.clone().requires_grad_()]
    slow_inputs = [projected.clone().requires_grad_(), h0.clone().requires_grad_()]

    def run(inputs, fused):
        state = inputs[1] if with_state else None
        if fused:
            return gated_scan(inputs[0], num_gates, state, starts, padding, chunk_size=CHUNK)
        a, b = masked_scan_coefficients(inputs[0], num_gates, starts, padding)
        return linear_recurrence_reference(a, b, state)

    fast, slow = run(fast_inputs, True), run(slow_inputs, False)
    assert (fast - slow).abs().max().item() <= 1e-5
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert (fast_inputs[0].grad - slow_inputs[0].grad).abs().max().item() <= 1e-5
    if with_state:
        assert (fast_inputs[1].grad - slow_inputs[1].grad).abs().max().item() <= 1e-5
    else:
        assert fast_inputs[1].grad is None


@pytest.mark.parametrize("num_gates", [1, 2], ids=SCAN_TYPES)
def test_hand_written_backward_passes_gradcheck(num_gates):
    """Finite differences in float64 (torch.autograd.gradcheck) for both hand-written backward passes."""
    projected, h0, starts, padding = cell_inputs(num_gates, 11, batch=2, width=3)
    projected, h0 = projected.double().requires_grad_(), h0.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, h: gated_scan(p, num_gates, h, starts, padding, chunk_size=4), (projected, h0)
    )
    a, b, state = (t.double().requires_grad_() for t in gates_and_inputs(11, batch=2, width=3))
    assert torch.autograd.gradcheck(lambda *x: linear_recurrence_scan(*x, chunk_size=4), (a, b, state))


@pytest.mark.parametrize("num_gates", [1, 2], ids=SCAN_TYPES)
def test_a_bf16_projection_gets_a_bf16_gradient_computed_in_float32(num_gates):
    """Under bf16 autocast the projection arrives in bf16: the states are float32, and the projection's gradient is
    bf16, the gradient of the float32 computation rounded once. The check: autograd through the plain formulas and
    the sequential loop from a float32 copy of the same values, its gradient rounded to bf16."""
    projected, h0, starts, padding = cell_inputs(num_gates, 40, width=16)
    fast_input = projected.bfloat16().requires_grad_()
    slow_input = fast_input.detach().float().requires_grad_()
    fast = gated_scan(fast_input, num_gates, h0, starts, padding, chunk_size=CHUNK)
    slow = linear_recurrence_reference(*masked_scan_coefficients(slow_input, num_gates, starts, padding), h0)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert fast_input.grad.dtype == torch.bfloat16
    expected = slow_input.grad.bfloat16().float()
    differ = fast_input.grad.float() != expected
    # Float32 sums in another order can fall on the other side of a bf16 rounding boundary, rarely: one bf16 step
    # (at most 2^-7 relative) at under 1% of the values; rounding twice would move far more, and further.
    assert differ.float().mean().item() < 0.01
    torch.testing.assert_close(fast_input.grad.float(), expected, atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 257])
def test_the_reverse_scan_equals_the_reference_run_backwards(length, with_state):
    """The backward pass's direction, h_t = a_t * h_{t+1} + b_t from the last step (the state enters after it):
    the sequential reference on the time-reversed sequence, reversed back."""
    a, b, h0 = gates_and_inputs(length, seed=3)
    initial = h0 if with_state else None
    expected = linear_recurrence_reference(a.flip(1), b.flip(1), initial).flip(1)
    fast = _chunked_scan(a, b, initial, CHUNK, reverse=True)
    assert fast.shape == (3, length, 5)
    assert (fast - expected).abs().max().item() <= 1e-5
    # In place on fresh copies (as the backward pass calls it): the same states.
    in_place = _chunked_scan(a.clone(), b.clone(), initial, CHUNK, inplace=True, reverse=True)
    assert (in_place - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 3, 32, 1000])
def test_chunk_size_changes_only_speed(chunk_size):
    a, b, h0 = gates_and_inputs(100, seed=1)
    reference = linear_recurrence_reference(a, b, h0)
    torch.testing.assert_close(linear_recurrence_scan(a, b, h0, chunk_size=chunk_size), reference, atol=1e-5, rtol=0)


def test_bf16_long_sequences_stay_finite_and_close_to_fp32():
    # Gates close to 1 (long memory) and close to 0 over 4096 steps: no overflow, no underflow to NaN.
    a, b, h0 = gates_and_inputs(4096, seed=2, batch=2, width=8)
    a = torch.cat([a[..., :4] ** 0.01, a[..., 4:] ** 100], dim=-1)
    reference = linear_recurrence_reference(a.double(), b.double(), h0.double())
    fp32 = linear_recurrence_scan(a, b, h0, chunk_size=32)
    assert (fp32.double() - reference).abs().max().item() <= 1e-4
    bf16 = linear_recurrence_scan(a.bfloat16(), b.bfloat16(), h0.bfloat16(), chunk_size=32)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    # Only the rounding of the inputs and of the output to bf16 remains: the scan itself runs in fp32.
    rounded = linear_recurrence_reference(a.bfloat16().double(), b.bfloat16().double(), h0.bfloat16().double())
    assert (bf16.double() - rounded).abs().max().item() <= 0.01 * rounded.abs().max().item()


@pytest.mark.parametrize("rnn_type", SCAN_TYPES)
def test_model_runs_a_sequential_loop_nowhere_but_in_the_reference(rnn_type, monkeypatch):
    """The model's forward uses the scan; swapping in the reference gives the same logits."""
    import hybrid_rnn_lm.modeling_hybrid_rnn_lm as modeling

    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=2, scan_chunk_size=4))
    ids = random_ids(2, 19)
    with torch.no_grad():
        fast = model(ids).logits
        calls = []

        def reference(projected, num_gates, initial_state=None, document_starts=None, padding_mask=None, chunk_size=4):
            calls.append(projected.shape)
            a, b = masked_scan_coefficients(projected, num_gates, document_starts, padding_mask)
            return linear_recurrence_reference(a, b, initial_state)

        monkeypatch.setattr(modeling, "gated_scan", reference)
        slow = model(ids).logits
    assert len(calls) == 2
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rnn_type", SCAN_TYPES)
def test_a_padded_position_leaves_the_state_unchanged(rnn_type):
    model = peaky_model(tiny_config(rnn_type, "no-attention", num_hidden_layers=1))
    mixer = model.model.layers[0].rnn
    hidden = torch.randn(1, 6, 32)
    mask = torch.tensor([[True, True, False, False, True, False]])
    with torch.no_grad():
        states = mixer._run(mixer.in_proj, hidden, mask, None)
    # a = 1, b = 0 there; the scan regroups the products, so equal up to float32 rounding.
    for padded, previous in ((2, 1), (3, 1), (5, 4)):
        torch.testing.assert_close(states[0, padded], states[0, previous], atol=1e-6, rtol=0)
    assert not torch.allclose(states[0, 4], states[0, 3])  # a real token moves it


@pytest.mark.parametrize("rnn_type", SCAN_TYPES)
def test_gate_biases_spread_memory_and_loaded_weights_are_kept(tmp_path, rnn_type):
    model = peaky_model(tiny_config(rnn_type, "all-attention"))
    bias = model.model.layers[0].rnn.in_proj.bias.detach()
    gates = scan_gate_bias(rnn_type, 32)
    torch.testing.assert_close(bias[: gates.numel()], gates)
    assert bias[gates.numel() :].abs().max() == 0  # the candidate starts unbiased
    # The retention a of every channel at the initial (zero-input) state: from 1/2 to 255/256.
    if rnn_type == "mingru":
        retention = torch.sigmoid(-gates)
    else:
        forget, write = torch.sigmoid(gates[:32]), torch.sigmoid(gates[32:])
        retention = forget / (forget + write)
    torch.testing.assert_close(retention[[0, -1]], torch.tensor([0.5, 1 - 1 / 256]))

    # A scan projection missing from a checkpoint is initialised; everything loaded stays as saved.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = ["model.layers.0.rnn.in_proj.bias"]
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors", {"format": "pt"})
    reloaded = HybridRnnLmForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.model.layers[0].rnn.in_proj.bias[: gates.numel()].detach(), gates)
    for name, value in reloaded.state_dict().items():
        if name not in dropped:
            assert torch.equal(value, model.state_dict()[name]), f"{name} was overwritten on load"


def test_lora_reaches_the_recurrent_projections_and_merges_exactly():
    model = peaky_model(tiny_config("mingru", "every-2nd", num_hidden_layers=2))
    ids = random_ids(2, 9)
    with torch.no_grad():
        base_logits = model(ids).logits
    linears = {f"base_model.model.{name}" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # No target_modules: peft takes the package's default list, every nn.Linear of the model.
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    adapted = get_peft_model(model, config).eval()
    wrapped = {name for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == linears - {"base_model.model.lm_head"}  # the tied head is the embedding: left alone
    assert {f"base_model.model.model.layers.{i}.rnn.in_proj" for i in (0, 1)} <= wrapped
    with torch.no_grad():
        adapted_logits = adapted(ids).logits
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapters change the recurrence
        merged = adapted.merge_and_unload().eval()
        torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert type(merged) is HybridRnnLmForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())


TRAINING_PATHS = {"gru": (torch.nn.GRU, gru_training_forward), "rnn": (torch.nn.RNN, rnn_training_forward)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, 2, 65])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_the_training_path_equals_torch_forward_and_gradients(cell, length, with_state, dtype):
    module, training_forward = TRAINING_PATHS[cell]
    torch.manual_seed(length)
    rnn = module(6, 6, batch_first=True).to(dtype)
    x = torch.randn(3, length, 6, dtype=dtype)
    h0 = torch.randn(1, 3, 6, dtype=dtype) if with_state else torch.zeros(1, 3, 6, dtype=dtype)
    weights = torch.randn(3, length, 6, dtype=dtype)  # a loss that weighs every output differently
    grads = []
    for run in ("torch", "ours"):
        inputs = [x.clone().requires_grad_(), h0.clone().requires_grad_()]
        rnn.zero_grad()
        if run == "torch":
            output, final = rnn(*inputs)
            assert torch.equal(final[0], output[:, -1])
        else:
            output = training_forward(inputs[0], inputs[1][0], *(p for _, p in rnn.named_parameters()))
        (output * weights).sum().backward()
        grads.append((output.detach(), *(t.grad for t in inputs), *(p.grad.clone() for p in rnn.parameters())))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, theirs in zip(grads[1], grads[0]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= tolerance


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_model_trains_through_the_training_path_exactly_as_through_torch(cell, monkeypatch):
    """Loss and every gradient of a GRU / RNN hybrid (gradient checkpointing on, a carried state as in
    --carry-state) are the same whichever path runs; generation and evaluation (no autograd) keep torch's cells."""
    import hybrid_rnn_lm.modeling_hybrid_rnn_lm as modeling

    model = peaky_model(tiny_config(cell, "every-2nd", num_hidden_layers=2)).train()
    model.gradient_checkpointing_enable()
    ids = random_ids(2, 17)
    states = [torch.randn(2, 1, 32) for _ in range(2)]
    calls = []
    name = f"{cell}_training_forward"
    training_forward = getattr(modeling, name)

    def counted(*args):
        calls.append(args[0].shape)
        return training_forward(*args)

    monkeypatch.setattr(modeling, name, counted)
    results = []
    for path_on in (True, False):
        if not path_on:
            monkeypatch.setattr(modeling.HybridRnnLmRecurrentMixer, "_runs_training_path", lambda *_: False)
        model.zero_grad()
        loss = model(ids, labels=ids, recurrent_states=states).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 4  # two layers, and again when checkpointing recomputes them
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for ours, theirs in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        model(ids)
    assert calls == []


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_under_bf16_autocast_the_training_path_keeps_its_recurrence_in_float32(cell):
    """Only the input projection is rounded to bf16 (torch's cells under autocast also round every step's product)."""
    module, training_forward = TRAINING_PATHS[cell]
    torch.manual_seed(0)
    rnn = module(16, 16, batch_first=True)
    x = torch.randn(4, 300, 16)
    reference = rnn(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = training_forward(x.requires_grad_(), torch.zeros(4, 16), *(p for _, p in rnn.named_parameters()))
        theirs = rnn(x)[0]
    assert ours.dtype == torch.float32  # torch's GRU also returns float32 there, its RNN bf16
    ours.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (x, *rnn.parameters()))
    ours_error, theirs_error = (ours - reference).abs().max().item(), (theirs.float() - reference).abs().max().item()
    assert ours_error <= 0.02 and ours_error <= theirs_error
