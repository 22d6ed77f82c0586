"""The HD-PiSSA method itself, importable without ``trl`` and knowing no ``transformers.Trainer``.

A training loop talks to one object, the engine that :func:`inject_hdpissa` returns: ``engine.fold()`` after every
real optimizer step, ``engine.state_dict()`` into checkpoints, ``engine.merged_state_dict()`` for a plain model.

* :mod:`.config`: :class:`HDPiSSAConfig`, what the user sets;
* :mod:`.layer`: :class:`HDPiSSALinear`, the replaced layer; :mod:`.init`: the initial slices (SVD);
* :mod:`.fold`, :mod:`.precision`, :mod:`.consistency`: the fold, how W absorbs it, the cross-device check of W;
* :mod:`.subspace`: what happens to the slices between folds; :mod:`.distributed`: the ``torch.distributed`` plumbing;
* :mod:`.model`: :class:`HDPiSSAEngine` (W replicated); :mod:`.sharded`: :class:`ShardedHDPiSSAEngine` (W sharded
  by rows with FSDP2); :mod:`.inject`: :func:`inject_hdpissa`, which picks one of the two;
* :mod:`.simulate`: K devices run exactly in one process (benchmarks on a small machine);
* :mod:`.export`: the run's update ``W_final − W_start`` factored as LoRA ``B·A`` (what ``save_adapter`` writes).
"""

from __future__ import annotations

from .config import HDPiSSAConfig
from .consistency import WeightMismatchError, weight_checksums
from .distributed import shutdown_distributed
from .export import FactoredUpdate, export_updates, factor_update
from .fold import FoldStats, fold_deltas
from .init import distributed_init_factors, top_singular_factors
from .inject import inject_hdpissa
from .layer import HDPiSSALinear
from .model import HDPiSSAEngine, find_target_modules
from .precision import WeightUpdater, stochastic_round_to_bf16
from .sharded import ShardedHDPiSSAEngine, shard_model

__all__ = [
    "FactoredUpdate",
    "FoldStats",
    "HDPiSSAConfig",
    "HDPiSSAEngine",
    "HDPiSSALinear",
    "ShardedHDPiSSAEngine",
    "WeightMismatchError",
    "WeightUpdater",
    "distributed_init_factors",
    "export_updates",
    "factor_update",
    "find_target_modules",
    "fold_deltas",
    "inject_hdpissa",
    "shard_model",
    "shutdown_distributed",
    "stochastic_round_to_bf16",
    "top_singular_factors",
    "weight_checksums",
]
