"""`hybrid-lm inspect`: what a saved hybrid model does with one text, as PNGs and a short summary.

Written to --output-dir:
- attention.png: one panel per (attention layer, head), rows = layers, columns = heads; eager attention so the
  maps are the exact softmax weights (query position down, key position across).
- hidden_norms.png: one panel per block: L2 norm of the residual stream after each sub-layer (recurrent,
  attention, MLP) along the sequence, read with forward hooks.
- recurrent_state.png: one panel per block: ||h_t - h_{t-1}|| of the recurrent state (h_{-1} = 0), read where
  the mixer's out_proj takes it (every cell), i.e. how much each token moves the state.
- embeddings.png: the input embeddings of the text's most frequent tokens projected on their first two principal
  components (PCA), each point labelled with its token.
- summary.md (and summary.json with the same numbers), with the nearest neighbours (cosine similarity of the input
  embeddings) of the tokens given with --words.

Files of these names in --output-dir are replaced only when an earlier inspection wrote them (its summary.json says
so); a figure the new inspection does not draw (attention.png of a model without attention) is then removed.
"""

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import torch
from transformers import AutoConfig, AutoModel

from training.arguments import arg, check_types
from training.errors import UserError
from training.generate import check_model_folder, load_model_and_tokenizer, parse_command
from training.model_files import holds_json_object_with

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

PANEL_INCHES = 2.4
LINE_PANEL_INCHES = (10.0, 2.2)
DPI = 100
MAX_TOKEN_LABELS = 48  # beyond this, tick labels are unreadable: positions only
SUB_LAYERS = ("recurrent", "attention", "mlp")
EMBEDDING_FIGURE_INCHES = 8.0
FIGURE_FILES = ("attention.png", "hidden_norms.png", "recurrent_state.png", "embeddings.png")
OUTPUT_FILES = (*FIGURE_FILES, "summary.md", "summary.json")
# Fields every summary.json of `hybrid-lm inspect` has held: how an earlier inspection's folder is recognised.
SUMMARY_FIELDS = {"tokens", "attention_layers", "stream_norms", "state_change_mean", "figures"}


@dataclass
class InspectArguments:
    """Which model, which text, where the figures go."""

    model: str = arg(help="a saved hybrid model folder (causal LM or classifier)")
    output_dir: str = arg(help="folder for the PNGs and summary.md (created if missing)")
    text: str | None = arg(None, "the text to run through the model")
    text_file: str | None = arg(None, "read the text from this file instead of --text")
    max_tokens: int = arg(64, "keep only the first this many tokens (attention maps grow with the square)")
    words: list[str] = arg(
        [], "tokens whose nearest neighbours in the input embeddings (cosine) are listed, e.g. --words king queen"
    )
    neighbours: int = arg(8, "neighbours listed per --words token")
    embedding_tokens: int = arg(
        100, "embeddings.png shows this many of the most frequent tokens of the text (all of it, not --max-tokens)"
    )

    def __post_init__(self):
        check_types(self)
        if (self.text is None) == (self.text_file is None):
            raise UserError("give exactly one of --text TEXT or --text-file FILE")
        if self.max_tokens < 2:
            raise UserError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        for name in ("neighbours", "embedding_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class FigureGrid:
    path: str
    rows: int
    columns: int
    pixels: tuple[int, int]  # (height, width) of the PNG


@dataclass
class Inspection:
    """The numbers behind the figures; summary.md and summary.json are written from this."""

    tokens: list[str]
    attention_layers: list[int]
    # per block: sub-layer -> mean L2 norm of the residual stream after it, over the tokens
    stream_norms: list[dict[str, float]]
    # per block: mean and max of ||h_t - h_{t-1}||, and the position of the max
    state_change_mean: list[float]
    state_change_max: list[float]
    state_change_argmax: list[int]
    # per attention layer, per head: mean entropy (nats), mean distance to the attended keys (tokens)
    attention_entropy: list[list[float]]
    attention_distance: list[list[float]]
    # --words token -> its nearest neighbours [(token, cosine similarity)], most similar first
    neighbours: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    # the tokens of embeddings.png and their 2-D coordinates (first two principal components)
    embedding_tokens: list[str] = field(default_factory=list)
    embedding_coordinates: list[tuple[float, float]] = field(default_factory=list)
    figures: dict[str, FigureGrid] = field(default_factory=dict)


@dataclass
class Trace:
    """Tensors captured during one forward pass, batch dimension removed."""

    streams: list[dict[str, torch.Tensor]]  # per block: sub-layer -> (T, H) stream after it
    states: list[torch.Tensor]  # per block: (T, H') recurrent outputs h_t
    attentions: list[torch.Tensor]  # per attention layer: (heads, T, T)


def load_base_model(path: str):
    """The block stack of any hybrid checkpoint (causal LM or classifier), with eager attention."""
    folder = check_model_folder(path)
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type != "hybrid_rnn_lm":
        raise UserError(
            f"{folder} holds a {model_type} model; inspect reads the recurrent and attention modules of a "
            "hybrid_rnn_lm model: pass one of those"
        )
    return load_model_and_tokenizer(folder, model_class=AutoModel, attn_implementation="eager")


@torch.no_grad()
def trace(model, input_ids: torch.Tensor) -> Trace:
    """One forward pass with hooks: the stream after each sub-layer is the input of the next sub-layer's norm."""
    streams = [dict() for _ in model.layers]
    states: list[torch.Tensor] = [None] * len(model.layers)
    handles = []

    def keep_input(index, name):
        return lambda module, inputs: streams[index].__setitem__(name, inputs[0][0])

    for index, block in enumerate(model.layers):
        if block.has_attention:
            handles.append(block.attn_norm.register_forward_pre_hook(keep_input(index, "recurrent")))
        after_mixer = "attention" if block.has_attention else "recurrent"
        handles.append(block.mlp_norm.register_forward_pre_hook(keep_input(index, after_mixer)))
        handles.append(
            block.register_forward_hook(
                lambda module, inputs, output, i=index: streams[i].__setitem__("mlp", output[0][0])
            )
        )
        handles.append(  # the recurrent states h_t are what the mixer's out_proj reads, for every cell
            block.rnn.out_proj.register_forward_pre_hook(
                lambda module, inputs, i=index: states.__setitem__(i, inputs[0][0])
            )
        )
    try:
        output = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(streams, states, [weights[0] for weights in output.attentions])


def state_changes(states: torch.Tensor) -> torch.Tensor:
    """(T, H) states h_t -> (T,) ||h_t - h_{t-1}||, with h_{-1} = 0 (the initial state)."""
    previous = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
    return (states - previous).norm(dim=-1)


def attention_statistics(weights: torch.Tensor) -> tuple[list[float], list[float]]:
    """(heads, T, T) -> per head: mean entropy of the rows (nats), mean |query - key| distance (tokens)."""
    length = weights.shape[-1]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (heads,)
    positions = torch.arange(length, dtype=weights.dtype)
    distance = (weights * (positions[:, None] - positions[None, :]).abs()).sum(-1).mean(-1)  # (heads,)
    return entropy.tolist(), distance.tolist()


def summarize(tokens: list[str], attention_layers: list[int], captured: Trace) -> Inspection:
    changes = [state_changes(states.float()) for states in captured.states]
    attention = [attention_statistics(weights.float()) for weights in captured.attentions]
    return Inspection(
        tokens=tokens,
        attention_layers=attention_layers,
        stream_norms=[{name: float(t.norm(dim=-1).mean()) for name, t in block.items()} for block in captured.streams],
        state_change_mean=[float(c.mean()) for c in changes],
        state_change_max=[float(c.max()) for c in changes],
        state_change_argmax=[int(c.argmax()) for c in changes],
        attention_entropy=[entropy for entropy, _ in attention],
        attention_distance=[distance for _, distance in attention],
    )


def word_token_id(tokenizer, word: str) -> int:
    """The id of a --words entry: a vocabulary token as spelled (e.g. BPE's "Ġthe"), else the one token it encodes to."""
    vocabulary = tokenizer.get_vocab()
    if word in vocabulary:
        return vocabulary[word]
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and (ids[0] != tokenizer.unk_token_id or word == tokenizer.unk_token):
        return ids[0]
    if not ids or ids == [tokenizer.unk_token_id]:
        raise UserError(f"--words {word!r} is not in the model's vocabulary; give tokens the tokenizer knows")
    pieces = " ".join(repr(tokenizer.convert_ids_to_tokens(index)) for index in ids)
    raise UserError(f"--words {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); give single tokens")


def nearest_neighbours(
    embeddings: torch.Tensor, index: int, count: int, excluded: set[int]
) -> list[tuple[int, float]]:
    """The `count` rows most cosine-similar to row `index` (itself and `excluded` left out), most similar first."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = unit @ unit[index]  # (V,)
    similarity[[index, *excluded]] = -math.inf
    values, indices = similarity.topk(min(count, len(similarity) - 1 - len(excluded)))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def principal_components(rows: torch.Tensor) -> torch.Tensor:
    """(N, H) -> (N, 2): the rows centred and projected on their first two principal directions."""
    centred = rows.float() - rows.float().mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # rows of `directions`: principal axes
    return centred @ directions[:2].T


def frequent_tokens(ids: list[int], count: int, excluded: set[int]) -> list[int]:
    """The `count` most frequent ids (ties: first seen first), special tokens left out."""
    counts = Counter(index for index in ids if index not in excluded)
    return [index for index, _ in counts.most_common(count)]


def plot_embeddings(coordinates: torch.Tensor, labels: list[str], path: Path) -> FigureGrid:
    size = EMBEDDING_FIGURE_INCHES
    figure, axes = plt.subplots(figsize=(size, size), layout="constrained")
    axes.scatter(coordinates[:, 0].numpy(), coordinates[:, 1].numpy(), s=8, color="tab:blue")
    for (x, y), label in zip(coordinates.tolist(), labels):
        axes.annotate(display_token(label), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.grid(alpha=0.3)
    axes.set_title(f"input embeddings of the {len(labels)} most frequent tokens of the text (PCA)", fontsize=9)
    return _save(figure, path, 1, 1)


def display_token(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣") or "∅"


def _label_axis(axes, tokens: list[str], axis: str) -> None:
    if len(tokens) > MAX_TOKEN_LABELS:
        return
    labels = [display_token(token) for token in tokens]
    ticks = range(len(tokens))
    if axis in ("x", "both"):
        axes.set_xticks(ticks, labels, rotation=90, fontsize=6)
    if axis in ("y", "both"):
        axes.set_yticks(ticks, labels, fontsize=6)


def _save(figure, path: Path, rows: int, columns: int) -> FigureGrid:
    figure.savefig(path, dpi=DPI)  # no bbox "tight": the PNG keeps the size of the grid
    width, height = figure.get_size_inches() * DPI
    plt.close(figure)
    return FigureGrid(path.name, rows, columns, (round(height), round(width)))


def plot_attention(captured: Trace, layers: list[int], tokens: list[str], path: Path) -> FigureGrid:
    rows, columns = len(captured.attentions), captured.attentions[0].shape[0]
    figure, axes = plt.subplots(
        rows, columns, figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), squeeze=False, layout="constrained"
    )
    for row, (layer, weights) in enumerate(zip(layers, captured.attentions)):
        for head in range(columns):
            panel = axes[row][head]
            panel.imshow(weights[head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            panel.set_title(f"layer {layer} head {head}", fontsize=8)
            panel.tick_params(labelsize=6)
            _label_axis(panel, tokens, "both" if len(tokens) <= 24 else "none")
    figure.suptitle("attention weights (query down, key across)", fontsize=9)
    return _save(figure, path, rows, columns)


def _line_panels(count: int):
    width, height = LINE_PANEL_INCHES
    return plt.subplots(count, 1, figsize=(width, height * count), squeeze=False, sharex=True, layout="constrained")


def plot_stream_norms(captured: Trace, tokens: list[str], path: Path) -> FigureGrid:
    figure, axes = _line_panels(len(captured.streams))
    colors = {"recurrent": "tab:blue", "attention": "tab:orange", "mlp": "tab:green"}
    for index, streams in enumerate(captured.streams):
        panel = axes[index][0]
        for name in SUB_LAYERS:
            if name in streams:
                panel.plot(streams[name].norm(dim=-1).numpy(), label=f"after {name}", color=colors[name], linewidth=1)
        panel.set_ylabel(f"block {index}\n||h||", fontsize=8)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, loc="upper right")
    axes[-1][0].set_xlabel("token position")
    _label_axis(axes[-1][0], tokens, "x")
    figure.suptitle("L2 norm of the residual stream after each sub-layer", fontsize=9)
    return _save(figure, path, len(captured.streams), 1)


def plot_state_changes(captured: Trace, tokens: list[str], path: Path) -> FigureGrid:
    figure, axes = _line_panels(len(captured.states))
    for index, states in enumerate(captured.states):
        panel = axes[index][0]
        panel.plot(state_changes(states.float()).numpy(), color="tab:purple", marker=".", linewidth=1)
        panel.set_ylabel(f"block {index}\n||Δh||", fontsize=8)
        panel.grid(alpha=0.3)
    axes[-1][0].set_xlabel("token position")
    _label_axis(axes[-1][0], tokens, "x")
    figure.suptitle("recurrent state change per token: ||h_t - h_(t-1)||", fontsize=9)
    return _save(figure, path, len(captured.states), 1)


def summary_markdown(result: Inspection, model_dir: str) -> str:
    shown = "".join(result.tokens)
    lines = [
        f"# Inspection of {model_dir}",
        "",
        f"{len(result.tokens)} tokens: `{shown[:200]!r}`" + (" (truncated)" if len(shown) > 200 else ""),
        "",
        "## Residual stream norm after each sub-layer (mean over tokens)",
        "",
        "| block | recurrent | attention | mlp |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for index, norms in enumerate(result.stream_norms):
        cells = [f"{norms[name]:.4f}" if name in norms else "-" for name in SUB_LAYERS]
        lines.append(f"| {index} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Recurrent state change ||h_t - h_(t-1)|| (h_(-1) = 0)",
        "",
        "| block | mean | max | at position | token |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for index, (mean, largest, where) in enumerate(
        zip(result.state_change_mean, result.state_change_max, result.state_change_argmax)
    ):
        lines.append(f"| {index} | {mean:.4f} | {largest:.4f} | {where} | `{display_token(result.tokens[where])}` |")
    if result.attention_layers:
        lines += [
            "",
            f"## Attention (uniform over all keys would be an entropy of up to {math.log(len(result.tokens)):.3f})",
            "",
            "| block | head | mean entropy (nats) | mean distance attended (tokens) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for layer, entropies, distances in zip(
            result.attention_layers, result.attention_entropy, result.attention_distance
        ):
            for head, (entropy, distance) in enumerate(zip(entropies, distances)):
                lines.append(f"| {layer} | {head} | {entropy:.4f} | {distance:.4f} |")
    else:
        lines += ["", "This model has no attention layers: attention.png is not written."]
    if result.neighbours:
        width = max(len(found) for found in result.neighbours.values())
        lines += [
            "",
            "## Nearest neighbours in the input embeddings (cosine similarity)",
            "",
            "| token | " + " | ".join(str(rank) for rank in range(1, width + 1)) + " |",
            "| --- |" + " --- |" * width,
        ]
        for word, found in result.neighbours.items():
            cells = [f"`{display_token(token)}` {similarity:.3f}" for token, similarity in found]
            lines.append(f"| `{display_token(word)}` | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"- `{grid.path}`: {grid.rows} x {grid.columns} panels" for grid in result.figures.values()]
    return "\n".join(lines) + "\n"


def inspect_text(
    model,
    tokenizer,
    text: str,
    output_dir: Path,
    max_tokens: int,
    words: list[str] = (),
    neighbours: int = 8,
    embedding_tokens: int = 100,
) -> Inspection:
    all_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # all of it, for counts
    ids = all_ids[:max_tokens]
    if not ids:
        raise UserError("the text is empty after tokenization: give some text to inspect")
    word_ids = {word: word_token_id(tokenizer, word) for word in words}  # bad --words fail before any file
    tokens = [tokenizer.decode([token]) for token in ids]
    captured = trace(model, torch.tensor([ids], device=model.device))
    captured = Trace(  # plots and statistics on the CPU
        [{name: t.cpu() for name, t in block.items()} for block in captured.streams],
        [t.cpu() for t in captured.states],
        [t.cpu() for t in captured.attentions],
    )
    layers = list(model.config.attention_layer_indices)
    result = summarize(tokens, layers, captured)
    output_dir.mkdir(parents=True, exist_ok=True)
    if captured.attentions:
        result.figures["attention"] = plot_attention(captured, layers, tokens, output_dir / "attention.png")
    result.figures["hidden_norms"] = plot_stream_norms(captured, tokens, output_dir / "hidden_norms.png")
    result.figures["recurrent_state"] = plot_state_changes(captured, tokens, output_dir / "recurrent_state.png")

    embeddings = model.get_input_embeddings().weight.detach().cpu()
    special = set(tokenizer.all_special_ids)
    special |= {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    for word, index in word_ids.items():
        found = nearest_neighbours(embeddings, index, neighbours, special - {index})
        result.neighbours[word] = [(tokenizer.convert_ids_to_tokens(i), similarity) for i, similarity in found]
    shown = frequent_tokens(all_ids, embedding_tokens, special)
    if len(shown) >= 2:  # a projection needs two points
        coordinates = principal_components(embeddings[shown])
        result.embedding_tokens = tokenizer.convert_ids_to_tokens(shown)
        result.embedding_coordinates = [tuple(point) for point in coordinates.tolist()]
        result.figures["embeddings"] = plot_embeddings(
            coordinates, result.embedding_tokens, output_dir / "embeddings.png"
        )
    return result


def check_output_files(output_dir: Path) -> None:
    """Refuses to replace files of the command's names that an earlier inspection did not write. Writes nothing."""
    present = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
    if not present:
        return
    earlier = holds_json_object_with(output_dir / "summary.json", SUMMARY_FIELDS)
    if not earlier or not all((output_dir / name).is_file() for name in present):
        raise UserError(
            f"{output_dir} already holds {', '.join(present)}, which `hybrid-lm inspect` did not write there "
            "(it would replace them); choose another --output-dir"
        )


def main(argv: list[str]) -> int:
    args = parse_command(
        InspectArguments,
        argv,
        "hybrid-lm inspect",
        "Plot attention maps, hidden-state norms, recurrent state changes and the input embeddings of a saved model "
        "on one text; list the nearest neighbours of --words tokens.",
    )
    text = args.text
    if args.text_file is not None:
        path = Path(args.text_file).expanduser()
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            raise UserError(f"--text-file {args.text_file} {problem}: give the path of a text file")
        text = path.read_text(encoding="utf-8")
    from training.train import check_folder_path

    output_dir = Path(args.output_dir).expanduser()
    check_folder_path(output_dir)  # before the model loads
    check_output_files(output_dir)
    model, tokenizer = load_base_model(args.model)
    result = inspect_text(
        model, tokenizer, text, output_dir, args.max_tokens, args.words, args.neighbours, args.embedding_tokens
    )
    (output_dir / "summary.md").write_text(summary_markdown(result, args.model))
    (output_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    drawn = {Path(grid.path).name for grid in result.figures.values()}
    for name in FIGURE_FILES:  # an earlier inspection's figure that this one does not draw
        if name not in drawn:
            (output_dir / name).unlink(missing_ok=True)
    print(summary_markdown(result, args.model))
    print(f"figures and summary written to {output_dir}")
    return 0
