"""The served decoder: a Llama- or GPT-2-shaped checkpoint run layer by layer over a slotted KV cache.

The exits read the shared LM head after chosen layers (``head(final_norm(h_l))``). The forward pass is
written here over the checkpoint's tensors (read from ``model.safetensors`` with the names of
transformers' ``LlamaForCausalLM`` or ``GPT2LMHeadModel``), because decoding with exits needs what
``generate`` does not give: a range of layers at a time, per-row positions, and a cache shared by
rows that come and go.

KV-cache layout for a running batch (:class:`KVCache`)::

    keys, values: (L, S, Hkv, C, D)   layers, slots, key/value heads, context positions, head size

- A row owns one slot; the key and value of its token at position p live at ``[:, slot, :, p]``.
  Positions are per row: a row's tokens sit at 0, 1, 2, ... of its own slot, with no padding, and
  its rotary (Llama) or learned (GPT-2) position is its own index. A row therefore decodes exactly as
  it would alone.
- The active rows of a group occupy slots ``[0, B)``, so a forward pass over them reads the cache in
  place, as a view, and never gathers it. A joining row takes slot B (its prompt's keys and values
  are written there by the prefill). A leaving row's slot receives the last active row's slot (one
  row's cache is copied) and B shrinks: the rows are renumbered, nothing else moves.
- A query at position p attends the keys at positions ``[0, p]`` of its row. Everything past a row's
  length (stale values of a previous occupant, drafts that were rejected) is masked.

Batch invariance, which makes ``self_speculative`` decoding token-identical to ``full``: a row's
numbers are bitwise the same whatever its batch-mates, its slot, and however many of its tokens are
processed together (one step of ``full``, a verify pass of several):

- attention always runs over all C positions of the row under the mask, so its reductions have one
  length and one order whatever the batch (SDPA; masked positions contribute exact zeros);
- MKL's sgemm chooses its kernel by matrix shape, and the product of a row then depends on the
  number of rows (measured here: one row, 2-10 rows and 11 or more rows gave three different roundings);
  MKL's conditional-numerical-reproducibility STRICT mode removes that dependence (measured: every
  row count from 1 to 600 bitwise equal). :func:`reproducible_gemm` sets the mode, which MKL fixes at
  the process' first matrix product; the tests and the Triton adapter call it first. Not every CPU
  gets there: on a 2-core AVX2 machine (2026-12-02) a one-row product still rounded differently from
  a 24-row one in STRICT mode, so a verify pass can differ from single steps in the last bits there
  and the identity with ``full`` is no longer guaranteed (the bitwise test skips, saying so);
- elementwise kernels (norms, activations, rotary) are vectorised over a contiguous last axis whose
  length is a multiple of 16 (the model's widths are multiples of 64), so no element falls in a
  scalar tail loop whose rounding could differ.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DECODER_MANIFEST = "decoder.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FAMILIES = ("llama", "gpt2")

# What a decoder's numbers depend on beyond its weights, bumped when the forward pass rounds differently:
# a policy certified on the old numbers (its thresholds, its recorded acceptance) is calibrated again.
# 2: input-major products (``LayerWeights``).
NUMERICS_VERSION = 2

_MKL_CBWR_STRICT = 0x10000
_MKL_CBWR_ERR_MODE_CHANGE = -8


def reproducible_gemm() -> None:
    """Put MKL's sgemm in conditional-numerical-reproducibility STRICT mode on this machine's own code
    branch, so that a row's product does not depend on how many rows are multiplied with it.

    MKL fixes the mode at the process' first matrix product; afterwards this only checks that the
    mode is already STRICT (``MKL_CBWR=AUTO,STRICT`` in the environment does the same from the start).

    Raises:
        RuntimeError: a product already ran in another mode, or MKL refused the mode.
    """
    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    get, auto, set_mode = (
        library.mkl_serv_cbwr_get,
        library.mkl_serv_cbwr_get_auto_branch,
        library.mkl_serv_cbwr_set,
    )
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    auto.argtypes, auto.restype = [], ctypes.c_int
    set_mode.argtypes, set_mode.restype = [ctypes.c_int], ctypes.c_int
    if get(-1) & _MKL_CBWR_STRICT:
        return
    status = set_mode(auto() | _MKL_CBWR_STRICT)
    if status == _MKL_CBWR_ERR_MODE_CHANGE:
        raise RuntimeError(
            "MKL already ran a matrix product in its default mode, which rounds a row differently by row "
            "count: call reproducible_gemm() before any, or start the process with MKL_CBWR=AUTO,STRICT"
        )
    if status != 0:
        raise RuntimeError(f"MKL refused the STRICT reproducibility mode (status {status})")


# --- The model ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of a served decoder, from its ``config.json`` and the manifest's exits."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    exit_layers: tuple[int, ...]  # the last is ``layers``
    norm_eps: float
    rope_theta: float  # Llama only

    @property
    def last_exit(self) -> int:
        """The index of the last exit (full depth) among ``exit_layers``, as a token's exit records it."""
        return len(self.exit_layers) - 1

    @classmethod
    def from_config(
        cls, config: dict, exit_layers: tuple[int, ...], context: int | None = None
    ) -> DecoderSpec:
        family = config.get("model_type")
        if family == "llama":
            rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ValueError(f"rope type {kind!r} is not supported (only the default rotary embedding)")
            heads = config["num_attention_heads"]
            spec = cls(
                family,
                config["num_hidden_layers"],
                config["hidden_size"],
                heads,
                config.get("num_key_value_heads") or heads,
                config.get("head_dim") or config["hidden_size"] // heads,
                config["vocab_size"],
                context or config["max_position_embeddings"],
                tuple(exit_layers),
                config.get("rms_norm_eps", 1e-6),
                rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            )
            if config.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (Llama: silu)")
        elif family == "gpt2":
            heads = config["n_head"]
            spec = cls(
                family, config["n_layer"], config["n_embd"], heads, heads, config["n_embd"] // heads,
                config["vocab_size"], context or config["n_positions"], tuple(exit_layers),
                config.get("layer_norm_epsilon", 1e-5), 0.0,
            )  # fmt: skip
            if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(
                    f"activation {config['activation_function']!r} is not supported (GPT-2: gelu_new)"
                )
            if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
                raise ValueError(
                    "GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are "
                    "not supported"
                )
        else:
            raise ValueError(f"model_type {family!r} is not one of {FAMILIES}")
        if not spec.exit_layers or spec.exit_layers[-1] != spec.layers or spec.exit_layers[0] < 1:
            raise ValueError(
                f"exit layers {spec.exit_layers} must lie in 1..{spec.layers} and end with {spec.layers}"
            )
        return spec


@dataclass(frozen=True)
class LayerWeights:
    """One block, both families in one form: Llama has RMS norms (no biases) and a gated MLP (gate and
    up stacked in ``up``); GPT-2 has layer norms with biases and a GELU MLP. q, k, v are stacked.

    The matrices are stored input-major, (in, out), and applied as ``x @ W + b`` (:func:`project`):
    MKL multiplies a few rows by an input-major matrix 1.7-2.5 times faster than by an output-major one
    (``F.linear``'s layout), measured on this machine's AMD EPYC with one thread, (1-8, 256) by
    (256, 1536): 59 against 145 us for one row, 221 against 325 us for eight. Decoding multiplies one
    to a few rows per pass, so that is most of a step: the code model's full step took 3.76 against
    5.06 ms at one row and 8.96 against 10.38 ms at eight (CPU time, the least of 25 rounds).
    """

    norm1: torch.Tensor
    norm1_bias: torch.Tensor | None
    qkv: torch.Tensor  # (H, (Hq + 2 Hkv) D)
    qkv_bias: torch.Tensor | None
    out: torch.Tensor  # (Hq D, H)
    out_bias: torch.Tensor | None
    norm2: torch.Tensor
    norm2_bias: torch.Tensor | None
    up: torch.Tensor  # (H, 2 I) gated, (H, I) otherwise
    up_bias: torch.Tensor | None
    down: torch.Tensor  # (I, H)
    down_bias: torch.Tensor | None


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) @ (in, out) input-major ``weight`` (+ ``bias``) -> (..., out)."""
    product = x @ weight
    return product if bias is None else product + bias


def _llama_layers(tensors: dict[str, torch.Tensor], spec: DecoderSpec) -> list[LayerWeights]:
    def get(name: str) -> torch.Tensor | None:
        return tensors.get(name)

    def input_major(prefix: str, *names: str) -> torch.Tensor:  # transformers' (out, in), stacked: (in, out)
        return torch.cat([tensors[prefix + name] for name in names]).T.contiguous()

    layers = []
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        biases = [get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
        mlp_biases = [get(p + f"mlp.{n}_proj.bias") for n in ("gate", "up")]
        layers.append(LayerWeights(
            norm1=tensors[p + "input_layernorm.weight"], norm1_bias=None,
            qkv=input_major(p, *(f"self_attn.{n}_proj.weight" for n in "qkv")),
            qkv_bias=torch.cat(biases) if biases[0] is not None else None,
            out=input_major(p, "self_attn.o_proj.weight"), out_bias=get(p + "self_attn.o_proj.bias"),
            norm2=tensors[p + "post_attention_layernorm.weight"], norm2_bias=None,
            up=input_major(p, "mlp.gate_proj.weight", "mlp.up_proj.weight"),
            up_bias=torch.cat(mlp_biases) if mlp_biases[0] is not None else None,
            down=input_major(p, "mlp.down_proj.weight"), down_bias=get(p + "mlp.down_proj.bias"),
        ))  # fmt: skip
    return layers


def _gpt2_layers(tensors: dict[str, torch.Tensor], spec: DecoderSpec) -> list[LayerWeights]:
    # GPT-2's Conv1D stores (in, out) and computes x @ W + b, the layout used here.
    layers = []
    for i in range(spec.layers):
        p = f"transformer.h.{i}."
        layers.append(LayerWeights(
            norm1=tensors[p + "ln_1.weight"], norm1_bias=tensors[p + "ln_1.bias"],
            qkv=tensors[p + "attn.c_attn.weight"], qkv_bias=tensors[p + "attn.c_attn.bias"],
            out=tensors[p + "attn.c_proj.weight"], out_bias=tensors[p + "attn.c_proj.bias"],
            norm2=tensors[p + "ln_2.weight"], norm2_bias=tensors[p + "ln_2.bias"],
            up=tensors[p + "mlp.c_fc.weight"], up_bias=tensors[p + "mlp.c_fc.bias"],
            down=tensors[p + "mlp.c_proj.weight"], down_bias=tensors[p + "mlp.c_proj.bias"],
        ))  # fmt: skip
    return layers


class KVCache:
    """Keys and values of a group's rows, ``(L, S, Hkv, C, D)`` (see the module docstring)."""

    def __init__(self, spec: DecoderSpec, slots: int) -> None:
        shape = (spec.layers, slots, spec.kv_heads, spec.context, spec.head_dim)
        self.spec = spec
        self.keys = torch.zeros(shape)
        self.values = torch.zeros(shape)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def ensure(self, slots: int) -> None:
        """Room for at least ``slots`` rows (doubling; the rows keep their slots)."""
        if slots <= self.slots:
            return
        grown = max(slots, 2 * self.slots)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros((old.shape[0], grown, *old.shape[2:]))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def move(self, source: int, target: int) -> None:
        """Slot ``source``'s keys and values into slot ``target`` (a leaving row's slot)."""
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]

    def write(self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (n, q, Hkv, D) at ``index`` (a :class:`Placement`'s ``cache_index``)."""
        d = self.spec.head_dim
        self.keys[layer].view(-1, d).index_copy_(0, index, keys.reshape(-1, d))
        self.values[layer].view(-1, d).index_copy_(0, index, values.reshape(-1, d))


@dataclass(frozen=True)
class Placement:
    """Where the tokens of one forward pass go, and what every layer derives from that (once per pass):
    rows in slots ``[first_slot, first_slot + n)``, their tokens at (n, q) ``positions``."""

    first_slot: int
    positions: torch.Tensor  # (n, q)
    visible: torch.Tensor  # (n, 1, q, C) bool: key position <= query position
    cache_index: torch.Tensor  # (n q Hkv,) rows of a layer's cache viewed as (S Hkv C, D)
    cos: torch.Tensor | None  # (n, q, 1, D), Llama's rotary embedding
    sin: torch.Tensor | None

    @property
    def rows(self) -> int:
        return self.positions.shape[0]


class ExitDecoder:
    """The forward pass in pieces: embed, a range of layers, an exit's logits.

    Tensors: n rows, q tokens per row, H hidden. A pass works on the rows and positions of a
    :class:`Placement` (``place``) in a :class:`KVCache`. No gradient is ever needed: run it under
    ``torch.inference_mode``.
    """

    def __init__(self, spec: DecoderSpec, tensors: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        if spec.family == "llama":
            self.embedding = tensors["model.embed_tokens.weight"]
            self.positions_table = None
            self.final_norm, self.final_norm_bias = tensors["model.norm.weight"], None
            head = tensors.get("lm_head.weight", self.embedding)
            self.blocks = _llama_layers(tensors, spec)
            inverse = 1.0 / spec.rope_theta ** (
                torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim
            )
            angles = torch.outer(torch.arange(spec.context, dtype=torch.float32), inverse)  # (C, D/2)
            angles = torch.cat([angles, angles], dim=-1)  # (C, D)
            self.cos, self.sin = angles.cos(), angles.sin()
        else:
            self.embedding = tensors["transformer.wte.weight"]
            self.positions_table = tensors["transformer.wpe.weight"]
            self.final_norm, self.final_norm_bias = (
                tensors["transformer.ln_f.weight"],
                tensors["transformer.ln_f.bias"],
            )
            head = tensors.get("lm_head.weight", self.embedding)
            self.blocks = _gpt2_layers(tensors, spec)
        self.head = head.T.contiguous()  # (H, V) input-major (``LayerWeights``); a tied head is copied
        self.q_width = spec.heads * spec.head_dim
        self.kv_width = spec.kv_heads * spec.head_dim
        folded = [self._folded_keys_values(block) for block in self.blocks]
        # For each first layer, all later layers' folded key and value projections side by side (one product).
        self.stacked_keys_values = [
            (torch.cat([w for w, _ in folded[first:]], dim=1),
             None if folded[0][1] is None else torch.cat([b for _, b in folded[first:]]))
            for first in range(spec.layers)
        ]  # fmt: skip

    @classmethod
    def load(cls, directory: Path, exit_layers: tuple[int, ...] | None = None) -> ExitDecoder:
        """From an artifacts folder: ``config.json``, ``model.safetensors`` and ``decoder.json``."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        manifest = json.loads((directory / DECODER_MANIFEST).read_text())
        spec = DecoderSpec.from_config(
            config, tuple(exit_layers or manifest["exit_layers"]), manifest.get("context")
        )
        return cls(spec, load_file(str(directory / MODEL_FILE)))

    # --- pieces ---

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.spec.family == "llama":
            return F.rms_norm(x, (x.shape[-1],), weight, self.spec.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.spec.norm_eps)

    def place(self, first_slot: int, positions: torch.Tensor) -> Placement:
        """The :class:`Placement` of rows in slots ``first_slot + i`` with tokens at (n, q) ``positions``."""
        spec = self.spec
        n, q = positions.shape
        slots = torch.arange(first_slot, first_slot + n).view(n, 1, 1)
        heads = torch.arange(spec.kv_heads).view(1, 1, -1)
        index = ((slots * spec.kv_heads + heads) * spec.context + positions.view(n, q, 1)).reshape(-1)
        visible = torch.arange(spec.context).view(1, 1, 1, -1) <= positions.view(n, 1, q, 1)
        rotary = (
            (self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2))
            if spec.family == "llama"
            else (None, None)
        )
        return Placement(first_slot, positions, visible, index, *rotary)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, q) token ids at (n, q) positions -> (n, q, H)."""
        hidden = F.embedding(tokens, self.embedding)
        if self.positions_table is not None:
            hidden = hidden + F.embedding(positions, self.positions_table)
        return hidden

    def head_of(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """The shared head restricted to ``tokens``, for ``exit_logits``: their logits, in that order."""
        return self.head[:, tokens].contiguous()

    def exit_logits(self, hidden: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) hidden states after some layer -> (..., V) logits of the shared head (or of ``head``,
        a ``head_of`` some tokens)."""
        return project(
            self._norm(hidden, self.final_norm, self.final_norm_bias), self.head if head is None else head
        )

    def _queries_keys_values(self, block: LayerWeights, normed: torch.Tensor, placement: Placement):
        """(n, q, H) normed input -> queries (n, q, Hq, D), keys and values (n, q, Hkv, D); rotary
        embedding (Llama's rotate-half form) on queries and keys at once (they lie side by side)."""
        spec = self.spec
        qkv = project(normed, block.qkv, block.qkv_bias)
        width = self.q_width + self.kv_width
        heads = qkv[..., :width].unflatten(-1, (spec.heads + spec.kv_heads, spec.head_dim))
        if placement.cos is not None:
            half = spec.head_dim // 2
            heads = (
                heads * placement.cos
                + torch.cat([-heads[..., half:], heads[..., :half]], dim=-1) * placement.sin
            )
        values = qkv[..., width:].unflatten(-1, (spec.kv_heads, spec.head_dim))
        return heads[:, :, : spec.heads], heads[:, :, spec.heads :], values

    def _attend(
        self, layer: int, queries: torch.Tensor, cache: KVCache, placement: Placement
    ) -> torch.Tensor:
        """(n, q, Hq, D) queries over all C positions of their rows' cache, keys up to each query's
        position -> (n, q, Hq D)."""
        n, q = placement.positions.shape
        rows = slice(placement.first_slot, placement.first_slot + n)
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            cache.keys[layer, rows],
            cache.values[layer, rows],
            attn_mask=placement.visible,
            enable_gqa=self.spec.kv_heads != self.spec.heads,
        )  # (n, Hq, q, D); the cache slices are views
        return out.transpose(1, 2).reshape(n, q, self.q_width)

    def _mlp(self, block: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        up = project(self._norm(x, block.norm2, block.norm2_bias), block.up, block.up_bias)
        if self.spec.family == "llama":
            gate, up = up.chunk(2, dim=-1)
            inner = F.silu(gate) * up
        else:
            inner = F.gelu(up, approximate="tanh")
        return project(inner, block.down, block.down_bias)

    def _folded_keys_values(self, block: LayerWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's key and value projection of the *unscaled* normalised input: the norm's scale (and
        shift) folded into the weight (and bias), so that every layer's keys and values of one hidden
        state come from one product (``fill_keys_values``)."""
        weight = block.qkv[:, self.q_width :]  # (H, 2 Hkv D)
        bias = None if block.qkv_bias is None else block.qkv_bias[self.q_width :]
        folded = weight * block.norm1.unsqueeze(1)  # scale each input's row
        if block.norm1_bias is not None:
            shift = block.norm1_bias @ weight
            bias = shift if bias is None else bias + shift
        return folded, bias

    def fill_keys_values(
        self, first: int, hidden: torch.Tensor, cache: KVCache, placement: Placement
    ) -> None:
        """Keys and values of layers ``[first, L)`` for (n, q, H) ``hidden`` taken as every one of those
        layers' input (CALM's propagation for rows that left at an exit), in one product."""
        spec = self.spec
        layers = spec.layers - first
        if self.spec.family == "llama":
            unit = F.rms_norm(hidden, (spec.hidden,), None, spec.norm_eps)
        else:
            unit = F.layer_norm(hidden, (spec.hidden,), None, None, spec.norm_eps)
        kv = project(unit, *self.stacked_keys_values[first])  # (n, q, layers 2 Hkv D)
        n, q = placement.positions.shape
        kv = kv.view(n, q, layers, 2, spec.kv_heads, spec.head_dim)
        keys, values = kv[:, :, :, 0], kv[:, :, :, 1]  # (n, q, layers, Hkv, D)
        if placement.cos is not None:
            half = spec.head_dim // 2
            cos, sin = placement.cos.unsqueeze(2), placement.sin.unsqueeze(2)  # (n, q, 1, 1, D)
            keys = keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin
        for offset in range(layers):
            cache.write(first + offset, placement.cache_index, keys[:, :, offset], values[:, :, offset])

    def layer(
        self,
        index: int,
        hidden: torch.Tensor,
        cache: KVCache,
        placement: Placement,
        moving: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer ``index`` on (n, q, H) ``hidden`` of the rows and positions of ``placement``.

        Every row's key and value are computed and stored. ``moving`` (indices into the n rows)
        restricts the rest of the layer to those rows; the others keep their hidden state (rows that
        left at an exit: their keys and values for the layers they skip come from their exit state,
        CALM's propagation). An empty ``moving`` stores keys and values only. Returns the new hidden.
        """
        block = self.blocks[index]
        queries, keys, values = self._queries_keys_values(
            block, self._norm(hidden, block.norm1, block.norm1_bias), placement
        )
        cache.write(index, placement.cache_index, keys, values)
        if moving is not None and moving.numel() == 0:
            return hidden
        attended = self._attend(index, queries, cache, placement)
        if moving is None:
            hidden = hidden + project(attended, block.out, block.out_bias)
            return hidden + self._mlp(block, hidden)
        moved = hidden[moving] + project(attended[moving], block.out, block.out_bias)
        moved = moved + self._mlp(block, moved)
        hidden = hidden.clone()
        hidden[moving] = moved
        return hidden

    def layers(
        self, first: int, stop: int, hidden: torch.Tensor, cache: KVCache, placement: Placement
    ) -> torch.Tensor:
        """Layers ``[first, stop)`` on every row."""
        for index in range(first, stop):
            hidden = self.layer(index, hidden, cache, placement)
        return hidden

    @property
    def work(self) -> TokenWork:
        block = self.blocks[0]
        return TokenWork(
            self.spec.layers,
            block.qkv.numel(),
            block.out.numel() + block.up.numel() + block.down.numel(),
            2 * self.kv_width * self.spec.hidden,
            self.spec.hidden,
            self.head.shape[1],
        )


@dataclass(frozen=True)
class TokenWork:
    """Multiply-accumulates of one token through each part of a pass, to count what a decoding mode
    does against what ``full`` does. Attention over the cache is left out: at a context of a few hundred
    tokens it is a small share, and every mode attends once per token and layer it runs."""

    layers: int
    projections: int  # a layer's query, key and value products
    rest_of_layer: int  # its output and MLP products
    keys_values: int  # its key and value products alone
    head_per_entry: int  # the head's work per vocabulary entry scored (the hidden width)
    vocabulary: int

    @property
    def full_token(self) -> int:
        """One token through every layer and the whole head: what ``full`` spends."""
        return self.layers * (self.projections + self.rest_of_layer) + self.head_per_entry * self.vocabulary


def softmax_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits -> (max probability (...), argmax (...)); the lowest index wins a tie."""
    tokens = logits.argmax(dim=-1)
    top = logits.gather(-1, tokens.unsqueeze(-1))
    return 1.0 / torch.exp(logits - top).sum(dim=-1), tokens
