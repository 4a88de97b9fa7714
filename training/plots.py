"""Loss curve of a run: training and validation loss against the optimizer step, read from metrics.jsonl."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

FIGURE_SIZE_INCHES = (8, 5)
DPI = 100  # 800 x 500 pixels


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file. A last line without its newline is what a kill in the middle of a write
    leaves: it is left out (a resumed run rewrites it)."""
    text = Path(path).read_text()
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # "" when the file ends with a newline
    if torn.strip():
        try:
            json.loads(torn)
        except json.JSONDecodeError:
            torn = ""  # cut off mid-row
        lines.append(torn)
    return [json.loads(line) for line in lines if line.strip()]


def plot_loss_curve(rows: list[dict], path: Path, title: str = "") -> Path:
    """Writes a PNG of train_loss and val_loss vs step (whichever the rows hold) and returns its path."""
    train = [(row["step"], row["train_loss"]) for row in rows if "train_loss" in row]
    val = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    if val:
        axes.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.set_title(title or "loss curve")
    axes.grid(alpha=0.3)
    if train or val:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Path(path)
