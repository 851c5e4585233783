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
    "validation": ("tab:green", "stitch validation (never together in its fit)"),
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


def plot_covariance_scatter(
    figdata: dict[str, Any], out: str | Path, lags: Sequence[int], bars: int = 150
) -> Path:
    """Predicted against empirical lagged covariances per pair class, one panel per lag: the
    fitted and held-out pairs, the stitch-validation pairs (never seen together by their
    fit) against the recording's data, and the never co-observed pairs against the true
    covariances (simulations only). Where the bootstrap ran, ``bars`` pairs of each class
    carry their interval as a vertical bar."""
    pred, emp, true, cls = figdata["pred"], figdata["emp"], figdata["true"], figdata["cls"]
    lo, hi = figdata.get("pred_lo"), figdata.get("pred_hi")
    lags = [s for s in lags if s < pred.shape[0]]
    fig, axes = plt.subplots(1, len(lags), figsize=(3.4 * len(lags), 3.8), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, s in zip(axes[0], lags, strict=True):
        lim = 0.0
        panels = []
        for k, name in enumerate(("observed", "heldout", "never")):
            sel = cls[s] == k
            ref = emp[s] if k < 2 else true[s] if true is not None else None
            if ref is None or not sel.any():
                continue
            band = None if lo is None else (lo[s][sel], hi[s][sel])
            panels.append((name, ref[sel], pred[s][sel], band))
        if "val_emp" in figdata and figdata["val_emp"].size:
            band = None
            if "val_pred_lo" in figdata:
                band = (figdata["val_pred_lo"][s], figdata["val_pred_hi"][s])
            panels.append(("validation", figdata["val_emp"][s], figdata["val_pred"][s], band))
        for name, x, y, band in panels:
            colour, label = CLASS_STYLE[name]
            pick = np.arange(len(x))
            if len(x) > 4000:
                pick = rng.choice(len(x), 4000, replace=False)
            ax.scatter(x[pick], y[pick], s=3, alpha=0.5, color=colour, label=label, rasterized=True)
            if band is not None:
                few = rng.choice(len(x), min(bars, len(x)), replace=False)
                ax.vlines(x[few], band[0][few], band[1][few], color=colour, lw=0.6, alpha=0.6)
            lim = max(lim, np.abs(x).max(), np.abs(y).max())
        ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6)
        ax.set_title(f"lag {s}")
        ax.set_xlabel("empirical (true for never)")
    axes[0][0].set_ylabel("predicted" + (" (bars: bootstrap interval)" if lo is not None else ""))
    axes[0][0].legend(fontsize=7, markerscale=3, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_eigenvalues(
    A: np.ndarray,
    rate_hz: float,
    out: str | Path,
    A_true: np.ndarray | None = None,
    intervals: dict[str, np.ndarray] | None = None,
) -> Path:
    """Eigenvalues of A in the complex plane with the unit circle, and a table of their time
    constants ``tau = -1 / (rate ln|lambda|)`` (s) and frequencies ``|arg lambda| rate / 2 pi``;
    with ``intervals`` (``eig_modulus_lo/hi``, ``tau_lo/hi``, largest modulus first), the
    bootstrap intervals of the moduli and time constants."""
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
    for k, z in enumerate(lam[order]):
        mod = abs(z)
        tau = -1.0 / (rate_hz * np.log(mod)) if 0 < mod < 1 else np.inf
        freq = abs(np.angle(z)) * rate_hz / (2 * np.pi)
        row = [f"{mod:.3f}", f"{tau:.3g}", f"{freq:.3g}"]
        if intervals is not None:
            row[0] += (
                f" [{intervals['eig_modulus_lo'][k]:.3f}, {intervals['eig_modulus_hi'][k]:.3f}]"
            )
            row[1] += f" [{intervals['tau_lo'][k]:.3g}, {intervals['tau_hi'][k]:.3g}]"
        rows.append(row)
    tab.axis("off")
    labels = ["|λ|", "τ (s)", "f (Hz)"]
    if intervals is not None:
        labels = ["|λ| [interval]", "τ (s) [interval]", "f (Hz)"]
    table = tab.table(cellText=rows, colLabels=labels, loc="center")
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
    """The choice of n: the stitch-validation and held-out relative errors against the
    latent dimension with their bootstrap standard errors (bars) and the one-standard-error
    threshold of the criterion that chose; and the correlations of every pair class (the
    never co-observed against the truth when simulated), with their intervals."""
    metrics = sorted(
        (json.loads(Path(p).read_text()) for p in metrics_files),
        key=lambda m: m["settings"]["latent_dim"],
    )
    choice = choose_stitched(metrics)
    dims = choice["dims"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for name, key, colour in (
        ("stitch validation", "stitch_rel_error", "tab:green"),
        ("held-out", "heldout_rel_error", "tab:blue"),
    ):
        err = np.array(choice[key], dtype=float)
        if not np.isfinite(err).any():
            continue
        se = np.array([np.nan if v is None else v for v in choice[f"{key}_se"]], dtype=float)
        used = choice["criterion"] == name
        a.errorbar(
            dims,
            err,
            yerr=np.nan_to_num(se),
            fmt="o-",
            color=colour,
            capsize=3,
            lw=2 if used else 1,
            label=f"{name} pairs" + (" (chooses n)" if used else ""),
        )
    if choice["threshold"] is not None:
        a.axhline(choice["threshold"], color="0.4", ls=":", lw=0.8, label="lowest + 1 SE")
    a.axhline(1.0, color="tab:red", ls="-", lw=0.6, alpha=0.6, label="predicting zero")
    if choice["chosen"] is not None:
        a.axvline(choice["chosen"], color="k", ls="--", lw=0.8)
        a.annotate(
            f"chosen n = {choice['chosen']}",
            (choice["chosen"], a.get_ylim()[1]),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
        )
    a.set_xlabel("latent dimension n")
    a.set_ylabel("relative error (mean over lags)")
    a.legend(fontsize=7)
    for key, colour, label in (
        ("observed_corr", "0.4", "fitted pairs"),
        ("heldout_corr", "tab:blue", "held-out pairs"),
        ("stitch_corr", "tab:green", "stitch-validation pairs"),
        ("never_corr_vs_truth", "tab:red", "never co-observed vs truth"),
    ):
        vals = np.array(
            [np.nan if m["summary"].get(key) is None else m["summary"][key] for m in metrics]
        )
        if not np.isfinite(vals).any():
            continue
        ci = [m["summary"].get(f"{key}_interval") for m in metrics]
        yerr = np.array(
            [
                [0.0, 0.0] if c is None else [v - c[0], c[1] - v]
                for v, c in zip(vals, ci, strict=True)
            ]
        ).T
        b.errorbar(
            dims, vals, yerr=np.clip(yerr, 0, None), fmt="o-", color=colour, capsize=3, label=label
        )
    b.set_xlabel("latent dimension n")
    b.set_ylabel("correlation (mean over lags)")
    b.legend(fontsize=7)
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
    ints = None
    if "tau_lo" in arrays:
        ints = {k: arrays[k] for k in ("eig_modulus_lo", "eig_modulus_hi", "tau_lo", "tau_hi")}
    plot_eigenvalues(A, rate, figures["eigenvalues"], A_true, ints)
    plot_latents(latents, rate, figures["latents"])
