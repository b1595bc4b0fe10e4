"""Bits per dimension over a whole split, with its Monte-Carlo standard error."""

import functools
from typing import Optional

import jax
import numpy as np
import tqdm

from vdm import input_pipeline, losses, sharding

TERMS = ("loss", "loss_recon", "loss_prior", "loss_diff")


@functools.lru_cache(maxsize=16)
def make_eval_step(model, mesh=None):
  """Jitted (params, images, key) → per-example loss terms ``[B]`` in nats.

  With a ``mesh``, images and results are sharded over its ``data`` axis.
  Made once per (model, mesh): models equal in every field share it, so a
  second evaluation (``vdm.load(...).evaluate_bpd`` again) compiles nothing.
  """
  def step(params, images, key):
    out = model.apply({"params": params}, images, key, train=False)
    return {k: out[k] for k in TERMS}
  if mesh is None:
    return jax.jit(step)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=data)


def evaluate(model, params, split: input_pipeline.Split, *, batch_size: int, draws: int,
             key: jax.Array, limit: Optional[int] = None, eval_step=None,
             progress: bool = False, return_per_example: bool = False, mesh=None) -> dict:
  """The negative ELBO of every example of ``split`` in bits per dimension.

  Each example gets ``draws`` (R) independent draws of (t, ε, ε_0). The
  standard error is that of the Monte-Carlo estimate for this split: from
  the spread of the R draws within each example when R ≥ 2; with R = 1, the
  spread across examples (which also counts how examples differ, so it is
  an upper bound).

  Returns: ``num_examples``, ``bpd``, ``bpd_stderr``, ``bpd_recon``,
  ``bpd_prior``, ``bpd_diff``; with ``return_per_example``, also
  ``per_example``: each example's bpd averaged over the draws, ``[N]``.
  """
  eval_step = eval_step or make_eval_step(model, mesh)
  if mesh is not None:
    batch_size = sharding.round_up(batch_size)  # padded and masked anyway
  num_dims = int(np.prod(split.images.shape[1:]))
  n = len(split) if not limit else min(limit, len(split))
  per_draw = {k: [] for k in TERMS}  # R lists of [N]
  bar = tqdm.tqdm(total=draws * -(-n // batch_size), desc="eval", disable=not progress, leave=False)
  for r in range(draws):
    values = {k: [] for k in TERMS}
    batches = input_pipeline.eval_batches(split, batch_size, limit=n, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    for b, (images, mask) in enumerate(batches):
      if hasattr(model, "vocab_size"):
        input_pipeline.check_values(int(np.max(images[mask > 0], initial=0)), model.vocab_size,
                                    "the evaluated data")
      batch_key = jax.random.fold_in(jax.random.fold_in(key, r), b)
      if mesh is None:
        out = jax.device_get(eval_step(params, images, batch_key))
      else:
        data = sharding.batch_sharding(mesh)
        out = {k: sharding.to_host(v) for k, v in eval_step(params, sharding.to_global(images, data),
                                                              batch_key).items()}
        mask = sharding.to_host(sharding.to_global(mask, data))
      for k in TERMS:
        values[k].append(np.asarray(out[k], np.float64)[mask > 0])
      bar.update()
    for k in TERMS:
      per_draw[k].append(np.concatenate(values[k]))
  bar.close()
  to_bpd = lambda nats: float(losses.bits_per_dim(nats, num_dims))  # noqa: E731
  total = np.stack(per_draw["loss"])  # [R, N]
  if draws >= 2:
    stderr = np.sqrt(np.sum(total.var(axis=0, ddof=1) / draws)) / n
  else:
    stderr = total[0].std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
  result = {"num_examples": int(total.shape[1]), "bpd": to_bpd(total.mean()), "bpd_stderr": to_bpd(stderr)}
  for k in TERMS[1:]:
    result["bpd_" + k[len("loss_"):]] = to_bpd(np.mean(per_draw[k]))
  if return_per_example:
    result["per_example"] = np.asarray(losses.bits_per_dim(total.mean(axis=0), num_dims))
  return result
