"""hdpissa_trl: HD-PiSSA (High-rank Distributed PiSSA) for Hugging Face TRL.

Engine (no ``transformers.Trainer`` inside): :class:`HDPiSSAConfig`, :func:`inject_hdpissa` / :class:`HDPiSSAEngine`,
:class:`HDPiSSALinear`, :func:`fold_deltas`. Trainer: :class:`HDPiSSASFTTrainer` and the reusable
:class:`HDPiSSATrainerMixin`.
"""

from .config import HDPiSSAConfig
from .init import distributed_init_factors, top_singular_factors
from .layer import HDPiSSALinear
from .model import HDPiSSAEngine, find_target_modules, inject_hdpissa
from .precision import WeightUpdater, stochastic_round_to_bf16
from .sync import FoldStats, WeightMismatchError, fold_deltas, weight_checksums

__version__ = "0.1.0"

__all__ = [
    "FoldStats",
    "HDPiSSAConfig",
    "HDPiSSAEngine",
    "HDPiSSALinear",
    "WeightMismatchError",
    "WeightUpdater",
    "distributed_init_factors",
    "find_target_modules",
    "fold_deltas",
    "inject_hdpissa",
    "stochastic_round_to_bf16",
    "top_singular_factors",
    "weight_checksums",
]

from .checkpoint import load_hdpissa_checkpoint  # noqa: E402
from .trainer import HDPiSSASFTTrainer, HDPiSSATrainerMixin, build_peft_config  # noqa: E402

__all__ += ["HDPiSSASFTTrainer", "HDPiSSATrainerMixin", "build_peft_config", "load_hdpissa_checkpoint"]
