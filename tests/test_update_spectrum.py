"""Tests for ``hdpissa_trl.analysis.update_spectrum`` against checkpoints whose ΔW is known by construction.

The tuned checkpoint is the base plus a rank-3 update on one matrix, a full-rank update with prescribed singular values
on another and nothing elsewhere, so every rank the tool reports has an exact expected value; effective ranks are
checked against a slow float64 numpy reference written out by hand here, independent of the tool's loader and SVD.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hdpissa_trl.analysis.update_spectrum import (
    CSV_HEADER,
    CheckpointError,
    LayerSpectrum,
    compute_update_spectrum,
    effective_rank,
    main,
    module_type,
    numerical_rank,
    plot_spectrum,
    write_effective_rank_csv,
)
from hdpissa_trl.testing_utils import build_tiny_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK3_LAYER = "model.layers.0.self_attn.q_proj.weight"  # 64x64
FULL_LAYER = "model.layers.1.mlp.gate_proj.weight"  # 128x64
RANK3_SV = [0.8, 0.4, 0.2]
FULL_SV = np.linspace(1.0, 0.1, 64)  # condition number 10: far above the 1e-4 rank threshold, so rank = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _with_singular_values(shape: tuple[int, int], sv, seed: int) -> torch.Tensor:
    """U diag(sv) Vᵀ with random orthonormal U, V: a matrix whose spectrum is exactly ``sv`` (up to fp rounding)."""
    g = torch.Generator().manual_seed(seed)
    k = len(sv)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    return (u * torch.as_tensor(sv, dtype=torch.float64)) @ v.T


def _load_dir(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint (single file or shards), via safetensors' numpy loader rather than the tool's."""
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def _slow_effective_rank(sv: np.ndarray) -> float:
    """Reference: exp of the Shannon entropy of σ/Σσ, term by term in float64."""
    total = sum(float(s) for s in sv)
    if total == 0.0:
        return 0.0
    entropy = 0.0
    for s in sv:
        p = float(s) / total
        if p > 0.0:
            entropy -= p * math.log(p)
    return math.exp(entropy)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """(base_dir, tuned_dir): base saved sharded (index.json), tuned as one file, so both layouts are exercised."""
    root = tmp_path_factory.mktemp("spectrum")
    base_dir, tuned_dir = str(root / "tiny-base"), str(root / "tiny-tuned")
    model = build_tiny_model("llama", tokenizer=tokenizer)
    model.save_pretrained(base_dir, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(base_dir, "model.safetensors.index.json"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        p = params[RANK3_LAYER]
        p += _with_singular_values(tuple(p.shape), RANK3_SV, seed=1).to(p.dtype)
        p = params[FULL_LAYER]
        p += _with_singular_values(tuple(p.shape), FULL_SV, seed=2).to(p.dtype)
    model.save_pretrained(tuned_dir)
    assert os.path.isfile(os.path.join(tuned_dir, "model.safetensors"))
    return base_dir, tuned_dir


# -------------------------------------------------------------------------------------------------------- rank maths
@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    assert effective_rank([3.7] * k) == pytest.approx(k, rel=1e-12)
    assert effective_rank(np.array([0.5] * k + [0.0] * 7)) == pytest.approx(k, rel=1e-12)  # zeros add no entropy
    assert effective_rank(torch.full((k,), 2.0, dtype=torch.bfloat16)) == pytest.approx(k, rel=1e-12)


def test_effective_rank_hand_cases():
    # p = (3/4, 1/4): H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank([3.0, 1.0]) == pytest.approx(expected, rel=1e-12)
    assert effective_rank([1.0, 1e-12, 1e-12]) == pytest.approx(1.0, abs=1e-9)  # a noise tail barely counts
    assert effective_rank([]) == 0.0
    assert effective_rank([0.0, 0.0]) == 0.0
    assert effective_rank(torch.zeros(5)) == 0.0


def test_numerical_rank_hand_cases():
    assert numerical_rank([1.0, 0.5, 1e-5]) == 2
    assert numerical_rank([1.0, 2e-4, 1e-5]) == 2
    assert numerical_rank([1.0, 1e-4]) == 1  # strictly above the threshold
    assert numerical_rank([1.0, 1e-3], rel_tol=1e-2) == 1
    assert numerical_rank(torch.tensor([5.0, 5.0, 5.0])) == 3
    assert numerical_rank([0.0, 0.0]) == 0
    assert numerical_rank([]) == 0


def test_module_type_groups_by_name_after_block_index():
    assert module_type("model.layers.11.self_attn.q_proj.weight") == "self_attn.q_proj"
    assert module_type("transformer.h.3.mlp.c_fc.weight") == "mlp.c_fc"
    assert module_type("lm_head.weight") == "lm_head"


# ---------------------------------------------------------------------------------------------- known-update spectra
def test_known_updates_give_exact_ranks(checkpoints):
    base_dir, tuned_dir = checkpoints
    spectra = compute_update_spectrum(base_dir, tuned_dir, progress=False)
    by_name = {s.name: s for s in spectra}

    # 2 blocks x 7 projections; norms (1-D), embeddings and lm_head are not in the default selection.
    assert len(spectra) == 14
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in by_name)
    assert [s.name for s in spectra][:2] == ["model.layers.0.mlp.down_proj.weight",
                                             "model.layers.0.mlp.gate_proj.weight"]

    rank3, full = by_name[RANK3_LAYER], by_name[FULL_LAYER]
    assert rank3.shape == (64, 64) and full.shape == (128, 64)
    assert rank3.numerical_rank == 3
    assert full.numerical_rank == min(full.shape) == 64
    np.testing.assert_allclose(rank3.singular_values[:3].numpy(), RANK3_SV, rtol=1e-4)
    np.testing.assert_allclose(full.singular_values.numpy(), FULL_SV, rtol=1e-4)
    for name, s in by_name.items():
        if name not in (RANK3_LAYER, FULL_LAYER):
            assert s.numerical_rank == 0 and s.effective_rank == 0.0 and s.is_zero, name

    base, tuned = _load_dir(base_dir), _load_dir(tuned_dir)
    for name, s in by_name.items():
        delta = tuned[name].astype(np.float64) - base[name].astype(np.float64)
        ref_sv = np.linalg.svd(delta, compute_uv=False)
        assert s.effective_rank == pytest.approx(_slow_effective_rank(ref_sv), rel=1e-4, abs=1e-9), name
    assert 1.0 < rank3.effective_rank < 3.0  # unequal σ: fewer "effective" directions than the algebraic rank
    assert 50.0 < full.effective_rank < 64.0


def test_selection_options(checkpoints):
    base_dir, tuned_dir = checkpoints
    with_emb = compute_update_spectrum(base_dir, tuned_dir, include_embeddings=True, progress=False)
    names = {s.name for s in with_emb}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= names and len(with_emb) == 16

    q_only = compute_update_spectrum(base_dir, tuned_dir, layers=r"q_proj", progress=False)
    assert [s.name for s in q_only] == [RANK3_LAYER, "model.layers.1.self_attn.q_proj.weight"]

    first3 = compute_update_spectrum(base_dir, tuned_dir, max_layers=3, progress=False)
    assert [s.name for s in first3] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ]

    with pytest.raises(CheckpointError, match="no_such_module"):
        compute_update_spectrum(base_dir, tuned_dir, layers="no_such_module", progress=False)


# ------------------------------------------------------------------------------------------------------------ output
def test_writers_in_process(checkpoints, tmp_path):
    spectra = compute_update_spectrum(*checkpoints, layers="layers\\.0\\.", progress=False)
    csv_path = write_effective_rank_csv(spectra, tmp_path / "er.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER
    assert len(rows) == 1 + 7
    # All-zero input (nothing drawable on a log axis) must still produce a valid image.
    zero = [LayerSpectrum("a.0.w.weight", (4, 6), torch.zeros(4), 0, 0.0)]
    png = plot_spectrum(zero, tmp_path / "zero.png", top_k=None)
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_cli_writes_csv_and_png(checkpoints, tmp_path):
    base_dir, tuned_dir = checkpoints
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hdpissa_trl.analysis.update_spectrum", base_dir, tuned_dir,
         "--output_dir", str(out), "--top_k", "16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "14 matrices, 2 changed" in proc.stdout

    with open(out / "effective_rank.csv", newline="") as f:
        lines = f.read().splitlines()
    assert lines[0] == "layer,shape,numerical_rank,effective_rank"
    rows = {r["layer"]: r for r in csv.DictReader(lines)}
    assert len(rows) == 14
    assert rows[RANK3_LAYER]["shape"] == "64x64" and rows[RANK3_LAYER]["numerical_rank"] == "3"
    assert rows[FULL_LAYER]["shape"] == "128x64" and rows[FULL_LAYER]["numerical_rank"] == "64"
    assert rows["model.layers.1.mlp.down_proj.weight"]["shape"] == "64x128"
    zero_row = rows["model.layers.0.self_attn.k_proj.weight"]
    assert zero_row["numerical_rank"] == "0" and float(zero_row["effective_rank"]) == 0.0
    assert 1.0 < float(rows[RANK3_LAYER]["effective_rank"]) < 3.0

    png = out / "spectrum.png"
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600


# ------------------------------------------------------------------------------------------------------------ errors
def test_missing_dir_and_dir_without_safetensors(checkpoints, tmp_path):
    base_dir, _ = checkpoints
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        compute_update_spectrum(base_dir, missing, progress=False)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"No model\.safetensors.*safe_serialization"):
        compute_update_spectrum(str(pickled), base_dir, progress=False)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        compute_update_spectrum(base_dir, str(adapter), progress=False)


def test_mismatched_shapes_name_the_tensor(checkpoints, tokenizer, tmp_path):
    base_dir, _ = checkpoints
    wider = str(tmp_path / "wider-mlp")
    build_tiny_model("llama", tokenizer=tokenizer, intermediate_size=96).save_pretrained(wider)
    with pytest.raises(CheckpointError) as info:
        compute_update_spectrum(base_dir, wider, progress=False)
    msg = str(info.value)
    assert "Shapes disagree" in msg and "model.layers.0.mlp.down_proj.weight" in msg
    assert "[64, 128]" in msg and "[64, 96]" in msg


def test_mismatched_architectures(checkpoints, tokenizer, tmp_path):
    base_dir, _ = checkpoints
    qwen = str(tmp_path / "qwen")
    build_tiny_model("qwen2", tokenizer=tokenizer).save_pretrained(qwen)
    with pytest.raises(CheckpointError, match="Architectures disagree.*llama.*qwen2"):
        compute_update_spectrum(base_dir, qwen, progress=False)


def test_resized_vocab_is_skipped_unless_embeddings_requested(checkpoints, tokenizer, tmp_path):
    base_dir, _ = checkpoints
    resized = str(tmp_path / "resized")
    model = build_tiny_model("llama", tokenizer=tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 8)
    model.save_pretrained(resized)
    spectra = compute_update_spectrum(base_dir, resized, progress=False)
    assert len(spectra) == 14 and all(s.is_zero for s in spectra)  # same seed: identical blocks
    with pytest.raises(CheckpointError, match=r"(lm_head|model\.embed_tokens)\.weight.*vocabulary resized"):
        compute_update_spectrum(base_dir, resized, include_embeddings=True, progress=False)


def test_cli_error_is_a_message_not_a_traceback(checkpoints, tmp_path, capsys):
    base_dir, _ = checkpoints
    rc = main([base_dir, str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"), "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "update_spectrum: error:" in err and "nope" in err
    assert not (tmp_path / "o").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "hdpissa_trl.analysis.update_spectrum", base_dir, base_dir,
         "--output_dir", str(tmp_path / "o2"), "--layers", "no_such_module"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "no_such_module" in proc.stderr and "Traceback" not in proc.stderr
