"""Your own CNN on your own tensors, trained by scalesgd's data-parallel trainer through ``scalesgd.fit``.

    python examples/own_cnn.py                     # 2 local workers, a few seconds on a laptop
    python examples/own_cnn.py --steps 3 --n 256   # tiny (what the tests run)

The data: 8x8 one-channel images of a bright bar, horizontal (class 0) or vertical (class 1), plus noise.
Generated here, so nothing is downloaded. The model is a class defined in this script: ``fit`` pickles it
to the workers, which re-import this script, hence the ``if __name__ == "__main__":`` guard.
"""

import argparse

import torch
from torch import nn

import scalesgd


class SmallCNN(nn.Module):
    """conv3x3 → ReLU → conv3x3 → ReLU → global average pool → linear. No BatchNorm (per-example gradients
    need examples that do not see each other)."""

    def __init__(self, channels: int = 8, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, 8, 8) and labels (n,): a bar in a random row (label 0) or column (label 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, 8, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1.0
        else:
            x[i, 0, :, pos[i]] += 1.0
    return x, y


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="training examples")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args()
    summary = scalesgd.fit(
        SmallCNN(channels=8),                # an instance: its weights are the start on every worker
        make_bars(args.n, seed=0),           # (x, y) tensors: indexed in memory
        eval_data=make_bars(512, seed=1),
        workers=args.workers,
        global_batch_size=64, lr=0.1, steps=args.steps, eval_every=max(args.steps // 3, 1),
        run_dir=args.run_dir, progress=False,
    )
    print(f"test accuracy {summary['final_test_accuracy']:.3f} after {summary['steps']} steps; "
          f"run directory {summary['run_dir']}")
