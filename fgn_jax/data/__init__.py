"""Datasets: synthetic generators, real loaders and federated partitioning."""
