"""Reading ``metrics.jsonl`` back, and its loss curve (matplotlib, headless)."""

from __future__ import annotations

import json
import warnings

__all__ = ["read_metrics", "plot_loss_curve"]


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, one JSON object per line.

    A last line that does not parse is what a process killed while appending
    leaves behind: it is dropped, with a warning. A bad line anywhere else means
    the file was damaged or edited, and raises ``ValueError`` naming the line.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = e
        if isinstance(record, dict):
            records.append(record)
        elif k == len(lines) - 1:
            warnings.warn(f"{path}:{lineno}: dropped a torn last line (a run stopped while writing it)",
                          stacklevel=2)
        else:
            reason = f"invalid JSON: {record.msg}" if isinstance(record, Exception) else "not a JSON object"
            raise ValueError(f"{path}:{lineno}: not a metrics record ({reason}); repair or delete that line")
    return records


def plot_loss_curve(metrics_path: str, out_path: str) -> str:
    """Draw train loss per step (and eval loss where recorded) to ``out_path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
