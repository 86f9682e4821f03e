"""One runner per stage: `run(cfg, force) -> StageResult` (embed returns one result per embedding).

Runners import the framework (`pipelines.framework`, `manifest`, `aligned`, `embedding`,
`copy_images`, `config`), the executors and `curate/` or `train/`; never each other, never
`pipelines.run`, the entry points or the UI (tests/test_imports.py holds this as an allow-list).
"""
