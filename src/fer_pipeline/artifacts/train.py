"""reports/train/<name>/metrics.json: what training measured, written by the train stage
(DVC metrics) and read by evaluate (the comparison, the champion rule) and export.

Keys and their order are the file's: re-writing a committed file gives the same bytes, so its
DVC hash does not move. Keys added over time are optional: older trainings lack them.
"""

from __future__ import annotations

from pydantic import Field

from fer_pipeline.artifacts.base import Artifact


class TrainMetrics(Artifact):
    """The kept (best) epoch's model on the whole train and val splits, and how it was made."""

    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float = Field(description="accuracy on the val split: what the champion rule ranks")
    best_epoch: int = Field(description="1-based epoch whose model was kept (by the monitor on val)")
    epochs_run: int
    pretrained: bool = Field(description="the network started from pretrained weights (transfer "
                                         "models with weights: imagenet or a file)")
    trainable_params: int
    train_seconds: float
    train_images: int | None = None
    seconds_per_epoch: float | None
    cpu_seconds_per_epoch: float | None = None
    data_md5_train: str | None = Field(None, description="md5 of the train split it was trained on")
    data_md5_val: str | None = Field(None, description="md5 of the val split it was validated on: "
                                                       "evaluate ranks only models validated on "
                                                       "the current one")
