"""Tests for byol_tf.distribute and the scale-out paths of BYOLModel / training.

Strategy and config checks, the TPU rules as far as a machine without a TPU allows,
input distribution, mixed precision (loss and EMA in float32), gradient accumulation, and
two real MultiWorkerMirroredStrategy workers on 127.0.0.1. The mirrored == default test
(2 logical CPUs) lives in test_byol.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import byol, config as config_lib, distribute, training
from byol_tf.config import ConfigError, DistributeConfig
from fixtures import models as tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "training_run.py")


# ------------------------------------------------------------------- config and strategy


@pytest.mark.parametrize(
    "section, match",
    [
        ({"strategy": "tpu", "precision": "mixed_float16"}, "distribute.precision: TPUs compute in bfloat16"),
        ({"strategy": "default", "num_cpu_devices": 2}, "distribute.num_cpu_devices: is only used by strategy"),
        ({"strategy": "mirrored", "tpu_address": "local"}, "distribute.tpu_address: is only used by strategy 'tpu'"),
        ({"dataset_sharding": "by_file"}, "distribute.dataset_sharding: 'by_file' is not one of"),
        ({"precision": "float16"}, "distribute.precision: 'float16' is not one of"),
    ],
)
def test_bad_distribute_sections_name_the_field(section, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.from_dict({"distribute": section})


@pytest.mark.parametrize(
    "field, value",
    [("gradient_accumulation_steps", 0), ("checkpoint_every_steps", -1), ("keep_checkpoints", -1)],
)
def test_bad_train_fault_tolerance_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}: {value} is outside the allowed range"):
        config_lib.from_dict({"train": {field: value}})


def test_precision_auto_is_bfloat16_on_tpu_and_on_cpus_with_bfloat16_units(monkeypatch):
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(distribute, "cpu_has_bfloat16_units", lambda: True)
    assert distribute.precision_policy(DistributeConfig()) == "mixed_bfloat16"
    assert distribute.precision_policy(DistributeConfig(precision="float32")) == "float32"
    # A GPU decides, not the host's CPU: without XLA its step is faster in float32.
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [(9, 0)])
    assert distribute.precision_policy(DistributeConfig(), jit_compile=False) == "float32"
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(distribute, "cpu_has_bfloat16_units", lambda: False)
    assert distribute.precision_policy(DistributeConfig()) == "float32"
    assert distribute.precision_policy(DistributeConfig(strategy="mirrored")) == "float32"
    assert distribute.precision_policy(DistributeConfig(strategy="tpu")) == "mixed_bfloat16"
    assert distribute.precision_policy(DistributeConfig(strategy="tpu", precision="float32")) == "float32"
    assert distribute.precision_policy(DistributeConfig(precision="mixed_float16")) == "mixed_float16"


@pytest.mark.parametrize(
    "capabilities, jit_compile, expected",
    [
        ([], True, "float32"),  # CPU only
        ([(9, 0)], True, "mixed_bfloat16"),  # H100 / H200 with XLA: 1.44x measured
        ([(9, 0)], False, "float32"),  # without XLA bfloat16 measured slower (0.90x)
        ([(8, 0), (9, 0)], True, "mixed_bfloat16"),
        ([(7, 0), (9, 0)], True, "float32"),  # a V100 has no bfloat16 matrix units
    ],
)
def test_precision_auto_on_gpus_follows_capability_and_xla(monkeypatch, capabilities, jit_compile, expected):
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: capabilities)
    assert distribute.precision_policy(DistributeConfig(), jit_compile) == expected
    assert distribute.precision_policy(DistributeConfig(precision="float32"), jit_compile) == "float32"


def test_jit_compile_auto_is_xla_on_accelerators_only(monkeypatch):
    strategy = tf.distribute.get_strategy()
    assert distribute.gpu_compute_capabilities() == []  # this suite runs on CPUs
    assert distribute.resolve_jit_compile("auto", strategy) is False
    assert distribute.resolve_jit_compile(True, strategy) is True
    assert distribute.resolve_jit_compile(False, strategy) is False
    monkeypatch.setattr(distribute, "gpu_compute_capabilities", lambda: [(9, 0)])
    assert distribute.resolve_jit_compile("auto", strategy) is True
    assert distribute.resolve_jit_compile(False, strategy) is False
    # Not with deterministic ops, nor over several GPU replicas (unless asked for).
    assert distribute.resolve_jit_compile("auto", strategy, deterministic=True) is False
    assert distribute.resolve_jit_compile("auto", _Replicas(2)) is False
    assert distribute.resolve_jit_compile(True, _Replicas(2)) is True


def test_default_strategy_and_clear_errors_for_missing_tpu_and_bad_tf_config(monkeypatch):
    assert distribute.strategy_from_config(DistributeConfig()) is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="distribute.strategy: 'tpu' found no TPU at distribute.tpu_address=None"):
        distribute.strategy_from_config(DistributeConfig(strategy="tpu"))
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG, which is not JSON"):
        distribute.strategy_from_config(DistributeConfig(strategy="multi_worker"))
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}))
    with pytest.raises(ValueError, match='needs TF_CONFIG = {"cluster"'):
        distribute.strategy_from_config(DistributeConfig(strategy="multi_worker"))


@pytest.mark.parametrize(
    "task, chief, index",
    [({"type": "chief", "index": 0}, True, 0), ({"type": "worker", "index": 0}, False, 0), ({"type": "worker", "index": 1}, False, 1)],
)
def test_vertex_tf_config_makes_workerpool0_the_chief(monkeypatch, task, chief, index):
    # What Vertex AI sets on each replica of a custom job with two worker pools: pool 0 is
    # "chief", pool 1 "worker" (its CLUSTER_SPEC calls them workerpool0 / workerpool1).
    cluster = {"chief": ["workerpool0-0:2222"], "worker": ["workerpool1-0:2222", "workerpool1-1:2222"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": task, "environment": "cloud", "job": {"args": []}})
    )
    assert distribute.cluster_spec_from_env()["cluster"] == cluster
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()  # what MultiWorkerMirrored reads
    assert distribute.task_role(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict()) == (chief, index)
    # Without a chief (a TF_CONFIG written by hand), worker 0 is the chief.
    assert distribute.task_role("worker", 0, {"worker": ["a:1", "b:1"]}) == (True, 0)
    assert distribute.task_role("worker", 1, {"worker": ["a:1", "b:1"]}) == (False, 1)


class _Replicas:
    def __init__(self, count):
        self.num_replicas_in_sync = count


def test_global_batch_splits_over_replicas_and_micro_batches():
    config = config_lib.from_dict({"data": {"batch_size": 32}, "train": {"gradient_accumulation_steps": 4}})
    assert training.global_batch_size(config, _Replicas(2)) == 32
    message = r"batch_size=32 must be divisible by the 3 replicas x train.gradient_accumulation_steps=4"
    with pytest.raises(ValueError, match=message):
        training.global_batch_size(config, _Replicas(3))


# ------------------------------------------------------------------------ input


def batches(size=4, drop_remainder=True, count=10):
    images = tf.reshape(tf.range(count * 2 * 2 * 3, dtype=tf.float32), (count, 2, 2, 3))
    labels = tf.range(count, dtype=tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices({"view1": images, "view2": images, "label": labels})
    return dataset.batch(size, drop_remainder=drop_remainder)


def test_tpu_rules_static_shapes():
    distribute.check_static_shapes(batches())
    message = r"'tpu' needs static shapes, but the input's 'view1' has shape \(None, 2, 2, 3\): batch with"
    with pytest.raises(ValueError, match=message):
        distribute.check_static_shapes(batches(drop_remainder=False))
    tpu = DistributeConfig(strategy="tpu", dataset_sharding="global_batch")
    with pytest.raises(ValueError, match="drop_remainder=True"):
        distribute.distribute_input(tf.distribute.get_strategy(), tpu, batches(drop_remainder=False))
    # The real input pipeline keeps static shapes, globally and per replica.
    config = config_lib.from_dict(
        {
            "data": {"source": "digits", "holdout_examples": 100, "max_examples": 300, "batch_size": 8,
                     "shuffle_buffer": 16},
            "augment": {"image_size": 8},
        }
    )
    from byol_tf import data

    distribute.check_static_shapes(data.make_pretraining_dataset(config))
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=8)
    per_replica = data.make_pretraining_dataset(config, input_context=context)
    distribute.check_static_shapes(per_replica)
    assert per_replica.element_spec["view1"].shape == (1, 8, 8, 3)


def first_labels(dataset):
    batch = next(iter(dataset))
    return np.asarray(batch["label"])


def test_resumed_input_skips_the_consumed_global_batches():
    strategy, one_machine = tf.distribute.get_strategy(), DistributeConfig()
    assert first_labels(distribute.distribute_input(strategy, one_machine, batches(), 0)).tolist() == [0, 1, 2, 3]
    skipped = distribute.distribute_input(strategy, one_machine, lambda context: batches(2), 3)
    assert first_labels(skipped).tolist() == [6, 7]
    # Scale-out with global batches: every worker keeps its slice of the same batches.
    scale_out = DistributeConfig(strategy="multi_worker", dataset_sharding="global_batch")
    global_batches = distribute.distribute_input(strategy, scale_out, batches(), 1)
    policy = global_batches.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
    assert first_labels(global_batches).tolist() == [4, 5, 6, 7]


def test_per_worker_input_gets_the_input_context_and_skips_per_replica_batches():
    contexts = []

    def dataset_fn(context):
        contexts.append(context)
        return batches(1)

    distributed = distribute.distribute_input(
        tf.distribute.get_strategy(), DistributeConfig(strategy="multi_worker"), dataset_fn, start_step=3
    )
    assert first_labels(distributed).tolist() == [3]
    assert [(c.num_input_pipelines, c.input_pipeline_id, c.num_replicas_in_sync) for c in contexts] == [(1, 0, 1)]
    # A function that ignores the context and batches globally is refused.
    with pytest.raises(ValueError, match="needs per-replica batches of 2, but 'view1' comes in batches of 4"):
        distribute.distribute_input(
            tf.distribute.get_strategy(), DistributeConfig(strategy="multi_worker"), lambda c: batches(4), global_batch=2
        )


# --------------------------------------------------------------------- Keras workarounds


def test_prepare_for_fit_builds_the_optimizer_and_keeps_scalar_logs_off_multi_worker():
    model = tiny.tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    assert not model.optimizer.built
    train_step = model.train_step
    distribute.prepare_for_fit(model, tf.distribute.get_strategy())
    assert model.optimizer.built
    assert model.train_step == train_step  # rank-1 logs only under MultiWorkerMirroredStrategy
    logs = tiny.fit_steps(model, tiny.random_batch(with_labels=False))
    assert np.isfinite(logs["loss"][0])
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    unbuilt.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="build the model"):
        distribute.prepare_for_fit(unbuilt, tf.distribute.get_strategy())


# ---------------------------------------------------------------------- mixed precision


def mixed_model(policy, optimizer, num_classes=3, **kwargs):
    with distribute.dtype_policy(policy):
        model = tiny.tiny_model(num_classes=num_classes, **kwargs)
    model.compile(optimizer=optimizer)
    return model


@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_loss_and_ema_in_float32(policy, compute):
    assert keras.config.dtype_policy().name == "float32"
    optimizer = distribute.wrap_optimizer(keras.optimizers.SGD(0.5), policy)
    assert isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) == (policy == "mixed_float16")
    if policy == "mixed_float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=16.0)
    model = mixed_model(policy, optimizer)
    assert keras.config.dtype_policy().name == "float32"  # restored after the build
    batch = tiny.random_batch()
    assert model.online_projector(model.online_encoder(batch["view1"])).dtype == compute
    assert all(weight.dtype == "float32" for weight in model.weights)

    gradients, sums, moments = model._gradients(batch, tf.constant(8.0), model.trainable_variables)
    assert sums["loss"].dtype == tf.float32 and moments["m2"].dtype == tf.float32
    assert sums["probe"]["loss"].dtype == tf.float32
    assert all(gradient.dtype == tf.float32 for gradient in gradients)

    old_target = {id(w): w.numpy().copy() for w in model.target_weights}
    logs = tiny.fit_steps(model, batch)
    assert int(model.optimizer.iterations.numpy()) == 1  # the step was applied, not skipped
    assert np.isfinite(logs["loss"][0])
    tau = np.float32(logs["tau"][0])
    for target, online in model.ema_pairs():  # the parameters; BN statistics are the target's own
        expected = tau * old_target[id(target)] + (np.float32(1) - tau) * online.numpy()
        np.testing.assert_allclose(target.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_loss_scale_skipped_step_leaves_the_target_unchanged():
    # An initial scale of 2^60 overflows float16 gradients: the step is skipped.
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=2.0**60)
    model = mixed_model("mixed_float16", optimizer)
    old_target = [w.numpy().copy() for w in model.target_weights]
    logs = tiny.fit_steps(model, tiny.random_batch())
    assert int(model.optimizer.iterations.numpy()) == 0
    assert logs["tau"][0] == 1.0
    for target, before in zip(model.target_weights, old_target):
        if target.name not in ("moving_mean", "moving_variance"):  # those move in the target's own forward
            np.testing.assert_array_equal(target.numpy(), before, err_msg=target.path)


# ---------------------------------------------------------------- gradient accumulation


def plain_encoder():
    inputs = keras.Input((tiny.IMAGE, tiny.IMAGE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def plain_mlp(input_dim):
    layers = [keras.Input((input_dim,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)]
    return keras.Sequential(layers)


def accumulating_model(steps, with_batch_norm=False):
    keras.utils.set_random_seed(1)
    model = byol.BYOLModel(
        build_encoder=tiny.tiny_encoder if with_batch_norm else plain_encoder,
        build_projector=(lambda: tiny.tiny_mlp(4)) if with_batch_norm else (lambda: plain_mlp(4)),
        build_predictor=(lambda: tiny.tiny_mlp(8)) if with_batch_norm else (lambda: plain_mlp(8)),
        image_size=tiny.IMAGE,
        total_steps=10,
        tau_base=0.9,
        num_classes=3,
        gradient_accumulation_steps=steps,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    return model


def test_four_micro_batches_of_8_update_like_one_batch_of_32_without_batch_norm():
    batch = tiny.random_batch(batch=32)
    whole, accumulated = accumulating_model(1), accumulating_model(4)
    whole_logs = tiny.fit_steps(whole, batch, steps=2)
    accumulated_logs = tiny.fit_steps(accumulated, batch, steps=2)
    assert int(accumulated.optimizer.iterations.numpy()) == 2  # one optimizer step per batch of 32
    # Sums in another order: relative tolerances for the derived values (float32 has ~7 digits).
    for key in ("loss", "collapse_std", "probe_loss", "probe_accuracy", "tau"):
        np.testing.assert_allclose(accumulated_logs[key], whole_logs[key], rtol=1e-4, atol=1e-7, err_msg=key)
    assert len(accumulated.weights) == len(whole.weights)
    for mine, reference in zip(accumulated.weights, whole.weights):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=1e-5, err_msg=mine.path)
    initial = accumulating_model(1).online_weights
    assert all(not np.allclose(w.numpy(), v.numpy()) for w, v in zip(accumulated.online_weights, initial))


def test_accumulation_steps_batch_norm_statistics_once_per_effective_batch():
    model = accumulating_model(4, with_batch_norm=True)
    layers = model.online_encoder.layers
    conv = next(layer for layer in layers if isinstance(layer, keras.layers.Conv2D))
    norm = next(layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization))
    start = norm.moving_mean.numpy().copy()
    batch = tiny.random_batch(batch=32)
    # Each micro-batch updates from the step's start with view 1, then view 2 (momentum 0.9).
    expected = []
    for index in range(4):
        rows = slice(8 * index, 8 * index + 8)
        mean1, mean2 = (np.mean(conv(batch[view][rows]).numpy(), axis=(0, 1, 2)) for view in ("view1", "view2"))
        expected.append(0.9 * (0.9 * start + 0.1 * mean1) + 0.1 * mean2)
    logs = tiny.fit_steps(model, batch)
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == 1
    np.testing.assert_allclose(logs["tau"][0], 0.9, rtol=1e-6)  # the EMA stepped once, at tau(0)


def test_build_model_passes_accumulation_from_the_config():
    config = config_lib.from_dict(
        {
            "network": {"encoder": "small_convnet", "projector_hidden_dim": 8, "projection_dim": 4,
                        "predictor_hidden_dim": 8},
            "augment": {"image_size": 8},
            "train": {"gradient_accumulation_steps": 2},
        }
    )
    assert training.build_model(config, total_steps=4, num_classes=None).gradient_accumulation_steps == 2


# ------------------------------------------------------------------ multi-worker (real)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_workers(tmp_path, *args, count=2, timeout=420):
    """Runs tests/training_run.py as `count` MultiWorkerMirroredStrategy workers on 127.0.0.1."""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    processes = []
    for index in range(count):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, SCRIPT, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "weights.npz"),
                   "--strategy", "multi_worker", *map(str, args)]
        processes.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    # The workers stop by themselves, or are killed at the deadline (one dead worker can
    # leave the other waiting in a collective).
    watchdogs = [threading.Timer(timeout, process.kill) for process in processes]
    for watchdog in watchdogs:
        watchdog.start()
    try:
        outputs = [process.communicate()[0] for process in processes]
    finally:
        for watchdog, process in zip(watchdogs, processes):
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"worker {index}: {output[-3000:]}"
    return [np.load(tmp_path / f"weights.worker-{index}.npz") for index in range(count)]


def run_one_machine(tmp_path, *args, timeout=300):
    command = [sys.executable, SCRIPT, "--run-dir", str(tmp_path / "single"), "--out", str(tmp_path / "single.npz"),
               *map(str, args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return np.load(tmp_path / "single.npz")


@pytest.mark.slow
def test_two_workers_fit_with_per_worker_shards_end_with_identical_weights(tmp_path):
    worker0, worker1 = run_workers(tmp_path, "--epochs", 1, "--steps-per-epoch", 3, "--every", 2)
    assert sorted(worker0.files) == sorted(worker1.files)
    assert int(worker0["iterations"]) == int(worker1["iterations"]) == 3
    for name in worker0.files:
        np.testing.assert_allclose(worker0[name], worker1[name], atol=1e-6, rtol=0, err_msg=name)
    # The chief wrote the outputs; the backup was removed once the run finished.
    assert (tmp_path / "run" / training.ENCODER_FILE).exists()
    assert not (tmp_path / "run" / "backup").exists()


@pytest.mark.slow
def test_two_workers_with_global_batches_match_two_replicas_on_one_machine(tmp_path):
    # Same global batches, same 2 x 8 split: the same numbers as MirroredStrategy on 2
    # logical CPUs (itself equal to one device within 1e-5 in tiny.py on random
    # images; on MNIST, SyncBN's one-pass variance, E[x^2] - E[x]^2 over a mostly constant
    # background, makes the first layer differ by ~1e-3 between 1 and 2 replicas).
    args = ("--epochs", 1, "--steps-per-epoch", 3, "--every", 0)
    worker0, worker1 = run_workers(tmp_path, *args, "--sharding", "global_batch")
    mirrored = run_one_machine(tmp_path, *args, "--strategy", "mirrored", "--cpus", 2)
    for name in mirrored.files:
        np.testing.assert_allclose(worker0[name], worker1[name], atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_allclose(worker0[name], mirrored[name], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse sse2 avx avx2 fma", False),  # AVX2 only: bfloat16 would be emulated
        ("fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),
        ("fpu avx2 avx512f amx_bf16 amx_tile amx_int8", True),
        ("fpu avx2 avx512f avx512_vnni", False),
    ],
)
def test_bfloat16_units_are_read_from_the_cpu_flags(flags, expected):
    cpuinfo = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    parsed = distribute.cpu_flags(cpuinfo)
    assert parsed == frozenset(flags.split())
    assert distribute.cpu_has_bfloat16_units(parsed, environ={}) is expected
    assert distribute.cpu_flags("no flags here") == frozenset()


def test_bfloat16_units_are_off_when_onednn_is_capped_below_them_or_the_variable_says_0():
    bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert distribute.cpu_has_bfloat16_units(bf16, environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert not distribute.cpu_has_bfloat16_units(bf16, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert not distribute.cpu_has_bfloat16_units(bf16, environ={"DNNL_MAX_CPU_ISA": "avx512_core_vnni"})
    assert not distribute.cpu_has_bfloat16_units(bf16, environ={"BYOL_TF_CPU_BFLOAT16": "0"})
    assert distribute.cpu_has_bfloat16_units(bf16, environ={"BYOL_TF_CPU_BFLOAT16": "1"})
