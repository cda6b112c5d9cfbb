"""Helpers shared by every benchmark: JSON-line records, interleaved timing, machine facts.

Standard library only: `peer_lightly.py` imports this module in the PyTorch venv, where
TensorFlow is not installed.

A record is one JSON object on one line:
    {"benchmark": ..., "config": {...}, "value": ..., "unit": ..., "median_s": ..., "n": ...,
     ...extra fields..., "load_avg_1m": ..., "time": ...}
`value` is the headline figure in `unit`; `median_s` is the median wall time of the timed
thing (a step, a batch) over `n` timed repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Mapping


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's answer elsewhere)."""
    value = _proc_field("/proc/cpuinfo", "model name")
    return value or platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The instruction sets that decide which kernels oneDNN and PyTorch run (RESULTS.md names
# them for every CPU figure): vector width, VNNI, bfloat16 and AMX units.
KERNEL_ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            return stream.read()
    except OSError:
        return ""


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The `key: value` fields of the first processor block of a /proc/cpuinfo text."""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def instruction_sets(cpuinfo: str | None = None) -> list[str]:
    """Which of `KERNEL_ISA_FLAGS` the CPU has, in that order (`lscpu`'s flag names)."""
    flags = set(_first_processor(_cpuinfo() if cpuinfo is None else cpuinfo).get("flags", "").split())
    return [flag for flag in KERNEL_ISA_FLAGS if flag in flags]


def threads_per_core(cpuinfo: str | None = None) -> int | None:
    """Hardware threads per physical core (2 where two "cores" are one core's SMT siblings,
    which share its vector units); None where /proc/cpuinfo does not say."""
    fields = _first_processor(_cpuinfo() if cpuinfo is None else cpuinfo)
    try:
        return max(1, int(fields["siblings"]) // int(fields["cpu cores"]))
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def machine() -> dict:
    """Facts about the machine a result came from, for RESULTS.md."""
    cpuinfo = _cpuinfo()
    return {
        "cpu": cpu_model(),
        "instruction_sets": instruction_sets(cpuinfo),
        "threads_per_core": threads_per_core(cpuinfo),
        "nproc": usable_cores(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "gpus": gpus(),
    }


def gpus() -> list[str]:
    """NVIDIA GPUs as `nvidia-smi` names them (name, driver, memory); [] where there is none."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in answer.stdout.splitlines() if line.strip()]


def _memory_gib() -> float | None:
    value = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    return round(int(value.split()[0]) / 2**20, 1) if value else None


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first `name: value` line of a /proc file; None where there is none."""
    try:
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def load_average() -> float:
    """1-minute load average: a busy machine makes every timing here unreliable."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def median(values) -> float:
    return float(statistics.median(values))


def record(
    benchmark: str,
    config: Mapping,
    value: float,
    unit: str,
    median_s: float | None,
    n: int,
    out: str | None = None,
    **extra,
) -> dict:
    """Prints one JSON line (and appends it to `out` when given); returns the record."""
    line = {
        "benchmark": benchmark,
        "config": dict(config),
        "value": _round(value),
        "unit": unit,
        "median_s": _round(median_s),
        "n": int(n),
        **{key: _round(item) for key, item in extra.items()},
        "command": command_line(),
        "load_avg_1m": load_average(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(line, sort_keys=False)
    print(text, flush=True)
    if out:
        directory = os.path.dirname(out)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(out, "a", encoding="utf-8") as stream:
            stream.write(text + "\n")
    return line


def command_line() -> str:
    """How this process was started, as `python -m module args` (what RESULTS.md quotes)."""
    import __main__
    import shlex
    import sys

    spec = getattr(__main__, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([program, shlex.join(sys.argv[1:])]).strip()


def _round(value):
    # Six significant digits are far more than the timing noise allows; they keep lines short.
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _round(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(item) for item in value]
    return value


def interleaved(
    functions: Mapping[str, Callable[[], object]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Times each function `reps` times, alternating A B C A B C ..., after `warmup` rounds.

    Alternating (rather than all A, then all B) spreads slow drifts of the machine (other
    jobs, thermal limits, frequency changes) evenly over the candidates, so their ratio stays
    fair even when absolute times wander. Each function must block until its work is done.

    Returns:
        {name: [seconds of each timed call]}.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


# Head widths (projector hidden, projection, predictor hidden) of a seconds-long --smoke run.
SMOKE_HEADS = (32, 16, 32)


def smoke_sizes(args):
    """--smoke: at most 8 images of at most 16 px, 2 timed repetitions after 1 warm-up."""
    args.batch, args.size, args.reps, args.warmup = min(args.batch, 8), min(args.size, 16), 2, 1


def add_common_arguments(parser: argparse.ArgumentParser, reps: int | None = 10, warmup: int = 3):
    """--reps (unless None), --warmup, --out and --smoke, the same in every benchmark script."""
    if reps is not None:
        parser.add_argument("--reps", type=int, default=reps, help=f"timed repetitions (default {reps})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up rounds (default {warmup})")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny, seconds-long run that only checks the script works"
    )


def add_peer_arguments(parser: argparse.ArgumentParser, encoders, heads_help: str):
    """The BYOL setting both sides of the PyTorch comparison take (`peer.py` forwards them)."""
    parser.add_argument("--encoder", default="resnet18_cifar", choices=encoders)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument(
        "--heads", type=int, nargs=3, default=None, metavar=("PROJ_HIDDEN", "PROJ_DIM", "PRED_HIDDEN"),
        help=f"head widths (default: {heads_help})",
    )
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")


def quiet_tensorflow():
    """Environment for TensorFlow benchmark processes; call before importing TensorFlow.

    Keras 3 (importing TFX elsewhere may set TF_USE_LEGACY_KERAS=1 for child processes), and
    no C++ INFO/WARNING spam on the JSON-line stdout.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------- worker protocol
# The peer comparison runs byol-tf and the PyTorch peer as two persistent processes (two
# venvs), driven in turn by `benchmarks.peer`. A worker builds its model, warms up, prints
# a READY line, then for each "RUN k" line on stdin times k steps and prints their seconds.
# Lines meant for the driver start with PROTOCOL_PREFIX, so library chatter on stdout is
# ignored.

PROTOCOL_PREFIX = "@@bench "


def send(kind: str, payload) -> None:
    print(PROTOCOL_PREFIX + json.dumps({"kind": kind, "payload": payload}), flush=True)


def serve(step: Callable[[], object], info: Mapping, warmup: int) -> None:
    """Runs the worker side of the protocol until stdin says QUIT (or closes)."""
    import sys

    flush_native = _native_stdout_flush() if os.environ.get("ONEDNN_VERBOSE") else (lambda: None)
    for _ in range(warmup):
        step()
    flush_native()  # the warm-up's oneDNN verbose lines go out before READY, not with step 1
    send("ready", dict(info))
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "QUIT":
            break
        if command[0] != "RUN":
            send("error", f"unknown command {line.strip()!r}")
            continue
        times = []
        for _ in range(int(command[1])):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        flush_native()
        send("times", times)


def _native_stdout_flush() -> Callable[[], None]:
    """Flushes C stdio's buffers, where native libraries (oneDNN's verbose mode) print: on a
    pipe they are block-buffered, and their lines would reach the driver steps late."""
    import ctypes

    libc = ctypes.CDLL(None)
    return lambda: libc.fflush(None)


def versions(packages) -> dict:
    """{package: installed version} of those installed."""
    from importlib import metadata

    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def main(argv=None):
    """`python -m benchmarks.common --out FILE`: one `machine` record opening a results file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.common", description=main.__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default="", help="free text kept in the record (e.g. 'preliminary')")
    args = parser.parse_args(argv)
    record(
        "machine", machine(), usable_cores(), "cores", None, 1, args.out,
        versions=versions(("tensorflow", "keras", "keras-cv", "numpy", "torch", "torchvision", "lightly")),
        load_avg=list(os.getloadavg()),
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        note=args.note,
    )


if __name__ == "__main__":
    main()
