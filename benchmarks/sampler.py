"""Sampler speed: compile time of the whole reverse loop for several N, and steps/s.

    python benchmarks/sampler.py --config=configs/mnist.py --image_shape=28,28,1 --batch_size=64
    python benchmarks/sampler.py --config=configs/cifar10.py --image_shape=32,32,3 --batch_size=8
    python benchmarks/sampler.py --config=configs/cifar10.py --image_shape=32,32,3 --batch_size=128 \
        --num_steps=1000 --timed_steps=1000 --samplers=ancestral        # the GPU target: ≤ 30 s on an H200

Random (untrained) weights: speed does not depend on them. For N =
``--timed_steps`` the record also times the loop as ``progress=True`` runs
it (about 50 calls; ``chunked_over_whole`` is its time over the one-call
loop's). Prints one JSON object per (sampler, N) and appends it to
benchmarks/results.jsonl.
"""

import functools
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import sampling  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_SHAPE = flags.DEFINE_string("image_shape", "28,28,1", "H,W,C.")
_STEPS = flags.DEFINE_list("num_steps", ["10", "100", "1000"], "Loop lengths N to compile.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ancestral", "ddim"], "Samplers.")
_TIMED = flags.DEFINE_integer("timed_steps", 100, "Loop length N for the steps/s measurement.")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  config = _CONFIG.value
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  model = config_lib.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape, jnp.int32), jax.random.key(1))["params"]
  key, indices = jax.random.key(2), jnp.arange(_BATCH.value)
  for sampler in _SAMPLERS.value:
    for n in sorted({int(s) for s in _STEPS.value} | {_TIMED.value}):
      fn = jax.jit(functools.partial(sampling._sample_batch, model, image_shape=shape, num_steps=n,
                                     sampler=sampler, eta=0.0, clip_denoised=False, decode_draw=False))
      t0 = time.perf_counter()
      compiled = fn.lower(params, key, indices).compile()
      t1 = time.perf_counter()
      result = {"benchmark": "sampler", "sampler": sampler, "num_steps": n, "batch_size": _BATCH.value,
                "image_shape": list(shape), "channels": config.model.network.channels,
                "num_blocks": config.model.network.num_blocks, "compile_s": t1 - t0,
                "device": jax.devices()[0].device_kind, "jax": jax.__version__}
      if n == _TIMED.value:
        jax.block_until_ready(compiled(params, key, indices))  # warm, as the chunked loop below is
        t2 = time.perf_counter()
        jax.block_until_ready(compiled(params, key, indices))
        elapsed = time.perf_counter() - t2
        result.update(loop_s=elapsed, steps_per_s=n / elapsed, images_steps_per_s=n * _BATCH.value / elapsed,
                      matmul_precision=config.execution.matmul_precision,
                      dtype=config_lib.resolve_dtype(config.execution.dtype))
        # The same loop as vdm.load(...).sample(progress=True) runs it: in ~50 calls, a bar one call behind.
        chunked = functools.partial(sampling.generate, model, params, key, _BATCH.value, shape, num_steps=n,
                                    sampler=sampler, eta=0.0, steps_per_call=-(-n // 50))
        chunked()
        t3 = time.perf_counter()
        chunked()
        result.update(chunked_loop_s=time.perf_counter() - t3, chunked_steps_per_call=-(-n // 50))
        result["chunked_over_whole"] = result["chunked_loop_s"] / elapsed
      common.emit(result)


if __name__ == "__main__":
  app.run(main)
