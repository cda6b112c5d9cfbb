"""Quiet by default: byol-tf's own progress and results shown, TensorFlow's start-up chatter not.

Library modules log through `logging.getLogger(__name__)` (all under the `byol_tf` logger;
the TFX components under `byol_tfx`, configured alike).
Entry points (`byol-tf`, `byol-tf-pipeline`) call `prepare_environment` before TensorFlow is
imported and `configure` after parsing their flags; `--verbose` shows everything TensorFlow,
absl and TFX print.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings

LOGGER_NAME = "byol_tf"
LOGGER_NAMES = (LOGGER_NAME, "byol_tfx")


def prepare_environment(verbose: bool = False, modules: tuple[str, ...] = ("tensorflow",)) -> None:
    """Sets what TensorFlow reads when it starts, then imports `modules` quietly.

    Call before anything imports TensorFlow. Pins Keras 3 for child processes (importing
    `tfx.v1` would set `TF_USE_LEGACY_KERAS=1` for them: Beam workers would get Keras 2).
    Unless `verbose`, the native start-up lines of TensorFlow (and of the other `modules`,
    e.g. TFX, whose libraries load TensorFlow's runtime again) are hidden: the oneDNN and
    CPU-feature notices and CUDA probing on a host without GPUs are printed by absl's C++
    logging before anything can configure it, whatever TF_CPP_MIN_LOG_LEVEL says. Only the
    imports are silenced; errors afterwards print as usual.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "0"
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_silenced():
        for module in modules:
            importlib.import_module(module)
        if "tensorflow" in modules:
            # The first device query probes CUDA: do it now, silenced.
            sys.modules["tensorflow"].config.list_physical_devices("GPU")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Points file descriptor 2 at /dev/null (native code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # no real stderr (notebooks)
        yield
        return
    saved = os.dup(descriptor)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
        yield
    finally:
        os.dup2(saved, descriptor)
        os.close(saved)
        os.close(null)


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
