"""Training: one pytree TrainState, a jitted (donated) step, and the loop."""

import functools
import json
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from vdm import checkpoints, evaluation, images, input_pipeline, losses, sampling
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


def ema_decay(step: jax.Array, rate: float, warmup: bool) -> jax.Array:
  """EMA decay at ``step``: min(rate, (1 + n)/(10 + n)) with warm-up, so short runs' EMA is usable."""
  if not warmup:
    return jnp.asarray(rate, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(rate, (1.0 + n) / (10.0 + n))


def train_step(state: TrainState, batch: jax.Array, *, model, optimizer, lr_fn, ema_rate: float,
               ema_warmup: bool) -> tuple[TrainState, dict]:
  """One optimiser step on uint8 images ``batch`` ``[B, H, W, C]``; the loss is bits/dim."""
  loss_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  num_dims = int(np.prod(batch.shape[1:]))

  def loss_fn(params):
    out = model.apply({"params": params}, batch, loss_key, train=True, rngs={"dropout": dropout_key})
    return losses.bits_per_dim(out["loss"].mean(), num_dims), out

  (bpd, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(state.step, ema_rate, ema_warmup)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {
      "train/bpd": bpd,
      "train/bpd_recon": losses.bits_per_dim(out["loss_recon"].mean(), num_dims),
      "train/bpd_prior": losses.bits_per_dim(out["loss_prior"].mean(), num_dims),
      "train/bpd_diff": losses.bits_per_dim(out["loss_diff"].mean(), num_dims),
      "train/lr": lr_fn(state.step),
      "train/grad_norm": optax.tree.norm(grads),
      "train/gamma_0": out["gamma_0"],
      "train/gamma_1": out["gamma_1"],
  }
  state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
  return state, metrics


def make_train_fn(config: ml_collections.ConfigDict, model, optimizer):
  """Jitted (state, batches ``[K, B, …]``) → (state, metrics averaged over the K steps)."""
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           lr_fn=config_lib.learning_rate_schedule(config),
                           ema_rate=config.optimizer.ema_rate, ema_warmup=config.optimizer.ema_warmup)

  def steps(state, batches):
    if batches.shape[0] == 1:  # no loop: XLA:CPU runs convolutions inside loops slowly
      return step(state, batches[0])
    state, metrics = jax.lax.scan(step, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return jax.jit(steps, donate_argnums=0)


def _echo(message: str) -> None:
  tqdm.tqdm.write(message, file=sys.stderr)


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def write_samples(config, model, params, image_shape, workdir: str, step: int) -> str:
  """Samples ``config.eval.num_samples`` images with the EMA params into a PNG grid."""
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  samples, _ = sampling.generate(model, params, key, config.eval.num_samples, image_shape,
                                 num_steps=config.eval.sample_steps)
  path = os.path.join(workdir, "samples", f"step_{step}.png")
  images.write_png(path, images.grid(samples.astype(np.uint8)))
  return path


def evaluate_split(config, model, params, split, step: int, *, limit=None, eval_step=None,
                   progress: bool = True) -> dict:
  """The eval record of DESIGN: step, split, num_examples, bpd, bpd_stderr and the three terms."""
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  result = evaluation.evaluate(model, params, split, batch_size=config.eval.batch_size,
                               draws=config.eval.draws, key=key, limit=limit, eval_step=eval_step,
                               progress=progress)
  return {"step": int(step), "split": config.eval.split, **result}


def save_eval_record(workdir: str, record: dict) -> str:
  path = os.path.join(workdir, "eval", f"{record['split']}_step{record['step']}.json")
  _write_json(path, record)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (resuming from the latest checkpoint in ``workdir``), then evaluates the test split.

  Returns the final eval record (see :func:`evaluate_split`).
  """
  config_lib.validate(config)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  train_split, eval_split = data["train"], data[config.eval.split]
  image_shape = train_split.images.shape[1:]
  model = config_lib.build_model(config)
  optimizer = config_lib.build_optimizer(config)
  state = create_train_state(config, model, optimizer, image_shape)

  workdir = os.path.abspath(workdir)
  mngr = checkpoints.manager(checkpoints.checkpoint_dir(workdir), keep=config.training.checkpoints_to_keep)
  if mngr.latest_step() is not None:
    state = checkpoints.restore(mngr, state)
    _echo(f"resuming from step {int(state.step)} ({checkpoints.checkpoint_dir(workdir)})")
  is_main = jax.process_index() == 0
  metadata = {"image_shape": list(image_shape)}
  if is_main:
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  writer = MetricWriter(workdir, active=is_main, echo=_echo)
  train_fn = make_train_fn(config, model, optimizer)
  eval_step = evaluation.make_eval_step(model)

  tr = config.training
  start = int(state.step)
  batches = input_pipeline.train_batches(train_split, tr.batch_size, config.seed, start, tr.steps_per_call)
  bar = tqdm.tqdm(total=tr.num_steps, initial=start, desc="train", unit="step", disable=not progress,
                  dynamic_ncols=True)
  pending, window_start, window_time = [], start, time.time()
  for step in range(start, tr.num_steps, tr.steps_per_call):
    state, metrics = train_fn(state, next(batches))
    pending.append(metrics)
    done = step + tr.steps_per_call
    bar.update(tr.steps_per_call)
    if done % tr.log_every == 0 or done == tr.num_steps:
      summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      summary["train/steps_per_sec"] = (done - window_start) / (time.time() - window_time)
      pending, window_start, window_time = [], done, time.time()
      writer.write(done, summary)
      bar.set_postfix(bpd=f"{summary['train/bpd']:.3f}")
    if tr.eval_every and done % tr.eval_every == 0 and done != tr.num_steps:
      record = evaluate_split(config, model, state.ema_params, eval_split, done,
                              limit=config.eval.periodic_examples, eval_step=eval_step, progress=progress)
      writer.write(done, {f"eval/{k}": v for k, v in record.items() if k.startswith("bpd")})
      if config.eval.num_samples and is_main:
        write_samples(config, model, state.ema_params, image_shape, workdir, done)
    if done % tr.checkpoint_every == 0:
      checkpoints.save(mngr, state, config, metadata)
  bar.close()
  if mngr.latest_step() != int(state.step):
    checkpoints.save(mngr, state, config, metadata)

  record = evaluate_split(config, model, state.ema_params, eval_split, int(state.step),
                          eval_step=eval_step, progress=progress)
  if is_main:
    writer.write(int(state.step), {f"eval/{k}": v for k, v in record.items() if k.startswith("bpd")})
    save_eval_record(workdir, record)
    if config.eval.num_samples:
      path = write_samples(config, model, state.ema_params, image_shape, workdir, int(state.step))
      _echo(f"samples: {path}")
  writer.close()
  return record


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "", *,
                        progress: bool = True) -> dict:
  """Evaluates ``config.eval.split`` with the EMA params of a checkpoint (default: latest in workdir)."""
  config_lib.validate(config)
  directory, step = checkpoints.resolve(checkpoint or workdir)
  data = input_pipeline.load_dataset(config.data.dataset, config.data.data_dir)
  split = data[config.eval.split]
  model = config_lib.build_model(config)
  optimizer = config_lib.build_optimizer(config)
  like = jax.eval_shape(lambda: create_train_state(config, model, optimizer, split.images.shape[1:]))
  state = checkpoints.restore(checkpoints.manager(directory, read_only=True), like, step)
  record = evaluate_split(config, model, state.ema_params, split, int(state.step), progress=progress)
  if jax.process_index() == 0:
    save_eval_record(os.path.abspath(workdir), record)
  return record

