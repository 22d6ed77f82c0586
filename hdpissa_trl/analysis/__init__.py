"""Post-hoc analysis tools for fine-tuned checkpoints.

These work on plain checkpoint directories (safetensors on disk) rather than on live models, so they can compare any
two runs after the fact, whatever method produced them (HD-PiSSA, PiSSA, LoRA merged into the base, full fine-tuning).
See :mod:`hdpissa_trl.analysis.update_spectrum`; :mod:`hdpissa_trl.analysis.subspace` measures how much of an update
lies outside HD-PiSSA's fixed initial subspaces (on tensors, e.g. during training).
"""
