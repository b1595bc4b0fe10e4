"""Training objectives beyond the plain ELBO gradient: the schedule's variance minimisation."""

import copy

import jax
import jax.numpy as jnp
import numpy as np

from configs import smoke
from vdm import config as config_lib
from vdm import losses, model as model_lib, train_step


def _monotone_config(minimize_variance):
  config = smoke.get_config()
  config.model.schedule.name = "monotone_net"
  config.model.schedule.minimize_variance = minimize_variance
  return config


def test_variance_minimisation_gives_the_interior_grad_var_and_the_rest_the_elbo_gradient():
  """Interior (l1, l2, l3): ∇ mean(L²) / (2 mean L); endpoints and network: the ELBO's own gradient."""
  routed = config_lib.build_model(_monotone_config(True))
  plain = config_lib.build_model(_monotone_config(False))
  x = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, 256)
  params = plain.init(jax.random.key(1), x, jax.random.key(2))["params"]
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params)  # not at init
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  dims = 8 * 8
  (bpd_r, _), grads_r = train_step._loss_and_grads(routed, params, x, None, noise, jax.random.key(5), dims)
  (bpd_p, _), grads_p = train_step._loss_and_grads(plain, params, x, None, noise, jax.random.key(5), dims)
  assert float(bpd_r) == float(bpd_p)  # the probe adds nothing to the value
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_p["network"]))
  for a, b in zip(jax.tree.leaves(grads_r["network"]), jax.tree.leaves(grads_p["network"])):
    # γ'(t) in closed form vs by jvp: equal up to float32 rounding, which moves the gradients a little.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest)
  for name in ("gamma_min", "gamma_max"):
    np.testing.assert_allclose(grads_r["schedule"][name], grads_p["schedule"][name], rtol=1e-5)

  # The same closed-form γ'(t) as training (train=False: nothing routed), so only the routing differs.
  diff = routed.apply({"params": params}, x, None, noise=noise)["loss_diff"]
  mean = jax.lax.stop_gradient(diff.mean())

  def second_moment(p):
    d = routed.apply({"params": p}, x, None, noise=noise)["loss_diff"]
    return losses.bits_per_dim(jnp.mean(d ** 2) / (2 * mean), dims)

  expected = jax.grad(second_moment)(params)["schedule"]
  for name in ("l1", "l2", "l3"):
    assert float(jnp.max(jnp.abs(expected[name]["kernel"]))) > 0  # (l3's bias cancels from u(t): 0)
    for a, b in zip(jax.tree.leaves(grads_r["schedule"][name]), jax.tree.leaves(expected[name])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4 * float(jnp.max(jnp.abs(b))))  # float32 sums of L²
    assert not np.allclose(grads_r["schedule"][name]["kernel"], grads_p["schedule"][name]["kernel"])  # not the ELBO's


def test_evaluation_and_discrete_time_are_untouched_by_the_switch():
  x = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 256)
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  for steps in (0, 10):
    outs = []
    for flag in (True, False):
      config = _monotone_config(flag)
      config.model.num_diffusion_steps = steps
      model = config_lib.build_model(config)
      params = model.init(jax.random.key(1), x, jax.random.key(2))["params"]
      outs.append(model.apply({"params": params}, x, None, noise=noise))
    for k in ("loss_recon", "loss_prior", "loss_diff"):
      np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=2e-6)
