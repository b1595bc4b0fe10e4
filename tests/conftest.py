import os
import shutil
import subprocess
import sys
import tempfile

# Compilation dominates the tiny models of the tests. These settings go through
# the environment so that the train.py / sample.py subprocesses inherit them:
# XLA's quick mode, its CPU backend's older kernel emitters (they compile the
# tests' programs 1.5-2x faster: tests/test_networks.py ran in 129 s instead of
# 182 s, 2 cores, JAX 0.10.2), and one compilation cache for the whole session,
# so the dozens of subprocesses that run the smoke config compile each program
# once. Tests that set XLA_FLAGS for a subprocess append to os.environ's.
_FAST_CODEGEN = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
  """XLA aborts the process on a flag it does not know (a newer jaxlib may drop this one): ask a child first."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
                         env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"), timeout=300)
  return probe.returncode == 0


os.environ.setdefault("XLA_FLAGS", "")
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _xla_accepts(_FAST_CODEGEN):
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_FAST_CODEGEN}".strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdm-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
  """``npz:<path>`` of 64 training and 10 test digits of mnist5k (with labels), for runs whose
  whole-split evaluation is not the point: it takes a moment instead of 500 images' worth."""
  from vdm import input_pipeline
  data = input_pipeline.load_dataset("mnist5k")
  path = tmp_path_factory.mktemp("small_data") / "mnist64.npz"
  np.savez(path, train=data["train"].images[:64], train_labels=data["train"].labels[:64],
           test=data["test"].images[:10], test_labels=data["test"].labels[:10])
  return f"npz:{path}"


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)


# The slowest files first: with the files spread over worker processes (README: -n … --dist loadfile),
# the long ones start at once instead of running alone at the end. Measured per-file totals, 2 cores.
_SLOWEST_FIRST = ("test_robustness.py", "test_parallel.py", "test_guidance.py", "test_bad_inputs.py", "test_training.py",
                  "test_objectives.py", "test_networks.py", "test_cli.py", "test_sampling.py", "test_model.py",
                  "test_pretrained.py", "test_reference.py", "test_sample_quality.py", "test_tfds.py", "test_ode.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept
