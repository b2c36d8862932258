"""Offline training side of membank: corpus, retriever (hierarchical k-means), memory training.

Modules here run on a workstation, never on a device. `training.data` builds the element corpus
from the `mendeleev` database, `training.cluster` builds the frozen router over its embeddings.
"""
