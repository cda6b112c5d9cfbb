"""Ingestion's per-record outcome and its report; the rule itself is the library's.

`byol_tfx.components.example_gen.ImageExampleGen` reads a source through `byol_tf.sources`
and decides about every record with `byol_tf.checks.check_candidate`, the rule `byol-tf
train` applies: the same records are dropped, for the same reasons. This module only adds
what ingestion writes for a kept record, and counts every outcome:

- a JPEG or PNG of 8-bit gray or RGB pixels is written as its original bytes, at full
  resolution: the Trainer and LinearEval decode and crop it as `byol-tf train` does;
- any other image TensorFlow decodes (RGBA, gray + alpha, palette, 16-bit, CMYK, GIF, BMP,
  WebP) is written as an 8-bit RGB PNG of the decoded pixels: lossless, since every reader
  decodes the original to these very pixels (`byol_tf.checks.decode_image`);
- with `data.max_image_side`, a larger image is shrunk to it (`checks.cap_image_side`) and
  written as PNG, or as JPEG (quality 95) when it was a JPEG;
- the embedded arrays (mnist5k, digits) are written as PNGs.

Output: tf.Example {image: bytes, label: int64, height: int64, width: int64}, GZIP
TFRecords in Split-train/ and Split-eval/ (the held-out images, the library's "test" split).
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any, Iterable

import numpy as np

from byol_tf import checks, fileio, sources

# Examples splits written by ImageExampleGen, and the byol_tf split each holds.
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT)
EXAMPLES_SPLIT = {"train": TRAIN_SPLIT, "test": EVAL_SPLIT}

# TFX ExampleGen's layout (tfx/components/example_gen/write_split.py): Split-<name>/
# data_tfrecord-<shard>-of-<n>.gz, GZIP-compressed TFRecords of serialized tf.Examples.
FILE_PREFIX = "data_tfrecord"
REPORT_FILE = "ingestion_report.json"
JPEG_QUALITY = 95  # shrunk JPEGs only; everything else is kept or written losslessly

# What a kept record can be, besides "ok" (written as read).
CONVERTED = "converted"
RESIZED = "resized"
# PNG colour types (IHDR byte 25) and the mode names Pillow gives them.
_PNG_COLOUR_TYPES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


class IngestionError(checks.BadDataError):
    """Too many bad records, an empty split, or a source that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What ingestion does with one record.

    Attributes:
        split: the Examples split ("train" or "eval").
        record_id: where the record came from (a path, `file:index`, `source:position`).
        drop_reason: one of `byol_tf.sources.DROP_REASONS`, or None when the record is kept.
        detail: why it was dropped.
        converted_from: what the image was when it was re-encoded as 8-bit RGB ("RGBA",
            "I;16", "CMYK", "GIF", ...), else None.
        resized_from: (height, width) before `data.max_image_side` shrank it, else None.
        image: the encoded image to write (None when dropped).
        label, height, width: the values to write.
    """

    split: str
    record_id: str
    drop_reason: str | None = None
    detail: str = ""
    converted_from: str | None = None
    resized_from: tuple[int, int] | None = None
    image: bytes | None = None
    label: int = -1
    height: int = 0
    width: int = 0

    @property
    def kept(self) -> bool:
        return self.drop_reason is None

    @property
    def status(self) -> str:
        """'dropped', 'converted', 'resized', 'converted+resized' or 'ok'."""
        if not self.kept:
            return "dropped"
        fixes = [name for name, done in ((CONVERTED, self.converted_from), (RESIZED, self.resized_from)) if done]
        return "+".join(fixes) or "ok"


def stored_form(data: bytes, image_format: str | None) -> str | None:
    """None when encoded bytes can be written as they are (JPEG or PNG of 8-bit gray or RGB
    pixels), else what they hold ("RGBA", "I;16", "CMYK", "GIF", ...)."""
    if image_format == "PNG":
        depth, colour = data[24], data[25]  # IHDR: after the signature, length, type, width, height
        mode = _PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        if depth == 8 and colour in (0, 2):
            return None
        if depth == 16:
            return "I;16" if colour == 0 else f"{mode};16"
        return mode if depth == 8 else f"{mode};{depth}"
    if image_format == "JPEG":
        from PIL import Image  # deferred: only ingestion looks inside the header

        try:
            mode = Image.open(io.BytesIO(data)).mode
        except Exception:  # noqa: BLE001 -- TensorFlow decoded it; Pillow's opinion is only a label
            return "JPEG"
        return None if mode in ("L", "RGB") else mode
    return image_format or "image"


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit PNG bytes of uint8 [H, W, 3] pixels."""
    import tensorflow as tf

    return tf.io.encode_png(pixels).numpy()


def ingest_record(
    candidate: sources.Candidate, rules: checks.Rules, max_image_side: int | None = None
) -> RecordResult:
    """The library's check of one record, then the bytes to write for a kept one.

    Never raises for bad data: every failure is a drop reason.
    """
    split = EXAMPLES_SPLIT[candidate.split]
    decision = checks.check_candidate(candidate, rules)
    if not decision.kept:
        return RecordResult(split, candidate.record_id, decision.reason, decision.detail)
    pixels = decision.pixels
    height, width = pixels.shape[:2]
    if candidate.data is not None:
        converted_from = stored_form(candidate.data, decision.image_format)
        image = candidate.data if converted_from is None else None
    else:
        converted_from, image = None, None  # arrays: always encoded below
    resized_from = None
    if max_image_side and max(height, width) > max_image_side:
        resized_from = (int(height), int(width))
        pixels = checks.cap_image_side(pixels, max_image_side).numpy()
        height, width = pixels.shape[:2]
        image = None
        if decision.image_format == "JPEG" and converted_from is None:
            import tensorflow as tf

            image = tf.io.encode_jpeg(pixels, quality=JPEG_QUALITY).numpy()
    if image is None:
        image = encode_png(pixels)
    return RecordResult(
        split,
        candidate.record_id,
        converted_from=converted_from,
        resized_from=resized_from,
        image=image,
        label=-1 if candidate.label is None else int(candidate.label),
        height=int(height),
        width=int(width),
    )


def to_tf_example(result: RecordResult) -> bytes:
    """Serialized tf.Example {image, label, height, width} of a kept record."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def ints(value):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[value]))

    feature = {
        "image": feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[result.image])),
        "label": ints(result.label),
        "height": ints(result.height),
        "width": ints(result.width),
    }
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()


def outcomes(result: RecordResult) -> list[str]:
    """The report's counter names one record adds to (besides its split): total, then
    dropped and the reason, or written, ok / converted / resized and the source mode."""
    if not result.kept:
        return ["total", "dropped", result.drop_reason]
    names = ["total", "kept", "written"]
    if result.converted_from:
        names += [CONVERTED, f"converted_from:{result.converted_from}"]
    if result.resized_from:
        names.append(RESIZED)
    if not result.converted_from and not result.resized_from:
        names.append("ok")
    return names


# --------------------------------------------------------------------------- report


class IngestionReport(checks.CheckReport):
    """`byol_tf.checks.CheckReport` over the Examples splits, plus what was written.

    `counts[split]` holds: total (records read), written, ok (written as read), converted
    and resized (written after a fix; a record can be both), dropped, one count per drop
    reason, and `converted_from:<mode>` per source mode. Converted and resized records are
    not bad; dropped ones are.
    """

    def __init__(self, **settings: Any):
        super().__init__(SPLITS)
        self.settings = dict(settings)

    def add_result(self, result: RecordResult):
        for name in outcomes(result):
            self.count(result.split, name)
        if not result.kept:
            self.note_dropped(result.split, result.record_id, result.drop_reason, result.detail)

    @classmethod
    def from_counters(
        cls, counters: dict[str, int], dropped: Iterable[dict[str, str]] = (), **settings: Any
    ) -> "IngestionReport":
        """A report from `split/outcome` counts (e.g. Beam counters) and the first dropped records."""
        report = cls(**settings)
        for name, value in counters.items():
            split, _, outcome = name.partition("/")
            report.count(split, outcome, int(value))
        for entry in dropped:
            report.note_dropped(**entry)
        return report

    def converted_from(self, split: str) -> dict[str, int]:
        counts = self.counts.get(split, collections.Counter())
        return {name.split(":", 1)[1]: n for name, n in sorted(counts.items()) if name.startswith("converted_from:")}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: settings, per-split and total counts, the first drops."""

        def full(counts):
            keys = ("total", "written", "ok", CONVERTED, RESIZED, "dropped")
            return {
                **{key: counts[key] for key in keys},
                "dropped_by_reason": {r: counts[r] for r in sources.DROP_REASONS if counts[r]},
            }

        return {
            "settings": self.settings,
            "splits": {
                split: {**full(self.counts.get(split, collections.Counter())), "converted_from": self.converted_from(split)}
                for split in SPLITS
            },
            "total": full(self.totals()),
            "bad_fraction": self.bad_fraction,
            "first_dropped_records": self.first_dropped(),
        }

    def summary(self) -> str:
        """A few lines for the component's log."""
        lines = ["Ingestion report:"]
        for split in SPLITS:
            c = self.counts.get(split, collections.Counter())
            reasons = ", ".join(f"{r}={n}" for r, n in self.reasons(split).items()) or "none"
            converted = ", ".join(f"{m}={n}" for m, n in self.converted_from(split).items()) or "none"
            lines.append(
                f"  {split}: read {c['total']}, written {c['written']} (ok {c['ok']}, converted {c[CONVERTED]}"
                f" [{converted}], resized {c[RESIZED]}), dropped {c['dropped']} [{reasons}]"
            )
        lines.append(f"  bad fraction {self.bad_fraction:.2%}")
        return "\n".join(lines)

    def write(self, path: str):
        fileio.write_json(path, self.to_dict())

    def check(self, max_bad_fraction: float, report_path: str = ""):
        """Raises IngestionError if too many records were dropped or a split is empty."""
        try:
            self.enforce(max_bad_fraction, field="max_bad_fraction", where="ingestion")
        except checks.BadDataError as error:
            where = f" Full report: {report_path}." if report_path else ""
            raise IngestionError(f"{error}{where}") from None
        for split in SPLITS:
            if self.counts.get(split, collections.Counter())["written"] == 0:
                raise IngestionError(
                    f"ingestion: split {split!r} has no records ({self.counts[split]['total']} read):"
                    " the pipeline needs both 'train' and a held-out 'eval' split (data.holdout_examples > 0"
                    " or data.eval_split)"
                )
