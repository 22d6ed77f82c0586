"""The trainers' refusals, each before the work it would waste: the output head (DPO / GRPO read its weight directly),
W sharded by rows with DPO / GRPO (their reference model and generation have not run with a sharded policy), an
optimizer built before the trainer created what it trains, and TRL private hooks missing from the installed TRL."""

from __future__ import annotations

from ..engine.config import HDPiSSAConfig
from ..engine.model import find_target_modules


def refuse_adapted_output_head(model, config: HDPiSSAConfig, trainer_name: str) -> None:
    """TRL computes log-probabilities from ``lm_head.weight`` directly (fused LM head): an adapter on the head would
    never get a gradient. Refuse it before any work, as TRL does for PEFT."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    hit = [name for name, mod in find_target_modules(model, config) if mod is head]
    if hit:
        raise ValueError(f"Adapting the output head {hit[0]!r} is not supported with {trainer_name}: it computes "
                         f"log-probabilities from its weight directly (fused LM head), so the adapter would never "
                         f"be trained. Remove it from target_modules (or use 'all-linear', which leaves it out).")


def refuse_sharded_w(trainer, trainer_name: str) -> None:
    """W sharded by rows (FSDP2) is built and tested for the SFT trainer and the engine; with DPO/GRPO the reference
    model, the reference sync and generation would each meet a sharded policy, and none of that has run yet. Refuse
    it clearly rather than train something unverified."""
    from .fsdp import requested_fsdp_plugin

    if requested_fsdp_plugin(trainer.args, trainer.accelerator) is not None:
        raise ValueError(f"HD-PiSSA with {trainer_name} supports replicated W only (a DDP-style launch such as "
                         f"recipes/accelerate_configs/cpu.yaml or multi_gpu.yaml), not W sharded by rows with FSDP2 "
                         f"(the fsdp2 / cpu_fsdp2 configs): that combination is not tested yet. Use FSDP2 with "
                         f"HDPiSSASFTTrainer, or launch {trainer_name} without FSDP.")


def refuse_sharded_w_before_loading(args, trainer_name: str) -> None:
    """:func:`refuse_sharded_w` from the training arguments and the launch environment alone, before the parent trainer
    exists: DPO would otherwise build its reference and precompute every log-probability first."""
    from types import SimpleNamespace

    no_accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), mixed_precision="no")
    refuse_sharded_w(SimpleNamespace(args=args, accelerator=no_accelerator), trainer_name)


def model_skeleton(model, args):
    """What the refusals can inspect before the parent trainer loads anything: ``model`` itself, or for a path or Hub
    id a weightless skeleton built from its config on the meta device (no weight is read). ``None`` when the config
    cannot be read here: the parent's own loading then reports it."""
    if not isinstance(model, str):
        return model
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = bool(getattr(args, "trust_remote_code", False))
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=remote)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except (OSError, ValueError, KeyError):
        return None


def refuse_optimizer_built_before_the_trainer(optimizers, reason: str | None, accepts_cls_and_kwargs: bool,
                                              method: str) -> None:
    """``optimizers=(optimizer, scheduler)`` built before the trainer holds none of what the trainer trains when the
    trainer creates those parameters itself (``reason`` says how); it would train nothing, silently. Refused, naming
    the ways that work."""
    optimizer, scheduler = tuple(optimizers or (None, None))
    if reason is None or (optimizer is None and scheduler is None):
        return
    params = ("trainer.hdpissa_engine.adapter_parameters()" if method == "hdpissa" else
              "[p for p in trainer.model.parameters() if p.requires_grad]")
    alternative = ("pass optimizer_cls_and_kwargs=(torch.optim.AdamW, {'lr': 1e-4}) instead (the trainer builds it on "
                   "what it trains), or " if accepts_cls_and_kwargs else "")
    raise ValueError(
        f"optimizers=(optimizer, scheduler) cannot be used here: {reason}, so the optimizer holds none of the "
        f"parameters this run trains and the run would train nothing. Leave optimizers out and {alternative}build the "
        f"optimizer after the trainer, before train(): trainer.optimizer = torch.optim.AdamW({params}, lr=...) "
        f"(and trainer.lr_scheduler = a scheduler of trainer.optimizer, or args.lr_scheduler_type); the choice of "
        f"optimizer is also args.optim / args.optim_args.")


def check_optimizer_trains_the_model(optimizer, lr_scheduler, model, method: str) -> None:
    """An optimizer the user set on the trainer must hold every parameter the run trains, and a scheduler the user set
    must drive that optimizer: else part of the model (all of it, for an optimizer built on the wrong parameters)
    silently never trains."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trained if id(p) not in held]
    if missing:
        params = ("trainer.hdpissa_engine.adapter_parameters()" if method == "hdpissa" else
                  "[p for p in trainer.model.parameters() if p.requires_grad]")
        raise ValueError(f"trainer.optimizer does not hold {len(missing)} of the {len(trained)} parameters this run "
                         f"trains (e.g. {missing[0]!r}): they would never change. Build it on {params}.")
    bound = getattr(lr_scheduler, "optimizer", optimizer)
    if lr_scheduler is not None and bound is not optimizer:
        raise ValueError("trainer.lr_scheduler drives another optimizer than trainer.optimizer, so the learning rate "
                         "it sets is never used. Build the scheduler on trainer.optimizer.")


def require_trl_hooks(*hooks: tuple[object, str]) -> None:
    """The private TRL methods and functions the trainers override or patch must exist in the installed TRL: if TRL
    renamed one, the override would never run (or the patch would change nothing) and nothing would say so."""
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in hooks if not hasattr(owner, name)]
    if missing:
        import trl

        raise RuntimeError(
            f"hdpissa_trl overrides or patches {', '.join(missing)}, which the installed TRL {trl.__version__} does not "
            f"have (renamed or removed in this version), so that step would silently not happen. Install a TRL version "
            f"hdpissa_trl supports (see its pyproject.toml), or report it to hdpissa_trl.")
