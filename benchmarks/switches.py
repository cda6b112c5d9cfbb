"""Switches that may speed up BYOL training, each measured on this machine.

    python -m benchmarks.switches --switch all --encoder small_convnet --batch 128 --size 28
    python -m benchmarks.switches --switch jit --encoder resnet18_cifar --batch 128 --size 32

One JSON line `switch` per setting: images/s of `fit`'s train step (or of the input
pipeline for `tfdata`), and `speedup` against the library's current default setting.

In-process switches build one model per setting and alternate their steps (A B A B ...):
- `jit`: `jit_compile` off / on (one device).
- `precision`: float32 / mixed_bfloat16 (Keras dtype policy; CPUs with AVX512-BF16 or AMX
  may gain, others lose).
- `fused_bn`: BatchNorm by TensorFlow's fused kernel (`networks.FusedBatchNormalization`,
  the library's layer) / Keras' own ops (`keras.layers.BatchNormalization`).
- `sync_bn`: `network.sync_batchnorm` true / false on ONE device. Keras' synchronized BN
  takes a slower path (sums, an all-reduce and a full-size `ones_like` count per layer)
  whenever a replica context exists, which includes the default strategy.
Fresh-process switches (environment variables read when TensorFlow starts), alternating
`python -m benchmarks.step --no-parts` processes:
- `onednn`: TF_ENABLE_ONEDNN_OPTS=1 / 0.
- `interop`: TF_NUM_INTEROP_THREADS unset (= cores) / 1: whether running independent graph
  branches (the two views, online and target) concurrently helps or oversubscribes.
Input pipeline switch (pipeline alone, fresh iterators, settings alternating per block):
- `tfdata`: num_parallel_calls AUTOTUNE / 1 / `nproc`, deterministic order on / off, a private
  thread pool of `nproc` threads.

A setting that fails (e.g. bfloat16 on a machine without it) is reported with its error, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from unittest import mock

from benchmarks import common

common.quiet_tensorflow()

import keras  # noqa: E402  (after the environment is set)
import tensorflow as tf  # noqa: E402

from benchmarks import input_pipeline, presets, tfmodel  # noqa: E402
from byol_tf import networks  # noqa: E402

IN_PROCESS = ("jit", "precision", "fused_bn", "sync_bn")
SWITCHES = (*IN_PROCESS, "onednn", "interop", "tfdata")


# ------------------------------------------------------------------ in-process switches


def settings(switch: str, config) -> dict:
    """{setting name: (config overrides, build kwargs)}; the first setting is the default."""
    if switch == "jit":
        current = tfmodel.jit_setting(config, "config")  # 'auto' resolved for this machine
        return _current_first(current, ("off", "on"), lambda name, on: ((), {"jit_compile": on}))
    if switch == "precision":
        return {"float32": ((), {"precision": "float32"}), "mixed_bfloat16": ((), {"precision": "mixed_bfloat16"})}
    if switch == "fused_bn":
        return {"fused": ((), {}), "keras": ((), {"batch_norm": keras.layers.BatchNormalization})}
    if switch == "sync_bn":
        current = tfmodel.sync_batchnorm(config)  # what training builds here
        return _current_first(current, ("false", "true"), lambda name, on: ((f"network.sync_batchnorm={name}",), {}))
    raise ValueError(f"--switch: {switch!r} is not an in-process switch")


def _current_first(current: bool, names: tuple[str, str], setting) -> dict:
    """A boolean switch's two settings, the library's current one first (the speedups' baseline).

    `names` are the (False, True) settings' names; `setting(name, value)` gives one's entry.
    """
    return {names[value]: setting(names[value], value) for value in (current, not current)}


def in_process(switch: str, args, base_overrides) -> list[dict]:
    base = presets.load_config(args.encoder, args.batch, args.size, base_overrides)
    steps, errors, jit_of = {}, {}, {}
    for name, (overrides, options) in settings(switch, base).items():
        config = presets.load_config(args.encoder, args.batch, args.size, [*base_overrides, *overrides])
        jit_compile = options.get("jit_compile", tfmodel.jit_setting(config, args.jit))
        jit_of[name] = jit_compile
        keras.utils.set_random_seed(0)
        try:
            # `networks._batch_norm` looks its class up when called: the Keras layer for "keras".
            with mock.patch.object(networks, "FusedBatchNormalization", options.get("batch_norm", networks.FusedBatchNormalization)):
                model = tfmodel.build(config, jit_compile, options.get("precision"), one_replica_rule=switch != "sync_bn")
            batch = tfmodel.synthetic_batch(args.batch, args.size, tfmodel.num_classes(config))
            step = tfmodel.train_step_function(model, tf.data.Dataset.from_tensors(batch).repeat())
            step()  # traces / compiles; a setting the machine cannot run fails here
            steps[name] = step
        except Exception as error:  # noqa: BLE001  (any failure is a result to report)
            errors[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    times = common.interleaved(steps, args.reps, args.warmup) if steps else {}
    return report(switch, args, times, errors, extra_config=lambda name: {"jit_compile": jit_of[name]})


def report(switch, args, times: dict, errors: dict, default: str | None = None, extra_config=None) -> list[dict]:
    """One `switch` record per setting, with its speedup over the default (first) setting."""
    names = list(times) + [name for name in errors if name not in times]
    default = default or names[0]
    default_median = common.median(times[default]) if default in times else None
    records = []
    for name in names:
        config = {
            "switch": switch, "setting": name, "default": default, "encoder": args.encoder,
            "batch": args.batch, "size": args.size, "smoke": args.smoke,
            **(extra_config(name) if extra_config else {}),
        }
        if name in errors:
            records.append(common.record("switch", config, None, "images/s", None, 0, args.out, error=errors[name]))
            continue
        median = common.median(times[name])
        records.append(
            common.record(
                "switch", config, args.batch / median, "images/s", median, len(times[name]), args.out,
                speedup=(default_median / median) if default_median else None,
                times_s=times[name],
            )
        )
    return records


# ------------------------------------------------------------------ fresh-process switch


# Fresh-process switches: environment variables TensorFlow reads when it starts.
# {switch: [(setting, value or None to unset), ...]}; the first setting is the default.
ENVIRONMENT_SWITCHES = {
    "onednn": ("TF_ENABLE_ONEDNN_OPTS", [("on", "1"), ("off", "0")]),
    # Inter-op threads run independent graph branches (the two views, online and target)
    # at once, each branch's kernels also using the intra-op pool: on few cores that can
    # oversubscribe them.
    "interop": ("TF_NUM_INTEROP_THREADS", [("default", None), ("1", "1")]),
}


def environment_switch(switch, args, base_overrides) -> list[dict]:
    """Settings of an environment variable: alternating step.py processes (A B A B)."""
    variable, choices = ENVIRONMENT_SWITCHES[switch]
    times, errors = {name: [] for name, _ in choices}, {}
    for _ in range(args.processes):
        for name, value in choices:
            command = [
                sys.executable, "-m", "benchmarks.step", "--no-parts", "--encoder", args.encoder,
                "--batch", str(args.batch), "--size", str(args.size), "--jit", args.jit,
                "--reps", str(args.reps), "--warmup", str(args.warmup),
            ]
            for override in base_overrides:
                command += ["--set", override]
            env = {key: item for key, item in os.environ.items() if key != variable}
            if value is not None:
                env[variable] = value
            result = subprocess.run(command, cwd=presets.ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode != 0 or not lines:
                errors[name] = f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1][:300] if result.stderr.strip() else ''}"
                continue
            times[name] += json.loads(lines[-1])["step_times_s"]
    times = {name: values for name, values in times.items() if values}
    return report(switch, args, times, errors, default=choices[0][0],
                  extra_config=lambda name: {"environment": variable})


# ------------------------------------------------------------------ tf.data switch


def tfdata(args, base_overrides) -> list[dict]:
    """Pipeline-alone throughput under tf.data settings, blocks alternating per setting."""
    config = presets.load_config(args.encoder, args.batch, args.size, base_overrides)

    def options(deterministic=None, private_threads=None):
        value = tf.data.Options()
        if deterministic is not None:
            value.deterministic = deterministic
        if private_threads:
            value.threading.private_threadpool_size = private_threads
        return value

    cores = common.usable_cores()
    variants = {
        "autotune": dict(parallel=-1),
        "parallel_1": dict(parallel=1),
        f"parallel_{cores}": dict(parallel=cores),
        "autotune_nondeterministic": dict(parallel=-1, options=options(deterministic=False)),
        f"autotune_private_pool_{cores}": dict(parallel=-1, options=options(private_threads=cores)),
    }
    source = "mnist5k" if config.data.source == "mnist5k" else "synthetic"
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():

            def make(variant=variant):
                return input_pipeline.make_dataset(
                    config, source, args.size, args.count, variant["parallel"], variant.get("options")
                )

            # At least 5 warm-up batches: they drain the prefetch buffer (see input_pipeline).
            warmup = args.warmup if args.smoke else max(args.warmup, 5)
            times[name] += input_pipeline.pipeline_throughput(make, 1, args.batches, warmup)["batch_times_s"]
    return report("tfdata", args, times, {}, default="autotune", extra_config=lambda name: {"source": source})


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.switches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", action="append", choices=(*SWITCHES, "all"), default=None,
                        help="repeatable; default all")
    parser.add_argument("--encoder", default="small_convnet", choices=("small_convnet", "resnet18_cifar"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    presets.add_config_arguments(parser, jit_help="jit_compile for the switches other than jit (default: the preset's)")
    parser.add_argument("--processes", type=int, default=2, help="onednn / interop: processes per setting")
    parser.add_argument("--rounds", type=int, default=3, help="tfdata: blocks per setting")
    parser.add_argument("--batches", type=int, default=20, help="tfdata: timed batches per block")
    parser.add_argument("--count", type=int, default=2048, help="tfdata: synthetic images in memory")
    common.add_common_arguments(parser)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    chosen = args.switch or ["all"]
    chosen = list(SWITCHES) if "all" in chosen else chosen
    if args.smoke:
        common.smoke_sizes(args)
        args.processes, args.rounds, args.batches, args.count = 1, 1, 2, 64
    overrides = presets.config_overrides(args)
    for switch in chosen:
        if switch in IN_PROCESS:
            in_process(switch, args, overrides)
        elif switch in ENVIRONMENT_SWITCHES:
            environment_switch(switch, args, overrides)
        else:
            tfdata(args, overrides)


if __name__ == "__main__":
    main()
