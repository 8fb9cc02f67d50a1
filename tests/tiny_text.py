"""Tiny text models and data made inside the tests, nothing downloaded: a word-level tokenizer over a small
vocabulary, a sequence classifier of each supported transformers family (2-3 blocks, hidden 32,
randomly initialised and fine-tuned for seconds) saved with ``save_pretrained``, and a labelled
three-class corpus written as CSV, JSON Lines or Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOPICS = {
    "sport": ["match", "goal", "team", "score", "player", "coach", "league", "win"],
    "food": ["bread", "soup", "cheese", "cook", "taste", "kitchen", "spice", "meal"],
    "weather": ["rain", "wind", "storm", "sunny", "cloud", "snow", "cold", "forecast"],
}
COMMON = ["the", "a", "was", "very", "today", "and", "we", "it", "of", "after", "good", "bad"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = SPECIAL + COMMON + [word for words in TOPICS.values() for word in words]
CLASSES = tuple(TOPICS)


def corpus(rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``rows`` sentences of 4-12 words, each mostly about one topic (its label), with common words and
    a word of another topic now and then."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for row in range(rows):
        label = CLASSES[row % len(CLASSES)]
        words = []
        for _ in range(int(rng.integers(4, 13))):
            pools = [TOPICS[label], COMMON, TOPICS[CLASSES[int(rng.integers(len(CLASSES)))]]]
            pool = pools[int(rng.choice(3, p=[0.5, 0.4, 0.1]))]
            words.append(str(rng.choice(pool)))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def save_word_tokenizer(directory: Path, model_max_length: int = 64) -> None:
    """A word-level tokenizer over :data:`VOCAB` with [CLS] ... [SEP] around each text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=model_max_length,
    )  # fmt: skip
    tokenizer.save_pretrained(str(directory))


FAMILY_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra")


def tiny_classifier_config(model_type: str, layers: int = 3, num_labels: int = len(CLASSES)):
    """A transformers config of ``model_type``, small: hidden 32, 4 heads, the word vocabulary."""
    from transformers import AutoConfig

    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    labels = labels if num_labels == len(CLASSES) else {"num_labels": num_labels}
    if model_type == "distilbert":
        sizes = dict(dim=32, n_heads=4, hidden_dim=64, n_layers=layers)
    else:
        sizes = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=layers)
    if model_type == "electra":
        sizes["embedding_size"] = 16  # narrower than the blocks: the projection is part of the embeddings
    return AutoConfig.for_model(
        model_type, vocab_size=len(VOCAB), max_position_embeddings=66, pad_token_id=0, **sizes, **labels
    )


def tiny_classifier_folder(
    directory: Path, model_type: str, layers: int = 3, seed: int = 0, fine_tune_rows: int = 240
) -> Path:
    """A ``*ForSequenceClassification`` of ``model_type`` with the word tokenizer, randomly initialised and
    then fine-tuned for a few steps on ``fine_tune_rows`` rows of :func:`corpus` (so that its head is
    sure of its answers, as a fine-tuned checkpoint is), saved with ``save_pretrained`` into ``directory``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_classifier_config(model_type, layers))
    save_word_tokenizer(directory)
    if fine_tune_rows:
        texts, labels = corpus(fine_tune_rows, seed=seed + 100)
        batch = AutoTokenizer.from_pretrained(str(directory))(texts, padding=True, return_tensors="pt")
        targets = torch.tensor([CLASSES.index(label) for label in labels])
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(40):
            rows = torch.arange(step * 32, step * 32 + 32) % fine_tune_rows
            output = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows])
            loss = torch.nn.functional.cross_entropy(output.logits, targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().save_pretrained(str(directory))
    return directory


def tiny_encoder_folder(directory: Path, model_type: str = "bert", layers: int = 3, seed: int = 0) -> Path:
    """A randomly initialised base encoder (no head) of ``model_type`` with the word tokenizer."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_classifier_config(model_type, layers)).save_pretrained(str(directory))
    save_word_tokenizer(directory)
    return directory
