"""Secrets and code: the Hub token never lands in output or files; remote code runs only when the user opts in.

The code-evaluation sandbox (infinite loop, huge allocation, fork, network, writes outside the temp dir, the parent's
secrets) has its own tests in ``test_evaluation_sandbox.py``; they are not repeated here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _dist import child_env
from mini_hub import run_mini_hub

from hdpissa_trl.testing_utils import build_tokenizer, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "trainer_worker.py"
TOKEN = "hf_SECRETreliabilityTOKEN0123456789abcdef"  # a token-shaped string, accepted only by the local test Hub
REPO_ID = "test-user/reliability"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_hub_token_never_printed_or_written(tiny_model_dir, tmp_path):
    """Train with `hub_token` set (and nowhere else), checkpoint, save, write the card and push to a local Hub with
    `hub_strategy="checkpoint"`: the token authenticates the pushes but is in no output line, no file of the output
    dir (checkpoints' training_args.bin included), no pushed file and nothing the Hub or HF_HOME stored."""
    out, rec, hf_home = tmp_path / "out", tmp_path / "rec", tmp_path / "hf_home"
    with run_mini_hub(token=TOKEN) as hub:
        env = hub.client_env(hf_home, child_env())  # the token comes from the args only
        proc = subprocess.run(
            [sys.executable, str(WORKER), "--model", tiny_model_dir, "--output_dir", str(out), "--record_dir",
             str(rec), "--max_steps", "2", "--save_steps", "2", "--hub_token", TOKEN, "--hub_model_id", REPO_ID],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        pushed = hub.repo_files(REPO_ID)
        hub.check()
    # The push worked (writes need the token), with the merged model, its card and the checkpoint.
    assert {"model.safetensors", "README.md", "training_args.bin", "last-checkpoint/training_args.bin",
            "last-checkpoint/hdpissa_state.safetensors"} <= set(pushed), sorted(pushed)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"training_args.bin", "README.md", "checkpoint-2/training_args.bin", "checkpoint-2/trainer_state.json",
            "checkpoint-2/optimizer_rank0.pt"} <= written, sorted(written)
    # The configuration was printed (redacted by transformers), so the output is a real place a leak could show.
    assert "<HUB_TOKEN>" in proc.stdout
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    needle = TOKEN.encode()
    assert files_containing(out, needle) == []
    assert [path for path, data in pushed.items() if needle in data] == []
    assert files_containing(hf_home, needle) == []
    # Control: the needle search does find the token where it is (so the checks above can fail).
    (tmp_path / "control.bin").write_bytes(b"..." + needle + b"...")
    assert files_containing(tmp_path, needle) == [str(tmp_path / "control.bin")]


# -- trust_remote_code -------------------------------------------------------------------------------------------

def load_recipe_parser():
    spec = importlib.util.spec_from_file_location("sft_multitask", ROOT / "recipes" / "sft_multitask.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_parser()


def test_trust_remote_code_defaults_off_in_recipe_and_configs():
    _, training_args, _, _ = load_recipe_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "demo" / "config.yaml")])
    assert training_args.trust_remote_code is False
    configs = [p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate_configs" not in p.parts]
    assert len(configs) >= 5
    assert [str(p) for p in configs if (yaml.safe_load(p.read_text()) or {}).get("trust_remote_code")] == []


# A model directory whose config asks for custom code; importing that code leaves a marker file.
EVIL_CODE = """
import os
open(os.environ["EVIL_MARKER"], "w").write("remote code ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil-llm"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""

LOADER = r"""
import json, sys
path, wheres, trust = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "trust"
kwargs = {"trust_remote_code": True} if trust else {}  # the default: nothing said
errors = {}
for where in wheres:
    try:
        if where == "trainer":
            from datasets import Dataset
            from trl import SFTConfig
            from hdpissa_trl import HDPiSSASFTTrainer
            HDPiSSASFTTrainer(model=path, args=SFTConfig(output_dir=sys.argv[4], use_cpu=True, bf16=False,
                                                         report_to=[], **kwargs),
                              train_dataset=Dataset.from_list([{"text": "hello"}] * 2))
        else:
            from evaluation import evaluate_model
            evaluate_model(path, None, ["math=" + sys.argv[5]], limit=1, show_progress=False, **kwargs)
        errors[where] = None
    except Exception as exc:
        errors[where] = f"{type(exc).__name__}: {exc}"
print(json.dumps(errors))
"""


def load_evil(tmp_path: Path, wheres: str, mode: str) -> tuple[dict, Path, str]:
    """Load the custom-code model through each of ``wheres`` (trainer, evaluation) in one fresh interpreter."""
    model = tmp_path / "evil-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil-llm", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (model / "evil.py").write_text(EVIL_CODE)
    build_tokenizer().save_pretrained(model)  # a plain tokenizer: only the model asks for custom code
    (tmp_path / "task.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    marker = tmp_path / f"marker-{mode}"
    env = child_env(EVIL_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(model), wheres, mode, str(tmp_path / "out"),
                           str(tmp_path / "task.jsonl")], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), marker, proc.stdout + proc.stderr


def test_remote_code_runs_only_when_the_user_opts_in(tmp_path):
    """Default arguments: the trainer and the evaluation refuse a model that needs custom code, never run it, and
    never ask on the terminal. The control, `trust_remote_code=True`, shows the same model directory does run its
    code when allowed."""
    errors, marker, output = load_evil(tmp_path, "trainer,evaluation", "default")
    assert not marker.exists(), "custom code ran without trust_remote_code"
    for where, error in errors.items():
        assert error is not None and "pass the argument `trust_remote_code=True`" in error, (where, error)
    assert "Do you wish to run the custom code?" not in output
    _, marker, _ = load_evil(tmp_path, "trainer", "trust")
    assert marker.read_text() == "remote code ran"
