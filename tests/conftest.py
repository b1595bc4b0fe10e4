import os

# Compilation dominates the tiny models of the tests.
os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
