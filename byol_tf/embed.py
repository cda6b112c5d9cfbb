"""Embeddings of a whole data split through an exported encoder, written as Parquet.

    byol-tf embed --model RUN_OR_EXPORT --config CONFIG [--split train|test] --out DIR

`embed_split` streams the config's `data` split (`byol_tf.data.load_split`) through the
SavedModel that `byol-tf train` / `export` wrote, with the serving preprocessing
(`augment.center_crop_resize` to the model's input size, then the `embed_images`
signature), so every embedding equals what `serving_default` returns for the same image's
PNG bytes. The output folder holds:

    _manifest.json           what was embedded (`MANIFEST_FILE`): format, model, split, count,
                             dimension, key kind, the parts and the config
    part-00000.parquet ...   the rows in split order, `part_rows` per file; columns
                             key        string   the image file for `folder` sources, else the
                                                 record's position in the split ("0", "1", ...)
                             label      int64    -1 when unknown
                             embedding  fixed_size_list<float32>[d]   L2-normalised

Parquet because one file type serves every reader: pandas (`pandas.read_parquet(DIR)`),
Arrow, Spark, BigQuery and DuckDB read it directly, columns are typed (the embedding is one
fixed-size float32 list column, not d text columns), it is compressed, and a reader can
fetch one column. TensorFlow has no Parquet reader of its own: `dataset(DIR)` streams the
parts into `tf.data`.

Nothing is half-written where readers look: parts go to a hidden sibling folder
(`.DIR.partial`), each file atomically, and the folder is renamed to DIR once every row
and the manifest are in. A rerun of the same command after a kill keeps the finished parts
and continues from there.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
from typing import Iterator, Sequence

import numpy as np

from byol_tf import config as config_lib
from byol_tf import fileio

logger = logging.getLogger(__name__)

FORMAT = "byol-tf embeddings"
FORMAT_VERSION = 1
MANIFEST_FILE = "_manifest.json"  # "_": Arrow and pandas skip it when reading the folder
REQUEST_FILE = "request.json"  # in the partial folder only: what the parts there belong to
PART_TEMPLATE = "part-{:05d}.parquet"
SAVED_MODEL_FILE = "saved_model.pb"
EXPORT_DIR = "export"  # a run folder's export (byol_tf.experiment.EXPORT_DIR)
TFX_SERVING_DIR = "Format-Serving"  # a TFX Trainer's Model artifact
# Key kinds: what the `key` column holds.
KEY_PATH, KEY_INDEX, KEY_RECORD = "path", "index", "record"
DEFAULT_BATCH_SIZE = 256
DEFAULT_PART_ROWS = 16_384


# ------------------------------------------------------------------------ the model


def resolve_export(path: str) -> str:
    """The SavedModel folder of an export, a run folder (its export/) or a TFX Model artifact.

    Raises:
        ValueError: none of them holds a saved_model.pb.
    """
    for candidate in (path, fileio.join(path, EXPORT_DIR), fileio.join(path, TFX_SERVING_DIR)):
        if fileio.isfile(fileio.join(candidate, SAVED_MODEL_FILE)):
            return fileio.absolute(candidate)
    raise ValueError(
        f"model: {path!r} is not an encoder export (no {SAVED_MODEL_FILE}), nor a run folder "
        f"with {EXPORT_DIR}/, nor a TFX model with {TFX_SERVING_DIR}/"
    )


class ExportedEncoder:
    """An encoder SavedModel (`byol_tf.export`) loaded once, with its two signatures.

    Args:
        path: an export folder, a run folder or a TFX Model artifact (`resolve_export`).

    Attributes:
        path: the SavedModel folder.
        image_size: S, the side of the `embed_images` input (and of serving's resize).
        dimension: d, the embedding's size.
    """

    def __init__(self, path: str):
        import tensorflow as tf

        from byol_tf import export

        self.path = resolve_export(path)
        self._module = tf.saved_model.load(self.path)
        self._embed = self._module.signatures[export.EMBED_IMAGES_SIGNATURE]
        self._serve = self._module.signatures[export.SERVING_SIGNATURE]
        self.image_size = int(self._embed.structured_input_signature[1]["images"].shape[1])
        self.dimension = int(self._embed.structured_outputs["embedding"].shape[-1])

    def embed_images(self, images) -> np.ndarray:
        """float32 [B, d] embeddings of preprocessed float32 [B, S, S, 3] images in [0, 1]."""
        return self._embed(images=images)["embedding"].numpy()

    def embed_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """float32 [B, d] embeddings of encoded images, through `serving_default` itself."""
        import tensorflow as tf

        return self._serve(image_bytes=tf.constant(list(encoded), tf.string))["embedding"].numpy()


# ------------------------------------------------------------------------ the format


def schema(dimension: int):
    """The Arrow schema of every part: key string, label int64, embedding float32[d]."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("label", pa.int64()),
            ("embedding", pa.list_(pa.float32(), dimension)),
        ]
    )


def to_table(keys: Sequence[str], labels: Sequence[int], embeddings: np.ndarray):
    """An Arrow table of `schema(d)` from N keys, labels and float [N, d] embeddings."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, np.float32)
    dimension = embeddings.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dimension)
    return pa.Table.from_arrays(
        [pa.array([str(key) for key in keys], pa.string()), pa.array(np.asarray(labels, np.int64)), column],
        schema=schema(dimension),
    )


def write_table(path: str, table) -> None:
    """Writes a table as one Parquet file, atomically (through `fileio`: gs:// too)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fileio.write_bytes(path, buffer.getvalue())


def read_table(path: str):
    """One Parquet file (any `tf.io.gfile` path) as an Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(fileio.read_bytes(path)))


def count_rows(path: str) -> int:
    """Rows of a Parquet file, read from its footer alone (no column data is read).

    A Parquet file ends with its metadata, the metadata's length (4 bytes, little-endian)
    and b"PAR1"; that tail, behind the leading magic, is a file Arrow reads the metadata of.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = fileio.size(path)
    with fileio.open_file(path, "rb") as stream:
        stream.seek(size - 8)
        tail = stream.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length > size - 12:
            raise ValueError(f"embeddings: {path!r} is not a Parquet file")
        stream.seek(size - 8 - length)
        footer = stream.read(length)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail)).num_rows


def embeddings_array(table) -> np.ndarray:
    """float32 [N, d] of a table's `embedding` column."""
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


# ------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """A whole embeddings folder in memory.

    Attributes:
        keys: [N] str, see the module docstring.
        labels: [N] int64.
        embeddings: float32 [N, d], L2-normalised.
        manifest: the folder's _manifest.json.
    """

    keys: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    manifest: dict


def read_manifest(directory: str) -> dict:
    """The manifest of an embeddings folder.

    Raises:
        ValueError: the folder has no manifest (not an embeddings folder, or unfinished).
    """
    path = fileio.join(directory, MANIFEST_FILE)
    if not fileio.isfile(path):
        raise ValueError(
            f"embeddings: {directory!r} has no {MANIFEST_FILE} (not written by `byol-tf embed` / EmbedImages)"
        )
    manifest = fileio.read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"embeddings: {path!r} is not a {FORMAT!r} manifest")
    return manifest


def part_paths(directory: str, manifest: dict | None = None) -> list[str]:
    """The Parquet files of an embeddings folder, in row order."""
    manifest = manifest or read_manifest(directory)
    return [fileio.join(directory, part["file"]) for part in manifest["parts"]]


def iter_tables(directory: str) -> Iterator:
    """The parts of an embeddings folder as Arrow tables, in order (one in memory at a time)."""
    for path in part_paths(directory):
        yield read_table(path)


def read(directory: str) -> Embeddings:
    """Reads a whole embeddings folder into memory."""
    import pyarrow as pa

    manifest = read_manifest(directory)
    tables = [read_table(path) for path in part_paths(directory, manifest)]
    table = pa.concat_tables(tables) if tables else schema(manifest["dimension"]).empty_table()
    return Embeddings(
        keys=np.asarray(table.column("key").to_pylist(), dtype=object),
        labels=table.column("label").to_numpy(),
        embeddings=embeddings_array(table),
        manifest=manifest,
    )


def dataset(directory: str):
    """An embeddings folder as a `tf.data.Dataset` of {"key", "label", "embedding"} rows.

    Streams the Parquet parts one at a time, so memory stays at one part.
    """
    import tensorflow as tf

    manifest = read_manifest(directory)
    paths = part_paths(directory, manifest)

    def rows():
        for path in paths:
            table = read_table(path)
            keys = table.column("key").to_pylist()
            labels = table.column("label").to_numpy()
            embeddings = embeddings_array(table)
            for index in range(len(keys)):
                yield {"key": keys[index], "label": labels[index], "embedding": embeddings[index]}

    return tf.data.Dataset.from_generator(
        rows,
        output_signature={
            "key": tf.TensorSpec([], tf.string),
            "label": tf.TensorSpec([], tf.int64),
            "embedding": tf.TensorSpec([manifest["dimension"]], tf.float32),
        },
    )


# ------------------------------------------------------------------------ writing


def partial_dir(out_dir: str) -> str:
    """The hidden sibling folder where `embed_split` builds `out_dir` (kept across a kill)."""
    return fileio.join(fileio.dirname(fileio.absolute(out_dir)), f".{fileio.basename(out_dir)}.partial")


def _finished_parts(partial: str, request: dict) -> int:
    """How many parts of `request` the partial folder already holds (0: start afresh)."""
    request_path = fileio.join(partial, REQUEST_FILE)
    if fileio.isdir(partial) and fileio.isfile(request_path) and fileio.read_json(request_path) == request:
        done = 0
        while fileio.isfile(fileio.join(partial, PART_TEMPLATE.format(done))):
            done += 1
        return done
    if fileio.exists(partial):
        logger.info("embed: %s belongs to another request; starting afresh", partial)
        fileio.rmtree(partial)
    fileio.makedirs(partial)
    fileio.write_json(request_path, request)
    return 0


def manifest(
    *,
    model: str,
    config: config_lib.Config,
    split: str,
    dimension: int,
    image_size: int,
    key: str,
    parts: Sequence[tuple[str, int]],
    **extra,
) -> dict:
    """The manifest of an embeddings folder (`byol-tf embed` and the EmbedImages component).

    Args:
        model: the SavedModel folder that embedded the images.
        config: the experiment; its data section says where the images came from.
        split: the split embedded ("train" / "test"; the pipeline's "train" / "eval").
        dimension: d.
        image_size: the encoder's input side S.
        key: what the key column holds: "path", "index" or "record".
        parts: (file name, rows) of each Parquet file, in row order.
        extra: more fields (e.g. `examples`, the pipeline's Examples split folder).
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model,
        "split": split,
        "count": int(sum(rows for _, rows in parts)),
        "dimension": int(dimension),
        "image_size": int(image_size),
        "key": key,
        "columns": {
            "key": "string",
            "label": "int64 (-1: unknown)",
            "embedding": f"fixed_size_list<float32>[{dimension}], L2-normalised",
        },
        "parts": [{"file": name, "rows": int(rows)} for name, rows in parts],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "config": config_lib.to_dict(config),
    }


def embed_split(
    model: str,
    config: config_lib.Config,
    split: str,
    out_dir: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    part_rows: int = DEFAULT_PART_ROWS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Embeds every image of a split with an exported encoder and writes them as Parquet.

    Args:
        model: an export folder, a run folder (its export/) or a TFX Model artifact.
        config: the experiment; its `data` section is read (`byol_tf.data.load_split`).
            Images are resized to the model's own input size, as its serving signature does.
        split: "train" or "test".
        out_dir: the folder to create (any `tf.io.gfile` path).
        batch_size: images per forward pass.
        part_rows: rows per Parquet file; also what a rerun after a kill keeps.
        overwrite: replace an existing `out_dir`.
        progress: show a progress bar.

    Returns:
        The manifest written to `out_dir`.

    Raises:
        ValueError: `out_dir` exists (and not `overwrite`), a bad model folder or data
            setting, or a bad batch / part size.
    """
    import keras
    import tensorflow as tf

    from byol_tf import augment, data

    if batch_size < 1 or part_rows < 1:
        raise ValueError(f"batch_size ({batch_size}) and part_rows ({part_rows}) must be at least 1")
    out_dir = fileio.absolute(out_dir)
    if fileio.exists(out_dir) and not overwrite:
        raise ValueError(f"out: {out_dir!r} already exists (replace it with --overwrite)")
    encoder = ExportedEncoder(model)
    paths = data.split_paths(config.data, split)
    total = data.num_examples(config.data, split)
    request = {
        "model": encoder.path,
        "config": config_lib.to_dict(config),
        "split": split,
        "batch_size": batch_size,
        "part_rows": part_rows,
    }
    partial = partial_dir(out_dir)
    done = _finished_parts(partial, request)
    start = min(done * part_rows, total)
    if done:
        logger.info("embed: resuming after %d finished parts (%d of %d images)", done, start, total)

    size = encoder.image_size
    options = tf.data.Options()
    options.deterministic = True  # rows must come in split order, run after run
    # The serving graph's preprocessing, per image as serving_default applies it.
    images = (
        data.load_split(config.data, split)
        .skip(start)
        .map(
            lambda example: (augment.center_crop_resize(example["image"], size), example["label"]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(batch_size)
        .with_options(options)
        .prefetch(tf.data.AUTOTUNE)
    )
    bar = keras.utils.Progbar(total, unit_name="image") if progress else None
    if bar is not None and start:
        bar.update(start)
    position, part = start, done
    buffer_embeddings, buffer_labels = [], []

    def flush(rows: int):
        nonlocal position, part, buffer_embeddings, buffer_labels
        embeddings = np.concatenate(buffer_embeddings)
        labels = np.concatenate(buffer_labels)
        keys = paths[position : position + rows] if paths is not None else np.arange(position, position + rows)
        write_table(fileio.join(partial, PART_TEMPLATE.format(part)), to_table(keys, labels[:rows], embeddings[:rows]))
        buffer_embeddings, buffer_labels = [embeddings[rows:]], [labels[rows:]]
        position, part = position + rows, part + 1

    buffered = 0
    for batch_images, batch_labels in images:
        buffer_embeddings.append(encoder.embed_images(batch_images))
        buffer_labels.append(batch_labels.numpy())
        buffered += len(batch_labels)
        while buffered >= part_rows:
            flush(part_rows)
            buffered -= part_rows
        if bar is not None:
            bar.add(len(batch_labels))
    if buffered:
        flush(buffered)
    if position != total:
        raise ValueError(f"data: the {split!r} split gave {position} images, expected {total}")

    parts = [(PART_TEMPLATE.format(index), min(part_rows, total - index * part_rows)) for index in range(part)]
    result = manifest(
        model=encoder.path,
        config=config,
        split=split,
        dimension=encoder.dimension,
        image_size=size,
        key=KEY_PATH if paths is not None else KEY_INDEX,
        parts=parts,
    )
    fileio.write_json(fileio.join(partial, MANIFEST_FILE), result)
    fileio.remove(fileio.join(partial, REQUEST_FILE))
    fileio.replace_dir(partial, out_dir)
    logger.debug("embed: %d embeddings (d=%d) of the %s split written to %s", total, encoder.dimension, split, out_dir)
    return result
