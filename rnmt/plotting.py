"""Attention heatmaps: one PNG per sentence, source pieces across, target pieces down.

matplotlib is optional (not a dependency of rnmt); without it, plotting is a ConfigError.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from rnmt.errors import ConfigError


def require_matplotlib() -> None:
    """Fail early, before any translation, when plots are asked for but cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--attention-plot needs matplotlib, which is not installed (pip install matplotlib)"
        ) from None


def plot_attention(path: str | Path, src_pieces: list[str], tgt_pieces: list[str],
                   attention: Tensor) -> None:
    """attention (len(tgt_pieces), len(src_pieces)) -> a heatmap written to `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    weights = attention.float().cpu().numpy()
    width = max(4.0, 0.45 * len(src_pieces) + 1.5)
    height = max(3.0, 0.4 * len(tgt_pieces) + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
