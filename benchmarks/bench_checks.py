"""The stitched LDS's checks: the bootstrap's cost and the calibration of its intervals.

    python benchmarks/bench_checks.py cost [--settings demo paper large] [--repeats 5]
    python benchmarks/bench_checks.py calibration [--seeds 2] [--replicates 20] [--method auto]
    python benchmarks/bench_checks.py real

``cost``: the point fit and the checks (stitch validation and ``--replicates`` moving-block
bootstrap replicates, :func:`poplds.stitched.checks.check_fit`) of one simulation, both timed
in the same process after a first fit has paid the one-time imports (median seconds of
``--repeats`` runs; the ratio is the median of each run's own ratio, with their range).
Settings: ``demo`` (90 neurons in three
recordings of 3000 steps, n = 4); ``paper`` (N = 1000, n = 10, T = 1e5 in two halves sharing
50 neurons); ``large`` (N = 4000, n = 10, two recordings of 2100 neurons and 2e4 steps
sharing 200), whose per-atom sums exceed the moment budget, so the bootstrap takes one
Gauss-Newton step per replicate (two passes over the data, no stitch validation). Prints
the seconds of each, their ratio, the fit's passes, the method and its evaluations (batched
refit evaluations, or Hessian-vector products), the block lengths, the validation pairs and
the coverage of the true never co-observed covariances.

``calibration``: seeded simulations of two recordings (N = 80 neurons, n = 4) over a grid of
overlaps (n, 3n, 10n neurons), noise-to-signal ratios (0.5, 2) and lengths (T = 2e3, 2e4, 1e5
in all), ``--seeds`` each; per simulation the share of never co-observed pairs (sampled
neurons, lags 0-9) whose true covariance lies in its nominal 90 % interval. Prints one line per
simulation and the coverage per setting (mean over seeds), overall, and by each factor.

``real``: the dentate gyrus recording of ``../shared/data`` split into two pseudo-sessions as
the README's example, n = 4: the intervals of the Gauss-Newton bootstrap against the refits'
(median widths of the predicted correlations' intervals per pair class, the held-out scores'
standard errors, the slowest time constants).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from poplds import simulate, stitched
from poplds.stitched import RecordingInput, StitchedSettings
from poplds.stitched.checks import check_fit
from poplds.stitched.evaluate import covariance_scores
from poplds.stitched.models import StitchedLDSParams


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )


def simulation(N, n, layout, noise, seed, moduli=(0.9, 0.99)):
    p = simulate.random_stitched_lds(N, n, eig_moduli=moduli, noise_to_signal=noise, seed=seed)
    ys, _ = simulate.simulate_stitched(p, layout, seed=seed)
    recs = [
        RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
        for r, y in zip(layout, ys, strict=True)
    ]
    return p, recs


def fit_and_check(p, recs, N, n, settings, lags=10, method="auto"):
    t = time.perf_counter()
    fit = stitched.fit(recs, N, n, settings)
    t_fit = time.perf_counter() - t
    truth = StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, lags)
    scores = covariance_scores(fit.params, fit.data, truth=truth, seed=settings.seed)
    t = time.perf_counter()
    metrics, _ = check_fit(fit, settings, n, scores=scores, rate_hz=10.0, method=method)
    return fit, metrics, t_fit, time.perf_counter() - t


def cost(args) -> list[dict]:
    print(
        f"# bootstrap cost, {args.replicates} replicates, median of {args.repeats} runs; "
        f"{machine()}"
    )
    print(
        f"{'setting':>8} {'fit s':>7} {'checks s':>8} {'ratio':>6} {'range':>11} "
        f"{'fit passes':>10} "
        f"{'method':>12} {'evaluations':>11} {'block rows':>14} {'validation':>10} "
        f"{'never coverage':>14}"
    )
    cases = {
        "demo": (90, 4, [(0, 40, 3000), (30, 70, 3000), (60, 90, 3000)], (0.9, 0.98)),
        "paper": (1000, 10, [(0, 525, 50000), (475, 1000, 50000)], (0.9, 0.99)),
        # per-atom sums of 2 x 2100 neurons exceed the 1 GB budget: the Gauss-Newton route
        "large": (4000, 10, [(0, 2100, 20000), (1900, 4000, 20000)], (0.9, 0.99)),
    }
    rows = []
    s = StitchedSettings(lags=10, device=args.device, seed=0, bootstrap=args.replicates)
    warm = simulation(90, 4, simulate.overlapping_layout(90, 3, 10, 3000), 1.0, 0)
    stitched.fit(warm[1], 90, 4, s)  # the one-time imports, outside the timings
    for name in args.settings:
        N, n, blocks, moduli = cases[name]
        layout = [simulate.SimRecording(f"r{k}", (a, b), T) for k, (a, b, T) in enumerate(blocks)]
        p, recs = simulation(N, n, layout, 1.0, 0, moduli)
        runs = [fit_and_check(p, recs, N, n, s) for _ in range(args.repeats)]
        fit, m = runs[-1][:2]  # every run is the same (seeded): only the times differ
        t_fit = float(np.median([r[2] for r in runs]))
        t_checks = float(np.median([r[3] for r in runs]))
        ratios = [r[3] / r[2] for r in runs]  # each run's own: robust to the machine's drifts
        boot, val = m["bootstrap"], m["stitch_validation"]
        row = {
            "setting": name,
            "fit_s": t_fit,
            "checks_s": t_checks,
            "ratio": float(np.median(ratios)),
            "ratio_range": [float(min(ratios)), float(max(ratios))],
            "fit_passes": fit.info.free.passes + fit.info.linked.passes,
            "method": boot.get("method"),
            "evaluations": boot.get("refit_evaluations", boot.get("cg_products")),
            "block_rows": boot.get("block_rows"),
            "validation_pairs": val.get("n_pairs"),
            "never_coverage": boot.get("coverage_vs_truth", {}).get("never"),
        }
        rows.append(row)
        print(
            f"{name:>8} {t_fit:7.2f} {t_checks:8.2f} {row['ratio']:6.2f} "
            f"{row['ratio_range'][0]:5.2f}-{row['ratio_range'][1]:<5.2f} {row['fit_passes']:10d} "
            f"{row['method']:>12} {row['evaluations']:11d} {str(row['block_rows']):>14} "
            f"{str(row['validation_pairs']):>10} {row['never_coverage']:14.3f}",
            flush=True,
        )
    return rows


def calibration(args) -> list[dict]:
    N, n = 80, 4
    print(
        f"# calibration of the nominal 90 % intervals, N={N}, n={n}, method {args.method}; "
        f"{machine()}"
    )
    print(f"{'overlap':>7} {'noise':>5} {'T':>7} {'seed':>4} {'coverage':>8} {'seconds':>7}")
    rows = []
    grid = itertools.product((n, 3 * n, 10 * n), (0.5, 2.0), (2000, 20000, 100000))
    for overlap, noise, T in grid:
        for seed in range(args.seeds):
            layout = simulate.overlapping_layout(N, 2, overlap, T // 2)
            p, recs = simulation(N, n, layout, noise, 100 + seed)
            s = StitchedSettings(lags=10, device=args.device, seed=seed, bootstrap=args.replicates)
            t = time.perf_counter()
            _, m, _, _ = fit_and_check(p, recs, N, n, s, method=args.method)
            cover = m["bootstrap"]["coverage_vs_truth"]["never"]
            rows.append(
                {"overlap": overlap, "noise": noise, "T": T, "seed": seed, "coverage": cover}
            )
            print(
                f"{overlap:7d} {noise:5.1f} {T:7d} {seed:4d} {cover:8.3f} "
                f"{time.perf_counter() - t:7.1f}",
                flush=True,
            )
    print("# coverage per setting (mean over seeds)")
    cov = np.array([r["coverage"] for r in rows])
    for key in ("overlap", "noise", "T"):
        for v in sorted({r[key] for r in rows}):
            sel = np.array([r[key] == v for r in rows])
            print(f"{key}={v}: {cov[sel].mean():.3f} (min {cov[sel].min():.3f})")
    print(
        f"all {len(rows)}: mean {cov.mean():.3f}, min {cov.min():.3f}, "
        f"within 85-95 %: {np.mean((cov >= 0.85) & (cov <= 0.95)):.0%}"
    )
    return rows


def real(args) -> list[dict]:
    """Both bootstrap methods on the dentate gyrus recording split as the README's example
    (``../shared/data``: two pseudo-sessions, frames [0, 1800) with neurons [0, 80) and
    [1800, 3596) with [50, 122)), n = ``--latent-dim``: the Gauss-Newton steps against the
    refits."""
    from poplds.sources import RecordingSpec, open_recording

    path = Path(__file__).resolve().parents[1].parent / "shared/data/dentate_gyrus_events.nwb"
    parts = [("first_half", (0, 1800), (0, 80)), ("second_half", (1800, 3596), (50, 122))]
    recs, ids = [], []
    for name, frames, neurons in parts:
        r = open_recording(RecordingSpec(path=path, name=name, frames=frames, neurons=neurons))
        recs.append((name, np.asarray(r.activity.compute(), dtype=np.float32), r.neuron_ids))
        ids.extend(r.neuron_ids.tolist())
        rate = r.rate_hz
        r.close()
    table = {v: k for k, v in enumerate(dict.fromkeys(ids))}
    inputs = [RecordingInput(name, y, np.array([table[v] for v in nid])) for name, y, nid in recs]
    n, N = args.latent_dim, len(table)
    s = StitchedSettings(lags=10, device=args.device, seed=0, bootstrap=args.replicates)
    fit = stitched.fit(inputs, N, n, s)
    scores = covariance_scores(fit.params, fit.data, seed=0)
    print(f"# dentate split (N = {N}, n = {n}, rate {rate:.3g} Hz); {machine()}")
    rows = []
    out = {}
    for method in ("refit", "gauss_newton"):
        t = time.perf_counter()
        m, a = check_fit(fit, s, n, scores=scores, rate_hz=rate, method=method)
        out[method] = (m, a, time.perf_counter() - t)
    (m1, a1, t1), (m2, a2, t2) = out["refit"], out["gauss_newton"]
    cls = scores["_figure"]["cls"]
    for k, name in enumerate(("observed", "heldout", "never")):
        sel = cls == k
        w1 = np.median((a1["corr_hi"] - a1["corr_lo"])[sel])
        w2 = np.median((a2["corr_hi"] - a2["corr_lo"])[sel])
        rows.append({"class": name, "refit_corr_width": w1, "gn_corr_width": w2})
        print(
            f"{name:>9}: median width of the correlation intervals {w1:.4f} (refit), "
            f"{w2:.4f} (Gauss-Newton), ratio {w2 / w1:.3f}"
        )
    for m, label in ((m1, "refit"), (m2, "Gauss-Newton")):
        v, sm = m["stitch_validation"], m["bootstrap"]["summary"]
        if "skipped" not in v:
            print(
                f"stitch validation ({label}): {v['n_pairs']} pairs, relative error "
                f"{v['rel_error']:.3f} (SE {sm['stitch_rel_error']['se']:.3f}), r {v['corr']:.3f}, "
                f"coverage {v.get('coverage', float('nan')):.3f}"
            )
    for key in ("heldout_rel_error", "heldout_corr"):
        se = [m["bootstrap"]["summary"][key]["se"] for m in (m1, m2)]
        print(f"{key} standard error: {se[0]:.4f} (refit), {se[1]:.4f} (Gauss-Newton)")
        rows.append({"score": key, "refit_se": se[0], "gn_se": se[1]})
    for m, label in ((m1, "refit"), (m2, "Gauss-Newton")):
        tc = m["bootstrap"]["time_constant_s"]
        print(
            f"slowest time constants ({label}): "
            + ", ".join(
                f"{v:.2f} s [{lo:.2f}, {hi:.2f}]"
                for v, lo, hi in list(zip(tc["value"], tc["lo"], tc["hi"], strict=True))[:2]
            )
        )
    print(f"seconds: refit {t1:.2f}, Gauss-Newton {t2:.2f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cost", "calibration", "real"])
    ap.add_argument("--settings", nargs="+", default=["demo", "paper"])
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="cost: median seconds of this many runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--latent-dim", type=int, default=2, help="real: the latent dimension")
    ap.add_argument(
        "--method",
        default="auto",
        choices=["auto", "refit", "gauss_newton"],
        help="calibration: the bootstrap's replicates refitted, or one Gauss-Newton step each",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    out = {"cost": cost, "calibration": calibration, "real": real}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
