"""Walking a model: matching target modules, injecting HD-PiSSA layers, folding, checkpoint state, merging.

``HDPiSSAEngine`` is the one object a training loop talks to: ``engine.fold()`` after every real optimizer step,
``engine.state_dict()`` into checkpoints, ``engine.merged_state_dict()`` / ``merge_and_unload()`` for a plain model.
It knows nothing about ``transformers.Trainer``.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.distributed as dist
from torch import nn

from .config import HDPiSSAConfig
from .init import distributed_init_factors
from .layer import HDPiSSALinear
from .precision import WeightUpdater, check_precision_supported
from .subspace import SubspaceSchedule
from .sync import FoldStats, check_weights_consistent, fold_deltas, weight_checksums

ADAPTER_KEYS = ("lora_A", "lora_B", "A0_all", "B0_all")
# Checkpoint marker of the factor convention: A0 = sqrt(S/s)·Vh (PEFT's PiSSA). Checkpoints without it used
# A0 = sqrt(S)·Vh, whose steps grow like s = lora_alpha / r instead of sqrt(s).
FACTOR_CONVENTION = "peft-pissa"
logger = logging.getLogger(__name__)


def _matches(name: str, config: HDPiSSAConfig, output_head: set[str]) -> bool:
    if config.exclude_modules and any(name == e or name.endswith("." + e) for e in config.exclude_modules):
        return False
    target = config.target_modules
    if target == "all-linear":
        return name not in output_head
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_target_modules(model: nn.Module, config: HDPiSSAConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.target_modules`` selects, in model order. Clear errors when none match or a match is
    not an ``nn.Linear``."""
    head = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            head.add(name)
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, HDPiSSALinear):
            continue
        if isinstance(module, nn.Linear):
            if any(name.startswith(p + ".base_layer") for p, _ in found):
                continue
            if _matches(name, config, head):
                found.append((name, module))
        elif config.target_modules != "all-linear" and _matches(name, config, head) and not list(module.children()):
            raise TypeError(
                f"HD-PiSSA supports torch.nn.Linear layers only; target {name!r} is a {type(module).__name__}. "
                f"Choose other target_modules (or 'all-linear')."
            )
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        other = sorted({type(m).__name__ for n, m in model.named_modules() if n and not list(m.children())
                        and getattr(m, "weight", None) is not None and m.weight.dim() == 2}
                       - {"Linear", "Embedding"})
        hint = f" The model has nn.Linear modules named {linear_names}" if linear_names else (
            " The model has no torch.nn.Linear layers")
        hint += " (the output head is never adapted by 'all-linear')." if config.target_modules == "all-linear" else "."
        if other:
            hint += f" It has layer types HD-PiSSA cannot adapt (nn.Linear only): {other}."
        raise ValueError(f"No module matches target_modules={config.target_modules!r}.{hint}")
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class HDPiSSAEngine:
    """HD-PiSSA state of one device: the injected layers, their precision state, fold and consistency checks.

    Args:
        model: a ``transformers`` (or any torch) model; modified in place.
        config: the :class:`HDPiSSAConfig`.
        rank, world_size: this device's index ``k`` and ``K``; default to ``torch.distributed``'s (or 0 and 1).
        group: process group for the collectives (default: the world).
        show_progress: tqdm bar over the SVD init on rank 0.
    """

    def __init__(self, model: nn.Module, config: HDPiSSAConfig, rank: int | None = None,
                 world_size: int | None = None, group=None, show_progress: bool = True):
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size(group) if initialized else 1)
        self.rank = rank if rank is not None else (dist.get_rank(group) if initialized else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}.")
        self.model = model
        self.config = config
        self.group = group
        self.step = 0
        self.last_check: dict = {"step": None, "ok": None, "resynced": []}

        targets = find_target_modules(model, config)
        K, r = self.world_size, config.r
        for name, module in targets:
            m, n = module.out_features, module.in_features
            if K * r > min(m, n):
                largest = min(m, n) // K
                raise ValueError(
                    f"K·r = {K}·{r} = {K * r} exceeds min(out, in) = {min(m, n)} of layer {name!r} "
                    f"(shape {m}x{n}): the K devices' slices must be disjoint singular directions. The largest "
                    f"per-device r that fits this layer with K={K} is {largest}"
                    + (" (none: use fewer devices or exclude this layer)." if largest == 0 else ".")
                )
        check_precision_supported(config.precision, {name: module.weight for name, module in targets})
        for p in model.parameters():
            p.requires_grad_(False)

        factors = distributed_init_factors(
            [mod.weight for _, mod in targets], K * r, config.init_method, config.n_iter, config.seed,
            shard=config.shard_init, show_progress=show_progress, scale=config.scale,
        )
        self.names: list[str] = []
        self.layers: list[HDPiSSALinear] = []
        self.updaters: list[WeightUpdater] = []
        for i, ((name, module), (A0_all, B0_all)) in enumerate(zip(targets, factors)):
            layer = HDPiSSALinear(module, r, self.rank, K, config.scale, config.lora_dropout, name=name)
            layer.set_initial_factors(A0_all.to(layer.A0_all.device), B0_all.to(layer.B0_all.device))
            _set_submodule(model, name, layer)
            self.names.append(name)
            self.layers.append(layer)
            self.updaters.append(WeightUpdater(module.weight, config.precision, config.seed, i))
        self.subspace = SubspaceSchedule(self, config.subspace, config.subspace_steps, config.rotate_pool)
        self.factors_changed = False  # True right after a fold that replaced the factors (restart their optimizer)
        # W must already be identical everywhere (same checkpoint, same seed): check once before any work.
        self.check_consistency(step=0, on_mismatch="raise")

    # -- training ----------------------------------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        """This device's trainable tensors (A, B of every layer), in layer order."""
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    def fold(self) -> FoldStats:
        """Gather every device's deltas (one collective), fold into ``W``, reset adapters; every rank must call.

        Runs the cross-device consistency check every ``sync_check_steps`` folds.
        """
        self.step += 1
        stats = fold_deltas(self.layers, self.updaters, self.step, group=self.group,
                            bucket_bytes=int(self.config.bucket_size_mb * 2**20),
                            move_factors=self.subspace.moves_factors)
        self.factors_changed = self.subspace.after_fold(self)
        if self.config.sync_check_steps and self.step % self.config.sync_check_steps == 0:
            self.check_consistency(self.step)
        return stats

    def check_consistency(self, step: int | None = None, on_mismatch: str | None = None) -> list[str]:
        """Compare checksums of ``W`` across devices; raise or resync per config. Returns resynced layer names."""
        step = self.step if step is None else step
        resynced = check_weights_consistent(self.layers, self.names, step, self.updaters, self.group,
                                            on_mismatch or self.config.on_sync_mismatch)
        if resynced:
            logger.warning("HD-PiSSA weight mismatch at step %d on rank %d: re-synced %d layer(s) from rank 0 "
                           "(on_sync_mismatch='resync'): %s", step, self.rank, len(resynced), ", ".join(resynced))
        self.last_check = {"step": step, "ok": not resynced, "resynced": resynced}
        return resynced

    def checksums(self) -> torch.Tensor:
        return weight_checksums(self.layers, self.updaters)

    def update_rank_bound(self) -> int:
        """The rank one step's update can reach on the smallest layer: ``min(2·K·r, m, n)``."""
        return min(min(2 * self.world_size * lyr.r, lyr.in_features, lyr.out_features) for lyr in self.layers)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything beyond ``W`` that a resume needs: all devices' initial factors and the precision state.

        Identical on every device, so it is written once.
        """
        tensors: dict[str, torch.Tensor] = {}
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            tensors[f"{name}.A0_all"] = layer.A0_all.detach().cpu()
            tensors[f"{name}.B0_all"] = layer.B0_all.detach().cpu()
            for key, t in upd.state().items():
                tensors[f"{name}.precision.{key}"] = t.detach().cpu()
        tensors.update({f"subspace.{k}": v for k, v in self.subspace.state_dict().items()})
        meta = {"world_size": str(self.world_size), "r": str(self.config.r), "step": str(self.step),
                "precision": self.config.precision, "layers": ",".join(self.names),
                "lora_alpha": str(self.config.lora_alpha), "factor_convention": FACTOR_CONVENTION,
                "subspace": self.config.subspace}
        return {"tensors": tensors, "metadata": meta}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; refuses a checkpoint from another K, r, precision or layer set."""
        meta, tensors = state["metadata"], state["tensors"]
        _check_factor_convention(meta)
        if float(meta.get("lora_alpha", self.config.lora_alpha)) != float(self.config.lora_alpha):
            raise ValueError(f"Cannot resume: the checkpoint was made with lora_alpha={meta['lora_alpha']}, now "
                             f"lora_alpha={self.config.lora_alpha}; its factors A0, B0 depend on lora_alpha / r.")
        expected = {"world_size": str(self.world_size), "r": str(self.config.r),
                    "precision": self.config.precision, "layers": ",".join(self.names)}
        if meta.get("subspace", "fixed") != self.config.subspace:
            raise ValueError(f"Cannot resume: the checkpoint was made with subspace={meta.get('subspace')!r}, now "
                             f"subspace={self.config.subspace!r}.")
        for key, want in expected.items():
            got = meta.get(key)
            if got != want:
                what = {"world_size": "number of devices K", "r": "per-device rank r", "precision": "precision mode",
                        "layers": "set of adapted layers (another model or target_modules?)"}[key]
                shown_got = got if key != "layers" else f"{len((got or '').split(','))} layers"
                shown_want = want if key != "layers" else f"{len(self.names)} layers"
                raise ValueError(f"Cannot resume: the checkpoint was made with a different {what} "
                                 f"(checkpoint: {shown_got}, now: {shown_want}).")
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            for key in ("A0_all", "B0_all"):
                t = tensors[f"{name}.{key}"]
                if t.shape != getattr(layer, key).shape:
                    raise ValueError(f"Cannot resume: {name}.{key} has shape {tuple(t.shape)} in the checkpoint but "
                                     f"{tuple(getattr(layer, key).shape)} in this model (another model?).")
            layer.set_initial_factors(tensors[f"{name}.A0_all"].to(layer.A0_all.device),
                                      tensors[f"{name}.B0_all"].to(layer.B0_all.device))
            prefix = f"{name}.precision."
            upd.load_state({k[len(prefix):]: v.to(layer.A0_all.device) for k, v in tensors.items()
                            if k.startswith(prefix)})
            master = upd.state().get("master")
            if master is not None:
                layer.base_layer.weight.copy_(master)
        self.subspace.load_state_dict({k[len("subspace."):]: v for k, v in tensors.items() if k.startswith("subspace.")})
        self.step = int(meta.get("step", 0))

    # -- merged model -----------------------------------------------------------------------------------------
    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model's state dict as a plain model would have it (``W`` at full known precision, no adapters).

        Valid at optimizer-step boundaries (after a fold the adapter is back at ``(A0, B0)`` and ``W`` holds all).
        """
        full = {}
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            w = layer.base_layer.weight
            full[f"{name}.base_layer.weight"] = upd.full_precision_weight(w).to(w.dtype)
        out = {}
        for key, value in self.model.state_dict().items():
            parts = key.split(".")
            if parts[-1] in ADAPTER_KEYS:
                continue
            value = full.get(key, value)
            new_key = key.replace(".base_layer.", ".")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[new_key] = value
        return out

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Put plain ``nn.Linear`` layers (holding ``W``) back into the model and return it (no hdpissa_trl inside)."""
        for name, layer, upd in zip(self.names, self.layers, self.updaters):
            base = layer.base_layer
            full = upd.full_precision_weight(base.weight)
            if full is not base.weight:
                base.weight.data = full.to(base.weight.dtype if dtype is None else dtype).clone()
            _set_submodule(self.model, name, base)
        if dtype is not None:
            self.model.to(dtype)
        self.layers, self.names, self.updaters = [], [], []
        return self.model


def _check_factor_convention(meta: dict) -> None:
    """Refuse a checkpoint whose factors follow the pre-PEFT convention (``A0 = sqrt(S)·Vh``) unless ``s = 1``, where
    both conventions give the same factors."""
    if meta.get("factor_convention") == FACTOR_CONVENTION:
        return
    s = float(meta.get("lora_alpha", "nan")) / float(meta.get("r", "nan"))
    if meta.get("factor_convention") is None and s == 1.0:
        return
    raise ValueError(
        f"Cannot resume: this checkpoint's HD-PiSSA factors follow another lora_alpha convention "
        f"(factor_convention={meta.get('factor_convention')!r}, lora_alpha / r = {s:g}). hdpissa_trl now follows "
        f"PEFT's PiSSA (A0 = sqrt(S/s)·Vh, per-step change of W grows like sqrt(lora_alpha / r)); resuming it now would "
        f"silently change the run's effective learning rate. Resume it with the hdpissa_trl version that wrote it, or "
        f"start a new run from it as a plain model (model_name_or_path = the checkpoint directory: its "
        f"model.safetensors holds the trained W). Checkpoints made with lora_alpha = r are not affected."
    )


def inject_hdpissa(model: nn.Module, config: HDPiSSAConfig, rank: int | None = None, world_size: int | None = None,
                   group=None, show_progress: bool = True) -> HDPiSSAEngine:
    """Turn ``model`` into an HD-PiSSA model for device ``rank`` of ``world_size`` (in place); returns the engine.

    The engine is also attached as ``model.hdpissa_engine``.
    """
    engine = HDPiSSAEngine(model, config, rank, world_size, group, show_progress)
    model.hdpissa_engine = engine  # type: ignore[attr-defined]
    return engine
