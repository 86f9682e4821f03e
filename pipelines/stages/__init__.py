"""One runner per stage: `run(cfg, force) -> StageResult` (embed returns one result per embedding).

Runners import the framework (`pipelines.framework`, `manifest`, `aligned`, `embedding`), the
executors and `curate/` or `train/`; never each other and never `pipelines.run`.
"""
