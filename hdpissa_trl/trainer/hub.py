"""The Hub, seen from the trainers: the token never lands in a file (it rides in the upload client, not in the pickled
training arguments), and which names are Hub model ids rather than local paths."""

from __future__ import annotations

import contextlib
import copy
import os


@contextlib.contextmanager
def hub_token_outside_args(trainer):
    """While the body runs ``trainer.args.hub_token`` is None (pickling the arguments into ``training_args.bin``
    cannot write it) and transformers' Hub client (``transformers.trainer.hf_api``) carries the token instead.

    Without that client the token is simply held back (fails closed: a push then needs ``HF_TOKEN`` or a stored login).
    """
    import transformers.trainer as hf_trainer

    token = getattr(trainer.args, "hub_token", None)
    factory = getattr(hf_trainer, "hf_api", None)
    if token is None:
        yield
        return
    if factory is not None and getattr(trainer, "_hub_api_with_token", None) is None:
        trainer._hub_api_with_token = copy.copy(factory())
        trainer._hub_api_with_token.token = token
    trainer.args.hub_token = None
    if factory is not None:
        hf_trainer.hf_api = lambda: trainer._hub_api_with_token
    try:
        yield
    finally:
        trainer.args.hub_token = token
        if factory is not None:
            hf_trainer.hf_api = factory


def looks_like_hub_id(name: str | None, namespaced: bool = False) -> bool:
    """Whether ``name`` reads as a Hub model id rather than a local path: a valid repo id, not an existing or absolute
    path, at most one ``/``. ``namespaced``: only ``owner/name`` counts (what a card's ``base_model`` links to);
    otherwise a bare canonical id such as ``gpt2`` counts too (what ``from_pretrained`` would fetch)."""
    if not name or os.path.exists(name) or name.startswith((".", "/")) or os.path.isabs(name):
        return False
    if name.count("/") > 1 or (namespaced and name.count("/") != 1):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
