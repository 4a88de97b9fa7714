"""Carried recurrent state: contiguous training streams (`--carry-state`) and streamed evaluation.

Training (truncated backpropagation through time, as Zaremba et al. 2014 and AWD-LSTM train): the training split's
blocks are dealt to the rows of the global batch as contiguous runs, so that row r reads blocks r*L, r*L + 1, ...
(L = blocks // rows), one per micro-step; the recurrent state after one micro-step, detached, is the initial state of
the next. Every process owns its own rows (disjoint streams), and an epoch is L micro-steps.

With `--carry-state-streams K` (K > 1) each row's run is cut into K contiguous sub-streams, each with its own carried
state, and every micro-step a row continues one of its sub-streams, drawn at random (seed, epoch, row) so that each
sub-stream is still read in order, block after block, and the epoch reads each once. Consecutive batches then come
from different places of the text (as shuffled blocks do) instead of being neighbours, while every block still starts
from the state its sub-stream's previous block ended in.

Documents: after an EOS a new document starts. Its `position_ids` restart at 0, which the model reads as "reset the
recurrent state here, and keep attention inside the document" (the packed-sequence convention of Hugging Face's
padding-free training); `--carry-state-across-documents` leaves them out, so the state runs on through EOS.

Evaluation: a split's whole token stream (the last partial block included), after one EOS (the token every document
follows in training), is cut into `rows` contiguous parts read block by block with the state carried; every token is
scored exactly once. A part other than the first starts `block_size` tokens early (those warm-up tokens are not scored),
so every token has at least a block of history; with rows = 1 the text is one unbroken stream. For models with
no state (GPT-2), `evaluate_sliding` reads the same stream as overlapping windows instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.errors import UserError


def document_position_ids(input_ids: torch.Tensor, eos_id: int, first_is_start: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token in its document: 0 after every EOS (and at position 0 where `first_is_start`),
    counting up from there; before a row's first start the positions continue from 1 (never 0), so that the model
    keeps the carried state for that part."""
    batch, length = input_ids.shape
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    starts[:, 0] = first_is_start
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    last_start = torch.where(starts, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    return torch.where(last_start >= 0, positions - last_start, positions + 1)


class CarriedStreams:
    """The micro-batches of one process under --carry-state. Row r owns K sub-streams of S blocks each (K =
    `streams_per_row`, S = blocks // (rows * K)), sub-stream j of row r being blocks (r * K + j) * S, ... + S - 1;
    an epoch is K * S micro-steps, and in each a row reads the next block of one of its sub-streams. With K = 1, row r
    of micro-step k is block r * S + k."""

    def __init__(
        self,
        blocks,
        batch_size: int,
        process_index: int,
        num_processes: int,
        eos_id: int | None,
        streams_per_row: int = 1,
        seed: int = 0,
    ):
        rows = batch_size * num_processes
        self.streams_per_row = streams_per_row
        self.stream_length = len(blocks) // (rows * streams_per_row)  # blocks per sub-stream
        if self.stream_length < 1:
            raise UserError(
                f"--carry-state needs at least one block per stream: the training split has {len(blocks)} blocks "
                f"for {rows} rows x {streams_per_row} streams per row; lower --batch-size, --block-size or "
                "--carry-state-streams, or use more data"
            )
        self.length = self.stream_length * streams_per_row  # micro-steps per epoch
        self.blocks = blocks.with_format("numpy")
        self.rows = np.arange(process_index * batch_size, (process_index + 1) * batch_size)  # this process's rows
        self.eos_id = eos_id  # None: no document resets (--carry-state-across-documents)
        self.seed = seed
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, length) sub-stream read by each row at each micro-step of `epoch`, and the block's position in it."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            count, length = self.streams_per_row, self.stream_length
            if count == 1:
                streams = np.zeros((len(self.rows), length), dtype=np.int64)
                positions = np.broadcast_to(np.arange(length), streams.shape)
            else:
                streams = np.stack(
                    [
                        np.random.default_rng([self.seed, epoch, row]).permutation(np.repeat(np.arange(count), length))
                        for row in self.rows
                    ]
                )
                positions = np.empty_like(streams)
                for stream in range(count):  # the k-th time a row reads a sub-stream, it reads its k-th block
                    chosen = streams == stream
                    positions[chosen] = (np.cumsum(chosen, axis=1) - 1)[chosen]
            self._epoch_order = (epoch, streams, positions)
        return self._epoch_order[1], self._epoch_order[2]

    def block_indices(self, micro_step: int, epoch: int = 0, back: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(block of each row at `micro_step`, `back` blocks earlier in its sub-stream; the sub-stream of each row)."""
        streams, positions = self.order(epoch)
        stream = streams[:, micro_step]
        first = (self.rows * self.streams_per_row + stream) * self.stream_length
        return first + positions[:, micro_step] - back, stream

    def batch(self, micro_step: int, epoch: int = 0) -> dict:
        """{"input_ids", "position_ids" (None without resets), "fresh": a new epoch, every carried state starts at 0,
        "streams": the sub-stream each row continues (None with one stream per row)}."""
        indices, stream = self.block_indices(micro_step, epoch)
        input_ids = torch.as_tensor(self.blocks[indices]["input_ids"], dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "position_ids": None,
            "fresh": micro_step == 0,
            "streams": None if self.streams_per_row == 1 else torch.as_tensor(stream),
        }
        if self.eos_id is not None:
            # A sub-stream's first block starts a document; any other continues unless the block before it in its
            # sub-stream ended with an EOS.
            _, positions = self.order(epoch)
            starting = positions[:, micro_step] == 0
            previous, _ = self.block_indices(micro_step, epoch, back=1)
            last = self.blocks[np.where(starting, indices, previous)]["input_ids"][:, -1]
            first_is_start = torch.as_tensor(starting | (last == self.eos_id))
            batch["position_ids"] = document_position_ids(input_ids, self.eos_id, first_is_start)
        return batch


def carried_batch_stream(streams: CarriedStreams, progress, device):
    """Endless micro-batches, epoch after epoch, from `progress`'s (epoch, batches_in_epoch) position."""
    while True:
        while progress.batches_in_epoch < streams.length:
            batch = streams.batch(progress.batches_in_epoch, progress.epoch)
            progress.batches_in_epoch += 1
            yield {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        progress.epoch += 1
        progress.batches_in_epoch = 0


def detach_states(states) -> list[torch.Tensor] | None:
    return None if states is None else [state.detach() for state in states]


class CarriedState:
    """This process's carried recurrent states: per block a (K, B, S, H) tensor (K sub-streams per row, B rows), or
    None at the start of an epoch; saved with every checkpoint as `carried_state-<process>.safetensors` (tensors only,
    never a pickle)."""

    def __init__(self, streams_per_row: int = 1):
        self.streams_per_row = streams_per_row
        self.states: list[torch.Tensor] | None = None

    def take(self, streams: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The states each row continues from: row b's state of sub-stream streams[b] (sub-stream 0 if None)."""
        if self.states is None:
            return None
        if streams is None:
            return [state[0] for state in self.states]
        rows = torch.arange(len(streams), device=streams.device)
        return [state[streams.to(state.device), rows.to(state.device)] for state in self.states]

    def put(self, streams: torch.Tensor | None, states: list[torch.Tensor]) -> None:
        """Keep `states` (detached) as the states of the sub-streams the rows just read. Out of place: the states
        handed out by `take` may be saved for the backward pass that has yet to run."""
        states = detach_states(states)
        if streams is None:
            self.states = [state.unsqueeze(0) for state in states]
            return
        if self.states is None:
            self.states = [state.new_zeros((self.streams_per_row, *state.shape)) for state in states]
        index = (streams.to(states[0].device), torch.arange(len(streams), device=states[0].device))
        self.states = [bank.index_put(index, state) for bank, state in zip(self.states, states)]

    @staticmethod
    def file_name(process_index: int) -> str:
        return f"carried_state-{process_index}.safetensors"

    def save(self, folder, process_index: int) -> None:
        from safetensors.torch import save_file

        tensors = (
            {} if self.states is None else {f"block.{i}": s.contiguous().cpu() for i, s in enumerate(self.states)}
        )
        save_file(tensors, str(folder / self.file_name(process_index)))

    def load(self, folder, process_index: int, device, batch_size: int) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / self.file_name(process_index)
        if not path.is_file():
            raise UserError(
                f"{folder} holds no {path.name}: it was not saved by a --carry-state run with this many processes; "
                "resume with the options and process count the run was trained with"
            )
        try:
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path} cannot be read ({error}); resume from another checkpoint") from None
        states = [tensors[f"block.{i}"] for i in range(len(tensors))] if tensors else None
        if states is not None:
            if states[0].dim() == 3:  # saved with one stream per row, before sub-streams existed
                states = [state.unsqueeze(0) for state in states]
            if tuple(states[0].shape[:2]) != (self.streams_per_row, batch_size):
                raise UserError(
                    f"{path} carries {states[0].shape[0]} streams x {states[0].shape[1]} rows, not "
                    f"--carry-state-streams {self.streams_per_row} x --batch-size {batch_size}; resume with the run's "
                    "options"
                )
        self.states = states


# ------------------------------------------------------------------------------------------------------------
# Streamed evaluation
# ------------------------------------------------------------------------------------------------------------


@dataclass
class StreamLayout:
    """Where each row of a streamed evaluation reads and which of its tokens it scores."""

    inputs: torch.Tensor  # (R, L) token ids fed to the model (right-padded with the prefix id)
    targets: torch.Tensor  # (R, L) the token each position predicts
    scored: torch.Tensor  # (R, L) bool: positions whose prediction counts (each token of the text exactly once)
    document_starts: torch.Tensor  # (R, L) bool: positions right after an EOS (the prefix included)


def stream_layout(stream: np.ndarray, rows: int, block_size: int, prefix_id: int, eos_id: int) -> StreamLayout:
    """`stream` (N,) -> `rows` parts of [prefix] + stream, each scoring a contiguous ~N / rows of the N tokens."""
    full = np.concatenate([[prefix_id], np.asarray(stream, dtype=np.int64)])  # full[i] predicts full[i + 1]
    count = len(full) - 1
    rows = max(1, min(rows, count))
    share = math.ceil(count / rows)
    parts = []
    for row in range(rows):
        first, end = row * share, min((row + 1) * share, count)  # the targets this row scores
        if first >= end:
            break
        begin = max(0, first - block_size)  # warm-up: read, not scored
        parts.append((begin, first, end))
    width = max(end - begin for begin, _, end in parts)
    inputs = np.full((len(parts), width), prefix_id, dtype=np.int64)
    targets = np.zeros((len(parts), width), dtype=np.int64)
    scored = np.zeros((len(parts), width), dtype=bool)
    for row, (begin, first, end) in enumerate(parts):
        inputs[row, : end - begin] = full[begin:end]
        targets[row, : end - begin] = full[begin + 1 : end + 1]
        scored[row, first - begin : end - begin] = True
    inputs = torch.from_numpy(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    starts[:, 0] = True  # every row starts from a zero state
    return StreamLayout(inputs, torch.from_numpy(targets), torch.from_numpy(scored), starts)


@torch.no_grad()
def evaluate_stream(
    accelerator,
    model,
    stream: np.ndarray,
    *,
    block_size: int,
    rows: int,
    eos_id: int,
    reset_documents: bool = False,
    characters_per_token: float | None = None,
    metric=None,
) -> dict:
    """Loss, perplexity and bits of `stream` read as contiguous parts with the recurrent state carried between blocks.

    Rows are shared out between processes; the sums are pooled and turned into numbers by the `language_modeling`
    metric (`metric`, loaded when not given), as block-wise evaluation does. Returns its loss, perplexity and bits
    plus "tokens" (every token of the stream, scored once)."""
    layout = stream_layout(stream, rows, block_size, prefix_id=eos_id, eos_id=eos_id)
    inputs, targets, scored, starts = _local_rows(layout, accelerator)
    sums = _ScoredNll(model, accelerator.device)
    states = None
    for start in range(0, inputs.shape[1], block_size):
        if len(inputs) == 0:
            break
        block = inputs[:, start : start + block_size].to(sums.device)
        kwargs = {}
        if reset_documents:
            kwargs["position_ids"] = document_position_ids(block, eos_id, starts[:, start].to(sums.device))
        output = model(
            input_ids=block, recurrent_states=states, output_recurrent_states=True, use_cache=False, **kwargs
        )
        states = detach_states(output.recurrent_states)
        sums.add(output.logits, targets[:, start : start + block_size], scored[:, start : start + block_size])
    return sums.metrics(accelerator, metric, characters_per_token)


def _local_rows(layout: StreamLayout, accelerator) -> tuple[torch.Tensor, ...]:
    """This process's rows of `layout` (rows are dealt out in turn): inputs, targets, scored, document_starts."""
    mine = slice(accelerator.process_index, None, accelerator.num_processes)
    return layout.inputs[mine], layout.targets[mine], layout.scored[mine], layout.document_starts[mine]


class _ScoredNll:
    """Summed negative log-likelihood of the scored predictions and their count (float64), with the model in eval
    mode until `metrics` pools every process's sums and turns them into numbers."""

    def __init__(self, model, device):
        self.model, self.device, self.was_training = model, device, model.training
        model.eval()
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> None:
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets.to(self.device), reduction="none")
        mask = scored.to(self.device)
        self.nll += (nll * mask).sum().double()
        self.tokens += mask.sum().double()

    def metrics(self, accelerator, metric, characters_per_token) -> dict:
        self.model.train(self.was_training)
        return _pooled_metrics(accelerator, self.nll, self.tokens, metric, characters_per_token)


def _pooled_metrics(accelerator, total_nll, total_tokens, metric, characters_per_token) -> dict:
    """Every process's sums pooled, then turned into numbers by the `language_modeling` metric."""
    total_nll = accelerator.reduce(total_nll, reduction="sum")
    total_tokens = accelerator.reduce(total_tokens, reduction="sum")
    if metric is None:
        from training.train import load_metric

        metric = load_metric(accelerator)
    result = metric.compute(
        nll_sum=[total_nll.item()], num_tokens=[int(total_tokens.item())], characters_per_token=characters_per_token
    )
    return {
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_token": result["bits_per_token"],
        "bits_per_character": result["bits_per_character"],
        "tokens": result["num_tokens"],
    }


def sliding_layout(stream: np.ndarray, block_size: int, stride: int, prefix_id: int) -> StreamLayout:
    """Overlapping windows over [prefix] + `stream` (N tokens to predict). A window is a block of block_size tokens,
    as in training: it reads its first block_size - 1 and predicts its last block_size - 1 (a model trained on
    blocks never learned a prediction at a block's last position: GPT-2's last position embedding is untrained).
    Window k starts at k * stride (the last one ends at the stream's end) and scores the predictions no earlier window
    scored, so every token is scored exactly once, with at least block_size - stride tokens before it (all of them
    in the first window); stride < block_size. One window per row (no document starts: nothing is carried)."""
    full = np.concatenate([[prefix_id], np.asarray(stream, dtype=np.int64)])  # full[i] predicts full[i + 1]
    count = len(full) - 1
    width = min(block_size - 1, count)  # predictions per window
    begins = list(range(0, count - width, stride)) + [count - width]
    windows = np.asarray(begins)[:, None] + np.arange(width)  # (W, width): the index of every input
    scored = np.zeros(windows.shape, dtype=bool)
    scored_until = 0  # targets before this index are already scored
    for row, begin in enumerate(begins):
        scored[row, max(scored_until - begin, 0) :] = True
        scored_until = begin + width
    inputs = torch.from_numpy(full[windows])
    return StreamLayout(
        inputs,
        torch.from_numpy(full[windows + 1]),
        torch.from_numpy(scored),
        torch.zeros_like(inputs, dtype=torch.bool),
    )


@torch.no_grad()
def evaluate_sliding(
    accelerator,
    model,
    stream: np.ndarray,
    *,
    block_size: int,
    stride: int,
    rows: int,
    prefix_id: int,
    characters_per_token: float | None = None,
    metric=None,
) -> dict:
    """Loss, perplexity and bits of `stream` read as overlapping windows (`sliding_layout`), `rows` windows per
    forward pass, each from a fresh start: Hugging Face's sliding-window perplexity for fixed-length models, which
    scores every token with as much context as a block holds. Works for any causal LM (GPT-2 included); windows are
    shared out between processes. Returns the keys of `evaluate_stream` and "stride"."""
    layout = sliding_layout(stream, block_size, stride, prefix_id)
    inputs, targets, scored, _ = _local_rows(layout, accelerator)
    sums = _ScoredNll(model, accelerator.device)
    for start in range(0, len(inputs), rows):
        logits = model(input_ids=inputs[start : start + rows].to(sums.device), use_cache=False).logits
        sums.add(logits, targets[start : start + rows], scored[start : start + rows])
    return {**sums.metrics(accelerator, metric, characters_per_token), "stride": stride}


# ------------------------------------------------------------------------------------------------------------
# --streaming: training data read lazily, never held in memory
# ------------------------------------------------------------------------------------------------------------

SHUFFLE_BUFFER_BLOCKS = 2048  # blocks held for shuffling a streamed corpus (datasets' buffer shuffle)


def streamed_block_batches(blocks, batch_size: int, seed: int, process_index: int, num_processes: int, progress):
    """Endless shuffled micro-batches of a streamed block dataset: this process's share (split_dataset_by_node),
    shuffled through a buffer with seed + epoch, from `progress`'s position. A resume reads the epoch again up to
    that position (time, not memory), so it continues exactly where the interrupted run was."""
    from datasets.distributed import split_dataset_by_node

    mine = split_dataset_by_node(blocks, rank=process_index, world_size=num_processes)
    while True:
        shuffled = mine.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_BLOCKS)
        shuffled.set_epoch(progress.epoch)
        skip = progress.batches_in_epoch * batch_size
        rows = shuffled.skip(skip) if skip else shuffled
        yielded = False
        for batch in rows.iter(batch_size=batch_size, drop_last_batch=True):
            progress.batches_in_epoch += 1
            yielded = True
            yield {"input_ids": torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)}
        if not yielded and progress.batches_in_epoch == 0:
            raise UserError(
                f"the streamed training split has fewer than {batch_size} blocks per process; lower --batch-size or "
                "--block-size, or use more data"
            )
        progress.epoch += 1
        progress.batches_in_epoch = 0


class _RowBuffers:
    """Per-row token queues of streamed_row_batches: whole documents in, (B, block) blocks out."""

    def __init__(self, rows: int, block_size: int, eos_id: int, reset_documents: bool):
        self.waiting = [np.empty(0, dtype=np.int64) for _ in range(rows)]
        self.last_token = np.full(rows, eos_id)  # every row starts with a document
        self.block_size, self.eos_id, self.reset_documents = block_size, eos_id, reset_documents
        self.produced = 0

    def add(self, document: list[int]) -> None:
        shortest = min(range(len(self.waiting)), key=lambda index: len(self.waiting[index]))
        self.waiting[shortest] = np.concatenate([self.waiting[shortest], np.asarray(document, dtype=np.int64)])

    def ready(self) -> bool:
        return all(len(row) >= self.block_size for row in self.waiting)

    def take(self) -> dict:
        size = self.block_size
        input_ids = torch.as_tensor(np.stack([row[:size] for row in self.waiting]), dtype=torch.long)
        first_is_start = torch.as_tensor(self.last_token == self.eos_id)
        self.last_token = np.array([row[size - 1] for row in self.waiting])
        self.waiting = [row[size:] for row in self.waiting]
        position_ids = None
        if self.reset_documents:
            position_ids = document_position_ids(input_ids, self.eos_id, first_is_start)
        batch = {"input_ids": input_ids, "position_ids": position_ids, "fresh": self.produced == 0}
        self.produced += 1
        return batch


def streamed_row_batches(
    documents,
    tokenizer,
    block_size: int,
    batch_size: int,
    process_index: int,
    num_processes: int,
    reset_documents: bool,
    progress,
):
    """--streaming --carry-state: this process's documents (split_dataset_by_node) dealt to its `batch_size` rows,
    each next document to the row with the fewest tokens waiting, so that every row is one contiguous stream of whole
    documents; a micro-batch is the next block of every row. An epoch ends when the documents run out. Deterministic,
    so a resume replays the epoch up to its position (time, not memory)."""
    from datasets.distributed import split_dataset_by_node

    from training.data import STREAM_BATCH_DOCUMENTS, _tokenize_documents

    mine = split_dataset_by_node(documents, rank=process_index, world_size=num_processes)
    eos_id = tokenizer.eos_token_id
    while True:
        rows = _RowBuffers(batch_size, block_size, eos_id, reset_documents)
        for texts in mine.iter(batch_size=STREAM_BATCH_DOCUMENTS):
            for document in _tokenize_documents(texts, tokenizer, eos_id)["input_ids"]:
                if document:
                    rows.add(document)
                while rows.ready():
                    batch = rows.take()
                    if rows.produced > progress.batches_in_epoch:  # a resume skips what the run already trained on
                        progress.batches_in_epoch += 1
                        yield batch
        if rows.produced == 0:
            raise UserError(
                f"the streamed training split is too small for {batch_size} rows of {block_size} tokens per process; "
                "lower --batch-size or --block-size, or use more data"
            )
        progress.epoch += 1
        progress.batches_in_epoch = 0
