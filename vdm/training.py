"""Training: one pytree TrainState, a jitted (donated) step, and the loop."""

import collections
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from vdm import checkpoints, evaluation, images, input_pipeline, losses, sampling, sharding
from vdm import model as model_lib
from vdm import config as config_lib
from vdm.metric_writers import MetricWriter


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema_params: Any  # what evaluation and sampling use
  opt_state: Any
  key: jax.Array  # typed PRNG key; step n uses fold_in(key, n)


def create_train_state(config: ml_collections.ConfigDict, model, optimizer, image_shape) -> TrainState:
  init_key, loss_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.int32)
  params = jax.jit(model.init)(init_key, dummy, loss_key)["params"]
  ema_params = jax.tree.map(jnp.copy, params)  # own buffers: the state is donated
  return TrainState(step=jnp.array(0, jnp.int32), params=params, ema_params=ema_params,
                    opt_state=optimizer.init(params), key=train_key)


def abstract_state(config: ml_collections.ConfigDict, image_shape) -> TrainState:
  """The shapes and dtypes of ``config``'s TrainState, without computing it."""
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  return jax.eval_shape(lambda: create_train_state(config, model, optimizer, image_shape))


def _check_checkpoint(mngr, step, config, image_shape, like, allow_config_mismatch: bool) -> None:
  """Refuses another model's checkpoint; with ``allow_config_mismatch``, only one whose arrays do not fit."""
  if not allow_config_mismatch:
    checkpoints.check_compatible(mngr, step, config, image_shape)
    return
  saved, _ = checkpoints.restore_config(mngr, step)
  checkpoints.check_loadable(str(mngr.directory), abstract_state(saved, image_shape), like,
                             checkpoints.model_differences(saved, config))


def ema_decay(step: jax.Array, rate: float, warmup: bool) -> jax.Array:
  """EMA decay at ``step``: min(rate, (1 + n)/(10 + n)) with warm-up, so short runs' EMA is usable."""
  if not warmup:
    return jnp.asarray(rate, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(rate, (1.0 + n) / (10.0 + n))


NONFINITE_TERMS = ("loss_recon", "loss_prior", "loss_diff", "gradient")


class NonFiniteError(RuntimeError):
  """Training met a NaN/Inf with ``on_nonfinite='stop'``."""

  def __init__(self, step: int, term: str):
    super().__init__(f"non-finite {term} at step {step} (training.on_nonfinite='stop'); that update was "
                     "not applied and no non-finite state was saved")
    self.step, self.term = step, term


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of ``step`` was written."""

  def __init__(self, signum: int, step: int, directory: str):
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name} at step {step}; checkpoint in {directory}; "
                     "run the same command to resume")
    self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


def _loss_and_grads(model, params, batch, conditioning, noise, dropout_key, num_dims, poison=False):
  def loss_fn(params):
    out = model.apply({"params": params}, batch, None, conditioning, train=True, noise=noise,
                      rngs={"dropout": dropout_key})
    out["loss_diff"] = jnp.where(poison, jnp.nan, out["loss_diff"])  # test hook; False in real runs
    out["loss"] = out["loss_recon"] + out["loss_prior"] + out["loss_diff"]
    return losses.bits_per_dim(out["loss"].mean(), num_dims), out
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch, *, model, optimizer, lr_fn, ema_rate: float,
               ema_warmup: bool, grad_accum_steps: int = 1, poison_step: int = -1) -> tuple[TrainState, dict]:
  """One optimiser step on uint8 images; the loss is bits/dim.

  ``batch`` is the images ``[B, H, W, C]`` or a dict of them (``"images"``)
  and, for augmented data, the augmentation codes ``"augment"`` ``[B]``,
  which the network takes as conditioning.

  With ``grad_accum_steps`` = k the batch is processed as k micro-batches in
  a ``lax.scan`` (k times less activation memory) and their gradients are
  averaged: the same update as one pass, the same noise (drawn for the whole
  batch first), only dropout masks differ.

  A NaN/Inf in any loss term or the gradient skips the update (params, EMA
  and optimiser state stay as they were; the step still advances) and is
  reported in ``train/nonfinite`` and ``train/nonfinite_term``.
  """
  if not isinstance(batch, dict):
    batch = {"images": batch}
  conditioning, batch = batch.get("augment"), batch["images"]
  poison = state.step == poison_step
  loss_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  num_dims = int(np.prod(batch.shape[1:]))
  noise = model_lib.draw_noise(loss_key, batch.shape, model.antithetic_time_sampling)
  if grad_accum_steps == 1:
    (bpd, out), grads = _loss_and_grads(model, state.params, batch, conditioning, noise, dropout_key, num_dims,
                                        poison)
  else:
    split = lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:])  # noqa: E731

    def micro(carry, inputs):
      i, micro_batch, micro_cond, micro_noise = inputs
      (bpd, out), grads = _loss_and_grads(model, state.params, micro_batch, micro_cond, micro_noise,
                                          jax.random.fold_in(dropout_key, i), num_dims, poison)
      return jax.tree.map(jnp.add, carry, grads), (bpd, out)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (bpds, outs) = jax.lax.scan(
        micro, zeros, (jnp.arange(grad_accum_steps), split(batch),
                       None if conditioning is None else split(conditioning), jax.tree.map(split, noise)))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    bpd = bpds.mean()
    out = {k: (v.reshape(-1) if k.startswith("loss") else v[0]) for k, v in outs.items()}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.stack([jnp.all(jnp.isfinite(out[k])) for k in NONFINITE_TERMS[:3]] + [jnp.isfinite(grad_norm)])
  ok = jnp.all(finite)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(state.step, ema_rate, ema_warmup)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
  params, ema_params = keep(params, state.params), keep(ema_params, state.ema_params)
  opt_state = keep(opt_state, state.opt_state)
  metrics = {
      "train/bpd": bpd,
      "train/bpd_recon": losses.bits_per_dim(out["loss_recon"].mean(), num_dims),
      "train/bpd_prior": losses.bits_per_dim(out["loss_prior"].mean(), num_dims),
      "train/bpd_diff": losses.bits_per_dim(out["loss_diff"].mean(), num_dims),
      "train/lr": lr_fn(state.step),
      "train/grad_norm": grad_norm,
      "train/nonfinite": 1.0 - ok.astype(jnp.float32),
      "train/nonfinite_term": jnp.where(ok, -1, jnp.argmin(finite)).astype(jnp.float32),
      "train/gamma_0": out["gamma_0"],
      "train/gamma_1": out["gamma_1"],
  }
  state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
  return state, metrics


def make_train_fn(config: ml_collections.ConfigDict, model, optimizer, mesh=None):
  """Jitted (state, batches ``[K, B, …]``) → (state, metrics averaged over the K steps).

  ``batches`` is the images or a dict as yielded by
  :func:`vdm.input_pipeline.train_batches` (images and augmentation codes).

  With a ``mesh``, the batch axis is sharded over its devices and the state
  and metrics are replicated.
  """
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           lr_fn=config_lib.learning_rate_schedule(config),
                           ema_rate=config.optimizer.ema_rate, ema_warmup=config.optimizer.ema_warmup,
                           grad_accum_steps=config.training.grad_accum_steps,
                           poison_step=config.training.debug_nonfinite_step)

  def steps(state, batches):
    if not isinstance(batches, dict):
      batches = {"images": batches}
    if batches["images"].shape[0] == 1:  # one step needs no loop
      return step(state, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(step, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  if mesh is None:
    return jax.jit(steps, donate_argnums=0)
  rep = sharding.replicated(mesh)
  return jax.jit(steps, donate_argnums=0, in_shardings=(rep, sharding.batch_sharding(mesh, 1)),
                 out_shardings=(rep, rep))


@contextlib.contextmanager
def _stop_signals():
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  def handler(signum, frame):
    if received and signum == signal.SIGINT:  # a second Ctrl-C: stop at once, as Python would
      raise KeyboardInterrupt
    received.append(signum)
    _echo(f"{signal.Signals(signum).name} received: stopping after the current step and writing a checkpoint"
          + (" (Ctrl-C again stops at once, without it)" if signum == signal.SIGINT else ""))

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any (one small allgather; free on one host)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _raise_if_nonfinite(unchecked: list) -> None:
  """Raises NonFiniteError for the first step in ``unchecked`` [(step, metrics)] that went non-finite."""
  for step, metrics in unchecked:
    if float(sharding.to_host(metrics["train/nonfinite"])) > 0:
      term = NONFINITE_TERMS[int(sharding.to_host(metrics["train/nonfinite_term"]))]
      raise NonFiniteError(step, term)


def _summary(pending: list) -> dict:
  """Averages a window's metrics; counts its skipped (non-finite) steps."""
  host = [{k: float(sharding.to_host(v)) for k, v in m.items()} for _, m in pending]
  summary = {k: float(np.mean([m[k] for m in host])) for k in host[0] if not k.startswith("train/nonfinite")}
  summary["train/skipped_steps"] = float(sum(m["train/nonfinite"] for m in host))
  return summary


def _echo(message: str) -> None:
  tqdm.tqdm.write(message, file=sys.stderr)


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def write_samples(config, model, params, image_shape, workdir: str, step: int, mesh=None,
                  write: bool = True, progress: bool = False) -> str:
  """Samples ``config.eval.num_samples`` images with the EMA params into a PNG grid.

  Every process must call (the sampler runs on all devices); only ``write`` ones write.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  samples, _ = sampling.generate(model, params, key, config.eval.num_samples, image_shape,
                                 num_steps=config.eval.sample_steps, mesh=mesh, progress=progress)
  path = os.path.join(workdir, "samples", f"step_{step}.png")
  if write:
    images.write_png(path, images.grid(samples.astype(np.uint8)))
  return path


def evaluate_split(config, model, params, split, step: int, *, limit=None, eval_step=None,
                   progress: bool = True, mesh=None) -> dict:
  """The eval record of DESIGN: step, split, num_examples, bpd, bpd_stderr and the three terms."""
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  result = evaluation.evaluate(model, params, split, batch_size=config.eval.batch_size,
                               draws=config.eval.draws, key=key, limit=limit, eval_step=eval_step,
                               progress=progress, mesh=mesh)
  return {"step": int(step), "split": config.eval.split, **result}


def save_eval_record(workdir: str, record: dict) -> str:
  path = os.path.join(workdir, "eval", f"{record['split']}_step{record['step']}.json")
  _write_json(path, record)
  return path


def setup(config: ml_collections.ConfigDict, image_shape):
  """Validates, builds the model and optimiser, and the mesh; checks the batch split."""
  config_lib.validate(config)
  mesh = sharding.make_mesh()
  sharding.check_batch(config.training.batch_size // config.training.grad_accum_steps,
                       "training.batch_size (per micro-batch: batch_size / grad_accum_steps)")
  model = config_lib.build_model(config)
  optimizer = config_lib.build_optimizer(config)
  rep = sharding.replicated(mesh)
  init = jax.jit(lambda: create_train_state(config, model, optimizer, image_shape), out_shardings=rep)
  return model, optimizer, mesh, init


def _check_values(split: input_pipeline.Split, vocab_size: int) -> None:
  top = split.max_value()
  if top >= vocab_size:
    raise input_pipeline.DataError(f"config.model.vocab_size: the data hold values up to {top}, "
                                   f"expected all < vocab_size ({vocab_size})")


def _split(data: dict, name: str) -> input_pipeline.Split:
  if name not in data:
    raise input_pipeline.DataError(f"config.eval.split: expected one of {sorted(data)}, got {name!r}")
  return data[name]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                       allow_config_mismatch: bool = False) -> dict:
  """Trains (resuming from the latest checkpoint in ``workdir``), then evaluates the test split.

  Uses every device (data parallel); in a multi-process run each process
  feeds its own slice of every batch and only process 0 writes files.
  Returns the final eval record (see :func:`evaluate_split`).
  """
  config_lib.validate(config)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  train_split, eval_split = data["train"], _split(data, config.eval.split)
  image_shape = train_split.image_shape
  _check_values(train_split, config.model.vocab_size)
  model, optimizer, mesh, init = setup(config, image_shape)
  state = init()

  workdir = os.path.abspath(workdir)
  mngr = checkpoints.manager(checkpoints.checkpoint_dir(workdir), keep=config.training.checkpoints_to_keep)
  if mngr.latest_step() is not None:
    _check_checkpoint(mngr, None, config, image_shape, jax.eval_shape(init), allow_config_mismatch)
    state = checkpoints.restore(mngr, state, sharding=sharding.replicated(mesh))
    _echo(f"resuming from step {int(state.step)} ({checkpoints.checkpoint_dir(workdir)})")
    if int(state.step) >= config.training.num_steps:
      _echo(f"step {int(state.step)} is not below training.num_steps ({config.training.num_steps}): nothing to "
            f"train; evaluating that checkpoint (raise --config.training.num_steps to train longer)")
  is_main = jax.process_index() == 0
  metadata = {"image_shape": list(image_shape)}
  if is_main:
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  writer = MetricWriter(workdir, active=is_main, echo=_echo)
  train_fn = make_train_fn(config, model, optimizer, mesh)
  eval_model = config_lib.build_model(config, for_eval=True)  # full precision unless eval.full_precision=False
  eval_step = evaluation.make_eval_step(eval_model, mesh)
  batch_on_mesh = sharding.batch_sharding(mesh, 1)

  tr = config.training
  start = int(state.step)
  batches = input_pipeline.train_batches(train_split, tr.batch_size, config.seed, start, tr.steps_per_call,
                                         jax.process_index(), jax.process_count(), config.data.augment)
  # Read and augment in a thread; start copying the next batches to the devices while this step runs.
  batches = input_pipeline.prefetch(batches)
  on_devices = input_pipeline.ahead(jax.tree.map(lambda x: sharding.to_global(x, batch_on_mesh), b)
                                    for b in batches)
  bar = tqdm.tqdm(total=tr.num_steps, initial=start, desc="train", unit="step",
                  disable=not (progress and is_main), dynamic_ncols=True)
  pending, unchecked, window_start, window_time = [], [], start, time.time()
  stop_on_nonfinite = tr.on_nonfinite == "stop"
  with _stop_signals() as received, contextlib.closing(batches):
    in_flight = collections.deque()  # the bar counts finished calls; two more stay queued on the devices
    for step in range(start, tr.num_steps, tr.steps_per_call):
      state, metrics = train_fn(state, next(on_devices))
      done = step + tr.steps_per_call
      stop = _any_process(bool(received))  # a signal to one host stops them all at the same step
      pending.append((done, metrics))
      unchecked.append((done, metrics))
      in_flight.append(metrics["train/bpd"])
      if len(in_flight) > 2:  # two calls are queued behind this one, so waiting leaves the devices busy
        jax.block_until_ready(in_flight.popleft())
        bar.update(tr.steps_per_call)
      last = done == tr.num_steps
      if stop_on_nonfinite and (last or done % tr.log_every == 0):
        _raise_if_nonfinite(unchecked)  # the state itself stayed finite: the bad update was skipped
        unchecked = []
      if done % tr.log_every == 0 or last:
        summary = _summary(pending)
        summary["train/steps_per_sec"] = (done - window_start) / (time.time() - window_time)
        pending, window_start, window_time = [], done, time.time()
        writer.write(done, summary)
        bar.set_postfix(bpd=f"{summary['train/bpd']:.3f}")
      if tr.eval_every and done % tr.eval_every == 0 and not last and not stop:
        record = evaluate_split(config, eval_model, state.ema_params, eval_split, done, mesh=mesh,
                                limit=config.eval.periodic_examples, eval_step=eval_step,
                                progress=progress and is_main)
        writer.write(done, {f"eval/{k}": v for k, v in record.items() if k.startswith("bpd")})
        if config.eval.num_samples:
          write_samples(config, model, state.ema_params, image_shape, workdir, done, mesh, write=is_main,
                        progress=progress and is_main)
      if done % tr.checkpoint_every == 0 or stop:
        if stop_on_nonfinite:
          _raise_if_nonfinite(unchecked)
          unchecked = []
        checkpoints.save(mngr, state, config, metadata)
      if stop:
        bar.close()
        writer.close()
        raise Preempted(received[0] if received else signal.SIGTERM, done, checkpoints.checkpoint_dir(workdir))
  bar.update(max(0, bar.total - bar.n))
  bar.close()
  if mngr.latest_step() != int(state.step):
    checkpoints.save(mngr, state, config, metadata)

  record = evaluate_split(config, eval_model, state.ema_params, eval_split, int(state.step), mesh=mesh,
                          eval_step=eval_step, progress=progress and is_main)
  writer.write(int(state.step), {f"eval/{k}": v for k, v in record.items() if k.startswith("bpd")})
  if is_main:
    save_eval_record(workdir, record)
  if config.eval.num_samples:
    path = write_samples(config, model, state.ema_params, image_shape, workdir, int(state.step), mesh,
                         write=is_main, progress=progress and is_main)
    if is_main:
      _echo(f"samples: {path}")
  writer.close()
  return record


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "", *,
                        progress: bool = True, allow_config_mismatch: bool = False) -> dict:
  """Evaluates ``config.eval.split`` with the EMA params of a checkpoint (default: latest in workdir)."""
  config_lib.validate(config)
  directory, step = checkpoints.resolve(checkpoint or workdir)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  split = _split(data, config.eval.split)
  _, _, mesh, init = setup(config, split.image_shape)
  model = config_lib.build_model(config, for_eval=True)
  mngr = checkpoints.manager(directory, read_only=True)
  like = jax.eval_shape(init)
  _check_checkpoint(mngr, step, config, split.image_shape, like, allow_config_mismatch)
  state = checkpoints.restore(mngr, like, step, sharding=sharding.replicated(mesh))
  record = evaluate_split(config, model, state.ema_params, split, int(state.step), mesh=mesh,
                          progress=progress and jax.process_index() == 0)
  if jax.process_index() == 0:
    save_eval_record(os.path.abspath(workdir), record)
  return record
