"""Corpora in, token shards out, batches for training."""

from .corpora import DataError, Document, embedded_corpus, read_sources
from .shards import TokenShards, prepare

__all__ = ["DataError", "Document", "embedded_corpus", "read_sources", "TokenShards", "prepare"]
