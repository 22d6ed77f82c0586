"""Walking a model: matching target modules, injecting HD-PiSSA layers, folding, checkpoint state, merging.

``HDPiSSAEngine`` is the one object a training loop talks to: ``engine.fold()`` after every real optimizer step,
``engine.state_dict()`` into checkpoints, ``engine.merged_state_dict()`` / ``merge_and_unload()`` for a plain model.
It knows nothing about ``transformers.Trainer``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .config import OPERATIONAL_FIELDS, HDPiSSAConfig
from .consistency import check_weights_consistent, weight_checksums
from .distributed import is_distributed, world_and_rank
from .fold import FoldStats, fold_deltas, update_rank_bound
from .init import init_factors_per_layer
from .layer import HDPiSSALinear, plain_key
from .precision import WeightUpdater, check_precision_supported
from .subspace import SubspaceSchedule

# Checkpoint marker of the factor convention: A0 = sqrt(S/s)·Vh (PEFT's PiSSA). Checkpoints without it used
# A0 = sqrt(S)·Vh, whose steps grow like s = lora_alpha / r instead of sqrt(s).
FACTOR_CONVENTION = "peft-pissa"
logger = logging.getLogger(__name__)


@dataclass
class WeightCheck:
    """The last cross-device comparison of W: at which fold, whether every layer agreed, which were re-synced."""

    step: int | None = None
    ok: bool | None = None
    resynced: list[str] = field(default_factory=list)


def _peft_target_config(model: nn.Module, config: HDPiSSAConfig):
    """``config``'s target and exclude settings as PEFT reads them, ``"all-linear"`` expanded by PEFT's own rule.

    Matching through PEFT means HD-PiSSA and its PEFT baselines (``build_peft_config``: LoRA, PiSSA) adapt the same
    layers by construction. ``_maybe_include_all_linear_layers`` is the function PEFT's own injection calls for
    ``"all-linear"`` (every linear but the output head); tests/test_model.py checks both sets agree.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    peft_config = LoraConfig(target_modules=targets, exclude_modules=config.exclude_modules)
    return _maybe_include_all_linear_layers(peft_config, model)


def find_target_modules(model: nn.Module, config: HDPiSSAConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.target_modules`` selects, in model order, matched by PEFT's rules (name or suffix list,
    regex, ``"all-linear"``). Clear errors when none match or a match is not an ``nn.Linear``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = _peft_target_config(model, config)
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, HDPiSSALinear) or not check_target_module_exists(peft_config, name):
            continue  # (an excluded module is a falsy match)
        if isinstance(module, nn.Linear):
            if not any(name.startswith(p + ".base_layer") for p, _ in found):
                found.append((name, module))
        elif not list(module.children()):
            raise TypeError(
                f"HD-PiSSA supports torch.nn.Linear layers only; target {name!r} is a {type(module).__name__}. "
                f"Choose target_modules that name nn.Linear layers, or leave it out with exclude_modules."
            )
    if not found:
        linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        hint = f" The model has nn.Linear modules named {linear_names}" if linear_names else (
            " The model has no torch.nn.Linear layers")
        hint += " (the output head is never adapted by 'all-linear')." if config.target_modules == "all-linear" else "."
        raise ValueError(f"No module matches target_modules={config.target_modules!r}.{hint}")
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fit_ranks(targets: list[tuple[str, nn.Module]], config: HDPiSSAConfig, world_size: int,
              warn: bool = True) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """Per-layer rank: ``config.r``, or on a layer too small for it the largest ``r`` with ``K·r <= min(out, in)``.

    The K devices' slices must be disjoint singular directions, so a layer of ``min(out, in) < K`` gets no adapter.
    One warning names the fitted and the skipped layers; ``config.strict_rank`` makes either an error.
    """
    K, kept, ranks, fitted, skipped = world_size, [], [], {}, []
    for name, module in targets:
        m, n = module.out_features, module.in_features
        largest = min(m, n) // K
        if K * config.r > min(m, n) and config.strict_rank:
            raise ValueError(
                f"K·r = {K}·{config.r} = {K * config.r} exceeds min(out, in) = {min(m, n)} of layer {name!r} "
                f"(shape {m}x{n}): the K devices' slices must be disjoint singular directions. The largest "
                f"per-device r that fits this layer with K={K} is {largest}"
                + (" (none: use fewer devices or exclude this layer)." if largest == 0 else ".")
                + " Without strict_rank=True such a layer gets that largest r."
            )
        if largest == 0:
            skipped.append(name)
            continue
        r = min(config.r, largest)
        if r < config.r:
            fitted.setdefault((name.rsplit(".", 1)[-1], r), []).append(name)
        kept.append((name, module))
        ranks.append(r)
    if not kept:
        raise ValueError(f"No target layer is large enough for K={K} devices (min(out, in) >= K is needed): "
                         f"{', '.join(skipped)}.")
    if warn and (fitted or skipped):
        parts = [f"{suffix} ×{len(names)} r={r}" for (suffix, r), names in fitted.items()]
        if skipped:
            parts.append(f"no adapter (min(out, in) < K): {', '.join(skipped)}")
        logger.warning("HD-PiSSA r=%d with K=%d does not fit every layer (K·r must be <= min(out, in)); using the "
                       "largest r that fits: %s. Set strict_rank=True to make this an error.", config.r, K,
                       "; ".join(parts))
    return kept, ranks


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
        dist_world, dist_rank = world_and_rank(group)
        self.world_size = world_size if world_size is not None else dist_world
        self.rank = rank if rank is not None else dist_rank
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}.")
        self.model = model
        self.config = config
        self.group = group
        self.step = 0
        self.last_check = WeightCheck()

        targets = find_target_modules(model, config)
        targets, ranks = fit_ranks(targets, config, self.world_size, warn=self.rank == 0)
        check_precision_supported(config.precision, {name: module.weight for name, module in targets})
        for p in model.parameters():
            p.requires_grad_(False)
        self.names: list[str] = []
        self.layers: list[HDPiSSALinear] = []
        self.updaters: list[WeightUpdater] = []
        self._inject(targets, ranks, show_progress)
        self.subspace = SubspaceSchedule(self, config.subspace, config.subspace_steps, config.rotate_pool,
                                         config.subspace_warmup_steps)
        self.factors_changed = False  # True right after a fold that replaced the factors (restart their optimizer)
        if config.slice_gradient == "global":  # every slice's gradient on this device's data, summed over micro-batches
            for layer in self.layers:
                layer.slice_grads = (torch.zeros_like(layer.A0_all), torch.zeros_like(layer.B0_all))
        # W must already be identical everywhere (same checkpoint, same seed): check once before any work.
        self.check_consistency(step=0, on_mismatch="raise")

    def _inject(self, targets: list[tuple[str, nn.Module]], ranks: list[int], show_progress: bool) -> None:
        """Factor every target (each layer on one rank, broadcast) and swap in the HD-PiSSA layers."""
        config = self.config
        factors = init_factors_per_layer([mod.weight for _, mod in targets], ranks, self.world_size, config,
                                         show_progress)
        for i, ((name, module), r, (A0_all, B0_all)) in enumerate(zip(targets, ranks, factors)):
            layer = HDPiSSALinear(module, r, self.rank, self.world_size, config.lora_alpha / r, config.lora_dropout,
                                  name=name)
            layer.set_initial_factors(A0_all.to(layer.A0_all.device), B0_all.to(layer.B0_all.device))
            _set_submodule(self.model, name, layer)
            self.names.append(name)
            self.layers.append(layer)
            self.updaters.append(WeightUpdater(module.weight, config.precision, config.seed, i, config.fold_matmul))

    # -- training ----------------------------------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        """This device's trainable tensors (A, B of every layer), in layer order."""
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    def lr_scale(self) -> float:
        """The multiplier of the adapters' learning rate for the next optimizer step (``subspace_warmup_steps``)."""
        return self.subspace.lr_scale()

    def scale_learning_rate(self, optimizer: torch.optim.Optimizer):
        """Make every step of ``optimizer`` run at ``lr × lr_scale()`` (the warm-up after a change of the factors,
        ``subspace_warmup_steps``): step pre/post hooks scale and restore each group's rate, so a scheduler keeps
        setting the unscaled one. Returns the two hook handles (``.remove()`` undoes it)."""
        saved: dict[int, float] = {}

        def pre(opt, args, kwargs):
            factor = self.lr_scale()
            if factor != 1.0:
                for group in opt.param_groups:
                    saved[id(group)] = group["lr"]
                    group["lr"] = group["lr"] * factor

        def post(opt, args, kwargs):
            for group in opt.param_groups:
                if id(group) in saved:
                    group["lr"] = saved.pop(id(group))

        return optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)

    @property
    def global_slice_gradients(self) -> bool:
        return self.config.slice_gradient == "global"

    @torch.no_grad()
    def reduce_slice_gradients(self) -> int:
        """``slice_gradient="global"``: after the last backward of a step and before clipping, give every device its
        own slice's gradient summed over ALL devices' data (divided by K, as DDP averages), in ``lora_A.grad`` /
        ``lora_B.grad``; empty the buffers for the next step. One reduce-scatter (an all-reduce on gloo, which has no
        reduce-scatter) of every slice's ``[dA | dB]`` over every layer. Every rank must call. Returns the size of
        that buffer in bytes (K times the fold's local delta buffer)."""
        return reduce_slice_gradients(self.layers, self.world_size, self.rank, self.group)

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
        self.last_check = WeightCheck(step, not resynced, resynced)
        return resynced

    def checksums(self) -> torch.Tensor:
        return weight_checksums(self.layers, self.updaters)

    def update_rank_bound(self) -> int:
        """The rank one step's update can reach on the smallest layer: ``min(2·K·r, m, n)``."""
        return update_rank_bound(self.layers, self.world_size)

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
                "config": json.dumps(self.config.to_dict())}
        return {"tensors": tensors, "metadata": meta}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; refuses a checkpoint from another K, layer set or config (any field but
        the operational ones of ``config.OPERATIONAL_FIELDS``), naming what differs."""
        meta, tensors = state["metadata"], state["tensors"]
        _check_factor_convention(meta)
        expected = {"world_size": str(self.world_size), "r": str(self.config.r),
                    "precision": self.config.precision, "layers": ",".join(self.names)}
        for key, want in expected.items():
            got = meta.get(key)
            if got != want:
                what = {"world_size": "number of devices K", "r": "per-device rank r", "precision": "precision mode",
                        "layers": "set of adapted layers (another model or target_modules?)"}[key]
                shown_got = got if key != "layers" else f"{len((got or '').split(','))} layers"
                shown_want = want if key != "layers" else f"{len(self.names)} layers"
                raise ValueError(f"Cannot resume: the checkpoint was made with a different {what} "
                                 f"(checkpoint: {shown_got}, now: {shown_want}).")
        check_resume_config(meta, self.config)
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
        self.step = int(meta.get("step", 0))
        self.subspace.load_state_dict({k[len("subspace."):]: v for k, v in tensors.items() if k.startswith("subspace.")},
                                      self)

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
            new_key = plain_key(key)
            if new_key is None:
                continue
            value = full.get(key, value)
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


def slice_gradient_buffer(layers: list[HDPiSSALinear], world_size: int, grads=None) -> torch.Tensor:
    """Every layer's ``slice_grads`` (or ``grads``, one pair per layer) flattened slice-major: chunk ``k`` holds slice
    ``k``'s ``[dA | dB]`` of every layer in layer order (the K chunks are equally long: every slice of a layer has the
    same r)."""
    pairs = grads if grads is not None else [layer.slice_grads for layer in layers]
    parts = []
    for k in range(world_size):
        for layer, (gA, gB) in zip(layers, pairs):
            sl = slice(k * layer.r, (k + 1) * layer.r)
            parts.append(gA[sl].reshape(-1))
            parts.append(gB[:, sl].reshape(-1))
    return torch.cat(parts)


@torch.no_grad()
def install_slice_gradients(layers: list[HDPiSSALinear], own: torch.Tensor, params=None) -> None:
    """Split one slice's flat ``[dA | dB]`` chunk into the layers' adapter ``.grad`` (``params``: the (A, B) pairs to
    fill, default each layer's own ``lora_A`` / ``lora_B``)."""
    pairs = params if params is not None else [(layer.lora_A, layer.lora_B) for layer in layers]
    offset = 0
    for (A, B) in pairs:
        for p in (A, B):
            p.grad = own[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    if offset != own.numel():
        raise RuntimeError(f"slice gradient chunk has {own.numel()} values, the adapters {offset}")


def reduce_slice_gradients(layers: list[HDPiSSALinear], world_size: int, rank: int, group=None) -> int:
    """See :meth:`HDPiSSAEngine.reduce_slice_gradients`."""
    flat = slice_gradient_buffer(layers, world_size)
    chunk = flat.numel() // world_size
    if is_distributed() and world_size > 1:
        if dist.get_backend(group) == "nccl":
            own = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(own, flat, group=group)
        else:
            dist.all_reduce(flat, group=group)
            own = flat[rank * chunk:(rank + 1) * chunk]
    else:
        own = flat[rank * chunk:(rank + 1) * chunk]
    install_slice_gradients(layers, own / world_size)
    zero_slice_gradients([layer.slice_grads for layer in layers])
    return flat.numel() * flat.element_size()


def reduce_traffic(buffer_bytes: int, world_size: int) -> int:
    """Bytes a device sends plus receives in the reduce-scatter of a ``buffer_bytes`` slice-gradient buffer, counted
    as the fold counts its gather (what goes to and comes from the other devices, not the ring's hops): it sends the
    K−1 chunks of the other slices and receives K−1 contributions to its own, each 1/K of the buffer."""
    return 2 * (world_size - 1) * buffer_bytes // world_size


def zero_slice_gradients(pairs) -> None:
    """Empty the ``(dA_all, dB_all)`` buffers for the next step (in place: the layers keep pointing at them)."""
    for gA, gB in pairs:
        gA.zero_()
        gB.zero_()


def check_resume_config(meta: dict, config: HDPiSSAConfig) -> None:
    """Refuse a checkpoint whose stored ``HDPiSSAConfig`` (``meta["config"]``, JSON) differs from ``config`` in any
    field but the operational ones (``config.OPERATIONAL_FIELDS``), naming the field. Both engines resume through it."""
    saved = json.loads(meta.get("config", "{}"))
    for key, now in config.to_dict().items():
        if key in saved and key not in OPERATIONAL_FIELDS and saved[key] != now:
            raise ValueError(f"Cannot resume: the checkpoint was made with HDPiSSAConfig.{key}={saved[key]!r}, "
                             f"this run has {key}={now!r}. Resume with the checkpoint's value, or start a new run.")


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

