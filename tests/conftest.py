"""Test set-up: 8 simulated CPU devices, before any JAX backend starts."""

import os
import pathlib

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def fsq_golden():
  """Outputs of the official GroupFSQ (see tests/golden/README.md)."""
  return dict(np.load(GOLDEN / "fsq.npz"))


os.environ.setdefault("MPLBACKEND", "Agg")
