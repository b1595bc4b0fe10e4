"""Bits per dimension over a whole split, with its Monte-Carlo standard error."""

import functools
from typing import Optional

import jax
import numpy as np
import tqdm

from vdm import input_pipeline, losses, sharding

TERMS = ("loss", "loss_recon", "loss_prior", "loss_diff")


def _stderr(total: np.ndarray) -> float:
  """The standard error of the mean of ``total`` ``[R, N]`` (R draws of N examples), in its units.

  R ≥ 2: from the spread of the draws within each example; R = 1: from the
  spread across examples (which also counts how examples differ: an upper bound).
  """
  draws, n = total.shape
  if draws >= 2:
    return float(np.sqrt(np.sum(total.var(axis=0, ddof=1) / draws)) / n)
  return float(total[0].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


@functools.lru_cache(maxsize=16)
def make_eval_step(model, mesh=None, labels: bool = False):
  """Jitted (params, images, key) → per-example loss terms ``[B]`` in nats.

  With ``labels``: (params, images, key, labels ``[B]``), the terms of
  −log p(x│c) of a class-conditional model.

  With a ``mesh``, images and results are sharded over its ``data`` axis.
  Made once per (model, mesh, labels): models equal in every field share it,
  so a second evaluation (``vdm.load(...).evaluate_bpd`` again) compiles nothing.
  """
  def step(params, images, key, classes=None):
    out = model.apply({"params": params}, images, key, labels=classes, train=False)
    return {k: out[k] for k in TERMS}
  if mesh is None:
    return jax.jit(step)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(sharding.on_mesh(step, mesh), in_shardings=(rep, data, rep) + ((data,) if labels else ()),
                 out_shardings=data)


def _run_batches(step, params, split: input_pipeline.Split, *, n: int, batch_size: int, draws: int,
                 key: jax.Array, mesh, labels: bool, vocab_size: Optional[int], desc: str, progress: bool):
  """Runs ``step(params, images, key[, labels])`` on the first ``n`` examples, ``draws`` times over.

  Batch b of draw r gets the key ``fold_in(fold_in(key, r), b)``. Yields
  (r, the step's outputs on the host, the batch's mask: 1 for real
  examples, 0 for padding); with a ``mesh`` the batch is sharded over it and
  the outputs gathered.
  """
  bar = tqdm.tqdm(total=draws * -(-n // batch_size), desc=desc, disable=not progress, leave=False)
  for r in range(draws):
    batches = input_pipeline.eval_batches(split, batch_size, limit=n, process_index=jax.process_index(),
                                          process_count=jax.process_count(), labels=labels)
    for b, (images, mask, *classes) in enumerate(batches):
      if vocab_size is not None:
        input_pipeline.check_values(int(np.max(images[mask > 0], initial=0)), vocab_size, "the evaluated data")
      batch_key = jax.random.fold_in(jax.random.fold_in(key, r), b)
      if mesh is None:
        out = jax.device_get(step(params, images, batch_key, *classes))
      else:
        data = sharding.batch_sharding(mesh)
        out = step(params, sharding.to_global(images, data), batch_key,
                   *[sharding.to_global(c, data) for c in classes])
        out = jax.tree.map(sharding.to_host, out)
        mask = sharding.to_host(sharding.to_global(mask, data))
      yield r, out, mask
      bar.update()
  bar.close()


def evaluate(model, params, split: input_pipeline.Split, *, batch_size: int, draws: int,
             key: jax.Array, limit: Optional[int] = None, eval_step=None,
             progress: bool = False, return_per_example: bool = False, mesh=None, labels: bool = False) -> dict:
  """The negative ELBO of every example of ``split`` in bits per dimension.

  Each example gets ``draws`` (R) independent draws of (t, ε, ε_0). The
  standard error is that of the Monte-Carlo estimate for this split: from
  the spread of the R draws within each example when R ≥ 2; with R = 1, the
  spread across examples (which also counts how examples differ, so it is
  an upper bound).

  ``labels``: condition a class-conditional model on the split's labels
  (−log p(x│c)); otherwise such a model gets its null class (−log p(x)).
  The same ``key`` gives both the same noise draws.

  Returns: ``num_examples``, ``bpd``, ``bpd_stderr``, ``bpd_recon``,
  ``bpd_prior``, ``bpd_diff``; with ``return_per_example``, also
  ``per_example``: each example's bpd averaged over the draws, ``[N]``.
  """
  eval_step = eval_step or make_eval_step(model, mesh, labels)
  num_dims = int(np.prod(split.images.shape[1:]))
  n = len(split) if not limit else min(limit, len(split))
  if mesh is not None:  # not shrunk to a small split: each batch's noise depends on its size, and the
    batch_size = sharding.round_up(batch_size)  # results must not depend on the device count
  per_draw = {k: [[] for _ in range(draws)] for k in TERMS}  # R lists of per-batch arrays
  for r, out, mask in _run_batches(eval_step, params, split, n=n, batch_size=batch_size, draws=draws, key=key,
                                   mesh=mesh, labels=labels, vocab_size=getattr(model, "vocab_size", None),
                                   desc="eval", progress=progress):
    for k in TERMS:
      per_draw[k][r].append(np.asarray(out[k], np.float64)[mask > 0])
  per_draw = {k: [np.concatenate(batches) for batches in v] for k, v in per_draw.items()}  # R lists of [N]
  to_bpd = lambda nats: float(losses.bits_per_dim(nats, num_dims))  # noqa: E731
  total = np.stack(per_draw["loss"])  # [R, N]
  stderr = _stderr(total)
  result = {"num_examples": int(total.shape[1]), "bpd": to_bpd(total.mean()), "bpd_stderr": to_bpd(stderr)}
  for k in TERMS[1:]:
    result["bpd_" + k[len("loss_"):]] = to_bpd(np.mean(per_draw[k]))
  if return_per_example:
    result["per_example"] = np.asarray(losses.bits_per_dim(total.mean(axis=0), num_dims))
  return result


@functools.lru_cache(maxsize=16)
def make_ode_step(model, mesh=None, labels: bool = False, *, dequantization: str = "decoder", rtol: float = 1e-5,
                  atol: float = 1e-5, max_steps: int = 4096):
  """Jitted (params, images, key[, labels]) → (−log P(x) bound ``[B]`` nats, solver steps, failed) by the ODE."""
  from vdm import ode  # diffrax: an extra

  def step(params, images, key, classes=None):
    return ode.nll_bound(model, params, images, key, dequantization=dequantization, rtol=rtol, atol=atol,
                         max_steps=max_steps, labels=classes)
  if mesh is None:
    return jax.jit(step)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep) + ((data,) if labels else ()),
                 out_shardings=(data, rep, rep))


def evaluate_ode(model, params, split: input_pipeline.Split, *, batch_size: int, draws: int, key: jax.Array,
                 limit: Optional[int] = None, dequantization: str = "decoder", rtol: float = 1e-5,
                 atol: float = 1e-5, max_steps: int = 4096, progress: bool = False, mesh=None,
                 labels: bool = False) -> dict:
  """Bits per dimension of ``split`` by the probability-flow ODE (:func:`vdm.ode.nll_bound`).

  Each example gets ``draws`` independent (dequantisation noise, Hutchinson
  probe) draws; the standard error is computed as in :func:`evaluate`.
  Returns ``num_examples``, ``bpd``, ``bpd_stderr``, ``solver_steps``
  (mean per batch solve) and ``nfe`` (network evaluations per solve, each a
  forward pass with its Jacobian-vector product).
  """
  from vdm import ode
  step = make_ode_step(model, mesh, labels, dequantization=dequantization, rtol=float(rtol), atol=float(atol),
                       max_steps=int(max_steps))
  num_dims = int(np.prod(split.images.shape[1:]))
  n = len(split) if not limit else min(limit, len(split))
  # A solve's step sizes are shared by its batch, so these figures depend on the batching anyway (to the
  # solver's tolerance); a split smaller than a batch is not padded up to it (each example costs hundreds of passes).
  batch_size = min(batch_size, n)
  if mesh is not None:
    batch_size = sharding.round_up(batch_size)
  per_draw, solver_steps = [[] for _ in range(draws)], []
  for r, (nats, steps, failed), mask in _run_batches(
      step, params, split, n=n, batch_size=batch_size, draws=draws, key=key, mesh=mesh, labels=labels,
      vocab_size=getattr(model, "vocab_size", None), desc="eval (ode)", progress=progress):
    if bool(failed):
      raise ode.SolverError(f"the ODE solver stopped before t = 1 (max_steps={max_steps} at rtol={rtol}, "
                            f"atol={atol}); loosen the tolerances or raise config.eval.ode.max_steps")
    per_draw[r].append(np.asarray(nats, np.float64)[mask > 0])
    solver_steps.append(int(steps))
  per_draw = [np.concatenate(batches) for batches in per_draw]
  total = np.stack(per_draw)  # [R, N]
  stderr = _stderr(total)
  to_bpd = lambda nats: float(losses.bits_per_dim(nats, num_dims))  # noqa: E731
  mean_steps = float(np.mean(solver_steps))
  return {"num_examples": int(total.shape[1]), "bpd": to_bpd(total.mean()), "bpd_stderr": to_bpd(stderr),
          "likelihood": "ode", "dequantization": dequantization, "rtol": float(rtol), "atol": float(atol),
          "solver_steps": mean_steps, "nfe": ode.EVALS_PER_STEP * mean_steps + 1}
