"""Report figures of the Poisson LDS over trials; each reads result files, writes one PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._outputs import MODELS, poisson_models
from ..plots import plt, save_figure, warning_footer
from ..report import choose_nplds

#: Model names as drawn (:data:`poplds._outputs.MODELS`), and their colours.
LABELS = {name: MODELS[name].label for name in poisson_models(True)}
COLOURS = {"plds": "tab:blue", "nplds": "tab:red", "nplds_dynamics": "tab:purple"}


def _load(metrics_path: str | Path, predictions_path: str | Path) -> tuple[dict, dict]:
    metrics = json.loads(Path(metrics_path).read_text())
    with np.load(predictions_path) as z:
        arrays = {k: z[k] for k in z.files}
    return metrics, arrays


def _models(metrics: dict) -> list[str]:
    return [m for m in poisson_models(True) if m in metrics["models"]]


def _mark_heldout(ax, trial_ids: np.ndarray, heldout: np.ndarray) -> None:
    for t in trial_ids[heldout]:
        ax.axvline(t, color="0.85", lw=1.5, zorder=0)


def plot_bound(metrics_path: str | Path, predictions_path: str | Path, out: str | Path) -> Path:
    """Evidence lower bound per EM iteration of every model, per spike, relative to its
    final value (log scale), and the raw bound."""
    metrics, _ = _load(metrics_path, predictions_path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    spikes = max(metrics["spikes"], 1)
    for name in _models(metrics):
        trace = np.asarray(metrics["models"][name]["bound_trace"], dtype=float)
        it = np.arange(len(trace))
        axes[0].plot(it, trace / spikes, color=COLOURS[name], label=LABELS[name])
        gap = (trace[-1] - trace[:-1]) / spikes
        axes[1].semilogy(it[:-1], np.maximum(gap, 1e-12), color=COLOURS[name])
    axes[0].set_xlabel("EM iteration")
    axes[0].set_ylabel("bound / training spike (nats)")
    axes[0].legend(frameon=False)
    axes[1].set_xlabel("EM iteration")
    axes[1].set_ylabel("final bound - bound (nats / spike)")
    k = metrics["settings"]["latent_dim"]
    fig.suptitle(f"{metrics['dataset']}: evidence lower bound, k = {k}")
    fig.tight_layout()
    return save_figure(fig, out)


def _drift_neurons(shift: np.ndarray, n: int = 6) -> np.ndarray:
    """The n neurons whose modulator varies most across trials."""
    return np.argsort(-shift.std(0))[:n]


def plot_drift(metrics_path: str | Path, predictions_path: str | Path, out: str | Path) -> Path:
    """Per-trial log-rate modulator ``c_i' h[r]`` (centred per neuron) with its 95 % band
    (1.96 posterior standard deviations, the GP hyperparameters integrated out and the
    loadings' error added: :mod:`.bands`), against trial number, for the six neurons that
    drift most; the truth when simulated; held-out trials shaded (their h is the GP
    prediction)."""
    metrics, a = _load(metrics_path, predictions_path)
    shift, sd = a["nplds_shift"], a["nplds_shift_sd"]
    trials, heldout = a["trial_ids"], a["heldout"]
    picks = _drift_neurons(shift)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, i in zip(axes.ravel(), picks, strict=False):
        _mark_heldout(ax, trials, heldout)
        centre = shift[:, i] - shift[:, i].mean()
        ax.fill_between(
            trials,
            centre - 1.96 * sd[:, i],
            centre + 1.96 * sd[:, i],
            color="tab:red",
            alpha=0.2,
            lw=0,
        )
        ax.plot(trials, centre, color="tab:red", label="N-PLDS (mean, 95% band)")
        if "true_shift" in a:
            truth = a["true_shift"][:, i]
            ax.plot(trials, truth - truth.mean(), "k--", lw=1, label="truth")
        ax.set_title(f"neuron {i}")
    for ax in axes[-1]:
        ax.set_xlabel("trial")
    for ax in axes[:, 0]:
        ax.set_ylabel("log-rate shift c'h")
    axes[0, 0].legend(frameon=False, fontsize=8)
    corr = metrics["models"]["nplds"].get("drift_corr_vs_truth")
    cover = metrics["models"]["nplds"].get("drift_band_coverage")
    extra = f", correlation with truth {corr:.3f}" if corr is not None else ""
    if cover is not None:
        extra += f", band covers {100 * cover:.0f}% of the truth"
    fig.suptitle(f"{metrics['dataset']}: slow modulator per trial (grey: held-out){extra}")
    warnings = []
    if cover is not None and cover < 0.9:
        warnings.append(
            f"the 95% band covers {100 * cover:.1f}% of the true shift (95% expected if "
            "the model were right): it is the posterior uncertainty under the fitted model, "
            "which does not include a wrong latent dimension k or other misspecification"
        )
    elif cover is not None and cover > 0.98:
        warnings.append(
            f"the 95% band covers {100 * cover:.1f}% of the true shift (95% expected): wider "
            "than it needs to be here; over the few independent values of a slow drift, the "
            "uncertainty of its variance and length-scale is large and the band includes it"
        )
    warning_footer(fig, warnings)
    return save_figure(fig, out)


def neuron_groups(shift: np.ndarray) -> np.ndarray:
    """Split neurons by the sign of their loading on the leading principal component of the
    modulator across trials: (N,) bool, True for the group that rises with it."""
    centred = shift - shift.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[0] >= 0


def plot_rates(metrics_path: str | Path, predictions_path: str | Path, out: str | Path) -> Path:
    """Per-trial mean firing rate of each neuron group (the two signs of the leading drift
    direction), data against every model's prediction (held-out trials shaded)."""
    metrics, a = _load(metrics_path, predictions_path)
    group = neuron_groups(a["nplds_shift"])
    trials, heldout = a["trial_ids"], a["heldout"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharex=True)
    for ax, sel, title in zip(axes, (group, ~group), ("group 1", "group 2"), strict=True):
        _mark_heldout(ax, trials, heldout)
        if not sel.any():
            ax.set_title(f"{title}: no neurons")
            continue
        ax.plot(trials, a["observed_rate"][:, sel].mean(1), "k.", ms=4, label="data")
        for name in _models(metrics):
            rmse = metrics["models"][name]["rate_rmse_hz"]
            ax.plot(
                trials,
                a[f"{name}_rate"][:, sel].mean(1),
                color=COLOURS[name],
                label=f"{LABELS[name]} (RMSE {rmse:.2f} Hz)",
            )
        ax.set_title(f"{title} ({int(sel.sum())} neurons)")
        ax.set_xlabel("trial")
        ax.set_ylabel("mean rate (Hz)")
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle(
        f"{metrics['dataset']}: per-trial mean rate, k = {metrics['settings']['latent_dim']}"
    )
    fig.tight_layout()
    return save_figure(fig, out)


def plot_eigenvalues(
    metrics_path: str | Path, predictions_path: str | Path, out: str | Path
) -> Path:
    """Eigenvalues of each trial's dynamics ``A[r] = A + g[r] A1``: moduli against trial
    number (truth's spectral radius when simulated) and the complex plane, coloured by trial."""
    metrics, a = _load(metrics_path, predictions_path)
    ev = a["nplds_dynamics_eigenvalues"]  # (trials, k) complex
    trials, heldout = a["trial_ids"], a["heldout"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    _mark_heldout(ax, trials, heldout)
    mod = np.sort(np.abs(ev), axis=1)[:, ::-1]
    for j in range(mod.shape[1]):
        ax.plot(trials, mod[:, j], color=plt.cm.viridis(j / max(mod.shape[1] - 1, 1)))
    if "true_radius" in a:
        ax.plot(trials, a["true_radius"], "k--", lw=1, label="true spectral radius")
        ax.legend(frameon=False)
    ax.set_xlabel("trial")
    ax.set_ylabel("|eigenvalue| of A[r]")
    ax = axes[1]
    theta = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(theta), np.sin(theta), color="0.7", lw=1)
    colours = np.repeat(trials[:, None], ev.shape[1], 1).ravel()
    sc = ax.scatter(ev.real.ravel(), ev.imag.ravel(), c=colours, s=6, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="trial")
    ax.set_aspect("equal")
    ax.set_xlabel("real")
    ax.set_ylabel("imaginary")
    fig.suptitle(
        f"{metrics['dataset']}: dynamics per trial, k = {metrics['settings']['latent_dim']}"
    )
    fig.tight_layout()
    return save_figure(fig, out)


def _baseline_lines(ax, rows: list[dict], key: str) -> None:
    """The field's baselines of score ``key`` on the same split: one dashed line each (GPFA,
    fitted at every k, as grey squares)."""
    styles = iter([":", "--", "-."])
    seen: set[str] = set()
    gpfa = []
    for m in rows:
        for name, entry in m.get("baselines", {}).items():
            value = entry.get(key)
            if value is None or name in seen:
                continue
            seen.add(name)
            if name.startswith("gpfa_k"):
                gpfa.append((int(name.rsplit("_k", 1)[1]), value))
            elif name != "constant":
                ax.axhline(value, color="0.3", lw=1, ls=next(styles, ":"), label=name)
    if gpfa:
        gk, gv = zip(*sorted(gpfa), strict=True)
        ax.plot(gk, gv, "s", color="0.4", label="GPFA")


def plot_dimension(metrics_paths: list[str | Path], out: str | Path) -> Path:
    """Held-out-trial and co-smoothing bits per spike of every model against k."""
    rows = [json.loads(Path(p).read_text()) for p in metrics_paths]
    rows.sort(key=lambda m: m["settings"]["latent_dim"])
    ks = [m["settings"]["latent_dim"] for m in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    keys = ("heldout_trial_bits_per_spike", "cosmoothing_bits_per_spike")
    titles = ("held-out trials (predicted before seeing them)", "co-smoothing (held-out neurons)")
    for ax, key, title in zip(axes, keys, titles, strict=True):
        for name in poisson_models(True):
            vals = [m["models"].get(name, {}).get(key) for m in rows]
            if all(v is None for v in vals):
                continue
            y = np.array([np.nan if v is None else v for v in vals], dtype=float)
            score = key.removesuffix("_bits_per_spike")
            iv = [m.get("intervals", {}).get(score, {}).get(name, {}) for m in rows]
            lo = np.array([e.get("lo", np.nan) for e in iv], dtype=float)
            hi = np.array([e.get("hi", np.nan) for e in iv], dtype=float)
            err = np.vstack([y - lo, hi - y]) if np.isfinite(lo).any() else None
            ax.errorbar(
                ks, y, yerr=err, fmt="o-", capsize=3, color=COLOURS[name], label=LABELS[name]
            )
        _baseline_lines(ax, rows, key)
        ax.axhline(0, color="0.6", lw=1)
        ax.set_xlabel("latent dimension k")
        ax.set_ylabel("bits / spike")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(ks)
    choice = choose_nplds(rows)
    if choice["chosen"] is not None:
        ax = axes[1] if choice["criterion"] == "co-smoothing" else axes[0]
        ax.axvline(choice["chosen"], color="k", ls="--", lw=0.8)
        ax.annotate(
            f"chosen k = {choice['chosen']}",
            (choice["chosen"], 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
        )
    for ax in axes:
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"{rows[0]['dataset']}: choice of latent dimension (95% paired bootstrap)")
    warning_footer(fig, choice["warnings"])
    return save_figure(fig, out)


def make_figures(
    metrics_path: str | Path, predictions_path: str | Path, outputs: dict[str, str | Path]
) -> None:
    """Every per-k figure named in outputs (keys bound, drift, rates, eigenvalues) from one
    job's ``metrics.json`` and ``predictions.npz`` (:func:`poplds.nplds.fit_store`)."""
    makers = {
        "bound": plot_bound,
        "drift": plot_drift,
        "rates": plot_rates,
        "eigenvalues": plot_eigenvalues,
    }
    for key, path in outputs.items():
        makers[key](metrics_path, predictions_path, path)
