"""Curation stages as plain functions over records tables and embeddings (no CLI, no Ray)."""

__version__ = "0.1.0"
