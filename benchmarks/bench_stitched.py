"""Stitched LDS benchmarks: the paper's setting, a peer library, and real data.

    python benchmarks/bench_stitched.py paper [--seeds 5] [--overlaps 0 10 50 300 1000]
    python benchmarks/bench_stitched.py peer  [--neurons 50 100 200]     # needs pykalman
    python benchmarks/bench_stitched.py scale [--neurons 1000000 --time 10000] [--stream]
    python benchmarks/bench_stitched.py sessions [--recordings 5 10 30]
    python benchmarks/bench_stitched.py parallel [--processes 2]

``paper``: Nonnenmacher et al.'s two-recording setting: N = 1000 neurons, n = 10 latents,
T = 1e5 steps split in two halves, each half observing its own neuron block, the blocks
sharing ``overlap`` neurons; noise variance equal to signal variance; |eig(A)| in 0.9-0.99.
Each fit starts from the automatic warm start with the workflow's defaults (10 lags, 10% of
co-observed pairs held out), never re-run by hand. Prints per overlap and seed: fit seconds,
passes, correlation of predicted and true covariances of never co-observed pairs per lag (min
and mean over lags 0-9), the largest principal angle to the true C, then the median over
seeds and the ratio of subspace error to that of the fully observed fit (overlap = N).

``peer``: pykalman's EM (``KalmanFilter.em``) on fully observed data (N neurons, T = 4000,
n = 4), against ``poplds.stitched.fit`` on the same data. Both are scored by the relative error of
their predicted lagged covariances (lags 0-4, off-diagonal) on the pairs our fit held out,
against the empirical ones; EM runs iteration by iteration until it reaches our error or a
time budget. Prints each one's time and the ratio.

``scale``: a large two-recording dataset (default N = 1e6, T = 1e4 in two recordings of
5000, n = 10) written chunk by chunk into a dataset store, then fitted end to end from the store
(``--stream`` forces streaming even where the data would fit on the device). Prints the
optimiser, passes (epochs), time per pass against its floor (streamed: the data bytes over the
store's zarr read throughput measured in the same run; in memory: the bytes read once at the
measured copy bandwidth), peak RSS, and the never co-observed covariance correlation against
the truth at lags 0-4 on 2000 + 2000 sampled neurons. ``--neurons 20000`` makes a quick run.

``sessions``: chains of R recordings of 200 neurons each (T = 10 000 each, n = 8, default lags
and held-out split) from a circuit of 2000 R / 30 neurons, neighbours overlapping by about 140;
prints fit time, passes, time per pass, each recording's route and the never co-observed
covariance correlation against the truth. Then the three-recording, 300-neuron case against a
dense fit on precomputed covariances (every pooled lagged covariance of the dataset formed once,
the dense loss by autograd, the same warm start, optimiser and stopping rule).

``parallel``: one fit of a two-recording simulation from the store in 1 and in ``--processes``
gloo processes (``stitched_lds.processes``) on this machine, data route, L-BFGS: time per pass.

Real recordings: ``benchmarks/bench_real.py``.
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

from poplds import simulate, stitched
from poplds.stitched import RecordingInput, StitchedSettings
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
        f"{'overlap':>7} {'seed':>4} {'optimizer:route':>16} {'fit s':>6} {'passes':>6} "
        f"{'never min r':>11} {'never mean r':>12} {'max angle':>9}"
    )
    rows = []
    for overlap in args.overlaps:
        for seed, config in ((s, c) for s in range(args.seeds) for c in args.configs):
            optimizer, route = config.split(":")
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
            fit = stitched.fit(
                recs,
                N,
                n,
                StitchedSettings(
                    lags=K, device=args.device, seed=seed, optimizer=optimizer, route=route
                ),
            )
            dt = time.perf_counter() - t
            a = np.arange(*layout[0].neurons)
            b = np.arange(*layout[1].neurons)
            a_only, b_only = np.setdiff1d(a, b), np.setdiff1d(b, a)
            corr = never_scores(p, fit, a_only, b_only, K) if len(a_only) else [np.nan] * K
            angle = max(principal_angles_deg(p.C, fit.params.C))
            passes = fit.info.free.passes + fit.info.linked.passes
            rows.append(
                {
                    "overlap": overlap,
                    "seed": seed,
                    "config": config,
                    "seconds": dt,
                    "passes": passes,
                    "never_corr": corr,
                    "max_angle_deg": angle,
                    "warnings": fit.info.warnings,
                }
            )
            print(
                f"{overlap:7d} {seed:4d} {config:>16} {dt:6.1f} {passes:6d} {np.min(corr):11.4f} "
                f"{np.mean(corr):12.4f} {angle:9.2f}",
                flush=True,
            )
    print("# median over seeds")
    print(
        f"{'overlap':>7} {'optimizer:route':>16} {'fit s':>6} "
        f"{'never r per lag 0..9 (median of seeds)':>40} {'angle':>6} {'angle / full':>12}"
    )
    summary = []
    for overlap, config in ((o, c) for o in args.overlaps for c in args.configs):
        full = [r["max_angle_deg"] for r in rows if r["overlap"] == N and r["config"] == config]
        full_med = float(np.median(full)) if full else np.nan
        sel = [r for r in rows if r["overlap"] == overlap and r["config"] == config]
        per_lag = np.median(np.array([r["never_corr"] for r in sel]), axis=0)
        ang = float(np.median([r["max_angle_deg"] for r in sel]))
        secs = float(np.median([r["seconds"] for r in sel]))
        summary.append(
            {
                "overlap": overlap,
                "config": config,
                "seconds": secs,
                "never_corr": per_lag.tolist(),
                "max_angle_deg": ang,
                "angle_over_full": ang / full_med,
            }
        )
        lag_txt = " ".join(f"{v:.3f}" for v in per_lag)
        print(
            f"{overlap:7d} {config:>16} {secs:6.1f} {lag_txt:>40} {ang:6.2f} {ang / full_med:12.2f}"
        )
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
        fit = stitched.fit(
            [RecordingInput("r", y, np.arange(N))],
            N,
            n,
            StitchedSettings(lags=K, device="cpu", heldout_fraction=0.1),
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


def write_large_store(
    path: Path,
    N: int,
    T: int,
    n: int,
    overlap: float,
    seed: int,
    reuse: bool = False,
    codec: str = "auto",
):
    """A two-recording stitched LDS written chunk by chunk into a dataset store (the data are
    never whole in memory): recording 1 sees neurons [0, N (1+overlap)/2), recording 2 the
    rest plus the overlap, each for T/2 steps, with ``codec`` (``auto``: as ingest would
    choose for these traces, from the first chunk: :func:`poplds.store.choose_codec`).
    Returns the truth (``reuse``: only the truth, when the store of the same N and T is
    already there)."""
    import zarr

    from poplds.store import (
        FORMAT,
        activity_chunks,
        choose_codec,
        create_activity,
        write_array,
        write_strings,
    )

    rng = np.random.default_rng(seed)
    p = simulate.random_stitched_lds(min(N, 2000), n, eig_moduli=(0.9, 0.99), seed=seed)
    C = rng.standard_normal((N, n)) / np.sqrt(n)  # loadings for all N neurons
    signal = np.einsum("ik,kl,il->i", C, p.Pi, C)
    x = simulate.sample_lds_latents(p.A, p.Q, p.Pi, T, rng)
    size = int(N * (1 + overlap) / 2)
    blocks = [np.arange(0, size), np.arange(N - size, N)]
    if reuse and (path / "zarr.json").exists():
        old = zarr.open_group(str(path), mode="r")
        if old["recordings/s1/activity"].shape == (T // 2, size):
            return p, C
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_strings(root, "neuron_ids", np.array([f"n{i}" for i in range(N)]))
    recs = root.create_group("recordings")
    names = []
    Tr = T // 2
    for r, idx in enumerate(blocks):
        name = f"s{r + 1}"
        names.append(name)
        g = recs.create_group(name)
        rows = activity_chunks((Tr, len(idx)), 8.0)[0]
        Cr, sd = C[idx].astype(np.float32), np.sqrt(signal[idx]).astype(np.float32)

        def block(t0: int, t1: int, r=r, Cr=Cr, sd=sd) -> np.ndarray:
            xs = x[r * Tr + t0 : r * Tr + t1].astype(np.float32)
            return xs @ Cr.T + rng.standard_normal((t1 - t0, len(Cr)), dtype=np.float32) * sd

        first = block(0, min(Tr, rows))
        chosen = choose_codec(codec, "traces", lambda first=first: first)
        arr = create_activity(g, (Tr, len(idx)), 8.0, chosen)
        arr[: len(first)] = first
        for t0 in range(rows, Tr, rows):
            arr[t0 : min(Tr, t0 + rows)] = block(t0, min(Tr, t0 + rows))
        write_array(g, "neurons", idx)
        g.attrs.update({"rate_hz": 10.0, "kind": "traces", "source": "simulated", "codec": chosen})
    root.attrs.update(
        {
            "format": FORMAT,
            "dataset": "scale",
            "recordings": names,
            "rate_hz": 10.0,
            "kind": "traces",
            "trials": False,
        }
    )
    return p, C


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    x = torch.empty(int(5e8 // 4), dtype=torch.float32, device=device)
    x.fill_(1.0)
    y = x.clone()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * x.numel() * 4 / (time.perf_counter() - t)


def decode_throughput(
    store: Path, fraction: float, at_least: float = 512e6, into: bool = False
) -> float:
    """Bytes per second of reading (decoding) the store's activity through zarr alone, in
    whole chunks, over the first ``fraction`` of each recording's rows (at least
    ``at_least`` bytes in all, or the whole store), after one untimed read that starts
    zarr's thread pool. ``into``: decoded into one reused buffer (as a pass decodes),
    which spares the page faults of fresh arrays; else into a fresh array per read (a
    plain ``array[t0:t1]``)."""
    import zarr

    from poplds.stitched._data import _decode_into

    root = zarr.open_group(str(store), mode="r")
    arrays = [root[f"recordings/{name}/activity"] for name in root["recordings"]]
    total = sum(4 * a.shape[0] * a.shape[1] for a in arrays)
    fraction = max(fraction, min(1.0, at_least / total))
    arrays[0][: arrays[0].chunks[0]]  # warm-up
    nbytes, t = 0, time.perf_counter()
    for arr in arrays:
        rows = arr.chunks[0] * max(1, int(64e6 // (arr.chunks[0] * arr.shape[1] * 4)))
        stop = max(rows, int(arr.shape[0] * fraction))
        buffer = np.empty((rows, arr.shape[1]), dtype=arr.dtype) if into else None
        for t0 in range(0, min(stop, arr.shape[0]), rows):
            if buffer is None:
                nbytes += arr[t0 : t0 + rows].nbytes
            else:
                nbytes += _decode_into(arr, t0, t0 + rows, buffer).numel() * arr.dtype.itemsize
    return nbytes / (time.perf_counter() - t)


class ReadCounter:
    """Counts the bytes read from the activity arrays of a store through zarr (every read
    of the fit job: statistics, warm start, passes, latents, evaluation), while active."""

    def __init__(self) -> None:
        self.nbytes = 0

    def __enter__(self) -> ReadCounter:
        import zarr

        self._orig = zarr.Array.get_basic_selection
        self._orig_getitem = zarr.Array.__getitem__
        counter = self

        def counted(arr, selection=Ellipsis, *args, **kwargs):
            out = counter._orig(arr, selection, *args, **kwargs)
            if arr.ndim == 2 and str(arr.path).endswith("activity"):
                rows = selection[0] if isinstance(selection, tuple) else selection
                n = len(range(*rows.indices(arr.shape[0]))) if isinstance(rows, slice) else 0
                counter.nbytes += n * arr.shape[1] * arr.dtype.itemsize
            return out

        def getitem(arr, selection):
            if isinstance(selection, (slice, tuple)):
                return counted(arr, selection)
            return counter._orig_getitem(arr, selection)

        zarr.Array.get_basic_selection = counted
        zarr.Array.__getitem__ = getitem
        return self

    def __exit__(self, *exc) -> None:
        import zarr

        zarr.Array.get_basic_selection = self._orig
        zarr.Array.__getitem__ = self._orig_getitem


def store_raw_bytes(store: Path) -> int:
    """Bytes of the store's activity arrays, decoded."""
    import zarr

    root = zarr.open_group(str(store), mode="r")
    arrays = [root[f"recordings/{name}/activity"] for name in root["recordings"]]
    return sum(a.dtype.itemsize * a.shape[0] * a.shape[1] for a in arrays)


def decode_floors(store: Path, fraction: float) -> dict[str, float]:
    """Both decode throughputs (bytes/s): into fresh arrays and into a reused buffer."""
    return {
        "fresh": decode_throughput(store, fraction),
        "reused": decode_throughput(store, fraction, into=True),
    }


def scale(args) -> dict:
    import resource
    import shutil
    import tempfile

    from poplds.stitched import StitchedOutputs, fit_store

    N, T, n = args.neurons[0], args.time, args.latents
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="poplds-scale-"))
    store = work / "data.zarr"
    t = time.perf_counter()
    p, C_true = write_large_store(
        store, N, T, n, overlap=0.1, seed=0, reuse=args.reuse, codec=args.codec
    )
    t_write = time.perf_counter() - t
    rss_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    nbytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    bw = copy_bandwidth(dev)
    floors = decode_floors(store, args.floor_fraction)
    decode = max(floors.values())
    print(
        f"# scale: N={N}, T={T} (two recordings of {T // 2}, 10% overlap), n={n}; store "
        f"{nbytes / 1e9:.2f} GB written in {t_write:.0f} s (peak RSS {rss_write:.2f} GB); "
        f"device {dev}; {machine()}; copy bandwidth {bw / 1e9:.0f} GB/s; zarr decode "
        f"{floors['fresh'] / 1e9:.2f} GB/s into fresh arrays, {floors['reused'] / 1e9:.2f} GB/s "
        "into a reused buffer",
        flush=True,
    )
    t = time.perf_counter()
    settings = StitchedSettings(
        lags=10,
        device=str(dev),
        max_passes=args.max_passes,
        heldout_fraction=0.1,
        max_device_bytes=0 if args.stream else None,
        optimizer=args.optimizer,
        minibatch_rows=args.minibatch_rows,
    )
    shutil.rmtree(work / "fit", ignore_errors=True)  # a checkpoint there would be resumed
    with ReadCounter() as reads:
        result = fit_store(store, n, settings, outputs=StitchedOutputs.under(work / "fit", n))
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    fit = result.fits["stitched_lds"]
    info = fit.info.as_dict()
    passes = info["free"]["passes"] + info["linked"]["passes"]
    fit_s = info["free"]["seconds"] + info["linked"]["seconds"]
    in_memory = all(r.data is not None for r in fit.data.recordings)
    data_bytes = sum(4 * r.n_time * len(r.neurons) for r in fit.data.recordings)
    per_pass = fit_s / passes
    if info["optimizer"] == "subspace":  # its passes alone; the inner solves read nothing
        pass_s = sum(info[k]["pass_seconds"] for k in ("free", "linked"))
        per_pass = pass_s / passes
        inner = sum(info[k]["inner"] for k in ("free", "linked"))
        print(
            f"subspace: {pass_s:.0f} s in passes over the data, {fit_s - pass_s:.0f} s in "
            f"{inner} inner evaluations (no data read)",
            flush=True,
        )
    after = decode_floors(store, args.floor_fraction)  # the machine's speed drifts
    print(
        f"zarr decode after the fit: {after['fresh'] / 1e9:.2f} GB/s into fresh arrays, "
        f"{after['reused'] / 1e9:.2f} GB/s into a reused buffer",
        flush=True,
    )
    floors = {k: max(v, after[k]) for k, v in floors.items()}
    decode = max(floors.values())
    floor = data_bytes / (bw / 2) if in_memory else data_bytes / decode
    store_reads = reads.nbytes / store_raw_bytes(store)
    print(
        f"fit job: {store_reads:.1f} whole-store reads; end to end {total:.1f} s = "
        f"{total / (store_raw_bytes(store) / floors['reused']):.0f} reads at the reused-buffer "
        f"decode floor, {total / (store_raw_bytes(store) / floors['fresh']):.0f} at the "
        "fresh-array one",
        flush=True,
    )
    # never co-observed pairs, on a sample of a few thousand neurons of each side
    size = int(N * 1.1 / 2)
    rng = np.random.default_rng(1)
    a_only = np.sort(rng.choice(N - size, min(2000, N - size), replace=False))
    b_only = np.sort(size + rng.choice(N - size, min(2000, N - size), replace=False))
    truth = p._replace(C=C_true)
    corr = never_scores(truth, fit, a_only, b_only, 5)
    epochs = [info[k].get("epochs") for k in ("free", "linked")]
    print(
        f"optimizer {info['optimizer']}; stop {info['stop']}; passes {passes} "
        f"(free {info['free']['passes']}, linked {info['linked']['passes']}; epochs {epochs}); "
        f"data {'in device memory' if in_memory else 'streamed from the store'}; "
        f"end to end {total:.0f} s (fit {fit_s:.0f} s); {per_pass:.2f} s per pass; floor "
        f"{floor:.2f} s ({data_bytes / 1e9:.1f} GB / "
        f"{'copy bandwidth / 2' if in_memory else 'the fastest zarr decode'}); "
        f"{per_pass / floor:.2f}x the floor ("
        f"{per_pass * floors['fresh'] / data_bytes:.2f}x a decode into fresh arrays); "
        f"peak RSS {rss:.2f} GB; never co-observed r lags 0-4 vs truth "
        + " ".join(f"{c:.4f}" for c in corr),
        flush=True,
    )
    return {
        "N": N,
        "T": T,
        "n": n,
        "store_gb": nbytes / 1e9,
        "seconds": total,
        "fit_seconds": fit_s,
        "passes": passes,
        "per_pass_s": per_pass,
        "floor_s": floor,
        "decode_gb_s": decode / 1e9,
        "decode_fresh_gb_s": floors["fresh"] / 1e9,
        "decode_reused_gb_s": floors["reused"] / 1e9,
        "in_memory": in_memory,
        "device": str(dev),
        "optimizer": info["optimizer"],
        "peak_rss_gb": rss,
        "store_reads": store_reads,
        "never_corr": corr,
    }


def _chain(R: int, size: int, n_circuit: int, n: int, T: int, seed: int):
    p = simulate.random_stitched_lds(n_circuit, n, seed=seed)
    overlap = (R * size - n_circuit) // (R - 1)
    layout = simulate.overlapping_layout(n_circuit, R, overlap, T)
    ys, _ = simulate.simulate_stitched(p, layout, seed=seed)
    recs = [
        RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
        for r, y in zip(layout, ys, strict=True)
    ]
    truth = stitched.StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, 10)
    return recs, truth, overlap


def _never_r(fit, truth) -> float:
    from poplds.stitched.evaluate import covariance_scores

    rows = covariance_scores(fit.params, fit.data, truth=truth)["never_vs_truth"]
    return float(np.nanmean([r["corr"] for r in rows[:5]]))


def dense_fit(recs, n_total: int, n: int, seed: int = 0):
    """The reference: every pooled lagged covariance (K, N, N) formed once, the loss over the
    co-observed, not held-out pairs by autograd on dense matrices; poplds' warm start, L-BFGS
    and stopping rule, free then linked stage. Returns (seconds, passes, params C, X)."""
    from poplds.stitched._optimizers import registry
    from poplds.stitched._prepare import prepare_data
    from poplds.stitched._stage import StageProblem, run_stage
    from poplds.stitched._warm import warm_start
    from poplds.stitched.models import FREE_STAGE_TOL, dynamics_from_lagged, linked_lagged

    lbfgs = registry()["lbfgs"]
    options = lbfgs.options(max_passes=2000)

    def stage(name, params, objective, tol, trace):
        problem = StageProblem(name, params, None, None, None, tol, scale, objective=objective)
        return run_stage(lbfgs, options, problem, trace, {})

    t = time.perf_counter()
    K, cpu = 10, torch.device("cpu")
    data = prepare_data(recs, n_total, lags=K, device=cpu, heldout_fraction=0.1, seed=seed)
    S = torch.zeros((K, n_total, n_total), dtype=torch.float64)
    cnt = torch.zeros_like(S)
    for rec in data.recordings:
        y = rec.data.to(torch.float64)
        idx = torch.as_tensor(rec.neurons)
        for s in range(K):
            S[s][idx[:, None], idx[None, :]] += y[s:].T @ y[: rec.n_time - s]
            cnt[s][idx[:, None], idx[None, :]] += rec.n_time - s
    g = torch.as_tensor(data.group_of)
    mask = (cnt > 0) & ~torch.as_tensor(data.heldout)[g[:, None], g[None, :]][None]
    emp = torch.where(mask, S / cnt.clamp(min=1), 0.0)
    off = mask.clone()
    off[0].fill_diagonal_(False)
    var = torch.as_tensor(data.variance)
    P = float(off.sum())
    scale = data.noise_floor()
    unit = float(np.mean(data.variance))

    def loss(C, X):
        M = torch.einsum("ia,sab,jb->sij", C, X, C)
        hinge = torch.clamp(torch.diagonal(M[0]) - var, min=0) ** 2
        return (torch.sum(torch.where(off, M - emp, 0.0) ** 2) + hinge.sum()) / P

    C0, X0, _ = warm_start(data, n, seed)
    trace: list = []
    C = C0.clone().requires_grad_(True)
    Xt = (X0 / unit).clone().requires_grad_(True)

    def free():
        C.grad = Xt.grad = None
        val = loss(C, unit * torch.cat([0.5 * (Xt[:1] + Xt[:1].transpose(1, 2)), Xt[1:]]))
        val.backward()
        return val.detach()

    i1 = stage("free", [C, Xt], free, FREE_STAGE_TOL * 1e-3, trace)
    X1 = unit * Xt.detach()
    A = torch.as_tensor(dynamics_from_lagged(X1.numpy())).clone().requires_grad_(True)
    Pi1 = 0.5 * (X1[0] + X1[0].T)
    ev, V = torch.linalg.eigh(Pi1)
    L = torch.linalg.cholesky((V * ev.clamp(min=1e-6 * ev.max())) @ V.T / unit)
    L.requires_grad_(True)
    C2 = C.detach().clone().requires_grad_(True)

    def linked():
        C2.grad = A.grad = L.grad = None
        Lt = torch.tril(L)
        val = loss(C2, linked_lagged(A, unit * Lt @ Lt.T, K))
        val.backward()
        return val.detach()

    i2 = stage("linked", [C2, A, L], linked, 1e-3, trace)
    Lt = torch.tril(L.detach())
    X = linked_lagged(A.detach(), unit * Lt @ Lt.T, K)
    return time.perf_counter() - t, i1.passes + i2.passes, C2.detach().numpy(), X.numpy()


def sessions(args) -> dict:
    T, n, size = 10_000, 8, 200
    print(f"# many sessions: recordings of {size} neurons, T={T} each, n={n}; {machine()}")
    print(
        f"{'R':>3} {'N':>5} {'overlap':>7} {'values':>9} {'fit s':>6} {'passes':>6} "
        f"{'s/pass':>7} {'routes':>16} {'never r':>7}"
    )
    rows = []
    for R in args.recordings:
        N = int(round(2000 * R / 30))
        recs, truth, overlap = _chain(R, size, N, n, T, seed=0)
        t = time.perf_counter()
        fit = stitched.fit(recs, N, n, StitchedSettings(device=args.device))
        dt = time.perf_counter() - t
        passes = fit.info.free.passes + fit.info.linked.passes
        per_pass = (fit.info.free.seconds + fit.info.linked.seconds) / passes
        routes = list(fit.info.routes.values())
        route_txt = f"{routes.count('moments')} mom. {routes.count('data')} data"
        r = _never_r(fit, truth)
        rows.append(
            {
                "R": R,
                "N": N,
                "seconds": dt,
                "passes": passes,
                "per_pass_s": per_pass,
                "never_corr": r,
                "routes": fit.info.routes,
            }
        )
        print(
            f"{R:3d} {N:5d} {overlap:7d} {R * size * T:9.2g} {dt:6.1f} {passes:6d} "
            f"{per_pass:7.4f} {route_txt:>16} {r:7.4f}",
            flush=True,
        )
    print("# three recordings, 300 neurons (overlap 30), T=10000 each, n=8: poplds vs dense")
    p = simulate.random_stitched_lds(300, n, seed=1)
    layout = simulate.overlapping_layout(300, 3, 30, T)
    ys, _ = simulate.simulate_stitched(p, layout, seed=1)
    recs = [
        RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
        for r, y in zip(layout, ys, strict=True)
    ]
    truth = stitched.StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, 10)
    t = time.perf_counter()
    fit = stitched.fit(recs, 300, n, StitchedSettings(device="cpu"))
    ours = time.perf_counter() - t
    ours_passes = fit.info.free.passes + fit.info.linked.passes
    dense_s, dense_passes, Cd, Xd = dense_fit(recs, 300, n)
    dense_params = fit.params._replace(C=Cd, X=Xd)
    from poplds.stitched.evaluate import covariance_scores

    def never(params):
        rows_ = covariance_scores(params, fit.data, truth=truth)["never_vs_truth"]
        return float(np.nanmean([r_["corr"] for r_ in rows_[:5]]))

    print(
        f"poplds {ours:.1f} s ({ours_passes} passes, never r {never(fit.params):.4f}); dense "
        f"{dense_s:.1f} s ({dense_passes} passes, never r {never(dense_params):.4f}); "
        f"dense / poplds time {dense_s / ours:.2f}"
    )
    return {"rows": rows, "three": {"poplds_s": ours, "dense_s": dense_s}}


def parallel(args) -> dict:
    import tempfile

    from poplds.stitched import StitchedOutputs, fit_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="poplds-parallel-"))
    store = work / "data.zarr"
    N, T = args.neurons[0], args.time
    write_large_store(store, N, T, args.latents, overlap=0.1, seed=0, codec=args.codec)
    print(f"# parallel: N={N}, T={T} in two recordings, n={args.latents}; {machine()}")
    out = {}
    for procs in (1, args.processes):
        s = StitchedSettings(
            device="cpu",
            optimizer="lbfgs",
            route="data",
            processes=procs,
            max_passes=args.max_passes,
        )
        t = time.perf_counter()
        res = fit_store(
            store, args.latents, s, outputs=StitchedOutputs.under(work / f"p{procs}", args.latents)
        )
        total = time.perf_counter() - t
        f = res.metrics["fit"]
        passes = f["free"]["passes"] + f["linked"]["passes"]
        per_pass = (f["free"]["seconds"] + f["linked"]["seconds"]) / passes
        out[procs] = per_pass
        print(
            f"{procs} process(es): end to end {total:.1f} s, {passes} passes, "
            f"{per_pass:.3f} s per pass",
            flush=True,
        )
    print(f"speed-up per pass: {out[1] / out[args.processes]:.2f}x with {args.processes}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["paper", "peer", "scale", "sessions", "parallel"])
    ap.add_argument("--recordings", type=int, nargs="+", default=[5, 10, 30])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["lbfgs:auto"],
        help="paper: optimizer:route pairs, e.g. lbfgs:auto lbfgs:data sgd:data",
    )
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 10, 50, 300, 1000])
    ap.add_argument("--neurons", type=int, nargs="+", default=None)
    ap.add_argument("--latents", type=int, default=10)
    ap.add_argument("--time", type=int, default=100_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget", type=float, default=300.0, help="peer: EM seconds at most")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--max-passes", type=int, default=100, help="scale: passes per stage")
    ap.add_argument("--stream", action="store_true", help="scale: stream even if it fits")
    ap.add_argument("--optimizer", default="auto", help="scale: stitched_lds.optimizer")
    ap.add_argument("--reuse", action="store_true", help="scale: keep a store already written")
    ap.add_argument(
        "--codec", default="auto", help="scale, parallel: the store's codec (as in the config)"
    )
    ap.add_argument("--minibatch-rows", type=int, default=256, help="scale: SGD minibatch")
    ap.add_argument(
        "--floor-fraction", type=float, default=0.2, help="scale: share of rows read for the floor"
    )
    ap.add_argument("--workdir", type=Path, help="scale: where the store is written")
    args = ap.parse_args()
    if args.neurons is None:
        args.neurons = {"paper": [1000], "scale": [1_000_000], "parallel": [4000]}.get(
            args.what, [50, 100, 200]
        )
    if args.what == "paper":
        args.neurons = args.neurons[0]
    if args.what in ("scale", "parallel") and args.time == 100_000:
        args.time = 10_000 if args.what == "scale" else 40_000
    modes = {"paper": paper, "peer": peer, "scale": scale, "sessions": sessions}
    result = {**modes, "parallel": parallel}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
