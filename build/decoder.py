"""A decoder LM with exits: the code model's recipe, its training, and the serving artifacts.

The model is a transformers ``LlamaForCausalLM`` built from a small config. Its exits read the
shared LM head after chosen layers: ``lm_head(norm(h_l))`` with the model's own final norm, as
LayerSkip and transformers' ``assistant_early_exit`` do, so an exit adds no weights. Training makes
those early readouts good the way LayerSkip does (Elhoushi et al. 2024, arXiv:2404.16710):

- early-exit loss: the loss is the cross-entropy at every exit, weighted by the exit's depth
  (``l / L``; the last exit weighs 1), normalised by the weights' sum; the early exits' terms are
  computed on a seeded quarter of the positions each step (the shared head costs as much as a
  layer at this size; LayerSkip's curricula likewise compute some exits' losses each step);
- layer dropout: each layer is skipped for a whole sequence with a probability rising linearly with
  depth, from 0 at the first layer to ``layer_dropout`` at the last.
- self-distillation (beyond LayerSkip): each early exit's term is ``(1 - w) CE + w T^2 KL`` towards the
  last exit's distribution at the same positions (detached; ``offramp.build.train.distillation_kl``).
  Self-speculative decoding accepts a draft when it is the last exit's token, so agreement with the
  last exit, not the true next token, is what a draft exit is for.

Data is the standard library's train modules (``offramp.build.code_data``) as one token stream, read
in windows of ``context`` tokens at seeded random offsets. The build is cached under its key (every
setting, the corpus fingerprint and ``RECIPE_VERSION``); training saves a resumable state every
``checkpoint_every`` steps.

Artifacts (a folder; ``DecoderArtifacts`` is its manifest ``decoder.json``): the Hugging Face
checkpoint (``config.json``, ``model.safetensors``), ``tokenizer.json``, and the manifest (family,
exit layers, context length, end-of-text id, fingerprint, build record). A user's own checkpoint
folder, Llama-shaped or GPT-2-shaped, becomes the same artifacts through :func:`import_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.backend.exit_decoder import DECODER_MANIFEST, FAMILIES, MODEL_FILE, TOKENIZER_FILE
from offramp.build.build_cache import build_key
from offramp.build.code_data import (
    END_OF_TEXT,
    corpus_fingerprint,
    split_modules,
    stdlib_modules,
    token_stream,
    train_tokenizer,
)
from offramp.build.markdown import markdown_table
from offramp.build.train import distillation_kl

RECIPE_VERSION = 2  # 2: self-distillation of the early exits
TRAINING_STATE = "training_state.pt"
DEFAULT_WORKDIR = Path(".cache/offramp")
CODE_MODEL_NAME = "code_llama"
REPORT_FILE = Path("benchmarks/code_model.md")


@dataclass(frozen=True)
class DecoderShape:
    """The code model's size (a ``LlamaConfig``)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 8
    heads: int = 4
    intermediate_size: int = 768  # a multiple of 64 keeps every elementwise kernel on whole vectors
    context: int = 256
    exit_layers: tuple[int, ...] = (2, 4, 6, 8)  # the last is the full model

    def llama_config(self, end_of_text: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=True,
            bos_token_id=end_of_text,
            eos_token_id=end_of_text,
        )


@dataclass(frozen=True)
class ExitTraining:
    """What the training depends on (all of it enters the build key)."""

    # 25 min here. 800 steps (26-40 min) gave a better model (4 points of next-token accuracy) whose
    # early exits agreed less with its last where it counts, on its own greedy completions: drafts of
    # layer 6 accepted 6.4 tokens of 10 against 7.2 (docs/generation.md, "The model").
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    layer_dropout: float = 0.1  # at the last layer; rises linearly from 0 at the first
    early_exit_positions: float = 0.25  # share of positions whose early-exit loss is computed each step
    # Share w of the distillation term in the early exits' loss and its temperature (module docstring).
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    seed: int = 0
    split_seed: int = 0
    eval_windows: int = 64  # windows of each held-out split for the per-exit figures
    log_every: int = 25
    checkpoint_every: int = 100


@dataclass(frozen=True)
class DecoderArtifacts:
    """The manifest ``decoder.json`` of a served decoder: what the runtime and the calibration read."""

    name: str
    family: str  # "llama" or "gpt2"
    exit_layers: tuple[int, ...]
    context: int
    end_of_text: int
    fingerprint: str  # sha256 of the weights and the tokenizer
    build: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / DECODER_MANIFEST
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> DecoderArtifacts:
        data = json.loads((Path(directory) / DECODER_MANIFEST).read_text())
        return cls(**{**data, "exit_layers": tuple(data["exit_layers"])})


def artifacts_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (MODEL_FILE, TOKENIZER_FILE):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- Training ------------------------------------------------------------------------------------


def exit_weights(exit_layers: Sequence[int], layers: int) -> torch.Tensor:
    """Each exit's share of the loss: depth over total depth, the last exit 1; summing to 1."""
    weights = torch.tensor([1.0 if layer == layers else layer / layers for layer in exit_layers])
    return weights / weights.sum()


def layer_keep_probabilities(layers: int, layer_dropout: float) -> torch.Tensor:
    """(L,) probability that a sequence runs layer l: 1 at the first, 1 - ``layer_dropout`` at the last."""
    return 1.0 - layer_dropout * torch.arange(layers) / max(layers - 1, 1)


def exit_states_of(
    model, input_ids: torch.Tensor, exit_layers: Sequence[int], keep: torch.Tensor | None = None
):
    """Final-normed hidden states (exits, B, T, H) at every exit of a ``LlamaForCausalLM`` (the LM head
    of each gives that exit's logits); ``keep`` (B, L) bool skips layer l for the sequences where it is
    False (layer dropout)."""
    body = model.model
    hidden = body.embed_tokens(input_ids)  # (B, T, H)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = body.rotary_emb(hidden, positions)
    states = []
    for index, layer in enumerate(body.layers):
        out = layer(hidden, attention_mask=None, position_embeddings=rotary)
        hidden = out if keep is None else torch.where(keep[:, index, None, None], out, hidden)
        if index + 1 in exit_layers:
            states.append(body.norm(hidden))
    return torch.stack(states)


def exit_logits_of(model, input_ids: torch.Tensor, exit_layers: Sequence[int]) -> torch.Tensor:
    """Logits (exits, B, T, V) at every exit."""
    return model.lm_head(exit_states_of(model, input_ids, exit_layers))


def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([stream[s : s + length] for s in starts]).astype(np.int64))


def learning_rate_at(step: int, settings: ExitTraining) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def exit_metrics(
    model, stream: np.ndarray, shape: DecoderShape, windows: int, seed: int
) -> dict[str, list[float]]:
    """Per-exit next-token accuracy, loss, and agreement with the last exit's argmax, on ``windows``
    seeded windows of ``stream``."""
    model.eval()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - shape.context - 1, size=windows)
    correct = np.zeros(len(shape.exit_layers))
    agree = np.zeros(len(shape.exit_layers))
    loss = np.zeros(len(shape.exit_layers))
    tokens = 0
    for chunk in np.array_split(starts, max(1, windows // 8)):
        batch = _windows(stream, chunk, shape.context + 1)
        logits = exit_logits_of(model, batch[:, :-1], shape.exit_layers)  # (E, B, T, V)
        target = batch[:, 1:]
        predicted = logits.argmax(-1)  # (E, B, T)
        correct += (predicted == target).sum(dim=(1, 2)).numpy()
        agree += (predicted == predicted[-1]).sum(dim=(1, 2)).numpy()
        for e in range(len(shape.exit_layers)):
            loss[e] += torch.nn.functional.cross_entropy(
                logits[e].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            ).item()
        tokens += target.numel()
    return {
        "accuracy": (correct / tokens).tolist(),
        "agreement_with_last": (agree / tokens).tolist(),
        "loss": (loss / tokens).tolist(),
    }


def train_code_model(
    model,
    train_stream: np.ndarray,
    shape: DecoderShape,
    settings: ExitTraining,
    state_path: Path,
    key: str,
    progress: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """LayerSkip training (module docstring) for ``settings.steps`` steps; returns the loss curve.

    Resumes from ``state_path`` when it holds a state of the same ``key``."""
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    weights = exit_weights(shape.exit_layers, shape.layers)
    keep_probability = layer_keep_probabilities(shape.layers, settings.layer_dropout)
    curve: list[dict[str, float]] = []
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            rng.bit_generator.state = state["rng"]
            curve, start = state["curve"], state["step"]
            progress(f"resuming at step {start}")
    model.train()
    started, window_loss, window_exit_loss, window_steps = time.time(), 0.0, torch.zeros(len(weights)), 0
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        batch = _windows(
            train_stream,
            rng.integers(0, len(train_stream) - shape.context - 1, settings.batch_size),
            shape.context + 1,
        )
        keep = torch.rand(settings.batch_size, shape.layers, generator=generator) < keep_probability
        states = exit_states_of(model, batch[:, :-1], shape.exit_layers, keep).flatten(1, 2)  # (E, B T, H)
        target = batch[:, 1:].reshape(-1)
        # The early exits' loss on a sampled share of positions (the head is as costly as a layer here).
        sampled = torch.randperm(target.numel(), generator=generator)[
            : int(settings.early_exit_positions * target.numel())
        ]
        last_logits = model.lm_head(states[-1])  # (B T, V)
        early_logits = [model.lm_head(states[e, sampled]) for e in range(len(weights) - 1)]  # (S, V) each
        losses = torch.stack(
            [
                *(torch.nn.functional.cross_entropy(logits, target[sampled]) for logits in early_logits),
                torch.nn.functional.cross_entropy(last_logits, target),
            ]
        )  # (E,) the cross-entropy of each exit, what the curve records
        distilled = torch.stack(
            [
                distillation_kl(logits, last_logits[sampled], settings.distill_temperature).mean()
                for logits in early_logits
            ]
        )  # (E - 1,)
        w, t = settings.distill_weight, settings.distill_temperature
        exit_terms = torch.cat([(1.0 - w) * losses[:-1] + w * t**2 * distilled, losses[-1:]])
        loss = (weights * exit_terms).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window_loss += loss.item()
        window_exit_loss += losses.detach()
        window_steps += 1
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            entry = {
                "step": step + 1,
                "loss": window_loss / window_steps,
                "seconds": time.time() - started,
                **{f"loss_exit_{e}": float(v) / window_steps for e, v in enumerate(window_exit_loss)},
            }
            curve.append(entry)
            progress(
                f"step {step + 1}/{settings.steps} loss {entry['loss']:.3f} "
                f"exits {' '.join(f'{float(v) / window_steps:.2f}' for v in window_exit_loss)}"
            )
            window_loss, window_exit_loss, window_steps = 0.0, torch.zeros(len(weights)), 0
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            torch.save({"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "rng": rng.bit_generator.state, "curve": curve,
                        "step": step + 1}, state_path)  # fmt: skip
    model.eval()
    return curve


def build_code_model(
    workdir: Path = DEFAULT_WORKDIR,
    shape: DecoderShape = DecoderShape(),
    settings: ExitTraining = ExitTraining(),
    threads: int = 2,
    name: str = CODE_MODEL_NAME,
    progress: Callable[[str], None] = print,
) -> tuple[DecoderArtifacts, Path]:
    """Train (or reuse, by key) the code model on the standard library; returns its artifacts and folder."""
    out_dir = Path(workdir) / name
    modules = stdlib_modules()
    corpus = corpus_fingerprint(modules)
    key = build_key(recipe=RECIPE_VERSION, shape=asdict(shape), settings=asdict(settings), corpus=corpus)
    if (out_dir / DECODER_MANIFEST).exists():
        saved = DecoderArtifacts.load(out_dir)
        if saved.build.get("key") == key:
            return saved, out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with torch_threads(threads):
        splits = split_modules(modules, settings.split_seed)
        tokenizer = train_tokenizer((m.text for m in splits["train"]), shape.vocab_size)
        tokenizer.save(str(out_dir / TOKENIZER_FILE))
        end_of_text = tokenizer.token_to_id(END_OF_TEXT)
        streams = {split: token_stream(mods, tokenizer) for split, mods in splits.items()}
        progress(f"tokens: {', '.join(f'{s} {len(t):,}' for s, t in streams.items())}")
        from transformers import LlamaForCausalLM

        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(shape.llama_config(end_of_text))
        curve = train_code_model(
            model, streams["train"], shape, settings, out_dir / TRAINING_STATE, key, progress
        )
        trained_s = time.time() - started
        metrics = {
            split: exit_metrics(model, streams[split], shape, settings.eval_windows, seed=1)
            for split in ("calibration", "test")
        }
        model.save_pretrained(out_dir, safe_serialization=True)
    artifacts = DecoderArtifacts(
        name=name,
        family="llama",
        exit_layers=shape.exit_layers,
        context=shape.context,
        end_of_text=end_of_text,
        fingerprint=artifacts_fingerprint(out_dir),
        build={
            "key": key,
            "recipe": RECIPE_VERSION,
            "shape": asdict(shape),
            "settings": asdict(settings),
            "corpus": corpus,
            "modules": {split: [m.name for m in mods] for split, mods in splits.items()},
            "tokens": {split: int(len(stream)) for split, stream in streams.items()},
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "threads": threads,
            "train_seconds": round(trained_s, 1),
            "loss_curve": curve,
            "exit_metrics": metrics,
        },
    )
    artifacts.save(out_dir)
    (out_dir / TRAINING_STATE).unlink(missing_ok=True)
    return artifacts, out_dir


# --- A user's own checkpoint ---------------------------------------------------------------------------


def default_exit_layers(layers: int, exits: int = 4) -> tuple[int, ...]:
    """``exits`` exits spread evenly over ``layers`` layers, the last after the last layer."""
    return tuple(sorted({max(1, round(layers * (k + 1) / exits)) for k in range(exits)}))


def import_checkpoint(
    checkpoint: Path, out_dir: Path, exit_layers: Sequence[int] | None = None, name: str | None = None
) -> tuple[DecoderArtifacts, Path]:
    """A Hugging Face checkpoint folder (``config.json`` of a Llama or GPT-2 model, its weights as
    ``model.safetensors`` or ``pytorch_model.bin``, and ``tokenizer.json``) as decoder artifacts.

    Its exits read the model's own LM head after ``exit_layers`` (default: four, evenly spread). The
    weights are copied as they are: exits that were not trained as such may be poor, which the
    calibration measures and certifies accordingly.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    config = json.loads((checkpoint / "config.json").read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{checkpoint}: model_type {family!r} is not one of {FAMILIES}")
    if not (checkpoint / TOKENIZER_FILE).exists():
        raise ValueError(f"{checkpoint}: no {TOKENIZER_FILE} (a tokenizers file is needed to serve text)")
    layers = config["num_hidden_layers"] if family == "llama" else config["n_layer"]
    context = config["max_position_embeddings"] if family == "llama" else config["n_positions"]
    exits = tuple(sorted(set(exit_layers))) if exit_layers else default_exit_layers(layers)
    if exits[-1] != layers or exits[0] < 1:
        raise ValueError(f"exit layers {exits} must lie in 1..{layers} and end with the last layer {layers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint / "config.json", out_dir / "config.json")
    shutil.copyfile(checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    if (checkpoint / MODEL_FILE).exists():
        shutil.copyfile(checkpoint / MODEL_FILE, out_dir / MODEL_FILE)
    elif (checkpoint / "pytorch_model.bin").exists():
        from safetensors.torch import save_file

        state = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / MODEL_FILE))
    else:
        raise ValueError(f"{checkpoint}: no {MODEL_FILE} or pytorch_model.bin")
    end_of_text = config.get("eos_token_id")
    end_of_text = end_of_text[0] if isinstance(end_of_text, list) else end_of_text
    artifacts = DecoderArtifacts(
        name=name or checkpoint.name,
        family=family,
        exit_layers=exits,
        context=int(context),
        end_of_text=-1 if end_of_text is None else int(end_of_text),
        fingerprint=artifacts_fingerprint(out_dir),
        build={"imported_from": str(checkpoint.resolve())},
    )
    artifacts.save(out_dir)
    return artifacts, out_dir


def tiny_random_checkpoint(folder: Path, family: str, tokenizer, seed: int = 0, context: int = 128) -> Path:
    """A random Llama (4 layers, width 64, grouped-query attention) or GPT-2 (4 layers, width 64) saved
    as a Hugging Face folder with ``tokenizer.json``: a stand-in for a user's checkpoint, for tests and
    quick pipeline checks. The late layers are scaled so that early exits
    agree with the last one often but not always (damped in the Llama; amplified in the GPT-2, whose
    random blocks barely move its embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    end = tokenizer.token_to_id("<|endoftext|>")
    if family == "llama":
        config = LlamaConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            bos_token_id=end,
            eos_token_id=end,
            tie_word_embeddings=False,
        )
        model, late, factor = LlamaForCausalLM(config), ("self_attn.o_proj", "mlp.down_proj"), 0.3
    else:
        config = GPT2Config(
            vocab_size=tokenizer.get_vocab_size(),
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=context,
            bos_token_id=end,
            eos_token_id=end,
        )
        model, late, factor = GPT2LMHeadModel(config), ("attn.c_proj", "mlp.c_proj"), 10.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(f".{i}.{part}.weight" in name for i in (2, 3) for part in late):
                parameter.mul_(factor)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --- The report ---------------------------------------------------------------------------------------


def training_report(artifacts: DecoderArtifacts) -> str:
    """Markdown: the model, its loss curve and per-exit next-token figures on the held-out splits."""
    build = artifacts.build
    shape = DecoderShape(**{**build["shape"], "exit_layers": tuple(build["shape"]["exit_layers"])})
    settings = build["settings"]
    exits = [f"layer {layer}" for layer in shape.exit_layers]
    lines = [
        f"# The code model ({artifacts.name})",
        "",
        f"LlamaForCausalLM, {shape.layers} layers, width {shape.hidden_size}, {shape.heads} heads, MLP "
        f"{shape.intermediate_size}, context {shape.context}, byte-level BPE vocabulary {shape.vocab_size}, "
        "tied "
        f"LM head; {build['parameters'] / 1e6:.2f} M parameters. Exits after layers "
        f"{', '.join(str(layer) for layer in shape.exit_layers)} (the shared head after the final norm).",
        "",
        f"Data: the CPython {'.'.join(str(v) for v in __import__('sys').version_info[:2])} standard library "
        f"without its test suites, split by module (seed {settings['split_seed']}): "
        + ", ".join(
            f"{split} {len(names)} modules / {build['tokens'][split]:,} tokens"
            for split, names in build["modules"].items()
        )
        + ".",
        "",
        f"Training: {settings['steps']} steps of {settings['batch_size']} windows of {shape.context} tokens "
        f"({settings['steps'] * settings['batch_size'] * shape.context / 1e6:.2f} M tokens), AdamW lr "
        f"{settings['learning_rate']:g} (warm-up {settings['warmup_steps']}, cosine to a tenth), early-exit "
        "loss "
        f"weighted by depth, layer dropout rising to {settings['layer_dropout']:g}, "
        + (
            f"the early exits self-distilled towards the last (weight {settings['distill_weight']:g}, "
            f"temperature {settings['distill_temperature']:g}); "
            if settings.get("distill_weight", 0.0) > 0
            else "no distillation; "
        )
        + f"{build['threads']} torch threads, {build['train_seconds'] / 60:.1f} min on this machine.",
        "",
        "## Loss curve (training windows, mean over each logging interval; the weighted loss includes the "
        "distillation terms, the per-layer columns are cross-entropy with the true next token)",
        "",
    ]
    curve = build["loss_curve"]
    every = max(1, len(curve) // 12)
    shown = curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else [])  # the last entry, once
    lines.append(markdown_table(
        ["step", "minutes", "weighted loss", *exits],
        [[c["step"], f"{c['seconds'] / 60:.1f}", f"{c['loss']:.3f}",
          *(f"{c[f'loss_exit_{e}']:.3f}" for e in range(len(exits)))] for c in shown],
    ))  # fmt: skip
    for split, metrics in build["exit_metrics"].items():
        lines += [
            "",
            f"## Per exit, {split} modules ({settings['eval_windows']} windows of {shape.context} tokens)",
            "",
        ]
        lines.append(markdown_table(
            ["", *exits],
            [["next-token accuracy", *(f"{100 * a:.1f}%" for a in metrics["accuracy"])],
             ["agreement with the last exit", *(f"{100 * a:.1f}%" for a in metrics["agreement_with_last"])],
             ["loss (nats/token)", *(f"{v:.3f}" for v in metrics["loss"])]],
        ))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Train (or reuse) the code model with exits; write its report."
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--steps", type=int, default=ExitTraining.steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=REPORT_FILE)
    args = parser.parse_args(argv)
    artifacts, directory = build_code_model(
        args.workdir, settings=ExitTraining(steps=args.steps), threads=args.threads
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(training_report(artifacts))
    print(f"{directory}: {args.report}")


if __name__ == "__main__":
    main()
