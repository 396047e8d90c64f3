"""Trains the `sentiment` example model and writes it to examples/models/sentiment/.

Model: hashed bag of word 1-2-grams and in-word character 2-5-grams, weighted by naive-Bayes
log-count ratios (NBSVM, Wang and Manning 2012) and L2-normalised, then logistic regression.
The features and the classifier are one TorchScript program taking the raw sentences (a BYTES
input), so the server needs no Python preprocessing. scikit-learn only fits the weights.

Data: /work/shared/data/sentiment (UCI "Sentiment Labelled Sentences" and Pang & Lee rt-polarity),
a stratified 85/15 train/held-out split with a fixed seed.

    python scripts/train_sentiment.py [--data DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

NUM_BUCKETS = 1 << 20
# Inverse regularisation strengths tried on a validation split carved out of the training set.
C_CANDIDATES = (2.0, 4.0, 8.0, 16.0)
LABELS = ["negative", "positive"]


@torch.jit.script
def _fnv1a(text: str, salt: int) -> int:
    hashed = (2166136261 ^ salt) & 0xFFFFFFFF
    for char in text:
        hashed = ((hashed ^ ord(char)) * 16777619) & 0xFFFFFFFF
    return hashed


@torch.jit.script
def _words(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and apostrophes; '!' and '?' are words of their own."""
    words: list[str] = []
    current = ""
    for char in text.lower():
        if char.isalnum() or char == "'":
            current += char
        else:
            if current != "":
                words.append(current)
            current = ""
            if char == "!" or char == "?":
                words.append(char)
    if current != "":
        words.append(current)
    return words


@torch.jit.script
def feature_ids(text: str, num_buckets: int) -> list[int]:
    """Distinct hashed feature ids of a sentence (binary bag of features)."""
    ids: dict[int, bool] = {}
    words = _words(text)
    for i in range(len(words)):
        ids[_fnv1a(words[i], 1) % num_buckets] = True
        if i + 1 < len(words):
            ids[_fnv1a(words[i] + " " + words[i + 1], 2) % num_buckets] = True
        padded = " " + words[i] + " "
        for n in range(2, 6):
            for start in range(len(padded) - n + 1):
                ids[_fnv1a(padded[start : start + n], 3) % num_buckets] = True
    return list(ids.keys())


class SentimentModel(torch.nn.Module):
    """texts -> (probabilities [N, 2], label [N, 1], confidence [N, 1])."""

    def __init__(self, ratios: torch.Tensor, weights: torch.Tensor, bias: float) -> None:
        super().__init__()
        # Stored in float16 to halve the file; gathered values are widened to float32 before use.
        self.register_buffer("ratios", ratios.half())
        self.register_buffer("weighted_ratios", (weights * ratios).half())
        self.bias = bias
        self.num_buckets = ratios.numel()

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits: list[torch.Tensor] = []
        for text in texts:
            ids = torch.tensor(feature_ids(text, self.num_buckets), dtype=torch.long)
            norm = torch.sqrt((self.ratios[ids].float() ** 2).sum()).clamp(min=1e-6)
            logits.append(self.weighted_ratios[ids].float().sum() / norm + self.bias)
        positive = torch.sigmoid(torch.stack(logits)) if logits else torch.zeros(0)
        probabilities = torch.stack([1.0 - positive, positive], dim=1)
        confidence, label = probabilities.max(dim=1, keepdim=True)
        return probabilities, label, confidence


def read_corpus(data_dir: Path) -> tuple[list[str], np.ndarray, list[str]]:
    texts: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    for path in sorted(data_dir.glob("*_labelled.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                text, label = line.rsplit("\t", 1)
                texts.append(text.strip())
                labels.append(int(label))
                sources.append(path.stem)
    for name, label in (("rt-polarity.pos", 1), ("rt-polarity.neg", 0)):
        for line in (data_dir / name).read_text(encoding="latin-1").splitlines():
            if line.strip():
                texts.append(line.strip())
                labels.append(label)
                sources.append("rt-polarity")
    return texts, np.asarray(labels), sources


def binary_features(texts: list[str]) -> csr_matrix:
    rows, cols = [], []
    for row, text in enumerate(texts):
        ids = feature_ids(text, NUM_BUCKETS)
        rows.extend([row] * len(ids))
        cols.extend(ids)
    return csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(texts), NUM_BUCKETS))


def nb_ratios(features: csr_matrix, labels: np.ndarray) -> np.ndarray:
    positive = np.asarray(features[labels == 1].sum(axis=0)).ravel() + 1.0
    negative = np.asarray(features[labels == 0].sum(axis=0)).ravel() + 1.0
    return np.log((positive / positive.sum()) / (negative / negative.sum())).astype(np.float32)


def scaled(features: csr_matrix, ratios: np.ndarray) -> csr_matrix:
    weighted = features.multiply(ratios).tocsr()
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel()).clip(min=1e-6)
    return csr_matrix(weighted.multiply(1.0 / norms[:, None]))


def choose_regularisation(
    features: csr_matrix, labels: np.ndarray, train_idx: np.ndarray, seed: int
) -> float:
    """The C with the best accuracy on a validation split of the training set; the test split stays unseen."""
    fit_idx, val_idx = train_test_split(
        train_idx, test_size=0.15, random_state=seed + 1, stratify=labels[train_idx]
    )
    ratios = nb_ratios(features[fit_idx], labels[fit_idx])
    scores = {}
    for candidate in C_CANDIDATES:
        model = LogisticRegression(C=candidate, max_iter=3000).fit(
            scaled(features[fit_idx], ratios), labels[fit_idx]
        )
        scores[candidate] = float(
            (model.predict(scaled(features[val_idx], ratios)) == labels[val_idx]).mean()
        )
    print("validation accuracy by C:", scores)
    return max(scores, key=lambda c: scores[c])


def write_model(out: Path, model: SentimentModel, accuracy: dict[str, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out / "model.ts"))
    config = {
        "name": "sentiment",
        "runtime": "torchscript",
        "artifact": "model.ts",
        "max_batch_size": 64,
        "max_queue_delay_ms": 2,
        "labels": LABELS,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [2]},
            {"name": "label", "datatype": "INT64", "shape": [1]},
            {"name": "confidence", "datatype": "FP32", "shape": [1]},
        ],
    }
    (out / "model.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(accuracy, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/sentiment"))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples/models/sentiment"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts, labels, sources = read_corpus(args.data)
    indices = np.arange(len(texts))
    train_idx, test_idx = train_test_split(indices, test_size=0.15, random_state=args.seed, stratify=labels)
    features = binary_features(texts)
    regularisation = choose_regularisation(features, labels, train_idx, args.seed)
    ratios = nb_ratios(features[train_idx], labels[train_idx])
    classifier = LogisticRegression(C=regularisation, max_iter=3000).fit(
        scaled(features[train_idx], ratios), labels[train_idx]
    )
    model = SentimentModel(
        torch.from_numpy(ratios),
        torch.from_numpy(classifier.coef_[0].astype(np.float32)),
        float(classifier.intercept_[0]),
    )

    # Held-out accuracy measured through the exported program itself, as the server will run it.
    scripted = torch.jit.script(model)
    test_texts = [texts[i] for i in test_idx]
    _, predicted, _ = scripted(test_texts)
    correct = predicted.view(-1).numpy() == labels[test_idx]
    accuracy = {
        "C": regularisation,
        "held_out_accuracy": float(correct.mean()),
        "held_out_size": int(len(test_idx)),
        "train_size": int(len(train_idx)),
    }
    for source in sorted(set(sources)):
        mask = np.array([sources[i] == source for i in test_idx])
        accuracy[f"held_out_accuracy_{source}"] = float(correct[mask].mean())
    write_model(args.out, model, accuracy)
    print(json.dumps(accuracy, indent=2))


if __name__ == "__main__":
    main()
