"""The PyTorch peer: one BYOL step built from the `lightly` library's BYOL pieces.

Runs in the separate venv benchmarks/.venv-torch (`benchmarks/setup_torch_venv.sh`), never
in the project's: torch and lightly are not dependencies of byol-tf.

    benchmarks/.venv-torch/bin/python -m benchmarks.peer_lightly --batch 128 --size 32

The step follows lightly's BYOL example: ResNet-18 with the CIFAR stem (torchvision
resnet18, conv1 -> 3x3 stride 1, maxpool -> Identity), BYOLProjectionHead /
BYOLPredictionHead, a deep-copied momentum (target) backbone and projector with
`deactivate_requires_grad`, `update_momentum` at the start of the step, the symmetric
NegativeCosineSimilarity loss, and lightly's LARS with biases and BatchNorm parameters
excluded from weight decay and adaptation (as byol-tf's LARS). All modules stay in train
mode, so the target's BatchNorm uses batch statistics, as in byol-tf. Inputs are two
in-memory views (NCHW float32), as `benchmarks.step` feeds byol-tf.

Standalone it prints one JSON line (`peer_step`, images/s); with `--serve` it is the worker
that `benchmarks.peer` drives, alternating with byol-tf.
"""

from __future__ import annotations

import argparse
import copy
import math

from benchmarks import common

# The encoder presets' heads (benchmarks.presets), repeated here because this venv has no byol_tf.
HEADS = {"resnet18_cifar": (4096, 256, 4096), "small_convnet": (1024, 128, 1024)}


def build_backbone(encoder: str):
    import torch.nn as nn
    import torchvision

    if encoder == "resnet18_cifar":
        resnet = torchvision.models.resnet18()
        # CIFAR stem, as byol-tf's resnet18_cifar: 3x3 stride-1 conv, no max-pool.
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        return resnet, 512
    if encoder == "small_convnet":
        # byol-tf's small_convnet: conv3x3-BN-ReLU 32-64-128-256, strides 1-2-2-2, GAP.
        layers, channels = [], 3
        for filters, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
            layers += [
                nn.Conv2d(channels, filters, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5),
                nn.ReLU(inplace=True),
            ]
            channels = filters
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), 256
    raise ValueError(f"--encoder: {encoder!r} is not one of {', '.join(HEADS)}")


def build_step(encoder: str, batch: int, size: int, heads, optimizer_name: str, seed: int = 0):
    """(step callable, description) for one lightly BYOL training step on fixed views."""
    import torch
    import torch.nn as nn
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
    from lightly.utils.lars import LARS

    torch.manual_seed(seed)
    projector_hidden, projection_dim, predictor_hidden = heads

    class BYOL(nn.Module):
        # As lightly's examples/pytorch/byol.py.
        def __init__(self, backbone, representation_dim):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(representation_dim, projector_hidden, projection_dim)
            self.prediction_head = BYOLPredictionHead(projection_dim, predictor_hidden, projection_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            y = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(y)
            return self.prediction_head(z)

        def forward_momentum(self, x):
            y = self.backbone_momentum(x).flatten(start_dim=1)
            z = self.projection_head_momentum(y)
            return z.detach()

    model = BYOL(*build_backbone(encoder))
    model.train()
    criterion = NegativeCosineSimilarity()
    learning_rate = 1.0 * batch / 256  # byol-tf presets: base 1.0 x B / 256
    decay, no_decay = get_weight_decay_parameters([model.backbone, model.projection_head, model.prediction_head])
    groups = [{"params": decay, "weight_decay": 1e-6}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer_name == "lars":
        optimizer = LARS(groups, lr=learning_rate, momentum=0.9, trust_coefficient=1e-3)
    else:
        optimizer = torch.optim.SGD(groups, lr=learning_rate, momentum=0.9)

    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 3, size, size), generator=generator)
    x1 = torch.rand((batch, 3, size, size), generator=generator)
    tau = 0.996

    def step():
        update_momentum(model.backbone, model.backbone_momentum, m=tau)
        update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
        p0 = model(x0)
        z0 = model.forward_momentum(x0)
        p1 = model(x1)
        z1 = model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().item()
        if not math.isfinite(value):
            raise FloatingPointError(f"lightly BYOL loss is {value}")
        return value

    versions = common.versions(("lightly", "torchvision"))
    description = {
        "library": "lightly",
        "lightly": versions.get("lightly", "unknown"),
        "torch": torch.__version__,
        "torchvision": versions.get("torchvision", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "encoder": encoder,
        "batch": batch,
        "size": size,
        "heads": list(heads),
        "optimizer": optimizer_name,
    }
    return step, description


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_lightly", description=__doc__.split("\n\n")[0])
    common.add_peer_arguments(parser, sorted(HEADS), "the encoder's byol-tf preset")
    parser.add_argument("--serve", action="store_true", help="be a worker for benchmarks.peer")
    common.add_common_arguments(parser)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    heads = tuple(args.heads or HEADS[args.encoder])
    if args.smoke:
        common.smoke_sizes(args)
        heads = common.SMOKE_HEADS
    step, description = build_step(args.encoder, args.batch, args.size, heads, args.optimizer)
    description["smoke"] = args.smoke
    if args.serve:
        common.serve(step, description, args.warmup)
        return
    times = common.interleaved({"step": step}, args.reps, args.warmup)["step"]
    median = common.median(times)
    common.record(
        "peer_step", description, args.batch / median, "images/s", median, args.reps, args.out, step_times_s=times
    )


if __name__ == "__main__":
    main()
