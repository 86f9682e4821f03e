"""Wiring: config, CLI, stage runner, manifests and executors."""
