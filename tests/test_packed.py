"""Packed sequences: several documents in one row, marked by position_ids restarting at 0 (what
DataCollatorWithFlattening and TRL's padding-free training send). No state and no attention crosses a boundary."""

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES
from tests.test_modeling import peaky_model, random_ids, tiny_config


def packed(documents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(documents)[None]  # (1, total)
    positions = torch.cat([torch.arange(len(document)) for document in documents])[None]
    return ids, positions


@pytest.mark.parametrize("layout", ["no-attention", "all-attention", "sliding-window"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
def test_packed_documents_give_the_logits_of_each_document_alone(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout, num_hidden_layers=2))
    documents = [random_ids(1, n, seed=n)[0] for n in (5, 8, 3)]
    ids, positions = packed(documents)
    with torch.no_grad():
        together = model(ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(document[None], use_cache=False).logits[0] for document in documents])
        unpacked = model(ids, use_cache=False).logits[0]  # the same row read as one document
    assert (together - alone).abs().max().item() <= 1e-4
    assert not torch.allclose(unpacked[5:], alone[5:], atol=1e-3)  # the boundaries matter


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "mingru"])
def test_packed_rows_in_a_batch_and_their_gradients(rnn_type):
    """Two packed rows at once; the loss of the packed batch equals the loss of the documents one by one."""
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=2)).train()
    rows = [[random_ids(1, n, seed=n)[0] for n in (4, 6)], [random_ids(1, n, seed=10 + n)[0] for n in (7, 3)]]
    ids = torch.cat([packed(row)[0] for row in rows])
    positions = torch.cat([packed(row)[1] for row in rows])
    labels = ids.clone()
    labels[positions == 0] = -100  # a document's first token is not predicted from the previous document
    loss = model(ids, position_ids=positions, labels=labels, use_cache=False).loss
    documents = [document for row in rows for document in row]
    nll = sum(model(d[None], labels=d[None], use_cache=False).loss * (len(d) - 1) for d in documents)
    torch.testing.assert_close(loss, nll / sum(len(d) - 1 for d in documents), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_flattening_collator_batch_loss_equals_the_padded_batch_loss_and_trainer_trains_on_it(tmp_path):
    model = peaky_model(tiny_config("gru", "every-2nd", num_hidden_layers=2))
    examples = [{"input_ids": random_ids(1, n, seed=n)[0].tolist()} for n in (5, 9, 4)]
    flat = DataCollatorWithFlattening()(examples)
    assert set(flat) >= {"input_ids", "labels", "position_ids"} and flat["input_ids"].shape[0] == 1
    width = max(len(example["input_ids"]) for example in examples)
    padded = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, example in enumerate(examples):
        padded[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    with torch.no_grad():
        flat_loss = model(**flat, use_cache=False).loss
        padded_loss = model(padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(flat_loss, padded_loss, atol=1e-5, rtol=1e-5)

    model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        max_steps=6,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = Dataset.from_list(examples * 4)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithFlattening())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]
