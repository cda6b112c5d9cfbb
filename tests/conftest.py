"""Shared pytest fixtures. Helper builders live in tests/fixtures/ (images, tiny models)."""

import os
import tempfile

import numpy as np
import pytest

# tfx.v1 sets TF_USE_LEGACY_KERAS=1 for child processes when imported; the tests, like the
# entry points, use Keras 3 everywhere.
os.environ["TF_USE_LEGACY_KERAS"] = "0"
# The data check pass caches its outcome (byol_tf.checks): in a folder of this session,
# never in the user's ~/.cache.
os.environ["BYOL_TF_CACHE_DIR"] = tempfile.mkdtemp(prefix="byol-tf-test-cache-")

# The tests' tolerances are float32 arithmetic's: `distribute.precision: auto` stays float32
# here (and in the commands the tests start) even on CPUs with bfloat16 units, where users
# get mixed_bfloat16. bfloat16 itself is tested with explicit policies (test_distribute).
os.environ["BYOL_TF_CPU_BFLOAT16"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rng():
    """A seeded numpy generator: every random input of a test replays."""
    return np.random.default_rng(0)


@pytest.fixture
def repo_root():
    return ROOT
