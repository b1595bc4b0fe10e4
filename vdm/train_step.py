"""The training state and the jitted training step.

``TrainState`` is one pytree (step, params, EMA params, optimiser state,
PRNG key); ``train_step(state, batch) -> (state, metrics)`` is pure, and
``make_train_fn`` jits K of them in one call with the state donated. The
loop that drives it is in :mod:`vdm.training`.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm import guidance, losses, objectives, sharding
from vdm import config as config_lib
from vdm import model as model_lib


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema_params: Any  # what evaluation and sampling use
  opt_state: Any
  key: jax.Array  # typed PRNG key; step n uses fold_in(key, n)
  # With training.importance_bins = K > 0: the per-bin EMA of the diffusion loss² [K] that t is drawn by
  # (vdm.objectives, adaptive importance sampling); () otherwise.
  noise_stats: Any = ()


def create_train_state(config: ml_collections.ConfigDict, model, optimizer, image_shape) -> TrainState:
  init_key, loss_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.int32)
  params = jax.jit(model.init)(init_key, dummy, loss_key)["params"]
  ema_params = jax.tree.map(jnp.copy, params)  # own buffers: the state is donated
  bins = config.training.importance_bins
  return TrainState(step=jnp.array(0, jnp.int32), params=params, ema_params=ema_params,
                    opt_state=optimizer.init(params), key=train_key,
                    noise_stats=jnp.ones((bins,), jnp.float32) if bins else ())


def abstract_state(config: ml_collections.ConfigDict, image_shape) -> TrainState:
  """The shapes and dtypes of ``config``'s TrainState, without computing it."""
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  return jax.eval_shape(lambda: create_train_state(config, model, optimizer, image_shape))


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


def make_dropout_key(key: jax.Array, impl: str) -> jax.Array:
  """The key the dropout masks of a step are drawn from, seeded from ``key`` (a threefry key).

  Threefry's 20 rounds cost several ms a step on a GPU
  (docs/performance.md), drawn as ``jax.random.bernoulli`` draws them: one call per
  activation. "packed": a :data:`vdm.dropout.PACKED` key, whose masks
  :mod:`vdm.dropout` draws with one Threefry call per four activations (on
  this project's CPU a mask takes 0.13× threefry's time,
  benchmarks/dropout_rng.py); like threefry the same bits on every backend
  and sharding. "philox": a Philox4x32 key (10 rounds to threefry's 20,
  one call per activation; with JAX 0.10.2 it does not compile with the
  batch sharded over several devices, vdm.dropout). "rbg": XLA's
  RngBitGenerator, the accelerator's own generator; its bits differ
  between CPU, GPU and TPU and it is not efficiently shardable (with the
  batch over several devices, each may draw the masks of the whole batch).
  Either way the masks are a function of the seed and the step: runs
  repeat and resume exactly.
  """
  if impl not in config_lib.DROPOUT_RNGS:  # jax.random's module docstring compares them
    raise ValueError(f"dropout_rng: expected one of {tuple(config_lib.DROPOUT_RNGS)}, got {impl!r}")
  if impl == "threefry":
    return key
  spec = config_lib.DROPOUT_RNGS[impl]
  shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=spec))).shape
  return jax.random.wrap_key_data(jax.random.bits(key, shape, jnp.uint32), impl=spec)


def _loss_and_grads(model, params, batch, conditioning, labels, noise, dropout_key, num_dims):
  def loss_fn(params):
    out = model.apply({"params": params}, batch, None, conditioning, labels=labels, train=True, noise=noise,
                      rngs={"dropout": dropout_key})
    out["loss_diff_at_t"] = out["loss_diff"]
    out["loss_diff"] = out["loss_diff"] * noise.get("inv_density", 1.0)  # importance-weighted: E = the ELBO term
    out["loss"] = out["loss_recon"] + out["loss_prior"] + out["loss_diff"]  # the ELBO, reported
    objective = out["loss_recon"] + out["loss_prior"] + out["loss_weight"] * out["loss_diff"]  # trained
    out["objective"] = objective
    # Zero in value; routes ∇ Var[loss_diff] to the schedule's interior (schedules.route_to_variance).
    diff = jax.lax.stop_gradient(out["loss_diff"])
    return (losses.bits_per_dim(objective.mean(), num_dims)
            + jnp.sum(out["variance_probe"] * diff / diff.mean())), out
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch, *, model, optimizer, lr_fn, ema_rate: float,
               ema_warmup: bool, grad_accum_steps: int = 1, importance_decay: float = 0.99,
               importance_floor: float = 0.1, dropout_rng: str = "threefry") -> tuple[TrainState, dict]:
  """One optimiser step on uint8 images; the loss is bits/dim.

  ``batch`` is the images ``[B, H, W, C]`` or a dict of them (``"images"``)
  and, for augmented data, the augmentation codes ``"augment"`` ``[B]``,
  which the network takes as conditioning; for a class-conditional model,
  ``"labels"`` ``[B]``, of which a share ``model.label_dropout`` is
  replaced by the null class (:func:`vdm.guidance.drop_labels`).

  With ``grad_accum_steps`` = k the batch is processed as k micro-batches in
  a ``lax.scan`` (k times less activation memory) and their gradients are
  averaged: the same update as one pass, the same noise (drawn for the whole
  batch first), only dropout masks differ.

  With a histogram in ``state.noise_stats`` (``training.importance_bins``),
  t is drawn from it and each draw weighted by 1/q(t) (adaptive importance
  sampling, :mod:`vdm.objectives`); the histogram is updated after the step.

  A NaN/Inf in any loss term or the gradient skips the update (params, EMA
  and optimiser state stay as they were; the step still advances) and is
  reported in ``train/nonfinite``, ``train/nonfinite_term`` and
  ``train/nonfinite_step``.

  ``dropout_rng`` is the PRNG the dropout masks are drawn with (see
  :func:`make_dropout_key`).
  """
  if not isinstance(batch, dict):
    batch = {"images": batch}
  conditioning, labels, batch = batch.get("augment"), batch.get("labels"), batch["images"]
  loss_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  dropout_key = make_dropout_key(dropout_key, dropout_rng)
  num_dims = int(np.prod(batch.shape[1:]))
  noise = model_lib.draw_noise(loss_key, batch.shape, model.antithetic_time_sampling)
  if labels is not None and model.num_classes:  # classifier-free guidance trains the null class too
    labels = guidance.drop_labels(jax.random.fold_in(loss_key, 2), labels.astype(jnp.int32), model.label_dropout,
                                  model.num_classes)
  else:
    labels = None
  importance = not isinstance(state.noise_stats, tuple)
  if importance:  # t from the adaptive histogram, each draw weighted by 1/q(t)
    probs = objectives.importance_probs(state.noise_stats, importance_floor)
    t, density, bins = objectives.importance_times(jax.random.fold_in(loss_key, 1), batch.shape[0], probs,
                                                model.antithetic_time_sampling)
    noise = dict(noise, t=t, inv_density=1.0 / density)
  if grad_accum_steps == 1:
    (_, out), grads = _loss_and_grads(model, state.params, batch, conditioning, labels, noise, dropout_key,
                                      num_dims)
  else:
    split = lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:])  # noqa: E731

    def micro(carry, inputs):
      i, micro_batch, micro_cond, micro_labels, micro_noise = inputs
      (_, out), grads = _loss_and_grads(model, state.params, micro_batch, micro_cond, micro_labels, micro_noise,
                                        jax.random.fold_in(dropout_key, i), num_dims)
      return jax.tree.map(jnp.add, carry, grads), out

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, outs = jax.lax.scan(
        micro, zeros, (jnp.arange(grad_accum_steps), split(batch),
                       None if conditioning is None else split(conditioning),
                       None if labels is None else split(labels), jax.tree.map(split, noise)))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    out = {k: (v[0] if k.startswith("gamma_") else v.reshape(-1)) for k, v in outs.items()}
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
  noise_stats = state.noise_stats
  if importance:
    updated = objectives.update_second_moment(noise_stats, bins, out["loss_diff_at_t"], importance_decay)
    noise_stats = jnp.where(ok, updated, noise_stats)
  metrics = {
      "train/bpd": losses.bits_per_dim(out["loss"].mean(), num_dims),  # the ELBO, whatever the weighting
      "train/bpd_recon": losses.bits_per_dim(out["loss_recon"].mean(), num_dims),
      "train/bpd_prior": losses.bits_per_dim(out["loss_prior"].mean(), num_dims),
      "train/bpd_diff": losses.bits_per_dim(out["loss_diff"].mean(), num_dims),
      # The spread of the one-draw diffusion-loss estimator over the batch (what a learned schedule lowers).
      "train/bpd_diff_std": losses.bits_per_dim(jnp.std(out["loss_diff"]), num_dims),
      "train/lr": lr_fn(state.step),
      "train/grad_norm": grad_norm,
      "train/nonfinite": 1.0 - ok.astype(jnp.float32),
      "train/nonfinite_term": jnp.where(ok, -1, jnp.argmin(finite)).astype(jnp.float32),
      "train/nonfinite_step": jnp.where(ok, -1, state.step + 1).astype(jnp.float32),  # 1-based, as logged
      "train/gamma_0": out["gamma_0"],
      "train/gamma_1": out["gamma_1"],
  }
  if model.loss_weighting != "elbo":
    metrics["train/bpd_objective"] = losses.bits_per_dim(out["objective"].mean(), num_dims)
  state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                        noise_stats=noise_stats)
  return state, metrics


def make_train_fn(config: ml_collections.ConfigDict, model, optimizer, mesh=None):
  """Jitted (state, batches ``[K, B, …]``) → (state, metrics averaged over the K steps).

  Except: ``train/nonfinite`` counts the skipped steps of the K, and
  ``train/nonfinite_term`` and ``train/nonfinite_step`` describe the first.

  ``batches`` is the images or a dict as yielded by
  :func:`vdm.input_pipeline.train_batches` (images, augmentation codes, labels).

  With a ``mesh``, the batch axis is sharded over its devices and the state
  and metrics are replicated.
  """
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           lr_fn=config_lib.learning_rate_schedule(config),
                           ema_rate=config.optimizer.ema_rate, ema_warmup=config.optimizer.ema_warmup,
                           grad_accum_steps=config.training.grad_accum_steps,
                           importance_decay=config.training.importance_decay,
                           importance_floor=config.training.importance_floor,
                           dropout_rng=config.execution.dropout_rng)

  def steps(state, batches):
    if not isinstance(batches, dict):
      batches = {"images": batches}
    if batches["images"].shape[0] == 1:  # one step needs no loop
      return step(state, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(step, state, batches)
    first = jnp.argmax(metrics["train/nonfinite"] > 0)  # 0 when none was skipped: then both are -1
    summary = jax.tree.map(jnp.mean, metrics)
    summary["train/nonfinite"] = metrics["train/nonfinite"].sum()
    for k in ("train/nonfinite_term", "train/nonfinite_step"):
      summary[k] = metrics[k][first]
    return state, summary

  if mesh is None:
    return jax.jit(steps, donate_argnums=0)
  rep = sharding.replicated(mesh)
  return jax.jit(sharding.on_mesh(steps, mesh), donate_argnums=0,
                 in_shardings=(rep, sharding.batch_sharding(mesh, 1)),
                 out_shardings=(rep, rep))
