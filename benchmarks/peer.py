"""byol-tf versus the PyTorch peer (lightly), measured alternately in one run.

    python -m benchmarks.peer --encoder resnet18_cifar --batch 128 --size 32
    python -m benchmarks.peer --encoder resnet18_cifar --batch 128 --size 32 --jit config off

Persistent worker processes, one per venv: byol-tf (this venv; `fit`'s compiled train step,
as `benchmarks.step` times it; one worker per `--jit` value) and lightly
(benchmarks/.venv-torch, see `benchmarks.peer_lightly`). Each builds its model and warms up
while the others are idle; then the driver asks them in turn for one step each (byol-tf,
lightly, byol-tf, ...), with a short pause between turns so no worker's threads still spin
while the next runs. Idle workers block on their stdin, so they never compete for the cores.

Both get the same backbone (ResNet-18 with the CIFAR stem), heads, batch, image size,
in-memory views and a LARS optimizer excluding biases and BN parameters. byol-tf keeps its
online linear probe and metrics, which lightly's step does not have (byol-tf is charged for
them). Prints one JSON line `versus_peer` per byol-tf worker: value = byol-tf images/s /
lightly images/s (target >= 1.3), with both medians.

`--kernels` profiles the same steps op by op instead: both workers run with oneDNN's
verbose mode (`ONEDNN_VERBOSE=1`; TensorFlow's convolutions, BatchNorm and matmuls and
PyTorch's convolutions run in oneDNN, its BatchNorm in ATen, outside this table), every timed
step's primitives are collected, and
one JSON line `peer_kernels` per byol-tf worker gives milliseconds per step for each
(primitive, propagation, problem shape) on both sides, largest first (a table of them goes to
stderr). Verbose mode times each primitive, so steps run slower than without it: compare
kernels, not step times. TensorFlow runs independent branches at once (inter-op threads), which
lengthens each overlapping kernel's wall time; `TF_NUM_INTEROP_THREADS=1` gives per-kernel
times free of that overlap. Where the CPU lacks an instruction set, or to emulate one that
lacks it: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common, presets

TORCH_PYTHON = os.path.join(presets.ROOT, "benchmarks", ".venv-torch", "bin", "python")
TARGET_SPEEDUP = 1.3
KERNEL_ROWS = 40  # rows of the per-shape kernel comparison kept in a `peer_kernels` record


class Worker:
    """One benchmark worker process speaking `common.serve`'s line protocol."""

    def __init__(self, name: str, command: list[str], env: dict | None = None):
        self.name = name
        self.process = subprocess.Popen(
            command,
            cwd=presets.ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherit: library warnings reach the console, not the protocol
            text=True,
            env=env,
        )

    def receive(self, kind: str, collect: list | None = None):
        """The payload of the next `kind` message; other output lines go to `collect` if given."""
        for line in self.process.stdout:
            if not line.startswith(common.PROTOCOL_PREFIX):
                if collect is not None:
                    collect.append(line)
                continue
            message = json.loads(line[len(common.PROTOCOL_PREFIX):])
            if message["kind"] == "error":
                raise RuntimeError(f"{self.name} worker: {message['payload']}")
            if message["kind"] == kind:
                return message["payload"]
        code = self.process.wait()
        raise RuntimeError(f"{self.name} worker exited with code {code} before sending {kind!r}")

    def run(self, steps: int, collect: list | None = None) -> list[float]:
        self.process.stdin.write(f"RUN {steps}\n")
        self.process.stdin.flush()
        return self.receive("times", collect)

    def close(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.write("QUIT\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()


def tf_worker(args):
    """The byol-tf side: `fit`'s train function on in-memory views, served to the driver."""
    common.quiet_tensorflow()
    import tensorflow as tf

    from benchmarks import tfmodel

    overrides = [*args.set, *(presets.head_overrides(args.heads) if args.heads else ())]
    if args.optimizer != "lars":
        overrides.append(f"optimizer.name={args.optimizer}")
    config = presets.load_config(args.encoder, args.batch, args.size, overrides)
    jit_compile = tfmodel.jit_setting(config, args.jit)
    model = tfmodel.build(config, jit_compile)
    batch = tfmodel.synthetic_batch(args.batch, args.size, tfmodel.num_classes(config))
    step = tfmodel.train_step_function(model, tf.data.Dataset.from_tensors(batch).repeat())
    info = {
        "library": "byol-tf",
        "tensorflow": tf.__version__,
        "jit_compile": jit_compile,
        "heads": [config.network.projector_hidden_dim, config.network.projection_dim,
                  config.network.predictor_hidden_dim],
        "online_probe": config.train.online_probe,
        "sync_batchnorm": tfmodel.sync_batchnorm(config),
        "optimizer": config.optimizer.name,
    }
    common.serve(step, info, args.warmup)


def drive(args) -> list[dict]:
    if not os.path.exists(args.torch_python):
        raise SystemExit(
            f"no PyTorch venv at {args.torch_python}: run benchmarks/setup_torch_venv.sh first"
        )
    shared = ["--encoder", args.encoder, "--batch", str(args.batch), "--size", str(args.size),
              "--warmup", str(args.warmup), "--optimizer", args.optimizer]
    heads = ["--heads", *map(str, args.heads)] if args.heads else []
    # One byol-tf worker per distinct jit_compile value (e.g. the preset's and "off").
    config = presets.load_config(args.encoder, args.batch, args.size, args.set)
    # 'auto' as training resolves it, told here without TensorFlow: XLA where there is a GPU.
    settings = [presets.jit_setting(config, jit) for jit in args.jit]
    jit_values = list(dict.fromkeys(bool(common.gpus()) if s == "auto" else s for s in settings))
    commands = {}
    for jit_compile in jit_values:
        command = [sys.executable, "-m", "benchmarks.peer", "--worker-tf", "--jit", "on" if jit_compile else "off",
                   *shared, *heads]
        for override in args.set:
            command += ["--set", override]
        commands[f"byol-tf xla={'on' if jit_compile else 'off'}"] = command
    commands["lightly"] = [args.torch_python, "-m", "benchmarks.peer_lightly", "--serve",
                           "--threads", str(args.threads), *shared, *heads]
    env = {**os.environ, "ONEDNN_VERBOSE": "1"} if args.kernels else None
    workers, infos = [], {}
    try:
        # One at a time: each builds and warms up on an otherwise idle machine.
        for name, command in commands.items():
            workers.append(Worker(name, command, env))
            infos[name] = workers[-1].receive("ready")
        times = {worker.name: [] for worker in workers}
        output = {worker.name: [] for worker in workers}
        for _ in range(args.reps):
            for worker in workers:
                time.sleep(args.pause)
                times[worker.name] += worker.run(args.steps_per_turn, output[worker.name])
    finally:
        for worker in workers:
            worker.close()

    torch_info = infos.pop("lightly")
    torch_median = common.median(times["lightly"])
    if args.kernels:
        return kernel_records(args, infos, torch_info, times, output)
    records = []
    for name, tf_info in infos.items():
        tf_median = common.median(times[name])
        description = {
            "encoder": args.encoder,
            "batch": args.batch,
            "size": args.size,
            "heads": tf_info["heads"],
            "optimizer": args.optimizer,
            "jit_compile": tf_info["jit_compile"],
            "torch_threads": torch_info["torch_threads"],
            "overrides": list(args.set),
            "smoke": args.smoke,
        }
        records.append(common.record(
            "versus_peer",
            description,
            torch_median / tf_median,
            "x lightly",
            tf_median,
            len(times[name]),
            args.out,
            byol_tf_images_per_s=args.batch / tf_median,
            lightly_images_per_s=args.batch / torch_median,
            lightly_median_s=torch_median,
            byol_tf_times_s=times[name],
            lightly_times_s=times["lightly"],
            byol_tf=tf_info,
            lightly=torch_info,
            environment=kernel_environment(),
            machine=common.machine(),
            target=TARGET_SPEEDUP,
        ))
    return records


# ------------------------------------------------------------------ --kernels


def kernel_environment() -> dict:
    """The variables that cap or reshape both sides' kernels, as set for this run: records
    from an emulated instruction set must say so."""
    names = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS")
    return {name: os.environ[name] for name in names if name in os.environ}


def onednn_kernels(lines) -> dict[tuple[str, str, str], list]:
    """{(primitive, propagation, problem): [calls, milliseconds]} summed over oneDNN verbose
    `primitive,exec` lines (`ONEDNN_VERBOSE=1`); other lines are ignored.

    A line reads `onednn_verbose[,timestamp],v1,primitive,exec,ENGINE,PRIMITIVE,IMPLEMENTATION,
    PROPAGATION,MEMORY...,ATTRIBUTES,ALGORITHM,PROBLEM,MILLISECONDS`; the implementation is
    left out of the key, so both libraries' kernels for the same problem meet in one row.
    """
    table: dict[tuple[str, str, str], list] = {}
    for line in lines:
        if not line.startswith("onednn_verbose") or ",primitive,exec," not in line:
            continue
        fields = line.rstrip("\n").split(",")
        at = fields.index("exec", fields.index("primitive"))
        try:
            milliseconds = float(fields[-1])
        except ValueError:  # a line cut short when the process stopped
            continue
        key = (fields[at + 2], fields[at + 4], fields[-2])
        entry = table.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += milliseconds
    return table


def kernel_comparison(ours: dict, theirs: dict, steps: int) -> tuple[list[dict], list[dict]]:
    """(rows per problem, rows per primitive and propagation), milliseconds per step on each
    side, the most expensive (both sides together) first."""

    def rows(table_a, table_b, key_names):
        merged: dict[tuple, list] = {}
        for side, table in ((0, table_a), (1, table_b)):
            for key, (calls, milliseconds) in table.items():
                entry = merged.setdefault(key, [0, 0.0, 0, 0.0])
                entry[2 * side] += calls
                entry[2 * side + 1] += milliseconds
        ordered = sorted(merged.items(), key=lambda item: (-(item[1][1] + item[1][3]), item[0]))
        return [
            {**dict(zip(key_names, key)),
             "byol_tf_ms": milliseconds_a / steps, "lightly_ms": milliseconds_b / steps,
             "byol_tf_calls": calls_a / steps, "lightly_calls": calls_b / steps}
            for key, (calls_a, milliseconds_a, calls_b, milliseconds_b) in ordered
        ]

    def by_primitive(table):
        grouped: dict[tuple[str, str], list] = {}
        for (primitive, propagation, _), (calls, milliseconds) in table.items():
            entry = grouped.setdefault((primitive, propagation), [0, 0.0])
            entry[0] += calls
            entry[1] += milliseconds
        return grouped

    return (rows(ours, theirs, ("primitive", "propagation", "problem")),
            rows(by_primitive(ours), by_primitive(theirs), ("primitive", "propagation")))


def kernel_records(args, tf_infos: dict, torch_info: dict, times: dict, output: dict) -> list[dict]:
    """One `peer_kernels` record per byol-tf worker (and a readable table on stderr)."""
    steps = args.reps * args.steps_per_turn
    theirs = onednn_kernels(output["lightly"])
    if not theirs:
        raise RuntimeError("no oneDNN verbose lines from lightly: does this torch build use oneDNN?")
    records = []
    for name, tf_info in tf_infos.items():
        ours = onednn_kernels(output[name])
        if not ours:
            raise RuntimeError(f"no oneDNN verbose lines from {name}: is TF_ENABLE_ONEDNN_OPTS=0 set?")
        problems, primitives = kernel_comparison(ours, theirs, steps)
        ours_ms = sum(row["byol_tf_ms"] for row in primitives)
        theirs_ms = sum(row["lightly_ms"] for row in primitives)
        print(f"{name} vs lightly: oneDNN milliseconds per step (ONEDNN_VERBOSE), {steps} steps each",
              file=sys.stderr)
        print(f"{'primitive':22s} {'propagation':18s} {'byol-tf':>9s} {'lightly':>9s}", file=sys.stderr)
        for row in primitives:
            print(f"{row['primitive']:22s} {row['propagation']:18s} {row['byol_tf_ms']:9.1f} "
                  f"{row['lightly_ms']:9.1f}", file=sys.stderr)
        print(f"{'total':41s} {ours_ms:9.1f} {theirs_ms:9.1f}", file=sys.stderr)
        records.append(common.record(
            "peer_kernels",
            {"encoder": args.encoder, "batch": args.batch, "size": args.size, "heads": tf_info["heads"],
             "optimizer": args.optimizer, "jit_compile": tf_info["jit_compile"],
             "torch_threads": torch_info["torch_threads"], "overrides": list(args.set), "smoke": args.smoke},
            theirs_ms / ours_ms,
            "x lightly (oneDNN time per step)",
            common.median(times[name]),
            steps,
            args.out,
            byol_tf_onednn_ms=ours_ms,
            lightly_onednn_ms=theirs_ms,
            lightly_median_s=common.median(times["lightly"]),
            environment=kernel_environment(),
            machine=common.machine(),
            by_primitive=primitives,
            problems=problems[:KERNEL_ROWS],
        ))
    return records


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    common.add_peer_arguments(parser, ("resnet18_cifar", "small_convnet"), "the encoder's preset")
    parser.add_argument("--jit", choices=presets.JIT_CHOICES, nargs="+", default=["config"],
                        help="byol-tf jit_compile; several values start one byol-tf worker each (one lightly)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="byol-tf config override (repeatable)")
    parser.add_argument("--steps-per-turn", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds idle between turns")
    parser.add_argument("--torch-python", default=TORCH_PYTHON)
    parser.add_argument("--kernels", action="store_true",
                        help="profile oneDNN kernels per step on both sides instead of timing steps")
    parser.add_argument("--worker-tf", action="store_true", help=argparse.SUPPRESS)
    common.add_common_arguments(parser)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.smoke:
        common.smoke_sizes(args)
        args.pause, args.heads = 0.0, args.heads or list(common.SMOKE_HEADS)
    if args.worker_tf:
        (args.jit,) = args.jit
        tf_worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
