"""``trainer.push_to_hub()`` end to end: the real ``huggingface_hub`` client over real HTTP, against a local server
answering the Hub calls a push and a download make (``tests/mini_hub.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _dist import child_env
from mini_hub import run_mini_hub

from hdpissa_trl.testing_utils import save_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "push_worker.py")


def run(hub, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = hub.client_env(tmp_path / "hf_home", child_env())  # the token only in the worker's arguments
    return subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_push_merged_model_and_download_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(tmp_path / "base", "llama")
    out = tmp_path / "out"
    with run_mini_hub(token="hf_test_secret_token_123") as hub:
        proc = run(hub, tmp_path, "--mode", "push", "--model", model, "--output_dir", str(out), "--repo",
                   "test-user/hd-demo", "--token", hub.token)
        assert proc.returncode == 0, proc.stderr[-5000:]
        files = hub.repo_files("test-user/hd-demo")
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
        # Never the adapter internals, a checkpoint or the token.
        assert not any("hdpissa_state" in f or "optimizer" in f or f.startswith("checkpoint-") for f in files)
        for data in files.values():
            assert b"hf_test_secret_token_123" not in data
        assert "hf_test_secret_token_123" not in proc.stdout + proc.stderr
        card = files["README.md"].decode()
        assert "hd-pissa" in card and "HD-PiSSA" in card
        assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
        dl = tmp_path / "downloaded"
        proc = run(hub, tmp_path, "--mode", "download", "--repo", "test-user/hd-demo", "--output_dir", str(dl))
        assert proc.returncode == 0, proc.stderr[-5000:]
        hub.check()  # the client used no call the server does not answer
    local = AutoModelForCausalLM.from_pretrained(out)
    remote = AutoModelForCausalLM.from_pretrained(dl)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(local(ids).logits, remote(ids).logits)
    base = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, remote(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["down", "unauthorized", "server_error"])
def test_push_failure_is_clear_and_keeps_local_output(tmp_path, fault):
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(tmp_path / "base", "llama")
    out = tmp_path / "out"
    with run_mini_hub(token="hf_right_token") as hub:
        token = "hf_wrong_token" if fault == "unauthorized" else hub.token
        hub.fail_commits = fault == "server_error"
        if fault == "down":
            hub.stop()
        proc = run(hub, tmp_path, "--mode", "push", "--model", model, "--output_dir", str(out), "--repo",
                   "test-user/x", "--token", token)
    assert proc.returncode != 0
    tail = proc.stderr[-3000:]
    assert {"down": "Connect", "unauthorized": "401", "server_error": "500"}[fault] in tail, tail
    if (out / "model.safetensors").exists():  # failures after training leave the local model intact and loadable
        AutoModelForCausalLM.from_pretrained(out)
