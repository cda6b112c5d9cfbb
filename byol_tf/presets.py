"""The paper's ImageNet settings per pretraining budget, kept as data.

BYOL's base learning rate, weight decay and initial target decay depend on how many
epochs it trains for. `PAPER_IMAGENET_BUDGETS` holds the four budgets of the reference
code (google-deepmind/deepmind-research, `byol/configs/byol.py`: its learning-rate,
weight-decay and EMA presets); the 1000-epoch row is also the paper's (Grill et al. 2020,
implementation details). Everything else (batch 4096, LARS, 10 warm-up epochs, the
network) is the same for every budget and lives in `configs/imagenet_resnet50.yaml`,
which holds the 1000-epoch row; `byol-tf train --paper-budget EPOCHS` applies another.
"""

from __future__ import annotations

import dataclasses

from byol_tf.config import ConfigError


@dataclasses.dataclass(frozen=True)
class PaperBudget:
    """One row of the table: a number of pretraining epochs and the settings it goes with."""

    epochs: int
    base_learning_rate: float
    weight_decay: float
    tau_base: float


PAPER_IMAGENET_BUDGETS: dict[int, PaperBudget] = {
    row.epochs: row
    for row in (
        PaperBudget(epochs=40, base_learning_rate=0.45, weight_decay=1e-6, tau_base=0.97),
        PaperBudget(epochs=100, base_learning_rate=0.45, weight_decay=1e-6, tau_base=0.99),
        PaperBudget(epochs=300, base_learning_rate=0.3, weight_decay=1e-6, tau_base=0.99),
        PaperBudget(epochs=1000, base_learning_rate=0.2, weight_decay=1.5e-6, tau_base=0.996),
    )
}


def paper_budget_overrides(epochs: int) -> list[str]:
    """`section.field=value` overrides that set one budget's row on a config.

    Args:
        epochs: a key of `PAPER_IMAGENET_BUDGETS` (40, 100, 300 or 1000).

    Returns:
        Overrides of `train.epochs`, `optimizer.base_learning_rate`,
        `optimizer.weight_decay` and `train.tau_base`, for `config.load`; overrides
        placed after them win.

    Raises:
        ConfigError: `epochs` is not a budget of the table.
    """
    if epochs not in PAPER_IMAGENET_BUDGETS:
        raise ConfigError(
            f"paper budget: {epochs!r} epochs is not one of {', '.join(map(str, PAPER_IMAGENET_BUDGETS))}"
        )
    row = PAPER_IMAGENET_BUDGETS[epochs]
    return [
        f"train.epochs={row.epochs}",
        f"optimizer.base_learning_rate={_yaml_float(row.base_learning_rate)}",
        f"optimizer.weight_decay={_yaml_float(row.weight_decay)}",
        f"train.tau_base={_yaml_float(row.tau_base)}",
    ]


def _yaml_float(value: float) -> str:
    # Overrides are parsed as YAML 1.1, which reads Python's "1e-06" as a string: the
    # mantissa needs a point ("1.0e-06").
    text = repr(float(value))
    mantissa, exponent_mark, exponent = text.partition("e")
    if exponent_mark and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text
