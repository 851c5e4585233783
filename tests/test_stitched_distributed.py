"""Data-parallel fits: two gloo processes give the single-process fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from test_stitched_fit import two_recordings

from poplds.ingest import ingest_dataset
from poplds.stitched import StitchedOutputs, StitchedSettings, fit_store

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.mark.parametrize(
    ("route", "optimizer"), [("data", "lbfgs"), ("moments", "lbfgs"), ("data", "subspace")]
)
def test_two_gloo_processes_give_the_single_process_fit(tmp_path, route, optimizer):
    """Each rank reads its own time chunks (data route) or forms its own recordings' moments;
    the shares are all-reduced, and L-BFGS then takes the same steps as in one process. The
    subspace optimiser's ranks keep the projections of their own rows (with the halo before
    them) and sum the lagged moments of the projections, so every rank's inner solve is the
    same."""
    paths = two_recordings(tmp_path, 3, [(0, 20), (12, 30)], (20000, 17000))
    store = ingest_dataset([{"path": str(p)} for p in paths], tmp_path / "ds" / "data.zarr")
    # recordings of 3 windows of 8192 rows: rank 0 computes one, rank 1 two
    s = StitchedSettings(
        lags=4, device="cpu", route=route, max_device_bytes=0, optimizer=optimizer, tol=1e-6
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes has: the same matrix products
    try:
        one = fit_store(store, 2, s, outputs=StitchedOutputs.under(tmp_path / "one", 2))
    finally:
        torch.set_num_threads(threads)
    two = fit_store(
        store, 2, replace(s, processes=2), outputs=StitchedOutputs.under(tmp_path / "two", 2)
    )
    assert two.metrics["settings"]["processes"] == 2
    # parameters are defined up to a change of latent basis: compare what the fit predicts,
    # the lagged covariances C A^s Pi C' of every pair
    pred = []
    for res in (one, two):
        g = zarr.open_group(str(res.outputs.model), mode="r")
        pred.append(np.einsum("ia,sab,jb->sij", g["C"][:], g["X"][:], g["C"][:]))
    # the shares are summed in another order than one process sums them (1e-16 apart), and
    # L-BFGS ends where float32 products of the data no longer resolve the flat optimum: the
    # same loss to 1e-7 and the same predictions to 5e-4 (1.5e-4 measured)
    for stage in ("free", "linked"):
        assert two.metrics["fit"][stage]["loss"] == pytest.approx(
            one.metrics["fit"][stage]["loss"], rel=1e-7
        )
    np.testing.assert_allclose(pred[1], pred[0], rtol=0, atol=5e-4 * np.abs(pred[0]).max())
    assert two.metrics["summary"]["heldout_corr"] == pytest.approx(
        one.metrics["summary"]["heldout_corr"], abs=1e-4
    )
