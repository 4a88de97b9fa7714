"""Carried recurrent state: the model's recurrent_states, --carry-state training streams, streamed evaluation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from tests.test_generate_cli import run_cli
from tests.test_modeling import peaky_model, tiny_config
from tests.test_train import real_text_file, single_thread, tiny_options  # noqa: F401
from training.arguments import arguments_from_dict
from training.data import load_corpus, split_token_stream, tokenize_corpus
from training.errors import UserError
from training.streams import document_position_ids, evaluate_stream
from training.tokenization import build_tokenizer
from training.train import run_training

RNN_TYPES = ["rnn", "gru", "lstm", "mingru", "minlstm"]
EOS = 2


def carried_logits(model, ids: torch.Tensor, block: int, position_ids=None, starts=None) -> torch.Tensor:
    """Logits of `ids` read `block` tokens at a time (or cut at `starts`), the recurrent state carried between the
    pieces."""
    states, pieces = None, []
    edges = list(starts or range(0, ids.shape[1], block)) + [ids.shape[1]]
    for start, end in zip(edges, edges[1:]):
        kwargs = {} if position_ids is None else {"position_ids": position_ids[:, start:end]}
        output = model(ids[:, start:end], recurrent_states=states, output_recurrent_states=True, **kwargs)
        states = [state.detach() for state in output.recurrent_states]
        pieces.append(output.logits)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("rnn_type", RNN_TYPES)
@torch.no_grad()
def test_carried_state_equals_one_forward_without_attention(rnn_type):
    torch.manual_seed(0)
    model = peaky_model(tiny_config(rnn_type, "no-attention", vocab_size=50)).eval()
    ids = torch.randint(3, 50, (3, 41))
    full = model(ids, use_cache=False).logits
    assert (carried_logits(model, ids, block=16) - full).abs().max() <= 1e-5
    # Without the carried state every piece starts from zeros: the carry is what makes them equal.
    fresh = torch.cat([model(ids[:, s : s + 16], use_cache=False).logits for s in range(0, 41, 16)], dim=1)
    assert (fresh - full).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["no-attention", "all-attention"])
@pytest.mark.parametrize("rnn_type", RNN_TYPES)
@torch.no_grad()
def test_position_ids_restarting_at_zero_drop_the_carried_state(rnn_type, layout):
    """Document A (10 tokens) then B (30), read as two forwards with the state carried and position_ids restarting
    at B: B's logits equal B run alone; a row whose positions start at 0 drops its state. (Attention is not carried,
    so the pieces are cut at the document boundary.)"""
    torch.manual_seed(0)
    model = peaky_model(tiny_config(rnn_type, layout, vocab_size=50)).eval()
    ids = torch.randint(3, 50, (2, 40))
    positions = torch.cat([torch.arange(10), torch.arange(30)])[None].expand(2, -1)
    alone = torch.cat([model(ids[:, :10], use_cache=False).logits, model(ids[:, 10:], use_cache=False).logits], 1)
    assert (carried_logits(model, ids, 0, position_ids=positions, starts=[0, 10]) - alone).abs().max() <= 1e-4
    noise = [torch.randn_like(state) for state in model(ids[:, :3], output_recurrent_states=True).recurrent_states]
    packed = model(ids, position_ids=positions, recurrent_states=noise).logits
    assert (packed[:, 10:] - alone[:, 10:]).abs().max() <= 1e-4


def test_recurrent_states_with_a_cache_or_a_wrong_shape_is_a_clear_error():
    model = peaky_model(tiny_config("gru", "no-attention", vocab_size=50)).eval()
    ids = torch.randint(3, 50, (2, 5))
    states = model(ids, output_recurrent_states=True).recurrent_states
    with pytest.raises(ValueError, match="not both"):
        model(ids, recurrent_states=states, use_cache=True)
    with pytest.raises(ValueError, match=r"recurrent_states\[0\] has shape \(1, 1, 32\), expected \(2, 1, 32\)"):
        model(ids, recurrent_states=[state[:1] for state in states])


def test_document_positions_restart_after_every_eos():
    ids = torch.tensor([[5, EOS, 7, 8, EOS, 9], [4, 4, 4, 4, 4, 4]])
    positions = document_position_ids(ids, EOS, first_is_start=torch.tensor([False, True]))
    assert positions.tolist() == [[1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


# ------------------------------------------------------------------------------------------------------------
# --carry-state training
# ------------------------------------------------------------------------------------------------------------


def test_carried_streams_cover_the_training_split_in_order(tmp_path):
    """Row i of micro-step k is block i * L + k: each row's batches, joined, are one contiguous run of the split's
    token stream, and the rows tile it; a second epoch starts every row again."""
    corpus = real_text_file(tmp_path / "data", 30_000)
    options = tiny_options(tmp_path / "run", dataset=str(corpus), carry_state=True, max_steps=8)
    options.update(gradient_accumulation_steps=2, batch_size=64, block_size=32)  # 13 blocks per row
    seen = []
    run_training(*arguments_from_dict(options), on_batch=lambda step, ids: seen.append(ids.clone()))
    tokenizer = build_tokenizer(str(tmp_path / "run"))
    blocks = tokenize_corpus(load_corpus(corpus), tokenizer, 32)["train"]
    stream = np.asarray(blocks["input_ids"]).reshape(-1)
    length = len(blocks) // 64
    assert 2 <= length < 16  # the 16 micro-steps cross an epoch boundary
    for row in range(64):
        rebuilt = torch.cat([ids[row] for ids in seen[:length]]).numpy()
        assert np.array_equal(rebuilt, stream[row * length * 32 : (row + 1) * length * 32]), row
        assert torch.equal(seen[length][row], seen[0][row])  # the next epoch reads the same stream again


def test_carry_state_run_reports_streamed_validation_on_every_token(tmp_path):
    options = tiny_options(tmp_path / "run", carry_state=True, max_steps=4, eval_steps=2)
    results = run_training(*arguments_from_dict(options))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "val_loss" in row]
    assert all("val_stream_loss" in row for row in evaluations)
    assert results["best_val_loss"] == min(row["val_stream_loss"] for row in evaluations)
    tokenizer = build_tokenizer(str(tmp_path / "run"))
    every_token = len(split_token_stream(load_corpus("python-docs")["validation"], tokenizer))
    assert results["full_validation"]["stream"]["tokens"] == every_token  # the last partial block included


def test_carry_state_is_refused_for_gpt2_before_anything_is_written(tmp_path):
    options = tiny_options(tmp_path / "run", carry_state=True, architecture="gpt2", max_steps=2)
    with pytest.raises(UserError, match="only the hybrid architecture has one"):
        run_training(*arguments_from_dict(options))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------
# Streamed evaluation
# ------------------------------------------------------------------------------------------------------------


def direct_nll(model, stream: np.ndarray) -> float:
    """Mean NLL of every token of `stream`, the text being one document after an EOS: the first token is predicted
    from the EOS, the others from the document alone (one forward pass)."""
    ids = torch.tensor([stream])
    with torch.no_grad():
        first = model(torch.tensor([[EOS]]), use_cache=False).logits[0, -1]
        logits = model(ids, use_cache=False).logits[0, :-1]
    return F.cross_entropy(torch.cat([first[None], logits]).float(), ids[0], reduction="mean").item()


@pytest.mark.parametrize("layout", ["no-attention", "all-attention"])
def test_streamed_evaluation_with_one_block_equals_one_forward_pass(layout):
    torch.manual_seed(0)
    model = peaky_model(tiny_config("gru", layout, vocab_size=50)).eval()
    stream = np.random.default_rng(0).integers(3, 50, size=70)
    result = evaluate_stream(
        Accelerator(cpu=True), model, stream, block_size=128, rows=1, eos_id=EOS, reset_documents=True
    )
    assert result["tokens"] == 70
    assert result["loss"] == pytest.approx(direct_nll(model, stream), abs=1e-5)
    # Without resets (how a block-wise model was trained): one plain forward over the EOS and the text.
    plain = evaluate_stream(Accelerator(cpu=True), model, stream, block_size=128, rows=1, eos_id=EOS)
    ids = torch.tensor([[EOS, *stream]])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, :-1]
    assert plain["loss"] == pytest.approx(F.cross_entropy(logits.float(), ids[0, 1:]).item(), abs=1e-5)


def test_streamed_evaluation_in_small_blocks_equals_one_pass_without_attention():
    torch.manual_seed(0)
    model = peaky_model(tiny_config("mingru", "no-attention", vocab_size=50)).eval()
    stream = np.random.default_rng(1).integers(3, 50, size=101)
    result = evaluate_stream(
        Accelerator(cpu=True), model, stream, block_size=8, rows=1, eos_id=EOS, reset_documents=True
    )
    assert result["tokens"] == 101
    assert result["loss"] == pytest.approx(direct_nll(model, stream), abs=1e-5)
    # Several rows: every token is still scored exactly once.
    assert evaluate_stream(Accelerator(cpu=True), model, stream, block_size=8, rows=4, eos_id=EOS)["tokens"] == 101


def test_eval_cli_scores_every_token_of_a_hybrid_by_default(tmp_path, capsys):
    options = tiny_options(tmp_path / "run", max_steps=2)
    run_training(*arguments_from_dict(options))
    results = {}
    for flags in ([], ["--carry-state"], ["--no-carry-state"]):
        out = tmp_path / f"eval{len(results)}.json"
        code, printed, err = run_cli(capsys, "eval", "--model", str(tmp_path / "run"), *flags, "--output", str(out))
        assert code == 0, err
        assert ("streamed, state carried" in printed) == (flags != ["--no-carry-state"])
        results[len(results)] = json.loads(out.read_text())
    tokenizer = build_tokenizer(str(tmp_path / "run"))
    every_token = len(split_token_stream(load_corpus("python-docs")["validation"], tokenizer))
    assert results[0]["stream"]["tokens"] == every_token > results[0]["tokens_evaluated"]
    assert results[0]["stream"] == results[1]["stream"]  # the default is the streamed reading
    assert results[2]["stream"] is None and results[2]["loss"] == results[0]["loss"]


def test_carried_positions_restart_after_each_eos_whether_read_in_order_or_after_a_resume():
    """position_ids restart right after every EOS, also across block boundaries; a fresh reader (a resumed run)
    at micro-step k gives the same batch as one that read steps 0..k in order."""
    from training.streams import CarriedStreams

    tokenizer = build_tokenizer("char", [load_corpus("python-docs")["train"][0]["text"]])
    blocks = tokenize_corpus(load_corpus("python-docs"), tokenizer, 32)["train"]
    in_order = CarriedStreams(blocks, 4, 0, 1, tokenizer.eos_token_id)
    batches = [in_order.batch(step) for step in range(60)]
    stream = torch.cat([batch["input_ids"] for batch in batches], dim=1)  # (4, 60 * 32): the rows' streams
    positions = torch.cat([batch["position_ids"] for batch in batches], dim=1)
    after_eos = torch.zeros_like(stream, dtype=torch.bool)
    after_eos[:, 1:] = stream[:, :-1] == tokenizer.eos_token_id
    assert after_eos.any()
    assert torch.equal(positions[after_eos], torch.zeros(int(after_eos.sum()), dtype=positions.dtype))
    elsewhere = ~after_eos
    elsewhere[:, 0] = False  # each row's very first token starts its stream
    assert (positions[elsewhere] > 0).all()  # the state is kept everywhere else
    resumed = CarriedStreams(blocks, 4, 0, 1, tokenizer.eos_token_id).batch(37)
    assert torch.equal(resumed["position_ids"], batches[37]["position_ids"])


# ------------------------------------------------------------------------------------------------------------
# --carry-state-streams: several sub-streams per row
# ------------------------------------------------------------------------------------------------------------


def numbered_blocks(count: int, block_size: int, eos_every: int | None = None):
    """A training split of `count` blocks whose token stream is 3, 4, 5, ... (mod 50, EOS every `eos_every`)."""
    from datasets import Dataset

    stream = 3 + np.arange(count * block_size) % 47
    if eos_every:
        stream[eos_every - 1 :: eos_every] = EOS
    return Dataset.from_dict({"input_ids": stream.reshape(count, block_size)}), stream


def test_sub_streams_are_each_read_in_order_once_per_epoch_in_a_seeded_random_interleaving():
    from training.streams import CarriedStreams

    blocks, _ = numbered_blocks(101, 4)
    streams = CarriedStreams(blocks, 4, 0, 1, None, streams_per_row=3, seed=7)
    assert (streams.stream_length, streams.length) == (8, 24)  # 101 blocks // (4 rows x 3) = 8 per sub-stream
    read = np.stack([streams.block_indices(step)[0] for step in range(streams.length)], axis=1)  # (rows, steps)
    for row in range(4):
        region = np.arange(row * 24, (row + 1) * 24)  # the row's run of the split, cut into 3 sub-streams of 8
        assert sorted(read[row]) == region.tolist()  # every block of the run once per epoch
        for stream in range(3):
            own = read[row][(read[row] >= region[0] + 8 * stream) & (read[row] < region[0] + 8 * (stream + 1))]
            assert own.tolist() == list(region[0] + 8 * stream + np.arange(8))  # each sub-stream in order
        assert not np.array_equal(read[row], np.sort(read[row]))  # interleaved, not one sub-stream after another
    next_epoch = np.stack([streams.block_indices(step, epoch=1)[0] for step in range(streams.length)], axis=1)
    assert not np.array_equal(next_epoch, read)  # a new interleaving every epoch ...
    again = CarriedStreams(blocks, 4, 0, 1, None, streams_per_row=3, seed=7)
    assert np.array_equal(np.stack([again.block_indices(s, epoch=1)[0] for s in range(24)], axis=1), next_epoch)
    # ... drawn from the seed, so that a resumed run reads the same; another process reads other rows.
    other = CarriedStreams(blocks, 2, 1, 2, None, streams_per_row=3, seed=7)
    assert set(np.concatenate([other.block_indices(s)[0] for s in range(24)])) == set(range(48, 96))


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
def test_interleaved_sub_streams_carry_each_its_own_state(rnn_type):
    """Training steps over interleaved sub-streams give, block for block, the loss of each sub-stream read in one
    forward pass (its documents reset at every EOS): every block starts from the state its sub-stream's previous
    block ended in."""
    from training.loop import _carried_step
    from training.streams import CarriedState, CarriedStreams

    torch.manual_seed(0)
    model = peaky_model(tiny_config(rnn_type, "no-attention", vocab_size=50)).eval()
    blocks, stream = numbered_blocks(48, 8, eos_every=29)
    streams = CarriedStreams(blocks, 3, 0, 1, EOS, streams_per_row=4, seed=3)
    carried = CarriedState(streams_per_row=4)
    subs = stream.reshape(3 * 4, 4 * 8)  # sub-stream s of row r is line r * 4 + s: 4 blocks of 8
    full_nll = []
    with torch.no_grad():
        for line in subs:
            ids = torch.as_tensor(line)[None]
            starts = torch.ones(1, dtype=torch.bool)
            logits = model(ids, position_ids=document_position_ids(ids, EOS, starts), use_cache=False).logits
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            full_nll.append(nll.reshape(-1))
    with torch.no_grad():
        for step in range(streams.length):
            batch = streams.batch(step)
            loss = _carried_step(model, batch, carried)
            indices, sub = streams.block_indices(step)
            expected = []
            for row in range(3):
                position = indices[row] - (row * 4 + sub[row]) * 4
                # Inside a block the loss scores tokens 1..7 from tokens 0..6.
                expected.append(full_nll[row * 4 + sub[row]][position * 8 : position * 8 + 7])
            assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), abs=1e-5), step


def test_carry_state_streams_is_checked_before_anything_is_written(tmp_path):
    for options, message in [
        (dict(carry_state_streams=2), "only applies with --carry-state"),
        (dict(carry_state=True, carry_state_streams=0), "must be >= 1, got 0"),
        (dict(carry_state=True, carry_state_streams=2, streaming=True, max_steps=2), "drop --streaming"),
    ]:
        with pytest.raises(UserError, match=message):
            run_training(*arguments_from_dict(tiny_options(tmp_path / "run", **options)))
        assert not (tmp_path / "run").exists()
