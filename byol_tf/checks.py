"""Whether a record is a usable image: one rule for `byol-tf train` / `eval`, `fit` users
(through `byol_tf.data`) and the pipeline's ingestion.

A record is dropped, with the first reason that applies (`byol_tf.sources.DROP_REASONS`):
what reading found (unreadable_file, unparseable_record, corrupt_tfrecord_file,
missing_image; for TFRecords also missing_label for no label feature, or one that is not a
single int64; for folders not_an_image by extension and missing_label for a file outside
the class folders), then empty_file (zero bytes), missing_label (a labelled source, no
label) or label_out_of_range (below 0, or not below `num_classes` when known),
not_an_image (no JPEG, PNG, GIF, BMP or WebP signature: raw pixels are not read) and
corrupt_image (TensorFlow's decoder fails: truncated, broken data). Everything TensorFlow
decodes is used: grayscale, RGBA, palette, 16-bit, CMYK, animated GIF (first frame), 1x1
and very large images alike (an animated WebP is corrupt_image: the decoder refuses it).
The decoder is `decode_image`, the op every reader of images in byol-tf runs, so a record
that passes the check decodes in training too.

`check_source` runs the rule once over the records a folder / TFRecord source's splits
use, in parallel threads with progress lines, and caches the outcome by the source's
fingerprint (names, sizes and modification times of its files) in `data.check_cache_dir`:
a run on an unchanged source reads its images once, to train, not twice. Then, above
`data.max_bad_fraction` of dropped records, one line names the counts per reason and the
first records (`BadDataError`); below it, the dropped records are logged and skipped.
Embedded arrays and prepared TFDS datasets are not checked (TFDS checked them when it
prepared them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Sequence

import numpy as np

from byol_tf import fileio, sources
from byol_tf.config import DataConfig

logger = logging.getLogger(__name__)

# Leading bytes of the formats `decode_image` reads, and their names.
IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
# Dropped records named in a report and in the error above max_bad_fraction.
FIRST_DROPPED = 50
# Records named one by one in the log of a check pass.
LOGGED_DROPS = 5
_CACHE_VERSION = 1
_CHECK_FIELDS = (
    "source", "name", "path", "eval_split", "tfds_data_dir", "train_split", "holdout_examples",
    "num_classes", "seed", "max_examples", "image_key", "label_key", "label_offset",
)


class BadDataError(ValueError):
    """More records were dropped than `max_bad_fraction` allows, or none are left."""


# ------------------------------------------------------------------------ decoding


def image_format(data: bytes) -> str | None:
    """The format name a file's signature announces ("JPEG", "PNG", ...), or None."""
    for signature, name in IMAGE_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(encoded):
    """Decodes JPEG / PNG / GIF / BMP / WebP bytes to uint8 [H, W, 3] (graph or eager).

    Gray repeated to 3 channels, alpha dropped, palettes expanded, 16 bits scaled to 8, CMYK
    converted, the first frame of an animation: the one decoder of byol-tf, so training,
    evaluation, ingestion and the checks see the same pixels.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def cap_image_side(image, max_side: int | None):
    """Shrinks a uint8 [H, W, 3] image whose longer side exceeds `max_side` to that side,
    keeping the aspect ratio (antialiased bilinear; graph or eager). None: unchanged."""
    import tensorflow as tf

    if not max_side:
        return image
    shape = tf.shape(image)
    longer = tf.maximum(shape[0], shape[1])

    def shrink():
        scale = tf.cast(max_side, tf.float32) / tf.cast(longer, tf.float32)
        size = tf.maximum(tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32), 1)
        resized = tf.image.resize(image, size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    return tf.cond(longer > max_side, shrink, lambda: image)


# -------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a source's labels must be.

    Attributes:
        labelled: a record without a label is dropped (missing_label); an unlabelled
            source (a folder without class folders, TFRecords without a label feature)
            gives every record label -1 instead. The pipeline always requires labels.
        num_classes: labels must lie in [0, num_classes - 1]; None: any label >= 0.
    """

    labelled: bool = True
    num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one record's check.

    Attributes:
        candidate: the record as read.
        reason: a drop reason, None when the record is used.
        detail: what was wrong (the decoder's words, the bad label).
        image_format: "JPEG", "PNG", ... for encoded images.
        pixels: the decoded uint8 [H, W, 3] image (None when dropped).
    """

    candidate: sources.Candidate
    reason: str | None = None
    detail: str = ""
    image_format: str | None = None
    pixels: np.ndarray | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None


def check_label(label: int | None, rules: Rules) -> tuple[str | None, str]:
    """(drop reason or None, detail) for a record's label."""
    if label is None:
        return (sources.MISSING_LABEL, "no label") if rules.labelled else (None, "")
    if label < 0 or (rules.num_classes is not None and label >= rules.num_classes):
        allowed = f"[0, {rules.num_classes - 1}]" if rules.num_classes is not None else ">= 0"
        return sources.LABEL_OUT_OF_RANGE, f"label {label} is outside {allowed}"
    return None, ""


def check_candidate(candidate: sources.Candidate, rules: Rules) -> Decision:
    """Applies the rule (module docstring) to one record; never raises for bad data."""
    if candidate.reason:
        return Decision(candidate, candidate.reason, candidate.detail)
    if candidate.array is not None:
        return _check_array(candidate, rules)
    data = candidate.data or b""
    if not data:
        return Decision(candidate, sources.EMPTY_FILE, "zero bytes")
    reason, detail = check_label(candidate.label, rules)
    if reason:
        return Decision(candidate, reason, detail)
    kind = image_format(data)
    if kind is None:
        return Decision(
            candidate, sources.NOT_AN_IMAGE, f"starts with {data[:8]!r}, not an encoded JPEG, PNG, GIF, BMP or WebP"
        )
    import tensorflow as tf

    try:
        pixels = decode_image(tf.constant(data)).numpy()
    except (tf.errors.OpError, ValueError) as error:
        return Decision(candidate, sources.CORRUPT_IMAGE, f"{kind}: {sources.op_error_text(error)}", kind)
    return Decision(candidate, image_format=kind, pixels=pixels)


def _check_array(candidate: sources.Candidate, rules: Rules) -> Decision:
    reason, detail = check_label(candidate.label, rules)
    if reason:
        return Decision(candidate, reason, detail)
    array = np.asarray(candidate.array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        return Decision(candidate, sources.BAD_ARRAY, f"{array.dtype} {array.shape} is not uint8 [H, W, 3]")
    return Decision(candidate, pixels=array)


# --------------------------------------------------------------------------- report


class CheckReport:
    """Counts of checked records per split: total, kept, dropped and each drop reason, and
    the first dropped records (the smallest by split and name, so that every way of
    running a check names the same ones).

    Args:
        splits: the split names, in report order.
    """

    def __init__(self, splits: Sequence[str] = sources.SPLITS):
        self.splits = tuple(splits)
        self.counts: dict[str, collections.Counter] = {split: collections.Counter() for split in self.splits}
        self.dropped: list[dict[str, str]] = []

    def count(self, split: str, outcome: str, amount: int = 1):
        self.counts.setdefault(split, collections.Counter())[outcome] += amount

    def add(self, split: str, decision: Decision):
        self.count(split, "total")
        if decision.kept:
            self.count(split, "kept")
            return
        self.count(split, "dropped")
        self.count(split, decision.reason)
        self.note_dropped(split, decision.candidate.record_id, decision.reason, decision.detail)

    def note_dropped(self, split: str, record: str, reason: str, detail: str):
        self.dropped.append({"split": split, "record": record, "reason": reason, "detail": detail})
        if len(self.dropped) > 2 * FIRST_DROPPED:
            self._trim()

    def _trim(self):
        order = {split: index for index, split in enumerate(self.splits)}
        self.dropped.sort(key=lambda d: (order.get(d["split"], len(order)), d["record"]))
        del self.dropped[FIRST_DROPPED:]

    def merge(self, other: "CheckReport"):
        for split, counts in other.counts.items():
            self.counts.setdefault(split, collections.Counter()).update(counts)
        for entry in other.dropped:
            self.note_dropped(**entry)

    def first_dropped(self) -> list[dict[str, str]]:
        self._trim()
        return list(self.dropped)

    def totals(self) -> collections.Counter:
        total = collections.Counter()
        for counts in self.counts.values():
            total.update(counts)
        return total

    @property
    def bad_fraction(self) -> float:
        totals = self.totals()
        return totals["dropped"] / totals["total"] if totals["total"] else 0.0

    def reasons(self, split: str | None = None) -> dict[str, int]:
        """Dropped records per reason, of one split or of all."""
        counts = self.totals() if split is None else self.counts.get(split, collections.Counter())
        return {reason: counts[reason] for reason in sources.DROP_REASONS if counts[reason]}

    def to_dict(self) -> dict[str, Any]:
        def full(counts):
            return {
                **{key: counts[key] for key in ("total", "kept", "dropped")},
                "dropped_by_reason": {r: counts[r] for r in sources.DROP_REASONS if counts[r]},
            }

        return {
            "splits": {split: full(self.counts.get(split, collections.Counter())) for split in self.splits},
            "total": full(self.totals()),
            "bad_fraction": self.bad_fraction,
            "first_dropped_records": self.first_dropped(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CheckReport":
        report = cls(tuple(raw["splits"]))
        for split, counts in raw["splits"].items():
            report.count(split, "total", counts["total"])
            report.count(split, "kept", counts["kept"])
            report.count(split, "dropped", counts["dropped"])
            for reason, amount in counts["dropped_by_reason"].items():
                report.count(split, reason, amount)
        report.dropped = list(raw["first_dropped_records"])
        return report

    def describe(self) -> str:
        """One line: records checked, dropped per reason."""
        totals = self.totals()
        reasons = ", ".join(f"{r}={n}" for r, n in self.reasons().items()) or "none"
        return f"{totals['total']} records checked, {totals['dropped']} dropped ({self.bad_fraction:.2%}: {reasons})"

    def enforce(self, max_bad_fraction: float, *, field: str = "data.max_bad_fraction", where: str = ""):
        """Raises BadDataError (one line) when too many records were dropped or none is left."""
        totals = self.totals()
        if totals["total"] == 0:
            raise BadDataError(f"{where or 'data'}: no records to read: check the source settings")
        reasons = ", ".join(f"{r}={n}" for r, n in self.reasons().items())
        first = "; ".join(f"{d['record']} ({d['reason']}: {d['detail']})" for d in self.first_dropped()[:3])
        if totals["dropped"] == totals["total"]:
            raise BadDataError(
                f"{where or 'data'}: every record was dropped ({totals['total']}: {reasons}). First: {first}."
            )
        if self.bad_fraction > max_bad_fraction:
            raise BadDataError(
                f"{where or 'data'}: dropped {totals['dropped']} of {totals['total']} records "
                f"({self.bad_fraction:.2%}), more than {field}={max_bad_fraction:.2%}: {reasons}. First: {first}."
                f" Fix or remove these records, or raise {field}."
            )


# ------------------------------------------------------------------- the check pass


@dataclasses.dataclass(frozen=True)
class SourceCheck:
    """The outcome of the check pass over a folder / TFRecord source.

    Attributes:
        stream_records: positions of each stream.
        files: tfrecord: per stream, each file's readable record count (the reader takes
            no more, so a damaged tail is never read).
        keys: tfrecord: the image and label features.
        labelled: whether the source has labels.
        num_classes: the label bound used, when known.
        dropped: per stream, the positions of dropped records.
        report: the counts.
    """

    stream_records: dict[str, int]
    files: dict[str, tuple[sources.FileCount, ...]]
    keys: sources.RecordKeys | None
    labelled: bool
    num_classes: int | None
    dropped: dict[str, frozenset[int]]
    report: CheckReport

    def kept_positions(self, cfg: DataConfig, split: str) -> np.ndarray:
        """The split's positions (`sources.split_positions`) without the dropped ones, in order."""
        stream = sources.stream_of(cfg, split)
        positions = sources.split_positions(cfg, split, self.stream_records[stream])
        dropped = self.dropped.get(stream, frozenset())
        if not dropped:
            return positions
        return positions[~np.isin(positions, np.fromiter(dropped, np.int64, len(dropped)))]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _CACHE_VERSION,
                "stream_records": self.stream_records,
                "files": {s: [dataclasses.astuple(c) for c in counts] for s, counts in self.files.items()},
                "keys": dataclasses.asdict(self.keys) if self.keys else None,
                "labelled": self.labelled,
                "num_classes": self.num_classes,
                "dropped": {s: sorted(p) for s, p in self.dropped.items()},
                "report": self.report.to_dict(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "SourceCheck":
        raw = json.loads(text)
        if raw.get("version") != _CACHE_VERSION:
            raise ValueError("a check cache of another version")
        return cls(
            stream_records=raw["stream_records"],
            files={s: tuple(sources.FileCount(*c) for c in counts) for s, counts in raw["files"].items()},
            keys=sources.RecordKeys(**raw["keys"]) if raw["keys"] else None,
            labelled=raw["labelled"],
            num_classes=raw["num_classes"],
            dropped={s: frozenset(p) for s, p in raw["dropped"].items()},
            report=CheckReport.from_dict(raw["report"]),
        )


def cache_dir(cfg: DataConfig) -> str:
    """Where check passes are cached: `data.check_cache_dir`, $BYOL_TF_CACHE_DIR, else
    $XDG_CACHE_HOME/byol-tf or ~/.cache/byol-tf; then checks/."""
    base = cfg.check_cache_dir or os.environ.get("BYOL_TF_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "byol-tf")
    return fileio.join(base, "checks")


def cache_key(cfg: DataConfig) -> str:
    """The check's identity: the source's fingerprint and the settings that choose and judge records."""
    fields = {name: getattr(cfg, name) for name in _CHECK_FIELDS}
    raw = json.dumps({"version": _CACHE_VERSION, "fingerprint": sources.fingerprint(cfg), "data": fields}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


_MEMO: dict[str, SourceCheck] = {}
_MEMO_LOCK = threading.Lock()


def check_source(cfg: DataConfig, *, enforce: bool = True) -> SourceCheck:
    """The check pass over the records a folder / TFRecord source's splits use (module docstring).

    Reuses the outcome cached for the same fingerprint and settings (in this process,
    then on disk); otherwise runs it and caches it atomically. The dropped records are
    logged, then `data.max_bad_fraction` is applied.

    Raises:
        BadDataError: more than `data.max_bad_fraction` of the records were dropped.
        ValueError: naming the config field, for a source that cannot be read at all.
    """
    key = cache_key(cfg)
    with _MEMO_LOCK:
        result = _MEMO.get(key)
    if result is None:
        path = fileio.join(cache_dir(cfg), f"{key}.json")
        result = _load_cached(path)
        if result is None:
            result = run_check(cfg)
            try:
                fileio.write_text(path, result.to_json())
            except Exception as error:  # noqa: BLE001 -- a read-only cache costs speed, not the run
                logger.warning("could not cache the data check at %s: %s", path, sources.error_message(error))
        else:
            logger.info("data check (cached, %s): %s", path, result.report.describe())
        with _MEMO_LOCK:
            _MEMO[key] = result
        _log_dropped(result.report)
    if enforce:
        result.report.enforce(cfg.max_bad_fraction, where=_where(cfg))
    return result


def _where(cfg: DataConfig) -> str:
    return "data.path" if not cfg.eval_split else "data.path / data.eval_split"


def _load_cached(path: str) -> SourceCheck | None:
    try:
        if not fileio.exists(path):
            return None
        return SourceCheck.from_json(fileio.read_text(path))
    except Exception:  # noqa: BLE001 -- an unreadable or foreign cache file is checked afresh
        return None


def _log_dropped(report: CheckReport):
    dropped = report.first_dropped()
    for entry in dropped[:LOGGED_DROPS]:
        logger.warning("skipping %s (%s: %s)", entry["record"], entry["reason"], entry["detail"])
    more = report.totals()["dropped"] - min(len(dropped), LOGGED_DROPS)
    if more > 0:
        logger.warning("skipping %d more bad records (%s)", more, report.describe())


def run_check(cfg: DataConfig, plan: sources.Plan | None = None, *, workers: int | None = None) -> SourceCheck:
    """Checks every record the splits of `cfg` use, in parallel threads (no cache).

    TensorFlow's decoder releases the GIL, so threads decode in parallel; a progress
    line comes every `sources.PROGRESS_SECONDS`.
    """
    plan = plan or sources.plan(cfg)
    rules = Rules(labelled=plan.labelled, num_classes=plan.num_classes)
    report = CheckReport()
    dropped: dict[str, set[int]] = {stream: set() for stream in plan.stream_records}
    total = plan.records

    def check_unit(unit: sources.Unit) -> tuple[CheckReport, list[tuple[str, int]]]:
        partial, bad = CheckReport(), []
        for candidate in sources.read_unit(unit, cfg, plan.keys):
            decision = check_candidate(candidate, rules)
            partial.add(candidate.split, decision)
            if not decision.kept and candidate.position >= 0:
                bad.append((unit.stream, candidate.position))
        return partial, bad

    started = last = time.monotonic()
    done = 0
    workers = workers or max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(check_unit, unit) for unit in plan.units]
        for future in concurrent.futures.as_completed(futures):
            partial, bad = future.result()
            report.merge(partial)
            for stream, position in bad:
                dropped[stream].add(position)
            done += partial.totals()["total"]
            now = time.monotonic()
            if now - last > sources.PROGRESS_SECONDS:
                last = now
                logger.info(
                    "checking %s: %d of %d records (%.0f/s), %d dropped",
                    _where(cfg), done, total, done / (now - started), report.totals()["dropped"],
                )
    logger.info("data check: %s in %.1f s", report.describe(), time.monotonic() - started)
    return SourceCheck(
        stream_records=dict(plan.stream_records),
        files=dict(plan.files),
        keys=plan.keys,
        labelled=plan.labelled,
        num_classes=plan.num_classes,
        dropped={stream: frozenset(positions) for stream, positions in dropped.items()},
        report=report,
    )


def clear_memo():
    """Forgets the check passes of this process (the disk cache stays)."""
    with _MEMO_LOCK:
        _MEMO.clear()
