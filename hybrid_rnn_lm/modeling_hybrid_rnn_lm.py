"""Hybrid recurrent + attention language model.

Each block is pre-norm residual: a recurrent mixer (torch's fused nn.RNN / nn.GRU / nn.LSTM, or a minGRU /
minLSTM computed with a parallel scan), then causal self-attention where the config puts it, then an MLP. The
recurrence gives every position its order, so attention needs no positional embedding.

Generation keeps everything in the standard transformers `DynamicCache`: a block without attention is a
"linear_attention" slot (recurrent state only), a block with attention a "hybrid" slot (recurrent state plus
keys/values, bounded by the window for sliding attention). Each new token then costs one recurrent step.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin, GenerationMode
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import is_tracing

from .configuration_hybrid_rnn_lm import HybridRnnLmConfig

logger = logging.get_logger(__name__)

RNN_CLASSES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

# Every nn.Linear of the model: attention projections, MLP, the projection after each recurrent cell, and the
# input projection of the scan cells (mingru / minlstm: their whole recurrence is in in_proj). peft's LoraConfig()
# without target_modules picks this list up once the package is imported (see __init__.py).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "out_proj", "in_proj"]

# What `save_pretrained` writes into config.json so that every head loads with trust_remote_code.
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_rnn_lm.HybridRnnLmConfig",
    "AutoModel": "modeling_hybrid_rnn_lm.HybridRnnLmModel",
    "AutoModelForCausalLM": "modeling_hybrid_rnn_lm.HybridRnnLmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hybrid_rnn_lm.HybridRnnLmForSequenceClassification",
}


def _read_recurrent_state(cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """The cached state of block `layer_idx`, (B, S, H), or None before the first step."""
    return None if cache is None else cache.get_recurrent_state(layer_idx)


def _starting_state(cache: Cache | None, layer_idx: int, initial_state: torch.Tensor | None) -> torch.Tensor | None:
    """The state before this forward's first token: the cache's during generation, else a carried one, else None."""
    cached = _read_recurrent_state(cache, layer_idx)
    return initial_state if cached is None else cached


def _write_recurrent_state(cache: Cache | None, state: torch.Tensor, layer_idx: int, num_tokens: int) -> None:
    """Stores the state after this forward's `num_tokens` tokens. Only conv-state updates do the two pieces of
    bookkeeping below in transformers' linear-attention cache layers, and this model has no convolution: without
    the flag the next step would restart from a zero state, and without the count `cache.get_seq_length()` (what
    `generate` reads to skip the tokens a cache already holds when it is handed one back) would stay 0."""
    if cache is None:
        return
    cache.update_recurrent_state(state, layer_idx)
    layer = cache.layers[layer_idx]
    layer.has_previous_state[0] = True
    layer.cumulative_length_linear.add_(num_tokens)


def _cpu_autocast_without_lstm_kernel(hidden_states: torch.Tensor) -> bool:
    """Whether CPU autocast would send nn.LSTM to oneDNN in a precision it cannot run here: its bf16 / fp16 LSTM needs
    AVX-512 (or AMX), and on a CPU without it torch fails with "could not create a primitive descriptor"."""
    if hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported()


class HybridRnnLmRecurrentMixer(nn.Module):
    """A fused single-layer RNN / GRU / LSTM followed by a linear projection back to the residual width.

    The state is cached batch-first as (B, S, H), S = 2 for an LSTM (h and c) and 1 otherwise, so that beam search
    can reorder it along the batch dimension like any other cache tensor.
    """

    def __init__(self, config: HybridRnnLmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_lstm = config.rnn_type == "lstm"
        directions = 2 if config.bidirectional else 1
        self.rnn = RNN_CLASSES[config.rnn_type](
            config.hidden_size, config.hidden_size, batch_first=True, bidirectional=config.bidirectional
        )
        self.out_proj = nn.Linear(directions * config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        document_starts: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output (B, T, H) and the state after the last token, (B, S, H) as the cache holds it.
        `initial_state` (same layout) is the state before the first token when there is no cache (carried state)."""
        cached = _starting_state(cache, self.layer_idx, initial_state)
        initial_state = None if cached is None else self._to_torch_state(cached)
        if self.is_lstm and _cpu_autocast_without_lstm_kernel(hidden_states):
            # oneDNN has no lower-precision LSTM on this CPU (it fails to build one): the cell runs in float32.
            with torch.autocast("cpu", enabled=False):
                output, final_state = self._forward_unprojected(
                    hidden_states.float(), padding_mask, document_starts, initial_state
                )
        else:
            output, final_state = self._forward_unprojected(
                hidden_states, padding_mask, document_starts, initial_state
            )
        final_state = self._to_cache_state(final_state)
        _write_recurrent_state(cache, final_state, self.layer_idx, hidden_states.shape[1])
        return self.out_proj(output), final_state

    def _forward_unprojected(self, hidden_states, padding_mask, document_starts, initial_state):
        if document_starts is not None:  # no cache: from a zero state, or the carried one for each row's first part
            output, final_state = self._forward_documents(hidden_states, document_starts, initial_state)
        elif padding_mask is None and self._runs_training_path(hidden_states):
            h0 = hidden_states.new_zeros(1, *hidden_states.shape[::2]) if initial_state is None else initial_state
            rnn = self.rnn
            forward = gru_training_forward if isinstance(rnn, nn.GRU) else rnn_training_forward
            output = forward(hidden_states, h0[0], rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            final_state = output[:, -1][None]
        elif padding_mask is None:
            output, final_state = self.rnn(hidden_states, initial_state)
        else:
            output, final_state = self._forward_padded(hidden_states, padding_mask, initial_state)
        return output, final_state

    def _runs_training_path(self, hidden_states) -> bool:
        """Whether a GRU or tanh-RNN forward that autograd will go back through can use `gru_training_forward` /
        `rnn_training_forward` (one direction, on the CPU): they give the same values and gradients as nn.GRU /
        nn.RNN, with a faster backward. On a GPU, cuDNN's fused cells run the whole sequence in one kernel and stay.
        nn.LSTM keeps its own path everywhere (oneDNN on the CPU)."""
        weight = self.rnn.weight_hh_l0
        return (
            (isinstance(self.rnn, nn.GRU) or (isinstance(self.rnn, nn.RNN) and self.rnn.nonlinearity == "tanh"))
            and hidden_states.device.type == "cpu"
            and not self.rnn.bidirectional
            and torch.is_grad_enabled()
            and (weight.requires_grad or hidden_states.requires_grad)
            and (hidden_states.dtype == weight.dtype or torch.is_autocast_enabled(hidden_states.device.type))
            and not is_tracing(hidden_states)
        )

    def _forward_padded(self, hidden_states, padding_mask, initial_state):
        """Runs the RNN over the real tokens only, wherever the padding is (left padding in generation).

        Masking inputs does not freeze a GRU/LSTM (the biases still move the state), so each row's real tokens are
        moved to the front, packed, run exactly, and scattered back; padded positions get a zero output.
        """
        batch, length, _ = hidden_states.shape
        lengths = padding_mask.sum(dim=1)
        order = torch.argsort((~padding_mask).to(torch.int8), dim=1, stable=True)  # (B, T): real tokens first
        compact = hidden_states.gather(1, order[..., None].expand_as(hidden_states))
        packed = pack_padded_sequence(compact, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_output, final_state = self.rnn(packed, initial_state)
        compact_output, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=length)
        output = torch.zeros_like(compact_output).scatter(
            1, order[..., None].expand_as(compact_output), compact_output
        )
        empty_rows = lengths == 0
        if bool(empty_rows.any()):  # a row with no real token keeps its state and outputs zeros
            output = output.masked_fill(empty_rows[:, None, None], 0.0)
            previous = initial_state if initial_state is not None else self._zeros_like(final_state)
            final_state = self._select_rows(empty_rows, previous, final_state)
        return output, final_state

    def _forward_documents(self, hidden_states, document_starts, initial_state=None):
        """Packed rows (several documents one after another, no cache): every document runs as its own sequence
        from a zero state, so no state crosses a document boundary; a row's first part (before its first start)
        continues `initial_state` when one is given. Returns each row's state after its last part."""
        batch, length, _ = hidden_states.shape
        starts = document_starts.clone()
        starts[:, 0] = True
        segments = []  # (row, start, end), row-major: concatenating the outputs rebuilds the rows
        for row in range(batch):
            edges = starts[row].nonzero().flatten().tolist() + [length]
            segments += [(row, start, end) for start, end in zip(edges, edges[1:])]
        pieces = [hidden_states[row, start:end] for row, start, end in segments]
        segment_state = None
        if initial_state is not None:  # (S, B, H) -> (S, segments, H): the row's state for its first part, else 0
            rows = torch.tensor([row for row, _, _ in segments], device=hidden_states.device)
            first = torch.tensor([start == 0 for _, start, _ in segments], device=hidden_states.device)
            segment_state = tuple(
                torch.where(first[None, :, None], state.index_select(1, rows), 0.0)
                for state in (initial_state if self.is_lstm else (initial_state,))
            )
            segment_state = segment_state if self.is_lstm else segment_state[0]
        packed_output, final_state = self.rnn(pack_sequence(pieces, enforce_sorted=False), segment_state)
        padded, _ = pad_packed_sequence(packed_output, batch_first=True)  # (segments, longest, D)
        output = torch.cat([padded[index, : end - start] for index, (_, start, end) in enumerate(segments)])
        last = [max(i for i, segment in enumerate(segments) if segment[0] == row) for row in range(batch)]
        last = torch.tensor(last, device=hidden_states.device)  # each row's last document
        if self.is_lstm:
            return output.view(batch, length, -1), tuple(state.index_select(1, last) for state in final_state)
        return output.view(batch, length, -1), final_state.index_select(1, last)

    def _to_cache_state(self, state) -> torch.Tensor:
        if self.is_lstm:
            state = torch.cat(state, dim=0)  # (2, B, H)
        return state.transpose(0, 1).contiguous()  # (B, S, H)

    def _to_torch_state(self, cached: torch.Tensor):
        state = cached.transpose(0, 1)  # (S, B, H)
        if self.is_lstm:
            return state[0:1].contiguous(), state[1:2].contiguous()
        return state.contiguous()

    def _zeros_like(self, state):
        return tuple(torch.zeros_like(s) for s in state) if self.is_lstm else torch.zeros_like(state)

    def _select_rows(self, rows, if_true, if_false):
        if self.is_lstm:
            return tuple(torch.where(rows[None, :, None], a, b) for a, b in zip(if_true, if_false))
        return torch.where(rows[None, :, None], if_true, if_false)


class _GruSequence(torch.autograd.Function):
    """A one-layer GRU over a whole sequence (torch's gate layout and equations) with a hand-written backward.

    torch's CPU GRU builds 14 autograd nodes per time step, and its backward walks them one by one. Here the
    forward keeps each step's gates, and the backward runs one multiply, one multiply-add and one small matrix
    product per step; every other gradient (all gates, both weight matrices, the biases) is computed for the whole
    sequence at once after the loop.
    """

    @staticmethod
    def forward(ctx, input_gates, h0, weight_hh, bias_hh):
        """input_gates: (T, B, 3H) = x W_ih^T + b_ih, time-major; h0: (B, H). Returns every state, (T, B, H)."""
        length, batch, width = input_gates.shape[0], input_gates.shape[1], h0.shape[-1]
        states = h0.new_empty(length + 1, batch, width)
        states[0] = h0
        hidden_gates = input_gates.new_empty(input_gates.shape)  # h W_hh^T + b_hh at every step
        reset_update = input_gates.new_empty(length, batch, 2 * width)  # r and z, after the sigmoid
        new = h0.new_empty(length, batch, width)  # n, after the tanh
        weight_t = weight_hh.t()
        # Every step's slices, made at once by unbind (indexing them one by one inside the loop costs more than
        # the loop's small operations).
        r_z, n = slice(None, 2 * width), slice(2 * width, None)
        per_step = (
            states.unbind(0),
            states[1:].unbind(0),
            hidden_gates.unbind(0),
            hidden_gates[..., r_z].unbind(0),
            hidden_gates[..., n].unbind(0),
            input_gates[..., r_z].unbind(0),
            input_gates[..., n].unbind(0),
            reset_update.unbind(0),
            reset_update[..., :width].unbind(0),
            reset_update[..., width:].unbind(0),
            new.unbind(0),
        )
        for h, h_next, gates, gates_rz, gates_n, inputs_rz, inputs_n, rz, r, z, n_t in zip(*per_step):
            torch.addmm(bias_hh, h, weight_t, out=gates)
            torch.add(inputs_rz, gates_rz, out=rz).sigmoid_()
            torch.addcmul(inputs_n, r, gates_n, out=n_t).tanh_()
            torch.lerp(n_t, h, z, out=h_next)  # h = n + z (h_prev - n)
        ctx.save_for_backward(states, hidden_gates, reset_update, new, weight_hh)
        return states[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        states, hidden_gates, reset_update, new, weight_hh = ctx.saved_tensors
        length, batch, width = grad_states.shape
        r, z = reset_update[..., :width], reset_update[..., width:]
        tanh_slope = (1 - z) * (1 - new * new)  # dh -> d(n before its tanh)
        # dh -> d(hidden gates before their nonlinearities), per step: (T, B, 3, H) for r, z and n
        slopes = torch.stack(
            [
                tanh_slope * hidden_gates[..., 2 * width :] * r * (1 - r),
                (states[:-1] - new) * z * (1 - z),
                tanh_slope * r,
            ],
            dim=2,
        )
        grad_hidden_gates = torch.empty_like(slopes)
        grad_h = grad_states.new_empty(grad_states.shape)  # dL/dh_t, all of it (output and step t + 1); contiguous
        grad_h[length - 1] = grad_states[length - 1]
        grad_h0 = torch.empty_like(states[0])
        grad_h_t, grad_out, slopes_t, z_t = grad_h.unbind(0), grad_states.unbind(0), slopes.unbind(0), z.unbind(0)
        gates_t, gates_flat = grad_hidden_gates.unbind(0), grad_hidden_gates.view(length, batch, -1).unbind(0)
        previous = (grad_h0, *grad_h_t[:-1])  # where step t's dL/dh_{t-1} goes
        for t in range(length - 1, -1, -1):
            torch.mul(grad_h_t[t][:, None], slopes_t[t], out=gates_t[t])
            direct = torch.addcmul(grad_out[t - 1], grad_h_t[t], z_t[t]) if t else grad_h_t[t] * z_t[t]
            torch.addmm(direct, gates_flat[t], weight_hh, out=previous[t])
        grad_hidden_gates = grad_hidden_gates.view(length, batch, 3 * width)
        grad_input_gates = torch.cat([grad_hidden_gates[..., : 2 * width], grad_h * tanh_slope], dim=-1)
        flat = grad_hidden_gates.view(length * batch, 3 * width)
        grad_weight = flat.t() @ states[:-1].reshape(length * batch, width)
        return grad_input_gates, grad_h0, grad_weight, flat.sum(0)


def gru_training_forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh) -> torch.Tensor:
    """Every output of a one-layer batch-first nn.GRU with these weights, (B, T, H), from the state h0 (B, H).
    Equal to the fused nn.GRU in values and gradients (tests/test_scan.py); used when training, on the CPU.

    Under autocast the input projection runs in the low precision, as in nn.GRU, and the recurrence in the weights'
    dtype, as the scan cells' recurrence does (nn.GRU would run its per-step products in the low precision too)."""
    input_gates = nn.functional.linear(input.transpose(0, 1), weight_ih, bias_ih)
    return _recurrence_in_weight_dtype(_GruSequence, input_gates, h0, weight_hh, bias_hh)


def _recurrence_in_weight_dtype(sequence, input_terms, h0, weight_hh, *rest) -> torch.Tensor:
    """Runs a time-major recurrence Function with autocast off, in the weights' dtype; returns (B, T, H)."""
    dtype = weight_hh.dtype
    with torch.autocast(input_terms.device.type, enabled=False):
        states = sequence.apply(input_terms.to(dtype).contiguous(), h0.to(dtype).contiguous(), weight_hh, *rest)
    return states.transpose(0, 1)


class _TanhRnnSequence(torch.autograd.Function):
    """A one-layer tanh RNN over a whole sequence with a hand-written backward: one fused multiply-add and one
    tanh per step forward; one multiply and one small matrix product per step backward."""

    @staticmethod
    def forward(ctx, input_terms, h0, weight_hh):
        """input_terms: (T, B, H) = x W_ih^T + b_ih + b_hh, time-major; h0: (B, H). Returns every state, (T, B, H)."""
        states = h0.new_empty(input_terms.shape[0] + 1, *h0.shape)
        states[0] = h0
        weight_t = weight_hh.t()
        for terms, h, h_next in zip(input_terms.unbind(0), states.unbind(0), states[1:].unbind(0)):
            torch.addmm(terms, h, weight_t, out=h_next).tanh_()
        ctx.save_for_backward(states, weight_hh)
        return states[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        states, weight_hh = ctx.saved_tensors
        length = grad_states.shape[0]
        slopes = 1 - states[1:] * states[1:]  # dh -> d(h before its tanh)
        grad_terms = grad_states.new_empty(grad_states.shape)  # contiguous, whatever the incoming layout
        grad_out, slopes_t, terms_t = grad_states.unbind(0), slopes.unbind(0), grad_terms.unbind(0)
        carried = grad_out[length - 1]  # dL/dh_t, from the output and from step t + 1
        for t in range(length - 1, -1, -1):
            torch.mul(carried, slopes_t[t], out=terms_t[t])
            carried = torch.addmm(grad_out[t - 1], terms_t[t], weight_hh) if t else terms_t[t] @ weight_hh
        flat = grad_terms.view(-1, grad_terms.shape[-1])
        grad_weight = flat.t() @ states[:-1].reshape(flat.shape[0], -1)
        return grad_terms, carried, grad_weight


def rnn_training_forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh) -> torch.Tensor:
    """Every output of a one-layer batch-first tanh nn.RNN with these weights, (B, T, H), from the state h0 (B, H).
    Equal to nn.RNN in values and gradients (tests/test_scan.py); used when training, on the CPU. Under autocast, as
    `gru_training_forward`: the input projection in the low precision, the recurrence in the weights' dtype."""
    input_terms = nn.functional.linear(input.transpose(0, 1), weight_ih, bias_ih) + bias_hh
    return _recurrence_in_weight_dtype(_TanhRnnSequence, input_terms, h0, weight_hh)


def linear_recurrence_reference(
    a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t, one time step after another: the slow, obviously correct path.

    a, b: (B, T, H); initial_state: (B, H) or None (zeros). Returns every h_t, (B, T, H).
    """
    state = torch.zeros_like(b[:, 0]) if initial_state is None else initial_state
    outputs = []
    for t in range(b.shape[1]):
        state = a[:, t] * state + b[:, t]
        outputs.append(state)
    return torch.stack(outputs, dim=1)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float32, or float64 kept: the scans never run in half precision."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def linear_recurrence_scan(
    a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None, chunk_size: int = 4
) -> torch.Tensor:
    """The same h_t = a_t * h_{t-1} + b_t for a whole block at once, in plain PyTorch, with no loop over time.

    a, b: (B, T, H); initial_state: (B, H) or None (zeros). Runs in float32 (bf16 inputs included; float64 stays
    float64) and returns every h_t in the dtype of `b`. The forward pass is `_chunked_scan`; under autograd,
    `_LinearRecurrence` gives the gradients by running the same scan backwards in time instead of differentiating
    through its many small steps.
    """
    dtype = b.dtype
    a, b = _wide(a), _wide(b)
    initial_state = None if initial_state is None else _wide(initial_state)
    inputs = (a, b) if initial_state is None else (a, b, initial_state)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs):
        states = _LinearRecurrence.apply(a, b, initial_state, chunk_size)
    else:
        states = _chunked_scan(a, b, initial_state, chunk_size)
    return states.to(dtype)


def _chunked_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    inplace: bool = False,
    reverse: bool = False,
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t on (B, T, H) float tensors, outside autograd; `reverse` runs the same recurrence from
    the last step to the first, h_t = a_t * h_{t+1} + b_t (`initial_state` then enters after the last step), which
    is what the backward pass needs. a and b are left unchanged, unless `inplace` says that the caller hands over
    two fresh contiguous tensors: then they are the working copies.

    1. The sequence is cut into chunks of `chunk_size` steps, viewed as (B, n, C, H). A sweep over the C positions
       of a chunk runs every chunk at once: each of its C - 1 vectorised multiply-adds advances all n chunks by one
       step, so b becomes the state from a zero start at the chunk's beginning and a the product of the gates.
    2. The chunk ends form a recurrence of the same kind, n = T / chunk_size long: this function solves it
       recursively, which gives the state entering every chunk.
    3. One multiply-add brings that state into every position of its chunk.
    About 2 passes over the data per level, in place; the recursion is log_chunk_size(T) deep, so a sequence of any
    length takes at most (chunk_size - 1) * log_chunk_size(T) vectorised steps, never one per time step. Nothing is
    concatenated, and nothing is kept for a backward pass. Every gate is in [0, 1], so the scan only multiplies
    numbers of at most 1 and adds: nothing can overflow, at any length.
    """
    batch, length, width = b.shape
    if length == 1:  # a decoding step
        if initial_state is None:
            return b if inplace else b.clone()
        return b.addcmul_(a, initial_state[:, None]) if inplace else torch.addcmul(b, a, initial_state[:, None])
    chunk = min(max(chunk_size, 2), length)
    pad = -length % chunk
    # Working copies; beyond the sequence a = 1, b = 0 (after its end, or before its start when reversed): the
    # padded steps change nothing and are cut off below.
    if pad or not inplace:
        padding = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)
        a = nn.functional.pad(a, padding, value=1.0) if pad else a.clone()
        b = nn.functional.pad(b, padding) if pad else b.clone()
    num_chunks = (length + pad) // chunk
    a = a.view(batch, num_chunks, chunk, width)
    b = b.view(batch, num_chunks, chunk, width)
    carry = num_chunks > 1 or initial_state is not None  # else the gate products are not needed after the sweep
    # 1. Along every chunk at once (step j reads step j - 1, or j + 1 when reversed: distinct slices, in place).
    for step in range(chunk - 2, -1, -1) if reverse else range(1, chunk):
        previous = step + 1 if reverse else step - 1
        b[:, :, step].addcmul_(a[:, :, step], b[:, :, previous])
        if carry:
            a[:, :, step].mul_(a[:, :, previous])
    if carry:
        first, last = (slice(1, None), slice(None, -1)) if reverse else (slice(None, -1), slice(1, None))
        entry = -1 if reverse else 0  # the chunk the initial state enters
        if num_chunks > 1:
            # 2. The state after every chunk (its last step; its first when reversed): a recurrence over chunks.
            edge = 0 if reverse else chunk - 1
            ends = _chunked_scan(a[:, :, edge], b[:, :, edge], initial_state, chunk_size, reverse=reverse)
            # 3. Its decayed contribution at every position of the next chunk.
            b[:, last].addcmul_(a[:, last], ends[:, first, None])
        if initial_state is not None:
            b[:, entry].addcmul_(a[:, entry], initial_state[:, None])
    states = b.view(batch, -1, width)
    return states[:, pad:] if reverse else states[:, :length]


def _gradient_scan(a, grad_states, chunk_size, next_starts=None, next_padding=None):
    """d_t = g_t + a_{t+1} d_{t+1} from g = dL/dh: the gradient reaching every state h_t of h = scan(a, b, h_0), the
    same linear recurrence run from the last step to the first, in place on one fresh copy of g. `next_starts` and
    `next_padding` (masks of steps 1..T-1, or None) mask the gates a_{t+1} as `_mask_gates` does."""
    next_gates = torch.empty_like(a)  # a_{t+1} at step t; nothing follows the last step
    next_gates[:, :-1] = _mask_gates(a[:, 1:], next_starts, next_padding)
    next_gates[:, -1] = 0.0
    grad = grad_states.to(a.dtype, memory_format=torch.contiguous_format, copy=True)
    return _chunked_scan(next_gates, grad, None, chunk_size, inplace=True, reverse=True)


def _scan_backward(a, states, initial_state, grad_states, chunk_size):
    """Gradients of h = scan(a, b, h_0) from g = dL/dh. The gradient reaching h_t, d_t = g_t + a_{t+1} d_{t+1}, is
    the same linear recurrence run from the last step to the first; then dL/db_t = d_t, dL/da_t = d_t * h_{t-1} and
    dL/dh_0 = a_1 * d_1. Returns (grad_a, grad_b, grad_h0 or None)."""
    grad_b = _gradient_scan(a, grad_states, chunk_size)
    grad_a = torch.empty_like(a)
    torch.mul(grad_b[:, 1:], states[:, :-1], out=grad_a[:, 1:])
    if initial_state is None:
        grad_a[:, 0] = 0.0
        return grad_a, grad_b, None
    torch.mul(grad_b[:, 0], initial_state, out=grad_a[:, 0])
    return grad_a, grad_b, grad_b[:, 0] * a[:, 0]


class _LinearRecurrence(torch.autograd.Function):
    """h = scan(a, b, h_0) with the hand-written backward pass of `_scan_backward` instead of autograd through the
    scan's many small steps. `linear_recurrence_reference` differentiated by autograd is the check."""

    @staticmethod
    def forward(ctx, a, b, initial_state, chunk_size):
        states = _chunked_scan(a, b, initial_state, chunk_size)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(a, states, initial_state)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        a, states, initial_state = ctx.saved_tensors
        grad_a, grad_b, grad_initial = _scan_backward(a, states, initial_state, grad_states, ctx.chunk_size)
        return grad_a, grad_b, grad_initial if ctx.needs_input_grad[2] else None, None


def scan_coefficients(projected: torch.Tensor, num_gates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A scan cell's input projection (B, T, (gates + 1) * H) -> a, b of h_t = a_t * h_{t-1} + b_t, in float32.

    minGRU (one gate):   z = sigmoid(g),                      a = 1 - z,       b = z * h~
    minLSTM (two gates): f = sigmoid(g_f), i = sigmoid(g_i),  a = f / (f + i), b = i / (f + i) * h~
    """
    if num_gates == 1:
        update, candidate = _gates(projected, num_gates)
        return 1.0 - update, update * candidate
    forget, write, candidate = _gates(projected, num_gates)
    total = forget + write
    return forget / total, write / total * candidate


def _gates(projected: torch.Tensor, num_gates: int) -> tuple[torch.Tensor, ...]:
    """The projection split into its sigmoid gates and the candidate: (z, h~) or (f, i, h~)."""
    *gates, candidate = _wide(projected).chunk(num_gates + 1, dim=-1)
    return (*(torch.sigmoid(gate) for gate in gates), candidate)


def masked_scan_coefficients(projected, num_gates, document_starts=None, padding_mask=None):
    """`scan_coefficients` with the masks applied: a = 0 at a document start (the state restarts from zero); a = 1,
    b = 0 at a padded position (the state passes unchanged)."""
    a, b = scan_coefficients(projected, num_gates)
    a = _mask_gates(a, document_starts, padding_mask)
    if padding_mask is not None:
        b = b.masked_fill(~padding_mask[..., None], 0.0)
    return a, b


def _mask_gates(a, document_starts, padding_mask):
    if document_starts is not None:
        a = a.masked_fill(document_starts[..., None], 0.0)
    if padding_mask is not None:
        a = a.masked_fill(~padding_mask[..., None], 1.0)
    return a


def _masks_at(document_starts, padding_mask, steps: slice):
    """Both masks (each None or (B, T)) restricted to the time steps `steps`."""
    return tuple(None if mask is None else mask[:, steps] for mask in (document_starts, padding_mask))


class _GatedScan(torch.autograd.Function):
    """A scan cell's gates, masks and scan in one autograd node: from the input projection (B, T, (gates + 1) * H)
    to every state (B, T, H), float32. Only the projection and the states are kept; the backward pass recomputes
    the gates (widening only their part of a bf16 projection) and writes the projection's gradient, in the
    projection's dtype, each value rounded once, from `_scan_backward`'s dL/da and dL/db and the gates' derivatives.
    `masked_scan_coefficients` + `linear_recurrence_reference` differentiated by autograd is the check
    (tests/test_scan.py)."""

    @staticmethod
    def forward(ctx, projected, initial_state, document_starts, padding_mask, num_gates, chunk_size):
        a, b = masked_scan_coefficients(projected, num_gates, document_starts, padding_mask)  # fresh tensors
        states = _chunked_scan(a, b, initial_state, chunk_size, inplace=True)
        ctx.num_gates, ctx.chunk_size = num_gates, chunk_size
        ctx.save_for_backward(projected, states, initial_state, document_starts, padding_mask)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        projected, states, initial_state, document_starts, padding_mask = ctx.saved_tensors
        width = states.shape[-1]
        gates = projected[..., : ctx.num_gates * width]
        gates = _wide(gates).sigmoid_() if gates.dtype in (torch.bfloat16, torch.float16) else gates.sigmoid()
        candidate = projected[..., ctx.num_gates * width :]  # its own dtype: the operations below widen it on the fly
        if ctx.num_gates == 1:
            update = gates
            a = 1.0 - update
        else:
            forget, write = gates.chunk(2, dim=-1)
            total = forget + write
            a = forget / total
        # d_t, the gradient reaching h_t, through the masked gates (0 at a start, 1 at padding); dL/db_t = d_t and
        # dL/da_t = d_t * h_{t-1}.
        next_masks = _masks_at(document_starts, padding_mask, slice(1, None))
        grad = _gradient_scan(a, grad_states, ctx.chunk_size, *next_masks)
        grad_projected = torch.empty(projected.shape, dtype=projected.dtype, device=projected.device)
        # The float32 work space: the projection's gradient itself when it is float32, else one (B, T, H) buffer
        # whose results are rounded once, as they are written.
        wide = grad_projected.dtype == a.dtype
        work = grad_projected[..., :width] if wide else torch.empty_like(states)
        # The candidate minus h_{t-1}, h_{t-1} as the gate sees it (zero at a document start: there a is a constant).
        torch.sub(candidate[:, 1:], states[:, :-1], out=work[:, 1:])
        if initial_state is None:
            work[:, 0] = candidate[:, 0]
        else:
            torch.sub(candidate[:, 0], initial_state, out=work[:, 0])
        if document_starts is not None:
            torch.where(document_starts[..., None], candidate, work, out=work)
        if ctx.num_gates == 1:
            # a = 1 - z, b = z * h~:  dL/dz = dL/db * h~ - dL/da = d (h~ - h_{t-1});  dz/dg = z (1 - z);  dL/dh~ = d z
            work.mul_(grad).mul_(update)
            torch.mul(work, a, out=grad_projected[..., :width])
            torch.mul(grad, update, out=grad_projected[..., width:])
        else:
            # a = f / s, b = i / s * h~ with s = f + i. With q = (dL/db * h~ - dL/da) / s^2 = d (h~ - h_{t-1}) / s^2:
            # dL/df = -q i, dL/di = q f, dL/dh~ = d i / s;  df/dg_f = f (1 - f),  di/dg_i = i (1 - i).
            work.mul_(grad).div_(total).div_(total)  # q
            write_slot, candidate_slot = grad_projected[..., width : 2 * width], grad_projected[..., 2 * width :]
            grad_write = torch.mul(work, forget, out=write_slot if wide else None).mul_(write).mul_(1.0 - write)
            grad_candidate = torch.mul(grad, write, out=candidate_slot if wide else None).div_(total)
            work.mul_(write).mul_(forget).mul_(forget - 1.0)
            if not wide:  # each result rounded once
                grad_projected[..., :width] = work
                write_slot.copy_(grad_write)
                candidate_slot.copy_(grad_candidate)
        if padding_mask is not None:  # a padded step's a and b are constants: no gradient reaches its projection
            grad_projected.masked_fill_(~padding_mask[..., None], 0.0)
        grad_initial = None
        if ctx.needs_input_grad[1]:  # dL/dh_0 = a_1 * d_1, with the masked a
            first_gate = _mask_gates(a[:, :1], *_masks_at(document_starts, padding_mask, slice(0, 1)))
            grad_initial = grad[:, 0] * first_gate[:, 0]
        return grad_projected, grad_initial, None, None, None, None


def gated_scan(
    projected: torch.Tensor,
    num_gates: int,
    initial_state: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    chunk_size: int = 4,
) -> torch.Tensor:
    """Every state (B, T, H), float32, of a minGRU (num_gates=1) or minLSTM (2) cell from its input projection
    (B, T, (num_gates + 1) * H); `initial_state` (B, H) or None; the masks (B, T) bool or None."""
    initial_state = None if initial_state is None else _wide(initial_state)
    needs_grad = projected.requires_grad or (initial_state is not None and initial_state.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _GatedScan.apply(projected, initial_state, document_starts, padding_mask, num_gates, chunk_size)
    a, b = masked_scan_coefficients(projected, num_gates, document_starts, padding_mask)  # fresh tensors
    return _chunked_scan(a, b, initial_state, chunk_size, inplace=True)


TRACEABLE_CHUNK_SIZE = 64
EXPORT_MAX_LENGTH = 8192  # the longest sequence a torch.export-ed scan cell takes (any length up to it)


def linear_recurrence_scan_traceable(
    a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None, chunk_size: int = TRACEABLE_CHUNK_SIZE
) -> torch.Tensor:
    """`linear_recurrence_scan` with no Python branch on the sequence length, for torch.export, ONNX and
    torch.compile(fullgraph=True) with a dynamic length (the fast path recurses a length-dependent number of times).

    1. Chunks of a fixed `chunk_size`, each scanned inside by log2(chunk_size) Hillis-Steele passes (each builds a
       new tensor: no in-place update, which tracing would have to replay).
    2. The state entering every chunk at once: with L_j = sum of log(gate products) of chunks 0..j, the state after
       chunk j is sum_{i <= j} exp(L_j - L_i) B_i + exp(L_j) h_0. Every exponent is <= 0 (gates <= 1), so nothing
       overflows; it costs (T / chunk_size)^2 * H, fine for inference lengths.
    """
    dtype = b.dtype
    a, b = a.float(), b.float()
    batch, length, width = b.shape
    if torch.compiler.is_exporting() and isinstance(length, torch.SymInt):
        # torch.export cannot prove that a dynamic length split into chunks of a symbolic count divides evenly: pad
        # to one fixed size instead, so that every shape below is static and any length up to EXPORT_MAX_LENGTH
        # exports (a static length, such as a decoding step's 1, keeps the short padding).
        torch._check(length <= EXPORT_MAX_LENGTH)
        chunks = EXPORT_MAX_LENGTH // chunk_size + 1
    else:
        # At least one padded step and two chunks, whatever the length: no size becomes 0 or 1 for some lengths
        # only, which torch.compile would have to branch on.
        chunks = length // chunk_size + 2
    pad = chunks * chunk_size - length
    a = nn.functional.pad(a, (0, 0, 0, pad), value=1.0)
    b = nn.functional.pad(b, (0, 0, 0, pad))
    a = a.reshape(batch, -1, chunk_size, width)  # (B, n, C, H)
    b = b.reshape(batch, -1, chunk_size, width)
    offset = 1
    while offset < chunk_size:  # a fixed number of passes
        b = torch.cat([b[:, :, :offset], torch.addcmul(b[:, :, offset:], a[:, :, offset:], b[:, :, :-offset])], dim=2)
        a = torch.cat([a[:, :, :offset], a[:, :, offset:] * a[:, :, :-offset]], dim=2)
        offset *= 2
    log_gates = torch.cumsum(torch.log(a[:, :, -1].clamp_min(1e-30)), dim=1)  # (B, n, H)
    exponents = log_gates[:, :, None] - log_gates[:, None, :]  # (B, n after, n from, H)
    steps = torch.arange(a.shape[1], device=a.device)
    causal = (steps[:, None] >= steps[None, :])[None, :, :, None]  # (1, n after, n from, 1)
    weights = torch.where(causal, torch.exp(exponents.clamp_max(0.0)), 0.0)
    after = (weights * b[:, None, :, -1]).sum(dim=2)  # (B, n, H): the state after each chunk, from h_0 = 0
    if initial_state is not None:
        after = after + torch.exp(log_gates) * initial_state.float()[:, None]
    first = torch.zeros_like(after[:, :1]) if initial_state is None else initial_state.float()[:, None]
    entering = torch.cat([first, after[:, :-1]], dim=1)  # (B, n, H)
    output = torch.addcmul(b, a, entering[:, :, None])
    return output.reshape(batch, -1, width)[:, :length].to(dtype)


class HybridRnnLmScanMixer(nn.Module):
    """minGRU / minLSTM (Feng et al. 2024): a recurrence whose gates depend on the input only, so that a whole block
    is computed at once by a parallel scan (`gated_scan`), then a linear projection back to the residual width.

        minGRU:  z_t = sigmoid(W_z x_t),  h~_t = W_h x_t,  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
        minLSTM: f_t = sigmoid(W_f x_t),  i_t = sigmoid(W_i x_t),  h~_t = W_h x_t,
                 h_t = f_t / (f_t + i_t) * h_{t-1} + i_t / (f_t + i_t) * h~_t

    Both are h_t = a_t * h_{t-1} + b_t with a_t in (0, 1). A padded position gets a = 1, b = 0, so it leaves the state
    exactly unchanged; decoding is one such step per token, the state (B, 1, H) in the cache. Every weight is an
    `nn.Linear` (`in_proj`, `out_proj`), so LoRA and quantisation reach the recurrence.
    """

    def __init__(self, config: HybridRnnLmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = config.scan_chunk_size
        self.num_gates = 1 if config.rnn_type == "mingru" else 2
        width = config.hidden_size
        projection_width = (self.num_gates + 1) * width  # gate(s), then the candidate h~
        self.in_proj = nn.Linear(width, projection_width)
        self.in_proj.gate_bias_init = config.rnn_type  # read by _init_weights (timescale spread of the gates)
        if config.bidirectional:
            self.in_proj_reverse = nn.Linear(width, projection_width)
            self.in_proj_reverse.gate_bias_init = config.rnn_type
        directions = 2 if config.bidirectional else 1
        self.out_proj = nn.Linear(directions * width, width)

    def _run(self, projection, hidden_states, padding_mask, initial_state, document_starts=None):
        projected = projection(hidden_states)
        if is_tracing(projected):  # export / compile: the same recurrence without length-dependent Python branches
            a, b = masked_scan_coefficients(projected, self.num_gates, document_starts, padding_mask)
            return linear_recurrence_scan_traceable(a, b, initial_state)
        return gated_scan(projected, self.num_gates, initial_state, document_starts, padding_mask, self.chunk_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        document_starts: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output (B, T, H) and the state after the last token (B, 1, H); `initial_state` (B, 1, H) is
        the state before the first token when there is no cache (carried state)."""
        cached = _starting_state(cache, self.layer_idx, initial_state)  # (B, 1, H) or None
        initial_state = None if cached is None else cached[:, 0]
        output = self._run(self.in_proj, hidden_states, padding_mask, initial_state, document_starts)
        final_state = output[:, -1:].to(hidden_states.dtype)
        _write_recurrent_state(cache, final_state, self.layer_idx, hidden_states.shape[1])
        if hasattr(self, "in_proj_reverse"):  # encoder use: the same recurrence from the last token backwards
            mask = None if padding_mask is None else padding_mask.flip(1)
            # Backwards, a document's last token starts it: the token before the next document start.
            ends = None if document_starts is None else torch.roll(document_starts, -1, dims=1).flip(1)
            if ends is not None:
                ends[:, 0] = False
            reverse = self._run(self.in_proj_reverse, hidden_states.flip(1), mask, None, ends).flip(1)
            output = torch.cat([output, reverse], dim=-1)
        if padding_mask is not None:  # as the fused cells: padded positions output zeros
            output = output.masked_fill(~padding_mask[..., None], 0.0)
        return self.out_proj(output.to(hidden_states.dtype)), final_state


RECURRENT_MIXERS = {
    "rnn": HybridRnnLmRecurrentMixer,
    "gru": HybridRnnLmRecurrentMixer,
    "lstm": HybridRnnLmRecurrentMixer,
    "mingru": HybridRnnLmScanMixer,
    "minlstm": HybridRnnLmScanMixer,
}


def scan_gate_bias(rnn_type: str, width: int) -> torch.Tensor:
    """Initial gate biases that spread the channels' memory over time scales from 2 to 256 steps.

    With zero biases every channel keeps half of its state per step (a = 0.5) and forgets within a few tokens. As
    Mamba and RG-LRU do, channel j starts with a retention a_j = 1 - 1 / tau_j, tau_j log-spaced in [2, 256].
    minGRU's gate is z = 1 - a (bias -logit(a)); minLSTM's a = f / (f + i) equals sigmoid(beta) for biases +beta / -beta.
    """
    timescale = torch.logspace(math.log10(2.0), math.log10(256.0), width)
    retention = 1.0 - 1.0 / timescale
    logit = torch.log(retention) - torch.log1p(-retention)
    return -logit if rnn_type == "mingru" else torch.cat([logit, -logit])


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """The reference path: explicit softmax(QK^T)V, which also returns the attention maps."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return output, weights


class HybridRnnLmAttention(nn.Module):
    """Multi-head self-attention, causal (optionally windowed), through the transformers attention interface."""

    def __init__(self, config: HybridRnnLmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = not config.bidirectional
        self.num_key_value_groups = 1
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        batch, length, _ = hidden_states.shape
        heads_shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (B, nh, T, hs)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, nh, past + T, hs), window-bounded

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dtype = query.dtype
        # Under CPU autocast, torch's fused CPU attention kernel runs slower in bf16 than in float32 at these head
        # sizes (12 x 4 heads x 64 tokens x 36: 9.0 ms forward + backward in bf16, 4.6 ms in float32; at 256 tokens
        # 38.8 and 32.5 ms): the projections stay in bf16, the attention itself runs in float32.
        upcast = (
            self.config._attn_implementation == "sdpa"
            and query.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and dtype in (torch.bfloat16, torch.float16)
        )
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            output, weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        output = output.to(dtype).reshape(batch, length, -1).contiguous()  # (B, T, H)
        return self.o_proj(output), weights


class HybridRnnLmMLP(nn.Module):
    def __init__(self, config: HybridRnnLmConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class HybridRnnLmBlock(GradientCheckpointingLayer):
    """Pre-norm block: recurrent mixer -> attention (where configured) -> MLP, each around a residual."""

    def __init__(self, config: HybridRnnLmConfig, layer_idx: int):
        super().__init__()
        self.use_residual = config.use_residual
        self.has_attention = layer_idx in config.attention_layer_indices
        self.rnn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rnn = RECURRENT_MIXERS[config.rnn_type](config, layer_idx)
        if self.has_attention:
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.attn = HybridRnnLmAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HybridRnnLmMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def _merge(self, stream: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        update = self.dropout(update)
        return stream + update if self.use_residual else update

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        padding_mask=None,
        cache: Cache | None = None,
        document_starts=None,
        initial_state=None,
        **kwargs,
    ):
        mixed, final_state = self.rnn(
            self.rnn_norm(hidden_states), padding_mask, cache, document_starts, initial_state
        )
        hidden_states = self._merge(hidden_states, mixed)
        attention_weights = None
        if self.has_attention:
            update, attention_weights = self.attn(self.attn_norm(hidden_states), attention_mask, cache, **kwargs)
            hidden_states = self._merge(hidden_states, update)
        hidden_states = self._merge(hidden_states, self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, attention_weights, final_state


class HybridRnnLmPreTrainedModel(PreTrainedModel):
    config_class = HybridRnnLmConfig
    config: HybridRnnLmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridRnnLmBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _is_stateful = True  # a recurrent state cannot be cropped: assisted / prompt-lookup decoding are refused up front

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                rnn_type = getattr(module, "gate_bias_init", None)  # the input projection of a scan cell
                if rnn_type is None:
                    init.zeros_(module.bias)
                else:  # gate biases first, zeros for the candidate; copy_ skips a bias loaded from a checkpoint
                    gates = scan_gate_bias(rnn_type, self.config.hidden_size)
                    init.copy_(module.bias, torch.cat([gates, gates.new_zeros(module.bias.numel() - gates.numel())]))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.RNNBase):
            # Orthogonal recurrent weights (per gate) keep the state's scale over long sequences; zero biases except
            # the LSTM forget gate (second quarter of the gates), opened at 1 so that early training remembers.
            # Gates are initialised through views, which do not carry the "loaded from the checkpoint" flag: check it
            # on the whole parameter so that loaded weights are never overwritten.
            hidden = module.hidden_size
            for name, parameter in module.named_parameters():
                if getattr(parameter, "_is_hf_initialized", False):
                    continue
                if name.startswith("weight_hh"):
                    for gate in parameter.split(hidden, dim=0):
                        torch.nn.init.orthogonal_(gate)
                elif name.startswith("weight_ih"):
                    init.xavier_uniform_(parameter)
                elif name.startswith("bias"):
                    init.zeros_(parameter)
                    if isinstance(module, nn.LSTM) and name.startswith("bias_ih"):
                        torch.nn.init.ones_(parameter[hidden : 2 * hidden])

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Only the saved class's own entry is written by transformers: name every head, so that the folder loads
        # as AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification with trust_remote_code.
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)


@dataclass
class HybridRnnLmOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `recurrent_states`: per block, the recurrent state after the last token, (B, S, H)
    (S = 2 for an LSTM's h and c, else 1), returned when asked for (`output_recurrent_states` or `recurrent_states`)."""

    recurrent_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HybridRnnLmCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `recurrent_states`, as in `HybridRnnLmOutput`."""

    recurrent_states: tuple[torch.FloatTensor, ...] | None = None


class HybridRnnLmModel(HybridRnnLmPreTrainedModel):
    """The stack of blocks without a head: returns the final (normed) hidden states."""

    def __init__(self, config: HybridRnnLmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(HybridRnnLmBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # Mamba's old name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        recurrent_states: tuple[torch.Tensor, ...] | None = None,
        output_recurrent_states: bool | None = None,
        **kwargs,
    ) -> HybridRnnLmOutput:
        """`recurrent_states` (per block, (B, S, H), e.g. the `recurrent_states` of the previous block of the same
        text, detached) start the recurrence from that state instead of zeros: truncated backpropagation through
        time, `hybrid-lm train --carry-state`. A row whose `position_ids` start at 0 begins a new document and drops
        its carried state; inside a row, positions restarting at 0 reset the state as for packed sequences. Only the
        recurrent state is carried: attention sees the tokens of this forward."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if recurrent_states is not None and (cache is not None or use_cache):
            raise ValueError(
                "Pass recurrent_states (carried state, no cache) or a cache (generation), not both; use_cache=False "
                "with recurrent_states"
            )
        if input_ids is not None:
            self._check_input_ids(input_ids)
        elif inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)}); pass at least one token")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, H)
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if use_cache is None:
            carrying = recurrent_states is not None or bool(output_recurrent_states)  # carried state, not a cache
            use_cache = self.config.use_cache and not self.training and not carrying
        if self.config.bidirectional:
            use_cache = False  # an encoder sees the whole sequence at once: nothing to carry forward
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        else:
            self._fit_cache(cache)

        padding_mask = self._padding_mask(attention_mask, inputs_embeds, cache)
        document_starts = self._document_starts(position_ids, attention_mask, inputs_embeds, cache)
        attention_mask = self._attention_mask(attention_mask, inputs_embeds, cache, position_ids)
        if recurrent_states is not None:
            recurrent_states = self._check_recurrent_states(recurrent_states, inputs_embeds, position_ids)

        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states, all_attentions, final_states = [], [], []
        for index, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, attention_weights, final_state = block(
                hidden_states,
                attention_mask=attention_mask,
                padding_mask=padding_mask,
                cache=cache,
                document_starts=document_starts,
                initial_state=None if recurrent_states is None else recurrent_states[index],
                **kwargs,
            )
            final_states.append(final_state)
            if padding_mask is not None:
                # A padded query attends to nothing and may come out NaN; keep padded positions at exactly zero.
                hidden_states = hidden_states.masked_fill(~padding_mask[..., None], 0.0)
            if output_attentions and attention_weights is not None:
                all_attentions.append(attention_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        return_states = output_recurrent_states or (output_recurrent_states is None and recurrent_states is not None)
        return HybridRnnLmOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            recurrent_states=tuple(final_states) if return_states else None,
        )

    def _fit_cache(self, cache: Cache) -> None:
        """A cache handed in. `DynamicCache()` built without the config, as one is for a transformer, has no layers
        yet and would make attention layers of every block on first use: it gets this model's layers (a recurrent
        state per block, keys and values where attention is), in place, so the caller's object fills as usual. A
        cache whose layers do not fit this model is refused in words instead of an IndexError inside the blocks."""
        if isinstance(cache, DynamicCache) and not cache.layers:
            cache.layers.extend(DynamicCache(config=self.config).layers)
            cache.layer_class_to_replicate = None
            return
        layers = getattr(cache, "layers", None)
        fits = (
            isinstance(layers, list)
            and len(layers) == len(self.layers)
            and all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)
            and all(isinstance(layers[index], CacheLayerMixin) for index in self.config.attention_layer_indices)
        )
        if not fits:
            raise ValueError(
                f"the cache passed ({type(cache).__name__}) does not fit this model: it needs {len(self.layers)} "
                "layers, each holding a recurrent state, with keys and values in the attention blocks; build it with "
                "DynamicCache(config=model.config) or StaticCache(config=model.config, max_cache_len=...)"
            )

    def _check_recurrent_states(self, states, inputs_embeds, position_ids) -> list[torch.Tensor]:
        """One (B, S, H) state per block; rows whose position_ids start at 0 (a new document) start from zeros."""
        if len(states) != len(self.layers):
            raise ValueError(f"recurrent_states has {len(states)} entries; this model has {len(self.layers)} blocks")
        batch = inputs_embeds.shape[0]
        states = list(states)
        for index, state in enumerate(states):
            width = 2 if self.config.rnn_type == "lstm" else 1
            if state.shape != (batch, width, self.config.hidden_size):
                raise ValueError(
                    f"recurrent_states[{index}] has shape {tuple(state.shape)}, expected "
                    f"{(batch, width, self.config.hidden_size)} (batch, states, hidden_size)"
                )
        if position_ids is not None:
            fresh = (position_ids.expand(batch, -1)[:, 0] == 0)[:, None, None]  # (B, 1, 1)
            states = [state.masked_fill(fresh, 0.0) for state in states]
        return states

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        """An empty batch or an id outside the vocabulary is a clear ValueError, not an index error deep inside."""
        if input_ids.numel() == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one sequence of one token"
            )
        if is_tracing(input_ids):  # a data-dependent check cannot be traced or exported
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds token id {bad}, outside [0, vocab_size={self.config.vocab_size}); the tokenizer "
                "does not match this model (or resize_token_embeddings was not called after adding tokens)"
            )

    def _padding_mask(self, attention_mask, inputs_embeds, cache) -> torch.Tensor | None:
        """(B, T) bool, True on real tokens of this forward; None when nothing is padded (or one token is decoded)."""
        if isinstance(attention_mask, dict):  # built by generate() for a static cache: one mask per layer kind
            mask = attention_mask.get("linear_attention")
        else:
            mask = create_recurrent_attention_mask(self.config, inputs_embeds, attention_mask, cache)
        return None if mask is None else mask.bool()

    @staticmethod
    def _document_starts(position_ids, attention_mask, inputs_embeds, cache) -> torch.Tensor | None:
        """(B, T) bool, True where a packed row starts a new document (position_ids restart at 0, what
        DataCollatorWithFlattening and TRL's padding-free batches send); None for ordinary rows. Detected exactly when
        transformers' mask utilities detect packed sequences (no attention mask, no cache), so that attention and
        recurrence agree on the documents."""
        if position_ids is None or attention_mask is not None or cache is not None:
            return None
        position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        documents = find_packed_sequence_indices(position_ids)  # (B, T) document index, or None when unpacked
        if documents is None:
            return None
        return torch.diff(documents, dim=1, prepend=documents[:, :1]) != 0

    def _attention_mask(self, attention_mask, inputs_embeds, cache, position_ids=None):
        indices = self.config.attention_layer_indices
        if not indices:
            return None
        if isinstance(attention_mask, dict):  # already built by generate() for a static cache
            kind = "full_attention" if self.config.attention_window is None else "sliding_attention"
            return attention_mask.get(kind, next(iter(attention_mask.values())))
        if self.config.bidirectional:
            return create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "layer_idx": indices[0],
            "position_ids": position_ids,  # packed rows: attention stays within each document
        }
        if self.config.attention_window is None:
            return create_causal_mask(**mask_kwargs)
        return create_sliding_window_causal_mask(**mask_kwargs)


def _keep_last(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    # 0 keeps every position; generate() asks for 1 so the prompt's logits are never materialised.
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, keep, :]


class HybridRnnLmForCausalLM(HybridRnnLmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridRnnLmConfig):
        if config.bidirectional:
            raise ValueError(
                "HybridRnnLmConfig.bidirectional=True cannot be used for a causal language model (it would see the "
                "future); use it with HybridRnnLmForSequenceClassification, or set bidirectional=False"
            )
        super().__init__(config)
        self.model = HybridRnnLmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """Refuses assisted decoding (an assistant model, prompt lookup, early exit) before any forward pass, and
        drafting as another model's assistant before its own first one. Assisted decoding verifies draft tokens, then
        crops both caches back past the rejected ones, and this model records no recurrent states for such a crop.
        transformers refused `_is_stateful` models itself up to 5.24; 5.25 crops its linear-attention cache layers
        from recorded states, a crop that also expects a convolution state, which these layers do not have."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "assisted generation (assistant_model, prompt_lookup_num_tokens, assistant_early_exit) is not "
                f"supported with stateful models such as {type(self).__name__}: its recurrent state cannot be taken "
                "back to before rejected draft tokens; generate without those arguments"
            )
        if getattr(generation_config, "is_assistant", False):  # drafting for another model, which crops this cache
            raise ValueError(
                f"a stateful model such as {type(self).__name__} cannot be the assistant_model of assisted generation: "
                "its recurrent state cannot be taken back to before rejected draft tokens; use a transformer assistant"
            )
        return super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # Mamba's old name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        recurrent_states: tuple[torch.Tensor, ...] | None = None,
        output_recurrent_states: bool | None = None,
        **kwargs,
    ) -> HybridRnnLmCausalLMOutput:
        """`labels` are the input ids themselves (shifted inside); -100 marks positions to ignore. `recurrent_states`:
        see `HybridRnnLmModel.forward` (carried state between consecutive blocks of a text)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            recurrent_states=recurrent_states,
            output_recurrent_states=output_recurrent_states,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(_keep_last(outputs.last_hidden_state, logits_to_keep))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HybridRnnLmCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            recurrent_states=outputs.recurrent_states,
        )


class HybridRnnLmForSequenceClassification(HybridRnnLmPreTrainedModel):
    """Classifies a sequence from the hidden state of its last real token (as GPT-2's classifier does)."""

    def __init__(self, config: HybridRnnLmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HybridRnnLmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # Mamba's old name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, H)
        last = self._last_token_index(input_ids, attention_mask, hidden_states)
        pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]  # (B, H)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _last_token_index(self, input_ids, attention_mask, hidden_states) -> torch.Tensor:
        """Rightmost real token of each row, from the attention mask, else from the pad id (left or right padding)."""
        batch, length = hidden_states.shape[:2]
        positions = torch.arange(length, device=hidden_states.device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            real = attention_mask[:, -length:].to(hidden_states.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            if batch != 1 and self.config.pad_token_id is not None:  # inputs_embeds alone: as in-library models do
                logger.warning_once(
                    f"{type(self).__name__} cannot find pad tokens in inputs_embeds: every row's last position is "
                    "classified; pass attention_mask for padded batches"
                )
            elif batch != 1:
                raise ValueError(
                    "Batched classification needs an attention_mask or config.pad_token_id to find each row's last "
                    "token; pass the tokenizer's attention_mask"
                )
            return torch.full((batch,), length - 1, device=hidden_states.device)
        return (positions * real).argmax(dim=-1)


__all__ = [
    "LORA_TARGET_MODULES",
    "HybridRnnLmForCausalLM",
    "HybridRnnLmForSequenceClassification",
    "HybridRnnLmModel",
    "HybridRnnLmPreTrainedModel",
]
