"""Nearest neighbours of query images in an embeddings folder, and a picture of them.

    byol-tf neighbours --embeddings DIR --query IMAGE [--query IMAGE ...] [-k 8] --out grid.png

The queries are embedded by the model that embedded the folder (its `_manifest.json`),
through the same `serving_default` signature. Search is exact by default: cosine
similarity as one matmul per chunk of the collection on the default device (GPU when there
is one), `tf.math.top_k` per chunk, the chunks' candidates merged; memory stays at one
chunk. `index="hnsw"` uses an approximate HNSW graph index (faiss, the optional extra
`byol-tf[ann]`) for large collections, built once and kept in the folder (`_hnsw.faiss`).

The picture has one row per query: the query, then its k neighbours from the embedded
data (thumbnails of the images as the encoder sees them, centre-cropped), each captioned
with its label, cosine similarity and key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from byol_tf import embed, fileio

logger = logging.getLogger(__name__)

EXACT, HNSW = "exact", "hnsw"
INDEXES = (EXACT, HNSW)
HNSW_FILE = "_hnsw.faiss"  # "_": Arrow and pandas skip it when reading the folder
HNSW_NEIGHBOURS = 32  # graph degree M
# Rows of one similarity chunk; with Q queries the chunk matrix is Q x this.
DEFAULT_CHUNK_ROWS = 65_536
THUMBNAIL_SIDE = 96


# ------------------------------------------------------------------------ search


def exact_search(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of a collection most cosine-similar to each query, by brute force on the device.

    Args:
        queries: float [Q, d].
        chunks: the collection as consecutive float [n_i, d] blocks (row numbers count on
            from one block to the next).
        k: neighbours per query (fewer when the collection is smaller).

    Returns:
        (similarities float32 [Q, k'], row numbers int64 [Q, k']), most similar first;
        equal similarities keep the lower row number first. k' = min(k, collection size).
    """
    import tensorflow as tf

    from byol_tf import losses

    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    queries = losses.unit_rows(np.asarray(queries, np.float32))
    best_scores = tf.zeros([queries.shape[0], 0], tf.float32)
    best_rows = tf.zeros([queries.shape[0], 0], tf.int64)
    offset = 0
    for chunk in chunks:
        chunk = losses.unit_rows(np.asarray(chunk, np.float32))
        similarity = tf.matmul(queries, chunk, transpose_b=True)
        scores, rows = tf.math.top_k(similarity, k=min(k, int(chunk.shape[0])))
        # Earlier candidates first: top_k keeps the first of equal values, i.e. the lower row.
        scores = tf.concat([best_scores, scores], axis=1)
        rows = tf.concat([best_rows, tf.cast(rows, tf.int64) + offset], axis=1)
        best_scores, order = tf.math.top_k(scores, k=min(k, int(scores.shape[1])))
        best_rows = tf.gather(rows, order, batch_dims=1)
        offset += int(chunk.shape[0])
    return best_scores.numpy(), best_rows.numpy()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError(
            "index: 'hnsw' needs faiss (pip install 'byol-tf[ann]', or faiss-cpu); the default 'exact' does not"
        ) from None
    return faiss


def build_hnsw(embeddings: np.ndarray, neighbours: int = HNSW_NEIGHBOURS):
    """An HNSW graph index (faiss) over L2-normalised rows, searched by inner product = cosine."""
    faiss = _faiss()
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexHNSWFlat(embeddings.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.add(embeddings)
    return index


def hnsw_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate `exact_search` with an index from `build_hnsw` (same outputs)."""
    queries = np.ascontiguousarray(queries, np.float32)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = min(k, index.ntotal)
    # The search beam: wider than k, so that the approximate top k is rarely missed.
    index.hnsw.efSearch = max(64, 2 * k)
    scores, rows = index.search(queries, k)
    return scores, rows.astype(np.int64)


def cached_hnsw(directory: str, embeddings: np.ndarray):
    """The folder's HNSW index: read from `_hnsw.faiss`, else built and written there.

    A folder that cannot be written (e.g. a read-only artifact) gets the index in memory only.
    """
    faiss = _faiss()
    path = fileio.join(directory, HNSW_FILE)
    if fileio.isfile(path):
        index = faiss.deserialize_index(np.frombuffer(fileio.read_bytes(path), np.uint8))
        if index.ntotal == len(embeddings):
            return index
    logger.info("neighbours: building the HNSW index of %d embeddings", len(embeddings))
    index = build_hnsw(embeddings)
    try:
        fileio.write_bytes(path, faiss.serialize_index(index).tobytes())
    except Exception as error:  # noqa: BLE001 -- a cache that cannot be written is not an error
        logger.info("neighbours: index not cached in %s (%s)", directory, error)
    return index


def label_agreement(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> float:
    """Fraction of neighbours whose label is their query's: mean over [Q, k] of labels == query label."""
    query_labels = np.asarray(query_labels).reshape(-1, 1)
    return float(np.mean(np.asarray(neighbour_labels) == query_labels))


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The k nearest neighbours of each query in an embeddings folder.

    Attributes:
        rows: int64 [Q, k] row numbers in the folder (in part order).
        similarities: float32 [Q, k] cosine similarities, most similar first.
        keys: [Q, k] the neighbours' keys.
        labels: int64 [Q, k] the neighbours' labels.
    """

    rows: np.ndarray
    similarities: np.ndarray
    keys: np.ndarray
    labels: np.ndarray


def search(
    directory: str, queries: np.ndarray, k: int = 8, *, index: str = EXACT, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Neighbours:
    """Searches an embeddings folder for each query embedding's k nearest neighbours.

    Args:
        directory: an embeddings folder (`byol-tf embed`, EmbedImages).
        queries: float [Q, d] embeddings.
        k: neighbours per query.
        index: "exact" (streams the parts in chunks of `chunk_rows`) or "hnsw" (approximate).
        chunk_rows: collection rows per similarity chunk (exact search).

    Raises:
        ValueError: an unknown index, a bad k, or a folder that is not an embeddings folder.
    """
    if index not in INDEXES:
        raise ValueError(f"index: {index!r} is not one of {', '.join(map(repr, INDEXES))}")
    keys, labels = [], []
    if index == EXACT:

        def chunks():
            for table in embed.iter_tables(directory):
                keys.extend(table.column("key").to_pylist())
                labels.append(table.column("label").to_numpy())
                embeddings = embed.embeddings_array(table)
                for start in range(0, len(embeddings), chunk_rows):
                    yield embeddings[start : start + chunk_rows]

        similarities, rows = exact_search(queries, chunks(), k)
        keys, labels = np.asarray(keys, dtype=object), np.concatenate(labels) if labels else np.zeros(0, np.int64)
    else:
        collection = embed.read(directory)
        keys, labels = collection.keys, collection.labels
        similarities, rows = hnsw_search(cached_hnsw(directory, collection.embeddings), queries, k)
    return Neighbours(rows=rows, similarities=similarities, keys=keys[rows], labels=labels[rows])


# ------------------------------------------------------------------------ images


def thumbnails(manifest: dict, rows: Sequence[int], keys: Sequence[str]) -> list[np.ndarray]:
    """The embedded images of some rows, centre-cropped as the encoder saw them: uint8 [S, S, 3] each.

    Args:
        manifest: the embeddings folder's manifest (says where the images came from).
        rows: row numbers in the folder (`Neighbours.rows`).
        keys: the rows' keys.

    Returns:
        One image per row, in the order given.
    """
    import tensorflow as tf

    from byol_tf import config as config_lib
    from byol_tf import data

    size = manifest["image_size"]
    kind = manifest["key"]
    if kind == embed.KEY_PATH:
        decoded = [data.decode_image(fileio.read_bytes(key)) for key in keys]
    elif kind == embed.KEY_RECORD:
        decoded = []
        for key in keys:
            name, _, number = key.rpartition(":")
            path = fileio.join(manifest["examples"], name)
            record = next(iter(data.tfrecord_dataset(path).skip(int(number)).take(1)))
            decoded.append(data.parse_example(record)["image"])
    else:
        # Split positions: one pass over the split keeps the wanted positions.
        config = config_lib.from_dict(manifest["config"])
        wanted = tf.constant(sorted({int(row) for row in rows}), tf.int64)
        found = {}
        split = data.load_split(config.data, manifest["split"]).enumerate()
        split = split.filter(lambda position, example: tf.reduce_any(tf.equal(position, wanted)))
        for position, example in split.as_numpy_iterator():
            found[int(position)] = example["image"]
        decoded = [found[int(row)] for row in rows]
    return [as_encoder_input(image, size) for image in decoded]


def as_encoder_input(image, size: int) -> np.ndarray:
    """An image centre-cropped and resized as serving does (`augment.center_crop_resize`), as uint8."""
    from byol_tf import augment

    return np.round(augment.center_crop_resize(image, size).numpy() * 255.0).astype(np.uint8)


def _short(key: str) -> str:
    name = os.path.basename(key) if ("/" in key or os.sep in key) else key
    return name if len(name) <= 16 else "…" + name[-15:]


def grid(
    queries: Sequence[np.ndarray],
    query_captions: Sequence[str],
    neighbours: Sequence[Sequence[np.ndarray]],
    captions: Sequence[Sequence[str]],
    side: int = THUMBNAIL_SIDE,
):
    """A picture with one row per query: the query (framed), then its neighbours, captions below.

    Args:
        queries: Q uint8 [H, W, 3] images.
        query_captions: Q strings.
        neighbours: Q lists of uint8 [H, W, 3] images.
        captions: Q lists of caption strings (lines separated by "\\n").
        side: thumbnail side in pixels (images are scaled to it, pixels kept sharp).

    Returns:
        A `PIL.Image.Image` (RGB).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, side // 8))
    line = font.getbbox("Ag")[3] + 2
    texts = [*query_captions, *(caption for row in captions for caption in row)]
    lines = max(text.count("\n") + 1 for text in texts)
    pad, gap = 4, 12
    cell_w, cell_h = side + 2 * pad, side + 2 * pad + lines * line
    columns = 1 + max((len(row) for row in neighbours), default=0)
    picture = Image.new("RGB", (columns * cell_w + gap, len(queries) * cell_h), "white")
    draw = ImageDraw.Draw(picture)

    def paste(image, caption, x, y):
        thumbnail = Image.fromarray(np.asarray(image, np.uint8)).resize((side, side), Image.NEAREST)
        picture.paste(thumbnail, (x + pad, y + pad))
        draw.multiline_text((x + pad, y + side + 2 * pad), caption, fill="black", font=font, spacing=2)

    for row, (query, query_caption) in enumerate(zip(queries, query_captions)):
        y = row * cell_h
        paste(query, query_caption, 0, y)
        draw.rectangle((1, y + 1, cell_w - 2, y + side + 2 * pad - 2), outline=(220, 60, 40), width=3)
        for column, (image, caption) in enumerate(zip(neighbours[row], captions[row])):
            paste(image, caption, (column + 1) * cell_w + gap, y)
    return picture


def neighbours_picture(directory: str, query_paths: Sequence[str], k: int = 8, *, index: str = EXACT):
    """Embeds query image files with the folder's model, searches, and draws the result.

    Args:
        directory: an embeddings folder.
        query_paths: image files (PNG / JPEG / GIF / BMP).
        k: neighbours per query.
        index: "exact" or "hnsw".

    Returns:
        (the `PIL.Image.Image`, the `Neighbours`).

    Raises:
        ValueError: a query file does not exist or is not an image the decoder reads (the
            check of training data: empty, not an image, corrupt), or a bad folder / index / k.
    """
    import tensorflow as tf

    from byol_tf import checks, serving, sources

    manifest = embed.read_manifest(directory)
    encoded, decoded = [], []
    for path in query_paths:
        if not fileio.isfile(path):
            raise ValueError(f"query: {path!r} does not exist")
        # Checked here, so that a bad file is one line naming it, not an error of the model.
        candidate = sources.Candidate("query", 0, path, None, fileio.read_bytes(path))
        decision = checks.check_candidate(candidate, checks.Rules(labelled=False))
        if not decision.kept:
            raise ValueError(f"query: {path!r} is not usable ({decision.reason}: {decision.detail})")
        encoded.append(decision.candidate.data)
        decoded.append(decision.pixels)
    try:
        queries = embed.ExportedEncoder(manifest["model"]).embed_bytes(encoded)
    except tf.errors.InvalidArgumentError as error:
        # A file our decoder reads that the export refuses: e.g. WebP sent to an older export.
        reason = serving.error_reason(error.message)
        raise ValueError(f"query: the model {manifest['model']!r} refused the queries: {reason}") from None
    found = search(directory, queries, k, index=index)
    size = manifest["image_size"]
    query_images = [as_encoder_input(image, size) for image in decoded]
    images = thumbnails(manifest, found.rows.reshape(-1), found.keys.reshape(-1))
    per_query = found.rows.shape[1]
    neighbour_images = [images[row * per_query : (row + 1) * per_query] for row in range(len(query_paths))]
    captions = [
        [
            f"{label} · {similarity:.3f}\n{_short(str(key))}"
            for label, similarity, key in zip(found.labels[row], found.similarities[row], found.keys[row])
        ]
        for row in range(len(query_paths))
    ]
    query_captions = [f"query\n{_short(path)}" for path in query_paths]
    return grid(query_images, query_captions, neighbour_images, captions), found
