"""Offline training side of membank: corpus, retriever (hierarchical k-means), memory training.

Modules here run on a workstation, never on a device. `training.data` builds the element corpus
from the `mendeleev` database, `training.cluster` builds the frozen router over its embeddings,
`training.train` runs the phases (anchor, co-training, frozen anchor) with the lazy bank
optimizer, checkpoints and data parallelism; ARCHITECTURE.md ("Training") maps the rest.
"""
