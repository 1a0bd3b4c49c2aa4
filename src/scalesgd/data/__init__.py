"""Data sets and per-rank sharding of global batches."""

from scalesgd.data.datasets import Dataset, load_data, load_dataset

__all__ = ["Dataset", "load_data", "load_dataset"]
