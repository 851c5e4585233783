"""poplds: low-dimensional dynamics of large, partially observed neural populations.

Public surface:

- :func:`ingest_dataset` — partial recordings (NWB, npz, suite2p) into one Zarr v3 store
  (:func:`ingest_recording` per recording, then :func:`assemble_dataset`, as the workflow does).
- :class:`DatasetStore` — read that store.
- :mod:`poplds.simulate` — seeded ground-truth datasets (stitched LDS, Poisson LDS with drift).
- :class:`InputError` — every bad-input error, naming the file and the problem;
  :class:`NoSpaceError` — the disk filled up; both are :class:`PopldsError`.
"""

from ._errors import InputError, NoSpaceError, PopldsError
from ._version import __version__
from .ingest import assemble_dataset, ingest_dataset, ingest_recording
from .sources import RecordingSpec, open_recording
from .store import DatasetStore

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
