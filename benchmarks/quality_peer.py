"""Quality parity with lightly (PyTorch): the same BYOL run on MNIST-5k, both encoders
evaluated by byol-tf's linear protocol.

    .venv/bin/python -m benchmarks.quality_peer --out benchmarks/results/quality-peer-<date>.jsonl
    .venv/bin/python -m benchmarks.quality_peer --smoke

One run, one side after the other on the same machine:
1. The preset (`configs/mnist5k.yaml`, `--set` overrides apply to both sides) fixes the
   data and the recipe. Its pretraining split (4,000 images) and held-out split (1,000)
   come from `byol_tf.data.load_arrays` and go to a work folder as .npy, with their centre
   crops (`augment.center_crop_resize`: at 28 px the whole image), the config as JSON and
   the learning-rate and tau schedules as tables (`training.learning_rate_schedule`
   and `schedules.tau`, evaluated at every step), so both sides step through the same
   numbers.
2. lightly: `benchmarks.peer_lightly`'s model (lightly's BYOL pieces with byol-tf's
   small_convnet, heads and loss) trains in benchmarks/.venv-torch on the exported
   pretraining images, then writes its encoder's features of the centre crops (BatchNorm
   in eval mode, as byol-tf's frozen encoder).
3. byol-tf: `training.train` on the preset, then `evaluation.extract_features` of the
   same images.
4. Both feature sets go through the same public functions: `evaluation.linear_evaluation`
   (the transfer protocol: standardised features, SGD + Nesterov, the preset's L2 sweep
   chosen on a validation part of the pretraining split, test on the held-out split) and
   `evaluation.knn_accuracy` (k and temperature from the preset).

Records: `quality_peer` per side (value: linear top-1 % on the held-out images; top-1,
validation top-1, kNN top-1, epochs, steps, training wall time) and `quality_peer_gap`
(value: byol-tf top-1 minus lightly top-1, in points; acceptance >= -0.5).

The same work on both sides: the data split, batch 64, epochs, steps per epoch (full
batches; 62 at 4,000 images), LARS (base LR x batch / 256, weight decay, momentum, trust
coefficient, biases and BN parameters excluded), linear warm-up then cosine LR, tau_base
and its cosine schedule, heads (hidden 1024, output 128, no output bias), BatchNorm
momentum 0.9 (PyTorch: 0.1) and eps 1e-5, the target's BatchNorm on batch statistics
(lightly's modules stay in train mode), the loss scale, the EMA after the optimizer step,
and the view distributions as far as torchvision goes: random resized crop (scale and
ratio from the preset, bilinear), flip, colour jitter (p, brightness, contrast,
saturation, hue from the preset, applied in a random order per image), grayscale, Gaussian
blur (kernel 3 at 28 px, reflect padding, sigma range and p per view), solarisation,
clipping to [0, 1].

Remaining differences (lightly side):
- brightness is multiplicative in torchvision (x U(0.6, 1.4)) and additive in byol-tf
  (+ U(-0.4, 0.4), the reference's): on white-on-black digits torchvision's keeps the
  background black, byol-tf's shifts it. Contrast blends with the mean of the luma image
  in torchvision and with each channel's mean in byol-tf: the same on grey images.
  Hue and saturation (off in the preset) use torchvision's ops.
- crop boxes: torchvision rounds them to whole pixels and resizes with antialiasing off
  (crops of at least 40% of the area are enlarged, where antialiasing does nothing);
  byol-tf samples sub-pixel boxes.
- a new random order of the pretraining images each epoch, the last partial batch
  dropped (32 images per epoch); byol-tf shuffles a repeated stream, so batches straddle
  epochs.
- weights start from PyTorch's default initialisers (Kaiming-uniform with a = sqrt(5),
  uniform biases); byol-tf's from Keras' (He-normal convolutions, Glorot-uniform dense
  layers, zero biases).
- LARS trust ratio eta ||w|| / (||g|| + wd ||w|| + 1e-8) (lightly) against
  eta ||w|| / ||g + wd w|| (byol-tf): equal up to wd = 1e-6.
- BatchNorm's running variance is unbiased (n / (n - 1)) in PyTorch, biased in Keras: it
  only enters evaluation features, by at most 0.1% in the encoder (n >= 64 x 4 x 4).
- float32 kernels of two libraries, and two random number generators: no two runs share
  a draw.
The byol-tf side runs without its online linear probe and kNN monitor (neither touches the
encoder; lightly has neither) and without backups, so both train the same work (it still
writes its TensorBoard logs and the encoder file, as `training.train` does).

Threads: torch gets `--threads` (default 2, as TensorFlow's default here) with
OMP_WAIT_POLICY=PASSIVE: on a shared, oversubscribed machine spinning OpenMP threads made
a step several times slower. Wall times are for one side at a time on this machine and
depend on its load; the figure this benchmark is for is top-1.

Measured figures: benchmarks/RESULTS.md, "Quality parity with lightly on MNIST-5k".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "mnist5k.yaml")
# Acceptance: byol-tf's linear top-1 at most this many points below lightly's.
ACCEPTANCE_POINTS = -0.5

# Files in the work folder shared by the two sides.
CONFIG_FILE = "config.json"
SCHEDULES_FILE = "schedules.npz"
PRETRAIN_IMAGES = "pretrain_images.npy"
CROPS = {"train": "train_crops.npy", "test": "test_crops.npy"}
LIGHTLY_FEATURES = {"train": "lightly_train_features.npy", "test": "lightly_test_features.npy"}
LIGHTLY_INFO = "lightly.json"

# The byol-tf side trains what lightly trains: no monitoring extras, no backups.
TRAIN_OVERRIDES = ("train.online_probe=false", "evaluation.knn_every_epochs=0", "train.keep_checkpoints=0")
# --smoke: a few steps on tiny data, small heads, a short linear protocol.
SMOKE_OVERRIDES = (
    "train.epochs=1",
    "data.max_examples=144",
    "data.holdout_examples=40",
    "data.batch_size=16",
    "data.shuffle_buffer=104",
    "train.steps_per_epoch=3",
    "evaluation.linear_epochs=2",
    "evaluation.l2_sweep=[0.0, 0.001]",
    "network.projector_hidden_dim=32",
    "network.projection_dim=16",
    "network.predictor_hidden_dim=32",
)


# ----------------------------------------------------------------------- both sides


def blur_kernel_size(image_size: int) -> int:
    """byol-tf's blur kernel (augment.py: size / 10, made odd): 3 at 28 or 32 px, 1 (none) below 20 px."""
    return 2 * int(image_size / 10 / 2) + 1


def export(config, work_dir: str) -> dict:
    """Writes what the lightly side reads; returns the arrays byol-tf's side keeps in memory.

    Returns:
        {"train_images", "train_labels", "test_images", "test_labels", "steps_per_epoch",
        "total_steps"}.
    """
    from byol_tf import augment, data, schedules, training
    from byol_tf import config as config_lib

    train_images, train_labels = data.load_arrays(config.data, "train")
    test_images, test_labels = data.load_arrays(config.data, "test")
    steps_per_epoch = training.steps_per_epoch(config, len(train_images))
    total_steps = config.train.epochs * steps_per_epoch
    steps = np.arange(total_steps)
    learning_rate = training.learning_rate_schedule(config, steps_per_epoch)
    np.savez(
        os.path.join(work_dir, SCHEDULES_FILE),
        learning_rate=np.asarray(learning_rate(steps), np.float64),
        tau=np.asarray(schedules.tau(steps, total_steps, config.train.tau_base), np.float64),
    )
    np.save(os.path.join(work_dir, PRETRAIN_IMAGES), train_images)
    size = config.augment.image_size
    for split, images in (("train", train_images), ("test", test_images)):
        np.save(os.path.join(work_dir, CROPS[split]), augment.center_crop_resize(images, size).numpy())
    settings = {
        "config": config_lib.to_dict(config),
        "steps_per_epoch": steps_per_epoch,
        "blur_kernel": blur_kernel_size(size),
    }
    with open(os.path.join(work_dir, CONFIG_FILE), "w", encoding="utf-8") as stream:
        json.dump(settings, stream, indent=1)
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
    }


def linear_protocol(train_features, train_labels, test_features, test_labels, config) -> dict:
    """byol-tf's transfer protocol and kNN on feature arrays: what both sides are scored by."""
    from byol_tf import data, evaluation

    started = time.perf_counter()
    num_classes = data.num_classes(config.data) or int(max(train_labels.max(), test_labels.max()) + 1)
    row = evaluation.linear_evaluation(
        train_features, train_labels, test_features, test_labels, num_classes, config.evaluation, seed=config.train.seed
    )
    knn = evaluation.knn_accuracy(
        train_features, train_labels, test_features, test_labels, num_classes,
        k=config.evaluation.knn_k, temperature=config.evaluation.knn_temperature,
    )
    return {
        "top1": row["top1"],
        "top5": row["top5"],
        "val_top1": row["val_top1"],
        "knn_top1": knn,
        "l2": row["l2"],
        "sweep": {repr(l2): accuracy for l2, accuracy in row["sweep"].items()},
        "num_train": row["num_train"],
        "num_validation": row["num_validation"],
        "num_test": row["num_test"],
        "feature_dim": int(train_features.shape[1]),
        "eval_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------- lightly side


class _TwoViews:
    """Map-style dataset of (view1, view2) of uint8 [N, H, W, 3] images, views as float CHW in [0, 1]."""

    def __init__(self, images: np.ndarray, view1, view2):
        self.images = images
        self.view1, self.view2 = view1, view2

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import torch

        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).float() / 255.0
        return self.view1(image), self.view2(image)


def _clip(image):
    return image.clamp(0.0, 1.0)


def torchvision_view(view: dict, image_size: int, blur_kernel: int):
    """One of byol-tf's view distributions (a ViewConfig as a dict) with torchvision v2 ops.

    Order as byol-tf's: crop, flip, colour jitter, grayscale, blur, solarise. Magnitudes
    of 0 leave an op out, as in byol-tf.
    """
    from torchvision.transforms import InterpolationMode, v2

    ops = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(view["crop_scale"]), ratio=tuple(view["crop_ratio"]),
            interpolation=InterpolationMode.BILINEAR, antialias=False,
        )
    ]
    if view["flip_prob"] > 0:
        ops.append(v2.RandomHorizontalFlip(view["flip_prob"]))
    jitter = {name: view[name] or None for name in ("brightness", "contrast", "saturation", "hue")}
    if view["color_jitter_prob"] > 0 and any(jitter.values()):
        # ColorJitter applies its ops in a new random order per call, as byol-tf per image.
        ops.append(v2.RandomApply([v2.ColorJitter(**jitter)], p=view["color_jitter_prob"]))
    if view["grayscale_prob"] > 0:
        ops.append(v2.RandomGrayscale(view["grayscale_prob"]))
    if view["blur_prob"] > 0 and blur_kernel > 1:
        # Reflect padding, as byol-tf's blur.
        blur = v2.GaussianBlur(blur_kernel, sigma=tuple(view["blur_sigma"]))
        ops.append(blur if view["blur_prob"] >= 1 else v2.RandomApply([blur], p=view["blur_prob"]))
    if view["solarize_prob"] > 0:
        ops.append(v2.RandomSolarize(view["solarize_threshold"], p=view["solarize_prob"]))
    ops.append(v2.Lambda(_clip))
    return v2.Compose(ops)


def _check_peer_settings(config: dict):
    """Settings the PyTorch peer builds as constants, checked rather than silently ignored."""
    from benchmarks import peer_lightly

    network, optimizer = config["network"], config["optimizer"]
    expected = {
        "network.batchnorm_momentum": (network["batchnorm_momentum"], 1 - peer_lightly.BATCHNORM_MOMENTUM),
        "network.batchnorm_epsilon": (network["batchnorm_epsilon"], peer_lightly.BATCHNORM_EPSILON),
        "network.width_multiplier": (network["width_multiplier"], 1),
        "optimizer.name": (optimizer["name"], "lars"),
        "train.gradient_accumulation_steps": (config["train"]["gradient_accumulation_steps"], 1),
    }
    for field, (value, supported) in expected.items():
        if value != supported and not (isinstance(value, float) and abs(value - supported) < 1e-9):
            raise ValueError(f"{field}: the lightly side supports {supported!r} only, got {value!r}")


def lightly_worker(work_dir: str, threads: int):
    """Trains lightly's BYOL on the exported images and writes its features (torch venv)."""
    import itertools

    import torch

    from benchmarks import peer_lightly

    torch.set_num_threads(threads)
    with open(os.path.join(work_dir, CONFIG_FILE), encoding="utf-8") as stream:
        settings = json.load(stream)
    config = settings["config"]
    _check_peer_settings(config)
    schedules = np.load(os.path.join(work_dir, SCHEDULES_FILE))
    learning_rate, tau = schedules["learning_rate"], schedules["tau"]
    network, optimizer_config, train = config["network"], config["optimizer"], config["train"]
    size, seed = config["augment"]["image_size"], train["seed"]

    heads = (network["projector_hidden_dim"], network["projection_dim"], network["predictor_hidden_dim"])
    model = peer_lightly.build_model(network["encoder"], heads, seed)
    optimizer = peer_lightly.build_lars(
        model, float(learning_rate[0]), optimizer_config["weight_decay"],
        optimizer_config["momentum"], optimizer_config["trust_coefficient"],
    )
    views = [torchvision_view(config["augment"][name], size, settings["blur_kernel"]) for name in ("view1", "view2")]
    images = np.load(os.path.join(work_dir, PRETRAIN_IMAGES))
    loader = torch.utils.data.DataLoader(
        _TwoViews(images, *views),
        batch_size=config["data"]["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=1,  # the views are made beside the step, as tf.data makes byol-tf's
        persistent_workers=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch, epochs = settings["steps_per_epoch"], train["epochs"]
    if len(loader) < steps_per_epoch:
        raise ValueError(f"{len(images)} images give {len(loader)} batches per epoch, fewer than {steps_per_epoch}")

    started = time.perf_counter()
    step, epoch_losses = 0, []
    for epoch in range(epochs):
        losses = []
        for x0, x1 in itertools.islice(loader, steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(learning_rate[step])
            losses.append(peer_lightly.train_step(model, optimizer, x0, x1, float(tau[step])))
            step += 1
        epoch_losses.append(float(np.mean(losses)))
        print(f"lightly: epoch {epoch + 1}/{epochs} loss {epoch_losses[-1]:.4f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started

    model.backbone.eval()  # BatchNorm on its running statistics, as byol-tf's frozen encoder
    with torch.no_grad():
        for split, name in CROPS.items():
            crops = torch.from_numpy(np.load(os.path.join(work_dir, name))).permute(0, 3, 1, 2).contiguous()
            features = torch.cat([model.backbone(batch) for batch in torch.split(crops, 256)])
            np.save(os.path.join(work_dir, LIGHTLY_FEATURES[split]), features.numpy().astype(np.float32))
    versions = common.versions(("lightly", "torchvision"))
    info = {
        "steps": step,
        "train_s": train_s,
        "epoch_losses": epoch_losses,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, **versions},
    }
    with open(os.path.join(work_dir, LIGHTLY_INFO), "w", encoding="utf-8") as stream:
        json.dump(info, stream)


def run_lightly(work_dir: str, torch_python: str, threads: int) -> dict:
    """The lightly side in its own venv; returns its info (the features are in the work folder)."""
    if not os.path.exists(torch_python):
        raise SystemExit(f"no PyTorch venv at {torch_python}: run benchmarks/setup_torch_venv.sh first")
    environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    command = [torch_python, "-m", "benchmarks.quality_peer", "--lightly-worker", work_dir, "--threads", str(threads)]
    # The worker's stdout goes to file descriptor 2 (this process's stderr, whatever object
    # sys.stderr is now): this process's stdout holds only the records.
    subprocess.run(command, cwd=ROOT, env=environment, stdout=2, check=True)
    with open(os.path.join(work_dir, LIGHTLY_INFO), encoding="utf-8") as stream:
        return json.load(stream)


# ---------------------------------------------------------------------- byol-tf side


def run_byol_tf(config, arrays: dict) -> dict:
    """byol-tf's normal training path on the config; returns its features and info."""
    import tensorflow as tf

    from byol_tf import evaluation, training

    started = time.perf_counter()
    result = training.train(config)
    train_s = time.perf_counter() - started
    size = config.augment.image_size
    features = {
        split: evaluation.extract_features(result.encoder, arrays[f"{split}_images"], size, progress=False)
        for split in ("train", "test")
    }
    return {
        "features": features,
        "steps": result.steps_per_epoch * config.train.epochs,
        "train_s": train_s,
        "epoch_losses": [float(loss) for loss in result.history.get("loss", [])],
        "versions": {"tensorflow": tf.__version__, **common.versions(("keras",))},
    }


# --------------------------------------------------------------------------- driver


def load_config(args):
    from byol_tf import config as config_lib

    overrides = [*TRAIN_OVERRIDES, *(SMOKE_OVERRIDES if args.smoke else ())]
    overrides += [f"train.run_dir={os.path.join(args.work_dir, 'byol_tf_run')}",
                  f"train.verbose={0 if args.smoke else 2}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return config_lib.load(args.config, [*overrides, *args.set])


def drive(args) -> list[dict]:
    common.quiet_tensorflow()
    from benchmarks import peer

    torch_python = args.torch_python or peer.TORCH_PYTHON
    keep = args.work_dir is not None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="quality_peer-")
    os.makedirs(args.work_dir, exist_ok=True)
    try:
        config = load_config(args)
        arrays = export(config, args.work_dir)
        lightly = run_lightly(args.work_dir, torch_python, args.threads)
        lightly["features"] = {
            split: np.load(os.path.join(args.work_dir, name)) for split, name in LIGHTLY_FEATURES.items()
        }
        byol_tf = run_byol_tf(config, arrays)
    finally:
        if not keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)

    description = {
        "preset": os.path.relpath(args.config, ROOT),
        "overrides": list(args.set),
        "encoder": config.network.encoder,
        "image_size": config.augment.image_size,
        "batch": config.data.batch_size,
        "epochs": config.train.epochs,
        "steps_per_epoch": arrays["steps_per_epoch"],
        "heads": [config.network.projector_hidden_dim, config.network.projection_dim,
                  config.network.predictor_hidden_dim],
        "num_pretrain": len(arrays["train_labels"]),
        "num_test": len(arrays["test_labels"]),
        "smoke": args.smoke,
    }
    records, top1 = [], {}
    for library, side in (("byol-tf", byol_tf), ("lightly", lightly)):
        scores = linear_protocol(
            side["features"]["train"], arrays["train_labels"], side["features"]["test"], arrays["test_labels"], config
        )
        top1[library] = 100 * scores["top1"]
        records.append(common.record(
            "quality_peer",
            {"library": library, **description},
            top1[library],
            "% top-1",
            None,
            1,
            args.out,
            **scores,
            steps=side["steps"],
            train_s=side["train_s"],
            final_loss=side["epoch_losses"][-1] if side["epoch_losses"] else None,
            versions=side["versions"],
            **({"torch_threads": side["torch_threads"]} if "torch_threads" in side else {}),
        ))
    gap = top1["byol-tf"] - top1["lightly"]
    records.append(common.record(
        "quality_peer_gap",
        description,
        gap,
        "points",
        None,
        1,
        args.out,
        byol_tf_top1=top1["byol-tf"],
        lightly_top1=top1["lightly"],
        acceptance=ACCEPTANCE_POINTS,
        met=gap >= ACCEPTANCE_POINTS,
    ))
    return records


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=PRESET, help="the preset both sides train (default configs/mnist5k.yaml)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for both sides (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--torch-python", default=None, help="the PyTorch venv's python (default: benchmarks/.venv-torch's)"
    )
    parser.add_argument("--work-dir", default=None, help="keep the exported data, features and byol-tf run here")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data: checks the script works")
    parser.add_argument("--lightly-worker", metavar="WORK_DIR", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.lightly_worker:
        lightly_worker(args.lightly_worker, args.threads)
    else:
        drive(args)


if __name__ == "__main__":
    main()
