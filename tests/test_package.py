"""The package's public surface (hdpissa_trl/__init__.py): the engine imports without trl, the trainer on demand."""

from __future__ import annotations

import json
import subprocess
import sys

from _dist import child_env

PROBE = """
import json, sys
import hdpissa_trl
from hdpissa_trl import HDPiSSAConfig, inject_hdpissa, fold_deltas, weight_checksums
from hdpissa_trl.testing_utils import build_tiny_model
engine = inject_hdpissa(build_tiny_model("llama"), HDPiSSAConfig(r=2), 0, 1, show_progress=False)
engine.fold()
before = sorted(m for m in ("trl", "hdpissa_trl.trainer") if m in sys.modules)
trainer_cls = hdpissa_trl.HDPiSSASFTTrainer
after = sorted(m for m in ("trl", "hdpissa_trl.trainer") if m in sys.modules)
print(json.dumps({"before": before, "after": after, "name": trainer_cls.__name__,
                  "in_dir": "HDPiSSASFTTrainer" in dir(hdpissa_trl)}))
"""


def test_engine_use_does_not_import_trl_and_trainer_loads_on_first_access():
    out = subprocess.run([sys.executable, "-c", PROBE], env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"before": [], "after": ["hdpissa_trl.trainer", "trl"], "name": "HDPiSSASFTTrainer", "in_dir": True}


ENGINE_WITHOUT_TRL = """
import importlib, json, pkgutil, sys
sys.modules["trl"] = None  # any `import trl` now raises ImportError
import hdpissa_trl.engine as engine
names = sorted(m.name for m in pkgutil.iter_modules(engine.__path__))
for name in names:
    importlib.import_module(f"hdpissa_trl.engine.{name}")
from hdpissa_trl.testing_utils import build_tiny_model
model = build_tiny_model("llama")
eng = engine.inject_hdpissa(model, engine.HDPiSSAConfig(r=2), 0, 1, show_progress=False)
eng.fold()
print(json.dumps({"modules": names, "merged": len(eng.merged_state_dict())}))
"""


def test_engine_and_every_engine_module_work_with_trl_blocked():
    """The engine is the method without TRL: every module of hdpissa_trl.engine imports, and an engine injects and
    folds, in a process where importing trl fails."""
    out = subprocess.run([sys.executable, "-c", ENGINE_WITHOUT_TRL], env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"config", "fold", "inject", "model", "sharded"} <= set(got["modules"]) and got["merged"] > 0


def test_every_public_name_resolves_and_unknown_names_fail_clearly():
    import pytest

    import hdpissa_trl

    for name in hdpissa_trl.__all__:
        assert getattr(hdpissa_trl, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'HDPiSSAPPOTrainer'"):
        hdpissa_trl.HDPiSSAPPOTrainer  # noqa: B018
