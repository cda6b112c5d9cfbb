"""What a model server sees of a SavedModel: TF Serving warm-up requests, and a check that answers them.

TF Serving reads `assets.extra/tf_serving_warmup_requests` in a model version's folder (a
TFRecord file of `tensorflow.serving.PredictionLog` protos) and replays every request
before it marks the version available, so the first real request does not pay for loading
and tracing. The same requests make a serving check: `answer_warmup_requests` loads a
SavedModel, answers each request with the signature it names and checks the outputs;
`check_in_fresh_process` does that in a new interpreter under a timeout, which is how the
pipeline's ServingCheck decides, before the Pusher, that a candidate can be served. From a
shell (exit status 0 when every request was answered):

    python -m byol_tf.serving EXPORT_DIR [--report report.json]

Only Predict requests are written and answered (the encoder has no Classify / Regress
signatures). Which requests an encoder export carries is `byol_tf.export`'s business;
this module knows the file format and the protocol, not the encoder. TensorFlow is
imported on first use, so that `python -m byol_tf.serving` can quieten it first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Sequence

from byol_tf import fileio

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
DEFAULT_SIGNATURE = "serving_default"  # what TF Serving calls when a request names none
# Loading a large encoder and tracing its signatures on a busy CPU host takes a minute or
# two; a server that needs ten is not fit to serve.
DEFAULT_TIMEOUT_SECONDS = 600.0


def warmup_path(export_dir: str) -> str:
    """Where TF Serving looks for the warm-up requests of the SavedModel in `export_dir`."""
    return fileio.join(export_dir, WARMUP_DIR, WARMUP_FILE)


def predict_log(signature_name: str, inputs: Mapping[str, Any]):
    """One warm-up record: a PredictionLog holding a PredictRequest for `signature_name`.

    Args:
        signature_name: the signature the request calls (`model_spec.signature_name`).
        inputs: input name -> batch (anything `tf.make_tensor_proto` takes: a list of
            bytes becomes a DT_STRING tensor, a float32 array a DT_FLOAT one).

    Returns:
        A `prediction_log_pb2.PredictionLog`. `model_spec.name` is left empty: the server
        serves the model under whatever name it was started with and ignores it in warm-up.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature_name
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def write_warmup_requests(export_dir: str, records: Sequence) -> str:
    """Writes PredictionLog records as the warm-up file of the SavedModel in `export_dir`.

    Args:
        export_dir: the SavedModel folder (any `tf.io.gfile` path).
        records: `predict_log(...)` results, replayed by the server in this order.

    Returns:
        The file's path.
    """
    import tensorflow as tf

    path = warmup_path(export_dir)
    fileio.makedirs(fileio.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return path


def read_warmup_requests(export_dir: str) -> list:
    """The PredictionLog records of the warm-up file of the SavedModel in `export_dir`.

    Raises:
        ValueError: the file is missing, is not a TFRecord file, or holds a record that is
            not a PredictionLog; the message names the file.
    """
    import tensorflow as tf
    from google.protobuf import message as proto_message
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_path(export_dir)
    if not fileio.isfile(path):
        raise ValueError(f"{export_dir} has no {WARMUP_DIR}/{WARMUP_FILE} (no TF Serving warm-up requests)")
    records = []
    try:
        for index, serialized in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            try:
                records.append(prediction_log_pb2.PredictionLog.FromString(serialized))
            except proto_message.DecodeError:
                raise ValueError(f"{path}: record {index} is not a PredictionLog proto") from None
    except tf.errors.OpError as error:
        raise ValueError(f"{path}: not a TFRecord file of PredictionLog protos ({error_reason(error.message)})") from None
    return records


@dataclasses.dataclass(frozen=True)
class ServingReport:
    """What answering the warm-up requests of a SavedModel showed.

    Attributes:
        passed: every request was answered with finite outputs of the declared shapes.
        message: one sentence: what was answered, or the first thing that failed.
        requests: per answered request: {"signature", "batch_size", "outputs": name -> shape}.
        signatures: name -> {"inputs": name -> shape, "outputs": name -> shape} as the
            loaded SavedModel declares them (None for a dimension left open); empty when
            it did not load.
    """

    passed: bool
    message: str
    requests: tuple = ()
    signatures: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "requests": list(self.requests)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ServingReport":
        return cls(bool(raw["passed"]), str(raw["message"]), tuple(raw["requests"]), dict(raw["signatures"]))


def answer_warmup_requests(export_dir: str) -> ServingReport:
    """Loads the SavedModel in `export_dir` here and answers its warm-up requests, as a server would.

    Each request's inputs must be exactly the inputs of the signature it names; each
    answer must have exactly the signature's outputs, all with the request's batch size
    first, the declared size in every other dimension, and finite values.

    Args:
        export_dir: a SavedModel folder with `assets.extra/tf_serving_warmup_requests`.

    Returns:
        The report; failures are reported, not raised.
    """
    import tensorflow as tf

    try:
        records = read_warmup_requests(export_dir)
    except ValueError as error:
        return ServingReport(False, str(error))
    if not records:
        return ServingReport(False, f"{warmup_path(export_dir)} holds no requests")
    try:
        model = tf.saved_model.load(export_dir)
    except Exception as error:  # noqa: BLE001 -- whatever stops loading is the verdict
        return ServingReport(False, f"the SavedModel in {export_dir} does not load: {_describe(error)}")
    signatures = {name: _describe_signature(function) for name, function in model.signatures.items()}

    answered = []
    for number, record in enumerate(records, 1):
        where = f"warm-up request {number} of {len(records)}"
        try:
            answered.append(_answer(model, record, where))
        except _Refused as refusal:
            return ServingReport(False, str(refusal), tuple(answered), signatures)
    counts = ", ".join(str(request["batch_size"]) for request in answered)
    called = sorted({request["signature"] for request in answered})
    return ServingReport(
        True,
        f"{len(answered)} warm-up requests answered ({', '.join(called)}; batch sizes {counts}) "
        f"with finite outputs of the declared shapes",
        tuple(answered),
        signatures,
    )


class _Refused(Exception):
    """A warm-up request the model did not answer properly; the message says why."""


def _answer(model, record, where: str) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    kind = record.WhichOneof("log_type")
    if kind != "predict_log":
        raise _Refused(f"{where} is a {kind}; only Predict requests are answered")
    request = record.predict_log.request
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if name not in model.signatures:
        raise _Refused(f"{where} calls signature {name!r}, which the model lacks (it has {sorted(model.signatures)})")
    signature = model.signatures[name]
    expected_inputs = signature.structured_input_signature[1]
    if set(request.inputs) != set(expected_inputs):
        raise _Refused(
            f"{where} ({name}) gives inputs {sorted(request.inputs)}; the signature takes {sorted(expected_inputs)}"
        )
    try:
        inputs = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()}
    except Exception as error:  # noqa: BLE001 -- a malformed TensorProto is the request's fault
        raise _Refused(f"{where} ({name}) holds an input that is not a tensor: {_describe(error)}") from None
    batch_sizes = {int(tf.shape(value)[0]) if value.shape.rank else None for value in inputs.values()}
    if len(batch_sizes) != 1 or None in batch_sizes:
        raise _Refused(f"{where} ({name}): inputs are not one batch (first dimensions {sorted(map(str, batch_sizes))})")
    batch_size = batch_sizes.pop()
    try:
        outputs = signature(**inputs)
    except Exception as error:  # noqa: BLE001 -- a server would answer with this error
        raise _Refused(f"{where} ({name}, batch of {batch_size}) failed: {_describe(error)}") from None

    expected_outputs = signature.structured_outputs
    if set(outputs) != set(expected_outputs):
        raise _Refused(f"{where} ({name}) returned {sorted(outputs)}; the signature declares {sorted(expected_outputs)}")
    shapes = {}
    for key, value in sorted(outputs.items()):
        declared = _dims(expected_outputs[key].shape)
        declared = None if declared is None else [batch_size, *declared[1:]]
        shape = value.shape.as_list()
        if declared is not None and (
            len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape))
        ):
            raise _Refused(f"{where} ({name}) returned {key!r} of shape {shape}; expected {declared}")
        if value.dtype.is_floating and not np.all(np.isfinite(value.numpy())):
            raise _Refused(f"{where} ({name}) returned non-finite values in {key!r}")
        shapes[key] = shape
    return {"signature": name, "batch_size": batch_size, "outputs": shapes}


def _dims(shape) -> list | None:
    """A TensorShape as a list (None for an open dimension), or None when even the rank is open."""
    return None if shape.rank is None else shape.as_list()


def _describe_signature(function) -> dict[str, dict[str, list | None]]:
    inputs = function.structured_input_signature[1]
    return {
        "inputs": {key: _dims(spec.shape) for key, spec in sorted(inputs.items())},
        "outputs": {key: _dims(spec.shape) for key, spec in sorted(function.structured_outputs.items())},
    }


# Lines of a TensorFlow op error that say where, not what: the graph trace and node names.
_TRACE_PREFIXES = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[", "File ")


def error_reason(text: str) -> str:
    """The line of an error message that says what went wrong, without TensorFlow's trace."""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]( name:.*)?", "", str(text))
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TRACE_PREFIXES)]
    return lines[0] if lines else ""


def _describe(error: BaseException) -> str:
    """`Type: reason` of an exception, short enough for one line."""
    import tensorflow as tf

    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    return f"{type(error).__name__}: {error_reason(text)}"[:500]


def check_in_fresh_process(export_dir: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> ServingReport:
    """`answer_warmup_requests` in a new Python interpreter, killed after `timeout_seconds`.

    A fresh process loads only what is in the folder: nothing of the process that trained
    or exported the model (Python objects, traced functions, registered Keras classes)
    can stand in for something the SavedModel lacks, and a crash or a hang in loading is a
    verdict here instead of the end of the caller.

    Args:
        export_dir: a SavedModel folder (any `tf.io.gfile` path).
        timeout_seconds: wall-clock limit for starting, loading and answering.

    Returns:
        The child's report, or a failed one saying that it timed out or died.
    """
    environment = dict(os.environ, TF_USE_LEGACY_KERAS="0")
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="byol-serving-check-") as folder:
        report_path = os.path.join(folder, "report.json")
        command = [sys.executable, "-m", "byol_tf.serving", export_dir, "--report", report_path]
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_seconds, env=environment, check=False
            )
        except subprocess.TimeoutExpired:
            return ServingReport(False, f"the serving process did not answer within {timeout_seconds:g} s (killed)")
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as stream:
                return ServingReport.from_dict(json.load(stream))
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no output"
    return ServingReport(False, f"the serving process exited with status {completed.returncode} before answering: {last}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m byol_tf.serving EXPORT_DIR [--report FILE]`: 0 when every request was answered."""
    from byol_tf import logs

    parser = argparse.ArgumentParser(
        prog="python -m byol_tf.serving",
        description="Load a SavedModel and answer its TF Serving warm-up requests, as a model server would.",
    )
    parser.add_argument("export_dir", help="the SavedModel folder (e.g. an export of `byol-tf export`)")
    parser.add_argument("--report", help="also write the report here as JSON")
    args = parser.parse_args(argv)
    logs.prepare_environment()
    report = answer_warmup_requests(args.export_dir)
    if args.report:
        fileio.write_json(args.report, report.to_dict())
    print(f"{'passed' if report.passed else 'failed'}: {report.message}", flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
