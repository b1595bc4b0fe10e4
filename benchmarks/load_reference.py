"""Time vdm.load on a google-research/vdm checkpoint of the paper's CIFAR-10 model (30.6 M parameters).

    python benchmarks/load_reference.py            # prints one JSON line

Writes a checkpoint in the reference's layout (random values; params, EMA
and AdamW state: about 490 MB) to a temporary folder, then times
``vdm.load(prefix, config="configs/cifar10.py")``: reading the MessagePack,
mapping the names, stacking the scanned blocks, placing them on the device.
"""

import os
import sys
import tempfile
import time

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, reference_layout  # noqa: E402


def main(_):
  import jax  # noqa: PLC0415

  import vdm  # noqa: PLC0415

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    prefix = reference_layout.write(folder, reference_layout.parameters(0, 128, 32))
    written = time.perf_counter() - started
    started = time.perf_counter()
    trained = vdm.load(prefix, config=os.path.join(root, "configs", "cifar10.py"))
    jax.block_until_ready(trained.params)
    seconds = time.perf_counter() - started
    common.emit({"benchmark": "load_reference", "device": jax.devices()[0].device_kind,
                 "params": sum(x.size for x in jax.tree.leaves(trained.params)),
                 "file_mb": round(os.path.getsize(prefix + ".flax") / 2**20, 1),
                 "load_s": round(seconds, 2), "write_s": round(written, 2)})


if __name__ == "__main__":
  app.run(main)
