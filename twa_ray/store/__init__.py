"""Candidate store (one Arrow IPC file per candidate, any pyarrow.fs URI) and checkpoint importers."""

from twa_ray.store.arrow import FORMAT_VERSION, CandidateInfo
from twa_ray.store.importers import (
    Imported,
    find_checkpoints,
    import_checkpoints,
    load_state_dict,
    tied_names,
)
from twa_ray.store.store import CandidateStore

__all__ = [
    "FORMAT_VERSION",
    "CandidateInfo",
    "CandidateStore",
    "Imported",
    "find_checkpoints",
    "import_checkpoints",
    "load_state_dict",
    "tied_names",
]
