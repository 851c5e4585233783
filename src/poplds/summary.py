"""A dataset's front page for the report: what a PI reads first (:func:`write_summary`).

For the stitched LDS: the chosen n and the reason, the stitch-validation score at that n with
its interval and its coverage, the held-out score, the truth comparison and coverage of a
simulation, A's slowest time constants with intervals, the calibration of the intervals, and
every warning. For the Poisson models: the chosen k and its held-out scores. Numbers come from
``dimension.json`` and the fits' ``metrics.json``; nothing is recomputed.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import _fmt, _page, _warnings_html, _write_text

#: The calibration of the intervals as measured (README, Benchmarks; re-measure with the
#: command it names after changing the bootstrap).
CALIBRATION = (
    "Calibration, measured on 54 simulations (<code>benchmarks/bench_checks.py calibration "
    "--seeds 3</code>: overlaps n to 10n, noise-to-signal 0.5-2, T 2e3-1e5): nominal 90 % "
    "intervals held the true never co-observed covariances 0.917 of the time on average, "
    "0.84-0.96 per setting (lowest for short, noisy recordings with small overlaps)."
)
CALIBRATION_GN = (
    "Calibration of this Gauss-Newton bootstrap, measured on the same 54 simulations "
    "(<code>bench_checks.py calibration --seeds 3 --method gauss_newton</code>): 0.920 on "
    "average, 0.84-0.97 per setting, as the refits' (0.917); its replicates there changed "
    "the predictions by 0.02-0.21 of their size. On a real recording whose predictions "
    "moved by 0.5-2 (dentate gyrus split, <code>bench_checks.py real</code>) its interval "
    "widths differed from the refits' by 0.4-2x: read a replicate-change warning as rough "
    "intervals."
)


def _ci(summary: dict[str, Any], key: str) -> str:
    ci = summary.get(f"{key}_interval")
    return "" if ci is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _stitched_section(choice: dict[str, Any], metrics: Sequence[dict[str, Any]]) -> str:
    by_n = {int(m["settings"]["latent_dim"]): m for m in metrics}
    n = choice.get("chosen")
    parts = [
        f"<p><b>chosen n = {n}</b>: {html.escape(choice.get('reason', ''))}</p>",
    ]
    warnings = list(choice.get("warnings", []))
    if n is None or n not in by_n:
        return "".join(parts) + "<p>Warnings:</p>" + _warnings_html(warnings)
    m = by_n[n]
    s, level = m["summary"], m.get("bootstrap", {}).get("level", 0.9)
    val = m.get("stitch_validation", {})
    rows = []
    if "skipped" in val:
        rows.append(f"<li>stitch validation: not run ({html.escape(val['skipped'])})</li>")
    else:
        hidden = sum(len(v) for v in val["hidden"].values())
        rows.append(
            f"<li>stitch validation (pairs never seen together by their fit, scored against the "
            f"data): relative error <b>{_fmt(s.get('stitch_rel_error'))}</b>"
            f"{_ci(s, 'stitch_rel_error')}, r {_fmt(s.get('stitch_corr'))}"
            f"{_ci(s, 'stitch_corr')}, on {val['n_pairs']} ordered pairs (each at every lag) "
            f"of {hidden} hidden "
            f"neurons in {len(val['hidden'])} recording(s)"
            + (
                f"; the intervals of these pairs hold their empirical values "
                f"{_fmt(val['coverage'])} of the time (nominal {level:.0%})"
                if "coverage" in val
                else ""
            )
            + "</li>"
        )
    rows.append(
        f"<li>held-out co-observed pairs: relative error {_fmt(s.get('heldout_rel_error'))}"
        f"{_ci(s, 'heldout_rel_error')}, r {_fmt(s.get('heldout_corr'))}"
        f"{_ci(s, 'heldout_corr')}</li>"
    )
    if s.get("never_corr_vs_truth") is not None:
        rows.append(
            f"<li>simulated: never co-observed pairs against the truth, r "
            f"{_fmt(s['never_corr_vs_truth'])}{_ci(s, 'never_corr_vs_truth')}; the intervals "
            f"hold the true covariances {_fmt(s.get('never_coverage_vs_truth'))} of the time "
            f"(nominal {level:.0%})</li>"
        )
    tc = m.get("bootstrap", {}).get("time_constant_s")
    if tc:
        slow = ", ".join(
            f"{_fmt(v)} s [{_fmt(lo)}, {_fmt(hi)}]"
            for v, lo, hi in list(zip(tc["value"], tc["lo"], tc["hi"], strict=True))[:3]
        )
        rows.append(f"<li>slowest time constants of the dynamics: {slow}</li>")
    boot = m.get("bootstrap", {})
    if "skipped" in boot:
        rows.append(f"<li>intervals: not computed ({html.escape(boot['skipped'])})</li>")
    else:
        how = (
            "each refitted from the estimate"
            if boot.get("method", "refit") == "refit"
            else "each one Gauss-Newton step from the estimate, as are the validation fit "
            "and its replicates, because the recordings' per-atom lagged sums exceed the "
            f"memory budget; scored on {boot.get('scored_neurons')} of the sampled neurons"
        )
        calibration = CALIBRATION if boot.get("method", "refit") == "refit" else CALIBRATION_GN
        rows.append(
            f"<li>intervals: {level:.0%} percentile intervals of a moving-block bootstrap "
            f"({boot['replicates']} replicates, {how}; blocks of "
            f"{_fmt(boot['block_rows'])} time steps). {calibration}</li>"
        )
    warnings += [f"n={n}: {w}" for w in m.get("warnings", [])]
    return (
        "".join(parts) + "<ul>" + "".join(rows) + "</ul><p>Warnings:</p>" + _warnings_html(warnings)
    )


def _nplds_section(choice: dict[str, Any], metrics: Sequence[dict[str, Any]]) -> str:
    k = choice.get("chosen")
    parts = [
        f"<p><b>chosen k = {k}</b> ({html.escape(choice.get('rule') or 'no finite score')})</p>"
    ]
    for m in metrics:
        if int(m["settings"]["latent_dim"]) != k:
            continue
        rows = []
        for name, entry in m["models"].items():
            iv = m.get("intervals", {})
            rows.append(
                f"<li>{html.escape(name)}: held-out trials "
                f"{_fmt(entry.get('heldout_trial_bits_per_spike'))}"
                f"{_interval(iv.get('heldout_trial', {}).get(name))} bits/spike, co-smoothing "
                f"{_fmt(entry.get('cosmoothing_bits_per_spike'))}"
                f"{_interval(iv.get('cosmoothing', {}).get(name))} bits/spike (95 % paired "
                "bootstrap over held-out trials and neurons)</li>"
            )
        parts.append("<ul>" + "".join(rows) + "</ul>")
        parts.append(_baselines_html(m))
    return "".join(parts) + "<p>Warnings:</p>" + _warnings_html(choice.get("warnings", []))


def _baselines_html(m: dict[str, Any]) -> str:
    """The field's baselines on the same split, and for each score whether any model beats
    the best of them."""
    base = m.get("baselines", {})
    if not base:
        return ""
    items, verdicts = [], []
    for key, label in (
        ("heldout_trial_bits_per_spike", "held-out trials"),
        ("cosmoothing_bits_per_spike", "co-smoothing"),
    ):
        scored = {n: e[key] for n, e in base.items() if e.get(key) is not None}
        if not scored:
            continue
        iv = m.get("intervals", {}).get(key.removesuffix("_bits_per_spike"), {})
        items += [
            f"<li>{html.escape(n)}: {label} {_fmt(v)}{_interval(iv.get('baseline: ' + n))} "
            "bits/spike</li>"
            for n, v in scored.items()
        ]
        best_name = max(scored, key=scored.get)
        models = {n: e.get(key) for n, e in m["models"].items() if e.get(key) is not None}
        top = max(models, key=models.get) if models else None
        diff = iv.get(f"{top} - baseline: {best_name}")
        gap = f"; difference {_fmt(diff['estimate'])}{_interval(diff)}" if diff else ""
        if diff and diff["lo"] <= 0 <= diff["hi"]:
            gap += ", its interval includes 0"
        if top is not None and models[top] > scored[best_name]:
            verdicts.append(
                f"{label}: {html.escape(top)} ({_fmt(models[top])}) beats the best baseline, "
                f"{html.escape(best_name)} ({_fmt(scored[best_name])}){gap}"
            )
        else:
            verdicts.append(
                f"{label}: <b>no model beats the best baseline</b>, "
                f"{html.escape(best_name)} ({_fmt(scored[best_name])} bits/spike){gap}"
            )
    return (
        "<p>Baselines on the same split (scored the same way):</p><ul>"
        + "".join(items)
        + "</ul><p>"
        + "; ".join(verdicts)
        + ".</p>"
    )


def _interval(entry: dict[str, Any] | None) -> str:
    """`` [lo, hi]`` of a bootstrap interval entry, or nothing."""
    if not entry or entry.get("lo") is None:
        return ""
    return f" [{_fmt(entry['lo'])}, {_fmt(entry['hi'])}]"


def write_summary(
    dataset: str,
    choices: dict[str, str | Path],
    metrics: dict[str, Sequence[str | Path]],
    out: str | Path,
) -> str:
    """The front page of ``dataset`` (HTML at ``out``): ``choices`` maps a model family
    (``stitched_lds``, ``nplds``) to its ``dimension.json``, ``metrics`` to its fits'
    ``metrics.json``. Returns the HTML."""
    sections = []
    for family, path in choices.items():
        choice = json.loads(Path(path).read_text())
        ms = [json.loads(Path(p).read_text()) for p in metrics[family]]
        if family == "stitched_lds":
            sections.append(("Stitched LDS", _stitched_section(choice, ms)))
        else:
            sections.append(("Poisson LDS over trials", _nplds_section(choice, ms)))
    text = _page(f"{dataset}: summary", sections)
    _write_text(out, text)
    return text
