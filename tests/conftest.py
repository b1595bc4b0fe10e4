import os
import shutil
import tempfile

# Compilation dominates the tiny models of the tests. Both settings go through
# the environment so that the train.py / sample.py subprocesses inherit them:
# XLA's quick mode, and one compilation cache for the whole session, so the
# dozens of subprocesses that run the smoke config compile each program once.
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdm-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:
    shutil.rmtree(_CACHE, ignore_errors=True)
