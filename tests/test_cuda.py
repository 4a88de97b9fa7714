"""The model on a CUDA GPU: the same numbers as on the CPU (where cuDNN runs GRU / LSTM / RNN and the scan cells run
their own scan), the cache, left padding, bf16 autocast, gradient checkpointing, and `hybrid-lm train` end to end.
Skipped where no GPU is present, and in any run that includes the CPU suite, which hides GPUs (tests/conftest.py);
`pytest tests/test_cuda.py` on a machine with one runs them."""

import math
import os

import pytest
import torch

from hybrid_rnn_lm import HybridRnnLmForCausalLM, HybridRnnLmForSequenceClassification
from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES
from hybrid_rnn_lm.modeling_hybrid_rnn_lm import (
    gated_scan,
    linear_recurrence_reference,
    linear_recurrence_scan,
    masked_scan_coefficients,
)
from tests.conftest import GPU_HIDDEN_REASON
from tests.test_modeling import left_padded_prompts, peaky_model, random_ids, tiny_config
from tests.test_scan import CHUNK, cell_inputs, gates_and_inputs
from tests.test_training_hooks import assert_checkpointing_gives_the_same_gradients

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=GPU_HIDDEN_REASON if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "needs a CUDA GPU",
)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 rounds matrix products to 10 mantissa bits; the comparisons with the CPU are of float32 arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 257])
def test_scan_on_cuda_equals_the_sequential_reference_forward_and_gradients(length, with_state):
    inputs = [t.to(CUDA) for t in gates_and_inputs(length)][: 3 if with_state else 2]
    fast_inputs = [t.clone().requires_grad_() for t in inputs]
    slow_inputs = [t.clone().requires_grad_() for t in inputs]
    fast = linear_recurrence_scan(*fast_inputs, chunk_size=CHUNK)
    slow = linear_recurrence_reference(*slow_inputs)
    assert fast.device.type == "cuda"
    assert (fast - slow).abs().max().item() <= 1e-5
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    for fast_input, slow_input in zip(fast_inputs, slow_inputs):
        fast_grad = torch.zeros_like(fast_input) if fast_input.grad is None else fast_input.grad
        assert (fast_grad - slow_input.grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("num_gates", [1, 2], ids=["mingru", "minlstm"])
def test_gated_scan_with_document_starts_and_padding_on_cuda_equals_the_reference(num_gates):
    projected, h0, starts, padding = (t.to(CUDA) for t in cell_inputs(num_gates, 257))
    fast_input, slow_input = projected.clone().requires_grad_(), projected.clone().requires_grad_()
    fast = gated_scan(fast_input, num_gates, h0, starts, padding, chunk_size=CHUNK)
    slow = linear_recurrence_reference(*masked_scan_coefficients(slow_input, num_gates, starts, padding), h0)
    assert (fast - slow).abs().max().item() <= 1e-5
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert (fast_input.grad - slow_input.grad).abs().max().item() <= 1e-5


def test_bf16_scan_over_4096_steps_on_cuda_stays_finite_and_close_to_float64():
    a, b, h0 = gates_and_inputs(4096, seed=2, batch=2, width=8)
    a = torch.cat([a[..., :4] ** 0.01, a[..., 4:] ** 100], dim=-1)  # long memory and almost none
    bf16 = linear_recurrence_scan(*(t.to(CUDA, torch.bfloat16) for t in (a, b, h0)), chunk_size=32)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    rounded = linear_recurrence_reference(*(t.bfloat16().double() for t in (a, b, h0)))
    assert (bf16.cpu().double() - rounded).abs().max().item() <= 0.01 * rounded.abs().max().item()


def cpu_and_cuda_copies(config, cls=HybridRnnLmForCausalLM, seed: int = 0):
    torch.manual_seed(seed)
    config.initializer_range = 0.3
    cpu = cls(config).eval()
    gpu = cls(config).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_cuda_logits_loss_and_gradients_equal_the_cpu(rnn_type):
    cpu, gpu = cpu_and_cuda_copies(tiny_config(rnn_type, "every-2nd", num_hidden_layers=3))
    cpu.train(), gpu.train()  # cuDNN's recurrent backward runs in training mode only; no dropout in either
    ids = random_ids(3, 40)
    cpu_out = cpu(ids, labels=ids)
    gpu_out = gpu(ids.to(CUDA), labels=ids.to(CUDA))
    torch.testing.assert_close(gpu_out.logits.cpu(), cpu_out.logits, atol=1e-4, rtol=1e-4)
    cpu_out.loss.backward()
    gpu_out.loss.backward()
    gpu_grads = dict(gpu.named_parameters())
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(gpu_grads[name].grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_cuda_cache_generate_and_left_padding(rnn_type):
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=3)).to(CUDA)
    ids = random_ids(2, 14, seed=1).to(CUDA)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert full.argmax(-1).unique().numel() > 3
        out = model(ids[:, :4], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4

    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompt = random_ids(2, 5, seed=2).to(CUDA)
    for extra in ({}, {"num_beams": 4, "num_return_sequences": 2}):
        cached = model.generate(prompt, use_cache=True, **settings, **extra)
        assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings, **extra))

    prompts, padded, mask = left_padded_prompts()
    batched = model.generate(padded.to(CUDA), attention_mask=mask.to(CUDA), **settings)
    for row, single in enumerate(prompts):
        alone = model.generate(single[None].to(CUDA), **settings)
        assert torch.equal(batched[row, padded.shape[1] :], alone[0, len(single) :]), f"row {row}"


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
def test_cuda_bf16_autocast_training_step_is_close_to_float32(rnn_type):
    config = tiny_config(rnn_type, "every-2nd", num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    _, model = cpu_and_cuda_copies(config)
    model.train()
    ids = random_ids(4, 512).to(CUDA)
    fp32 = model(ids, labels=ids).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(ids, labels=ids).loss
    bf16.backward()
    assert math.isfinite(bf16.item()) and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "mingru", "minlstm"])
def test_cuda_gradient_checkpointing_gives_the_same_gradients(rnn_type):
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=4)).to(CUDA).train()
    assert_checkpointing_gives_the_same_gradients(model, random_ids(2, 30).to(CUDA))


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
def test_cuda_bidirectional_classifier_equals_the_cpu(rnn_type):
    config = tiny_config(rnn_type, "all-attention", bidirectional=True, num_labels=3)
    cpu, gpu = cpu_and_cuda_copies(config, HybridRnnLmForSequenceClassification)
    _, ids, mask = left_padded_prompts()
    expected = cpu(ids, attention_mask=mask).logits
    torch.testing.assert_close(
        gpu(ids.to(CUDA), attention_mask=mask.to(CUDA)).logits.cpu(), expected, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
def test_train_command_on_cuda_with_bf16_and_exact_resume(tmp_path, rnn_type):
    """`hybrid-lm train` picks the GPU through accelerate; a run stopped at a checkpoint and resumed ends where an
    uninterrupted run ends (to float rounding: cuDNN's and the embedding's backward add in a varying order)."""
    from safetensors.torch import load_file

    from tests.test_train import tiny_options
    from training.arguments import arguments_from_dict
    from training.train import run_training

    common = dict(
        rnn_type=rnn_type,
        mixed_precision="bf16",
        lr_scheduler="constant_with_warmup",  # a schedule that does not depend on max_steps
        eval_steps=4,
        checkpoint_steps=4,
        hidden_dropout=0.1,
    )
    straight = run_training(*arguments_from_dict(tiny_options(tmp_path / "straight", max_steps=8, **common)))
    assert straight["stopped_reason"] == "max_steps" and math.isfinite(straight["best_val_loss"])
    stopped = tiny_options(tmp_path / "resumed", max_steps=4, **common)
    run_training(*arguments_from_dict(stopped))
    resumed = run_training(*arguments_from_dict({**stopped, "max_steps": 8, "resume_from_checkpoint": "latest"}))
    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["resumes"] == [{"step": 4, "changed": {"max_steps": [4, 8]}}]
    assert abs(resumed["best_val_loss"] - straight["best_val_loss"]) < 1e-3
    # cuDNN keeps the recurrent weights as views into one buffer: the checkpoint holds every one of them.
    checkpoint = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-8" / "model.safetensors")
    model, info = HybridRnnLmForCausalLM.from_pretrained(tmp_path / "resumed", output_loading_info=True)
    assert not any(info.values()), info
    assert set(model.state_dict()) - set(checkpoint) == {"lm_head.weight"}  # tied to the embeddings
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3, msg=name)
