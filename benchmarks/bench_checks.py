"""The stitched LDS's checks: the bootstrap's cost and the calibration of its intervals.

    python benchmarks/bench_checks.py cost [--settings demo paper] [--replicates 20] [--repeats 5]
    python benchmarks/bench_checks.py calibration [--seeds 2] [--replicates 20]

``cost``: the point fit and the checks (stitch validation and ``--replicates`` moving-block
bootstrap replicates, :func:`poplds.stitched.checks.check_fit`) of one simulation, both timed
in the same process after a first fit has paid the one-time imports (median seconds of
``--repeats`` runs; the ratio is of the medians): the demo (90 neurons in
three recordings of 3000 steps, n = 4) and the paper setting (N = 1000, n = 10, T = 1e5 in two
halves sharing 50 neurons). Prints the seconds of each, their ratio, the fit's and a
replicate's passes, the block lengths and the atoms' memory.

``calibration``: seeded simulations of two recordings (N = 80 neurons, n = 4) over a grid of
overlaps (n, 3n, 10n neurons), noise-to-signal ratios (0.5, 2) and lengths (T = 2e3, 2e4, 1e5
in all), ``--seeds`` each; per simulation the share of never co-observed pairs (sampled
neurons, lags 0-9) whose true covariance lies in its nominal 90 % interval. Prints one line per
simulation and the coverage per setting (mean over seeds), overall, and by each factor.
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


def fit_and_check(p, recs, N, n, settings, lags=10):
    t = time.perf_counter()
    fit = stitched.fit(recs, N, n, settings)
    t_fit = time.perf_counter() - t
    truth = StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, lags)
    scores = covariance_scores(fit.params, fit.data, truth=truth, seed=settings.seed)
    t = time.perf_counter()
    metrics, _ = check_fit(fit, settings, n, scores=scores, rate_hz=10.0)
    return fit, metrics, t_fit, time.perf_counter() - t


def cost(args) -> list[dict]:
    print(
        f"# bootstrap cost, {args.replicates} replicates, median of {args.repeats} runs; "
        f"{machine()}"
    )
    print(
        f"{'setting':>8} {'fit s':>7} {'checks s':>8} {'ratio':>6} {'fit passes':>10} "
        f"{'refit evaluations':>16} {'block rows':>14} {'validation':>10} {'never coverage':>14}"
    )
    cases = {
        "demo": (90, 4, [(0, 40, 3000), (30, 70, 3000), (60, 90, 3000)], (0.9, 0.98)),
        "paper": (1000, 10, [(0, 525, 50000), (475, 1000, 50000)], (0.9, 0.99)),
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
        boot, val = m["bootstrap"], m["stitch_validation"]
        row = {
            "setting": name,
            "fit_s": t_fit,
            "checks_s": t_checks,
            "ratio": t_checks / t_fit,
            "fit_passes": fit.info.free.passes + fit.info.linked.passes,
            "refit_evaluations": boot.get("refit_evaluations"),
            "block_rows": boot.get("block_rows"),
            "validation_pairs": val.get("n_pairs"),
            "never_coverage": boot.get("coverage_vs_truth", {}).get("never"),
        }
        rows.append(row)
        print(
            f"{name:>8} {t_fit:7.2f} {t_checks:8.2f} {row['ratio']:6.2f} {row['fit_passes']:10d} "
            f"{row['refit_evaluations']:16d} {str(row['block_rows']):>14} "
            f"{str(row['validation_pairs']):>10} {row['never_coverage']:14.3f}",
            flush=True,
        )
    return rows


def calibration(args) -> list[dict]:
    N, n = 80, 4
    print(f"# calibration of the nominal 90 % intervals, N={N}, n={n}; {machine()}")
    print(f"{'overlap':>7} {'noise':>5} {'T':>7} {'seed':>4} {'coverage':>8} {'seconds':>7}")
    rows = []
    grid = itertools.product((n, 3 * n, 10 * n), (0.5, 2.0), (2000, 20000, 100000))
    for overlap, noise, T in grid:
        for seed in range(args.seeds):
            layout = simulate.overlapping_layout(N, 2, overlap, T // 2)
            p, recs = simulation(N, n, layout, noise, 100 + seed)
            s = StitchedSettings(lags=10, device=args.device, seed=seed, bootstrap=args.replicates)
            t = time.perf_counter()
            _, m, _, _ = fit_and_check(p, recs, N, n, s)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cost", "calibration"])
    ap.add_argument("--settings", nargs="+", default=["demo", "paper"])
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="cost: median seconds of this many runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    out = cost(args) if args.what == "cost" else calibration(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
