"""One function from config to `tf.distribute` strategy.

`default` (one device), `mirrored` (all local GPUs, or N logical CPU devices for tests),
`multi_worker` (hosts from the `TF_CONFIG` environment variable), `tpu`.
"""

from __future__ import annotations

import tensorflow as tf

from byol_tf.config import DistributeConfig


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


def strategy_from_config(config: DistributeConfig) -> tf.distribute.Strategy:
    """Returns the strategy the config asks for.

    Args:
        config: `distribute` section. `num_cpu_devices` > 0 with `mirrored` builds that many
            logical CPU devices (tests and CPU-only machines); otherwise all local GPUs.
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
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"distribute.strategy: unknown strategy {config.strategy!r}")
