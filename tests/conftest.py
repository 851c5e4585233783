"""Shared fixtures: writers for every source format, and the path of the real data."""

from __future__ import annotations

import os
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import zarr

# OpenMP threads that sleep while they wait: two test processes share the 2 cores (pytest-xdist),
# and spinning threads of one slow the other several-fold (results are the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def simulated(N=60, n=3, overlap=10, T=4000, seed=0, n_rec=2, moduli=(0.85, 0.95), noise=1.0):
    """A stitched LDS (``poplds.simulate``) and its partial recordings as fit inputs: n_rec
    recordings of T steps, neighbours sharing ``overlap`` of the N neurons."""
    from poplds import simulate
    from poplds.stitched import RecordingInput

    p = simulate.random_stitched_lds(N, n, eig_moduli=moduli, noise_to_signal=noise, seed=seed)
    layout = simulate.overlapping_layout(N, n_rec, overlap, T)
    ys, _ = simulate.simulate_stitched(p, layout, seed=seed)
    recs = [
        RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
        for r, y in zip(layout, ys, strict=True)
    ]
    return p, recs


def write_npz(path: Path, activity, ids=None, rate: float = 10.0, **extra) -> Path:
    """An npz recording: ``activity`` (time, neurons) or (trials, time, neurons), its neuron
    ids (default 0..N-1) and ``rate_hz``, plus any ``extra`` arrays."""
    activity = np.asarray(activity)
    if ids is None:
        ids = np.arange(activity.shape[-1]) if activity.ndim else np.arange(1)
    np.savez(path, activity=activity, neuron_ids=np.asarray(ids), rate_hz=rate, **extra)
    return path


def assert_same_store(a: Path, b: Path, ignore_attrs: tuple[str, ...] = ()) -> None:
    """Two Zarr stores hold the same attributes (less ``ignore_attrs``) and the same arrays
    (values, dtypes, shapes, chunks), group by group."""

    def walk(x: zarr.Group, y: zarr.Group, where: str) -> None:
        ax = {k: v for k, v in x.attrs.items() if k not in ignore_attrs}
        ay = {k: v for k, v in y.attrs.items() if k not in ignore_attrs}
        assert ax == ay, f"{where}: attributes differ"
        assert sorted(x.array_keys()) == sorted(y.array_keys()), where
        for name in x.array_keys():
            u, v = x[name], y[name]
            assert (u.dtype, u.shape, u.chunks) == (v.dtype, v.shape, v.chunks), f"{where}/{name}"
            np.testing.assert_array_equal(u[...], v[...], err_msg=f"{where}/{name}")
        assert sorted(x.group_keys()) == sorted(y.group_keys()), where
        for name in x.group_keys():
            walk(x[name], y[name], f"{where}/{name}")

    walk(zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r"), str(a))


def pytest_collection_modifyitems(config, items):
    # the slow end-to-end runs first: with pytest-xdist (make test: -n 2) the others fill the
    # second core while they run
    items.sort(key=lambda item: "slow" not in item.keywords)
    skip_shared = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_shared)
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


def _nwbfile(identifier: str = "poplds-test"):
    from pynwb import NWBFile

    return NWBFile(
        session_description="poplds test",
        identifier=identifier,
        session_start_time=datetime(2024, 1, 1, tzinfo=UTC),
    )


def _write(nwb, path: Path) -> Path:
    from pynwb import NWBHDF5IO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    return path


def write_ophys_nwb(
    path: Path,
    data: np.ndarray,
    *,
    rate: float = 30.0,
    neuron_ids: list[str] | None = None,
    series_names: tuple[str, ...] = ("dff",),
    rois: np.ndarray | None = None,
    trials: list[tuple[float, float]] | None = None,
    timestamps: np.ndarray | None = None,
    starting_time: float = 0.0,
    identifier: str = "poplds-test",
) -> Path:
    """An NWB file with a PlaneSegmentation of ``data.shape[1]`` (or more) ROIs and one
    RoiResponseSeries per name in ``series_names`` (all holding ``data``, (time, rois))."""
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel, RoiResponseSeries

    nwb = _nwbfile(identifier)
    device = nwb.create_device(name="scope")
    plane = nwb.create_imaging_plane(
        name="plane0",
        optical_channel=OpticalChannel(name="ch", description="green", emission_lambda=520.0),
        description="plane",
        device=device,
        excitation_lambda=920.0,
        imaging_rate=rate,
        indicator="GCaMP",
        location="V1",
    )
    seg = ImageSegmentation()
    ps = seg.create_plane_segmentation(name="cells", description="rois", imaging_plane=plane)
    n_rois = data.shape[1] if rois is None else int(np.max(rois)) + 1
    if neuron_ids is not None:
        ps.add_column("neuron_id", "global neuron id")
    for k in range(n_rois):
        mask = np.zeros((4, 4))
        mask[k % 4, (k // 4) % 4] = 1.0
        kw = {"neuron_id": neuron_ids[k]} if neuron_ids is not None else {}
        ps.add_roi(image_mask=mask, id=100 + k, **kw)
    mod = nwb.create_processing_module("ophys", "optical physiology")
    mod.add(seg)
    fl = Fluorescence()
    region_idx = list(range(data.shape[1])) if rois is None else [int(r) for r in rois]
    for name in series_names:
        region = ps.create_roi_table_region(region=region_idx, description="cells")
        kw = (
            {"rate": rate, "starting_time": starting_time}
            if timestamps is None
            else {"timestamps": timestamps}
        )
        fl.add_roi_response_series(
            RoiResponseSeries(name=name, data=data, rois=region, unit="a.u.", **kw)
        )
    mod.add(fl)
    if trials:
        for start, stop in trials:
            nwb.add_trial(start_time=start, stop_time=stop)
    return _write(nwb, path)


def write_units_nwb(
    path: Path,
    spike_times: list[np.ndarray],
    *,
    neuron_ids: list[str] | None = None,
    obs_intervals: list[np.ndarray] | None = None,
    trials: list[tuple[float, float]] | None = None,
    trial_numbers: list[int] | None = None,
    trial_columns: dict[str, list[float]] | None = None,
) -> Path:
    """An NWB file with a units table (and optionally trials, with extra columns)."""
    nwb = _nwbfile()
    if neuron_ids is not None:
        nwb.add_unit_column("neuron_id", "global neuron id")
    for u, st in enumerate(spike_times):
        kw = {}
        if neuron_ids is not None:
            kw["neuron_id"] = neuron_ids[u]
        if obs_intervals is not None:
            kw["obs_intervals"] = obs_intervals[u]
        nwb.add_unit(spike_times=st, id=10 + u, **kw)
    if trials:
        if trial_numbers is not None:
            nwb.add_trial_column("trial_number", "trial number in the session")
        for column in trial_columns or {}:
            nwb.add_trial_column(column, f"{column} of each trial")
        for r, (start, stop) in enumerate(trials):
            kw = {"trial_number": trial_numbers[r]} if trial_numbers is not None else {}
            kw.update({c: v[r] for c, v in (trial_columns or {}).items()})
            nwb.add_trial(start_time=start, stop_time=stop, **kw)
    return _write(nwb, path)


def write_suite2p(
    folder: Path, F: np.ndarray, Fneu: np.ndarray, iscell: np.ndarray, fs: float = 15.0, **ops
) -> Path:
    """A suite2p plane folder: F, Fneu (rois, time), iscell (rois, 2), ops with fs."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "F.npy", F)
    np.save(folder / "Fneu.npy", Fneu)
    np.save(folder / "iscell.npy", iscell)
    np.save(folder / "ops.npy", np.array({"fs": fs, **ops}, dtype=object), allow_pickle=True)
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
