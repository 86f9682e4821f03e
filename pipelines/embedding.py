"""Embedders as pipelines/ sees them: the library registry plus our own trainer's checkpoints.

`curate/` never imports `train/`, so the `checkpoint:` spec kind is registered here, and every
runner (and the Ray actors) loads models through `load_embedder` below.
"""

from __future__ import annotations


def _trainer_checkpoint(args: list[str]):
    """`checkpoint:<teacher_backbone.pt>`: a teacher backbone saved by our trainer (train/)."""
    from curate.embedders import eval_transform
    from train.models import load_backbone

    model = load_backbone(args[0])
    return model, eval_transform(model.image_size, model.mean, model.std)


def load_embedder(spec: str, device="cpu"):
    """curate.embedders.load_embedder with the trainer's `checkpoint:` kind registered."""
    from curate import embedders

    embedders.register_kind("checkpoint", _trainer_checkpoint, "checkpoint:<teacher_backbone.pt>")
    return embedders.load_embedder(spec, device)
