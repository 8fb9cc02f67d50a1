"""Writes the streaming generator into a Triton model repository.

One decoupled Python model ``<name>`` (``model_transaction_policy { decoupled: true }``, no batch
axis: each request is one prompt, and the model merges requests into its own running batch):

    <name>/config.pbtxt
    <name>/1/model.py                  python_backend/triton_generator.py
    <name>/1/config.json, model.safetensors, tokenizer.json, decoder.json   the decoder artifacts
    <name>/1/generation_policy.json    the policy (draft exit and length, confident thresholds)

Input ``PROMPT`` (BYTES ``[1]``); outputs ``offramp.backend.generation_service.OUTPUTS``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import offramp.backend
from offramp.backend.exit_decoder import DECODER_MANIFEST, MODEL_FILE, TOKENIZER_FILE, DecoderSpec
from offramp.backend.generation_contract import OUTPUTS, PROMPT_INPUT
from offramp.backend.generation_policy import POLICY_FILE, GenerationPolicy
from offramp.backend.generation_service import ServiceOptions
from offramp.build.decoder import DecoderArtifacts
from offramp.build.repository import ModelConfig, TensorConfig

GENERATOR_ADAPTER = Path(offramp.backend.__file__).parent / "triton_generator.py"
ARTIFACT_FILES = ("config.json", MODEL_FILE, TOKENIZER_FILE, DECODER_MANIFEST)


def generator_model_config(name: str, options: ServiceOptions, execution_env: Path | None) -> ModelConfig:
    return ModelConfig(
        name=name,
        backend="python",
        inputs=(TensorConfig(PROMPT_INPUT, "object", (1,)),),
        outputs=tuple(TensorConfig(output, dtype, dims) for output, (dtype, dims) in OUTPUTS.items()),
        max_batch_size=0,
        instances=1,  # one running batch: a second instance would split it
        dynamic_batching=False,
        decoupled=True,
        parameters={
            **({"EXECUTION_ENV_PATH": str(execution_env)} if execution_env else {}),
            **options.to_parameters(),
        },
    )


def write_generator(
    artifacts_dir: Path,
    policy: GenerationPolicy,
    repository: Path,
    options: ServiceOptions = ServiceOptions(),
    execution_env: Path | None = None,
    name: str | None = None,
) -> Path:
    """``<repository>/<name>`` (default: the artifacts' name), replacing what was there; returns its folder."""
    artifacts_dir = Path(artifacts_dir)
    artifacts = DecoderArtifacts.load(artifacts_dir)
    spec = DecoderSpec.from_config(
        json.loads((artifacts_dir / "config.json").read_text()), artifacts.exit_layers
    )
    policy.validate(len(artifacts.exit_layers), artifacts.fingerprint, spec.vocab)
    config = generator_model_config(name or artifacts.name, options, execution_env)
    model_dir = Path(repository) / config.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config.to_pbtxt())
    shutil.copyfile(GENERATOR_ADAPTER, model_dir / "1" / "model.py")
    for file in ARTIFACT_FILES:
        shutil.copyfile(artifacts_dir / file, model_dir / "1" / file)
    policy.save(model_dir / "1" / POLICY_FILE)
    return model_dir
