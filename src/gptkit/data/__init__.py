"""Corpora in, token shards out, batches for training."""

from .corpora import Corpus, DataError, Document, embedded_corpus, read_sources
from .pipeline import merge, prepare
from .shards import TokenShards

__all__ = ["Corpus", "DataError", "Document", "embedded_corpus", "read_sources", "TokenShards", "prepare", "merge"]
