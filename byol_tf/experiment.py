"""One experiment flow: pretrain -> evaluate -> export, used by `byol-tf train` and the TFX Trainer.

    result = experiment.run(config)                # byol-tf train
    result = experiment.run(config, run_dir=..., export_dir=..., evaluate=False,
                            dataset=..., num_examples=..., backup_dir=...)   # the TFX Trainer

A run folder holds `config.yaml`, TensorBoard `logs/`, `encoder.keras` (training), then
`evaluation.json` (the linear-evaluation report, when evaluated and the data has labels),
and the SavedModel export (`export/` unless `export_dir` says otherwise) with `metrics.json`:
the last epoch's training metrics and, when measured, the evaluation report.
In a multi-worker run every worker trains; only the chief evaluates and exports.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from byol_tf import config as config_lib
from byol_tf import evaluation, export, fileio, training

logger = logging.getLogger(__name__)

EVALUATION_FILE = export.EVALUATION_FILE
EXPORT_DIR = training.EXPORT_DIR


@dataclasses.dataclass
class ExperimentResult:
    """What one experiment produced.

    Attributes:
        training: the pretraining run (model, history, run folder).
        report: the linear-evaluation report, or None when not evaluated (or unlabelled data).
        export_dir: the SavedModel folder, or None on a non-chief worker.
        metrics: what the export's metrics.json holds.
    """

    training: training.TrainResult
    report: evaluation.EvaluationReport | None
    export_dir: str | None
    metrics: dict[str, Any]

    @property
    def encoder(self) -> keras.Model:
        return self.training.encoder


def final_training_metrics(history: dict) -> dict[str, float]:
    """The last epoch's value of each metric Keras logged."""
    return {name: float(values[-1]) for name, values in history.items() if len(values)}


def run(
    config: config_lib.Config,
    *,
    run_dir: str | None = None,
    export_dir: str | None = None,
    evaluate: bool = True,
    dataset: tf.data.Dataset | Callable[[tf.distribute.InputContext | None], tf.data.Dataset] | None = None,
    num_examples: int | None = None,
    num_classes: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    backup_dir: str | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    holdout_data: config_lib.DataConfig | None = None,
) -> ExperimentResult:
    """Pretrains (resuming from a backup if there is one), evaluates and exports the encoder.

    Args:
        config: the experiment.
        run_dir: output folder (any `tf.io.gfile` path); default `config.train.run_dir`.
        export_dir: the SavedModel folder; default RUN_DIR/export. Replaced if it exists.
        evaluate: run `evaluation.evaluate` on `config.data` after training (skipped, with a
            log line, when the data has no labels).
        dataset, num_examples, num_classes, strategy, backup_dir, extra_callbacks,
            holdout_data: as `training.train`.

    Returns:
        The training result, the report, where the export went, and its metrics.
    """
    result = training.train(
        config,
        run_dir=run_dir,
        dataset=dataset,
        num_examples=num_examples,
        num_classes=num_classes,
        strategy=strategy,
        extra_callbacks=extra_callbacks,
        backup_dir=backup_dir,
        holdout_data=holdout_data,
        # Until the export is written: a kill during evaluation or export resumes at the
        # last step instead of training again.
        keep_backup=True,
    )
    metrics: dict[str, Any] = {
        "training": final_training_metrics(result.history),
        "steps_per_epoch": result.steps_per_epoch,
    }
    if not result.is_chief:
        result.delete_backup()
        return ExperimentResult(training=result, report=None, export_dir=None, metrics=metrics)
    logger.info("encoder saved to %s", result.encoder_path)

    report = None
    if evaluate:
        try:
            report = evaluation.evaluate(result.encoder, config)
        except evaluation.NoLabelsError as error:
            logger.info("no linear evaluation: %s", error)
        else:
            metrics["evaluation"] = report.to_dict()
            path = fileio.join(result.run_dir, EVALUATION_FILE)
            fileio.write_json(path, report.to_dict())
            logger.info("evaluation written to %s", path)

    export_dir = export.export_encoder(
        result.encoder,
        export_dir or fileio.join(result.run_dir, EXPORT_DIR),
        config.augment.image_size,
        config=config,
        metrics=metrics,
        overwrite=True,
    )
    logger.info("SavedModel exported to %s", export_dir)
    result.delete_backup()
    return ExperimentResult(training=result, report=report, export_dir=export_dir, metrics=metrics)
