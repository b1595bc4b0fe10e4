"""The probability-flow ODE beside the ELBO: bits/dim on the same examples, solver work, encode/decode error.

    python benchmarks/ode_likelihood.py --workdir=runs/mnist --examples=100

On the first ``--examples`` images of the test split, with the checkpoint's
EMA parameters, prints one JSON record for each of: the ELBO (``--draws``
draws per example), the ODE bound for each of ``--dequantizations`` and
``--tolerances`` (one Hutchinson probe per example; rtol = atol), and the DDIM round trip x → z_1 → x at each of ``--roundtrip_steps``
(mean absolute pixel error and the share of exact pixels). Wall times are
per record on this machine, compilation included.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import vdm  # noqa: E402
from benchmarks import common  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import evaluation, input_pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir or checkpoint folder.")
_EXAMPLES = flags.DEFINE_integer("examples", 100, "The first N test images.")
_DRAWS = flags.DEFINE_integer("draws", 4, "ELBO draws per example.")
_TOLERANCES = flags.DEFINE_list("tolerances", ["1e-5"], "ODE tolerances (rtol = atol), one record each.")
_DEQUANTIZATIONS = flags.DEFINE_list("dequantizations", ["decoder", "uniform"], "ODE dequantisations.")
_ROUNDTRIP = flags.DEFINE_list("roundtrip_steps", ["100", "1000"], "DDIM steps of the encode/decode round trip.")
_ROUNDTRIP_IMAGES = flags.DEFINE_integer("roundtrip_images", 16, "Images in the round trip.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  trained = vdm.load(_WORKDIR.value)
  config = trained.config
  test = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)["test"]
  common_fields = {"benchmark": "ode_likelihood", "workdir": _WORKDIR.value, "step": trained.step,
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  key = jax.random.key(0)
  start = time.perf_counter()
  elbo = evaluation.evaluate(config_lib.build_model(config, for_eval=True), trained.params, test, batch_size=100,
                             draws=_DRAWS.value, key=key, limit=_EXAMPLES.value)
  common.emit({**common_fields, "likelihood": "elbo", **elbo, "seconds": time.perf_counter() - start})
  ode_model = config_lib.build_model(config, for_eval=True, forward_mode=True)
  for dequantization in _DEQUANTIZATIONS.value:
    for tolerance in (float(t) for t in _TOLERANCES.value):
      start = time.perf_counter()
      record = evaluation.evaluate_ode(ode_model, trained.params, test, batch_size=100, draws=1, key=key,
                                       limit=_EXAMPLES.value, dequantization=dequantization, rtol=tolerance,
                                       atol=tolerance)
      common.emit({**common_fields, **record, "seconds": time.perf_counter() - start})
  images = np.asarray(test.images[:_ROUNDTRIP_IMAGES.value])
  for steps in (int(s) for s in _ROUNDTRIP.value):
    start = time.perf_counter()
    back = trained.decode(trained.encode(images, steps), steps)
    error = np.abs(back.astype(np.int64) - images.astype(np.int64))
    common.emit({**common_fields, "roundtrip_steps": steps, "images": len(images),
                 "mean_abs_pixel_error": float(error.mean()), "max_abs_pixel_error": int(error.max()),
                 "exact_pixels": float((error == 0).mean()), "seconds": time.perf_counter() - start})


if __name__ == "__main__":
  app.run(main)
