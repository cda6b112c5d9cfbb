"""Smoke tests of benchmarks/: each script's --smoke run gives well-formed, sane JSON lines.

No timing is asserted (timings depend on the machine and its load); what is checked is the
structure of the records, that the numbers are positive and consistent, and that the
benchmarks build what training builds.
"""

import json
import math
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from benchmarks import common, peer, presets, report

ROOT = presets.ROOT
FIELDS = ("benchmark", "config", "value", "unit", "median_s", "n", "command", "load_avg_1m", "time")


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _check_record(entry, benchmark, unit=None):
    for field in FIELDS:
        assert field in entry, f"{benchmark} record lacks {field!r}: {entry}"
    assert entry["benchmark"] == benchmark
    if unit:
        assert entry["unit"] == unit
    assert isinstance(entry["config"], dict)
    assert entry["value"] is not None and math.isfinite(entry["value"]) and entry["value"] > 0
    assert entry["n"] >= 1


def _run_main(module, argv, capsys, tmp_path):
    """Runs a benchmark's main() in this process; returns its stdout records and --out records."""
    out = tmp_path / "results.jsonl"
    module.main([*argv, "--smoke", "--out", str(out)])
    printed = _lines(capsys.readouterr().out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written, "--out must hold exactly the printed lines"
    return printed


# ------------------------------------------------------------------------------- step


def test_step_smoke_reports_full_step_and_parts(capsys, tmp_path):
    from benchmarks import step

    records = _run_main(step, ["--encoder", "small_convnet"], capsys, tmp_path)
    assert [r["benchmark"] for r in records] == ["step", "step_vs_parts"]
    full, ratio = records
    _check_record(full, "step", "images/s")
    _check_record(ratio, "step_vs_parts", "ratio")
    assert full["config"]["smoke"] is True and full["config"]["encoder"] == "small_convnet"
    assert len(full["step_times_s"]) == full["n"] == 2
    assert full["value"] == pytest.approx(full["config"]["batch"] / full["median_s"], rel=1e-3)
    parts = ratio["parts_s"]
    assert set(parts) == {"online_fwd_bwd_x2", "target_fwd_x2", "optimizer_apply", "ema_update"}
    assert all(value > 0 for value in parts.values())
    assert ratio["sum_parts_s"] == pytest.approx(sum(parts.values()), rel=1e-3)
    assert ratio["value"] == pytest.approx(ratio["median_s"] / ratio["sum_parts_s"], rel=1e-3)
    assert ratio["target"] == 1.1


def test_step_no_parts_prints_only_the_step(capsys, tmp_path):
    from benchmarks import step

    records = _run_main(step, ["--encoder", "small_convnet", "--no-parts", "--jit", "on"], capsys, tmp_path)
    assert [r["benchmark"] for r in records] == ["step"]
    assert records[0]["config"]["jit_compile"] is True


# ------------------------------------------------------------------------- scaling


def test_scaling_smoke_covers_both_sweeps(capsys, tmp_path):
    from benchmarks import scaling

    records = _run_main(scaling, ["--encoder", "small_convnet"], capsys, tmp_path)
    for entry in records:
        _check_record(entry, "scaling", "s/step")
        assert entry["images_per_s"] == pytest.approx(entry["config"]["batch"] / entry["value"], rel=1e-3)
    sweeps = {(r["config"]["sweep"], r["config"]["batch"], r["config"]["size"]) for r in records}
    assert sweeps == {("batch", 4, 16), ("batch", 8, 16), ("size", 4, 12), ("size", 4, 16)}


# ------------------------------------------------------------------- input pipeline


def test_input_pipeline_smoke_mnist5k(capsys, tmp_path):
    from benchmarks import input_pipeline

    records = _run_main(
        input_pipeline, ["--source", "mnist5k", "--encoder", "small_convnet", "--size", "28"], capsys, tmp_path
    )
    pipeline, bound = records
    _check_record(pipeline, "input_pipeline", "images/s")
    _check_record(bound, "input_bound")
    assert pipeline["config"]["source"] == "mnist5k" and pipeline["config"]["size"] == 28
    assert bound["pipeline_images_per_s"] == pipeline["value"]
    assert bound["consumption_images_per_s"] == pytest.approx(8 / bound["cached_median_s"], rel=1e-3)
    assert bound["headroom"] == pytest.approx(pipeline["value"] / bound["consumption_images_per_s"], rel=1e-3)
    assert len(bound["cached_times_s"]) == len(bound["live_times_s"]) == bound["n"]


def test_input_pipeline_synthetic_views_have_the_view_size():
    from benchmarks import input_pipeline

    config = presets.load_config("resnet18_cifar", 4, 16, list(presets.SMOKE_OVERRIDES))
    dataset = input_pipeline.make_dataset(config, "synthetic", 24, 16)
    batch = next(iter(dataset))
    assert batch["view1"].shape == (4, 16, 16, 3) and batch["view2"].shape == (4, 16, 16, 3)
    assert float(tf.reduce_min(batch["view1"])) >= 0.0 and float(tf.reduce_max(batch["view1"])) <= 1.0


def test_augment_op_variants_enable_exactly_one_op():
    from benchmarks import input_pipeline
    from byol_tf.config import ViewConfig

    view = ViewConfig(hue=0.0, saturation=0.0, flip_prob=0.0)  # as the digits preset
    variants = input_pipeline.op_variants(view)
    assert variants["full_view"] == view
    crop = variants["crop"]
    assert (crop.flip_prob, crop.color_jitter_prob, crop.grayscale_prob, crop.blur_prob, crop.solarize_prob) == (0,) * 5
    assert variants["blur"].blur_prob == 1.0 and variants["blur"].solarize_prob == 0.0
    hue = variants["jitter_hue"]
    # A magnitude the preset turns off is timed at the paper's value rather than as a no-op.
    assert hue.color_jitter_prob == 1.0 and hue.hue == ViewConfig().hue
    assert hue.brightness == hue.contrast == hue.saturation == 0.0


# ------------------------------------------------------------------------- switches


def test_switches_smoke_precision_sync_bn_and_tfdata(capsys, tmp_path):
    from benchmarks import switches

    argv = ["--encoder", "small_convnet", "--switch", "precision", "--switch", "sync_bn", "--switch", "tfdata"]
    records = _run_main(switches, argv, capsys, tmp_path)
    by_switch = {}
    for entry in records:
        assert entry["benchmark"] == "switch"
        by_switch.setdefault(entry["config"]["switch"], {})[entry["config"]["setting"]] = entry
    assert set(by_switch) == {"precision", "sync_bn", "tfdata"}
    assert set(by_switch["precision"]) == {"float32", "mixed_bfloat16"}
    # The baseline is what training builds on one replica: plain BN.
    assert by_switch["sync_bn"]["true"]["config"]["default"] == "false"
    assert set(by_switch["tfdata"]) >= {"autotune", "parallel_1", "autotune_nondeterministic"}
    for settings in by_switch.values():
        for entry in settings.values():
            if entry.get("error"):  # e.g. bfloat16 unsupported on this CPU: reported, not hidden
                assert entry["value"] is None and entry["config"]["setting"] != entry["config"]["default"]
                continue
            _check_record(entry, "switch")
            assert entry["speedup"] > 0
        default = settings[next(iter(settings.values()))["config"]["default"]]
        assert default["speedup"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("switch, settings", [("onednn", {"on", "off"}), ("interop", {"default", "1"})])
def test_switches_smoke_environment_switches_run_fresh_processes(capsys, tmp_path, switch, settings):
    from benchmarks import switches

    records = _run_main(switches, ["--encoder", "small_convnet", "--switch", switch], capsys, tmp_path)
    assert {r["config"]["setting"] for r in records} == settings
    for entry in records:
        _check_record(entry, "switch", "images/s")
        assert entry["config"]["environment"] == switches.ENVIRONMENT_SWITCHES[switch][0]


@pytest.mark.parametrize("jit_compile, default", [("auto", "off"), (True, "on"), (False, "off")])
def test_jit_switch_starts_from_the_library_default_on_this_machine(jit_compile, default):
    """The first setting is the speedups' baseline: 'auto' means no XLA on these CPU runners."""
    from benchmarks import switches

    config = presets.load_config("resnet18_cifar", 4, 16, [f"train.jit_compile={str(jit_compile).lower()}"])
    assert list(switches.settings("jit", config)) == [default, "on" if default == "off" else "off"]


@pytest.mark.parametrize("one_replica_rule, synchronized", [(True, False), (False, True)])
def test_benchmark_model_follows_the_one_replica_batchnorm_rule(one_replica_rule, synchronized):
    """Benchmarks time what training builds: on one replica, plain BN even if the preset asks
    for synchronised BN; the sync_bn switch opts out to measure both."""
    from benchmarks import tfmodel

    config = presets.load_config("small_convnet", 4, 16, [*presets.SMOKE_OVERRIDES, "network.sync_batchnorm=true"])
    model = tfmodel.build(config, jit_compile=False, one_replica_rule=one_replica_rule)
    norms = [
        layer
        for net in (model.online_encoder, model.online_projector, model.predictor)
        for layer in net.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms
    assert {layer.synchronized for layer in norms} == {synchronized}
    assert tfmodel.sync_batchnorm(config) is False


@pytest.mark.slow
def test_gpu_step_script_runs_the_four_settings(tmp_path):
    """benchmarks/gpu_step.sh in smoke mode on CPU: a machine record, then one step record
    per XLA x precision setting, each from its own process."""
    out = tmp_path / "gpu.jsonl"
    environment = {**os.environ, "PYTHON": sys.executable, "GPU_STEP_SMOKE": "1"}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_step.sh", str(out)], cwd=ROOT, env=environment,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    machine, *steps = _lines(out.read_text())
    _check_record(machine, "machine", "cores")
    assert machine["config"]["gpus"] == []
    for entry in steps:
        _check_record(entry, "step", "images/s")
        assert entry["config"]["accelerator"] == "cpu"
    settings = [(e["config"]["jit_compile"], e["config"]["precision"]) for e in steps]
    assert settings == [(True, "mixed_bfloat16"), (False, "mixed_bfloat16"), (False, "float32"), (True, "float32")]


# ------------------------------------------------------------------------ the peer


needs_torch_venv = pytest.mark.skipif(
    not os.path.exists(peer.TORCH_PYTHON), reason="no benchmarks/.venv-torch (benchmarks/setup_torch_venv.sh)"
)


def _peer_smoke(tmp_path, *flags) -> dict:
    """The one record of `benchmarks.peer --smoke` on the demo net, run as a user would."""
    out = tmp_path / "peer.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peer", "--smoke", *flags, "--encoder", "small_convnet", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = _lines(out.read_text())
    return entry


@pytest.mark.slow
@needs_torch_venv
def test_peer_smoke_alternates_byol_tf_and_lightly(tmp_path):
    entry = _peer_smoke(tmp_path)
    _check_record(entry, "versus_peer", "x lightly")
    assert len(entry["byol_tf_times_s"]) == len(entry["lightly_times_s"]) == 2
    assert entry["value"] == pytest.approx(entry["byol_tf_images_per_s"] / entry["lightly_images_per_s"], rel=1e-3)
    assert entry["lightly"]["library"] == "lightly" and entry["byol_tf"]["library"] == "byol-tf"
    assert entry["config"]["heads"] == [32, 16, 32]
    assert entry["machine"]["instruction_sets"] == common.instruction_sets()  # the CPU it ran on


# oneDNN verbose lines as TensorFlow 2.21 (oneDNN 3.7) and torch 2.14 (oneDNN 3.12) print them.
_TF_FORWARD = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,"
               "src:f32::blocked:acdb::f0 wei:f32:a:blocked:Acdb32a::f0 bia:undef::undef::: "
               "dst:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,"
               "mb128_ic64oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,{ms}\n")
_TORCH_FORWARD = ("onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx2,forward_training,"
                  "src:f32:a:blocked:aBcd8b::f0 wei:f32:a:blocked:ABcd8b8a::f0 bia:undef::undef::: "
                  "dst:f32:a:blocked:aBcd8b::f0,attr-scratchpad:user,alg:convolution_direct,"
                  "mb128_ic64oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,{ms}\n")
_TF_WEIGHTS = ("onednn_verbose,1796676798.5,v1,primitive,exec,cpu,convolution,jit_1x1:avx2,backward_weights,"
               "src:f32::blocked:acdb::f0 wei:f32:a:blocked:ABcd8b8a::f0 bia:undef::undef::: "
               "dst:f32::blocked:acdb::f0,,alg:convolution_direct,"
               "mb128_ic256oc512_ih8oh4kh1sh2dh0ph0_iw8ow4kw1sw2dw0pw0,{ms}\n")
_TORCH_REORDER = ("onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,"
                  "src:f32::blocked:abcd::f0 dst:f32::blocked:aBcd8b::f0,,,128x64x32x32,{ms}\n")


def test_onednn_kernels_sum_exec_lines_by_primitive_propagation_and_problem():
    lines = [
        "onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)\n",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,jit:avx2,forward_training,,,,mb1,0.5\n",
        _TF_FORWARD.format(ms=2.5), _TF_FORWARD.format(ms=1.25),
        _TF_WEIGHTS.format(ms=4.0),  # with a timestamp field (ONEDNN_VERBOSE_TIMESTAMP=1)
        _TF_FORWARD.format(ms="")[:60],  # cut short when the process stopped
        "byol-tf: some library output\n",
    ]
    table = peer.onednn_kernels(lines)
    assert table == {
        ("convolution", "forward_training", "mb128_ic64oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1"): [2, 3.75],
        ("convolution", "backward_weights", "mb128_ic256oc512_ih8oh4kh1sh2dh0ph0_iw8ow4kw1sw2dw0pw0"): [1, 4.0],
    }


def test_kernel_comparison_meets_both_sides_per_problem_and_per_primitive():
    ours = peer.onednn_kernels([_TF_FORWARD.format(ms=3.0), _TF_FORWARD.format(ms=5.0), _TF_WEIGHTS.format(ms=2.0)])
    theirs = peer.onednn_kernels([_TORCH_FORWARD.format(ms=2.0), _TORCH_FORWARD.format(ms=2.0),
                                  _TORCH_REORDER.format(ms=1.0)])
    problems, primitives = peer.kernel_comparison(ours, theirs, steps=2)
    # Different implementations (brg_conv_fwd vs jit) of one problem share a row.
    assert [(row["problem"], row["byol_tf_ms"], row["lightly_ms"], row["byol_tf_calls"], row["lightly_calls"])
            for row in problems] == [
        ("mb128_ic64oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1", 4.0, 2.0, 1.0, 1.0),
        ("mb128_ic256oc512_ih8oh4kh1sh2dh0ph0_iw8ow4kw1sw2dw0pw0", 1.0, 0.0, 0.5, 0.0),
        ("128x64x32x32", 0.0, 0.5, 0.0, 0.5),
    ]
    assert [(row["primitive"], row["propagation"], row["byol_tf_ms"], row["lightly_ms"]) for row in primitives] == [
        ("convolution", "forward_training", 4.0, 2.0),
        ("convolution", "backward_weights", 1.0, 0.0),
        ("reorder", "undef", 0.0, 0.5),
    ]


@pytest.mark.slow
@needs_torch_venv
def test_peer_kernels_smoke_collects_both_sides_kernels(tmp_path):
    entry = _peer_smoke(tmp_path, "--kernels")
    _check_record(entry, "peer_kernels")
    by_primitive = {(row["primitive"], row["propagation"]): row for row in entry["by_primitive"]}
    for propagation in ("forward_training", "backward_data", "backward_weights"):
        row = by_primitive[("convolution", propagation)]
        assert row["byol_tf_ms"] > 0 and row["lightly_ms"] > 0, row
    # The same BYOL step on both sides: as many forward convolutions per step (online and
    # target, both views), counted from what each library executed.
    assert by_primitive[("convolution", "forward_training")]["byol_tf_calls"] == \
        by_primitive[("convolution", "forward_training")]["lightly_calls"]
    assert entry["byol_tf_onednn_ms"] == pytest.approx(sum(row["byol_tf_ms"] for row in entry["by_primitive"]),
                                                       rel=1e-3)


# ------------------------------------------------------------ quality versus the peer


def test_quality_peer_exports_one_recipe_for_both_sides(tmp_path):
    """The lightly side reads the split, the config and byol-tf's schedules from these files."""
    import numpy as np

    from benchmarks import quality_peer
    from byol_tf import augment, data
    from byol_tf import config as config_lib

    args = quality_peer.parser().parse_args(
        ["--epochs", "4", "--set", "data.max_examples=144", "--set", "data.holdout_examples=40",
         "--set", "data.batch_size=16"]
    )
    args.work_dir = str(tmp_path)
    config = quality_peer.load_config(args)
    assert not config.train.online_probe and config.evaluation.knn_every_epochs == 0
    assert config.train.keep_checkpoints == 0
    arrays = quality_peer.export(config, str(tmp_path))

    settings = json.loads((tmp_path / quality_peer.CONFIG_FILE).read_text())
    assert config_lib.from_dict(settings["config"]) == config
    assert settings["blur_kernel"] == 3  # augment.py: kernel = 28 / 10, made odd
    assert settings["steps_per_epoch"] == arrays["steps_per_epoch"] == 104 // 16

    train_images, train_labels = data.load_arrays(config.data, "train")
    np.testing.assert_array_equal(np.load(tmp_path / quality_peer.PRETRAIN_IMAGES), train_images)
    np.testing.assert_array_equal(arrays["train_labels"], train_labels)
    crops = np.load(tmp_path / quality_peer.CROPS["test"])
    np.testing.assert_array_equal(crops, augment.center_crop_resize(arrays["test_images"], 28).numpy())
    assert crops.shape == (40, 28, 28, 3) and crops.dtype == np.float32

    schedules = np.load(tmp_path / quality_peer.SCHEDULES_FILE)
    learning_rate, tau = schedules["learning_rate"], schedules["tau"]
    total, warmup = 4 * 6, 2 * 6  # the preset's 2 warm-up epochs
    peak = config.optimizer.base_learning_rate * 16 / 256  # base x batch / 256
    assert len(learning_rate) == len(tau) == arrays["total_steps"] == total
    np.testing.assert_allclose(learning_rate[: warmup + 1], peak * np.arange(warmup + 1) / warmup, rtol=1e-6)
    cosine = peak * 0.5 * (1 + np.cos(np.pi * np.arange(total - warmup) / (total - warmup)))
    np.testing.assert_allclose(learning_rate[warmup:], cosine, rtol=1e-5)
    assert tau[0] == pytest.approx(config.train.tau_base) and np.all(np.diff(tau) > 0) and tau[-1] < 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(peer.TORCH_PYTHON), reason="no benchmarks/.venv-torch (benchmarks/setup_torch_venv.sh)"
)
def test_quality_peer_smoke_scores_both_encoders_with_byol_tf(capsys, tmp_path):
    from benchmarks import quality_peer

    records = _run_main(quality_peer, [], capsys, tmp_path)
    assert [r["benchmark"] for r in records] == ["quality_peer", "quality_peer", "quality_peer_gap"]
    sides = {r["config"]["library"]: r for r in records[:2]}
    assert set(sides) == {"byol-tf", "lightly"}
    gap = records[2]
    for entry in records:
        for field in FIELDS:
            assert field in entry
        assert entry["config"]["smoke"] is True and entry["config"]["heads"] == list(common.SMOKE_HEADS)
    # The same work on both sides, and the same protocol scoring it.
    settings = [{k: v for k, v in entry["config"].items() if k != "library"} for entry in sides.values()]
    assert settings[0] == settings[1] == gap["config"]
    for library, entry in sides.items():
        assert entry["unit"] == "% top-1" and 0 <= entry["value"] <= 100
        assert entry["value"] == pytest.approx(100 * entry["top1"], abs=1e-3)
        for score in ("top1", "val_top1", "knn_top1"):
            assert 0 <= entry[score] <= 1
        assert entry["steps"] == entry["config"]["epochs"] * entry["config"]["steps_per_epoch"] == 3
        assert entry["num_test"] == entry["config"]["num_test"] == 40
        assert entry["num_train"] == entry["config"]["num_pretrain"] == 104
        assert entry["feature_dim"] == 256
        assert set(entry["sweep"]) == {"0.0", "0.001"} and entry["val_top1"] == max(entry["sweep"].values())
        assert math.isfinite(entry["final_loss"]) and entry["train_s"] > 0
    assert sides["lightly"]["versions"]["lightly"] and sides["byol-tf"]["versions"]["tensorflow"]
    assert gap["unit"] == "points" and gap["acceptance"] == -0.5
    assert gap["value"] == pytest.approx(sides["byol-tf"]["value"] - sides["lightly"]["value"], abs=1e-3)
    assert gap["met"] == (gap["value"] >= -0.5)


# -------------------------------------------------------------------------- report


def _fake_results(path):
    def line(benchmark, config, value, unit, median_s=0.5, n=10, **extra):
        return json.dumps({"benchmark": benchmark, "config": config, "value": value, "unit": unit,
                           "median_s": median_s, "n": n, "command": f"python -m benchmarks.{benchmark} --x --out /tmp/r.jsonl",
                           "load_avg_1m": 0.5, "time": "2026-11-30T00:00:00+00:00", **extra})

    step_config = {"encoder": "resnet18_cifar", "batch": 128, "size": 32, "jit_compile": True}
    rows = [
        line("machine", {"cpu": "Test CPU", "instruction_sets": ["avx2", "fma"], "threads_per_core": 2, "nproc": 2,
                         "memory_gib": 24, "python": "3.11", "kernel": "6"}, 2,
             "cores", None, 1, versions={"tensorflow": "2.21.0"}, note="fake"),
        line("step", step_config, 256.0, "images/s"),
        line("step_vs_parts", step_config, 1.05, "ratio", parts_s={"online_fwd_bwd_x2": 0.3, "target_fwd_x2": 0.1,
             "optimizer_apply": 0.05, "ema_update": 0.02}, sum_parts_s=0.47, ratio_paired_median=1.04, target=1.1),
        line("versus_peer", {"encoder": "resnet18_cifar", "batch": 128, "size": 32, "heads": [4096, 256, 4096],
             "optimizer": "lars", "jit_compile": True}, 1.4, "x lightly", byol_tf_images_per_s=280.0,
             lightly_images_per_s=200.0, target=1.3, lightly={"lightly": "1.6.0", "torch": "2.14.1"}),
        line("input_pipeline", {"source": "synthetic", "source_size": 32, "size": 32, "batch": 128,
             "num_parallel_calls": -1}, 3000.0, "images/s"),
        line("switch", {"switch": "jit", "setting": "on", "default": "on", "encoder": "small_convnet",
             "batch": 128, "size": 28}, 300.0, "images/s", speedup=1.0),
        line("switch", {"switch": "precision", "setting": "mixed_bfloat16", "default": "float32",
             "encoder": "small_convnet", "batch": 128, "size": 28}, None, "images/s", None, 0,
             error="InvalidArgumentError: no bfloat16 kernel"),
    ]
    for batch, seconds in ((32, 0.1), (64, 0.2)):
        rows.append(line("scaling", {"sweep": "batch", "encoder": "small_convnet", "batch": batch, "size": 28,
                                     "jit_compile": False}, seconds, "s/step", seconds, images_per_s=batch / seconds))
    rows.append(line("scaling", {"sweep": "size", "encoder": "small_convnet", "batch": 128, "size": 16,
                                 "jit_compile": False}, 0.1, "s/step", 0.1, images_per_s=1280.0))
    # A re-run of the same measurement: the later record wins.
    rows.append(line("step", step_config, 300.0, "images/s"))
    path.write_text("\n".join(rows) + "\n")


def test_ingestion_smoke_times_the_beam_ingestion_and_its_memory(capsys, tmp_path):
    from benchmarks import ingestion

    (entry,) = _run_main(ingestion, ["--data-root", str(tmp_path / "images")], capsys, tmp_path)
    _check_record(entry, "ingestion", "images/s")
    assert entry["config"] == {"setting": "beam_1", "images": 24, "sides": [16, 40], "smoke": True}
    assert entry["peak_rss_mib"] > 0 and entry["wall_s"] >= entry["median_s"] > 0
    assert entry["value"] == pytest.approx(24 / entry["median_s"], rel=1e-3)
    folder = ingestion.write_folder(str(tmp_path / "images"), 24, (16, 40))
    files = sorted(name for _, _, names in os.walk(folder) for name in names if name.endswith(".jpg"))
    assert len(files) == 24  # reused, not written again


@pytest.mark.slow
def test_ingestion_compares_with_the_replaced_ingestion_of_a_commit(capsys, tmp_path):
    from benchmarks import ingestion

    commit = "a6913cb"  # the last commit with the single-process ImageExampleGen
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}^{{commit}}"]).returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone")
    records = _run_main(
        ingestion, ["--data-root", str(tmp_path / "images"), "--baseline-commit", commit, "--baseline-image-size", "32"],
        capsys, tmp_path,
    )
    assert [r["config"]["setting"] for r in records if r["benchmark"] == "ingestion"] == ["beam_1", "baseline"]
    (ratio,) = [r for r in records if r["benchmark"] == "ingestion_ratio"]
    _check_record(ratio, "ingestion_ratio", "x")
    rates = {r["config"]["setting"]: r["value"] for r in records if r["benchmark"] == "ingestion"}
    assert ratio["value"] == pytest.approx(rates["beam_1"] / rates["baseline"], rel=1e-3)


_CPUINFO = """processor\t: 0
model name\t: Test Xeon
siblings\t: {siblings}
cpu cores\t: {cores}
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni amx_tile

processor\t: 1
model name\t: Test Xeon
flags\t\t: fpu avx512_bf16
"""


@pytest.mark.parametrize("siblings, cores, expected", [(2, 1, 2), (2, 2, 1), (16, 8, 2)])
def test_machine_facts_name_the_kernel_instruction_sets_and_smt(siblings, cores, expected):
    cpuinfo = _CPUINFO.format(siblings=siblings, cores=cores)
    # The first processor's flags, in the fixed order; flags of no kernel interest are left out.
    assert common.instruction_sets(cpuinfo) == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                                "amx_tile"]
    assert common.threads_per_core(cpuinfo) == expected
    assert common.threads_per_core("processor\t: 0\nflags\t: avx2\n") is None
    assert common.instruction_sets("") == []


def test_report_renders_every_section_and_keeps_hand_written_text(tmp_path):
    results = tmp_path / "2026-11-30.jsonl"
    _fake_results(results)
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(f"# Results\n\nAnalysis before.\n\n{report.BEGIN}\nold tables\n{report.END}\n\nAfter.\n")
    report.main([str(results), "--markdown", str(markdown), "--plot", str(tmp_path / "plot.png")])
    text = markdown.read_text()
    assert "Analysis before." in text and "After." in text and "old tables" not in text
    for heading in ("## Machine and run", "## 1. Full train step", "## 2. byol-tf versus", "## 3. Input pipeline",
                    "## 4. Switches", "## 5. Scaling"):
        assert heading in text
    assert "Test CPU" in text and "python -m benchmarks.step_vs_parts --x" in text
    assert "- Instruction sets: avx2, fma; threads per core: 2" in text
    assert "| resnet18_cifar | 128 | 32 | yes | - | 0.5 | 300 |" in text  # the later step record won
    assert "--out" not in text
    assert "InvalidArgumentError: no bfloat16 kernel" in text
    # Idempotent: a second run replaces the block rather than adding one.
    report.main([str(results), "--markdown", str(markdown), "--plot", str(tmp_path / "plot.png")])
    assert markdown.read_text().count(report.BEGIN) == 1


def test_report_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.jsonl"
    _fake_results(results)
    assert report.plot(report.load([str(results)]), str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_keeps_the_latest_record_per_config_and_environment(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [
        {"benchmark": "versus_peer", "config": {"a": 1}, "value": 1.0, "unit": "x"},
        {"benchmark": "versus_peer", "config": {"a": 1}, "value": 2.0, "unit": "x",
         "environment": {"ONEDNN_MAX_CPU_ISA": "AVX2"}},
        {"benchmark": "versus_peer", "config": {"a": 1}, "value": 3.0, "unit": "x", "environment": {}},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # No environment and an empty one are the same run setting: the later (3.0) replaces 1.0.
    assert [entry["value"] for entry in report.load([str(path)])] == [2.0, 3.0]


def test_report_rejects_a_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"benchmark": "step"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record has no 'config'"):
        report.load([str(path)])


def test_record_rounds_and_appends(tmp_path, capsys):
    out = tmp_path / "sub" / "r.jsonl"
    common.record("x", {"a": 1}, 1.23456789, "u", 0.1, 3, str(out), extra=[0.123456789])
    common.record("x", {"a": 2}, 2.0, "u", 0.1, 3, str(out))
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["value"] == 1.23457 and first["extra"] == [0.123457]
    assert _lines(capsys.readouterr().out) == [json.loads(line) for line in lines]


def test_interleaved_alternates_and_skips_warmup():
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}


# ------------------------------------------------------------------------ keras-cv ops


def test_keras_cv_ops_smoke_compares_both_sides(capsys, tmp_path):
    pytest.importorskip("keras_cv")
    from benchmarks import keras_cv_ops

    (record,) = _run_main(keras_cv_ops, [], capsys, tmp_path)
    _check_record(record, "keras_cv_ops", "ratio")
    assert record["value"] == pytest.approx(record["keras_cv_s"] / record["byol_tf_s"], rel=1e-3)
    assert record["byol_tf_images_per_s"] == pytest.approx(record["config"]["batch"] / record["byol_tf_s"], rel=1e-3)


# ------------------------------------------------------------------ input speed (issue 14)


def test_input_speed_host_smoke_alternates_the_three_settings(capsys, tmp_path):
    from benchmarks import input_speed

    records = _run_main(input_speed, ["host"], capsys, tmp_path)
    assert [entry["config"]["setting"] for entry in records] == list(input_speed.SETTINGS)
    for entry in records:
        _check_record(entry, "input_host", "images/s per core")
        assert entry["config"]["smoke"] is True and isinstance(entry["config"]["cpu_flags"], list)
        assert math.isclose(entry["value"] * entry["config"]["cores"], entry["images_per_s"], rel_tol=1e-4)
    assert records[0]["versus_decode_full_host"] == 1.0


def test_input_speed_fit_smoke_reports_live_and_cached(capsys, tmp_path):
    from benchmarks import input_speed

    (entry,) = _run_main(input_speed, ["fit", "--setting", "decode_crop_device"], capsys, tmp_path)
    _check_record(entry, "input_fit", "images/s")
    assert entry["cached_images_per_s"] > 0 and entry["live_over_cached"] > 0


def test_device_end_to_end_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "e2e.jsonl"
    result = subprocess.run(
        [sys.executable, "benchmarks/device/end_to_end.py", "--smoke", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    machine, entry = _lines(out.read_text())
    _check_record(machine, "machine", "cores")
    _check_record(entry, "end_to_end", "images/s")
    assert entry["config"]["placement"] == "device" and entry["config"]["accelerator"] == "cpu"
    assert entry["step_only_images_per_s"] > 0
    assert math.isclose(entry["end_to_end_over_step_only"], entry["value"] / entry["step_only_images_per_s"], rel_tol=1e-3)
