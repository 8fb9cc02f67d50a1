"""Raw text in the orchestrator: the model's own tokenizer, run per request.

The repository writer copies the build's ``tokenizer.json`` (already set to truncate at the model's
maximum length and to pad to the longest row) beside the orchestrator. Only the ``tokenizers``
library is needed in the stub, not ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_INPUT = "TEXT"
TOKENIZER_FILE = "tokenizer.json"


class TextError(ValueError):
    """Text that cannot be served; the message names the row."""


@dataclass(frozen=True)
class TextSpec:
    tokenizer_dir: str  # relative to the orchestrator's version folder
    max_length: int
    truncate: bool = True  # False: a row longer than max_length is an error instead


class TextEncoder:
    def __init__(self, directory: Path, spec: TextSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(Path(directory) / spec.tokenizer_dir / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(spec.max_length)
        padding = self.tokenizer.padding or {}
        pad_token = padding.get("pad_token", "[PAD]")
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad_token), pad_token=pad_token)

    def encode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 (n, T), T the longest row; ``rows`` (n,) of bytes or str."""
        texts = []
        for index, value in enumerate(rows.reshape(-1).tolist()):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise TextError(
                        f"TEXT row {index} is not valid UTF-8 ({error.reason} at byte {error.start})"
                    ) from None
            if not isinstance(value, str):
                raise TextError(f"TEXT row {index} must be bytes or a string, not {type(value).__name__}")
            texts.append(value)
        encodings = self.tokenizer.encode_batch(texts)
        if not self.spec.truncate:
            too_long = [i for i, e in enumerate(encodings) if e.overflowing]
            if too_long:
                raise TextError(
                    f"TEXT rows {too_long[:5]} exceed {self.spec.max_length} tokens (truncation is off)"
                )
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        return ids, mask
