"""Stitched LDS benchmarks: the paper's setting, a peer library, and real data.

    python benchmarks/bench_stitched.py paper [--seeds 5] [--overlaps 0 10 50 300 1000]
    python benchmarks/bench_stitched.py peer  [--neurons 50 100 200]     # needs pykalman
    python benchmarks/bench_stitched.py real  [--data ../shared/data/dentate_gyrus_events.nwb]

``paper``: Nonnenmacher et al.'s two-recording setting: N = 1000 neurons, n = 10 latents,
T = 1e5 steps split in two halves, each half observing its own neuron block, the blocks
sharing ``overlap`` neurons; noise variance equal to signal variance; |eig(A)| in 0.9-0.99.
Each fit starts from the automatic warm start with the workflow's defaults (10 lags, 10% of
co-observed pairs held out), never re-run by hand. Prints per overlap and seed: fit seconds,
passes, correlation of predicted and true covariances of never co-observed pairs per lag (min
and mean over lags 0-9), the largest principal angle to the true C, then the median over
seeds and the ratio of subspace error to that of the fully observed fit (overlap = N).

``peer``: pykalman's EM (``KalmanFilter.em``) on fully observed data (N neurons, T = 4000,
n = 4), against ``fit_stitched_lds`` on the same data. Both are scored by the relative error of
their predicted lagged covariances (lags 0-4, off-diagonal) on the pairs our fit held out,
against the empirical ones; EM runs iteration by iteration until it reaches our error or a
time budget. Prints each one's time and the ratio.

``real``: the dentate gyrus recording (122 cells, 3596 frames at 10 Hz) cut into two partial
recordings, the first ~60% of the cells observed in the first half of the time, the last ~60%
in the second half; the fit never sees the first block's cells together with the second's.
Prints, per lag, the correlation of predicted covariances of those never co-observed pairs with
their empirical covariances in the full recording, and the same for the co-observed pairs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from poplds import simulate
from poplds.stitched import RecordingInput, fit_stitched_lds
from poplds.stitched.evaluate import principal_angles_deg

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )


def never_scores(p, fit, a_only, b_only, lags):
    out = []
    for s in range(lags):
        Xs_true = np.linalg.matrix_power(p.A, s) @ p.Pi
        true = np.concatenate(
            [
                (p.C[a_only] @ Xs_true @ p.C[b_only].T).ravel(),
                (p.C[b_only] @ Xs_true @ p.C[a_only].T).ravel(),
            ]
        )
        pred = np.concatenate(
            [
                (fit.params.C[a_only] @ fit.params.X[s] @ fit.params.C[b_only].T).ravel(),
                (fit.params.C[b_only] @ fit.params.X[s] @ fit.params.C[a_only].T).ravel(),
            ]
        )
        out.append(float(np.corrcoef(true, pred)[0, 1]))
    return out


def paper(args) -> dict:
    N, n, T, K = args.neurons, args.latents, args.time, 10
    print(f"# paper setting: N={N}, n={n}, T={T} in two halves, lags 0-{K - 1}; {machine()}")
    print(
        f"{'overlap':>7} {'seed':>4} {'fit s':>6} {'passes':>6} {'never min r':>11} "
        f"{'never mean r':>12} {'max angle':>9}"
    )
    rows = []
    for overlap in args.overlaps:
        for seed in range(args.seeds):
            p = simulate.random_stitched_lds(
                N, n, eig_moduli=(0.9, 0.99), noise_to_signal=1.0, seed=seed
            )
            layout = simulate.overlapping_layout(N, 2, overlap, T // 2)
            ys, _ = simulate.simulate_stitched(p, layout, seed=seed)
            recs = [
                RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
                for r, y in zip(layout, ys, strict=True)
            ]
            del ys
            t = time.perf_counter()
            fit = fit_stitched_lds(recs, N, n, lags=K, device=args.device, seed=seed)
            dt = time.perf_counter() - t
            a = np.arange(*layout[0].neurons)
            b = np.arange(*layout[1].neurons)
            a_only, b_only = np.setdiff1d(a, b), np.setdiff1d(b, a)
            corr = never_scores(p, fit, a_only, b_only, K) if len(a_only) else [np.nan] * K
            angle = max(principal_angles_deg(p.C, fit.params.C))
            passes = fit.info["free"]["passes"] + fit.info["linked"]["passes"]
            rows.append(
                {
                    "overlap": overlap,
                    "seed": seed,
                    "seconds": dt,
                    "passes": passes,
                    "never_corr": corr,
                    "max_angle_deg": angle,
                    "warnings": fit.info["warnings"],
                }
            )
            print(
                f"{overlap:7d} {seed:4d} {dt:6.1f} {passes:6d} {np.min(corr):11.4f} "
                f"{np.mean(corr):12.4f} {angle:9.2f}",
                flush=True,
            )
    print("# median over seeds")
    print(
        f"{'overlap':>7} {'fit s':>6} {'never r per lag 0..9 (median of seeds)':>40} "
        f"{'angle':>6} {'angle / full':>12}"
    )
    full = [r["max_angle_deg"] for r in rows if r["overlap"] == N]
    full_med = float(np.median(full)) if full else np.nan
    summary = []
    for overlap in args.overlaps:
        sel = [r for r in rows if r["overlap"] == overlap]
        per_lag = np.median(np.array([r["never_corr"] for r in sel]), axis=0)
        ang = float(np.median([r["max_angle_deg"] for r in sel]))
        secs = float(np.median([r["seconds"] for r in sel]))
        summary.append(
            {
                "overlap": overlap,
                "seconds": secs,
                "never_corr": per_lag.tolist(),
                "max_angle_deg": ang,
                "angle_over_full": ang / full_med,
            }
        )
        lag_txt = " ".join(f"{v:.3f}" for v in per_lag)
        print(f"{overlap:7d} {secs:6.1f} {lag_txt:>40} {ang:6.2f} {ang / full_med:12.2f}")
    return {"rows": rows, "summary": summary}


def heldout_error(C, A, Pi, emp, sel, lags):
    err, ref = 0.0, 0.0
    X = Pi
    for s in range(lags):
        pred = C @ X @ C.T
        err += np.sum((pred - emp[s])[sel[s]] ** 2)
        ref += np.sum(emp[s][sel[s]] ** 2)
        X = A @ X
    return float(np.sqrt(err / ref))


def peer(args) -> dict:
    try:
        from pykalman import KalmanFilter
    except ImportError:
        sys.exit("peer needs pykalman: pip install pykalman (make bench installs it)")
    from poplds.stitched.evaluate import empirical_sample, pair_classes

    n, T, K = 4, 4000, 5
    print(f"# peer: pykalman EM vs poplds on fully observed data, n={n}, T={T}; {machine()}")
    print(
        f"{'N':>5} {'poplds s':>9} {'poplds err':>10} {'EM s':>8} {'EM iters':>8} "
        f"{'EM err':>8} {'EM / poplds time':>16}"
    )
    rows = []
    for N in args.neurons:
        p = simulate.random_stitched_lds(N, n, eig_moduli=(0.9, 0.99), seed=N)
        (y,), _ = simulate.simulate_stitched(p, [simulate.SimRecording("r", (0, N), T)], seed=N)
        t = time.perf_counter()
        fit = fit_stitched_lds(
            [RecordingInput("r", y, np.arange(N))], N, n, lags=K, device="cpu", heldout_fraction=0.1
        )
        ours_s = time.perf_counter() - t
        sample = np.arange(N)
        emp, counts = empirical_sample(fit.data, sample)
        cls = pair_classes(fit.data, sample, counts)
        sel = cls == 1
        ours = heldout_error(fit.params.C, fit.params.A, fit.params.Pi, emp, sel, K)
        yc = y - y.mean(0)
        kf = KalmanFilter(
            transition_matrices=np.eye(n) * 0.9,
            observation_matrices=np.random.default_rng(0).standard_normal((N, n)) * 0.1,
            transition_covariance=np.eye(n),
            observation_covariance=np.eye(N),
            initial_state_mean=np.zeros(n),
            initial_state_covariance=np.eye(n),
            em_vars=[
                "transition_matrices",
                "observation_matrices",
                "transition_covariance",
                "observation_covariance",
            ],
        )
        t, iters, em_err = time.perf_counter(), 0, np.inf
        while time.perf_counter() - t < args.budget:
            kf = kf.em(yc, n_iter=1)
            iters += 1
            A, C, Qk = kf.transition_matrices, kf.observation_matrices, kf.transition_covariance
            try:
                Pi = simulate.stationary_covariance(A, Qk)
            except (np.linalg.LinAlgError, ValueError):
                continue
            em_err = heldout_error(C, A, Pi, emp, sel, K)
            if em_err <= ours:
                break
        em_s = time.perf_counter() - t
        reached = em_err <= ours
        rows.append(
            {
                "N": N,
                "poplds_s": ours_s,
                "poplds_err": ours,
                "em_s": em_s,
                "em_iters": iters,
                "em_err": em_err,
                "em_reached": reached,
            }
        )
        ratio = f"{em_s / ours_s:.1f}x" if reached else f">{em_s / ours_s:.1f}x (not reached)"
        print(
            f"{N:5d} {ours_s:9.2f} {ours:10.4f} {em_s:8.1f} {iters:8d} {em_err:8.4f} {ratio:>16}",
            flush=True,
        )
    return {"rows": rows}


def real(args) -> dict:
    import h5py

    with h5py.File(args.data, "r") as f:
        y = np.asarray(f["processing/ophys/events/data"][:], dtype=np.float64)
    if args.bin > 1:  # sum sparse events over bins of `bin` frames
        y = y[: len(y) // args.bin * args.bin].reshape(-1, args.bin, y.shape[1]).sum(1)
    T, N = y.shape
    K = 5
    cut = int(0.6 * N)
    a = np.arange(0, cut)
    b = np.arange(N - cut, N)
    a_only, b_only = np.setdiff1d(a, b), np.setdiff1d(b, a)
    half = T // 2
    recs = [RecordingInput("first", y[:half, a], a), RecordingInput("second", y[half:, b], b)]
    yc = y - y.mean(0)
    emp = [yc[s:].T @ yc[: T - s] / (T - s) for s in range(K)]
    print(
        f"# real: {args.data.name}, {N} cells x {T} frames; first half sees {len(a)} cells, "
        f"second half {len(b)}, {len(a) + len(b) - N} shared; {machine()}"
    )

    def pairs(M):
        return np.concatenate(
            [M[np.ix_(a_only, b_only)].ravel(), M[np.ix_(b_only, a_only)].ravel()]
        )

    # noise ceiling: the same pairs' covariances in the first half against the second half
    h1, h2 = yc[:half] - yc[:half].mean(0), yc[half:] - yc[half:].mean(0)
    ceiling = [
        float(
            np.corrcoef(pairs(h1[s:].T @ h1[: half - s]), pairs(h2[s:].T @ h2[: T - half - s]))[
                0, 1
            ]
        )
        for s in range(K)
    ]
    print(
        "split-half reliability of those pairs' empirical covariances per lag (the ceiling): "
        + " ".join(f"{v:.3f}" for v in ceiling)
    )
    out = {"ceiling": ceiling}
    for n in args.latents_real:
        full = fit_stitched_lds(
            [RecordingInput("all", y, np.arange(N))],
            N,
            n,
            lags=K,
            device="cpu",
            heldout_fraction=0.0,
        )
        full_r = [
            float(
                np.corrcoef(
                    pairs(full.params.C @ full.params.X[s] @ full.params.C.T), pairs(emp[s])
                )[0, 1]
            )
            for s in range(K)
        ]
        t = time.perf_counter()
        fit = fit_stitched_lds(recs, N, n, lags=K, device="cpu", heldout_fraction=0.1)
        dt = time.perf_counter() - t
        never, observed = [], []
        for s in range(K):
            pred = fit.params.C @ fit.params.X[s] @ fit.params.C.T
            blk = np.concatenate(
                [pred[np.ix_(a_only, b_only)].ravel(), pred[np.ix_(b_only, a_only)].ravel()]
            )
            ref = np.concatenate(
                [emp[s][np.ix_(a_only, b_only)].ravel(), emp[s][np.ix_(b_only, a_only)].ravel()]
            )
            never.append(float(np.corrcoef(blk, ref)[0, 1]))
            off = ~np.eye(len(a), dtype=bool) if s == 0 else np.ones((len(a), len(a)), bool)
            obs_pred = pred[np.ix_(a, a)][off]
            obs_ref = y[:half, a] - y[:half, a].mean(0)
            obs_emp = (obs_ref[s:].T @ obs_ref[: half - s] / (half - s))[off]
            observed.append(float(np.corrcoef(obs_pred, obs_emp)[0, 1]))
        out[n] = {
            "seconds": dt,
            "never_corr": never,
            "observed_corr": observed,
            "fully_observed_fit_corr": full_r,
        }
        print(
            f"n={n}: fit {dt:.1f} s; never co-observed r per lag "
            + " ".join(f"{v:.3f}" for v in never)
            + "; same pairs, fully observed fit "
            + " ".join(f"{v:.3f}" for v in full_r)
            + "; co-observed r "
            + " ".join(f"{v:.3f}" for v in observed),
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["paper", "peer", "real"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 10, 50, 300, 1000])
    ap.add_argument("--neurons", type=int, nargs="+", default=None)
    ap.add_argument("--latents", type=int, default=10)
    ap.add_argument("--time", type=int, default=100_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget", type=float, default=300.0, help="peer: EM seconds at most")
    ap.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data" / "dentate_gyrus_events.nwb"
    )
    ap.add_argument("--latents-real", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--bin", type=int, default=1, help="real: frames summed per bin")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.neurons is None:
        args.neurons = [1000] if args.what == "paper" else [50, 100, 200]
    if args.what == "paper":
        args.neurons = args.neurons[0]
    result = {"paper": paper, "peer": peer, "real": real}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
