"""Size and decode speed of candidate Zarr codecs for the store's activity arrays.

    python benchmarks/bench_codec.py [--mb 256] [--repeats 3] [--chunk-mb 4]

Four kinds of float32 activity (time, neurons), each about ``--mb`` MB, written with the
store's chunking (``poplds.store.activity_chunks``, all neurons in a chunk) to a folder store
under a temporary directory, once per candidate codec:

- ``dentate events (real)``: ``../shared/data/dentate_gyrus_events.nwb``, 122 cells x 3596
  frames of deconvolved calcium events (sparse), repeated along time to the size;
- ``gpe counts (real)``: ``../shared/data/gpe_bandit_units.nwb``, 18 units binned at 20 ms,
  repeated along time to the size;
- ``simulated traces``: a stitched LDS's noisy traces (2000 neurons, k = 10, noise equal to
  signal: ``poplds.simulate``), the float traces of the stitched benchmarks;
- ``simulated counts``: Poisson counts of 2000 neurons at 10 Hz in 20 ms bins (mean 0.2).

Candidates: no compression (a CRC-32C checksum per chunk, as the store writes it); Blosc zstd
levels 1, 3, 5 and Blosc lz4 levels 1, 5, 9, each with byte and bit shuffle. For each: stored
bytes / raw bytes, write MB/s, and decode GB/s (the whole array decoded through zarr in
windows of about 32 MB of whole chunks into one reused buffer, as a stitched fit's pass
streams it; the median of ``--repeats``; the files are in the page cache, so this is the
decode floor a fit's pass meets, not the disk). Prints one table per kind. The repetition of
the real recordings spans more than a Blosc block, so it does not flatter the ratios.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.buffer.cpu import NDBuffer

from poplds.simulate import SimRecording, random_stitched_lds, simulate_stitched
from poplds.sources import RecordingSpec, open_recording
from poplds.store import activity_chunks, compressor

#: Rows decoded per call: about this many MB, whole chunks (as the stitched fit's windows).
WINDOW_MB = 32.0
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def candidates() -> dict[str, list]:
    """Codec name -> zarr compressors list (empty: stored raw)."""
    out: dict[str, list] = {"none": compressor("none")}  # raw, with the store's checksum
    shuffles = {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}
    for cname, levels in (("zstd", (1, 3, 5)), ("lz4", (1, 5, 9))):
        for level in levels:
            for sname, shuffle in shuffles.items():
                codec = BloscCodec(cname=cname, clevel=level, shuffle=shuffle)
                out[f"{cname} {level} {sname}"] = [codec]
    return out


def _tile(x: np.ndarray, mb: float) -> np.ndarray:
    """x (T, N) repeated along time to about mb MB of float32."""
    reps = max(1, int(np.ceil(mb * 1e6 / (x.size * 4))))
    return np.tile(np.asarray(x, dtype=np.float32), (reps, 1))


def datasets(mb: float) -> dict[str, np.ndarray]:
    """The four (T, N) float32 arrays of the module docstring."""
    out = {}
    dentate = open_recording(RecordingSpec(path=DATA / "dentate_gyrus_events.nwb"))
    out["dentate events (real)"] = _tile(np.asarray(dentate.activity), mb)
    gpe = open_recording(RecordingSpec(path=DATA / "gpe_bandit_units.nwb"), bin_size_s=0.02)
    out["gpe counts (real)"] = _tile(np.nan_to_num(np.asarray(gpe.activity)), mb)
    N = 2000
    T = int(mb * 1e6 / (4 * N))
    p = random_stitched_lds(N, 10, seed=1)
    (y,), _ = simulate_stitched(p, [SimRecording("r", (0, N), T)], seed=1)
    out["simulated traces"] = np.asarray(y, dtype=np.float32)
    rng = np.random.default_rng(2)
    out["simulated counts"] = rng.poisson(0.2, size=(T, N)).astype(np.float32)
    return out


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(x: np.ndarray, compressors: list, root: Path, chunk_mb: float, repeats: int):
    """(ratio, write MB/s, decode GB/s) of one codec on x."""
    path = root / "a.zarr"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    arr = zarr.create_array(
        str(path),
        shape=x.shape,
        dtype="float32",
        chunks=activity_chunks(x.shape, chunk_mb),
        compressors=compressors,
    )
    arr[:] = x
    write = time.perf_counter() - t0
    ratio = _size(path) / x.nbytes
    arr = zarr.open_array(str(path), mode="r")
    chunk = arr.chunks[0]
    rows = max(chunk, (int(WINDOW_MB * 1e6 // (4 * x.shape[1])) // chunk) * chunk)
    buffer = np.empty((rows, x.shape[1]), dtype=np.float32)
    times = []
    for _ in range(repeats):
        arr = zarr.open_array(str(path), mode="r")
        t0 = time.perf_counter()
        for a in range(0, x.shape[0], rows):  # as a fit's pass streams it
            front = buffer[: min(rows, x.shape[0] - a)]
            arr.get_basic_selection(slice(a, a + len(front)), out=NDBuffer.from_numpy_array(front))
        times.append(time.perf_counter() - t0)
    back = arr[:]
    assert np.array_equal(back, x, equal_nan=True)
    return ratio, x.nbytes / 1e6 / write, x.nbytes / 1e9 / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=256.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, x in datasets(args.mb).items():
            print(f"\n{kind}: {x.shape[0]} x {x.shape[1]} float32, {x.nbytes / 1e6:.0f} MB")
            print(f"{'codec':<14} {'ratio':>7} {'write MB/s':>11} {'decode GB/s':>12}")
            for name, comp in candidates().items():
                ratio, w, r = measure(x, comp, Path(tmp), args.chunk_mb, args.repeats)
                print(f"{name:<14} {ratio:7.3f} {w:11.0f} {r:12.2f}", flush=True)


if __name__ == "__main__":
    main()
