"""Trains the smoke model a few steps on however many devices JAX sees; saves params.

Run by tests/test_parallel.py in subprocesses (device count and processes set
from outside). Usage: python tests/parallel_worker.py OUT.npz NUM_STEPS [GRAD_ACCUM [DROPOUT_RNG]]
(with DROPOUT_RNG, the blocks drop 10 % of their activations with those masks; with the environment's
VDM_WORKER_GROUP_NORM, execution.group_norm)
or, to score images with ``vdm.load(WORKDIR).evaluate_bpd`` as one process of
several: python tests/parallel_worker.py evaluate WORKDIR OUT.npz IMAGES.npy
COORDINATOR NUM_PROCESSES PROCESS_ID
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import smoke  # noqa: E402
from vdm import input_pipeline, sharding, train_step, training  # noqa: E402


def main(out: str, num_steps: str, grad_accum: str = "1", dropout_rng: str = "") -> None:
  config = smoke.get_config()
  config.model.network.dropout = 0.1 if dropout_rng else 0.0
  config.execution.dropout_rng = dropout_rng or config.execution.dropout_rng
  config.training.grad_accum_steps = int(grad_accum)
  config.execution.group_norm = os.environ.get("VDM_WORKER_GROUP_NORM", config.execution.group_norm)
  split = input_pipeline.load_dataset("mnist5k")["train"]
  model, optimizer, mesh, init = training.setup(config, split.image_shape)
  state = init()
  train_fn = train_step.make_train_fn(config, model, optimizer, mesh)
  batches = input_pipeline.train_batches(split, config.training.batch_size, config.seed)
  first = sharding.to_global(next(input_pipeline.train_batches(split, config.training.batch_size, config.seed))[
      "images"], sharding.batch_sharding(mesh, 1))
  program = train_fn.lower(state, first).compile().as_text()  # what each device gathers of the others
  gathers = sorted(line.split("=")[1].split("all-gather(")[0].strip() for line in program.splitlines()
                   if " all-gather(" in line)
  losses = []
  for _ in range(int(num_steps)):
    state, metrics = train_fn(state, sharding.to_global(next(batches)["images"], sharding.batch_sharding(mesh, 1)))
    losses.append(float(sharding.to_host(metrics["train/bpd"])))
  flat = {jax.tree_util.keystr(p): sharding.to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, losses=np.array(losses), num_devices=jax.device_count(), gathers=np.array(gathers, dtype=str),
           threefry_kernel=jax.config.jax_threefry_gpu_kernel_lowering, **flat)


def evaluate(workdir: str, out: str, images: str, coordinator: str, num_processes: str, process_id: str) -> None:
  sharding.initialize(coordinator, int(num_processes), int(process_id))
  import vdm
  result = vdm.load(workdir).evaluate_bpd(np.load(images), jax.random.key(7), draws=2)
  np.savez(out, per_example=result["per_example"], bpd=result["bpd"], num_examples=result["num_examples"],
           process_count=jax.process_count(), device_count=jax.device_count())


if __name__ == "__main__":
  if sys.argv[1] == "evaluate":
    evaluate(*sys.argv[2:])
  else:
    main(*sys.argv[1:])
