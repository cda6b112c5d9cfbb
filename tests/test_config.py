"""Tests for byol_tf.config: loading, validation, overrides and the presets."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from byol_tf import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["smoke", "mnist5k", "cifar10_resnet18", "imagenet_resnet50", "imagenet_resnet200x2"]


def preset(name):
    return os.path.join(ROOT, "configs", f"{name}.yaml")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = config.load(preset(name))
    path = tmp_path / "saved.yaml"
    config.save(cfg, str(path))
    assert config.load(str(path)) == cfg


def test_imagenet_preset_matches_the_paper():
    cfg = config.load(preset("imagenet_resnet50"))
    assert (cfg.network.encoder, cfg.network.width_multiplier) == ("resnet50", 1)
    # The paper's results were obtained with every BN gamma starting at 1.
    assert cfg.network.zero_init_residual is False
    assert (cfg.network.projector_hidden_dim, cfg.network.projection_dim) == (4096, 256)
    assert cfg.network.predictor_hidden_dim == 4096
    assert (cfg.network.batchnorm_momentum, cfg.network.batchnorm_epsilon) == (0.9, 1e-5)
    assert cfg.network.sync_batchnorm
    assert cfg.data.batch_size == 4096
    opt = cfg.optimizer
    assert (opt.name, opt.momentum, opt.trust_coefficient) == ("lars", 0.9, 1e-3)
    # 1000-epoch column of the paper's budget table.
    assert (cfg.train.epochs, opt.base_learning_rate, opt.weight_decay, cfg.train.tau_base) == (
        1000, 0.2, 1.5e-6, 0.996,
    )
    assert opt.warmup_epochs == 10
    assert cfg.augment.image_size == 224
    common = dict(
        crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), flip_prob=0.5, color_jitter_prob=0.8,
        brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2,
        blur_sigma=(0.1, 2.0), solarize_threshold=0.5,
    )
    assert cfg.augment.view1 == config.ViewConfig(**common, blur_prob=1.0, solarize_prob=0.0)
    assert cfg.augment.view2 == config.ViewConfig(**common, blur_prob=0.1, solarize_prob=0.2)
    evaluation = cfg.evaluation
    assert (evaluation.protocol, evaluation.linear_epochs, evaluation.linear_flip_prob) == ("imagenet", 80, 0.5)
    assert evaluation.linear_crop_scale == (0.08, 1.0) and 0.2 in evaluation.learning_rate_sweep
    assert round(evaluation.validation_fraction * 1000) == 8  # ~10 of each class's ~1,281 images


@pytest.mark.parametrize("encoder", config.BOTTLENECK_RESNETS)
def test_bottleneck_resnets_take_widths_1_to_4_and_zero_init_residual(encoder):
    for width in (1, 2, 3, 4):
        network = config.from_dict({"network": {"encoder": encoder, "width_multiplier": width}}).network
        assert (network.encoder, network.width_multiplier, network.zero_init_residual) == (encoder, width, False)
    assert config.from_dict({"network": {"encoder": encoder, "zero_init_residual": True}}).network.zero_init_residual


def test_resnet200x2_preset_is_the_resnet50_preset_with_its_encoder():
    resnet50 = config.load(preset("imagenet_resnet50"))
    resnet200 = config.load(preset("imagenet_resnet200x2"))
    assert (resnet200.network.encoder, resnet200.network.width_multiplier) == ("resnet200", 2)
    assert resnet200.train.run_dir == "runs/imagenet_resnet200x2"
    same_otherwise = dataclasses.replace(
        resnet200,
        network=dataclasses.replace(resnet200.network, encoder="resnet50", width_multiplier=1),
        train=dataclasses.replace(resnet200.train, run_dir=resnet50.train.run_dir),
    )
    assert same_otherwise == resnet50


def test_defaults_are_the_papers_two_views():
    cfg = config.from_dict({})
    assert (cfg.augment.view1.blur_prob, cfg.augment.view1.solarize_prob) == (1.0, 0.0)
    assert (cfg.augment.view2.blur_prob, cfg.augment.view2.solarize_prob) == (0.1, 0.2)


def test_partial_view_section_keeps_that_views_defaults():
    cfg = config.from_dict({"augment": {"view2": {"flip_prob": 0.0}}})
    assert cfg.augment.view2.flip_prob == 0.0
    assert cfg.augment.view2.solarize_prob == 0.2  # view2's own default, not view1's


def test_overrides_parse_yaml_values():
    cfg = config.load(preset("smoke"), ["train.epochs=3", "augment.view1.crop_scale=[0.5, 1.0]", "data.cache=false"])
    assert cfg.train.epochs == 3
    assert cfg.augment.view1.crop_scale == (0.5, 1.0)
    assert cfg.data.cache is False


def test_evaluation_protocol_defaults_to_transfer_and_imagenet_has_its_fields():
    default = config.from_dict({}).evaluation
    assert default.protocol == "transfer" and default.standardize
    assert (default.linear_crop_scale, default.linear_crop_ratio, default.linear_flip_prob) == ((0.08, 1.0), (0.75, 4 / 3), 0.5)
    imagenet = config.from_dict({"evaluation": {"protocol": "imagenet", "learning_rate_sweep": [0.3, 0.1]}}).evaluation
    assert imagenet.protocol == "imagenet" and imagenet.learning_rate_sweep == (0.3, 0.1)


def test_configs_are_frozen():
    cfg = config.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"data": {"bogus": 1}}, r"^data\.bogus: unknown key"),
        ({"nonsense": {}}, r"^nonsense: unknown key"),
        ({"data": {"batch_size": -8}}, r"^data\.batch_size: -8 is outside the allowed range"),
        ({"data": {"batch_size": 2.5}}, r"^data\.batch_size: expected an integer"),
        ({"train": {"tau_base": 1.0}}, r"^train\.tau_base: 1\.0 is outside the allowed range \(0\.0, 1\.0\)"),
        ({"train": {"tau_base": 0}}, r"^train\.tau_base"),
        ({"augment": {"view1": {"crop_scale": [0.9, 0.2]}}}, r"^augment\.view1\.crop_scale: min 0\.9 is greater than max 0\.2"),
        ({"augment": {"view2": {"solarize_prob": 1.5}}}, r"^augment\.view2\.solarize_prob"),
        ({"data": {"service_address": "localhost:5000"}}, r"^data\.service_address: expected 'grpc://host:port', got 'localhost:5000'$"),
        ({"augment": {"placement": "gpu"}}, r"^augment\.placement: 'gpu' is not one of 'auto', 'host', 'device'$"),
        (
            {"data": {"service_address": "grpc://dispatcher:5000"}, "train": {"deterministic": True}},
            r"^data\.service_address: a tf\.data service input is not reproducible, so it cannot be combined with "
            r"train\.deterministic: true",
        ),
        ({"data": {"source": "folder"}}, r"^data\.path: a path is required"),
        ({"data": {"source": "tfds"}}, r"^data\.name: a TFDS dataset name is required"),
        ({"network": {"encoder": "vgg"}}, r"^network\.encoder: 'vgg' is not one of"),
        (
            {"network": {"encoder": "resnet50", "width_multiplier": 8}},
            r"^network\.width_multiplier: 8 is not one of 1, 2, 3, 4 for encoder 'resnet50'$",
        ),
        ({"network": {"encoder": "small_convnet", "width_multiplier": 17}}, r"^network\.width_multiplier: 17 is outside"),
        ({"network": {"zero_init_residual": True}}, r"^network\.zero_init_residual: only the bottleneck ResNets"),
        ({"optimizer": {"base_learning_rate": 0}}, r"^optimizer\.base_learning_rate"),
        ({"train": {"online_probe": "yes"}}, r"^train\.online_probe: expected true or false"),
        ({"train": {"jit_compile": "yes"}}, r"^train\.jit_compile: expected true, false or 'auto', got 'yes'"),
        ({"train": {"jit_compile": 1}}, r"^train\.jit_compile: expected a bool or str, got 1"),
        ({"data": []}, r"^data: expected a mapping"),
        ({"evaluation": {"protocol": "linear"}}, r"^evaluation\.protocol: 'linear' is not one of 'transfer', 'imagenet'"),
        ({"evaluation": {"learning_rate_sweep": []}}, r"^evaluation\.learning_rate_sweep: must hold at least one value"),
        ({"evaluation": {"learning_rate_sweep": [0.1, 0.0]}}, r"^evaluation\.learning_rate_sweep: 0\.0 is outside"),
        ({"evaluation": {"linear_crop_scale": [0.5, 0.1]}}, r"^evaluation\.linear_crop_scale: min 0\.5 is greater"),
        ({"evaluation": {"linear_crop_ratio": [0.0, 1.0]}}, r"^evaluation\.linear_crop_ratio: 0\.0 is outside"),
        ({"evaluation": {"linear_flip_prob": 2}}, r"^evaluation\.linear_flip_prob: 2\.0 is outside"),
        ({"evaluation": {"standardize": "no"}}, r"^evaluation\.standardize: expected true or false"),
        ({"evaluation": {"projector_images": -1}}, r"^evaluation\.projector_images: -1 is outside the allowed range \[0, 10000\]"),
        ({"evaluation": {"validation_folds": 0}}, r"^evaluation\.validation_folds: 0 is outside the allowed range \[1, 20\]"),
        ({"evaluation": {"validation_folds": 2.5}}, r"^evaluation\.validation_folds"),
        ({"evaluation": {"projector_images": 10_001}}, r"^evaluation\.projector_images: 10001 is outside"),
        ({"evaluation": {"finetune_label_fractions": []}}, r"^evaluation\.finetune_label_fractions: must hold at least"),
        (
            {"evaluation": {"finetune_label_fractions": [0.1, 1.5]}},
            r"^evaluation\.finetune_label_fractions: 1\.5 is outside the allowed range \(0\.0, 1\.0\]$",
        ),
        ({"evaluation": {"finetune_label_fractions": [0.0]}}, r"^evaluation\.finetune_label_fractions: 0\.0 is outside"),
        ({"evaluation": {"finetune_label_fractions": [0.1, 0.1]}}, r"^evaluation\.finetune_label_fractions: repeats 0\.1$"),
        ({"evaluation": {"finetune_learning_rates": [0.1, -1]}}, r"^evaluation\.finetune_learning_rates: -1\.0 is outside"),
        ({"evaluation": {"finetune_epochs": 0}}, r"^evaluation\.finetune_epochs: 0 is outside the allowed range"),
        ({"evaluation": {"finetune_batch_size": 0}}, r"^evaluation\.finetune_batch_size: 0 is outside"),
        ({"evaluation": {"finetune_in_pipeline": "yes"}}, r"^evaluation\.finetune_in_pipeline: expected true or false"),
        ({"data": {"max_bad_fraction": 1.5}}, r"^data\.max_bad_fraction: 1\.5 is outside the allowed range \[0\.0, 1\.0\]"),
        ({"data": {"max_image_side": 4}}, r"^data\.max_image_side: 4 is outside"),
        ({"data": {"image_key": "image/encoded"}}, r"^data\.image_key: is only read by source 'tfrecord', not 'mnist5k'"),
        ({"data": {"source": "tfrecord", "path": "x", "label_key": ""}}, r"^data\.label_key: must not be empty"),
        ({"vertex_training": {"machine_type": "N1 standard"}}, r"^vertex_training\.machine_type: 'N1 standard' is not"),
        ({"vertex_training": {"replica_count": 0}}, r"^vertex_training\.replica_count: 0 is outside"),
    ],
)
def test_bad_configs_name_the_field(raw, match):
    with pytest.raises(config.ConfigError, match=match):
        config.from_dict(raw)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_jit_compile_takes_true_false_or_auto(value, tmp_path):
    assert config.from_dict({}).train.jit_compile == "auto"
    loaded = config.from_dict({"train": {"jit_compile": value}})
    assert loaded.train.jit_compile == value
    # It survives the YAML round trip that run directories rely on.
    path = tmp_path / "config.yaml"
    config.save(loaded, str(path))
    assert config.load(str(path)).train.jit_compile == value


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        config.load(str(bad))
    with pytest.raises(ValueError, match="must look like section.field=value"):
        config.load(preset("smoke"), ["train.epochs"])


def test_cli_reports_a_bad_config_in_one_line():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "byol_tf.cli", "train", "--config", preset("smoke"), "--set", "data.batch_size=-1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1] == "byol-tf train: error: data.batch_size: -1 is outside the allowed range [1, 1000000]"


@pytest.mark.parametrize(
    "data",
    [
        {"source": "folder", "path": "gs://bucket/images"},
        {"source": "folder", "path": "/no/such/folder"},
        {"source": "tfrecord", "path": "hdfs://namenode/data/*.tfrecord"},
    ],
)
def test_paths_are_not_checked_at_load(data):
    # Existence is checked where data is read (with the same one-line error), so a config
    # naming gs:// or a folder of another machine loads here.
    assert config.from_dict({"data": data}).data.path == data["path"]


def test_json_round_trip_is_canonical():
    cfg = config.load(os.path.join(ROOT, "configs", "mnist5k.yaml"))
    text = config.to_json(cfg)
    assert config.from_json(text) == cfg
    assert text == config.to_json(config.from_dict(config.to_dict(cfg)))  # stable: a cache key
    assert ": " not in text and text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    with pytest.raises(config.ConfigError, match="^config: not a JSON config"):
        config.from_json("{not json")
    # A part of the config: only those sections, the others back to their defaults.
    data_only = config.from_json(config.to_json(cfg, sections=("data",)))
    assert data_only.data == cfg.data and data_only.train == config.TrainConfig()
    with pytest.raises(config.ConfigError, match="unknown sections"):
        config.to_json(cfg, sections=("data", "dat"))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "trian: unknown key, did you mean 'train'? (allowed: data, augment, network,"),
        ({"train": {"epoch": 3}}, "train.epoch: unknown key, did you mean 'epochs'? (allowed: epochs, steps_per"),
        (
            {"augment": {"view1": {"flip_prop": 0.1}}},
            "augment.view1.flip_prop: unknown key, did you mean 'flip_prob'? (allowed: crop_scale,",
        ),
        ({"data": {"zzz": 1}}, "data.zzz: unknown key (allowed: source, name, path,"),
    ],
)
def test_unknown_keys_suggest_the_closest_field_at_every_level(raw, message):
    with pytest.raises(config.ConfigError) as error:
        config.from_dict(raw)
    assert str(error.value).startswith(message)


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_yaml_1_2_floats_are_numbers(tmp_path):
    # PyYAML reads YAML 1.1, where `1e-6` (no point, unsigned exponent) is a string.
    path = write(
        tmp_path, "optimizer:\n  weight_decay: 1e-6\n  base_learning_rate: 3E+1\nevaluation:\n  l2_sweep: [0, 1e-4]\n"
    )
    cfg = config.load(path, ["optimizer.momentum=.5", "augment.view1.crop_scale=[8e-2, 1]"])
    assert (cfg.optimizer.weight_decay, cfg.optimizer.base_learning_rate, cfg.optimizer.momentum) == (1e-6, 30.0, 0.5)
    assert type(cfg.optimizer.weight_decay) is float and cfg.evaluation.l2_sweep == (0.0, 1e-4)
    assert cfg.augment.view1.crop_scale == (0.08, 1.0)
    # What `byol-tf eval --label-fraction 0.00001` writes (Python's repr of a list of floats).
    fractions = config.load(path, [f"evaluation.finetune_label_fractions={[1e-05, 0.1]}"]).evaluation
    assert fractions.finetune_label_fractions == (1e-05, 0.1)
    for text in ("1e", "e-3", "1e-3x", "nan", "1_0"):
        with pytest.raises(config.ConfigError, match=rf"^optimizer\.weight_decay: expected a number, got '{text}'$"):
            config.from_dict({"optimizer": {"weight_decay": text}})


@pytest.mark.parametrize(
    "line, message",
    [
        ("check_cache_dir: yes", "data.check_cache_dir: expected a string, got True: put the value in quotes "
         "(unquoted, YAML reads yes, no, on and off as booleans)"),
        ("image_key: off", "data.image_key: expected a string, got False: put the value in quotes "
         "(unquoted, YAML reads yes, no, on and off as booleans)"),
        ("train_split: 2024-01-01", "data.train_split: expected a string, got datetime.date(2024, 1, 1): "
         "put the value in quotes"),
        ("train_split: 123", "data.train_split: expected a string, got 123: put the value in quotes"),
    ],
)
def test_a_string_field_read_as_another_yaml_type_says_to_quote_it(tmp_path, line, message):
    path = write(tmp_path, f"data:\n  source: tfrecord\n  path: x\n  {line}\n")
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value) == message
    key, value = line.split(": ")
    quoted = write(tmp_path, f"data:\n  source: tfrecord\n  path: x\n  {key}: '{value}'\n", name="quoted.yaml")
    assert getattr(config.load(quoted).data, key) == value


def test_an_empty_section_keeps_its_defaults(tmp_path):
    path = write(tmp_path, "train:\n  # epochs: 3\naugment:\n  view2:\n")
    cfg = config.load(path)
    assert cfg.train == config.TrainConfig() and cfg.augment.view2 == config.AugmentConfig().view2
    assert config.load(path, ["train.epochs=3"]).train.epochs == 3


def test_file_problems_are_one_line_naming_the_file(tmp_path):
    cases = {
        "train:\n  epochs: 3\n  epochs: 4\n": "is not valid YAML: line 3, column 3: key 'epochs' appears twice in one "
        "mapping",
        "train:\n\tepochs: 3\n": "is not valid YAML: line 2, column 1: found character '\\t' that cannot start any "
        "token",
        b"train:\n  run_dir: \xff\n": "is not UTF-8 text (byte 0xff at offset 18)",
        "- train\n- data\n": "must hold a mapping of sections, not a list",
    }
    for text, message in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(config.ConfigError) as error:
            config.load(path)
        assert str(error.value) == f"config file {path!r} {message}"
    with pytest.raises(config.ConfigError, match=rf"^config file '{tmp_path}' is a folder, not a YAML file$"):
        config.load(str(tmp_path))
    # The same key in two different sections is fine.
    assert config.load(write(tmp_path, "data:\n  seed: 1\ntrain:\n  seed: 2\n")).train.seed == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("evaluation.l2_sweep=[0.1", "evaluation.l2_sweep: '[0.1' is not a YAML value (line 1, column 5: "
         "expected ',' or ']', but got '<stream end>')"),
        ("train..epochs=3", "override 'train..epochs=3' must look like section.field=value"),
        (" =3", "override ' =3' must look like section.field=value"),
        ("train.epochs.x=3", "train.epochs.x: 'epochs' is not a section"),
    ],
)
def test_bad_overrides_are_config_errors(override, message):
    with pytest.raises(config.ConfigError) as error:
        config.load(preset("smoke"), ["train.epochs=2", override])
    assert str(error.value) == message


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"data": {"batch_size": 32}, "train": {"gradient_accumulation_steps": 5}},
            "train.gradient_accumulation_steps: 5 does not divide data.batch_size 32 into equal micro-batches",
        ),
        (
            {"data": {"source": "mnist5k", "eval_split": "test"}},
            "data.eval_split: source 'mnist5k' has no named splits; set data.holdout_examples instead",
        ),
        (
            {"data": {"num_parallel_calls": 0}},
            "data.num_parallel_calls: 0 is outside the allowed range [1, 1024] (or -1: tf.data.AUTOTUNE)",
        ),
    ],
)
def test_settings_inconsistent_together_fail_at_load(raw, message):
    with pytest.raises(config.ConfigError) as error:
        config.from_dict(raw)
    assert str(error.value) == message
    assert config.from_dict({"data": {"batch_size": 32}, "train": {"gradient_accumulation_steps": 4}})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["embed", "--model", "m", "--config", "c", "--out", "o", "--batch-size", "0"],
         "byol-tf embed: error: argument --batch-size: expected a positive integer, got 0"),
        (["embed", "--model", "m", "--config", "c", "--out", "o", "--part-rows", "many"],
         "byol-tf embed: error: argument --part-rows: expected a positive integer, got 'many'"),
        (["neighbours", "--embeddings", "e", "--query", "q", "--out", "o", "-k", "-1"],
         "byol-tf neighbours: error: argument -k: expected a positive integer, got -1"),
    ],
)
def test_cli_count_flags_must_be_positive(argv, message, capsys):
    from byol_tf import cli

    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


def test_every_help_works_without_importing_tensorflow():
    script = """
import sys
from byol_tf import cli
from byol_tfx.pipeline import cli as pipeline_cli
for parser, commands in ((cli.build_parser(), ["", "train", "eval", "export", "embed", "neighbours"]),
                         (pipeline_cli.build_parser(), ["", "run", "compile"])):
    for command in commands:
        try:
            parser.parse_args([command, "--help"] if command else ["--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, command
print("tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "which split of the config's data (default test)" in " ".join(out.stdout.split())
    assert out.stdout.splitlines()[-1] == "False"
