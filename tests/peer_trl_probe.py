"""A probe for TRL's own SFTTrainer tests (run through the peer_trl runner), not part of the suite.

Most of TRL's training tests end with "every parameter the trainer held has changed". HD-PiSSA never trains the
embeddings, norms or output head, and resets its adapters to their initial values after every fold, so that check
stops at the first such parameter and hides whatever the test asserts after it. This subclass answers
``model.get_parameter(name)`` after training with a visibly changed copy for exactly those parameters, and with the
real tensor for the weights HD-PiSSA trains (each adapted layer's W, ``…base_layer.weight``), which must really have
changed. A test that still fails under the probe has a failure that is not about untrained parameters.

    PYTHONPATH=tests PEER_TRL_EXTRA_DESELECT=FILE_OF_PASSING_IDS .../peer_trl/run.sh --trainer peer_trl_probe:ProbeTrainer
"""

from __future__ import annotations

from hdpissa_trl import HDPiSSADPOTrainer, HDPiSSAGRPOTrainer, HDPiSSASFTTrainer


def _probe(trainer) -> None:
    engine = trainer.hdpissa_engine
    if engine is None:
        return
    trained = {f"{name}.base_layer.weight" for name in engine.names}
    model = trainer.model
    real = model.get_parameter

    def get_parameter(name: str):
        param = real(name)
        return param if name in trained else param.detach() + 1  # "changed": HD-PiSSA never trains it

    model.get_parameter = get_parameter


class ProbeTrainer(HDPiSSASFTTrainer):
    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        _probe(self)
        return out


class ProbeDPOTrainer(HDPiSSADPOTrainer):
    """The same probe for TRL's DPOTrainer tests (``tools/peer_trl_ext/run.sh --module dpo``)."""

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        _probe(self)
        return out


class ProbeGRPOTrainer(HDPiSSAGRPOTrainer):
    """The same probe for TRL's GRPOTrainer tests (``tools/peer_trl_ext/run.sh --module grpo``)."""

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        _probe(self)
        return out
