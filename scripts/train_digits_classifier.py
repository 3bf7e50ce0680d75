"""Train the digits feature network: a small CNN whose penultimate layer is the digits FID feature space and whose
logits give the class accuracy of conditional samples (``fewstep.eval.digits``).

    python scripts/train_digits_classifier.py            # writes fewstep/assets/digits_classifier/

Seeded and deterministic on a CPU (about 20 s on one core). Trains on the digits train split with ±1-pixel shifts
and light pixel noise (so its features are not brittle on generated digits), reports accuracy on the test split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.eval.digits import DigitsClassifier, digits_images

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "digits_classifier"


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel shifts (zero = background padding) and Gaussian pixel noise, ``x`` in ``[-1, 1]``."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # [b, 1, 10, 10]
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, :, None]  # [b, 8, 1]
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, :]  # [b, 1, 8]
    shifted = padded[torch.arange(x.shape[0])[:, None, None], 0, rows, cols].unsqueeze(1)
    return (shifted + 0.05 * torch.randn(shifted.shape, generator=generator)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    x_train, y_train = digits_images("train")
    x_test, y_test = digits_images("test")
    x_train, x_test = x_train * 2 - 1, x_test * 2 - 1  # [0, 1] → the classifier's [-1, 1]

    model = DigitsClassifier()
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for idx in order.split(args.batch_size):
            loss = F.cross_entropy(model(augment(x_train[idx], generator)), y_train[idx], label_smoothing=0.05)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test accuracy {acc:.4f}", flush=True)

    model.eval()
    with torch.no_grad():
        test_acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
        train_acc = (model(x_train).argmax(-1) == y_train).float().mean().item()
    out = model.save(
        args.out,
        test_accuracy=round(test_acc, 4),
        train_accuracy=round(train_acc, 4),
        data="sklearn load_digits, fewstep.data.digits.DigitsDataset train split (seed 0), [-1, 1]",
        features="penultimate layer (GELU of a Linear), used for the digits FID",
        command="python scripts/train_digits_classifier.py",
        seed=args.seed,
        epochs=args.epochs,
    )
    print(f"test accuracy {test_acc:.4f}, train accuracy {train_acc:.4f}, {time.perf_counter() - start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
