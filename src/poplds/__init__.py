"""poplds: low-dimensional dynamics of large, partially observed neural populations.

Public surface:

- :func:`ingest_dataset` — partial recordings (NWB, npz, suite2p) into one Zarr v3 store
  (:func:`ingest_recording` per recording, then :func:`assemble_dataset`, as the workflow does).
- :class:`DatasetStore` — read that store.
- :mod:`poplds.simulate` — seeded ground-truth datasets (stitched LDS, Poisson LDS with drift).
- :class:`InputError` — every bad-input error, naming the file and the problem;
  :class:`NoSpaceError` — the disk filled up; both are :class:`PopldsError`.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
from ._version import __version__

if TYPE_CHECKING:
    from ._errors import InputError, NoSpaceError, PopldsError
    from .ingest import assemble_dataset, ingest_dataset, ingest_recording
    from .sources import RecordingSpec, open_recording
    from .store import DatasetStore

#: Where each public name lives, imported on first use: ``import poplds`` stays light (the
#: workflow's Snakefile reads ``poplds._outputs`` without loading zarr, dask or pynwb).
_WHERE = {
    "InputError": "._errors",
    "NoSpaceError": "._errors",
    "PopldsError": "._errors",
    "assemble_dataset": ".ingest",
    "ingest_dataset": ".ingest",
    "ingest_recording": ".ingest",
    "RecordingSpec": ".sources",
    "open_recording": ".sources",
    "DatasetStore": ".store",
}

__getattr__ = lazy_getattr(__name__, _WHERE)

__all__ = [
    "DatasetStore",
    "InputError",
    "NoSpaceError",
    "PopldsError",
    "RecordingSpec",
    "__version__",
    "assemble_dataset",
    "ingest_dataset",
    "ingest_recording",
    "open_recording",
]
