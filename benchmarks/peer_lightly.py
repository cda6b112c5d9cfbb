"""The PyTorch peer: BYOL built from the `lightly` library's BYOL pieces.

Runs in the separate venv benchmarks/.venv-torch (`benchmarks/setup_torch_venv.sh`), never
in the project's: torch and lightly are not dependencies of byol-tf.

    benchmarks/.venv-torch/bin/python -m benchmarks.peer_lightly --batch 128 --size 32

The model follows lightly's BYOL example: a backbone, a projector and a predictor built
with lightly's `ProjectionHead`, a deep-copied momentum (target) backbone and projector
with `deactivate_requires_grad`, `update_momentum` for the EMA, lightly's
NegativeCosineSimilarity, and lightly's LARS with biases and BatchNorm parameters
excluded from weight decay and adaptation (as byol-tf's LARS). All modules stay in train
mode, so the target's BatchNorm uses batch statistics, as in byol-tf. Where lightly's
example differs from byol-tf (and the BYOL reference), the peer takes byol-tf's side, so
the two compute the same thing:
- backbones as byol-tf's: ResNet-18 with the CIFAR stem (torchvision resnet18, conv1 ->
  3x3 stride 1, maxpool -> Identity) or `small_convnet` (conv3x3-BN-ReLU 32-64-128-256,
  strides 1-2-2-2, GAP), both normalising their [0, 1] input with ImageNet's channel
  statistics inside the model, as byol-tf's encoders do;
- heads Linear (with bias) -> BN -> ReLU -> Linear without bias; lightly's BYOL heads
  drop the first bias (redundant before BN) and keep the last;
- the loss is byol-tf's (the paper's): 2 - 2 cos per direction, both directions summed,
  batch mean, i.e. 4 + 2 x (the two NegativeCosineSimilarity terms). lightly's example
  takes half their sum: a quarter of the gradient, which matters for biases and BN
  parameters, the ones LARS does not rescale;
- the target's EMA runs after the optimizer step, with tau of the step just taken, as
  byol-tf's train step (lightly's example updates at the start of the next step).

Standalone it times one step on two in-memory views (NCHW float32, as `benchmarks.step`
feeds byol-tf) and prints one JSON line (`peer_step`, images/s); with `--serve` it is the
worker that `benchmarks.peer` drives, alternating with byol-tf. `benchmarks.quality_peer`
trains the same model on MNIST-5k.
"""

from __future__ import annotations

import argparse
import copy
import math

from benchmarks import common

# The encoder presets' heads (benchmarks.presets), repeated here because this venv has no byol_tf.
HEADS = {"resnet18_cifar": (4096, 256, 4096), "small_convnet": (1024, 128, 1024)}
# byol_tf.networks' input normalisation, repeated for the same reason.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PyTorch's BatchNorm momentum is 1 - Keras' (byol-tf's default decay 0.9); eps as byol-tf's.
BATCHNORM_MOMENTUM = 0.1
BATCHNORM_EPSILON = 1e-5


def build_backbone(encoder: str):
    """(backbone, representation dim): float32 NCHW images in [0, 1] -> [B, d]."""
    import torch.nn as nn
    import torchvision
    from torchvision.transforms import v2

    if encoder == "resnet18_cifar":
        network = torchvision.models.resnet18()
        # CIFAR stem, as byol-tf's resnet18_cifar: 3x3 stride-1 conv, no max-pool.
        network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
        network.fc = nn.Identity()
        dim = 512
    elif encoder == "small_convnet":
        # byol-tf's small_convnet: conv3x3-BN-ReLU 32-64-128-256, strides 1-2-2-2, GAP.
        layers, channels = [], 3
        for filters, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
            layers += [
                nn.Conv2d(channels, filters, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(filters, momentum=BATCHNORM_MOMENTUM, eps=BATCHNORM_EPSILON),
                nn.ReLU(inplace=True),
            ]
            channels = filters
        network = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        dim = 256
    else:
        raise ValueError(f"--encoder: {encoder!r} is not one of {', '.join(HEADS)}")
    # Constants, not parameters (as byol-tf's Normalization layer): nothing for the EMA or LARS.
    return nn.Sequential(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), network), dim


def build_head(input_dim: int, hidden_dim: int, output_dim: int):
    """byol-tf's projector / predictor from lightly's ProjectionHead: Linear -> BN -> ReLU -> Linear, no last bias."""
    import torch.nn as nn
    from lightly.models.modules.heads import ProjectionHead

    batch_norm = nn.BatchNorm1d(hidden_dim, momentum=BATCHNORM_MOMENTUM, eps=BATCHNORM_EPSILON)
    return ProjectionHead(
        [(input_dim, hidden_dim, batch_norm, nn.ReLU(), True), (hidden_dim, output_dim, None, None, False)]
    )


def build_model(encoder: str, heads, seed: int = 0):
    """The BYOL module (lightly's example with byol-tf's heads and loss), in train mode.

    Args:
        encoder: "small_convnet" or "resnet18_cifar".
        heads: (projector hidden, projection, predictor hidden) widths.
        seed: torch's global seed, set before the weights are drawn (PyTorch's default inits).
    """
    import torch
    import torch.nn as nn
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    torch.manual_seed(seed)
    projector_hidden, projection_dim, predictor_hidden = heads

    class BYOL(nn.Module):
        # As lightly's examples/pytorch/byol.py, plus `loss` and `update_target`.
        def __init__(self, backbone, representation_dim):
            super().__init__()
            self.backbone = backbone
            self.projection_head = build_head(representation_dim, projector_hidden, projection_dim)
            self.prediction_head = build_head(projection_dim, predictor_hidden, projection_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)
            self.criterion = NegativeCosineSimilarity()

        def forward(self, x):
            y = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(y)
            return self.prediction_head(z)

        def forward_momentum(self, x):
            y = self.backbone_momentum(x).flatten(start_dim=1)
            z = self.projection_head_momentum(y)
            return z.detach()

        def loss(self, x0, x1):
            p0, z0 = self(x0), self.forward_momentum(x0)
            p1, z1 = self(x1), self.forward_momentum(x1)
            # byol-tf's scale (module docstring): criterion is -cos, batch-averaged.
            return 4.0 + 2.0 * (self.criterion(p0, z1) + self.criterion(p1, z0))

        def update_target(self, tau: float):
            update_momentum(self.backbone, self.backbone_momentum, m=tau)
            update_momentum(self.projection_head, self.projection_head_momentum, m=tau)

    model = BYOL(*build_backbone(encoder))
    model.train()
    return model


def build_lars(
    model, learning_rate: float, weight_decay: float, momentum: float = 0.9, trust_coefficient: float = 1e-3
):
    """lightly's LARS over the online parameters, biases and BN parameters excluded.

    lightly's LARS skips the trust ratio in parameter groups whose weight decay is 0, so the
    excluded group gets plain momentum SGD, as byol-tf's LARS gives them. Its trust ratio
    is eta ||w|| / (||g|| + wd ||w|| + eps), byol-tf's eta ||w|| / ||g + wd w||.
    """
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS

    decay, no_decay = get_weight_decay_parameters([model.backbone, model.projection_head, model.prediction_head])
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return LARS(groups, lr=learning_rate, momentum=momentum, trust_coefficient=trust_coefficient)


def train_step(model, optimizer, x0, x1, tau: float) -> float:
    """One BYOL step in byol-tf's order: loss, gradients, optimizer, then the target's EMA."""
    loss = model.loss(x0, x1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.update_target(tau)
    value = loss.detach().item()
    if not math.isfinite(value):
        raise FloatingPointError(f"lightly BYOL loss is {value}")
    return value


def build_step(encoder: str, batch: int, size: int, heads, optimizer_name: str, seed: int = 0):
    """(step callable, description) for one lightly BYOL training step on fixed views."""
    import torch

    model = build_model(encoder, heads, seed)
    learning_rate = 1.0 * batch / 256  # byol-tf presets: base 1.0 x B / 256
    if optimizer_name == "lars":
        optimizer = build_lars(model, learning_rate, weight_decay=1e-6)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate, momentum=0.9)

    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 3, size, size), generator=generator)
    x1 = torch.rand((batch, 3, size, size), generator=generator)

    def step():
        return train_step(model, optimizer, x0, x1, tau=0.996)

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
