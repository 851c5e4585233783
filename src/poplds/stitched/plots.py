"""Report figures of a stitched LDS fit. Each function writes one PNG (atomically)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

from ..plots import save_figure, warning_footer  # noqa: E402
from ..report import choose_dimension, choose_stitched  # noqa: E402, F401

CLASS_STYLE = {
    "observed": ("0.55", "recorded together (fitted)"),
    "heldout": ("tab:blue", "recorded together, held out"),
    "never": ("tab:red", "never recorded together (vs truth)"),
}


def plot_loss(model_path: str | Path, out: str | Path) -> Path:
    """Reduced loss per pair against pass, free and linked stages."""
    root = zarr.open_group(str(model_path), mode="r")
    trace = np.asarray(root["loss_trace"][:])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    offset = 0
    for stage, label in ((0, "free X_s"), (1, "linked X_s = A^s Pi")):
        sel = trace[:, 0] == stage
        if sel.any():
            x = offset + trace[sel, 1]
            ax.plot(x, trace[sel, 2], label=label)
            offset = x.max()
    ax.set_xlabel("pass (loss and gradient evaluations)")
    ax.set_ylabel("loss per pair, up to a constant")
    ax.legend()
    ax.set_title("moment-matching loss")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_covariance_scatter(figdata: dict[str, Any], out: str | Path, lags: Sequence[int]) -> Path:
    """Predicted against empirical lagged covariances per pair class, one panel per lag; the
    never co-observed pairs against the true covariances (simulations only)."""
    pred, emp, true, cls = figdata["pred"], figdata["emp"], figdata["true"], figdata["cls"]
    lags = [s for s in lags if s < pred.shape[0]]
    fig, axes = plt.subplots(1, len(lags), figsize=(3.4 * len(lags), 3.6), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, s in zip(axes[0], lags, strict=True):
        lim = 0.0
        for k, name in enumerate(("observed", "heldout", "never")):
            sel = cls[s] == k
            ref = emp[s] if k < 2 else true[s] if true is not None else None
            if ref is None or not sel.any():
                continue
            x, y = ref[sel], pred[s][sel]
            if len(x) > 4000:
                pick = rng.choice(len(x), 4000, replace=False)
                x, y = x[pick], y[pick]
            colour, label = CLASS_STYLE[name]
            ax.scatter(x, y, s=3, alpha=0.5, color=colour, label=label, rasterized=True)
            lim = max(lim, np.abs(x).max(), np.abs(y).max())
        ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6)
        ax.set_title(f"lag {s}")
        ax.set_xlabel("empirical (true for never)")
    axes[0][0].set_ylabel("predicted")
    axes[0][0].legend(fontsize=7, markerscale=3, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_eigenvalues(
    A: np.ndarray, rate_hz: float, out: str | Path, A_true: np.ndarray | None = None
) -> Path:
    """Eigenvalues of A in the complex plane with the unit circle, and a table of their time
    constants ``tau = -1 / (rate ln|lambda|)`` (s) and frequencies ``|arg lambda| rate / 2 pi``."""
    lam = np.linalg.eigvals(A)
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [1, 1.1]})
    t = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(t), np.sin(t), "k-", lw=0.5)
    if A_true is not None:
        lt = np.linalg.eigvals(A_true)
        ax.scatter(
            lt.real,
            lt.imag,
            marker="o",
            facecolors="none",
            edgecolors="tab:red",
            s=60,
            label="true",
        )
    ax.scatter(lam.real, lam.imag, marker="x", color="k", label="fitted")
    ax.set_aspect("equal")
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.legend(fontsize=8)
    ax.set_title("eigenvalues of A")
    order = np.argsort(-np.abs(lam))
    rows = []
    for z in lam[order]:
        mod = abs(z)
        tau = -1.0 / (rate_hz * np.log(mod)) if 0 < mod < 1 else np.inf
        freq = abs(np.angle(z)) * rate_hz / (2 * np.pi)
        rows.append([f"{mod:.3f}", f"{tau:.3g}", f"{freq:.3g}"])
    tab.axis("off")
    table = tab.table(cellText=rows, colLabels=["|λ|", "τ (s)", "f (Hz)"], loc="center")
    table.scale(1, 1.2)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_latents(
    latents_path: str | Path, rate_hz: float, out: str | Path, dims: int = 3, window_s: float = 60
) -> Path:
    """Smoothed latent trajectories (mean ± 2 sd) of every recording, first ``dims`` latents,
    the first ``window_s`` seconds of each recording."""
    root = zarr.open_group(str(latents_path), mode="r")
    names = list(root["recordings"].group_keys())
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.9 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        g = root[f"recordings/{name}"]
        n_show = int(min(g["mean"].shape[0], max(10, window_s * rate_hz)))
        m = np.asarray(g["mean"][:n_show])
        sd = np.sqrt(np.asarray(g["var"][:n_show]))
        t = np.arange(n_show) / rate_hz
        for d in range(min(dims, m.shape[1])):
            line = ax.plot(t, m[:, d], lw=0.8, label=f"x{d + 1}")[0]
            ax.fill_between(
                t,
                m[:, d] - 2 * sd[:, d],
                m[:, d] + 2 * sd[:, d],
                color=line.get_color(),
                alpha=0.2,
                lw=0,
            )
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, ncol=dims, loc="upper right")
    axes[-1, 0].set_xlabel("time in recording (s)")
    fig.suptitle("smoothed latents (one shared latent space), mean ± 2 sd")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_dimension_choice(metrics_files: Sequence[str | Path], out: str | Path) -> Path:
    """Held-out covariance error and correlation against latent dimension (the basis for
    choosing n), with the never co-observed correlation against the truth when simulated."""
    rows = []
    for path in metrics_files:
        m = json.loads(Path(path).read_text())
        rows.append((m["settings"]["latent_dim"], m["summary"]))
    rows.sort()
    dims = [d for d, _ in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    heldout_err = [s.get("heldout_rel_error") for _, s in rows]
    err = np.array([np.nan if v is None else v for v in heldout_err], dtype=float)
    a.plot(dims, err, "o-", color="tab:blue")
    choice = choose_stitched([json.loads(Path(p).read_text()) for p in metrics_files])
    chosen = choice["chosen"]
    if chosen is not None:
        a.axvline(chosen, color="k", ls="--", lw=0.8)
        a.annotate(
            f"chosen n = {chosen}",
            (chosen, np.nanmax(err)),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
        )
    a.set_xlabel("latent dimension n")
    a.set_ylabel("held-out relative error")
    a.set_title("held-out co-observed pairs")
    for key, colour, label in (
        ("observed_corr", "0.4", "fitted pairs"),
        ("heldout_corr", "tab:blue", "held-out pairs"),
        ("never_corr_vs_truth", "tab:red", "never co-observed vs truth"),
    ):
        vals = [s.get(key) for _, s in rows]
        if any(v is not None for v in vals):
            b.plot(
                dims, [np.nan if v is None else v for v in vals], "o-", color=colour, label=label
            )
    b.set_xlabel("latent dimension n")
    b.set_ylabel("correlation (mean over lags)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(dims)
    warning_footer(fig, choice["warnings"])
    return save_figure(fig, out)


def make_figures(
    model: str | Path,
    latents: str | Path,
    sample: str | Path,
    figures: dict[str, str | Path],
    truth: str | Path | None = None,
    scatter_lags: Sequence[int] = (0, 1, 3, 9),
) -> None:
    """All figures of one fit from its ``model.zarr``, ``latents.zarr`` and covariance sample
    (:class:`poplds.stitched.run.StitchedOutputs`): ``figures`` maps ``loss``,
    ``covariance``, ``eigenvalues``, ``latents`` to output paths; truth: a simulation's
    ``truth.npz``."""
    arrays = dict(np.load(sample))
    rate = float(arrays.pop("rate_hz"))
    arrays.setdefault("true", None)
    A = np.asarray(zarr.open_group(str(model), mode="r")["A"][:])
    A_true = np.load(truth)["A"] if truth else None
    plot_loss(model, figures["loss"])
    plot_covariance_scatter(arrays, figures["covariance"], scatter_lags)
    plot_eigenvalues(A, rate, figures["eigenvalues"], A_true)
    plot_latents(latents, rate, figures["latents"])
