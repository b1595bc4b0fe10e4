"""Training objectives beyond the plain ELBO gradient: variance minimisation, predictions, weightings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from vdm import config as config_lib
from vdm import losses, model as model_lib, objectives, train_step


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


def test_x_and_v_predictions_convert_to_eps_exactly():
  """With the true x (or v) as the network's output, ε̂ is the true ε; float64 references."""
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (5, 4, 4, 3))
  eps = rng.normal(size=x.shape)
  gamma = np.array([-13.3, -6.0, 0.0, 3.0, 5.0])
  alpha = np.sqrt(1 / (1 + np.exp(gamma)))[:, None, None, None]
  sigma = np.sqrt(1 / (1 + np.exp(-gamma)))[:, None, None, None]
  z = alpha * x + sigma * eps
  v = alpha * eps - sigma * x
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  np.testing.assert_array_equal(objectives.eps_from_prediction(f32(eps), f32(z), f32(gamma), "eps"), f32(eps))
  got_v = np.asarray(objectives.eps_from_prediction(f32(v), f32(z), f32(gamma), "v"), np.float64)
  np.testing.assert_allclose(got_v, eps, atol=1e-6)
  got_x = np.asarray(objectives.eps_from_prediction(f32(x), f32(z), f32(gamma), "x"), np.float64)
  # (z − α x̂)/σ: float32 rounding of z is divided by σ (1.3e-3 at γ = −13.3): inherent in x-prediction.
  assert np.all(np.abs(got_x - eps) <= 4 * np.finfo(np.float32).eps * (1 + np.abs(z)) / sigma)
  np.testing.assert_allclose(got_x[1:], eps[1:], atol=1e-4)
  with pytest.raises(ValueError, match="unknown prediction 'y'"):
    objectives.eps_from_prediction(f32(x), f32(z), f32(gamma), "y")


def test_the_weightings_in_closed_form():
  lam = np.linspace(-15, 15, 3001)
  gamma = jnp.asarray(-lam, jnp.float32)
  ones = jnp.ones_like(gamma)
  np.testing.assert_array_equal(objectives.loss_weight("elbo", gamma, ones, -13.3, 5.0), 1.0)
  np.testing.assert_allclose(objectives.loss_weight("sigmoid", gamma, ones, -13.3, 5.0, sigmoid_bias=1.5),
                             1 / (1 + np.exp(-(1.5 - lam))), rtol=1e-5, atol=1e-7)
  edm = np.asarray(objectives.loss_weight("edm_monotone", gamma, ones, -13.3, 5.0), np.float64)
  density_times_eps_weight = np.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) * (np.exp(-lam) + 0.25) / 0.25
  peak = np.argmax(density_times_eps_weight)
  expected = np.where(np.arange(lam.size) < peak, 1.0, density_times_eps_weight / density_times_eps_weight[peak])
  np.testing.assert_allclose(edm, expected, rtol=1e-4, atol=1e-7)
  assert np.all(np.diff(edm) <= 1e-7) and edm.max() == 1.0  # never lighter at more noise
  assert abs(objectives.EDM_PEAK_LAMBDA - lam[peak]) < 0.01
  slope = jnp.asarray(np.linspace(1.0, 40.0, lam.size), jnp.float32)
  np.testing.assert_allclose(objectives.loss_weight("eps_mse", gamma, slope, -13.3, 5.0), 18.3 / slope, rtol=1e-6)


def test_a_weighted_loss_trains_on_the_weighted_term_and_reports_the_elbo():
  """eps_mse on the cosine schedule: the trained term is ½ (γ_1 − γ_0) ‖ε − ε̂‖²; the reported loss the ELBO."""
  config = smoke.get_config()
  config.model.schedule.name = "cosine"
  config.model.loss_weighting = "eps_mse"
  model = config_lib.build_model(config)
  x = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, 256)
  params = model.init(jax.random.key(1), x, jax.random.key(2))["params"]
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  (objective, out), grads = train_step._loss_and_grads(model, params, x, None, noise, jax.random.key(5), 64)
  elbo = model.apply({"params": params}, x, None, noise=noise)
  np.testing.assert_allclose(out["loss"], elbo["loss"], rtol=1e-6)  # reported: the ELBO
  t = noise["t"]
  _, slope = jax.jvp(lambda s: model.apply({"params": params}, s, method="gamma"), (t,), (jnp.ones_like(t),))
  weighted = out["objective"] - out["loss_recon"] - out["loss_prior"]
  np.testing.assert_allclose(weighted, out["loss_diff"] * 18.3 / slope, rtol=1e-4)
  assert float(jnp.max(slope) / jnp.min(slope)) > 2  # the weighting matters on this schedule
  np.testing.assert_allclose(objective, losses.bits_per_dim(out["objective"].mean(), 64), rtol=1e-6)

  def weighted_bpd(p):
    o = model.apply({"params": p}, x, None, noise=noise)
    return losses.bits_per_dim((o["loss_recon"] + o["loss_prior"] + o["loss_weight"] * o["loss_diff"]).mean(), 64)

  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(weighted_bpd)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
