"""Trains the `digits` example model and writes it to examples/models/digits/.

Data: scikit-learn's 8x8 handwritten digits (1797 images, pixel values 0..16), a stratified 80/20
train/test split with a fixed seed. Model: a small CNN in torch, exported to ONNX with a dynamic
batch dimension. The graph returns class probabilities, the predicted label and its confidence.

    python scripts/train_digits.py [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class DigitsNet(nn.Module):
    """image [N, 8, 8] with pixels 0..16 -> logits [N, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image.unsqueeze(1) / 16.0))


class DigitsClassifier(nn.Module):
    """The served graph: probabilities [N, 10], label [N, 1] (int64), confidence [N, 1]."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.net(image), dim=-1)
        confidence, label = probabilities.max(dim=-1, keepdim=True)
        return probabilities, label, confidence


def train(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()


def export_onnx(classifier: DigitsClassifier, path: Path) -> None:
    example = torch.zeros(2, 8, 8)
    # The TorchScript-based exporter: it needs no onnxscript and yields a small, plain graph.
    torch.onnx.export(
        classifier,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["probabilities", "label", "confidence"],
        dynamic_axes={name: {0: "batch"} for name in ("image", "probabilities", "label", "confidence")},
        opset_version=17,
        dynamo=False,
    )


def write_config(out: Path) -> None:
    config = {
        "name": "digits",
        "runtime": "onnx",
        "artifact": "model.onnx",
        "max_batch_size": 64,
        "max_queue_delay_ms": 2,
        "labels": [str(d) for d in range(10)],
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [8, 8]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [10]},
            {"name": "label", "datatype": "INT64", "shape": [1]},
            {"name": "confidence", "datatype": "FP32", "shape": [1]},
        ],
    }
    (out / "model.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples/models/digits"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = digits.images.astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    net = DigitsNet()
    train(net, torch.from_numpy(train_x), torch.from_numpy(train_y), args.epochs, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(DigitsClassifier(net), args.out / "model.onnx")
    write_config(args.out)

    # Test accuracy measured through the exported ONNX graph, as the server will run it.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(args.out / "model.onnx"), providers=["CPUExecutionProvider"])
    (predicted,) = session.run(["label"], {"image": test_x})
    accuracy = {
        "test_accuracy": float((predicted.reshape(-1) == test_y).mean()),
        "test_size": len(test_y),
        "train_size": len(train_y),
    }
    (args.out / "metrics.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    print(json.dumps(accuracy, indent=2))


if __name__ == "__main__":
    main()
