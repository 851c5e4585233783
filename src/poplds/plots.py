"""Report figures. Each function reads a result and writes one PNG; matplotlib runs headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .store import DatasetStore  # noqa: E402

#: Neurons drawn at most in the observation-pattern panel (evenly subsampled beyond).
MAX_NEURONS_DRAWN = 2000


def plot_coverage(store_path: str | Path, out: str | Path) -> Path:
    """Which recording observed which neuron, and how much the recordings overlap.

    Panels: (a) recordings × neurons observation matrix, neurons ordered by the recordings
    that observed them; (b) shared-neuron counts between recordings; (c) histogram of the
    number of recordings that observed each neuron.
    """
    store = DatasetStore(store_path)
    names = store.coverage_names
    n_total = len(store.neuron_ids)
    observed = np.zeros((len(names), n_total), dtype=bool)
    for k, name in enumerate(names):
        observed[k, store.neurons(name)] = True
    # order neurons by the first, then the last recording that observed them
    first = np.argmax(observed, axis=0)
    last = len(names) - 1 - np.argmax(observed[::-1], axis=0)
    order = np.lexsort((last, first))
    if n_total > MAX_NEURONS_DRAWN:
        order = order[np.linspace(0, n_total - 1, MAX_NEURONS_DRAWN).astype(int)]
    shared = store.shared_neurons
    per_neuron = store.recordings_per_neuron

    fig, axes = plt.subplots(
        1, 3, figsize=(13, 0.35 * len(names) + 3), gridspec_kw={"width_ratios": [3, 1.3, 1.3]}
    )
    ax = axes[0]
    ax.imshow(observed[:, order], aspect="auto", interpolation="nearest", cmap="Greys")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"neurons ({n_total} in all, ordered by observation pattern)")
    ax.set_title("observed neurons per recording")
    ax = axes[1]
    im = ax.imshow(shared, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                light = shared[i, j] > 0.6 * max(1, shared.max())  # viridis is light up there
                colour = "k" if light else "w"
                ax.text(j, i, str(shared[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("shared neurons")
    ax = axes[2]
    bins = np.arange(0.5, len(names) + 1.5)
    ax.hist(per_neuron, bins=bins, color="0.3")
    ax.set_xlabel("recordings observing a neuron")
    ax.set_ylabel("neurons")
    ax.set_title("coverage")
    fig.suptitle(f"{store.attrs.get('dataset', '')}: {len(names)} recordings")
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig: plt.Figure, out: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out`` under a temporary name, rename it, and close the figure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out


def warning_footer(fig, warnings: list[str], width: int = 130) -> None:
    """Lay the figure out, with the warnings (wrapped) in dark red below the axes."""
    import textwrap

    if not warnings:
        fig.tight_layout()
        return
    lines = [line for w in warnings for line in textwrap.wrap("warning: " + w, width)]
    height = fig.get_size_inches()[1]
    bottom = min(0.5, (0.16 * len(lines) + 0.1) / height)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="darkred", va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 1))
