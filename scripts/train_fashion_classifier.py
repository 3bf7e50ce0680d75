"""Train the Fashion-MNIST feature network (``fewstep:fashion-classifier``): a small CNN
(``fewstep.eval.classifier.ImageClassifier``, 28×28 grey, 128-d features) whose penultimate layer is the feature
space of the benchmark's fast FID and whose logits give the class accuracy of conditional samples.

    python scripts/train_fashion_classifier.py           # writes fewstep/assets/fashion_classifier/

Trains on the 60,000 train images with ±2-pixel shifts and light pixel noise (so its features are not brittle on
generated images), reports accuracy on the 10,000 test images, saves fp16 weights. Seeded; 2 epochs, 22 minutes on two
CPU threads. Data: ``--data DIR``, else ``$FEWSTEP_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fewstep.data.fashion import FashionMNISTDataset
from fewstep.eval.classifier import ImageClassifier

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "fashion_classifier"
COMMAND = "python scripts/train_fashion_classifier.py"


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2, noise: float = 0.05) -> torch.Tensor:
    """Random ±``shift``-pixel translations (background ``-1`` padding) and Gaussian pixel noise, ``x`` in ``[-1, 1]``
    ``[b, 1, s, s]``."""
    b, _, size, _ = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)  # [b, 1, s + 2·shift, s + 2·shift]
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator)
    rows = (torch.arange(size)[None, :] + dy[:, None])[:, :, None]  # [b, s, 1]
    cols = (torch.arange(size)[None, :] + dx[:, None])[:, None, :]  # [b, 1, s]
    shifted = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    return (shifted + noise * torch.randn(shifted.shape, generator=generator)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: ImageClassifier, dataset: FashionMNISTDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on every image of ``dataset``."""
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))))
        correct += int((model(x).argmax(-1) == y).sum())
    return correct / len(dataset)


def train(args: argparse.Namespace) -> tuple[ImageClassifier, float]:
    """Train with AdamW + one-cycle LR and label smoothing; returns the model and the training seconds."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = FashionMNISTDataset("train", args.data)
    model = ImageClassifier(1, 28, args.width, args.num_features, 10, args.dropout)
    steps_per_epoch = -(-len(data) // args.batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="fashion classifier", unit="step")
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(data), generator=generator).split(args.batch_size):
            x, y = data.batch(idx)
            loss = F.cross_entropy(model(augment(x, generator)), y, label_smoothing=0.05)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data", type=Path, default=None, help="directory of the Fashion-MNIST idx files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="save fp32 weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, seconds = train(args)
    test_acc = accuracy(model, FashionMNISTDataset("test", args.data))
    train_acc = accuracy(model, FashionMNISTDataset("train", args.data))
    out = (model.half() if args.fp16 else model).save(
        args.out,
        test_accuracy=round(test_acc, 4),
        train_accuracy=round(train_acc, 4),
        data="Fashion-MNIST train split (60,000 images, fewstep.data.fashion), [-1, 1]",
        features="penultimate layer (GELU of a Linear), used for the Fashion-MNIST classifier FID",
        command=COMMAND,
        train_seconds=round(seconds),
        **{k: v for k, v in vars(args).items() if k in ("epochs", "batch_size", "lr", "seed", "threads", "fp16")},
    )
    print(f"test accuracy {test_acc:.4f}, train accuracy {train_acc:.4f}, trained in {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main()
