"""Quiet by default: byol-tf's own progress and results shown, TensorFlow's start-up chatter not.

Library modules log through `logging.getLogger(__name__)` (all under the `byol_tf` logger;
the TFX components under `byol_tfx`, configured alike).
Entry points (`byol-tf`, `byol-tf-pipeline`) call `prepare_environment` before TensorFlow is
imported and `configure` after parsing their flags; `--verbose` shows everything TensorFlow,
absl and TFX print.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "byol_tf"
LOGGER_NAMES = (LOGGER_NAME, "byol_tfx")


def prepare_environment(verbose: bool = False) -> None:
    """Environment variables TensorFlow reads when it starts: call before importing it.

    Also pins Keras 3 for child processes (importing `tfx.v1` would set
    `TF_USE_LEGACY_KERAS=1` for them: Beam workers would get Keras 2).
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "0"
    if not verbose:
        # 3 hides the C++ INFO/WARNING/ERROR start-up lines (CUDA probing on a CPU host,
        # oneDNN and CPU-feature notices); real failures still raise Python exceptions.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _StandardStream(logging.StreamHandler):
    """Writes to whatever `sys.stdout` / `sys.stderr` is at the time (tests and notebooks
    replace them), not to the stream that existed when the handler was made."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value):
        del value


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure(verbose: bool = False) -> None:
    """Shows byol-tf's progress on stdout (with Keras' progress bars) and its warnings on
    stderr; silences TensorFlow, absl and TFX unless `verbose`."""
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        if not any(getattr(handler, "_byol_tf", False) for handler in logger.handlers):
            progress = _StandardStream("stdout")
            progress.addFilter(_Below(logging.WARNING))
            problems = _StandardStream("stderr")
            problems.setLevel(logging.WARNING)
            for handler, prefix in ((progress, "byol-tf: "), (problems, "byol-tf: %(levelname)s: ")):
                handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
                handler._byol_tf = True  # noqa: SLF001 -- marks our handlers so configure() is idempotent
                logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False  # absl's root handler would print each line a second time
    if verbose:
        return
    warnings.filterwarnings("ignore")
    for name in ("tensorflow", "absl", "apache_beam", "tfx", "ml_metadata", "keras", "h5py", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
        # Without parsed absl flags, absl prints a one-time notice to stderr: skip it.
        absl_logging._warn_preinit_stderr = False  # noqa: SLF001
    except ImportError:
        pass
