"""Crashes and faults in real 2-process runs (`accelerate launch`, gloo on CPU): nothing lost, nothing corrupted.

The faults are injected by ``tests/workers/trainer_worker.py --fault KIND:STEP:RANK`` (see ``install_fault``): SIGKILL of
one rank mid-backward, mid-fold or mid-checkpoint-write, a rank that hangs or exits before the fold, a rank whose W
drifts. Every launch here runs in its own session with a hard deadline, so a hang fails the test instead of blocking.
The bad-input errors are in ``test_reliability_inputs.py``, the Hub token and remote code in
``test_reliability_security.py``; ``docs/reliability.md`` maps each fault to its test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _dist import child_env, free_port
from transformers.trainer_utils import get_last_checkpoint

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.testing_utils import build_tiny_model, save_tiny_model
from hdpissa_trl.trainer.checkpoint import COMPLETE_MARKER, HDPISSA_STATE_NAME, load_hdpissa_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "workers", "trainer_worker.py")
STEPS, SAVE_STEPS = 6, 2


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float
    ended: float  # time.time() when the launch had exited


def launch(nproc: int, *args: str, deadline: float = 240) -> Launch:
    """`accelerate launch` of the trainer worker with ``nproc`` CPU processes, in its own session.

    Past ``deadline`` seconds the whole session (launcher and workers) is SIGKILLed and the test fails: a hang can
    never block the suite.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu"] if nproc > 1 else ["--cpu"]
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, WORKER, *args], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the launch did not finish within {deadline}s (hang):\n{out[-4000:]}")
    return Launch(proc.returncode, out, time.monotonic() - t0, time.time())


def run_ok(*args: str) -> Launch:
    res = launch(2, *args)
    assert res.returncode == 0, res.output[-6000:]
    return res


def records(d: Path) -> list[dict]:
    return [torch.load(d / f"rank{k}.pt", weights_only=False) for k in range(2)]


def losses(rec: dict) -> list[float]:
    return [h["loss"] for h in rec["log_history"] if "loss" in h]


def fault_note(record_dir: Path, rank: int) -> dict:
    path = record_dir / f"fault_rank{rank}.json"
    assert path.exists(), "the fault never fired: the test would prove nothing"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def common(model: str, out: Path, rec: Path) -> list[str]:
    return ["--model", model, "--output_dir", str(out), "--record_dir", str(rec), "--lr", "1e-2",
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_STEPS)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The reference: the same 2-process run (same checkpoints) with no fault."""
    d = tmp_path_factory.mktemp("uninterrupted")
    run_ok(*common(tiny_model_dir, d / "out", d / "rec"))
    return records(d / "rec")


def assert_checkpoints_complete(out: Path) -> None:
    for ckpt in out.glob("checkpoint-*"):
        assert (ckpt / COMPLETE_MARKER).exists() and (ckpt / HDPISSA_STATE_NAME).exists(), ckpt.name


# kind, step, rank, the last complete checkpoint after the kill
KILL_POINTS = {
    "mid_backward": ("backward", 3, 1, 2),
    "mid_fold": ("fold", 5, 0, 4),
    "mid_checkpoint_write": ("checkpoint", 4, 0, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, uninterrupted, tmp_path, point):
    """SIGKILL one rank of a 2-process run; `resume_from_checkpoint=True` continues from the last COMPLETE checkpoint
    and ends with the same W (bit for bit, on both ranks) and the same loss curve as the uninterrupted run."""
    kind, step, rank, last_complete = KILL_POINTS[point]
    out, rec = tmp_path / "out", tmp_path / "rec"
    crashed = launch(2, *common(tiny_model_dir, out, rec), "--fault", f"{kind}:{step}:{rank}")
    assert crashed.returncode != 0
    assert "Signal 9 (SIGKILL)" in crashed.output, crashed.output[-3000:]  # the launcher reports the killed rank
    assert fault_note(rec, rank)["kind"] == kind
    assert not (rec / "rank0.pt").exists()  # the run really ended there

    # The last complete checkpoint is what `get_last_checkpoint` (used by resume_from_checkpoint=True) picks.
    assert get_last_checkpoint(str(out)) == str(out / f"checkpoint-{last_complete}")
    assert_checkpoints_complete(out)
    if kind == "checkpoint":
        # The half-written checkpoint sits in the hidden temp dir, without its marker and HD-PiSSA state.
        half = out / f".tmp-checkpoint-{step}" / f"checkpoint-{step}"
        assert (half / "model.safetensors").exists() and (half / "trainer_state.json").exists()
        assert not (half / COMPLETE_MARKER).exists() and not (out / f"checkpoint-{step}").exists()
        engine = inject_hdpissa(build_tiny_model("llama", num_layers=1), HDPiSSAConfig(r=2), 0, 1,
                                show_progress=False)
        with pytest.raises(ValueError, match=f"checkpoint-{step} is incomplete \\(no {COMPLETE_MARKER}\\)"):
            load_hdpissa_checkpoint(engine, str(half))

    rec2 = tmp_path / "rec2"
    run_ok(*common(tiny_model_dir, out, rec2), "--resume", "last")
    resumed = records(rec2)
    assert losses(resumed[0]) == losses(uninterrupted[0])
    assert len(losses(resumed[0])) == STEPS
    for k in range(2):
        assert resumed[k]["folds"] == STEPS
        for n, w in uninterrupted[k]["W"].items():
            assert torch.equal(resumed[k]["W"][n], w), (k, n)
    # The stale temp dir of the crashed save was removed by the next save; every checkpoint is complete.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_checkpoints_complete(out)


@pytest.mark.slow
def test_drifted_weight_stops_with_layer_and_step(tiny_model_dir, tmp_path):
    """Rank 1's W drifts after step 1; the check at step 2 (sync_check_steps=2) stops both ranks, naming the layer and
    the step, before checkpoint-2 (which would hold the drifted W) is written."""
    out, rec = tmp_path / "out", tmp_path / "rec"
    res = launch(2, *common(tiny_model_dir, out, rec), "--fault", "perturb:1:1")
    assert res.returncode != 0
    assert fault_note(rec, 1)["kind"] == "perturb"
    assert ("WeightMismatchError: HD-PiSSA weight mismatch at step 2: layer 'model.layers.0.self_attn.q_proj' "
            "differs between rank 0 and rank(s) [1]") in res.output
    assert "on_sync_mismatch='resync'" in res.output  # the message says how to continue instead
    assert get_last_checkpoint(str(out)) is None


@pytest.mark.slow
def test_drifted_weight_resync_logs_and_continues(tiny_model_dir, tmp_path):
    out, rec = tmp_path / "out", tmp_path / "rec"
    res = run_ok("--model", tiny_model_dir, "--output_dir", str(out), "--record_dir", str(rec), "--max_steps", "4",
                 "--fault", "perturb:1:1", "--on_sync_mismatch", "resync")
    assert fault_note(rec, 1)["kind"] == "perturb"
    assert ("HD-PiSSA weight mismatch at step 2 on rank 1: re-synced 1 layer(s) from rank 0 (on_sync_mismatch="
            "'resync'): model.layers.0.self_attn.q_proj") in res.output
    r0, r1 = records(rec)
    for n in r0["W"]:
        assert torch.equal(r0["W"][n], r1["W"][n]), n
    logged = {h["step"]: h for h in r0["log_history"] if "loss" in h}
    assert logged[2]["hdpissa/w_check_step"] == 2 and logged[2]["hdpissa/w_check_ok"] == 0.0
    assert logged[4]["hdpissa/w_check_step"] == 4 and logged[4]["hdpissa/w_check_ok"] == 1.0
    assert logged[1]["hdpissa/w_check_ok"] == 1.0


@pytest.mark.slow
def test_hung_rank_stops_the_others_within_ddp_timeout(tiny_model_dir, tmp_path):
    """Rank 1 sleeps before the fold of step 3. Rank 0 waits in the fold's all-gather for `ddp_timeout` seconds (not
    torch's 30-minute gloo default, which transformers leaves in place with use_cpu=True), then fails with a message
    naming the step, the rank and the setting to raise; the launcher then stops rank 1."""
    timeout = 10
    rec = tmp_path / "rec"
    res = launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(rec),
                 "--max_steps", "6", "--fault", "hang:3:1", "--ddp_timeout", str(timeout), deadline=180)
    assert res.returncode != 0
    hung_at = fault_note(rec, 1)["time"]
    assert timeout - 1 <= res.ended - hung_at <= timeout + 45, res.ended - hung_at
    assert ("CollectiveError: HD-PiSSA fold (all-gather of the adapter deltas) at step 3 failed on rank 0 of 2"
            in res.output)
    assert f"Timed out waiting {timeout * 1000}ms" in res.output and "raise `ddp_timeout` (seconds)" in res.output


@pytest.mark.slow
def test_dead_rank_stops_the_launch(tiny_model_dir, tmp_path):
    """Rank 1 exits (code 3) before the fold of step 3: the launcher stops rank 0 at once and names the dead rank."""
    rec = tmp_path / "rec"
    res = launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(rec),
                 "--max_steps", "6", "--fault", "exit:3:1", deadline=180)
    assert res.returncode != 0
    assert res.ended - fault_note(rec, 1)["time"] < 30
    assert "rank      : 1 (local_rank: 1)" in res.output and "exitcode  : 3" in res.output


# -- single process: checkpoint discovery and temp-dir hygiene -----------------------------------------------------

def test_get_last_checkpoint_ignores_temp_and_incomplete_is_refused(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".tmp-checkpoint-4" / "checkpoint-4").mkdir(parents=True)
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    engine = inject_hdpissa(build_tiny_model("llama", num_layers=1), HDPiSSAConfig(r=2), 0, 1, show_progress=False)
    with pytest.raises(ValueError, match="is incomplete .no CHECKPOINT_COMPLETE.: it was interrupted while being "
                                         "written. Resume from an earlier checkpoint."):
        load_hdpissa_checkpoint(engine, str(tmp_path / ".tmp-checkpoint-4" / "checkpoint-4"))


def test_stale_temp_checkpoints_are_removed_on_next_save(tiny_model_dir, tmp_path):
    """Leftovers of crashed saves (this step's or another's) go away at the next save; complete ones stay."""
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    out = tmp_path / "out"
    for stale in (".tmp-checkpoint-2", ".tmp-checkpoint-99"):
        (out / stale / stale[5:]).mkdir(parents=True)
        (out / stale / stale[5:] / "model.safetensors").write_bytes(b"half")
    cfg = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                    report_to=[], max_length=32, logging_steps=1)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(16),
                                hdpissa_config=HDPiSSAConfig(r=2))
    trainer.train()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists()


def test_reliability_doc_points_at_existing_tests():
    """Every `tests/file.py::test_name[param]` named in docs/reliability.md exists, so the table cannot go stale."""
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "reliability.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[(\w+)\])?`", doc)
    assert len(refs) >= 30
    for path, name, param in refs:
        source = (root / path).read_text()
        assert f"def {name}(" in source, f"{path}::{name}"
        assert not param or re.search(rf"\b{param}\b", source), f"{path}::{name}[{param}]"
