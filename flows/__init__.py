"""Prefect flows: ``train-all`` (the study pipeline) and ``reindex`` (scheduled inbox pick-up)."""

from flows.reindex import reindex
from flows.train_all import train_all, train_all_steps

__all__ = ["reindex", "train_all", "train_all_steps"]
