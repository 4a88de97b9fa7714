"""What fine-tuning tools rely on: gradient checkpointing, Trainer, embedding resizing, tying, classification."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM, HybridRnnLmForSequenceClassification
from tests.test_modeling import VOCAB, peaky_model, random_ids, tiny_config


def assert_checkpointing_gives_the_same_gradients(model, ids) -> None:
    """Gradients of one loss with and without activation checkpointing (the model in training mode)."""

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing and all(block.gradient_checkpointing for block in model.model.layers)
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "mingru", "minlstm"])
def test_gradient_checkpointing_gives_the_same_gradients(rnn_type):
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=4)).train()
    assert_checkpointing_gives_the_same_gradients(model, random_ids(2, 10))


def test_trainer_lowers_the_loss_on_a_repeated_batch(tmp_path):
    torch.manual_seed(0)
    model = HybridRnnLmForCausalLM(tiny_config("gru", "all-attention"))
    ids = random_ids(4, 16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist() * 4, "labels": ids.tolist() * 4})
    with torch.no_grad():
        before = model(ids, labels=ids).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=20,
        report_to=[],
        save_strategy="no",
        logging_steps=4,
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    with torch.no_grad():
        after = model(ids, labels=ids).loss.item()
    assert after < before - 0.5, (before, after)


def test_resize_token_embeddings_keeps_old_rows_and_tying():
    model = peaky_model(tiny_config("gru", "all-attention"))
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 5)
    assert model.config.vocab_size == VOCAB + 5
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], old)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(random_ids(1, 4)).logits.shape[-1] == VOCAB + 5


def test_untied_embeddings_are_separate_parameters():
    model = HybridRnnLmForCausalLM(tiny_config("gru", "all-attention", tie_word_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tied = HybridRnnLmForCausalLM(tiny_config("gru", "all-attention"))
    untied_count = sum(p.numel() for p in model.parameters())
    assert untied_count - sum(p.numel() for p in tied.parameters()) == VOCAB * 32


@pytest.mark.parametrize("rnn_type", ["gru", "mingru", "minlstm"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_classifier_pools_the_last_real_token_whatever_the_padding(bidirectional, rnn_type):
    config = tiny_config(rnn_type, "all-attention", num_labels=3, bidirectional=bidirectional)
    torch.manual_seed(0)
    model = HybridRnnLmForSequenceClassification(config).eval()
    short, long = random_ids(1, 4, seed=1)[0], random_ids(1, 7, seed=2)[0]
    alone = [model(seq[None]).logits[0] for seq in (short, long)]
    for side in ("left", "right"):
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros_like(ids)
        if side == "left":
            ids[0, 3:], mask[0, 3:] = short, 1
        else:
            ids[0, :4], mask[0, :4] = short, 1
        ids[1], mask[1] = long, 1
        logits = model(ids, attention_mask=mask).logits
        assert logits.shape == (2, 3)
        torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], alone[1], atol=1e-5, rtol=1e-5)
    labels = torch.tensor([0, 2])
    assert model(ids, attention_mask=mask, labels=labels).loss.item() > 0


@pytest.mark.parametrize("rnn_type", ["lstm", "minlstm"])
def test_bidirectional_recurrence_sees_the_future_and_is_refused_for_causal_lm(rnn_type):
    config = tiny_config(rnn_type, "no-attention", bidirectional=True, num_labels=2)
    torch.manual_seed(0)
    encoder = HybridRnnLmForSequenceClassification(config).eval()
    ids = random_ids(1, 6)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 5) % VOCAB
    states = encoder.model(ids).last_hidden_state
    assert not torch.allclose(encoder.model(changed).last_hidden_state[0, 0], states[0, 0])
    with pytest.raises(ValueError, match="bidirectional=True cannot be used for a causal language model"):
        HybridRnnLmForCausalLM(HybridRnnLmConfig(bidirectional=True))
