#!/usr/bin/env bash
# Put TRL's own DPO and GRPO test modules (unmodified) under upstream/tests/, from a git clone of huggingface/trl that
# holds the commit of the shared runner's SFT copy, beside that copy's test helpers. Not committed: it is TRL's code.
#   fetch_upstream.sh TRL_GIT_DIR        (a clone's work tree, or a bare / mirror git directory)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${PEER_TRL_SHARED:-$HERE/../../../shared/peer_trl}"
COMMIT=f2cd57710ae345ea6428ae95363267fcf38a3dc8   # the commit of the shared upstream copy (its ORIGIN.md)
if [[ $# -ne 1 ]]; then echo "usage: $0 TRL_GIT_DIR"; exit 2; fi
GITDIR="$1"; [[ -d $1/.git ]] && GITDIR="$1/.git"
git --git-dir "$GITDIR" cat-file -e "$COMMIT^{commit}" 2>/dev/null || {
  echo "$1 does not hold TRL commit $COMMIT (git fetch it there first)"; exit 2; }
for f in __init__.py conftest.py testing_utils.py testing_constants.py data/template.jinja; do
  [[ -f $SHARED/upstream/tests/$f ]] || { echo "the shared runner is not at $SHARED (set PEER_TRL_SHARED)"; exit 2; }
done
mkdir -p "$HERE/upstream/tests/data"
for f in test_dpo_trainer.py test_grpo_trainer.py; do
  git --git-dir "$GITDIR" show "$COMMIT:tests/$f" > "$HERE/upstream/tests/$f"
done
for f in __init__.py conftest.py testing_utils.py testing_constants.py data/template.jinja; do
  cp "$SHARED/upstream/tests/$f" "$HERE/upstream/tests/$f"
done
printf 'TRL commit %s: tests/test_dpo_trainer.py and tests/test_grpo_trainer.py copied unmodified by fetch_upstream.sh;\nthe helpers beside them are the shared runner'"'"'s copies from the same commit.\n' "$COMMIT" > "$HERE/upstream/ORIGIN.md"
echo "upstream/tests ready: test_dpo_trainer.py, test_grpo_trainer.py (TRL $COMMIT)"
