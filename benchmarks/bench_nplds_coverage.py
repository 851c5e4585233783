"""Coverage of the N-PLDS drift bands on seeded simulations of the demo's design.

    python benchmarks/bench_nplds_coverage.py [--sims 20] [--first-seed 0] [--k 3]

Each simulation is the demo's ``demo_trials`` design (30 neurons, k = 3, 60 trials of 100
bins of 20 ms, a GP drift of variance 0.25 and length-scale 15 trials, two neuron groups
drifting in opposite directions, dynamics drift 0.08), with its own seed. The N-PLDS is fitted
at the true k with the workflow's defaults (time offset on, drift length-scales of at least 5
trials) on 80 % of the trials; per simulation the share of (trial, neuron) whose true
log-rate shift ``c_i'h[r]`` (centred per neuron) lies in the nominal 95 % band, over every
trial (held-out ones from the GP prediction), for these bands: the band of the centred drift
from h's posterior with the GP hyperparameters integrated out and the loadings' error added
(``poplds.nplds.bands``, what the workflow reports); the same without the loadings' error;
the same as the band of h[r] itself rather than of its deviation from the mean over trials;
the joint Laplace approximation of paths and h at the fitted hyperparameters; and the
factorised q(h) alone. Prints one line per simulation, then the means, the range and how
many simulations fall within 90-98 %.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from poplds.nplds import bands, estep, model, vi
from poplds.nplds.evaluate import evaluate, gp_conditional, split_neurons, split_trials
from poplds.simulate import simulate_poisson_trials

DESIGN = {
    "n_neurons": 30,
    "latent_dim": 3,
    "n_trials": 60,
    "n_bins": 100,
    "bin_size_s": 0.02,
    "base_rate_hz": 10.0,
    "drift_sigma2": 0.25,
    "drift_tau": 15.0,
    "opposite_groups": True,
    "eig_moduli": (0.6, 0.8),
    "dynamics_drift_scale": 0.08,
}


def coverage(seed: int, k: int) -> dict[str, float]:
    """One simulation's band coverage (joint and factorised) and its fit's seconds."""
    tr = simulate_poisson_trials(seed=seed, **DESIGN)
    y = tr.counts.astype(np.float64)
    R = y.shape[0]
    out = split_trials(R, 0.2, 0)
    held = split_neurons(y.shape[2], 0.25, 0)
    n = np.arange(R, dtype=np.float64)
    t0 = time.perf_counter()
    fit = vi.fit(y[~out], n[~out], k, drift=True, offset=True, min_drift_trials=5.0,
                 progress_every=0)  # fmt: skip
    seconds = time.perf_counter() - t0
    tt = torch.as_tensor
    _, arrays = evaluate(fit, tt(y[~out]), tt(n[~out]), tt(y[out]), tt(n[out]), held, 0.02,
                         min_drift_trials=5.0)  # fmt: skip
    order = np.concatenate([np.where(~out)[0], np.where(out)[0]])
    C = fit.params.C.numpy()
    true = (tr.h @ tr.C.T)[order]
    true = true - true.mean(0)  # the mean shift is d's

    def covered(h_mean, h_var, C_cov=None):
        shift, sd = bands.shift_band(h_mean, h_var, C, C_cov)
        return float((np.abs(true - (shift - shift.mean(0))) <= 1.96 * sd).mean())

    p, st = fit.params, fit.state
    data = model.TrialData(tt(y[~out]), tt(n[~out]))
    hS = estep.h_joint_covariance(data, p, st, model.gp_priors(p, tt(n[~out])))
    cond = gp_conditional(p, replace(st, hS=hS), tt(n[~out]), tt(n[out]))
    var_joint = torch.cat(
        [torch.diagonal(hS, dim1=-2, dim2=-1).T, torch.diagonal(cond.hK, dim1=-2, dim2=-1).T]
    )
    band_mean = arrays["h_band_mean"].numpy()
    C_cov = arrays["C_cov"].numpy()
    return {
        "integrated": covered(band_mean, arrays["h_band_var_centred"].numpy(), C_cov),
        "uncentred": covered(band_mean, arrays["h_band_var"].numpy(), C_cov),
        "integrated_C_fixed": covered(band_mean, arrays["h_band_var_centred"].numpy()),
        "joint": covered(arrays["h_mean"].numpy(), var_joint.numpy()),
        "factorised": covered(arrays["h_mean"].numpy(), arrays["h_var"].numpy()),
        "corr": float(
            np.corrcoef(((band_mean - band_mean.mean(0)) @ C.T).ravel(), true.ravel())[0, 1]
        ),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.sims):
        r = coverage(seed, args.k)
        rows.append(r)
        print(
            f"seed {seed:3d}: 95% band covers {100 * r['integrated']:5.1f}% "
            f"(hyperparameters "
            f"fixed: {100 * r['joint']:5.1f}%, factorised q(h): {100 * r['factorised']:5.1f}%), "
            f"drift r = {r['corr']:.3f}, fit {r['seconds']:.1f} s",
            flush=True,
        )
    summary = {}
    for key in ("integrated", "uncentred", "integrated_C_fixed", "joint", "factorised"):
        c = np.array([r[key] for r in rows])
        inside = int(((c >= 0.9) & (c <= 0.98)).sum())
        summary[key] = (
            f"mean {100 * c.mean():.1f}% (range {100 * c.min():.1f}-{100 * c.max():.1f}%, "
            f"{inside} within 90-98%)"
        )
    print(
        f"\n{len(rows)} simulations: band with the hyperparameters integrated out "
        f"{summary['integrated']} ({summary['integrated_C_fixed']} without the loadings' "
        f"error; {summary['uncentred']} as the band of h[r] itself, not of the centred drift); "
        f"joint Laplace at the fitted hyperparameters "
        f"{summary['joint']}; factorised q(h) {summary['factorised']}"
    )


if __name__ == "__main__":
    main()
