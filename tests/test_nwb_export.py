"""Latents back into NWB (poplds.nwb): what pynwb and pynapple read from the files equals the
fitted results, on the source's own clock and trial structure, linked to the source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import SHARED_DATA, write_ophys_nwb

from poplds import DatasetStore, InputError, ingest_dataset
from poplds._outputs import read_latents
from poplds.nwb import NO_START_TIME, read_latents_nwb, write_latents_nwb


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read(path: Path, model: str):
    """Everything the tests look at, read with pynwb alone."""
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r") as io:
        f = io.read()
        module = f.processing[f"poplds_{model}"]
        mean, var = module["latent_mean"], module["latent_variance"]
        out = {
            "identifier": f.identifier,
            "session_start_time": f.session_start_time,
            "was_generated_by": [list(x) for x in f.was_generated_by],
            "notes": json.loads(f.notes),
            "module": json.loads(module.description),
            "mean": np.asarray(mean.data[:]),
            "var": np.asarray(var.data[:]),
            "rate": mean.rate,
            "starting_time": mean.starting_time,
            "timestamps": None if mean.timestamps is None else np.asarray(mean.timestamps[:]),
            "loadings": module["loadings"].to_dataframe(),
            "dynamics": module["dynamics"].to_dataframe(),
            "source": module["source"].to_dataframe().iloc[0].to_dict(),
            "scores": module["scores"].to_dataframe()
            if "scores" in module.data_interfaces
            else None,
            "time_constants": (
                module["time_constants"].to_dataframe()
                if "time_constants" in module.data_interfaces
                else None
            ),
            "trials": None if f.trials is None else f.trials.to_dataframe(),
        }
    return out


@pytest.fixture(scope="module")
def stitched_fit(tmp_path_factory):
    """Two partial NWB recordings (one starting at 12.5 s) and a stitched LDS fit, n = 2."""
    from poplds.stitched import StitchedSettings, fit_store

    tmp = tmp_path_factory.mktemp("stitched")
    rng = np.random.default_rng(3)
    C, x = rng.standard_normal((12, 2)), np.zeros((900, 2))
    A = np.array([[0.95, -0.1], [0.1, 0.95]])
    for t in range(1, len(x)):
        x[t] = A @ x[t - 1] + 0.3 * rng.standard_normal(2)
    y = (x @ C.T + 0.5 * rng.standard_normal((900, 12))).astype(np.float32)
    ids = [f"cell{k}" for k in range(12)]
    a = write_ophys_nwb(
        tmp / "a.nwb", y[:500, :8], rate=20.0, neuron_ids=ids[:8], identifier="session-a"
    )
    b = write_ophys_nwb(
        tmp / "b.nwb",
        y[500:, 4:],
        rate=20.0,
        neuron_ids=ids[4:],
        starting_time=12.5,
        identifier="session-b",
    )
    store = ingest_dataset([{"path": a}, {"path": b}], tmp / "ds" / "data.zarr")
    settings = StitchedSettings(lags=4, device="cpu", max_passes=200)
    fit = fit_store(store, 2, settings)
    return tmp, store, fit.outputs


def _described(model_dir, name: str) -> None:
    """The model.zarr holds every array its description (poplds._outputs.MODELS) names."""
    from poplds._outputs import MODELS

    desc = MODELS[name]
    keys = set(zarr.open_group(str(model_dir), mode="r").array_keys())
    wanted = {"C", *desc.dynamics, *(c.array for c in desc.per_neuron + desc.per_trial)}
    assert wanted <= keys, (name, wanted - keys)


def test_stitched_latents_round_trip_with_pynwb(stitched_fit):
    tmp, store_path, outputs = stitched_fit
    _described(outputs.model, "stitched_lds")
    store = DatasetStore(store_path)
    model = zarr.open_group(str(outputs.model), mode="r")
    latents = zarr.open_group(str(outputs.latents), mode="r")
    for name, src, t0 in (("a", tmp / "a.nwb", 0.0), ("b", tmp / "b.nwb", 12.5)):
        out = tmp / "nwb" / f"{name}.nwb"
        write_latents_nwb(store_path, name, "stitched_lds", outputs.model, outputs.latents, out)
        got = _read(out, "stitched_lds")
        np.testing.assert_array_equal(
            got["mean"], np.asarray(latents[f"recordings/{name}/mean"][:], np.float32)
        )
        np.testing.assert_array_equal(
            got["var"], np.asarray(latents[f"recordings/{name}/var"][:], np.float32)
        )
        assert got["mean"].shape == (500 if name == "a" else 400, 2)
        # on the recording's own clock
        assert got["rate"] == pytest.approx(20.0) and got["starting_time"] == pytest.approx(t0)
        neurons = store.neurons(name)
        assert got["loadings"]["neuron_id"].tolist() == store.neuron_ids[neurons].tolist()
        np.testing.assert_allclose(
            np.stack(got["loadings"]["loading"]), np.asarray(model["C"][:])[neurons]
        )
        np.testing.assert_allclose(
            got["loadings"]["noise_variance"], np.asarray(model["R"][:])[neurons]
        )
        np.testing.assert_allclose(got["dynamics"]["A"].iloc[0], np.asarray(model["A"][:]))
        # linked to the source: path relative to the output, its identifier and sha256
        with h5py.File(src, "r") as f:
            identifier = f["identifier"][()].decode()
        assert got["source"]["identifier"] == identifier == got["notes"]["source_identifier"]
        assert got["source"]["sha256"] == _sha256(src) == got["notes"]["source_sha256"]
        assert (out.parent / got["source"]["path"]).resolve() == src.resolve()
        assert got["module"]["latent_dim"] == 2 and got["module"]["settings"]["lags"] == 4
        assert got["was_generated_by"][0][0] == "poplds"
        assert got["trials"] is None
        # the bootstrap's intervals travel with the latents: scores and time constants
        checks = zarr.open_group(str(outputs.model / "checks"), mode="r")
        scores = got["scores"].set_index("score")
        summary = dict(checks.attrs)["summary"]
        assert scores.loc["observed_corr", "value"] == pytest.approx(summary["observed_corr"])
        lo, hi = summary["observed_corr_interval"]
        assert scores.loc["observed_corr", ["lo", "hi"]].tolist() == pytest.approx([lo, hi])
        assert -1 <= lo <= hi <= 1  # a correlation's interval stays within [-1, 1]
        tau = got["time_constants"]
        np.testing.assert_allclose(tau["time_constant_s"], np.asarray(checks["time_constant_s"][0]))
        assert (tau["time_constant_lo_s"] <= tau["time_constant_s"]).all()
    # the same fit gives the same file identity; no temporary file is left
    first = _read(tmp / "nwb" / "a.nwb", "stitched_lds")["identifier"]
    write_latents_nwb(
        store_path, "a", "stitched_lds", outputs.model, outputs.latents, tmp / "again.nwb"
    )
    assert _read(tmp / "again.nwb", "stitched_lds")["identifier"] == first
    assert not list(tmp.rglob("*partial*"))


def test_stitched_latents_load_in_pynapple(stitched_fit):
    nap = pytest.importorskip("pynapple")
    tmp, store_path, outputs = stitched_fit
    out = tmp / "nap" / "b.nwb"
    write_latents_nwb(store_path, "b", "stitched_lds", outputs.model, outputs.latents, out)
    data = nap.load_file(str(out))
    mean = data["latent_mean"]
    assert isinstance(mean, nap.TsdFrame)
    expected = zarr.open_group(str(outputs.latents), mode="r")["recordings/b/mean"][:]
    np.testing.assert_allclose(mean.values, expected, rtol=1e-6)
    np.testing.assert_allclose(mean.times(), 12.5 + np.arange(400) / 20.0)
    assert isinstance(data["latent_variance"], nap.TsdFrame)


def test_bad_requests_name_the_file(stitched_fit):
    tmp, store_path, outputs = stitched_fit
    with pytest.raises(InputError, match=r"data\.zarr.*no recording 'c'"):
        write_latents_nwb(
            store_path, "c", "stitched_lds", outputs.model, outputs.latents, tmp / "c.nwb"
        )
    with pytest.raises(InputError, match=r"model\.zarr.*unknown model 'gpfa'"):
        write_latents_nwb(store_path, "a", "gpfa", outputs.model, outputs.latents, tmp / "d.nwb")
    assert not (tmp / "c.nwb").exists() and not (tmp / "d.nwb").exists()


@pytest.mark.shared_data
def test_nplds_latents_on_the_real_gpe_trials(tmp_path):
    """The real units recording with trials: latents on the source's trial clock, the trials
    table from the source's, identity and start time from the source."""
    from poplds.nplds import NPLDSSettings, fit_store

    src = SHARED_DATA / "gpe_bandit_units.nwb"
    store_path = ingest_dataset(
        [{"path": src, "name": "gpe"}], tmp_path / "gpe" / "data.zarr", bin_size_s=0.05, trials=True
    )
    fit = fit_store(store_path, 2, NPLDSSettings(max_iter=15, device="cpu"))
    with h5py.File(src, "r") as f:
        starts = f["intervals/trials/start_time"][:]
        stops = f["intervals/trials/stop_time"][:]
        numbers = f["intervals/trials/trial_number"][:]
        identifier = f["identifier"][()].decode()
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(src), "r") as io:
        start_time = io.read().session_start_time
    for name in ("nplds", "plds"):
        out = tmp_path / name / "gpe.nwb"
        write_latents_nwb(
            store_path, "gpe", name, fit.outputs.models[name], fit.outputs.latents[name], out
        )
        got = _read(out, name)
        _described(fit.outputs.models[name], name)
        model = zarr.open_group(str(fit.outputs.models[name]), mode="r")
        x_mean, _ = read_latents(fit.outputs.latents[name], "gpe")
        heldout = np.asarray(model["heldout"][:])
        assert got["session_start_time"] == start_time != NO_START_TIME
        assert got["source"]["identifier"] == identifier
        trials = got["trials"]
        np.testing.assert_allclose(trials["start_time"], starts)
        # whole trials: each ends at its last full bin, within one bin of the source's stop
        assert np.all(trials["stop_time"] <= stops + 1e-9)
        assert np.all(trials["stop_time"] > stops - 0.05)
        np.testing.assert_array_equal(trials["source_trial_id"], numbers)
        np.testing.assert_array_equal(trials["heldout"], heldout)
        assert 0 < heldout.sum() < len(heldout)
        # one latent sample per modelled bin of every training trial, each inside its trial
        counts = DatasetStore(store_path).activity("gpe").compute()
        bins = np.isfinite(counts).any(axis=2) & ~heldout[:, None]
        assert got["mean"].shape == (int(bins.sum()), 2)
        np.testing.assert_array_equal(got["mean"], x_mean[bins].astype(np.float32))
        ts = got["timestamps"]
        assert np.all(np.diff(ts) > 0)
        trial = np.searchsorted(starts, ts, side="right") - 1
        assert np.all(ts < stops[trial] + 1e-9) and not np.any(heldout[trial])
        if name == "nplds":  # the slow modulator per trial
            np.testing.assert_allclose(
                np.stack(trials["modulator_mean"]), np.asarray(model["h_mean"][:])
            )
        else:
            assert "modulator_mean" not in trials
        # and read by the package's own reader
        back = read_latents_nwb(out, name)
        np.testing.assert_array_equal(back["timestamps"], ts)


@pytest.mark.shared_data
def test_nplds_trials_load_in_pynapple(tmp_path):
    nap = pytest.importorskip("pynapple")
    from poplds.nplds import NPLDSSettings, fit_store

    src = SHARED_DATA / "gpe_bandit_units.nwb"
    store_path = ingest_dataset(
        [{"path": src, "name": "gpe"}], tmp_path / "gpe" / "data.zarr", bin_size_s=0.1, trials=True
    )
    fit = fit_store(store_path, 1, NPLDSSettings(max_iter=5, device="cpu"))
    out = tmp_path / "gpe.nwb"
    write_latents_nwb(
        store_path, "gpe", "nplds", fit.outputs.models["nplds"], fit.outputs.latents["nplds"], out
    )
    data = nap.load_file(str(out))
    trials = data["trials"]
    assert isinstance(trials, nap.IntervalSet) and len(trials) == 50
    mean = data["latent_mean"]
    assert isinstance(mean, nap.TsdFrame) and mean.shape[1] == 1
    kept = ~trials["heldout"].to_numpy().astype(bool)
    # every latent sample lies in a training trial: restricting to them keeps all
    assert len(mean.restrict(trials[kept])) == len(mean)
