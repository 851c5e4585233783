"""Ingest throughput, store size and peak memory, against the naive in-memory route.

Writes one suite2p plane folder and one NWB ophys file of the same simulated calcium-like
traces (AR(1) signal plus noise, float32), then ingests each with :func:`poplds.ingest_dataset`
(dask streaming, Blosc zstd) and, as the peer, the route a user would write by hand: load the
whole recording with numpy/h5py, then write it with ``zarr.create_array`` using the same chunks
and codec. Every measurement runs in a fresh process, so the peak anonymous memory
(sampled ``RssAnon``) of each route is its own; the baseline (Python with the imports) is
printed too.

    python benchmarks/bench_ingest.py                      # 1000 cells x 100k frames (400 MB)
    python benchmarks/bench_ingest.py --cells 4000 --frames 200000 --workdir /scratch/bench

Prints one table: route, activity MB, seconds, MB/s, peak anonymous memory MB, store MB,
compression ratio, and the time and memory ratios peer / poplds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def anon_rss_mb() -> float:
    """Anonymous resident memory of this process in MB (``RssAnon``: heap and arrays, not the
    page cache of memory-mapped input files, which the kernel can drop at any time)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory(threading.Thread):
    """Samples :func:`anon_rss_mb` every ``interval`` seconds until stopped; ``peak`` is the
    largest value seen. (``ru_maxrss`` would also count the parent's peak, which survives
    ``exec`` on Linux, and mapped file pages.)"""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = anon_rss_mb()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, anon_rss_mb())
            time.sleep(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        self.peak = max(self.peak, anon_rss_mb())
        return self.peak


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def make_inputs(workdir: Path, cells: int, frames: int, seed: int) -> dict[str, Path]:
    """Write suite2p F/Fneu (cells, frames) and an NWB RoiResponseSeries (frames, cells),
    block by block so that the generator itself never holds the whole recording."""
    import h5py

    rng = np.random.default_rng(seed)
    plane = workdir / "suite2p" / "plane0"
    plane.mkdir(parents=True, exist_ok=True)
    F = np.lib.format.open_memmap(plane / "F.npy", "w+", np.float32, (cells, frames))
    Fneu = np.lib.format.open_memmap(plane / "Fneu.npy", "w+", np.float32, (cells, frames))
    np.save(plane / "iscell.npy", np.ones((cells, 2)))
    np.save(plane / "ops.npy", np.array({"fs": 30.0, "neucoeff": 0.7}, dtype=object))
    block = max(1, int(50e6 // (4 * cells)))
    state = np.zeros(cells)
    for t0 in range(0, frames, block):
        t1 = min(frames, t0 + block)
        noise = rng.standard_normal((t1 - t0, cells))
        sig = np.empty((t1 - t0, cells))
        for k in range(t1 - t0):  # AR(1) calcium-like signal
            state = 0.95 * state + noise[k]
            sig[k] = state
        F[:, t0:t1] = (200 + 10 * sig + rng.standard_normal(sig.shape)).T.astype(np.float32)
        Fneu[:, t0:t1] = (50 + rng.standard_normal(sig.shape)).T.astype(np.float32)
    F.flush()
    Fneu.flush()
    del F, Fneu
    nwb = workdir / "ophys.nwb"
    _write_nwb(nwb, plane, frames, cells)
    with h5py.File(nwb, "r") as f:
        assert f["processing/ophys/Fluorescence/dff/data"].shape == (frames, cells)
    return {"suite2p": plane, "nwb": nwb}


def _write_nwb(path: Path, plane: Path, frames: int, cells: int) -> None:
    """An NWB file whose RoiResponseSeries is the suite2p plane's corrected traces, written
    through an iterator so that it too is never whole in memory."""
    import warnings
    from datetime import UTC, datetime

    from hdmf.data_utils import GenericDataChunkIterator
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel, RoiResponseSeries

    F = np.load(plane / "F.npy", mmap_mode="r")
    Fneu = np.load(plane / "Fneu.npy", mmap_mode="r")

    class Traces(GenericDataChunkIterator):
        def _get_data(self, selection):
            t, c = selection
            return (F[c, t] - 0.7 * Fneu[c, t]).T.astype(np.float32)

        def _get_maxshape(self):
            return (frames, cells)

        def _get_dtype(self):
            return np.dtype("float32")

    nwb = NWBFile(
        session_description="bench",
        identifier="bench",
        session_start_time=datetime(2024, 1, 1, tzinfo=UTC),
    )
    dev = nwb.create_device(name="scope")
    chan = OpticalChannel(name="ch", description="green", emission_lambda=520.0)
    ip = nwb.create_imaging_plane(
        name="p",
        optical_channel=chan,
        description="plane",
        device=dev,
        excitation_lambda=920.0,
        imaging_rate=30.0,
        indicator="GCaMP",
        location="V1",
    )
    seg = ImageSegmentation()
    ps = seg.create_plane_segmentation(name="rois", description="cells", imaging_plane=ip)
    for _ in range(cells):
        ps.add_roi(image_mask=np.ones((2, 2)))
    mod = nwb.create_processing_module(name="ophys", description="ophys")
    mod.add(seg)
    fl = Fluorescence()
    region = ps.create_roi_table_region(description="all", region=list(range(cells)))
    data = Traces(buffer_gb=0.05, chunk_shape=(max(1, int(1e6 // cells)), cells))
    fl.add_roi_response_series(
        RoiResponseSeries(name="dff", data=data, rois=region, unit="a.u.", rate=30.0)
    )
    mod.add(fl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)


def worker(route: str, source: str, out: str) -> dict[str, float]:
    """One measured ingest in this (fresh) process."""
    import zarr

    from poplds import ingest_dataset
    from poplds.store import activity_chunks, compressor

    base = anon_rss_mb()
    sampler = PeakMemory()
    sampler.start()
    t = time.perf_counter()
    if route == "poplds":
        ingest_dataset([{"path": source, "name": "r"}], out, chunk_mb=4.0)
        arr = zarr.open_array(f"{out}/recordings/r/activity", mode="r")
        shape = arr.shape
    else:  # peer: load whole, then zarr.create_array with the same chunks and codec
        src = Path(source)
        if src.is_dir():
            F = np.load(src / "F.npy").astype(np.float64)
            Fneu = np.load(src / "Fneu.npy").astype(np.float64)
            x = np.ascontiguousarray((F - 0.7 * Fneu).T.astype(np.float32))
            del F, Fneu
        else:
            import h5py

            with h5py.File(src, "r") as f:
                x = f["processing/ophys/Fluorescence/dff/data"][:]
        root = zarr.open_group(out, mode="w", zarr_format=3)
        root.create_array(
            "activity",
            data=x,
            chunks=activity_chunks(x.shape, 4.0),
            compressors=compressor(),
        )
        shape = x.shape
    dt = time.perf_counter() - t
    return {
        "seconds": dt,
        "peak_rss_mb": sampler.stop(),
        "baseline_rss_mb": base,
        "activity_mb": float(np.prod(shape)) * 4 / 1e6,
        "store_mb": dir_mb(Path(out)),
    }


def measure(route: str, source: Path, out: Path) -> dict[str, float]:
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", route, str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{route} on {source} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    import os
    import platform

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="poplds-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        inputs = make_inputs(tmp, args.cells, args.frames, args.seed)
        print(
            f"# {args.cells} cells x {args.frames} frames; inputs written in "
            f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, {platform.processor()}"
        )
        header = (
            f"{'source':8} {'route':7} {'act MB':>8} {'s':>7} {'MB/s':>7} "
            f"{'peak anon MB':>12} {'base MB':>8} {'store MB':>8} {'ratio':>6}"
        )
        print(header)
        for kind, src in inputs.items():
            res = {}
            for route in ("poplds", "peer"):
                r = measure(route, src, tmp / f"{kind}-{route}.zarr")
                res[route] = r
                print(
                    f"{kind:8} {route:7} {r['activity_mb']:8.0f} {r['seconds']:7.2f} "
                    f"{r['activity_mb'] / r['seconds']:7.1f} {r['peak_rss_mb']:12.0f} "
                    f"{r['baseline_rss_mb']:8.0f} {r['store_mb']:8.1f} "
                    f"{r['activity_mb'] / r['store_mb']:6.2f}"
                )
            p, q = res["poplds"], res["peer"]
            mem_p = max(1.0, p["peak_rss_mb"] - p["baseline_rss_mb"])
            mem_q = q["peak_rss_mb"] - q["baseline_rss_mb"]
            print(
                f"{kind:8} peer/poplds: time {q['seconds'] / p['seconds']:.2f}x, "
                f"peak memory above baseline {mem_q / mem_p:.1f}x"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
