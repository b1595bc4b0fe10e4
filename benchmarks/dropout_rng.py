"""What a dropout mask costs to draw with each of execution.dropout_rng's generators, as JSON.

    python benchmarks/dropout_rng.py                       # the CIFAR-10 block's activations at batch 128
    python benchmarks/dropout_rng.py --shape=8,32,32,128 --repeats=5

One jitted mask of ``shape`` per generator (keep rate 0.9, as dropout 0.1),
seeded as the train step seeds it (``vdm.train_step.make_dropout_key``) and
drawn as the network draws it (``vdm.dropout.draw_keep``: for "packed",
one Threefry call per four activations; for the others
``jax.random.bernoulli``, one call per activation); the median of
``repeats`` timed calls after one warm call. A block of the paper's network draws one such
mask per training step (and again when remat recomputes it).
"""

import json
import statistics
import time

from absl import app, flags

import jax
from vdm import config as config_lib
from vdm import dropout, train_step

_SHAPE = flags.DEFINE_list("shape", ["128", "32", "32", "128"], "mask shape, e.g. 128,32,32,128")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls per generator")


def main(_):
  shape = tuple(int(v) for v in _SHAPE.value)
  rows = []
  for impl in config_lib.DROPOUT_RNGS:
    draw = jax.jit(lambda key, impl=impl: dropout.draw_keep(train_step.make_dropout_key(key, impl), 0.9, shape)[0])
    key = jax.random.key(0)
    mask = draw(key).block_until_ready()  # warm: compile
    keys = [jax.random.fold_in(key, i) for i in range(_REPEATS.value)]  # a new mask each call
    times = []
    for k in keys:
      start = time.perf_counter()
      draw(k).block_until_ready()
      times.append(time.perf_counter() - start)
    rows.append({"dropout_rng": impl, "ms_median": 1e3 * statistics.median(times), "keep_rate": float(mask.mean())})
  base = rows[0]["ms_median"]
  for row in rows:
    row["vs_threefry"] = row["ms_median"] / base
  print(json.dumps({"benchmark": "dropout_rng", "shape": shape, "device": jax.devices()[0].device_kind,
                    "jax": jax.__version__, "rows": rows}))


if __name__ == "__main__":
  app.run(main)
