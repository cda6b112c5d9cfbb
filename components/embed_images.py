"""EmbedImages: after the Pusher, embeds one split of the Examples with the blessed encoder (Beam).

| component | inputs | outputs | parameters |
| --- | --- | --- | --- |
| `EmbedImages` (`byol_tfx.components.embed_images`) | `examples`, `pushed_model` (the Pusher's) | `embeddings` (`byol_tf.Embeddings`: `part-SSSSS-of-NNNNN.parquet` + `_manifest.json`, the format of `byol-tf embed`) | `config` (JSON), `split` ("eval" or "train"), `batch_size` (256) |

A thin Beam adapter over `byol_tf.embed`: the split's TFRecord files are read in parallel
(one task per file, each record keyed `<file name>:<record number>`), spread over the
workers, batched, and each worker loads the SavedModel once (`DoFn.setup`) and embeds the
PNG bytes with the model's own `serving_default` signature, so the rows are what serving
returns. Beam's Parquet sink writes the shards (to temporary files, renamed when the
pipeline finishes); the manifest is written last. Shards hold rows in no particular
order: the key locates each record.

Only a blessed encoder is embedded: the input is the Pusher's `pushed_model`, and when the
Pusher did not push (LinearEval did not bless the encoder), the component writes no
embeddings, only a `SKIPPED` file saying why, and marks its output `embedded = 0`.
"""

from __future__ import annotations

import os
from typing import Any

import apache_beam as beam
from absl import logging
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from byol_tfx.components import examples_io

SKIPPED_FILE = "SKIPPED"
PART_PREFIX = "part"
EMBEDDED_KEY = "embedded"  # output property: 1 when embeddings were written, else 0
PUSHED_KEY = "pushed"  # the Pusher's property on pushed_model
PUSHED_DESTINATION_KEY = "pushed_destination"
SPLITS = ("eval", "train")
DEFAULT_BATCH_SIZE = 256


class Embeddings(types.Artifact):
    """Embeddings of one Examples split: Parquet shards and `_manifest.json` (`byol_tf.embed`)."""

    # Kubeflow v2 compiles custom artifact types only with a `namespace.Name` type name.
    TYPE_NAME = "byol_tf.Embeddings"


def record_key(path: str, index: int) -> str:
    """The key of the `index`-th record of a TFRecord file: `<file name>:<index>`."""
    return f"{os.path.basename(path)}:{index}"


class ReadRecords(beam.DoFn):
    """file path -> (key, serialized tf.Example) for every record of the file, compressed or not."""

    def process(self, path):
        from byol_tf import data

        for index, record in enumerate(data.tfrecord_dataset(path).as_numpy_iterator()):
            yield record_key(path, index), record


def parse_record(serialized: bytes) -> tuple[bytes, int]:
    """(encoded image bytes, label or -1) of a serialized tf.Example {image, label}."""
    import tensorflow as tf

    feature = tf.train.Example.FromString(serialized).features.feature
    if "image" not in feature or not feature["image"].bytes_list.value:
        raise ValueError("EmbedImages: a record has no 'image' bytes feature")
    label = feature["label"].int64_list.value[0] if feature["label"].int64_list.value else -1
    return feature["image"].bytes_list.value[0], int(label)


class EmbedBatch(beam.DoFn):
    """[(key, serialized tf.Example)] -> one Arrow table of `byol_tf.embed.schema(d)`.

    Args:
        model_dir: the SavedModel folder; each worker loads it once, in `setup`.
    """

    def __init__(self, model_dir: str):
        super().__init__()
        self.model_dir = model_dir
        self._encoder = None

    def setup(self):
        from byol_tf import embed

        self._encoder = embed.ExportedEncoder(self.model_dir)

    def process(self, batch):
        from byol_tf import embed

        keys = [key for key, _ in batch]
        parsed = [parse_record(record) for _, record in batch]
        embeddings = self._encoder.embed_bytes([image for image, _ in parsed])
        yield embed.to_table(keys, [label for _, label in parsed], embeddings)


class Executor(base_beam_executor.BaseBeamExecutor):
    """Embeds the split with the pushed encoder (or skips, when nothing was pushed)."""

    def Do(self, input_dict: dict[str, list[types.Artifact]], output_dict, exec_properties: dict[str, Any]):
        from byol_tf import config as config_lib
        from byol_tf import embed, fileio

        config = config_lib.from_json(exec_properties["config"])
        split = exec_properties.get("split") or "eval"
        batch_size = int(exec_properties.get("batch_size") or DEFAULT_BATCH_SIZE)
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        pushed_model = artifact_utils.get_single_instance(input_dict["pushed_model"])
        output = artifact_utils.get_single_instance(output_dict["embeddings"])

        if not pushed_model.has_custom_property(PUSHED_KEY) or not pushed_model.get_int_custom_property(PUSHED_KEY):
            reason = "the Pusher pushed no encoder in this run (LinearEval did not bless it): nothing embedded"
            fileio.write_text(fileio.join(output.uri, SKIPPED_FILE), reason + "\n")
            output.set_int_custom_property(EMBEDDED_KEY, 0)
            output.set_string_custom_property("skipped_reason", reason)
            logging.info("EmbedImages: %s", reason)
            return

        encoder = embed.ExportedEncoder(pushed_model.uri)
        files = examples_io.record_files(examples_io.split_file_patterns(examples, split))
        with self._make_beam_pipeline() as pipeline:
            _ = (
                pipeline
                | "Files" >> beam.Create(files)
                | "Read" >> beam.ParDo(ReadRecords())
                # Records of one file would otherwise stay on the worker that read it.
                | "Spread" >> beam.Reshuffle()
                | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
                | "Embed" >> beam.ParDo(EmbedBatch(encoder.path))
                | "Write"
                >> beam.io.WriteToParquetBatched(
                    fileio.join(output.uri, PART_PREFIX), schema=embed.schema(encoder.dimension), file_name_suffix=".parquet"
                )
            )

        parts = sorted(fileio.basename(path) for path in fileio.glob(fileio.join(output.uri, f"{PART_PREFIX}-*.parquet")))
        counts = [embed.count_rows(fileio.join(output.uri, name)) for name in parts]
        manifest = embed.manifest(
            model=encoder.path,
            config=config,
            split=split,
            dimension=encoder.dimension,
            image_size=encoder.image_size,
            key=embed.KEY_RECORD,
            parts=list(zip(parts, counts)),
            examples=os.path.dirname(files[0]),
            pushed_destination=pushed_model.get_string_custom_property(PUSHED_DESTINATION_KEY),
        )
        fileio.write_json(fileio.join(output.uri, embed.MANIFEST_FILE), manifest)
        output.set_int_custom_property(EMBEDDED_KEY, 1)
        output.set_int_custom_property("count", manifest["count"])
        output.set_int_custom_property("dimension", manifest["dimension"])
        logging.info("EmbedImages: %d embeddings of split %r in %s", manifest["count"], split, output.uri)


class EmbedImagesSpec(ComponentSpec):
    """Inputs, outputs and parameters of EmbedImages."""

    PARAMETERS = {
        # The experiment, byol_tf.config.to_json(config), recorded in the manifest.
        "config": ExecutionParameter(type=str),
        "split": ExecutionParameter(type=str),
        "batch_size": ExecutionParameter(type=int, optional=True),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "pushed_model": ChannelParameter(type=standard_artifacts.PushedModel),
    }
    OUTPUTS = {"embeddings": ChannelParameter(type=Embeddings)}


class EmbedImages(base_beam_component.BaseBeamComponent):
    """Embeddings of an Examples split by the blessed, pushed encoder, as Parquet shards.

    Args:
        examples: the `Examples` (ImageExampleGen's).
        pushed_model: the Pusher's `PushedModel`; nothing is embedded when it was not pushed.
        config: the experiment's canonical JSON (`byol_tf.config.to_json`).
        split: the split to embed, "eval" (held out) or "train".
        batch_size: images per forward pass (a runtime knob; results do not depend on it).

    Raises:
        ValueError: `split` is not one of "eval", "train".
    """

    SPEC_CLASS = EmbedImagesSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(
        self,
        examples: types.BaseChannel,
        pushed_model: types.BaseChannel,
        config: str,
        split: str = "eval",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if split not in SPLITS:
            raise ValueError(f"embed_split: {split!r} is not one of {', '.join(map(repr, SPLITS))}")
        spec = EmbedImagesSpec(
            examples=examples,
            pushed_model=pushed_model,
            config=config,
            split=split,
            batch_size=batch_size,
            embeddings=channel.Channel(type=Embeddings),
        )
        super().__init__(spec=spec)
