"""Regenerates the README's pictures under docs/ from a real run of the embedded demo.

    scripts/readme_pictures [--run RUN_DIR] [--skip-screenshot]

1. the run: `byol-tf train --config configs/mnist5k.yaml --run-dir RUN_DIR` (default
   runs/mnist5k; an existing finished run there is reused);
2. docs/view_pairs.png: the augmented view pairs the run logged (logs/views);
3. docs/training_curves.png: loss, collapse indicator, kNN and online-probe accuracy per
   epoch (logs/train);
4. docs/neighbours.png: `byol-tf embed` of both splits, then `byol-tf neighbours` of a few
   held-out digits among the training digits;
5. docs/projector.png: TensorBoard's projector tab (logs/embeddings) in headless Chromium
   (`apt-get install chromium`); TensorBoard listens on 127.0.0.1 only and is stopped after.

Every picture is a small PNG (a palette of at most 64 colours); charts are drawn with
Pillow, so nothing beyond the project's lock and Chromium is needed.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
CONFIG = os.path.join(ROOT, "configs", "mnist5k.yaml")
BIN = os.path.dirname(sys.executable)  # the venv's bin: byol-tf, tensorboard
PORT = 6006
QUERIES = 5  # held-out digits shown in the neighbours picture, one per row
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def step(message: str):
    print(f"readme_pictures: {message}", flush=True)


def save_small(image: Image.Image, path: str, colours: int = 64):
    """Saves a palette PNG (a few tens of KB for these pictures)."""
    image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    step(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KB)")


def run_byol_tf(*args: str):
    subprocess.run([os.path.join(BIN, "byol-tf"), *args], check=True, cwd=ROOT)


# ----------------------------------------------------------------------- event files


def read_events(folder: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, bytes]]:
    """Scalars (tag -> [(step, value)]) and the last PNG of each image tag in a log folder."""
    import tensorflow as tf

    scalars, images = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":
                    images[value.tag] = tensor[2]  # [width, height, png, ...]
                elif tensor.dtype != object and tensor.size == 1:
                    scalars.setdefault(value.tag, []).append((event.step, float(tensor)))
    return scalars, images


# ----------------------------------------------------------------------- pictures


def view_pairs(run_dir: str, path: str):
    """The logged grid (rows of view1 | view2) laid out as two rows: view 1 above view 2."""
    _, images = read_events(os.path.join(run_dir, "logs", "views"))
    grid = np.asarray(Image.open(io.BytesIO(images["view_pairs"])).convert("RGB"))
    side = grid.shape[1] // 2
    pairs = grid.reshape(-1, side, 2, side, 3)  # [N, S, 2, S, 3]
    wide = np.concatenate([np.concatenate(list(pairs[:, :, column]), axis=1) for column in (0, 1)], axis=0)
    image = Image.fromarray(wide).resize((wide.shape[1] * 3, wide.shape[0] * 3), Image.NEAREST)
    framed = Image.new("RGB", (image.width + 90, image.height + 8), "white")
    framed.paste(image, (86, 4))
    draw, font = ImageDraw.Draw(framed), ImageFont.load_default(size=14)
    draw.text((6, 4 + image.height // 4 - 8), "view 1", fill="black", font=font)
    draw.text((6, 4 + 3 * image.height // 4 - 8), "view 2", fill="black", font=font)
    save_small(framed, path)


def line_chart(title: str, series: dict[str, list[tuple[int, float]]], size=(360, 240), reference=None) -> Image.Image:
    """A small line chart of named (x, y) series, with min / max gridlines labelled."""
    width, height = size
    left, right, top, bottom = 52, 10, 40, 28  # the legend is a row under the title
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    points = [point for values in series.values() for point in values]
    ys = [y for _, y in points] + ([reference[1]] if reference else [])
    x_low, x_high = 0, max(x for x, _ in points)
    y_low, y_high = min(ys), max(ys)
    margin = 0.05 * (y_high - y_low or 1.0)
    y_low, y_high = y_low - margin, y_high + margin

    def to_pixel(x, y):
        return (
            left + (x - x_low) / (x_high - x_low or 1) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom),
        )

    draw.text((left, 4), title, fill="black", font=font)
    for fraction in (0.0, 0.5, 1.0):
        y = y_low + margin + fraction * (y_high - y_low - 2 * margin)
        _, py = to_pixel(0, y)
        draw.line((left, py, width - right, py), fill=(225, 225, 225))
        draw.text((4, py - 7), f"{y:.3g}", fill=(90, 90, 90), font=small)
    draw.rectangle((left, top, width - right, height - bottom), outline=(150, 150, 150))
    for x in np.linspace(x_low, x_high, 5):
        px, _ = to_pixel(x, y_low)
        draw.text((px - 6, height - bottom + 4), f"{x:.0f}", fill=(90, 90, 90), font=small)
    draw.text((width - right - 34, height - 13), "epoch", fill=(90, 90, 90), font=small)
    if reference:
        name, value = reference
        _, py = to_pixel(0, value)
        draw.line((left, py, width - right, py), fill=(160, 160, 160), width=1)
        draw.text((width - right - 4 - draw.textlength(name, font=small), py + 2), name, fill=(120, 120, 120), font=small)
    legend_x = left
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) <= 10 else ():
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.line((legend_x, 28, legend_x + 14, 28), fill=colour, width=2)
        draw.text((legend_x + 18, 21), name, fill=colour, font=small)
        legend_x += 18 + int(draw.textlength(name, font=small)) + 16
    return image


def training_curves(run_dir: str, path: str, projection_dim: int):
    scalars, _ = read_events(os.path.join(run_dir, "logs", "train"))
    epoch = lambda tag: [(step + 1, value) for step, value in scalars[tag]]  # noqa: E731 -- Keras logs step = epoch - 1
    charts = [
        line_chart("BYOL loss", {"loss": epoch("epoch_loss")}),
        line_chart(
            "collapse indicator (std of projections)",
            {"collapse_std": epoch("epoch_collapse_std")},
            reference=(f"1/sqrt({projection_dim}): healthy", 1 / np.sqrt(projection_dim)),
        ),
        line_chart(
            "accuracy",
            {"kNN, held-out (k=20)": epoch("epoch_knn_accuracy"), "online probe, views": epoch("epoch_probe_accuracy")},
        ),
    ]
    picture = Image.new("RGB", (sum(chart.width for chart in charts), charts[0].height), "white")
    for index, chart in enumerate(charts):
        picture.paste(chart, (index * chart.width, 0))
    save_small(picture, path)


def neighbours_picture(run_dir: str, path: str, work: str):
    from byol_tf import config as config_lib
    from byol_tf import data

    for split in ("train", "test"):
        out = os.path.join(run_dir, f"embeddings_{split}")
        if not os.path.exists(os.path.join(out, "_manifest.json")):
            step(f"embedding the {split} split")
            run_byol_tf("embed", "--model", run_dir, "--config", CONFIG, "--split", split, "--out", out)
    images, labels = data.load_arrays(config_lib.load(CONFIG).data, "test")
    queries = []
    for digit in range(QUERIES):  # the first held-out image of digits 0, 2, 4, ...
        index = int(np.flatnonzero(labels == 2 * digit)[0])
        query = os.path.join(work, f"test_{index}.png")
        Image.fromarray(images[index]).save(query)
        queries += ["--query", query]
    output = os.path.join(work, "neighbours.png")
    run_byol_tf("neighbours", "--embeddings", os.path.join(run_dir, "embeddings_train"), *queries, "-k", "8", "--out", output)
    save_small(Image.open(output), path)


def projector_screenshot(run_dir: str, path: str, work: str):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("readme_pictures: no chromium on PATH (apt-get install -y chromium), or pass --skip-screenshot")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"readme_pictures: port {PORT} is taken; stop what listens there first")
    # A relative log folder: the projector prints the checkpoint's path, and the picture
    # should show runs/mnist5k/..., not this machine's folders.
    board = subprocess.Popen(
        [os.path.join(BIN, "tensorboard"), "--logdir", os.path.relpath(os.path.join(run_dir, "logs"), ROOT),
         "--host", "127.0.0.1", "--port", str(PORT)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{PORT}"
        for _ in range(120):  # TensorBoard takes a few seconds to start
            try:
                urllib.request.urlopen(f"{url}/data/plugin/projector/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        shot = os.path.join(work, "projector.png")
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--hide-scrollbars", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--window-size=1400,860", "--virtual-time-budget=60000",
             f"--user-data-dir={os.path.join(work, 'chromium')}", f"--screenshot={shot}",
             f"{url}/?darkMode=false#projector"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
        )
    finally:
        board.terminate()
        board.wait(timeout=30)
    image = Image.open(shot)
    save_small(image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS), path, colours=96)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=os.path.join(ROOT, "runs", "mnist5k"), help="run folder (trained if absent)")
    parser.add_argument("--skip-screenshot", action="store_true", help="keep docs/projector.png as it is")
    args = parser.parse_args(argv)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    run_dir = os.path.abspath(args.run)
    if not os.path.isfile(os.path.join(run_dir, "export", "saved_model.pb")):
        step(f"training the embedded demo into {run_dir} (about 10 minutes on a quiet 2-core CPU)")
        run_byol_tf("train", "--config", CONFIG, "--run-dir", run_dir)
    from byol_tf import config as config_lib

    os.makedirs(DOCS, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        view_pairs(run_dir, os.path.join(DOCS, "view_pairs.png"))
        projection_dim = config_lib.load(os.path.join(run_dir, "config.yaml")).network.projection_dim
        training_curves(run_dir, os.path.join(DOCS, "training_curves.png"), projection_dim)
        neighbours_picture(run_dir, os.path.join(DOCS, "neighbours.png"), work)
        if not args.skip_screenshot:
            projector_screenshot(run_dir, os.path.join(DOCS, "projector.png"), work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
