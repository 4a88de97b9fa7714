"""The model itself: shapes, causality, cache equivalence, generation, padding, export, training hooks."""

import pytest
import torch

from hybrid_rnn_lm import (
    HybridRnnLmConfig,
    HybridRnnLmForCausalLM,
)
from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES

VOCAB = 37
# (attention_layers, attention_window): pure RNN, attention everywhere, sliding window, every other layer.
LAYOUTS = {
    "no-attention": ("none", None),
    "all-attention": ("all", None),
    "sliding-window": ("all", 3),
    "every-2nd": (2, None),
}


def tiny_config(rnn_type="gru", layout="all-attention", **overrides) -> HybridRnnLmConfig:
    attention_layers, window = LAYOUTS[layout]
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rnn_type=rnn_type,
        attention_layers=attention_layers,
        attention_window=window,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return HybridRnnLmConfig(**fields)


def peaky_model(config: HybridRnnLmConfig, seed: int = 0) -> HybridRnnLmForCausalLM:
    """A model whose argmax changes along the sequence: a random-init model predicts one token everywhere,
    which hides cache bugs."""
    torch.manual_seed(seed)
    config.initializer_range = 0.3
    model = HybridRnnLmForCausalLM(config).eval()
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("layout", ["no-attention", "all-attention", "sliding-window"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_shapes_loss_and_backward(rnn_type, layout):
    torch.manual_seed(0)
    model = HybridRnnLmForCausalLM(tiny_config(rnn_type, layout))
    ids = random_ids(3, 11)
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 11, VOCAB)
    # A fresh model is close to uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_causality(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout))
    ids = random_ids(2, 12)
    reference = model(ids).logits
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % VOCAB
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(logits[:, t + 1], reference[:, t + 1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_cached_step_decoding_matches_full_forward(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout, num_hidden_layers=3))
    ids = random_ids(2, 14, seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert full.argmax(-1).unique().numel() > 3, "weights are not peaky enough to expose cache bugs"
        # Prefill 4 tokens, then one token at a time through the cache (the window of 3 evicts keys).
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["no-attention", "all-attention", "sliding-window"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_generate_with_and_without_cache_agree(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout))
    prompt = random_ids(2, 5, seed=2)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy_cached = model.generate(prompt, use_cache=True, **settings)
    greedy_plain = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(greedy_cached, greedy_plain)
    assert greedy_cached[:, 5:].unique().numel() > 2
    beam = dict(num_beams=4, num_return_sequences=2, **settings)
    assert torch.equal(model.generate(prompt, use_cache=True, **beam), model.generate(prompt, use_cache=False, **beam))


@pytest.mark.parametrize("layout", ["no-attention", "every-2nd", "sliding-window"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_generation_continues_from_a_cache_handed_back(rnn_type, layout):
    """The multi-turn and prompt-cache patterns: generate() handed a cache and the whole conversation feeds only the
    tokens the cache has not seen (it reads cache.get_seq_length()); fed all of them again, the recurrent state would
    run over the conversation twice. Left-padded rows included."""
    model = peaky_model(tiny_config(rnn_type, layout))
    prompts, ids, mask = left_padded_prompts()
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True, **settings)
    seen = ids.shape[1] + 5 - 1  # the last generated token is not fed yet
    assert [first.cache.get_seq_length(i) for i in range(len(model.model.layers))] == [seen] * len(model.model.layers)
    reply = random_ids(len(prompts), 3, seed=4)
    conversation = torch.cat([first.sequences, reply], dim=1)
    conversation_mask = torch.cat([mask, torch.ones_like(conversation[:, ids.shape[1] :])], dim=1)
    turn = dict(attention_mask=conversation_mask, max_new_tokens=8, **settings)
    continued = model.generate(conversation, cache=first.cache, **turn)
    fresh = model.generate(conversation, **turn)
    assert torch.equal(continued, fresh)
    assert fresh[:, conversation.shape[1] :].unique().numel() > 2

    # A prompt prefix run once and reused: its cache holds the prefix's state after 4 tokens.
    with torch.no_grad():
        prefix = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True).cache
    reused = model.generate(ids, attention_mask=mask, cache=prefix, max_new_tokens=8, **settings)
    assert torch.equal(reused, model.generate(ids, attention_mask=mask, max_new_tokens=8, **settings))


def test_sampling_and_num_return_sequences():
    model = peaky_model(tiny_config("gru", "all-attention"))
    prompt = random_ids(2, 4, seed=3)
    torch.manual_seed(0)
    first = model.generate(prompt, do_sample=True, top_k=10, max_new_tokens=8, num_return_sequences=3)
    torch.manual_seed(0)
    second = model.generate(prompt, do_sample=True, top_k=10, max_new_tokens=8, num_return_sequences=3)
    assert first.shape == (6, 12)
    assert torch.equal(first, second)
    assert torch.equal(first[0, :4], prompt[0]) and torch.equal(first[3, :4], prompt[1])


def left_padded_prompts(lengths=(3, 7, 5)) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, and the batch generate() gets for them: (prompts, ids, attention mask)."""
    prompts = [random_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return prompts, ids, mask


def assert_batch_generates_what_each_prompt_generates_alone(model, **generate_kwargs):
    prompts, ids, mask = left_padded_prompts()
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **settings, **generate_kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **settings)
        assert torch.equal(batched[row, ids.shape[1] :], alone[0, len(prompt) :]), f"row {row} changed by padding"


@pytest.mark.parametrize("layout", ["no-attention", "all-attention", "sliding-window"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout))
    assert_batch_generates_what_each_prompt_generates_alone(model)
    prompts, ids, mask = left_padded_prompts()
    width = ids.shape[1]

    # The forward pass too: a padded row's logits at real positions equal the unpadded ones.
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            torch.testing.assert_close(padded_logits[row, width - len(prompt) :], alone, atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree():
    sdpa = peaky_model(tiny_config("lstm", "every-2nd", num_hidden_layers=4))
    assert sdpa.config._attn_implementation == "sdpa"
    eager = HybridRnnLmForCausalLM(tiny_config("lstm", "every-2nd", num_hidden_layers=4, attn_implementation="eager"))
    eager.load_state_dict(sdpa.state_dict())
    eager.eval()
    assert eager.config._attn_implementation == "eager"
    ids = random_ids(2, 10)
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["all-attention", "sliding-window"])
def test_under_cpu_bf16_autocast_attention_runs_in_float32_on_bf16_projections(layout, monkeypatch):
    """torch's CPU attention kernel is faster in float32 than in bf16 at small head sizes: under autocast the
    projections stay bf16 and the kernel gets float32 inputs (a left-padded batch, with its mask, included)."""
    model = peaky_model(tiny_config("gru", layout))
    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return kernel(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    reference = model(ids, attention_mask=mask, labels=ids)
    assert len(seen) == 2 and seen[0] == (torch.float32,) * 3
    seen.clear()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids, attention_mask=mask, labels=ids)
    assert seen == [(torch.float32,) * 3] * 2  # both attention layers
    assert mixed.loss.item() == pytest.approx(reference.loss.item(), abs=0.02)
    mixed.loss.backward()
    assert model.model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0  # gradients flow through the upcast
    # Outside autocast a bf16 model keeps bf16 attention (decoding a bf16 model does not copy its cache to float32).
    seen.clear()
    model.to(torch.bfloat16).eval()
    model(ids, attention_mask=mask)
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_lstm_under_cpu_bf16_autocast_runs_where_onednn_has_no_bf16_lstm(monkeypatch):
    """CPU autocast sends nn.LSTM to oneDNN in bf16, which needs AVX-512 or AMX: elsewhere torch fails ("could not
    create a primitive descriptor"). There the LSTM runs in float32, and the step goes on in bf16 around it."""
    from hybrid_rnn_lm.modeling_hybrid_rnn_lm import _cpu_autocast_without_lstm_kernel

    lstm, x = torch.nn.LSTM(8, 8, batch_first=True), torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if _cpu_autocast_without_lstm_kernel(x):  # this CPU: torch's own path fails, as the fallback assumes
            with pytest.raises(RuntimeError, match="primitive descriptor"):
                lstm(x)
        else:
            assert lstm(x)[0].dtype == torch.bfloat16  # oneDNN's bf16 LSTM, used as it is

    # The fallback, on any CPU: the cell's output is the float32 LSTM's, bit for bit; the model trains through it.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = peaky_model(tiny_config("lstm", "every-2nd")).train()
    outputs = []
    model.model.layers[0].rnn.rnn.register_forward_hook(
        lambda module, args, output: outputs.append(output[0].data)
    )  # packed too
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the packed path too
    for padding in (None, mask):
        reference = model(ids, attention_mask=padding, labels=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, attention_mask=padding, labels=ids)
        mixed.loss.backward()
        fp32, under_autocast = outputs[-2:]
        assert under_autocast.dtype == torch.float32
        assert torch.equal(under_autocast, fp32)
        assert mixed.loss.item() == pytest.approx(reference.loss.item(), abs=0.02)
        assert model.model.layers[0].rnn.rnn.weight_hh_l0.grad.abs().sum() > 0


def test_hidden_states_and_attentions_outputs():
    config = tiny_config("gru", "every-2nd", num_hidden_layers=4, attn_implementation="eager")
    model = peaky_model(config)
    ids = random_ids(2, 9)
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5  # the embeddings + one per block (the last one normed)
    assert all(h.shape == (2, 9, 32) for h in out.hidden_states)
    assert len(out.attentions) == 2  # blocks 1 and 3 carry attention
    for maps in out.attentions:
        assert maps.shape == (2, 4, 9, 9)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 9))
        assert torch.all(maps.triu(diagonal=1) == 0), "attention looked at the future"


@pytest.mark.parametrize(
    ("hidden_act", "activation"),
    [
        ("gelu", torch.nn.functional.gelu),
        ("relu", torch.relu),
        ("relu2", lambda x: torch.relu(x) ** 2),
        ("silu", torch.nn.functional.silu),
    ],
)
def test_mlp_applies_the_configured_activation_and_a_reload_keeps_it(hidden_act, activation, tmp_path):
    config = tiny_config("mingru", hidden_act=hidden_act)
    model = peaky_model(config)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        expected = mlp.down_proj(activation(mlp.up_proj(x)))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-6)
    ids = random_ids(2, 9)
    model.save_pretrained(tmp_path)
    reloaded = HybridRnnLmForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_act == hidden_act
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
