"""A tiny `byol_tf.training.train` run, started as a subprocess by the distribution and fault tests.

    python tests/training_run.py --run-dir DIR --out WEIGHTS.npz [--epochs 2 --steps-per-epoch 5]
        [--every 2] [--poison-step K] [--kill-during-save N] [--kill-during-delete] [--strategy multi_worker]
        [--sharding global_batch] [--optimizer sgd]

Real data path (embedded MNIST digits through `byol_tf.data`), deterministic ops, a small
convnet. Prints `STEP n` (flushed) after each global step, so a parent can kill it at a chosen
step, and writes the final online and target weights to --out (worker i of a multi-worker run
writes OUT with `.worker-i` before the suffix). Exit status 3: NonFiniteTrainingError.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from byol_tf import checkpointing, config as config_lib, data, distribute, logs, training  # noqa: E402


def tiny_config(args) -> config_lib.Config:
    return config_lib.from_dict(
        {
            "data": {"source": "mnist5k", "max_examples": 96, "holdout_examples": 16, "batch_size": 16,
                     "shuffle_buffer": 64, "num_parallel_calls": 2},
            "augment": {"image_size": 16},
            "network": {"encoder": "small_convnet", "projector_hidden_dim": 16, "projection_dim": 8,
                        "predictor_hidden_dim": 16, "sync_batchnorm": True},
            "optimizer": {"name": args.optimizer, "base_learning_rate": 2.0, "warmup_epochs": 0.5},
            "train": {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "log_images": 0,
                      "verbose": 0, "deterministic": True, "checkpoint_every_steps": args.every,
                      "keep_checkpoints": 2, "tau_base": 0.9},
            "distribute": {"strategy": args.strategy, "dataset_sharding": args.sharding, "num_cpu_devices": args.cpus},
            "evaluation": {"knn_every_epochs": 0},
        }
    )


class PrintSteps(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        # The backup (last in the list) has run for this step when the next one begins.
        print(f"LOSS {float(np.asarray(logs['loss']).reshape(-1)[0])}", flush=True)

    def on_train_batch_begin(self, batch, logs=None):
        print("STEP", flush=True)


def kill_during_save(count: int):
    """SIGKILLs this process inside its `count`-th backup: files half written, index not updated."""
    record_state = tf.train.CheckpointManager._record_state
    calls = []

    def record_then_maybe_die(manager):
        calls.append(manager.latest_checkpoint)
        if len(calls) == count:
            data_file = manager.latest_checkpoint + ".data-00000-of-00001"
            with open(data_file, "r+b") as stream:
                stream.truncate(os.path.getsize(data_file) // 2)
            print("KILLED DURING SAVE", manager.latest_checkpoint, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return record_state(manager)

    tf.train.CheckpointManager._record_state = record_then_maybe_die


def kill_during_delete():
    """SIGKILLs this process while it removes its finished backup: after the index is gone,
    with the checkpoint files half deleted."""
    remove = tf.io.gfile.remove

    def remove_then_die(path):
        remove(path)
        if os.path.basename(path) == "checkpoint":
            print("KILLED DURING DELETE", path, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    tf.io.gfile.remove = remove_then_die


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=5)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--poison-step", type=int, default=0, help="global step (from 1) whose batch is NaN")
    parser.add_argument("--kill-during-save", type=int, default=0)
    parser.add_argument("--kill-during-delete", action="store_true")
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--sharding", default="per_worker")
    parser.add_argument("--optimizer", default="lars")
    parser.add_argument("--cpus", type=int, default=0, help="logical CPU devices for --strategy mirrored")
    args = parser.parse_args()
    logs.configure()  # byol-tf's own lines (e.g. "resumed from backup at step N of M"), as the CLI shows them
    config = tiny_config(args)
    strategy = distribute.strategy_from_config(config.distribute)
    if args.kill_during_save:
        kill_during_save(args.kill_during_save)
    if args.kill_during_delete:
        kill_during_delete()

    def dataset_fn(context):
        batches = data.make_pretraining_dataset(config, batch_size=config.data.batch_size, input_context=context)
        if not args.poison_step:
            return batches

        def poison(index, batch):
            bad = tf.equal(index, args.poison_step - 1)
            return {**batch, "view1": tf.where(bad, tf.fill(tf.shape(batch["view1"]), np.nan), batch["view1"])}

        return batches.enumerate().map(poison)

    try:
        result = training.train(
            config, run_dir=args.run_dir, dataset=dataset_fn, num_examples=80, strategy=strategy,
            extra_callbacks=[PrintSteps()],
        )
    except checkpointing.NonFiniteTrainingError as error:
        print("NONFINITE", error, flush=True)
        sys.exit(3)
    model = result.model
    is_chief, task = distribute.worker_role(strategy)
    out = args.out if args.strategy != "multi_worker" else args.out.replace(".npz", f".worker-{task}.npz")
    weights = {f"online{i}": v.numpy() for i, v in enumerate(model.online_weights)}
    weights.update({f"target{i}": v.numpy() for i, v in enumerate(model.target_weights)})
    weights["iterations"] = np.asarray(model.optimizer.iterations.numpy())
    np.savez(out, **weights)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
