"""Curation stages as plain functions over records tables and embeddings (no CLI, no Ray)."""

from curate.blas import prefer_fast_blas

prefer_fast_blas()  # before any faiss import: its OpenBLAS picks kernels when it loads

__version__ = "0.1.0"
