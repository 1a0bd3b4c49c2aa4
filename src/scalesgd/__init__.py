"""scalesgd: synchronous data-parallel minibatch SGD on torch.distributed, with gradient diversity."""

__version__ = "0.1.0"
