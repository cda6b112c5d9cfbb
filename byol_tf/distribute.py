"""One place for `tf.distribute`: strategy, precision, input distribution, Keras workarounds.

`default` (one device), `mirrored` (all local GPUs, or N logical CPU devices for tests),
`multi_worker` (hosts from the `TF_CONFIG` environment variable), `tpu`. The batch in the
config is GLOBAL: each of the strategy's replicas computes `batch / replicas` examples, and
`BYOLModel` divides its loss by the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable

import keras
import tensorflow as tf

from byol_tf.config import Config, DistributeConfig

DatasetFn = Callable[[tf.distribute.InputContext | None], tf.data.Dataset]

logger = logging.getLogger(__name__)


def configure_logical_cpus(count: int):
    """Splits the host CPU into `count` logical devices (before TF initialises devices).

    Raises:
        ValueError: the runtime was already initialised with a different device count.
    """
    cpus = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpus[0])
    if existing is not None and len(existing) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise ValueError(
            f"distribute.num_cpu_devices={count}: TensorFlow was initialised before the logical "
            "CPU devices could be set; choose the strategy before any other TensorFlow work"
        ) from None


def cluster_spec_from_env() -> dict | None:
    """The parsed `TF_CONFIG` environment variable, or None when it is unset.

    Raises:
        ValueError: TF_CONFIG is not JSON or has no `cluster` / `task`.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"distribute.strategy: 'multi_worker' reads TF_CONFIG, which is not JSON: {error}") from None
    if not isinstance(spec, dict) or "cluster" not in spec or "task" not in spec:
        raise ValueError(
            "distribute.strategy: 'multi_worker' needs TF_CONFIG = "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
        )
    return spec


def strategy_from_config(config: DistributeConfig) -> tf.distribute.Strategy:
    """Returns the strategy the config asks for.

    Args:
        config: `distribute` section. `num_cpu_devices` > 0 with `mirrored` builds that many
            logical CPU devices (tests and CPU-only machines); otherwise all local GPUs.

    Raises:
        ValueError: a malformed TF_CONFIG, or no TPU at `tpu_address`.
    """
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "mirrored":
        if config.num_cpu_devices:
            configure_logical_cpus(config.num_cpu_devices)
            devices = [device.name for device in tf.config.list_logical_devices("CPU")]
            return tf.distribute.MirroredStrategy(devices[: config.num_cpu_devices])
        return tf.distribute.MirroredStrategy()
    if config.strategy == "multi_worker":
        if cluster_spec_from_env() is None:
            logger.warning("distribute.strategy='multi_worker' without TF_CONFIG: training on this host only")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu_address or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"distribute.strategy: 'tpu' found no TPU at distribute.tpu_address="
                f"{config.tpu_address!r} (a TPU name, grpc:// address or 'local'): {error}"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"distribute.strategy: unknown strategy {config.strategy!r}")


# ------------------------------------------------------------------------- precision


def precision_policy(config: DistributeConfig, jit_compile: bool = False) -> str:
    """Keras dtype policy name: `precision`, with `auto` resolved for the hardware.

    `auto` is `mixed_bfloat16` on TPUs; on GPUs with bfloat16 matrix units (compute
    capability 8.0 or newer) when the step is XLA-compiled (faster than the float32 / TF32
    step with XLA, slower without it: casts and unfused ops); and on machines without GPUs
    whose CPU computes bfloat16 in hardware (`cpu_has_bfloat16_units`: AVX512-BF16 or
    AMX), where the demo's linear top-1 is the same as float32's within the run-to-run
    spread (benchmarks/RESULTS.md). Everywhere else `float32`, including CPUs that would
    emulate bfloat16.
    """
    if config.precision != "auto":
        return config.precision
    if config.strategy == "tpu":
        return "mixed_bfloat16"
    capabilities = gpu_compute_capabilities()
    if capabilities:
        return "mixed_bfloat16" if jit_compile and min(capabilities) >= (8, 0) else "float32"
    return "mixed_bfloat16" if cpu_has_bfloat16_units() else "float32"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux `/proc/cpuinfo`; empty elsewhere).

    Args:
        cpuinfo: the text of /proc/cpuinfo (tests pass their own); read from the file when None.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as stream:  # a local system file, not data
                cpuinfo = stream.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


# Set to 0 to keep `distribute.precision: auto` in float32 on CPUs with bfloat16 units.
CPU_BFLOAT16_VARIABLE = "BYOL_TF_CPU_BFLOAT16"
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bfloat16 kernels.
_ONEDNN_ISAS_WITHOUT_BFLOAT16 = frozenset(
    {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}
)


def cpu_has_bfloat16_units(flags: frozenset[str] | None = None, environ=None) -> bool:
    """Whether TensorFlow computes bfloat16 in hardware on this CPU: AVX512-BF16 or AMX-BF16
    present, oneDNN not capped below them (`ONEDNN_MAX_CPU_ISA`), and `BYOL_TF_CPU_BFLOAT16`
    not 0. Elsewhere oneDNN would emulate bfloat16, slower than float32.

    Args:
        flags: the CPU's flags (tests pass their own); `cpu_flags()` when None.
        environ: the environment (tests pass their own); `os.environ` when None.
    """
    environ = os.environ if environ is None else environ
    if environ.get(CPU_BFLOAT16_VARIABLE, "").strip() == "0":
        return False
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    if cap in _ONEDNN_ISAS_WITHOUT_BFLOAT16:
        return False
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) compute capability of each visible GPU; [] without GPUs."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append(tuple(capability) if capability else (0, 0))
    return found


def resolve_jit_compile(setting: bool | str, strategy: tf.distribute.Strategy, deterministic: bool = False) -> bool:
    """`train.jit_compile` for `model.compile`.

    `auto` is XLA on TPUs and on ONE GPU (several times faster there). It stays off on
    CPUs (slower there), with several GPU replicas (not measured; `true` turns it on), and
    with `train.deterministic`, as Keras' own `auto` (not every XLA op is deterministic).
    """
    if setting != "auto":
        return bool(setting)
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    if deterministic or strategy.num_replicas_in_sync > 1:
        return False
    return bool(gpu_compute_capabilities())


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside compute in `name`'s dtype; the global policy is restored after.

    Variables stay float32 under the mixed policies; `BYOLModel` computes its loss and the
    target EMA in float32 whatever the policy.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, policy: str) -> keras.optimizers.Optimizer:
    """Adds dynamic loss scaling under `mixed_float16` (float16 gradients underflow)."""
    if policy == "mixed_float16":
        return keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


# ---------------------------------------------------------------------------- input


def check_static_shapes(dataset: tf.data.Dataset):
    """Raises unless every tensor of the batches has a fully known shape (a TPU rule).

    Raises:
        ValueError: naming the tensor; usually a batch built without drop_remainder=True.
    """
    for name, spec in _named_specs(dataset.element_spec):
        if not spec.shape.is_fully_defined():
            raise ValueError(
                f"distribute.strategy: 'tpu' needs static shapes, but the input's {name!r} has shape "
                f"{spec.shape}: batch with drop_remainder=True and resize images to one size"
            )


def _check_per_replica_batch(dataset: tf.data.Dataset, expected: int):
    for name, spec in _named_specs(dataset.element_spec):
        size = spec.shape[0] if spec.shape.rank else None
        if size is not None and size != expected:
            raise ValueError(
                f"distribute.dataset_sharding: 'per_worker' calls the dataset function with a "
                f"tf.distribute.InputContext and needs per-replica batches of {expected}, but "
                f"{name!r} comes in batches of {size}: shard by the context and batch with "
                "input_context.get_per_replica_batch_size, or use 'global_batch'"
            )


def _named_specs(spec, prefix=""):
    if isinstance(spec, dict):
        for key, value in spec.items():
            yield from _named_specs(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(spec, (tuple, list)):
        for index, value in enumerate(spec):
            yield from _named_specs(value, f"{prefix}[{index}]")
    else:
        yield prefix or "input", spec


def distribute_input(
    strategy: tf.distribute.Strategy,
    config: DistributeConfig,
    dataset: tf.data.Dataset | DatasetFn,
    start_step: int = 0,
    global_batch: int | None = None,
):
    """The input `model.fit` should get, starting at global step `start_step`.

    One-machine strategies (and `dataset_sharding: global_batch`) get the global batches,
    which Keras splits over the replicas: every replica count sees the same global batches.
    `multi_worker` / `tpu` with `per_worker` sharding call `dataset(input_context)` once per
    worker (`strategy.distribute_datasets_from_function`): the function must then shard by
    `input_context` and batch per replica, as `byol_tf.data.make_pretraining_dataset` does.

    Args:
        strategy: the training strategy.
        config: `distribute` section (`dataset_sharding`, `strategy`).
        dataset: global batches, or a function `input_context or None -> dataset`. A
            function is called afresh here, so its first iterator is the one a fresh process
            sees: needed for exact resumes (a tf.data shuffle with reshuffle_each_iteration
            draws a new order for every iterator made from the same dataset object).
        start_step: global batches already consumed (a resumed run skips them).
        global_batch: the global batch size, to check that a dataset function batches per
            replica.

    Returns:
        A `tf.data.Dataset` or a `tf.distribute` distributed dataset.

    Raises:
        ValueError: the TPU path gets batches of unknown shape, or a dataset function's
            batches are not per replica.
    """
    scale_out = config.strategy in ("multi_worker", "tpu")
    if scale_out and config.dataset_sharding == "per_worker" and callable(dataset):

        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            worker_dataset = dataset(context)
            if config.strategy == "tpu":
                check_static_shapes(worker_dataset)
            if global_batch:
                _check_per_replica_batch(worker_dataset, context.get_per_replica_batch_size(global_batch))
            # Each step takes one per-replica batch for every replica of this worker.
            replicas_here = context.num_replicas_in_sync // context.num_input_pipelines
            return worker_dataset.skip(start_step * replicas_here)

        return strategy.distribute_datasets_from_function(per_worker)

    global_batches = dataset(None) if callable(dataset) else dataset
    if scale_out and config.dataset_sharding == "per_worker":
        logger.warning(
            "distribute.dataset_sharding='per_worker' needs a dataset function; a dataset was "
            "given, so every worker builds the global batches and keeps its slice"
        )
    if config.strategy == "tpu":
        check_static_shapes(global_batches)
    if scale_out:
        # Every worker runs the same pipeline and keeps its slice of each global batch
        # (the default AUTO policy would first try to give each worker different files).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        global_batches = global_batches.with_options(options)
    return global_batches.skip(start_step) if start_step else global_batches


# ---------------------------------------------------------------- Keras workarounds


def prepare_for_fit(model: keras.Model, strategy: tf.distribute.Strategy):
    """Makes `model.fit` work under every strategy; call after `compile`, before `fit`.

    Keras 3 `fit` fails out of the box under MultiWorkerMirroredStrategy
    (keras-team/keras#20585). The workarounds live here and nowhere else:

    1. The optimizer's variables are built in the strategy scope now, not lazily inside
       the first distributed step (a checkpoint restore needs them too).
    2. Keras' symbolic build is skipped: under a strategy it pulls a batch from the
       distributed dataset and `strategy.reduce`s the dict of tensors, which
       MultiWorkerMirroredStrategy rejects. `BYOLModel` creates all its variables in
       `__init__`, so that build has nothing to do anyway.
    3. Under MultiWorkerMirroredStrategy `fit` reduces each log with
       `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalars a train step
       returns: the logs are made rank-1 (shape [1]), which reduces to the same scalar.

    Raises:
        ValueError: the model has unbuilt variables.
    """
    if not model.built:
        raise ValueError("prepare_for_fit: build the model (create its variables) before fit")
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = _skip_symbolic_build
    if is_multi_worker(strategy) and not getattr(model.train_step, "_rank1_logs", False):
        train_step = model.train_step

        def rank1_train_step(data):
            return {name: tf.reshape(value, [1]) for name, value in train_step(data).items()}

        rank1_train_step._rank1_logs = True
        model.train_step = rank1_train_step


def _skip_symbolic_build(*args, **kwargs):
    del args, kwargs


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is_chief, task index): only the chief writes shared files such as checkpoints."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0
    return task_role(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict())


def task_role(task_type: str | None, task_id: int | None, cluster: dict) -> tuple[bool, int]:
    """(is_chief, task index) of a task of a TF_CONFIG cluster.

    The chief is task "chief" (Vertex AI names its first worker pool so, and the others
    "worker", in the TF_CONFIG it sets on each machine), or worker 0 when the cluster has
    no chief (a hand-written TF_CONFIG of workers only).
    """
    task_id = int(task_id or 0)
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    return is_chief, task_id


# --------------------------------------------------------------------------- runtime


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What training needs from `tf.distribute`, decided once per run.

    Attributes:
        strategy: the `tf.distribute` strategy.
        config: the `distribute` section it came from.
        is_chief: this process writes shared outputs (run folder, backups, logs).
        task_id: this worker's index.
        jit_compile: `train.jit_compile` resolved for the hardware.
        policy: the Keras dtype policy name (`distribute.precision` resolved).
    """

    strategy: tf.distribute.Strategy
    config: DistributeConfig
    is_chief: bool
    task_id: int
    jit_compile: bool
    policy: str

    @classmethod
    def from_config(cls, config: Config, strategy: tf.distribute.Strategy | None = None) -> "Runtime":
        """The runtime of an experiment; `strategy` replaces the one `config.distribute` names."""
        strategy = strategy or strategy_from_config(config.distribute)
        is_chief, task_id = worker_role(strategy)
        jit_compile = resolve_jit_compile(config.train.jit_compile, strategy, config.train.deterministic)
        return cls(
            strategy=strategy,
            config=config.distribute,
            is_chief=is_chief,
            task_id=task_id,
            jit_compile=jit_compile,
            policy=precision_policy(config.distribute, jit_compile),
        )

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @contextlib.contextmanager
    def scope(self):
        """Build models and optimizers inside: the strategy's scope under the dtype policy."""
        with self.strategy.scope(), dtype_policy(self.policy):
            yield

    def wrap_optimizer(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        return wrap_optimizer(optimizer, self.policy)

    def prepare(self, model: keras.Model) -> None:
        """`prepare_for_fit` under this strategy."""
        prepare_for_fit(model, self.strategy)

    def input(self, dataset: tf.data.Dataset | DatasetFn, start_step: int = 0, global_batch: int | None = None):
        """`distribute_input` under this strategy."""
        return distribute_input(self.strategy, self.config, dataset, start_step, global_batch=global_batch)
