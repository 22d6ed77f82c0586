"""What the recipe scripts (``recipes/*.py``) need beyond TRL, as ``trl/scripts/`` is for TRL's own scripts.

* ``recipe.py``: the SFT recipe's script arguments and shared run steps (model source, evaluation before / after,
  save + card + push); ``recipe_rl.py``: the DPO / GRPO recipes' arguments, data and run;
* ``data.py``: data mixtures and prompt templates (TRL's ``DatasetMixtureConfig`` plus column mapping);
* ``gguf.py``: training from a GGUF file (``python -m hdpissa_trl.scripts.gguf SRC OUT`` converts one).

Built on :mod:`hdpissa_trl.trainer` and :mod:`hdpissa_trl.engine`; neither imports anything from here.
"""
