"""Tiny random decoder checkpoints, made in the tests as a user would bring their own."""

from __future__ import annotations

TINY_VOCAB = 384


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few standard-library modules (seconds)."""
    from offramp.build.code_data import stdlib_modules, train_tokenizer

    modules = [
        m for m in stdlib_modules() if m.name in ("textwrap", "json.encoder", "json.decoder", "string")
    ]
    return train_tokenizer((m.text for m in modules), TINY_VOCAB)
