"""The TRL / transformers integration of HD-PiSSA: trainers built on :mod:`hdpissa_trl.engine` (never on the scripts).

* ``mixin.py``: :class:`HDPiSSATrainerMixin`, the method's trainer logic for any ``transformers.Trainer``;
* ``sft_trainer.py``, ``dpo_trainer.py``, ``grpo_trainer.py``, ``plain_trainer.py``: TRL's SFT / DPO / GRPO trainers
  and a plain ``Trainer`` with it; ``reference.py``: the reference model of DPO and GRPO when W moves every step;
* ``checkpoint.py``, ``sharded_checkpoint.py``: atomic checkpoints and exact resume (W replicated / sharded);
* ``parallel.py``, ``fsdp.py``, ``checks.py``: which parallel set-ups train, FSDP2 from accelerate's settings, the
  refusals of DPO / GRPO; ``amp.py``: fp16 skip agreement; ``data_checks.py``: the SFT dataset checks;
* ``card.py``: the model card; ``hub.py``: the Hub token kept out of files.

The public names are imported from the package root (``from hdpissa_trl import HDPiSSASFTTrainer``), on first use.
"""
