"""ServingCheck: the Trainer's SavedModel must load in a fresh process and answer its warm-up requests.

What TFX's InfraValidator does, without a model-server container: a thin adapter over
`byol_tf.serving.check_in_fresh_process`, which starts a new Python interpreter, loads
the candidate (`Format-Serving/` of the Model artifact) as TF Serving would, replays
`assets.extra/tf_serving_warmup_requests` and checks that every answer has the
signature's outputs, the request's batch size and finite values, under a timeout. The
export must also take images of the experiment's `augment.image_size` in `embed_images`,
and its warm-up requests must call `serving_default`.

Output `blessing` is a standard `InfraBlessing`, what the Pusher's `infra_blessing` reads:

- custom property `blessed` (1 / 0, as InfraValidator writes it) and `blessing_message`
  (one sentence: what was answered, or the first thing that failed);
- files: `INFRA_BLESSED` or `INFRA_NOT_BLESSED` (InfraValidator's marker names) and
  `serving_check.json` (the decision and the report: each request's batch size and output
  shapes, the signatures as loaded).

The Pusher pushes nothing unless both this and LinearEval's blessing say blessed.
"""

from __future__ import annotations

from typing import Any

from absl import logging
from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.types import artifact_utils, channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import path_utils

from byol_tfx.components.linear_eval import BLESSED_KEY, MESSAGE_KEY, BlessingDecision

REPORT_FILE = "serving_check.json"
# The marker files TFX's InfraValidator writes; tools that look for them find ours.
BLESSED_FILE = "INFRA_BLESSED"
NOT_BLESSED_FILE = "INFRA_NOT_BLESSED"


def decide(report, image_size: int) -> BlessingDecision:
    """Blessed only if every warm-up request was answered and the export fits the experiment.

    Args:
        report: `byol_tf.serving.ServingReport` of the candidate.
        image_size: the experiment's `augment.image_size`, what `embed_images` must take.

    Returns:
        The decision and its reason, starting "blessed: " or "not blessed: ".
    """
    from byol_tf import export

    if not report.passed:
        return BlessingDecision(False, f"not blessed: {report.message}")
    called = {request["signature"] for request in report.requests}
    if export.SERVING_SIGNATURE not in called:
        return BlessingDecision(
            False, f"not blessed: the warm-up requests never call {export.SERVING_SIGNATURE} (they call {sorted(called)})"
        )
    expected = [None, image_size, image_size, 3]
    embed = report.signatures.get(export.EMBED_IMAGES_SIGNATURE, {}).get("inputs", {})
    if embed.get(export.IMAGES_INPUT) != expected:
        return BlessingDecision(
            False,
            f"not blessed: {export.EMBED_IMAGES_SIGNATURE} takes {embed or 'nothing (no such signature)'}, "
            f"but the experiment's augment.image_size {image_size} means {export.IMAGES_INPUT} of shape {expected}",
        )
    return BlessingDecision(True, f"blessed: {report.message}")


class Executor(base_executor.BaseExecutor):
    """Runs the serving check on the Trainer's export in a fresh process and writes the InfraBlessing."""

    def Do(self, input_dict: dict[str, list[types.Artifact]], output_dict, exec_properties: dict[str, Any]):
        from byol_tf import config as config_lib
        from byol_tf import fileio, serving

        config = config_lib.from_json(exec_properties["config"])
        model = artifact_utils.get_single_instance(input_dict["model"])
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        export_dir = path_utils.serving_model_path(model.uri)

        logging.info("ServingCheck: answering the warm-up requests of %s in a fresh process", export_dir)
        report = serving.check_in_fresh_process(export_dir, timeout_seconds=serving.DEFAULT_TIMEOUT_SECONDS)
        decision = decide(report, config.augment.image_size)

        document = {"blessed": decision.blessed, "message": decision.message, "model": export_dir, "report": report.to_dict()}
        fileio.write_json(fileio.join(blessing.uri, REPORT_FILE), document)
        fileio.write_text(fileio.join(blessing.uri, BLESSED_FILE if decision.blessed else NOT_BLESSED_FILE), "")
        blessing.set_int_custom_property(BLESSED_KEY, int(decision.blessed))
        blessing.set_string_custom_property(MESSAGE_KEY, decision.message)
        logging.info("ServingCheck: %s", decision.message)


class ServingCheckSpec(ComponentSpec):
    """Inputs, outputs and parameters of ServingCheck."""

    PARAMETERS = {
        # The experiment, byol_tf.config.to_json(config): the image size the export must take.
        "config": ExecutionParameter(type=str),
    }
    INPUTS = {"model": ChannelParameter(type=standard_artifacts.Model)}
    OUTPUTS = {"blessing": ChannelParameter(type=standard_artifacts.InfraBlessing)}


class ServingCheck(base_component.BaseComponent):
    """Loads the candidate encoder in a fresh process and answers its warm-up requests.

    Args:
        model: the Trainer's `Model` (`Format-Serving/`: the SavedModel with
            `assets.extra/tf_serving_warmup_requests`).
        config: the experiment's canonical JSON (`byol_tf.config.to_json`).
    """

    SPEC_CLASS = ServingCheckSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(self, model: types.BaseChannel, config: str):
        spec = ServingCheckSpec(
            model=model, config=config, blessing=channel.Channel(type=standard_artifacts.InfraBlessing)
        )
        super().__init__(spec=spec)
