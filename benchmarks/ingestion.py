"""Ingestion speed and memory: the Beam ImageExampleGen versus the single-process one it replaced.

    python -m benchmarks.ingestion --images 10000 --memory-images 10000 50000 --reps 2 \\
        --baseline-commit a6913cb --out benchmarks/results/ingestion.jsonl

1. Writes (once, then reuses) a folder of N seeded JPEGs of mixed sizes (sides 200-600 px,
   10 class folders, smooth colours plus noise: photo-like file sizes) under --data-root.
2. Times ingestion of the folder in fresh processes, the settings alternated round by
   round (A B C A B C ...) so that the machine's drift is shared:
   `beam_1` (DirectRunner in memory, the local runner's default), `beam_2`
   (`--direct_running_mode=multi_processing --direct_num_workers=2`) and, with
   --baseline-commit, `baseline` (that commit's `ingestion.ingest`, one Python process,
   resizing to --baseline-image-size and re-encoding PNG; its files from `git archive`).
   One `ingestion` record per setting: images/s (median over the rounds, the time the
   ingestion itself took inside its process), the process's wall time and the peak
   resident memory of its whole process tree; then `ingestion_ratio` records: each
   setting's images/s over the baseline's, the median of the per-round ratios.
3. With --memory-images, runs `beam_2` on folders of those sizes: one `ingestion_memory`
   record each (peak resident memory of the process tree; it must not grow with N).

The 1-minute load average goes into every record: compare ratios, not absolute figures, on
a busy machine. `--smoke`: 24 small images, `beam_1` only, one round: checks the script.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10
SIDES = (200, 600)
JPEG_QUALITY = 90
SETTINGS = {
    "beam_1": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
    "beam_2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}
BASELINE = "baseline"

# The replaced ingestion, run in a process that imports that commit's byol_tf / byol_tfx.
_BASELINE_CHILD = """
import json, os, sys, time
os.environ["TF_USE_LEGACY_KERAS"] = "0"
from byol_tf import config as config_lib
from byol_tfx.components import ingestion
folder, out, holdout, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = config_lib.from_dict({"data": {"source": "folder", "path": folder, "holdout_examples": holdout},
                               "augment": {"image_size": size}})
os.makedirs(os.path.join(out, "report"), exist_ok=True)
start = time.perf_counter()
ingestion.ingest(config, os.path.join(out, "examples"), os.path.join(out, "report", "report.json"), max_bad_fraction=1.0)
print("@@result " + json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


# ------------------------------------------------------------------------ the images


def write_folder(root: str, count: int, sides=SIDES, seed: int = 0) -> str:
    """A folder of `count` JPEGs in CLASSES class folders; reused when it is already complete."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(root, f"jpegs-{count}-{sides[0]}-{sides[1]}-seed{seed}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    rng = np.random.default_rng(seed)
    started = last = time.monotonic()
    for index in range(count):
        height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
        colour = rng.uniform(60, 255, 3)
        image = np.stack([rows, cols, (rows + cols) / 2], axis=-1) * colour
        image = np.clip(image + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"class_{index % CLASSES}", f"{index:07d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        with open(path, "wb") as stream:
            stream.write(buffer.getvalue())
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"writing {folder}: {index + 1} of {count} ({last - started:.0f} s)", file=sys.stderr, flush=True)
    open(done, "w").close()
    return folder


# --------------------------------------------------------------------- one ingestion


def ingest_here(folder: str, out: str, holdout: int, beam_args: list[str]) -> float:
    """Runs ImageExampleGen's executor in this process; returns its seconds."""
    common.quiet_tensorflow()
    from tfx.dsl.components.base import base_beam_executor
    from tfx.types import standard_artifacts

    from byol_tf import config as config_lib
    from byol_tfx.components import example_gen

    examples = standard_artifacts.Examples()
    examples.uri = os.path.join(out, "examples")
    report = example_gen.IngestionReport()
    report.uri = os.path.join(out, "report")
    os.makedirs(report.uri, exist_ok=True)
    data = {"source": "folder", "path": folder, "holdout_examples": holdout, "max_bad_fraction": 1.0,
            "check_cache_dir": os.path.join(out, "cache")}
    config = config_lib.to_json(config_lib.from_dict({"data": data}), example_gen.CONFIG_SECTIONS)
    context = base_beam_executor.BaseBeamExecutor.Context(
        beam_pipeline_args=beam_args, tmp_dir=os.path.join(out, "tmp"), unique_id="1"
    )
    start = time.perf_counter()
    example_gen.Executor(context).Do({}, {"examples": [examples], "report": [report]}, {"config": config})
    return time.perf_counter() - start


def _tree_rss(process) -> int:
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(command: list[str], cwd: str, env: dict) -> dict:
    """Runs one ingestion process; returns its seconds, wall time and peak tree RSS (MiB)."""
    import psutil

    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(child.pid)
    peak = [0]

    def sample():
        while child.poll() is None:
            try:
                peak[0] = max(peak[0], _tree_rss(watched))
            except psutil.Error:  # the process ended between poll() and the reading
                break
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({child.returncode}):\n{stderr[-3000:]}")
    result = next(json.loads(line[len("@@result "):]) for line in stdout.splitlines() if line.startswith("@@result "))
    return {
        "seconds": result["seconds"],
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": peak[0] / 2**20,
        "load_1m": common.load_average(),  # at the end of this run: how busy the machine was
    }


def new_command(setting: str, folder: str, out: str, holdout: int) -> tuple[list[str], str, dict]:
    command = [sys.executable, "-m", "benchmarks.ingestion", "--child", folder, out, str(holdout), *SETTINGS[setting]]
    return command, ROOT, dict(os.environ)


def baseline_shim(commit: str, scratch: str) -> str:
    """A folder whose byol_tf / byol_tfx packages are `commit`'s.

    The commit's files are exported with `git archive` (read-only: no worktree is
    registered), then laid out as the installed packages are.
    """
    tree = os.path.join(scratch, f"tree-{commit}")
    if not os.path.isdir(tree):
        os.makedirs(tree)
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", commit, "byol_tf", "components", "pipeline"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    shim = os.path.join(scratch, f"shim-{commit}")
    os.makedirs(os.path.join(shim, "byol_tfx"), exist_ok=True)
    open(os.path.join(shim, "byol_tfx", "__init__.py"), "a").close()
    for link, target in (("byol_tf", "byol_tf"), ("byol_tfx/components", "components"), ("byol_tfx/pipeline", "pipeline")):
        path = os.path.join(shim, link)
        if not os.path.islink(path):
            os.symlink(os.path.join(tree, target), path)
    return shim


def baseline_command(shim: str, folder: str, out: str, holdout: int, size: int) -> tuple[list[str], str, dict]:
    # Run from the shim folder: its packages come first on sys.path, before this checkout's.
    env = dict(os.environ, PYTHONPATH=shim, TF_CPP_MIN_LOG_LEVEL="2")
    return [sys.executable, "-c", _BASELINE_CHILD, folder, out, str(holdout), str(size)], shim, env


# ---------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingestion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images of the timed folder")
    parser.add_argument("--memory-images", type=int, nargs="*", default=[], help="folder sizes of the memory runs")
    parser.add_argument("--settings", nargs="*", default=sorted(SETTINGS), choices=sorted(SETTINGS))
    parser.add_argument("--baseline-commit", default="", help="the commit of the ingestion to compare with")
    parser.add_argument("--baseline-image-size", type=int, default=224, help="the size the baseline resizes to")
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "byol-tf-bench-ingestion"))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    common.add_common_arguments(parser, reps=2, warmup=0)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.child:
        folder, out, holdout, *beam_args = args.child
        seconds = ingest_here(folder, out, int(holdout), beam_args)
        print("@@result " + json.dumps({"seconds": seconds}), flush=True)
        return
    sides = SIDES
    if args.smoke:
        args.images, args.memory_images, args.reps, args.settings, sides = 24, [], 1, ["beam_1"], (16, 40)
    folder = write_folder(args.data_root, args.images, sides)
    holdout = max(1, args.images // 10)
    scratch = tempfile.mkdtemp(prefix="byol-tf-bench-ingestion-")
    try:
        commands = {}
        for setting in args.settings:
            commands[setting] = lambda out, s=setting: new_command(s, folder, out, holdout)
        if args.baseline_commit:
            shim = baseline_shim(args.baseline_commit, scratch)
            commands[BASELINE] = lambda out: baseline_command(shim, folder, out, holdout, args.baseline_image_size)
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for round_index in range(args.reps):
            for name, make in commands.items():
                out = os.path.join(scratch, f"{name}-{round_index}")
                runs[name].append(run_child(*make(out)))
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {round_index + 1} of {args.reps}, {name}: {args.images / runs[name][-1]['seconds']:.1f} "
                      f"images/s, load {common.load_average()}", file=sys.stderr, flush=True)
        rates = {}
        for name, results in runs.items():
            rates[name] = [args.images / result["seconds"] for result in results]
            description = {"setting": name, "images": args.images, "sides": list(sides), "smoke": args.smoke}
            if name == BASELINE:
                description.update(commit=args.baseline_commit, image_size=args.baseline_image_size)
            common.record(
                "ingestion", description, common.median(rates[name]), "images/s",
                common.median([r["seconds"] for r in results]), len(results), args.out,
                wall_s=common.median([r["wall_s"] for r in results]),
                peak_rss_mib=max(r["peak_rss_mib"] for r in results),
                times_s=[r["seconds"] for r in results],
                loads_1m=[r["load_1m"] for r in results],
            )
        if BASELINE in rates:
            for name in args.settings:
                ratios = [ours / theirs for ours, theirs in zip(rates[name], rates[BASELINE])]
                common.record(
                    "ingestion_ratio", {"setting": name, "versus": args.baseline_commit, "images": args.images},
                    common.median(ratios), "x", None, len(ratios), args.out, ratios=ratios,
                )
        for count in args.memory_images:
            memory_folder = write_folder(args.data_root, count, sides)
            out = os.path.join(scratch, f"memory-{count}")
            result = run_child(*new_command("beam_2", memory_folder, out, max(1, count // 10)))
            shutil.rmtree(out, ignore_errors=True)
            common.record(
                "ingestion_memory", {"setting": "beam_2", "images": count, "sides": list(sides)},
                result["peak_rss_mib"], "MiB", result["seconds"], 1, args.out,
                images_per_s=count / result["seconds"], wall_s=result["wall_s"], loads_1m=[result["load_1m"]],
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
