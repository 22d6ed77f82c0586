"""Old home of the fold and the consistency check, kept so that ``from hdpissa_trl.sync import ...`` still works.

The fold (gather + fold) lives in :mod:`hdpissa_trl.engine.fold`, the checksums and re-sync in
:mod:`hdpissa_trl.engine.consistency`, the ``torch.distributed`` helpers in :mod:`hdpissa_trl.engine.distributed`.
"""

from .engine.consistency import WeightMismatchError, check_weights_consistent, weight_checksums
from .engine.distributed import CollectiveError, collective_errors
from .engine.fold import (
    FoldStats,
    fold_deltas,
    fold_layer,
    gather_buffers,
    layer_delta_numel,
    local_delta_buffer,
    make_buckets,
)

__all__ = [
    "CollectiveError",
    "FoldStats",
    "WeightMismatchError",
    "check_weights_consistent",
    "collective_errors",
    "fold_deltas",
    "fold_layer",
    "gather_buffers",
    "layer_delta_numel",
    "local_delta_buffer",
    "make_buckets",
    "weight_checksums",
]
