"""ImageExampleGen's Beam stages, apart from TFX: Beam workers import this module (and the
library), not TFX, so a worker process starts in seconds.

    units (JSON lines) -> ReadFromText -> Reshuffle -> `IngestUnits` (read, check, encode;
    counters per split and outcome; a progress line per worker every `PROGRESS_SECONDS`)
    -> Split-<name>/data_tfrecord-*.gz per Examples split -> the first dropped records
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import apache_beam as beam

from byol_tf import checks, fileio, sources
from byol_tfx.components import ingestion

logger = logging.getLogger(__name__)


def _worker_logger() -> logging.Logger:
    """This module's logger; in a Beam worker process, where nothing configured logging,
    writing to stderr (which a local runner shows and Dataflow keeps in the worker logs)."""
    configured = any(logging.getLogger(name).handlers for name in (__name__, "byol_tfx"))
    if not configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("byol-tf: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger

COUNTER_NAMESPACE = "byol_tf.ingestion"
# Seconds between a worker's progress lines.
PROGRESS_SECONDS = 30.0



class IngestUnits(beam.DoFn):
    """Reads the records of a unit, checks each (byol_tf.checks) and encodes the kept ones.

    Outputs serialized tf.Examples tagged with their Examples split, and (split, record,
    reason, detail) of dropped records on the "dropped" output; counts every outcome as a
    Beam counter `<split>/<outcome>` and logs progress.
    """

    def __init__(self, data_json: str, keys: tuple[str, str | None] | None, rules: tuple[bool, int | None]):
        self._data_json = data_json
        self._keys = keys
        self._rules = rules

    def setup(self):
        from byol_tf import config as config_lib

        self._data = config_lib.from_json(self._data_json).data
        self._record_keys = sources.RecordKeys(*self._keys) if self._keys else None
        self._check_rules = checks.Rules(*self._rules)
        self._counters: dict[str, Any] = {}
        self._done = self._dropped = 0
        self._started = self._last = time.monotonic()
        self._log = _worker_logger()

    def _count(self, split: str, outcome: str):
        name = f"{split}/{outcome}"
        if name not in self._counters:
            self._counters[name] = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, name)
        self._counters[name].inc()

    def process(self, line: str):
        unit = sources.Unit.from_json(line)
        for candidate in sources.read_unit(unit, self._data, self._record_keys):
            result = ingestion.ingest_record(candidate, self._check_rules, self._data.max_image_side)
            for outcome in ingestion.outcomes(result):
                self._count(result.split, outcome)
            self._done += 1
            if result.kept:
                yield beam.pvalue.TaggedOutput(result.split, ingestion.to_tf_example(result))
            else:
                self._dropped += 1
                yield beam.pvalue.TaggedOutput(
                    "dropped", (result.split, result.record_id, result.drop_reason, result.detail)
                )
        now = time.monotonic()
        if now - self._last > PROGRESS_SECONDS:
            self._last = now
            self._log.info(
                "ImageExampleGen worker %d: %d records checked (%.0f/s), %d dropped",
                os.getpid(), self._done, self._done / (now - self._started), self._dropped,
            )


def _write_dropped(entries, path: str):
    fileio.write_json(
        path, [{"split": s, "record": r, "reason": reason, "detail": d} for s, r, reason, d in sorted(entries)]
    )


def build_pipeline(pipeline: beam.Pipeline, units_path: str, plan: sources.Plan, data_json: str,
                        examples_uri: str, dropped_path: str, num_shards: int = 0) -> beam.Pipeline:
    """Adds the ingestion stages (module docstring) to `pipeline`."""
    keys = (plan.keys.image, plan.keys.label) if plan.keys else None
    rules = (True, plan.num_classes)  # the pipeline always needs labels (linear evaluation)
    results = (
        pipeline
        | "ReadUnits" >> beam.io.ReadFromText(units_path)
        # Units are listed in stream order: spread them over the workers.
        | "Spread" >> beam.Reshuffle()
        | "Ingest" >> beam.ParDo(IngestUnits(data_json, keys, rules)).with_outputs("dropped", *ingestion.SPLITS)
    )
    for split in ingestion.SPLITS:
        _ = results[split] | f"Write{split.capitalize()}" >> beam.io.WriteToTFRecord(
            os.path.join(examples_uri, f"Split-{split}", ingestion.FILE_PREFIX),
            file_name_suffix=".gz",
            num_shards=num_shards,
        )
    _ = (
        results["dropped"]
        | "FirstDropped" >> beam.combiners.Top.Smallest(checks.FIRST_DROPPED)
        | "WriteDropped" >> beam.Map(_write_dropped, dropped_path)
    )
    return pipeline


def counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    query = result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))
    values: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + int(value or 0)
    return values
