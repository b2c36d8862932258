"""The loss curve of a run as a PNG (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from membank.artifacts import atomic_write_bytes


def save_loss_curve(losses: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """One line per phase on a shared step axis (raw loss faint, moving average solid)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    start = 0
    for name, values in losses.items():
        if not values:
            continue
        x = np.arange(start, start + len(values))
        line, = ax.plot(x, values, alpha=0.3, linewidth=0.8)
        window = max(1, len(values) // 30)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1:], smooth, color=line.get_color(),
                label=f"{name} ({len(values)} steps)")
        if start:
            ax.axvline(start, color="grey", linewidth=0.5, linestyle="--")
        start += len(values)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if start:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
