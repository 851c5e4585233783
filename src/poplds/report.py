"""Tables for the Snakemake report: provenance, scores, and the choice of latent dimension.

The workflow puts these HTML files into ``snakemake --report`` as report items (one table per
file, next to the figures) and writes the same numbers as CSV and JSON for scripts:

- :func:`write_provenance`: a dataset's configuration as it ran (validated, defaults filled
  in), its recordings (source, sha256, size, rate, shape, neurons, missing values) and, per
  fit, the software versions and the device it ran on (from each ``metrics.json``).
- :func:`write_stitched_scores` / :func:`write_nplds_scores`: one row per latent dimension
  with every score of ``metrics.json``, iterations, stop reason, time and warnings, and the
  chosen dimension with warnings when it sits at the edge of the grid.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._logging import get_logger
from ._outputs import FAMILIES
from ._results import json_clean, write_json
from .store import DatasetStore

log = get_logger()

#: Slack of the stitched choice: the smallest n within 2% of the lowest held-out error.
STITCHED_SLACK = 0.02
#: Slack of the N-PLDS choice: the smallest k within 0.001 bits/spike of the best.
NPLDS_SLACK_BITS = 1e-3

_STYLE = (
    "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;"
    "margin:6px 0 14px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;"
    "vertical-align:top}th{background:#eee}pre{background:#f6f6f6;padding:8px}"
    ".warn{color:#a40000}</style>"
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "–"
        return f"{value:.1f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (columns: the keys of the first row by default)."""
    if not rows:
        return "<p>(none)</p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"]
    parts.append(f"</title>{_STYLE}</head><body><h2>{html.escape(title)}</h2>")
    for head, content in sections:
        parts.append(f"<h3>{html.escape(head)}</h3>{content}")
    parts.append("</body></html>")
    return "".join(parts)


def _write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) if r.get(c) is not None else "" for c in cols})
    _write_text(path, buf.getvalue())


def _warnings_html(warnings: Sequence[str]) -> str:
    if not warnings:
        return "<p>none</p>"
    return "<ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warnings) + "</ul>"


def _load(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    return sorted(rows, key=lambda m: m["settings"]["latent_dim"])


def edge_warnings(dims: Sequence[int], chosen: int | None, name: str, key: str) -> list[str]:
    """Warnings for a chosen dimension at the edge of the grid that was tried."""
    if chosen is None or len(dims) < 2:
        return []
    out = []
    if chosen == max(dims):
        out.append(
            f"the chosen {name} = {chosen} is the largest tried: a larger {name} may do better; "
            f"add larger values to {key}"
        )
    if chosen == min(dims) and chosen > 1:
        out.append(
            f"the chosen {name} = {chosen} is the smallest tried: add smaller values to {key}"
        )
    return out


def choose_dimension(dims: Sequence[int], heldout_error: Sequence[float], slack: float = 0.02):
    """The smallest n whose held-out error is within ``slack`` (relative) of the lowest one,
    or None when no error is known."""
    err = np.asarray(heldout_error, dtype=float)
    if not np.isfinite(err).any():
        return None
    best = np.nanmin(err)
    ok = [d for d, e in zip(dims, err, strict=True) if np.isfinite(e) and e <= best * (1 + slack)]
    return min(ok)


def one_se_choice(
    dims: Sequence[int], error: Sequence[float], se: Sequence[float | None]
) -> tuple[int | None, float | None]:
    """The one-standard-error rule: the smallest n whose error is at most the lowest error
    plus that n's bootstrap standard error; ``(chosen, threshold)``, ``(None, None)`` when
    no error is known. Without a standard error at the lowest one, the threshold is the
    lowest error times ``1 + STITCHED_SLACK``."""
    err = np.asarray(error, dtype=float)
    if not np.isfinite(err).any():
        return None, None
    best = int(np.nanargmin(err))
    sd = se[best]
    threshold = (
        err[best] + sd if sd is not None and np.isfinite(sd) else err[best] * (1 + STITCHED_SLACK)
    )
    ok = [d for d, e in zip(dims, err, strict=True) if np.isfinite(e) and e <= threshold]
    return min(ok), float(threshold)


def _summary_values(metrics: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    return [m["summary"].get(key) for m in metrics]


def choose_stitched(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The stitched choice of n (one-standard-error rule, :func:`one_se_choice`) on the
    stitch-validation relative error (mean over lags) where every n has it, else on the
    held-out relative error; both criteria with their bootstrap standard errors, the reason
    in words, warnings at the grid's edge and when no n predicts better than zero."""
    dims = [int(m["settings"]["latent_dim"]) for m in metrics]
    crit = {}
    for name, key in (("stitch validation", "stitch_rel_error"), ("held-out", "heldout_rel_error")):
        err = np.array([np.nan if v is None else v for v in _summary_values(metrics, key)])
        se = _summary_values(metrics, f"{key}_se")
        crit[name] = {"key": key, "error": err.tolist(), "se": se}
    use = (
        "stitch validation" if np.isfinite(crit["stitch validation"]["error"]).all() else "held-out"
    )
    c = crit[use]
    chosen, threshold = one_se_choice(dims, c["error"], c["se"])
    err = np.asarray(c["error"], dtype=float)
    warnings = edge_warnings(dims, chosen, "n", "stitched_lds.latent_dims")
    if use == "held-out":
        reason = (
            "no stitch validation at every n (no recording shares enough neurons with the "
            "others, see metrics.json), so the co-observed held-out pairs choose n: they test "
            "the fit, not the predictions of pairs never recorded together"
        )
    else:
        reason = "the stitch-validation pairs (never co-observed in their fit) choose n"
    if chosen is not None:
        best = dims[int(np.nanargmin(err))]
        within = (
            "one bootstrap standard error"
            if c["se"][dims.index(best)] is not None
            else f"{STITCHED_SLACK:.0%}"
        )
        reason += (
            f"; lowest {use} relative error {np.nanmin(err):.3g} at n = {best}; chosen the "
            f"smallest n within {within} of it (at most {threshold:.3g}): n = {chosen}"
        )
    if np.isfinite(err).any():
        best = int(np.nanargmin(err))
        sd = c["se"][best] if c["se"][best] is not None else 0.0
        if err[best] >= 1:
            warnings.append(
                f"the {use} relative error is at least 1 at every n (lowest "
                f"{err[best]:.3f}): no fit predicts the {use} pairs' covariances better than "
                "zero; these data carry little reproducible low-rank covariance"
            )
        elif err[best] + sd >= 1:
            warnings.append(
                f"the lowest {use} relative error, {err[best]:.3f} at n = {dims[best]}, is "
                f"within one standard error ({sd:.3f}) of 1: its predictions cannot be told "
                "from predicting zero covariance on these data"
            )
    return {
        "dims": dims,
        "criterion": use,
        "threshold": threshold,
        "heldout_rel_error": crit["held-out"]["error"],
        "heldout_rel_error_se": crit["held-out"]["se"],
        "stitch_rel_error": crit["stitch validation"]["error"],
        "stitch_rel_error_se": crit["stitch validation"]["se"],
        "chosen": chosen,
        "reason": reason,
        "warnings": warnings,
    }


#: The stitched summary scores in the table: (column, metrics.json summary key).
STITCHED_SUMMARY = (
    ("stitch-validation rel. error", "stitch_rel_error"),
    ("stitch-validation r", "stitch_corr"),
    ("held-out rel. error", "heldout_rel_error"),
    ("held-out r", "heldout_corr"),
    ("fitted r", "observed_corr"),
    ("never co-observed r vs truth", "never_corr_vs_truth"),
)


def stitched_rows(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of scores per fitted n (``metrics.json`` of :func:`poplds.stitched.fit_store`)."""
    rows = []
    for m in metrics:
        s, f, cov = m["summary"], m["fit"], m["covariance"]
        row: dict[str, Any] = {"n": m["settings"]["latent_dim"]}
        for label, key in STITCHED_SUMMARY:
            if s.get(key) is None:
                continue
            row[label] = s[key]
            ci = s.get(f"{key}_interval")
            if ci is not None:
                row[f"{label} {m['bootstrap']['level']:.0%} interval"] = (
                    f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
                )
        for label, key in (
            ("stitch-validation coverage", "stitch_coverage"),
            ("never co-observed coverage vs truth", "never_coverage_vs_truth"),
        ):
            if s.get(key) is not None:
                row[label] = s[key]
        for lag, h in zip(cov["lags"], cov["heldout"], strict=True):
            row[f"held-out error lag {lag}"] = h.get("rel_error")
        row.update(
            {
                "optimizer": f.get("optimizer", "lbfgs"),
                "passes (free + linked)": f"{f['free']['passes']} + {f['linked']['passes']}",
                "stop": f.get("stop"),
                "loss moved (noise units)": f.get("moved_noise_units"),
                "seconds": f.get("seconds"),
                "device": m.get("provenance", {}).get("device", m["settings"].get("device")),
                "warnings": len(m.get("warnings", [])),
            }
        )
        rows.append(row)
    return rows


def _write_scores(
    metrics: Sequence[dict[str, Any]],
    rows: list[dict[str, Any]],
    choice: dict[str, Any],
    *,
    letter: str,
    rule: str,
    title: str,
    extra: Sequence[tuple[str, str]],
    outputs: tuple[str | Path, str | Path, str | Path],
) -> dict[str, Any]:
    """The scores page (HTML: the choice with its warnings, ``extra`` sections, the table,
    the fits' warnings), the table as CSV and the choice as JSON; the choice is logged."""
    html_out, csv_out, choice_out = outputs
    fit_warnings = [
        f"{letter}={m['settings']['latent_dim']}: {w}"
        for m in metrics
        for w in m.get("warnings", [])
    ]
    dataset = metrics[0].get("dataset")
    sections = [
        (
            f"Choice of {letter}",
            f"<p>chosen {letter} = {choice['chosen']}: "
            f"{html.escape(choice.get('reason', rule))}</p>" + _warnings_html(choice["warnings"]),
        ),
        *extra,
        ("Scores", html_table(rows)),
        ("Warnings of the fits", _warnings_html(fit_warnings)),
    ]
    log.info(
        "%s: chosen %s = %s (%s)", dataset, letter, choice["chosen"], choice.get("reason", rule)
    )
    for w in choice["warnings"]:
        log.warning(w)
    _write_text(html_out, _page(f"{dataset}: {title}", sections))
    _write_csv(csv_out, rows)
    write_json(Path(choice_out), {**choice, "fit_warnings": fit_warnings})
    return choice


def write_stitched_scores(
    metrics_paths: Sequence[str | Path],
    html_out: str | Path,
    csv_out: str | Path,
    choice_out: str | Path,
) -> dict[str, Any]:
    """The stitched scores table (HTML for the report, CSV) and the choice of n (JSON)."""
    metrics = _load(metrics_paths)
    return _write_scores(
        metrics,
        stitched_rows(metrics),
        choose_stitched(metrics),
        letter="n",
        rule="",
        title="stitched LDS scores",
        extra=(),
        outputs=(html_out, csv_out, choice_out),
    )


def choose_nplds(metrics: Sequence[dict[str, Any]], model: str = "nplds") -> dict[str, Any]:
    """The choice of k for ``model``, by co-smoothing (the Neural Latents Benchmark's primary
    score) with the one-standard-error rule: the smallest k whose score is at least the
    best's minus the standard error of its difference from the best (``metrics.json``
    ``intervals``: every k's bootstrap uses the same draws of the same held-out trials and
    neurons, so the difference is taken draw by draw; what the neurons drawn do to every k
    alike cancels). Without co-smoothing (no held-out neurons) the held-out-trial score
    decides; without per-draw scores, a slack of ``NPLDS_SLACK_BITS``. Warnings at the
    grid's edge."""
    ks = [int(m["settings"]["latent_dim"]) for m in metrics]

    def column(key: str) -> np.ndarray:
        return np.array(
            [
                np.nan if m["models"][model].get(key) is None else m["models"][model][key]
                for m in metrics
            ],
            dtype=float,
        )

    def draws(score: str) -> list[np.ndarray | None]:
        out = []
        for m in metrics:
            d = m.get("intervals", {}).get(score, {}).get(model, {}).get("draws")
            out.append(None if d is None else np.asarray(d, dtype=float))
        return out

    held, cos = column("heldout_trial_bits_per_spike"), column("cosmoothing_bits_per_spike")
    criterion, bits, per_draw = "co-smoothing", cos, draws("cosmoothing")
    if not np.isfinite(cos).any():
        criterion, bits, per_draw = "held-out trials", held, draws("heldout_trial")
    chosen, rule = None, ""
    slack = np.full(len(ks), NPLDS_SLACK_BITS)
    if np.isfinite(bits).any():
        b = int(np.nanargmax(bits))
        paired = per_draw[b] is not None and all(
            d is not None and d.shape == per_draw[b].shape for d in per_draw
        )
        if paired:
            for j, d in enumerate(per_draw):
                diff = d - per_draw[b]
                diff = diff[np.isfinite(diff)]
                slack[j] = float(diff.std(ddof=1)) if j != b and diff.size > 1 else 0.0
            rule = (
                "the smallest k within one standard error of its paired bootstrap difference "
                f"from the best {criterion} score (k = {ks[b]})"
            )
        else:
            rule = (
                f"the smallest k within {NPLDS_SLACK_BITS} bits/spike of the best {criterion} "
                "score (no per-draw bootstrap scores)"
            )
        chosen = min(
            k
            for k, v, s in zip(ks, bits, slack, strict=True)
            if np.isfinite(v) and v >= bits[b] - s
        )
    warnings = edge_warnings(ks, chosen, "k", "nplds.latent_dims")
    return {
        "dims": ks,
        "criterion": criterion,
        "rule": rule,
        "slack_bits_per_spike": slack.tolist(),
        "cosmoothing_bits_per_spike": cos.tolist(),
        "heldout_trial_bits_per_spike": held.tolist(),
        "chosen": chosen,
        "model": model,
        "warnings": warnings,
    }


NPLDS_COLUMNS = (
    ("held-out trials bits/spike", "heldout_trial_bits_per_spike"),
    ("co-smoothing bits/spike", "cosmoothing_bits_per_spike"),
    ("rate RMSE (Hz)", "rate_rmse_hz"),
    ("drift sd (log rate)", "drift_sd"),
    ("drift r vs truth", "drift_corr_vs_truth"),
    ("95% band covers truth", "drift_band_coverage"),
    ("bound", "bound"),
    ("iterations", "iterations"),
    ("stop", "stop"),
    ("seconds", "seconds"),
)


def nplds_rows(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (k, model) (``metrics.json`` of :func:`poplds.nplds.fit_store`), and one
    per baseline (the same split whatever k; model ``baseline: <name>``, k empty)."""
    rows = []

    def intervals(row: dict[str, Any], m: dict[str, Any], name: str) -> None:
        for score, label in (("heldout_trial", "held-out trials"), ("cosmoothing", "co-smoothing")):
            e = m.get("intervals", {}).get(score, {}).get(name)
            if e and e.get("lo") is not None:
                row[f"{label} 95% interval"] = f"[{e['lo']:.4f}, {e['hi']:.4f}]"

    seen = set()  # the same split whatever k; GPFA is fitted at each job's k
    for m in metrics:
        for name, entry in m.get("baselines", {}).items():
            if name in seen:
                continue
            seen.add(name)
            k = name.rsplit("_k", 1)[1] if name.startswith("gpfa_k") else ""
            row = {"k": k, "model": f"baseline: {name}"}
            for label, key in NPLDS_COLUMNS:
                if key in entry:
                    row[label] = entry[key]
            intervals(row, m, f"baseline: {name}")
            rows.append(row)
    for m in metrics:
        for name, entry in m["models"].items():
            row: dict[str, Any] = {"k": m["settings"]["latent_dim"], "model": name}
            for label, key in NPLDS_COLUMNS:
                if key in entry:
                    row[label] = entry[key]
            intervals(row, m, name)
            row["device"] = m.get("provenance", {}).get("device", m["settings"].get("device"))
            rows.append(row)
    return rows


def write_nplds_scores(
    metrics_paths: Sequence[str | Path],
    html_out: str | Path,
    csv_out: str | Path,
    choice_out: str | Path,
) -> dict[str, Any]:
    """The Poisson LDS scores table (HTML, CSV) and the choice of k (JSON)."""
    metrics = _load(metrics_paths)
    first = metrics[0]
    data = {
        "trials": first.get("n_trials"),
        "bins per trial": first.get("n_bins"),
        "bin (s)": first.get("bin_size_s"),
        "neurons": first.get("n_neurons"),
        "spikes": first.get("spikes"),
        "missing bins": first.get("missing_bins"),
        "held-out trials": first.get("n_heldout_trials"),
        "held-out neurons": first.get("n_heldout_neurons"),
    }
    return _write_scores(
        metrics,
        nplds_rows(metrics),
        choose_nplds(metrics),
        letter="k",
        rule="N-PLDS: the smallest k within one bootstrap standard error of the best "
        "co-smoothing score (the held-out-trial score beside it)",
        title="Poisson LDS scores",
        extra=(("Data", html_table([data])),),
        outputs=(html_out, csv_out, choice_out),
    )


def recording_rows(store: DatasetStore) -> list[dict[str, Any]]:
    """One row per recording of a store: source, sha256, size, rate, shape, missing values."""
    rows = []
    for name in store.recording_names:
        attrs = store.recording_attrs(name)
        arr = store.root[f"recordings/{name}/activity"]
        source = Path(str(attrs.get("source", "")))
        size = None
        if source.is_file():
            size = source.stat().st_size
        elif source.is_dir():
            size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        n_values = int(np.prod(arr.shape))
        missing = int(attrs.get("n_missing", 0))
        rows.append(
            {
                "recording": name,
                "source": str(source),
                "sha256": attrs.get("sha256"),
                "size (bytes)": size,
                "kind": attrs.get("kind"),
                "rate (Hz)": attrs.get("rate_hz"),
                "shape": " x ".join(map(str, arr.shape)),
                "neurons": int(arr.shape[-1]),
                "missing values": missing,
                "missing (%)": 100.0 * missing / max(n_values, 1),
            }
        )
    return rows


def write_provenance(
    store_path: str | Path,
    metrics_paths: Sequence[str | Path],
    dataset_config: dict[str, Any],
    html_out: str | Path,
) -> None:
    """A dataset's provenance page: its configuration as it ran, its recordings, and per fit
    the software versions and the device."""
    store = DatasetStore(store_path)
    fits = []
    for path in metrics_paths:
        m = json.loads(Path(path).read_text())
        prov = m.get("provenance", {})
        label = f"{Path(path).parent.parent.name} {Path(path).parent.name}"
        fits.append({"fit": label, **{k: v for k, v in prov.items() if k != "host"}})
    # the settings blocks of model families this dataset does not fit are left out
    families = FAMILIES
    shown = {
        k: v
        for k, v in dataset_config.items()
        if k not in families or k in dataset_config.get("models", families)
    }
    config_text = yaml.safe_dump(json_clean(shown), sort_keys=False, default_flow_style=None)
    sections = [
        ("Configuration (validated, defaults filled in)", f"<pre>{html.escape(config_text)}</pre>"),
        ("Recordings", html_table(recording_rows(store))),
        (
            "Store",
            html_table(
                [
                    {
                        "path": str(store.path),
                        "neurons in all": len(store.neuron_ids),
                        "format": store.attrs.get("format"),
                        "written by poplds": store.attrs.get("poplds_version"),
                    }
                ]
            ),
        ),
        ("Software and device of each fit", html_table(fits)),
    ]
    _write_text(html_out, _page(f"{store.attrs.get('dataset')}: provenance", sections))
