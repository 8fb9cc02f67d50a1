"""Every supported transformers family in attach mode, end to end: a tiny randomly initialised sequence
classifier saved with save_pretrained, built by ``offramp build`` from a CSV, exported to ONNX segments
and served by a real tritonserver. The last exit and ``<name>_full`` give the checkpoint's own logits (as
transformers computes them), and the served answers are the in-process cascade's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from offramp.backend.segment_runner import OnnxRunner
from offramp.build.artifacts import ModelArtifacts
from offramp.build.calibrate import exit_logits_from_onnx
from offramp.build.tabular import write_columns
from offramp.build.text_attach import load_attached_classifier
from offramp.build.transformer import (
    AttachedClassifier,
    MultiExitEncoder,
    UnsupportedModel,
    encode_texts,
    encoder_family,
    load_tokenizer,
)
from offramp.client.cli.main import main
from tests.served_reference import Reference, spread_policy
from tests.tiny_text import (
    CLASSES,
    FAMILY_TYPES,
    corpus,
    tiny_classifier_config,
    tiny_classifier_folder,
)

# float32 through PyTorch's and ONNX Runtime's kernels on logits of magnitude ~1: measured below 1e-7.
ATOL = 1e-5
TEXTS = corpus(24, seed=7)[0] + ["", "storm", "the match was very good and the soup was cold " * 4]


def transformers_logits(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The checkpoint's logits as transformers computes them, from its own tokenizer: the reference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[ModelArtifacts, Path, Path]]:
    """Per family: (artifacts, artifacts folder, checkpoint folder), built by the command line."""
    root = tmp_path_factory.mktemp("families")
    texts, labels = corpus(240)
    train = write_columns(root / "train.csv", {"text": texts, "label": labels})
    builds = {}
    for model_type in FAMILY_TYPES:
        checkpoint = tiny_classifier_folder(root / f"{model_type}_checkpoint", model_type)
        out = root / model_type
        name = f"tiny_{model_type.replace('-', '_')}"
        argv = ["build", "--model", str(checkpoint), "--train", str(train), "--out", str(out), "--name", name,
                "--max-length", "32", "--epochs", "10", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        builds[model_type] = (ModelArtifacts.load(out), out, checkpoint)
    return builds


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_attach_build_returns_the_checkpoints_logits_at_its_last_exit(built, model_type):
    artifacts, directory, checkpoint = built[model_type]
    assert artifacts.build["mode"] == "attach" and artifacts.class_names == CLASSES
    assert artifacts.build["exit_layers"] == [1, 2, 3] and artifacts.num_exits == 3
    ids, mask = encode_texts(load_tokenizer(directory), TEXTS)
    expected = transformers_logits(checkpoint, TEXTS, max_length=32)
    inputs = {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
    exits = exit_logits_from_onnx(artifacts, directory, inputs)
    full = OnnxRunner(directory / artifacts.full_onnx).run(inputs)["LOGITS"]
    np.testing.assert_allclose(full, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(exits[-1], expected, rtol=0, atol=ATOL)
    # The early exits are the trained heads of the PyTorch model, exported.
    with torch.no_grad():
        model = load_attached_classifier(directory)
        torch_exits = torch.stack(model(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    np.testing.assert_allclose(exits, torch_exits, rtol=0, atol=ATOL)
    # Distillation taught the early heads something of the final head (chance is about a third).
    assert artifacts.build["exit_test_agreement"][-1] == 1.0
    assert min(artifacts.build["exit_test_agreement"][:-1]) > 0.5


def test_a_rebuild_with_the_same_settings_is_the_cached_build(built, monkeypatch, capsys):
    from offramp.build import text_attach

    artifacts, directory, checkpoint = built["bert"]
    monkeypatch.setattr(text_attach, "train_exits", lambda *a, **k: pytest.fail("retrained a cached build"))
    train = directory.parent / "train.csv"
    argv = ["build", "--model", str(checkpoint), "--train", str(train), "--out", str(directory),
            "--name", "tiny_bert", "--max-length", "32", "--epochs", "10", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert ModelArtifacts.load(directory).fingerprint == artifacts.fingerprint
    assert "agreement with the final head" in capsys.readouterr().out


def test_a_changed_head_setting_reuses_the_encoder_pass(built, tmp_path, monkeypatch):
    """Other head epochs: a new build, but the frozen encoder's features of the training rows are the
    stage the previous build left, not computed again."""
    import shutil

    from offramp.build import text_attach

    artifacts, directory, checkpoint = built["electra"]
    shutil.copytree(directory, tmp_path / "copy")
    monkeypatch.setattr(text_attach, "pooled_layer_features", lambda *a, **k: pytest.fail("encoder again"))
    argv = ["build", "--model", str(checkpoint), "--train", str(directory.parent / "train.csv"),
            "--out", str(tmp_path / "copy"), "--name", "tiny_electra", "--max-length", "32", "--epochs", "5",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    again = ModelArtifacts.load(tmp_path / "copy")
    assert again.build["key"] != artifacts.build["key"] and again.build["settings"]["epochs"] == 5
    assert again.build["timings"]["features_seconds"] == artifacts.build["timings"]["features_seconds"]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_trains_jointly_from_its_base_encoder(model_type):
    """Joint mode takes the base encoder (no head) of each family: a head after every block."""
    from transformers import AutoModel

    torch.manual_seed(0)
    encoder = AutoModel.from_config(tiny_classifier_config(model_type, layers=2))
    model = MultiExitEncoder(encoder, num_classes=4).eval()
    ids = torch.randint(4, 20, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, mask)
        chained = model.segmented(16).exit_logits(ids, mask)
    assert [tuple(t.shape) for t in logits] == [(3, 4), (3, 4)]
    for a, b in zip(logits, chained):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_an_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModel, match=r"'gpt2' is not supported; supported families: BERT"):
        encoder_family(GPT2Config())
    with pytest.raises(UnsupportedModel, match="DistilBERT"):
        AttachedClassifier(type("NotAClassifier", (), {"config": GPT2Config()})())


@pytest.mark.integration
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_served_family_equals_the_checkpoint_and_the_in_process_cascade(served_families, model_type):
    from offramp.client.grpc_client import OfframpClient

    server, built_models, policies = served_families
    artifacts, directory, checkpoint = built_models[model_type]
    ids, mask = encode_texts(load_tokenizer(directory), TEXTS)
    inputs = {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
    expected = Reference(artifacts, directory, policies[model_type])(inputs)
    assert len(set(expected.exit.tolist())) > 1, "the policy should use more than one exit"
    with OfframpClient(server.grpc_url) as client:
        served = client.classify_text(artifacts.name, TEXTS)
        full = client.full_logits(f"{artifacts.name}_full", inputs)
    np.testing.assert_allclose(full, transformers_logits(checkpoint, TEXTS, max_length=32), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(served.exit, expected.exit)
    np.testing.assert_array_equal(served.label, expected.label)
    np.testing.assert_allclose(served.logits, expected.logits, rtol=0, atol=ATOL)
    assert served.label_name.tolist() == [CLASSES[label] for label in expected.label]


@pytest.fixture(scope="module")
def served_families(built, tmp_path_factory, running_server, execution_env):
    """Every family's build in one repository, under a policy that makes each exit answer some rows."""
    from offramp.build.repository import RepositoryOptions, write_repository

    repository = tmp_path_factory.mktemp("families_repo")
    options = RepositoryOptions(execution_env=execution_env, orchestrator_instances=1)
    policies = {}
    for model_type, (artifacts, directory, _) in built.items():
        ids, mask = encode_texts(load_tokenizer(directory), TEXTS)
        policies[model_type] = spread_policy(artifacts, directory, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        write_repository(artifacts, directory, policies[model_type], repository, options)
    with running_server(repository) as server:
        yield server, built, policies


def test_attach_mode_trains_on_unlabelled_text(built, tmp_path):
    """Attach mode needs no labels to train: the exit heads learn the final head's answers. Only the
    calibration and test rows, which judge the exits, need labels."""
    from offramp.build.text_attach import AttachSettings, build_attached_classifier
    from offramp.build.text_data import TextSource

    _, directory, checkpoint = built["distilbert"]
    texts, labels = corpus(240, seed=3)
    unlabelled = write_columns(tmp_path / "unlabelled.jsonl", {"text": texts})
    held_out_texts, held_out_labels = corpus(90, seed=11)
    labelled = write_columns(tmp_path / "held_out.csv", {"text": held_out_texts, "label": held_out_labels})
    source = TextSource(train=unlabelled, calibration=labelled, test=labelled)
    settings = AttachSettings(max_length=32, fractions=source.split_fractions(0.15, 0.15))
    artifacts = build_attached_classifier(tmp_path / "out", source, checkpoint, name="u", settings=settings)
    assert artifacts.build["labelled_train_rows"] == 0 and artifacts.build["train_rows"] == 240
    assert min(artifacts.build["exit_test_agreement"]) > 0.5


def test_calibration_rows_come_from_files_like_the_builds(built, tmp_path):
    """`offramp calibrate --data FILE` for a text model: its text and label columns (names or indices), an
    optional cohort column, tokenized by the build's own tokenizer; an unknown label names its row."""
    from offramp.build.calibrate import data_file_rows, held_out_data
    from offramp.build.text_data import TextDataError

    artifacts, directory, _ = built["roberta"]
    texts, labels = corpus(30, seed=4)
    # Labels as names and as indices, mixed.
    mixed = [label if row % 2 else CLASSES.index(label) for row, label in enumerate(labels)]
    path = write_columns(tmp_path / "rows.jsonl", {"text": texts, "label": mixed, "cohort": ["a", "b"] * 15})
    data = data_file_rows(artifacts, directory, path)
    assert data.labels.tolist() == [CLASSES.index(label) for label in labels]
    assert data.cohorts.tolist() == ["a", "b"] * 15
    ids, mask = encode_texts(load_tokenizer(directory), texts)
    np.testing.assert_array_equal(data.inputs["INPUT_IDS"], ids)
    held_out = held_out_data(artifacts, directory, "test")  # the build's own test rows, read again
    assert len(held_out.labels) == artifacts.build["split_sizes"]["test"]
    bad = write_columns(tmp_path / "bad.csv", {"text": ["rain"], "label": ["news"]})
    with pytest.raises(TextDataError, match=r"bad.csv, line 2: label 'news' is not one of the model's"):
        data_file_rows(artifacts, directory, bad)


@pytest.mark.slow
def test_a_real_size_minilm_classifier_keeps_its_logits(tmp_path):
    """The packaged all-MiniLM-L6-v2 as a fine-tuned-shaped BertForSequenceClassification (6 layers,
    hidden 384, its own pooler and a linear head), in attach mode: the last exit and `<name>_full`
    are its logits through ONNX."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from offramp.build.text_attach import AttachSettings, build_attached_classifier
    from offramp.build.text_data import TextSource
    from offramp.build.transformer import minilm_path

    torch.manual_seed(0)
    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), **labels)
    model.save_pretrained(str(tmp_path / "minilm_classifier"))
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(tmp_path / "minilm_classifier"))
    texts, topics = corpus(120)
    train = write_columns(tmp_path / "train.csv", {"text": texts, "label": topics})
    settings = AttachSettings(max_length=32, epochs=2)
    artifacts = build_attached_classifier(
        tmp_path / "out", TextSource(train=train), tmp_path / "minilm_classifier", name="m", settings=settings
    )
    assert artifacts.num_exits == 6 and artifacts.build["family"] == "BERT"
    ids, mask = encode_texts(load_tokenizer(tmp_path / "out"), TEXTS)
    inputs = {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
    expected = transformers_logits(tmp_path / "minilm_classifier", TEXTS, max_length=32)
    full = OnnxRunner(tmp_path / "out" / artifacts.full_onnx).run(inputs)["LOGITS"]
    exits = exit_logits_from_onnx(artifacts, tmp_path / "out", inputs)
    # Six wider blocks than the tiny models: measured differences stay below 1e-5 on logits of ~1.
    np.testing.assert_allclose(full, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(exits[-1], expected, rtol=0, atol=1e-4)
