"""LinearEval: scores the Trainer's encoder with the linear protocol and blesses it or not.

A thin adapter over `byol_tf.evaluation.evaluate`: it streams the train and eval splits of
the `Examples` artifact through the config's linear protocol (`evaluation.protocol`),
evaluates the encoder and the baselines (random-init encoder of the same architecture;
raw pixels under the transfer protocol), and writes

- `evaluation` (`byol_tf.LinearEvalMetrics`): `linear_eval.json` with the rows (validation
  top-1, test top-1 / top-5, kNN per representation) and the blessing decision; each row's
  `<name>_val_top1` and `<name>_top1` (test) also as float custom properties.
- `blessing` (`ModelBlessing`, what the standard Pusher reads): `blessed` = 1 only if the
  byol **validation** top-1 >= random-init validation top-1 + `blessing_margin` AND >= the
  validation top-1 of the latest blessed encoder (`baseline_blessing`, resolved from ML
  Metadata by the pipeline's LatestBlessedModelStrategy resolver). The validation split is
  carved from the training images (`evaluation.validation_fraction`, seeded, or pooled over
  `evaluation.validation_folds` folds of them); the test split (`eval`, held out of
  pretraining) is reported and never decides which encoder is deployed. The blessing
  carries `current_model_id` (so the resolver can find it next run) and `byol_val_top1` (so
  the next run can compare with it).

With `evaluation.finetune_in_pipeline: true` (default off: a training run per learning
rate, label fraction and encoder) it also runs `byol_tf.finetune.evaluate` on the same
splits: the encoder and a random-init one fine-tuned on `evaluation.finetune_label_fractions`
of the training labels. `linear_eval.json` then holds those rows under "finetune" (with
their "table"), and each is a float custom property `finetune_<fraction>_<name>_<top1|top5|
val_top1>` (e.g. `finetune_0.1_byol_top1`). Fine-tuning is reported, never part of the
blessing.

Accuracies are fractions in [0, 1]; `blessing_margin=0.01` is one percentage point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import io_utils, path_utils

from byol_tfx.components import examples_io

logger = logging.getLogger(__name__)

METRICS_FILE = "linear_eval.json"
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
# Custom property names the Evaluator uses too; Pusher and LatestBlessedModelStrategy read them.
BLESSED_KEY = "blessed"
CURRENT_MODEL_KEY = "current_model"
CURRENT_MODEL_ID_KEY = "current_model_id"
BASELINE_MODEL_KEY = "baseline_model"
BASELINE_MODEL_ID_KEY = "baseline_model_id"
MESSAGE_KEY = "blessing_message"
BYOL_VAL_TOP1_KEY = "byol_val_top1"
# Accuracies are count / N: a tolerance keeps 0.51 >= 0.50 + 0.01 true in floating point.
_TOLERANCE = 1e-9


class LinearEvalMetrics(types.Artifact):
    """Linear-evaluation results of one encoder: `linear_eval.json` (rows byol / random_init / raw_pixels)."""

    TYPE_NAME = "byol_tf.LinearEvalMetrics"


@dataclasses.dataclass(frozen=True)
class BlessingDecision:
    """Whether an encoder is blessed, and why, in one sentence."""

    blessed: bool
    message: str


def decide_blessing(
    byol_val_top1: float,
    random_init_val_top1: float,
    margin: float,
    baseline_val_top1: float | None = None,
    same_model_as_baseline: bool = False,
) -> BlessingDecision:
    """The blessing rule, on validation accuracy: beat random init by `margin`, do not regress.

    Args:
        byol_val_top1: linear validation top-1 of the candidate encoder.
        random_init_val_top1: the same for a random-init encoder of the same architecture.
        margin: required gain over random init (fraction; 0.01 = one point).
        baseline_val_top1: validation top-1 of the latest blessed encoder, None when there
            is none.
        same_model_as_baseline: the candidate IS the latest blessed encoder (a cached
            Trainer on a rerun); it is not compared with itself.

    Returns:
        The decision and a readable reason.
    """
    if byol_val_top1 + _TOLERANCE < random_init_val_top1 + margin:
        return BlessingDecision(
            False,
            f"not blessed: byol validation top-1 {byol_val_top1:.4f} < random-init validation top-1 "
            f"{random_init_val_top1:.4f} + margin {margin:.4f}",
        )
    reason = (
        f"byol validation top-1 {byol_val_top1:.4f} >= random-init validation top-1 "
        f"{random_init_val_top1:.4f} + margin {margin:.4f}"
    )
    if baseline_val_top1 is None:
        return BlessingDecision(True, f"blessed: {reason}; no earlier blessed encoder")
    if same_model_as_baseline:
        return BlessingDecision(True, f"blessed: {reason}; it is the latest blessed encoder itself")
    if byol_val_top1 + _TOLERANCE < baseline_val_top1:
        return BlessingDecision(
            False,
            f"not blessed: byol validation top-1 {byol_val_top1:.4f} < latest blessed encoder's "
            f"{baseline_val_top1:.4f}",
        )
    return BlessingDecision(True, f"blessed: {reason}, and >= latest blessed encoder's {baseline_val_top1:.4f}")


def baseline_val_top1_of(blessing: types.Artifact) -> float:
    """Validation top-1 recorded on a blessing written by LinearEval (property, else its JSON).

    Raises:
        ValueError: the blessing has neither (it was not written by this LinearEval).
    """
    if blessing.has_custom_property(BYOL_VAL_TOP1_KEY):
        return float(blessing.get_float_custom_property(BYOL_VAL_TOP1_KEY))
    path = os.path.join(blessing.uri, METRICS_FILE)
    if fileio.exists(path):
        with fileio.open(path) as stream:
            value = json.loads(stream.read())["rows"]["byol"].get("val_top1")
        if value is not None:
            return float(value)
    raise ValueError(
        f"the latest blessed encoder's blessing {blessing.uri!r} records no byol validation top-1 "
        f"(neither a {BYOL_VAL_TOP1_KEY!r} property nor a val_top1 in {METRICS_FILE}); was it "
        "written by an older LinearEval? Run with --no-cache or a new pipeline name to start afresh."
    )


def load_encoder(model: types.Artifact):
    """The encoder the Trainer saved as `encoder.keras` in the model's serving folder."""
    import keras  # deferred: the component definition must not import Keras

    from byol_tf import export, fileio

    path = fileio.join(path_utils.serving_model_path(model.uri), export.ENCODER_FILE)
    if not fileio.exists(path):
        raise ValueError(f"model artifact {model.uri!r} has no {export.ENCODER_FILE} in its serving folder")
    # Keras reads gs:// (any tf.io.gfile path) itself: nothing is staged here.
    return keras.models.load_model(path, compile=False)


class Executor(base_executor.BaseExecutor):
    """Runs `byol_tf.evaluation.evaluate` on the Examples artifact and writes metrics + blessing."""

    def Do(self, input_dict: dict[str, list[types.Artifact]], output_dict, exec_properties: dict[str, Any]):
        from byol_tf import config as config_lib, evaluation, finetune

        config = config_lib.from_json(exec_properties["config"])
        margin = float(exec_properties["blessing_margin"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        model = artifact_utils.get_single_instance(input_dict["model"])
        baseline_blessings = input_dict.get("baseline_blessing") or []
        baseline_models = input_dict.get("baseline_model") or []
        metrics = artifact_utils.get_single_instance(output_dict["evaluation"])
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])

        train_split = exec_properties.get("train_split") or "train"
        eval_split = exec_properties.get("eval_split") or "eval"
        # Streamed, never loaded whole: the protocol reads the splits batch by batch.
        datasets = tuple(
            examples_io.image_dataset(examples_io.split_file_patterns(examples, split))
            for split in (train_split, eval_split)
        )
        encoder = load_encoder(model)
        # Baselines always: the blessing rule needs the random-init row.
        report = evaluation.evaluate(encoder, config, baselines=True, datasets=datasets, progress=False)
        finetuned = None
        if config.evaluation.finetune_in_pipeline:
            finetuned = finetune.evaluate(encoder, config, baselines=True, datasets=datasets, progress=False)

        rows = report.rows
        baseline_blessing = baseline_blessings[0] if baseline_blessings else None
        baseline_model = baseline_models[0] if baseline_models else None
        baseline_val_top1 = baseline_val_top1_of(baseline_blessing) if baseline_blessing is not None else None
        decision = decide_blessing(
            rows[evaluation.BYOL]["val_top1"],
            rows[evaluation.RANDOM_INIT]["val_top1"],
            margin,
            baseline_val_top1,
            same_model_as_baseline=baseline_model is not None and baseline_model.id == model.id,
        )

        document = report.to_dict()
        document["table"] = report.format_table()
        if finetuned is not None:
            document["finetune"] = {**finetuned.to_dict(), "table": finetuned.format_table()}
        document["blessing"] = {
            "blessed": decision.blessed,
            "message": decision.message,
            "margin": margin,
            "baseline_val_top1": baseline_val_top1,
            "baseline_model": baseline_model.uri if baseline_model is not None else None,
            "model": model.uri,
            "train_split": train_split,
            "eval_split": eval_split,
        }
        text = json.dumps(document, indent=2, sort_keys=True)
        io_utils.write_string_file(os.path.join(metrics.uri, METRICS_FILE), text)
        for name, row in rows.items():
            metrics.set_float_custom_property(f"{name}_val_top1", float(row["val_top1"]))
            metrics.set_float_custom_property(f"{name}_top1", float(row["top1"]))
            metrics.set_float_custom_property(f"{name}_top5", float(row["top5"]))
        if finetuned is not None:
            for key, value in finetuned.metric_values().items():
                metrics.set_float_custom_property(key, value)
        metrics.set_int_custom_property(BLESSED_KEY, int(decision.blessed))

        io_utils.write_string_file(os.path.join(blessing.uri, METRICS_FILE), text)
        io_utils.write_string_file(
            os.path.join(blessing.uri, BLESSED_FILE if decision.blessed else NOT_BLESSED_FILE), ""
        )
        blessing.set_int_custom_property(BLESSED_KEY, int(decision.blessed))
        blessing.set_string_custom_property(CURRENT_MODEL_KEY, model.uri)
        blessing.set_int_custom_property(CURRENT_MODEL_ID_KEY, model.id)
        blessing.set_float_custom_property(BYOL_VAL_TOP1_KEY, float(rows[evaluation.BYOL]["val_top1"]))
        blessing.set_string_custom_property(MESSAGE_KEY, decision.message)
        if baseline_model is not None:
            blessing.set_string_custom_property(BASELINE_MODEL_KEY, baseline_model.uri)
            blessing.set_int_custom_property(BASELINE_MODEL_ID_KEY, baseline_model.id)
        logger.info("LinearEval: %s", decision.message)


class LinearEvalSpec(ComponentSpec):
    """Inputs, outputs and parameters of LinearEval."""

    PARAMETERS = {
        # The experiment, byol_tf.config.to_json(config): protocol + architecture.
        "config": ExecutionParameter(type=str),
        "blessing_margin": ExecutionParameter(type=float),
        "train_split": ExecutionParameter(type=str, optional=True),
        "eval_split": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "model": ChannelParameter(type=standard_artifacts.Model),
        "baseline_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
        "baseline_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
    }
    OUTPUTS = {
        "evaluation": ChannelParameter(type=LinearEvalMetrics),
        "blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
    }


class LinearEval(base_component.BaseComponent):
    """Linear evaluation of the Trainer's encoder with baselines, and its blessing.

    Args:
        examples: `Examples` with `train_split` (classifier training) and `eval_split`
            (held out; the reported accuracies).
        model: the Trainer's `Model` (`Format-Serving/encoder.keras`).
        config: the experiment's canonical JSON (`byol_tf.config.to_json`).
        blessing_margin: required top-1 gain over the random-init encoder (fraction), a
            float or a RuntimeParameter.
        baseline_model: the latest blessed `Model` (optional; a resolver's output).
        baseline_blessing: its `ModelBlessing` from an earlier LinearEval (optional).
        train_split: split the linear classifier trains on (default "train").
        eval_split: held-out split (default "eval").
    """

    SPEC_CLASS = LinearEvalSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(
        self,
        examples: types.BaseChannel,
        model: types.BaseChannel,
        config: str,
        blessing_margin=0.01,
        baseline_model: types.BaseChannel | None = None,
        baseline_blessing: types.BaseChannel | None = None,
        train_split: str = "train",
        eval_split: str = "eval",
    ):
        spec = LinearEvalSpec(
            examples=examples,
            model=model,
            baseline_model=baseline_model,
            baseline_blessing=baseline_blessing,
            config=config,
            blessing_margin=blessing_margin,
            train_split=train_split,
            eval_split=eval_split,
            evaluation=channel.Channel(type=LinearEvalMetrics),
            blessing=channel.Channel(type=standard_artifacts.ModelBlessing),
        )
        super().__init__(spec=spec)
