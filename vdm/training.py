"""The training loop: train (resuming), evaluate, sample; and checkpoint evaluation.

The step itself is in :mod:`vdm.train_step`; stopping on signals in
:mod:`vdm.preemption`; atomic file writes in :mod:`vdm.files`.
"""

import collections
import contextlib
import os
import signal
import sys
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from vdm import checkpoints, dropout, evaluation, files, images, input_pipeline, preemption, reference, sampling
from vdm import sharding
from vdm import config as config_lib
from vdm.metric_writers import MetricWriter
from vdm.preemption import Preempted
from vdm.train_step import NONFINITE_TERMS, NonFiniteError, abstract_state, create_train_state, make_train_fn


def due(step: int, every: int) -> bool:
  """Whether periodic work with period ``every`` (0 = never) falls at ``step``."""
  return every > 0 and step % every == 0


def _echo(message: str) -> None:
  tqdm.tqdm.write(message, file=sys.stderr)


def write_samples(config, model, params, image_shape, workdir: str, step: int, mesh=None,
                  write: bool = True, progress: bool = False) -> str:
  """Samples ``config.eval.num_samples`` images with the EMA params into a PNG grid.

  Every process must call (the sampler runs on all devices); only ``write`` ones write.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  labels, columns = grid_labels(config.model.num_classes, config.eval.num_samples)
  samples, _ = sampling.generate(model, params, key, len(labels) if labels is not None else config.eval.num_samples,
                                 image_shape, num_steps=config.eval.sample_steps, mesh=mesh, progress=progress,
                                 labels=labels, guidance=config.eval.guidance,
                                 langevin_steps=config.eval.langevin_steps, langevin_snr=config.eval.langevin_snr)
  path = os.path.join(workdir, "samples", f"step_{step}.png")
  if write:
    images.write_png(path, images.grid(samples.astype(np.uint8), columns))
  return path


def grid_labels(num_classes: int, num_samples: int):
  """A conditional model's sample grid: one row per class, ⌈num_samples / K⌉ columns (labels, columns).

  (None, 0) for an unconditional model: ``num_samples`` images in a square grid.
  """
  if not num_classes:
    return None, 0
  columns = -(-num_samples // num_classes)
  return np.repeat(np.arange(num_classes, dtype=np.int32), columns), columns


def evaluate_split(config, model, params, split, step: int, *, limit=None, progress: bool = True,
                   mesh=None) -> dict:
  """The eval record of DESIGN: step, split, num_examples, bpd, bpd_stderr and the three terms.

  For a class-conditional model ``bpd`` is −log p(x│c) with the data's
  labels, and ``bpd_unconditional`` (with its stderr) is −log p(x) through
  the null class.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  run = lambda labels: evaluation.evaluate(model, params, split, batch_size=config.eval.batch_size,  # noqa: E731
                                           draws=config.eval.draws, key=key, limit=limit, progress=progress,
                                           mesh=mesh, labels=labels)
  result = run(bool(config.model.num_classes))
  if config.model.num_classes:
    unconditional = run(False)
    result["bpd_unconditional"] = unconditional["bpd"]
    result["bpd_unconditional_stderr"] = unconditional["bpd_stderr"]
  return {"step": int(step), "split": config.eval.split, **result}


def save_eval_record(workdir: str, record: dict) -> str:
  suffix = "_ode" if record.get("likelihood") == "ode" else ""
  path = os.path.join(workdir, "eval", f"{record['split']}_step{record['step']}{suffix}.json")
  files.write_json(path, record)
  return path


def save_schedule(workdir: str, model, params, step: int) -> str:
  """The learned γ(t) at 101 evenly spaced t, as ``<workdir>/eval/gamma_step<step>.json``."""
  t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
  gamma = np.asarray(jax.device_get(model.apply({"params": params}, t, method="gamma")), np.float64)
  path = os.path.join(workdir, "eval", f"gamma_step{step}.json")
  files.write_json(path, {"step": step, "t": t.astype(np.float64).round(6).tolist(), "gamma": gamma.tolist()})
  return path


def setup(config: ml_collections.ConfigDict, image_shape, mesh: Optional[Mesh] = None):
  """Validates, builds the model and optimiser, and the mesh; checks the batch split.

  Returns (model, optimizer, mesh, init): ``init()`` makes the TrainState,
  replicated over the mesh (default: every device; benchmarks/gpu_compile.py
  passes one of devices that are not here).
  """
  config_lib.validate(config)
  config_lib.check_image_shape(config, image_shape)
  mesh = mesh or sharding.make_mesh()
  # Read when a program is lowered for a GPU (elsewhere it changes nothing): the same bits either way. One
  # device only: JAX's kernel is one custom call a draw, which XLA does not split over the batch, so with
  # several every device would draw the whole batch's bits (compiled for 8 H200s, dropout_rng="threefry":
  # 1,002 GB a step a device; docs/performance.md); XLA's own Threefry it splits.
  try:
    jax.config.update("jax_threefry_gpu_kernel_lowering", config.execution.threefry_gpu_kernel and mesh.size == 1)
  except AttributeError:  # a JAX without the option (its changelog meant to remove it): XLA's Threefry, same bits
    pass
  if config.execution.dropout_rng == "packed" and config.model.network.dropout > 0:
    failure = dropout.check_kernel()  # on a GPU: the mask kernel against the traced mask, once
    if failure:
      _echo(f"warning: {failure}")
  sharding.check_batch(config.training.batch_size // config.training.grad_accum_steps,
                       "training.batch_size (per micro-batch: batch_size / grad_accum_steps)")
  if config.execution.dropout_rng == "philox" and config.model.network.dropout > 0 and mesh.size > 1:
    _check_philox_partitions(mesh)
  model = config_lib.build_model(config)
  optimizer = config_lib.build_optimizer(config)
  rep = sharding.replicated(mesh)
  init = jax.jit(lambda: create_train_state(config, model, optimizer, image_shape), out_shardings=rep)
  return model, optimizer, mesh, init


def _check_philox_partitions(mesh: Mesh) -> None:
  """Philox masks over a sharded batch need ``lax.mulhi`` partitioned, which JAX 0.10.2 cannot do."""
  draw = lambda: jax.random.bernoulli(jax.random.key(0, impl="philox4x32"), 0.9, (mesh.size, 8))  # noqa: E731
  try:
    jax.jit(draw, out_shardings=sharding.batch_sharding(mesh)).lower().compile()
  except Exception as error:  # noqa: BLE001  (its type differs between JAX versions)
    raise config_lib.ConfigError(
        f"execution.dropout_rng: 'philox' masks do not compile with the batch over {mesh.size} devices in JAX "
        f"{jax.__version__} ({str(error).splitlines()[0][:120]}); use 'packed' (as cheap, and shardable)") from error


def _check_checkpoint(mngr, step, config, image_shape, like, allow_config_mismatch: bool) -> None:
  """Refuses another model's checkpoint; with ``allow_config_mismatch``, only one whose arrays do not fit."""
  if not allow_config_mismatch:
    checkpoints.check_compatible(mngr, step, config, image_shape)
    return
  saved, _ = checkpoints.restore_config(mngr, step)
  checkpoints.check_loadable(str(mngr.directory), abstract_state(saved, image_shape), like,
                             checkpoints.model_differences(saved, config))


def _eval_split(data: dict, name: str) -> input_pipeline.Split:
  if name not in data:
    raise config_lib.ConfigError(f"config.eval.split: expected one of {sorted(data)}, got {name!r}")
  return data[name]


class _InFlight:
  """Calls dispatched to the devices, counted (and checked) once they finish.

  Two calls stay queued behind the one the host waits for, so the devices
  never wait for the host. Each finished call moves the progress bar; with
  ``stop_on_nonfinite``, a call that skipped a non-finite update raises
  :class:`NonFiniteError` naming its step.
  """

  def __init__(self, bar, steps_per_call: int, stop_on_nonfinite: bool, queued: int = 2):
    self._bar, self._steps, self._stop, self._queued = bar, steps_per_call, stop_on_nonfinite, queued
    self._calls = collections.deque()

  def add(self, metrics: dict) -> None:
    self._calls.append(metrics)
    while len(self._calls) > self._queued:
      self._finish(self._calls.popleft())

  def drain(self) -> None:
    """Waits for every call; before a checkpoint, a metric write, or the end."""
    while self._calls:
      self._finish(self._calls.popleft())

  def _finish(self, metrics: dict) -> None:
    if self._stop and float(sharding.to_host(metrics["train/nonfinite"])) > 0:
      term = NONFINITE_TERMS[int(sharding.to_host(metrics["train/nonfinite_term"]))]
      raise NonFiniteError(int(sharding.to_host(metrics["train/nonfinite_step"])), term)
    jax.block_until_ready(metrics["train/bpd"])
    self._bar.update(self._steps)


class _Window:
  """The metrics of the calls since the last write: their means, skipped steps and speed."""

  def __init__(self, step: int):
    self._reset(step)

  def _reset(self, step: int) -> None:
    self._calls, self._start, self._time = [], step, time.time()

  def add(self, metrics: dict) -> None:
    self._calls.append(metrics)

  def close(self, step: int) -> dict:
    host = [{k: float(sharding.to_host(v)) for k, v in m.items()} for m in self._calls]
    summary = {k: float(np.mean([m[k] for m in host])) for k in host[0] if not k.startswith("train/nonfinite")}
    summary["train/skipped_steps"] = float(sum(m["train/nonfinite"] for m in host))
    summary["train/steps_per_sec"] = (step - self._start) / (time.time() - self._time)
    self._reset(step)
    return summary


@config_lib.names_config_fields
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                       allow_config_mismatch: bool = False) -> dict:
  """Trains (resuming from the latest checkpoint in ``workdir``), then evaluates the test split.

  Uses every device (data parallel); in a multi-process run each process
  feeds its own slice of every batch and only process 0 writes files.
  Returns the final eval record (see :func:`evaluate_split`).
  """
  config_lib.validate(config)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  train_split, eval_split = data["train"], _eval_split(data, config.eval.split)
  image_shape = train_split.image_shape
  input_pipeline.check_values(train_split.max_value(), config.model.vocab_size)
  input_pipeline.check_labels(train_split, config.model.num_classes, "the training split")
  input_pipeline.check_labels(eval_split, config.model.num_classes, f"the {config.eval.split} split")
  model, optimizer, mesh, init = setup(config, image_shape)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  mngr = checkpoints.manager(checkpoints.checkpoint_dir(workdir), keep=config.training.checkpoints_to_keep)
  state = _initial_state(config, mngr, init, image_shape, allow_config_mismatch, mesh)
  if is_main:
    files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  metadata = {"image_shape": list(image_shape)}
  writer = MetricWriter(workdir, active=is_main, echo=_echo)
  eval_model = config_lib.build_model(config, for_eval=True)  # full precision unless eval.full_precision=False
  show = progress and is_main

  def evaluate(state, limit=None) -> dict:
    record = evaluate_split(config, eval_model, state.ema_params, eval_split, int(state.step), mesh=mesh,
                            limit=limit, progress=show)
    writer.write(int(state.step), {f"eval/{k}": v for k, v in record.items() if k.startswith("bpd")})
    return record

  def sample(state) -> str:
    return write_samples(config, model, state.ema_params, image_shape, workdir, int(state.step), mesh,
                         write=is_main, progress=show)

  tr = config.training
  start = int(state.step)
  train_fn = make_train_fn(config, model, optimizer, mesh)
  batches = input_pipeline.prefetch(  # read and augment in a thread
      input_pipeline.train_batches(train_split, tr.batch_size, config.seed, start, tr.steps_per_call,
                                   jax.process_index(), jax.process_count(), config.data.augment,
                                   labels=config.model.num_classes > 0))
  batch_on_mesh = sharding.batch_sharding(mesh, 1)
  on_devices = input_pipeline.ahead(  # copy the next batches to the devices while this call runs
      jax.tree.map(lambda x: sharding.to_global(x, batch_on_mesh), b) for b in batches)
  bar = tqdm.tqdm(total=tr.num_steps, initial=start, desc="train", unit="step", disable=not show,
                  dynamic_ncols=True)
  in_flight = _InFlight(bar, tr.steps_per_call, stop_on_nonfinite=tr.on_nonfinite == "stop")
  window = _Window(start)
  with preemption.stop_signals() as received, contextlib.closing(batches):
    for step in range(start, tr.num_steps, tr.steps_per_call):
      state, metrics = train_fn(state, next(on_devices))
      done = step + tr.steps_per_call
      last = done == tr.num_steps
      stop = preemption.any_process(bool(received))  # a signal to one host stops them all at the same step
      in_flight.add(metrics)
      window.add(metrics)
      if due(done, tr.log_every) or last:
        in_flight.drain()  # with on_nonfinite="stop", raises before the bad window is written
        summary = window.close(done)
        writer.write(done, summary)
        bar.set_postfix(bpd=f"{summary['train/bpd']:.3f}")
      if due(done, tr.eval_every) and not (last or stop):
        evaluate(state, limit=config.eval.periodic_examples)
        if config.eval.num_samples:
          sample(state)
      if due(done, tr.checkpoint_every) or stop:
        in_flight.drain()  # never checkpoint past a step that on_nonfinite="stop" refuses
        checkpoints.save(mngr, state, config, metadata)
      if stop:
        bar.close()
        writer.close()
        raise Preempted(received[0] if received else signal.SIGTERM, done, checkpoints.checkpoint_dir(workdir))
  in_flight.drain()
  bar.update(max(0, bar.total - bar.n))
  bar.close()
  if mngr.latest_step() != int(state.step):
    checkpoints.save(mngr, state, config, metadata)

  record = evaluate(state)
  if is_main:
    save_eval_record(workdir, record)
    save_schedule(workdir, eval_model, state.ema_params, int(state.step))
  if config.eval.num_samples:
    path = sample(state)
    if is_main:
      _echo(f"samples: {path}")
  writer.close()
  return record


def _initial_state(config, mngr, init, image_shape, allow_config_mismatch: bool, mesh):
  """A fresh TrainState, or the latest checkpoint's (after checking it belongs to this model)."""
  if mngr.latest_step() is None:
    return init()
  like = jax.eval_shape(init)  # restoring needs only the shapes: no parameters initialised to be overwritten
  _check_checkpoint(mngr, None, config, image_shape, like, allow_config_mismatch)
  state = checkpoints.restore(mngr, like, sharding=sharding.replicated(mesh))
  step = int(state.step)
  _echo(f"resuming from step {step} ({mngr.directory})")
  if step >= config.training.num_steps:
    _echo(f"step {step} is not below training.num_steps ({config.training.num_steps}): nothing to train; "
          f"evaluating that checkpoint (raise --config.training.num_steps to train longer)")
  return state


@config_lib.names_config_fields
def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "", *,
                        progress: bool = True, allow_config_mismatch: bool = False, likelihood: str = "elbo") -> dict:
  """Evaluates ``config.eval.split`` with the EMA params of a checkpoint (default: latest in workdir).

  ``likelihood``: ``"elbo"`` (the model's variational bound, as trained) or
  ``"ode"`` (the probability-flow ODE's, :mod:`vdm.ode`, as ``config.eval.ode``
  says; saved as ``eval/<split>_step<N>_ode.json``).

  ``checkpoint`` may be one of the 2022 reference code (google-research/vdm);
  ``config`` is then the one it trained with (see :mod:`vdm.reference`).
  """
  config_lib.validate(config)
  released = reference.find(checkpoint) if checkpoint else None
  if released is None:
    directory, step = checkpoints.resolve(checkpoint or workdir)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  split = _eval_split(data, config.eval.split)
  input_pipeline.check_labels(split, config.model.num_classes, f"the {config.eval.split} split")
  _, _, mesh, init = setup(config, split.image_shape)
  model = config_lib.build_model(config, for_eval=True, forward_mode=likelihood == "ode")
  if released is not None:
    params, step = reference.load(released, config, split.image_shape)
    params = jax.device_put(params, sharding.replicated(mesh))
  else:
    mngr = checkpoints.manager(directory, read_only=True)
    like = jax.eval_shape(init)
    _check_checkpoint(mngr, step, config, split.image_shape, like, allow_config_mismatch)
    state = checkpoints.restore(mngr, like, step, sharding=sharding.replicated(mesh))
    params, step = state.ema_params, int(state.step)
  show = progress and jax.process_index() == 0
  if likelihood == "ode":
    record = evaluate_split_ode(config, model, params, split, step, mesh=mesh, progress=show)
  else:
    record = evaluate_split(config, model, params, split, step, mesh=mesh, progress=show)
  if jax.process_index() == 0:
    save_eval_record(os.path.abspath(workdir), record)
    save_schedule(os.path.abspath(workdir), model, params, step)
  return record


def evaluate_split_ode(config, model, params, split, step: int, *, progress: bool = True, mesh=None) -> dict:
  """The eval record by the probability-flow ODE: step, split, num_examples, bpd, bpd_stderr, solver figures."""
  ode_config = config.eval.ode
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  result = evaluation.evaluate_ode(model, params, split, batch_size=config.eval.batch_size, draws=config.eval.draws,
                                   key=key, limit=ode_config.examples, dequantization=ode_config.dequantization,
                                   rtol=ode_config.rtol, atol=ode_config.atol, max_steps=ode_config.max_steps,
                                   progress=progress, mesh=mesh, labels=bool(config.model.num_classes))
  return {"step": int(step), "split": config.eval.split, **result}
