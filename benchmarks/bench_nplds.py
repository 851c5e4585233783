"""Poisson LDS over trials: fit times at the paper's size, scaling, a peer library.

    python benchmarks/bench_nplds.py v1      [--ks 1 2 4 8] [--bins 100]
    python benchmarks/bench_nplds.py scaling [--iters 5]
    python benchmarks/bench_nplds.py peer    [--trials 100]          # needs pykalman
    python benchmarks/bench_nplds.py large   [--neurons 1000 --trials 1000 --bins 100 --k 10]

``v1``: the size of Park et al.'s V1 data, 64 neurons x 100 trials (``--bins`` bins each), a
simulation with a slow drift; N-PLDS and PLDS fitted to convergence (relative change of the
bound below 1e-6) for each k. Prints seconds, iterations and seconds per iteration. The
authors' MATLAB code took about an hour per fit of this size (their paper and repository).

``scaling``: seconds per EM iteration of N-PLDS (after the start) from a base of R = 100
trials, T = 100 bins, N = 64 neurons, k = 4, doubling one of R, T, N, k at a time.

``peer``: the latent-path step with Gaussian emissions, ``poplds.nplds.kalman_reference.
gaussian_latents`` (all trials in one batched block-tridiagonal solve), against pykalman's
``KalmanFilter.smooth`` run trial by trial with identical parameters; the two must agree to
1e-8 (means, covariances). Prints both times and the ratio.

``large``: one EM iteration at the issue's GPU size (1000 neurons x 1000 trials x 100 bins,
k = 10) on the available device, and the projected time of a fit.

Real recordings: ``benchmarks/bench_real.py``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from poplds.nplds import vi
from poplds.simulate import simulate_poisson_trials

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {threads} torch threads, torch {torch.__version__}, {gpu}"


def simulate(N, R, T, k=4, seed=1):
    return simulate_poisson_trials(
        n_neurons=N,
        latent_dim=k,
        n_trials=R,
        n_bins=T,
        drift_sigma2=0.25,
        drift_tau=20,
        opposite_groups=True,
        seed=seed,
    ).counts


def bench_v1(args) -> None:
    y = simulate(64, 100, args.bins)
    print(f"V1 size: 64 neurons x 100 trials x {args.bins} bins ({machine()})")
    print(f"{'model':>6} {'k':>3} {'seconds':>8} {'iterations':>10} {'s/iter':>7} converged")
    for k in args.ks:
        for name, drift in (("N-PLDS", True), ("PLDS", False)):
            fit = vi.fit(y, None, k, drift=drift, progress_every=0)
            print(
                f"{name:>6} {k:>3} {fit.seconds:8.1f} {fit.iterations:>10} "
                f"{fit.seconds / fit.iterations:7.3f} {fit.converged}"
            )


def per_iteration(y, k, iters, device="cpu") -> float:
    """Median seconds per EM iteration after the start."""
    fit = vi.fit(y, None, k, max_iter=iters, min_iter=iters, progress_every=0, device=device)
    return float(np.median(fit.iteration_seconds))


def bench_scaling(args) -> None:
    base = {"R": 100, "T": 100, "N": 64, "k": 4}
    print(f"N-PLDS seconds per EM iteration ({machine()})")
    print(f"{'R':>5} {'T':>5} {'N':>5} {'k':>3} {'s/iter':>7}")
    rows = [base] + [{**base, key: base[key] * 2} for key in ("R", "T", "N", "k")]
    rows.append({**base, "k": base["k"] * 4})
    for row in rows:
        y = simulate(row["N"], row["R"], row["T"])
        s = per_iteration(y, row["k"], args.iters)
        print(f"{row['R']:>5} {row['T']:>5} {row['N']:>5} {row['k']:>3} {s:7.3f}")


def bench_peer(args) -> None:
    from pykalman import KalmanFilter

    from poplds.nplds.kalman_reference import gaussian_latents

    rng = np.random.default_rng(0)
    R, T, N, k = args.trials, 100, 64, 4
    A = 0.9 * np.linalg.qr(rng.standard_normal((k, k)))[0]
    Q = 0.2 * np.eye(k)
    C = rng.standard_normal((N, k))
    Rn = 0.5 + rng.random(N)
    x0, V0 = np.zeros(k), np.eye(k)
    off = rng.standard_normal(N)
    y = rng.standard_normal((R, T, N)) + off
    tt = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    args_t = (tt(y), tt(C), tt(Rn), tt(np.tile(off, (R, 1))), tt(A), tt(Q), tt(x0), tt(V0))
    gaussian_latents(*args_t)  # warm-up
    t0 = time.perf_counter()
    ours = gaussian_latents(*args_t)
    t_ours = time.perf_counter() - t0
    kf = KalmanFilter(
        transition_matrices=A,
        observation_matrices=C,
        transition_covariance=Q,
        observation_covariance=np.diag(Rn),
        initial_state_mean=x0,
        initial_state_covariance=V0,
        observation_offsets=off,
    )
    t0 = time.perf_counter()
    theirs = [kf.smooth(y[r]) for r in range(R)]
    t_peer = time.perf_counter() - t0
    dm = max(np.abs(ours.mean[r].numpy() - theirs[r][0]).max() for r in range(R))
    dc = max(np.abs(ours.cov[r].numpy() - theirs[r][1]).max() for r in range(R))
    assert dm < 1e-8 and dc < 1e-8, (dm, dc)
    print(f"Gaussian latent-path posterior, {R} trials x {T} bins, N = {N}, k = {k} ({machine()})")
    print(f"max difference: means {dm:.1e}, covariances {dc:.1e}")
    print(f"poplds {t_ours:.3f} s, pykalman {t_peer:.3f} s, ratio {t_peer / t_ours:.1f}x")


def bench_large(args) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"{args.neurons} neurons x {args.trials} trials x {args.bins} bins, k = {args.k}, "
        f"on {dev} ({machine()})"
    )
    y = simulate(args.neurons, args.trials, args.bins, k=min(args.k, 10), seed=2)
    fit = vi.fit(
        y, None, args.k, max_iter=args.iters, min_iter=args.iters, progress_every=1, device=dev
    )
    s = float(np.median(fit.iteration_seconds))
    start = fit.seconds - sum(fit.iteration_seconds)
    print(f"start {start:.1f} s; {s:.2f} s per iteration (median of {fit.iterations})")
    print(f"projected fit of 100 iterations: {(start + 100 * s) / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("v1")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--bins", type=int, default=100)
    p = sub.add_parser("scaling")
    p.add_argument("--iters", type=int, default=5)
    p = sub.add_parser("peer")
    p.add_argument("--trials", type=int, default=100)
    p = sub.add_parser("large")
    p.add_argument("--neurons", type=int, default=1000)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    {
        "v1": bench_v1,
        "scaling": bench_scaling,
        "peer": bench_peer,
        "large": bench_large,
    }[args.mode](args)


if __name__ == "__main__":
    main()
