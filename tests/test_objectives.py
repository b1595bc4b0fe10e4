"""Training objectives beyond the plain ELBO gradient: variance minimisation, predictions, weightings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from vdm import config as config_lib
from vdm import losses, model as model_lib, objectives, schedules, train_step


class _PixelNet(nn.Module):
  """ε̂ = a ⊙ z + b·γ + c per pixel: a network with parameters that compiles in a moment."""

  @nn.compact
  def __call__(self, z, gamma_t, conditioning=None, *, train=False):
    a = self.param("a", nn.initializers.normal(1.0), z.shape[1:])
    b = self.param("b", nn.initializers.normal(0.1), z.shape[1:])
    c = self.param("c", nn.initializers.normal(1.0), z.shape[1:])
    return a * z + b * jnp.reshape(gamma_t, (-1,) + (1,) * (z.ndim - 1)) + c


def _pixel_vdm(schedule: str, **fields):
  hidden = {"hidden": 8} if schedule == "monotone_net" else {}
  return model_lib.VDM(schedules.get_schedule(schedule, -13.3, 5.0, **hidden), _PixelNet(), **fields)


def test_variance_minimisation_gives_the_interior_grad_var_and_the_rest_the_elbo_gradient():
  """Interior (l1, l2, l3): ∇ mean(L²) / (2 mean L); endpoints and network: the ELBO's own gradient."""
  routed = _pixel_vdm("monotone_net", minimize_variance=True)
  plain = _pixel_vdm("monotone_net", minimize_variance=False)
  x = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, 256)
  params = plain.init(jax.random.key(1), x, jax.random.key(2))["params"]
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params)  # not at init
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  dims = 8 * 8
  loss_and_grads = lambda model: jax.jit(lambda p: train_step._loss_and_grads(  # noqa: E731
      model, p, x, None, None, noise, jax.random.key(5), dims))(params)
  (bpd_r, _), grads_r = loss_and_grads(routed)
  (bpd_p, _), grads_p = loss_and_grads(plain)
  assert float(bpd_r) == pytest.approx(float(bpd_p), rel=1e-6)  # the probe adds nothing to the value
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_p["network"]))
  for a, b in zip(jax.tree.leaves(grads_r["network"]), jax.tree.leaves(grads_p["network"])):
    # γ'(t) in closed form vs by jvp: equal up to float32 rounding, which moves the gradients a little.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest)
  for name in ("gamma_min", "gamma_max"):
    np.testing.assert_allclose(grads_r["schedule"][name], grads_p["schedule"][name], rtol=1e-5)

  # The same closed-form γ'(t) as training (train=False: nothing routed), so only the routing differs.
  diff = jax.jit(lambda p: routed.apply({"params": p}, x, None, noise=noise)["loss_diff"])(params)
  mean = jax.lax.stop_gradient(diff.mean())

  def second_moment(p):
    d = routed.apply({"params": p}, x, None, noise=noise)["loss_diff"]
    return losses.bits_per_dim(jnp.mean(d ** 2) / (2 * mean), dims)

  expected = jax.jit(jax.grad(second_moment))(params)["schedule"]
  for name in ("l1", "l2", "l3"):
    assert float(jnp.max(jnp.abs(expected[name]["kernel"]))) > 0  # (l3's bias cancels from u(t): 0)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(expected[name]))
    for a, b in zip(jax.tree.leaves(grads_r["schedule"][name]), jax.tree.leaves(expected[name])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4 * scale)  # float32 sums of L²
    assert not np.allclose(grads_r["schedule"][name]["kernel"], grads_p["schedule"][name]["kernel"])  # not the ELBO's


def test_evaluation_and_discrete_time_are_untouched_by_the_switch():
  x = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 256)
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  for steps in (0, 10):
    outs = []
    for flag in (True, False):
      model = _pixel_vdm("monotone_net", minimize_variance=flag, num_steps=steps)
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
  model = _pixel_vdm("cosine", loss_weighting="eps_mse")
  x = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, 256)
  params = model.init(jax.random.key(1), x, jax.random.key(2))["params"]
  noise = model_lib.draw_noise(jax.random.key(4), x.shape)
  (objective, out), grads = train_step._loss_and_grads(model, params, x, None, None, noise, jax.random.key(5), 64)
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


def test_importance_times_follow_their_density():
  probs = jnp.array([0.1, 0.2, 0.3, 0.4])
  t, density, bins = objectives.importance_times(jax.random.key(0), 200_000, probs, antithetic=False)
  counts = np.bincount(np.asarray(bins), minlength=4) / 200_000
  np.testing.assert_allclose(counts, probs, atol=0.004)
  np.testing.assert_array_equal(np.floor(np.asarray(t) * 4).astype(int), np.asarray(bins))
  np.testing.assert_allclose(density, 4 * np.asarray(probs)[np.asarray(bins)], rtol=1e-6)
  # Antithetic: a batch of 20 puts exactly 20·p_k draws in bin k.
  _, _, bins = objectives.importance_times(jax.random.key(1), 20, probs, antithetic=True)
  np.testing.assert_array_equal(np.bincount(np.asarray(bins), minlength=4), [2, 4, 6, 8])
  assert np.all((np.asarray(t) >= 0) & (np.asarray(t) < 1))
  stats = objectives.update_second_moment(jnp.ones(4), jnp.array([0, 0, 2]), jnp.array([2.0, 4.0, 3.0]), 0.5)
  np.testing.assert_allclose(stats, [0.5 + 0.5 * 10.0, 1.0, 0.5 + 0.5 * 9.0, 1.0])
  np.testing.assert_allclose(objectives.importance_probs(jnp.array([1.0, 4.0, 0.0, 4.0]), 0.2),
                             0.8 * np.array([1, 2, 0, 2]) / 5 + 0.05, rtol=1e-6)


def test_importance_sampled_diffusion_loss_keeps_its_mean_and_lowers_its_variance():
  """A fixed network and batch: L(t)/q(t) with t ~ q has the uniform estimator's mean and a smaller spread."""
  model = config_lib.build_model(smoke.get_config())  # at init ε̂ = z_t: L(t) varies strongly with t
  x = jax.random.randint(jax.random.key(0), (16, 8, 8, 1), 0, 256)
  params = model.init(jax.random.key(1), x, jax.random.key(2))["params"]

  @jax.jit
  def at(t, key):
    noise = dict(model_lib.draw_noise(key, x.shape), t=t)
    return model.apply({"params": params}, x, None, noise=noise)["loss_diff"]

  bins = 20
  pilot = [(model_lib.sample_times(jax.random.key(100 + r), 16), jax.random.key(200 + r)) for r in range(40)]
  stats = jnp.ones(bins)
  for t, key in pilot:
    index = jnp.clip(jnp.floor(t * bins).astype(jnp.int32), 0, bins - 1)
    stats = objectives.update_second_moment(stats, index, at(t, key), 0.9)
  probs = objectives.importance_probs(stats, 0.1)
  uniform, weighted = [], []
  for r in range(400):
    key_t, key = jax.random.split(jax.random.key(1000 + r))
    uniform.append(float(at(model_lib.sample_times(key_t, 16), key).mean()))
    t, density, _ = objectives.importance_times(key_t, 16, probs)
    weighted.append(float((at(t, key) / density).mean()))
  uniform, weighted = np.array(uniform), np.array(weighted)
  se = np.sqrt(uniform.var(ddof=1) / 400 + weighted.var(ddof=1) / 400)
  assert abs(uniform.mean() - weighted.mean()) < 4 * se
  assert weighted.var() < 0.8 * uniform.var()  # measured: 0.69×


@pytest.mark.parametrize("bins", [0, 8])
def test_training_resumes_from_a_checkpoint_written_before_importance_sampling(tmp_path, bins):
  """An old checkpoint (no histogram in its state) resumes, with importance sampling off or on."""
  import flax  # noqa: PLC0415

  from vdm import checkpoints, training  # noqa: PLC0415

  @flax.struct.dataclass
  class OldState:  # the TrainState before importance sampling existed
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: tuple
    key: jax.Array

  config = smoke.get_config()
  config.training.num_steps, config.training.eval_every, config.eval.num_samples = 4, 0, 0
  config.eval.periodic_examples = 100
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (28, 28, 1))
  old = OldState(jnp.int32(2), state.params, state.ema_params, state.opt_state, state.key)
  mngr = checkpoints.manager(checkpoints.checkpoint_dir(str(tmp_path)))
  checkpoints.save(mngr, old, config, {"image_shape": [28, 28, 1]})
  config.training.importance_bins = bins
  if bins:  # resume training from it
    record = training.train_and_evaluate(config, str(tmp_path), progress=False)
    assert record["step"] == 4 and np.isfinite(record["bpd"])
  like = train_step.abstract_state(config, (28, 28, 1))
  final = checkpoints.restore(checkpoints.manager(checkpoints.checkpoint_dir(str(tmp_path)), read_only=True), like)
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(state.params)):
    assert a.shape == b.shape
  if bins:  # the histogram started uniform and moved
    stats = np.asarray(final.noise_stats)
    assert stats.shape == (8,) and not np.allclose(stats, 1.0) and np.all(stats > 0)
  else:
    assert final.noise_stats == () and int(final.step) == 2
