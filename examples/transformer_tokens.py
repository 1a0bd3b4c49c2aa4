"""A small transformer on token sequences, with your own model and data named on the command line:

    scalesgd train --model examples/transformer_tokens.py:make_model \\
                   --dataset examples/transformer_tokens.py:make_data \\
                   --workers 2 --global-batch-size 64 --lr 0.05 --epochs 3

The task (generated here, nothing downloaded): sequences of 16 tokens from a vocabulary of 8; the label is
the token that occurs most often (ties go to the smallest). The model is an embedding, a learned position
embedding, PyTorch's ``nn.TransformerEncoder`` (no BatchNorm, so per-example gradients are defined), mean
pooling over positions and a linear head. ``make_model`` takes ``num_outputs`` and ``width`` (the trainer passes
the keywords a function accepts: ``--width 64`` reaches it) and ignores the input shape.
"""

import torch
from torch import nn

VOCAB = 8
LENGTH = 16


class TokenClassifier(nn.Module):
    def __init__(self, num_outputs: int, width: int, heads: int = 2, layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        # Positions through an Embedding fed (B, LENGTH) indices, so every parameter sits in a layer whose
        # per-example gradient norms scalesgd computes directly (--diversity exact).
        self.position = nn.Embedding(LENGTH, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, LENGTH) int64
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # (B, LENGTH)
        h = self.encoder(self.embed(tokens) + self.position(positions))  # (B, LENGTH, width)
        return self.head(h.mean(dim=1))  # (B, num_outputs)


def make_model(*, num_outputs: int, width: int = 32) -> nn.Module:
    """The model; ``num_outputs`` is the vocabulary size here (the label is a token)."""
    return TokenClassifier(num_outputs, width)


def majority_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences (n, LENGTH) of token ids and their most frequent token (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    counts = torch.nn.functional.one_hot(x, VOCAB).sum(dim=1)  # (n, VOCAB)
    return x, counts.argmax(dim=1)


def make_data(n_train: int = 4096, n_test: int = 1024):
    """(train, test) as tensors (x, y): x int64 token ids, y int64 labels."""
    return majority_task(n_train, seed=0), majority_task(n_test, seed=1)
