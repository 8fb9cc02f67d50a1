"""Python source as data: the CPython standard library, split by module, a byte-level BPE tokenizer,
training windows, and next-line completion tasks.

The corpus is the standard library of the interpreter running this code (``sysconfig``'s ``stdlib``
path), without its test suites (``test/``, ``*/tests/``, ``idle_test/``) and third-party folders. A
module is one ``.py`` file, named by its dotted path (``asyncio.events``). Each module goes to one
split by a seeded hash of its name (train / calibration / test, 80 / 10 / 10 by default), so the
splits are disjoint and a module keeps its split when others are added or removed.

The tokenizer is byte-level BPE (``tokenizers``), trained on the train modules only. Its
pre-tokenizer isolates every newline before the byte-level regex, so a line break is always a token
of its own: a prompt cut at the start of a line ends on the same token boundary as the training
text did (GPT-2's regex would otherwise merge the newline with the next line's indentation, and a
prompt ending in a bare newline would be a token sequence the model never saw).

A completion task (:class:`CompletionTask`) cuts a function of a held-out module at a random line of
its body: the prompt is the source before that line (the last lines that fit ``max_prompt_tokens``),
the target is the line itself. Calibration and the benchmark use these, on their own splits.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "calibration", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
END_OF_TEXT = "<|endoftext|>"
# Folders of the standard library that are not its own source: test suites and installed packages.
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceModule:
    name: str  # dotted module name, e.g. "asyncio.events"
    path: Path
    text: str


def stdlib_root() -> Path:
    """The source folder of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as handle:  # honours coding cookies
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def stdlib_modules(root: Path | None = None) -> list[SourceModule]:
    """Every readable module of the standard library under ``root``, sorted by name."""
    root = root or stdlib_root()
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS & set(relative.parts[:-1]) or relative.parts[0].startswith("config-"):
            continue
        text = _read_source(path)
        if text is None or not text.strip():
            continue
        parts = relative.with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        modules.append(SourceModule(name, path, text))
    return modules


def split_of(name: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split a module belongs to: a seeded hash of its name mapped onto the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    for split, bound in zip(SPLITS, np.cumsum(fractions)):
        if position < bound:
            return split
    return SPLITS[-1]


def split_modules(
    modules: Iterable[SourceModule], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, list[SourceModule]]:
    if abs(sum(fractions) - 1.0) > 1e-9 or len(fractions) != len(SPLITS):
        raise ValueError(f"fractions {fractions} must be three numbers summing to 1")
    splits: dict[str, list[SourceModule]] = {split: [] for split in SPLITS}
    for module in modules:
        splits[split_of(module.name, seed, fractions)].append(module)
    return splits


def corpus_fingerprint(modules: Sequence[SourceModule]) -> str:
    """sha256 over the modules' names and texts: a build key part that changes with the corpus."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.name.encode() + b"\0" + module.text.encode() + b"\0")
    return digest.hexdigest()[:16]


# --- Tokenizer --------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with newlines isolated (see the module docstring);
    ``END_OF_TEXT`` is id 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_stream(modules: Sequence[SourceModule], tokenizer) -> np.ndarray:
    """Every module's tokens, each followed by ``END_OF_TEXT``, as one int32 array."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    encodings = tokenizer.encode_batch([m.text for m in modules])
    pieces = [np.asarray([*e.ids, end], dtype=np.int32) for e in encodings]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


# --- Completion tasks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionTask:
    """Complete ``target`` (one source line, without its newline) after ``prompt`` (ends with a newline)."""

    module: str
    function: str
    line: int  # 1-based line number of the target in the module
    prompt: str
    target: str


def _function_lines(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(name, first body line, last line) of every function with a body below its signature."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            first = node.body[0].lineno
            if first > node.lineno:  # the body starts on a line of its own
                found.append((node.name, first, node.end_lineno))
    return sorted(found, key=lambda f: f[1])


def completion_tasks(
    modules: Sequence[SourceModule],
    tokenizer,
    max_prompt_tokens: int,
    seed: int = 0,
    per_module: int | None = None,
) -> list[CompletionTask]:
    """One task per function of each module (at most ``per_module``, chosen seeded): the function is
    cut at a random non-blank line of its body; the prompt is the source before that line, trimmed
    from the left to whole lines that fit ``max_prompt_tokens`` tokens."""
    tasks = []
    for module in modules:
        try:
            tree = ast.parse(module.text)
        except SyntaxError:
            continue
        lines = module.text.splitlines(keepends=True)
        rng = random.Random(f"{seed}:{module.name}")
        functions = _function_lines(tree)
        if per_module is not None and len(functions) > per_module:
            functions = sorted(rng.sample(functions, per_module), key=lambda f: f[1])
        for name, first, last in functions:
            candidates = [n for n in range(first, last + 1) if lines[n - 1].strip()]
            if not candidates:
                continue
            line = rng.choice(candidates)
            prompt = _fitting_suffix(lines[: line - 1], tokenizer, max_prompt_tokens)
            if prompt:
                tasks.append(CompletionTask(module.name, name, line, prompt, lines[line - 1].rstrip("\n")))
    return tasks


def _fitting_suffix(lines: Sequence[str], tokenizer, max_tokens: int) -> str:
    """The longest run of whole trailing ``lines`` whose tokens number at most ``max_tokens``.

    Newlines are tokens of their own, so the tokens of a run of lines are the sum of each line's."""
    counts = [len(e.ids) for e in tokenizer.encode_batch(list(lines))] if lines else []
    total, start = 0, len(lines)
    while start > 0 and total + counts[start - 1] <= max_tokens:
        total += counts[start - 1]
        start -= 1
    return "".join(lines[start:])
