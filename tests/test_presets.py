"""Tests for byol_tf.presets: the paper's per-budget table and how configs and the CLI apply it."""

import os

import pytest

from byol_tf import cli, config, presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_RESNET50 = os.path.join(ROOT, "configs", "imagenet_resnet50.yaml")


def _row(cfg):
    return (cfg.train.epochs, cfg.optimizer.base_learning_rate, cfg.optimizer.weight_decay, cfg.train.tau_base)


def test_table_holds_the_papers_four_budgets():
    table = {
        epochs: (row.epochs, row.base_learning_rate, row.weight_decay, row.tau_base)
        for epochs, row in presets.PAPER_IMAGENET_BUDGETS.items()
    }
    assert table == {
        40: (40, 0.45, 1e-6, 0.97),
        100: (100, 0.45, 1e-6, 0.99),
        300: (300, 0.3, 1e-6, 0.99),
        1000: (1000, 0.2, 1.5e-6, 0.996),
    }


def test_imagenet_resnet50_preset_is_the_1000_epoch_row():
    row = presets.PAPER_IMAGENET_BUDGETS[1000]
    cfg = config.load(IMAGENET_RESNET50)
    assert _row(cfg) == (row.epochs, row.base_learning_rate, row.weight_decay, row.tau_base)
    # Applying the row it already holds changes nothing.
    assert config.load(IMAGENET_RESNET50, presets.paper_budget_overrides(1000)) == cfg


@pytest.mark.parametrize("epochs", sorted(presets.PAPER_IMAGENET_BUDGETS))
def test_overrides_set_exactly_the_rows_numbers(epochs):
    # Floats such as 1e-6 must reach the config as numbers (YAML 1.1 reads "1e-06" as text).
    row = presets.PAPER_IMAGENET_BUDGETS[epochs]
    cfg = config.load(IMAGENET_RESNET50, presets.paper_budget_overrides(epochs))
    assert _row(cfg) == (row.epochs, row.base_learning_rate, row.weight_decay, row.tau_base)
    assert all(isinstance(value, float) for value in _row(cfg)[1:])


def test_budget_300_sets_epochs_learning_rate_weight_decay_and_tau_only():
    base = config.load(IMAGENET_RESNET50)
    cfg = config.load(IMAGENET_RESNET50, presets.paper_budget_overrides(300))
    assert _row(cfg) == (300, 0.3, 1e-6, 0.99)
    assert cfg.optimizer.warmup_epochs == 10 and cfg.data.batch_size == 4096
    assert (cfg.network, cfg.augment, cfg.data) == (base.network, base.augment, base.data)


def test_unknown_budget_raises_naming_the_allowed_ones():
    with pytest.raises(config.ConfigError, match=r"^paper budget: 200 epochs is not one of 40, 100, 300, 1000$"):
        presets.paper_budget_overrides(200)


def test_cli_paper_budget_applies_before_set_overrides():
    args = cli.build_parser().parse_args(
        ["train", "--config", IMAGENET_RESNET50, "--paper-budget", "300", "--set", "train.epochs=5"]
    )
    cfg = cli.load_config(args)
    # --set wins over the budget; the rest of the budget's row stays.
    assert _row(cfg) == (5, 0.3, 1e-6, 0.99)
    without = cli.load_config(cli.build_parser().parse_args(["train", "--config", IMAGENET_RESNET50]))
    assert _row(without) == (1000, 0.2, 1.5e-6, 0.996)


def test_cli_rejects_a_budget_outside_the_table(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--config", IMAGENET_RESNET50, "--paper-budget", "200"])
    assert "--paper-budget: invalid choice: 200" in capsys.readouterr().err
