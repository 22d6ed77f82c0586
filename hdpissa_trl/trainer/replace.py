"""Replacing a checkpoint directory so that a crash at any moment leaves a complete copy under a known name.

A directory cannot be renamed over a non-empty one, so replacing ``checkpoint-N`` takes two renames: the old one
aside to ``.old-checkpoint-N``, then the new one into place; the old one is deleted only after. A crash between the
two leaves the old copy aside, and :func:`restore_replaced` (run before every resume and every save) puts it back.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# A file one machine wrote can take a few seconds to show on another machine's view of shared storage (NFS caches
# directory entries): the checks that every rank sees a checkpoint's files retry this long before they give up.
FILES_VISIBLE_WAIT_S = 30.0


def backup_path(final: str) -> str:
    """Where :func:`replace_directory` keeps the directory it replaces until the new one is in place."""
    parent, name = os.path.split(os.path.abspath(os.fspath(final)))
    return os.path.join(parent, f".old-{name}")


def replace_directory(src: str, final: str) -> None:
    """Rename the complete directory ``src`` to ``final``; an existing ``final`` is first renamed to its
    :func:`backup_path` and deleted only once ``src`` is in place. A crash between the two renames leaves the old
    directory under ``.old-NAME``, which :func:`restore_replaced` puts back: never no copy at all."""
    backup = backup_path(final)
    if os.path.exists(final):
        shutil.rmtree(backup, ignore_errors=True)  # an earlier replace that crashed after its second rename
        os.replace(final, backup)
    os.replace(src, final)
    shutil.rmtree(backup, ignore_errors=True)


def restore_replaced(final: str) -> None:
    """Undo what a crash inside :func:`replace_directory` left: the backup goes back to ``final`` when ``final`` is
    missing, and is deleted when ``final`` (the new copy) is in place. Safe to call from several ranks at once."""
    backup = backup_path(final)
    if not os.path.isdir(backup):
        return
    if os.path.exists(final):
        shutil.rmtree(backup, ignore_errors=True)
        return
    try:
        os.replace(backup, final)
    except FileNotFoundError:  # another rank put it back first
        pass


def restore_replaced_checkpoints(run_dir: str) -> None:
    """:func:`restore_replaced` for every ``.old-checkpoint-*`` of ``run_dir``."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if entry.startswith(f".old-{PREFIX_CHECKPOINT_DIR}-"):
            restore_replaced(os.path.join(run_dir, entry[len(".old-"):]))


def wait_until_everyone_sees(missing: Callable[[], list[str]], blind_ranks: Callable[[bool], list[int]],
                             wait_s: float = FILES_VISIBLE_WAIT_S, interval_s: float = 3.0) -> tuple[list[int], list[str]]:
    """Collective: ``missing()`` lists what this rank cannot see yet; ``blind_ranks(flag)`` gathers every rank's flag
    and returns the ranks that miss something. Retried in rounds every rank takes together (nobody waits long inside a
    collective) until no rank misses anything or ``wait_s`` has passed. Returns the blind ranks and this rank's misses
    of the last round (empty lists: everyone sees everything)."""
    for attempt in range(max(1, int(wait_s // interval_s) + 1)):
        if attempt:
            time.sleep(interval_s)
        mine = missing()
        blind = blind_ranks(bool(mine))
        if not blind:
            return [], []
    return blind, mine
