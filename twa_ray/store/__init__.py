"""Candidate store (one Arrow IPC file per candidate, any pyarrow.fs URI) and checkpoint importers."""

from twa_ray.store.arrow import FORMAT_VERSION, CandidateInfo
from twa_ray.store.importers import find_checkpoints, import_checkpoints, load_state_dict
from twa_ray.store.store import CandidateStore

__all__ = [
    "FORMAT_VERSION",
    "CandidateInfo",
    "CandidateStore",
    "find_checkpoints",
    "import_checkpoints",
    "load_state_dict",
]
