"""Training pieces: EMA, optimiser mask, learning rate, evaluation statistics, resume."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from configs import smoke
from perturbation import perturbed
from vdm import config as config_lib
from vdm import checkpoints, dropout, evaluation, input_pipeline, losses, train_step, training
from vdm import model as model_lib


@pytest.fixture(scope="module")
def setup():
  config = smoke.get_config()
  model = config_lib.build_model(config)
  optimizer = config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  return config, model, optimizer, state


def _batch(n=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (1, n, 8, 8, 1)).astype(np.uint8)


def test_ema_decay_warms_up_and_is_capped():
  steps = jnp.array([0, 1, 10, 1000, 100_000])
  np.testing.assert_allclose(train_step.ema_decay(steps, 0.999, True), [0.1, 2 / 11, 11 / 20, 1001 / 1010, 0.999],
                             rtol=1e-6)
  np.testing.assert_allclose(train_step.ema_decay(steps, 0.999, False), 0.999)
  assert float(train_step.ema_decay(steps, 0.0, True)[4]) == 0.0


@pytest.mark.parametrize("ema_rate", [0.999, 0.0])
def test_ema_update_is_exact(setup, ema_rate):
  config, model, optimizer, state = setup
  config = config.copy_and_resolve_references()
  config.optimizer.ema_rate = ema_rate
  fn = train_step.make_train_fn(config, model, optimizer)
  state = jax.tree.map(jnp.copy, state)
  ema_sequence = [jax.device_get(state.ema_params)]  # host copies: the state is donated
  params_sequence = []
  for i in range(3):
    state, _ = fn(state, _batch(seed=i))
    ema_sequence.append(jax.device_get(state.ema_params))
    params_sequence.append(jax.device_get(state.params))
  for n in range(3):
    d = float(train_step.ema_decay(jnp.array(n), ema_rate, True))
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_sequence[n], params_sequence[n])
    for a, b in zip(jax.tree.leaves(ema_sequence[n + 1]), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  if ema_rate == 0.0:  # the EMA is the parameters, to float32 rounding, not bit for bit: XLA may compute the
    # AdamW update once more inside the EMA's fusion, and a CPU emitter rounds that copy apart (1e-10 here)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", ["learned_linear", "monotone_net"])
def test_weight_decay_skips_biases_norm_scales_and_schedule_endpoints(schedule):
  """With zero gradients AdamW's update is exactly −lr · wd · w on the decayed leaves, 0 elsewhere."""
  config = smoke.get_config()
  config.model.schedule.name = schedule
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule_lr_scale = 1.0  # the interior's own multiplier: test_schedule_lr_scale_…
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(state.params), state.params)
  lr, wd = config.optimizer.learning_rate, config.optimizer.weight_decay
  decayed = []
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(state.params)):
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "embedding" in name:
      np.testing.assert_allclose(u, -lr * wd * p, rtol=1e-6, atol=1e-12, err_msg=name)
      decayed.append(name)
    else:  # biases, norm scales, the schedule's endpoints
      assert float(jnp.abs(u).max()) == 0, name
  assert any("'gamma_min'" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates))
  if schedule == "monotone_net":  # its positive-weight layers are kernels too: softplus(w) is pulled towards log 2
    assert {"['schedule']['l1']['kernel']", "['schedule']['l2']['kernel']", "['schedule']['l3']['kernel']"} <= set(
        decayed)
  assert len(decayed) > 5


def test_schedule_lr_scale_scales_only_the_schedule_interior():
  """×s on monotone_net's l1–l3 updates (AdamW's step and decay alike); endpoints and network unchanged."""
  config = smoke.get_config()
  config.model.schedule.name = "monotone_net"
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule_lr_scale = 1.0
  model = config_lib.build_model(config)
  plain = config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, plain, (8, 8, 1))
  grads = perturbed(jax.tree.map(jnp.zeros_like, state.params), seed=3, scale=1.0)
  config.optimizer.schedule_lr_scale = 7.0
  scaled = config_lib.build_optimizer(config)
  want, _ = plain.update(grads, plain.init(state.params), state.params)
  got, _ = scaled.update(grads, scaled.init(state.params), state.params)
  interior = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    if name.startswith("['schedule']['l"):
      interior.append(name)
      np.testing.assert_allclose(a, 7.0 * b, rtol=1e-6, err_msg=name)
      assert float(jnp.abs(b).max()) > 0, name
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert len(interior) == 6
  # The optimizer state is AdamW's at every scale: checkpoints resume with another.
  adamw = optax.adamw(config_lib.learning_rate_schedule(config),
                      mask=lambda p: jax.tree.map(lambda _: True, p)).init(state.params)
  assert jax.tree.structure(scaled.init(state.params)) == jax.tree.structure(adamw)


def test_learning_rate_warms_up_then_decays():
  config = smoke.get_config()
  config.training.num_steps = 110
  config.optimizer.warmup_steps = 10
  config.optimizer.learning_rate = 1.0
  for decay, end in [("constant", 1.0), ("cosine", 0.0), ("linear", 0.0)]:
    config.optimizer.decay = decay
    lr = config_lib.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(110)], [0.0, 0.5, 1.0, end], atol=1e-6)


def test_gradient_clipping_bounds_the_update(setup):
  config, _, _, state = setup
  config = config.copy_and_resolve_references()
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 0
  unclipped = config_lib.build_optimizer(config)
  config.optimizer.grad_clip_norm = 1e-3
  clipping = config_lib.build_optimizer(config)
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), state.params)
  clipped = jax.tree.map(lambda g: g * 1e-3 / optax.tree.norm(huge), huge)
  # The built optimiser on huge gradients moves exactly as the unclipped one on gradients of norm 1e-3.
  got, _ = clipping.update(huge, clipping.init(state.params), state.params)
  want, _ = unclipped.update(clipped, unclipped.init(state.params), state.params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  raw, _ = unclipped.update(huge, unclipped.init(state.params), state.params)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(want))) > 0


def test_evaluation_counts_every_example_once_and_masks_padding():
  n = 37
  images = np.zeros((n, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  split = input_pipeline.Split(images)

  def fake_step(params, batch, key):  # loss = the example's own index, in nats
    v = jnp.asarray(batch[:, 0, 0, 0], jnp.float32)
    return {"loss": v, "loss_recon": v, "loss_prior": 0 * v, "loss_diff": 0 * v}

  out = evaluation.evaluate(None, None, split, batch_size=8, draws=3, key=jax.random.key(0), eval_step=fake_step)
  assert out["num_examples"] == n
  np.testing.assert_allclose(out["bpd"] * 4 * np.log(2), np.arange(n).mean(), rtol=1e-6)
  assert out["bpd_stderr"] == 0.0  # no Monte-Carlo noise in this fake


@pytest.mark.parametrize("draws", [1, 3])
def test_standard_error_is_the_closed_form_of_the_draws(draws):
  n, batch = 11, 4
  split = input_pipeline.Split(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1))
  key = jax.random.key(9)

  def fake_step(params, images, batch_key):  # loss = the example's index + a standard normal draw, nats
    return {k: jnp.asarray(images[:, 0, 0, 0], jnp.float32) + jax.random.normal(batch_key, (images.shape[0],))
            for k in evaluation.TERMS}

  out = evaluation.evaluate(None, None, split, batch_size=batch, draws=draws, key=key, eval_step=fake_step)
  # The same draws, by the documented keys: fold_in(fold_in(key, r), b) for draw r of batch b.
  losses_ = np.stack([np.concatenate([np.arange(b * batch, (b + 1) * batch) + np.asarray(
      jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, r), b), (batch,))) for b in range(3)])[:n]
                      for r in range(draws)])  # [R, n]
  if draws >= 2:  # Var(mean) = Σ_i s_i² / R / n², s_i² the within-example variance of the draws
    stderr = np.sqrt(losses_.var(axis=0, ddof=1).sum() / draws) / n
  else:  # across examples
    stderr = losses_[0].std(ddof=1) / np.sqrt(n)
  nats_to_bpd = 1.0 / np.log(2.0)  # one dimension per example
  np.testing.assert_allclose(out["bpd"], losses_.mean() * nats_to_bpd, rtol=1e-6)
  np.testing.assert_allclose(out["bpd_stderr"], stderr * nats_to_bpd, rtol=1e-6)


def test_evaluation_refuses_values_outside_the_vocabulary():
  config = smoke.get_config()
  config.model.vocab_size = 32
  model = config_lib.build_model(config)
  images = np.full((5, 8, 8, 1), 7, np.uint8)
  params = model.init(jax.random.key(0), images, jax.random.key(1))["params"]
  ok = evaluation.evaluate(model, params, input_pipeline.Split(images), batch_size=4, draws=1, key=jax.random.key(2))
  assert ok["num_examples"] == 5 and ok["bpd"] > 0
  images[4, 3, 3, 0] = 40  # in the last, padded batch
  with pytest.raises(input_pipeline.DataError, match=r"values up to 40, expected all < vocab_size \(32\)"):
    evaluation.evaluate(model, params, input_pipeline.Split(images), batch_size=4, draws=1, key=jax.random.key(2))


def test_standard_error_shrinks_with_more_draws(setup):
  config, model, _, state = setup
  split = input_pipeline.Split(np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype(np.uint8))
  step = evaluation.make_eval_step(model)
  errs = [evaluation.evaluate(model, state.params, split, batch_size=64, draws=r, key=jax.random.key(1),
                              eval_step=step)["bpd_stderr"] for r in (2, 8)]
  assert errs[1] < 0.75 * errs[0]  # ~1/√R: expect 0.5


def test_training_resumed_from_a_checkpoint_equals_uninterrupted(setup, tmp_path):
  config, model, optimizer, state0 = setup
  fn = train_step.make_train_fn(config, model, optimizer)
  batches = [_batch(seed=i) for i in range(4)]
  a = jax.tree.map(jnp.copy, state0)
  for b in batches:
    a, _ = fn(a, b)
  b_state = jax.tree.map(jnp.copy, state0)
  for b in batches[:2]:
    b_state, _ = fn(b_state, b)
  mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
  checkpoints.save(mngr, b_state, config)
  b_state = checkpoints.restore(checkpoints.manager(str(tmp_path / "ckpt"), read_only=True), state0)
  assert int(b_state.step) == 2
  for b in batches[2:]:
    b_state, _ = fn(b_state, b)
  raw = lambda s: s.replace(key=jax.random.key_data(s.key))  # noqa: E731
  for x, y in zip(jax.tree.leaves(raw(a)), jax.tree.leaves(raw(b_state))):
    np.testing.assert_array_equal(x, y)  # bitwise: params, EMA, optimiser state, step, key


def test_validation_names_the_field():
  config = smoke.get_config()
  config.model.schedule.gamma_min = 6.0
  with pytest.raises(config_lib.ConfigError, match=r"config.model.schedule.gamma_min: expected < model.schedule.gamma_max"):
    config_lib.validate(config)
  config = smoke.get_config()
  config.training.log_every = 3
  config.training.steps_per_call = 2
  with pytest.raises(config_lib.ConfigError, match="config.training.log_every: expected a multiple of"):
    config_lib.validate(config)
  config = smoke.get_config()
  config.model.schedule.name = "wobbly"
  with pytest.raises(config_lib.ConfigError, match="config.model.schedule.name: expected one of"):
    config_lib.validate(config)
  for field, value, expected in [("dropout_rng", "xorshift", r"one of \('threefry', 'philox', 'rbg', 'packed'\), got 'xorshift'"),
                                 ("scan_unroll", -1, r"an integer ≥ 0 \(1 = one block per loop iteration, 0 = automatic\)"),
                                 ("threefry_gpu_kernel", None, "True or False, got None"),
                                 ("skip_concat", "after", r"one of \('before_norm', 'after_norm'\)")]:
    config = smoke.get_config()
    config.execution[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.execution.{field}: expected {expected}"):
      config_lib.validate(config)


def test_setup_sets_jaxs_threefry_lowering_from_the_config():
  # Read only when lowering for a GPU: here it changes nothing but the setting itself.
  for value in (False, True):
    config = smoke.get_config()
    config.execution.threefry_gpu_kernel = value
    training.setup(config, (8, 8, 1))
    assert jax.config.jax_threefry_gpu_kernel_lowering is value


def test_setup_runs_on_a_jax_without_the_threefry_lowering_option(monkeypatch):
  # JAX's changelog (0.4.27) meant to remove the option; a JAX without it rejects the name.
  update = jax.config.update

  def without_the_option(name, value):
    if name == "jax_threefry_gpu_kernel_lowering":
      raise AttributeError(f"Unrecognized config option: {name}")
    update(name, value)

  monkeypatch.setattr(jax.config, "update", without_the_option)
  *_, init = training.setup(smoke.get_config(), (8, 8, 1))
  assert jax.tree.leaves(jax.eval_shape(init))


def _pattern(n=8):
  """Learnable data: one smooth 8×8 image, shifted in brightness per example."""
  ramp = np.add.outer(np.arange(8), np.arange(8)) * 12
  return np.stack([ramp + 10 * i for i in range(n)])[None, ..., None].astype(np.uint8)


def test_bfloat16_training_lowers_the_loss_with_float32_params_and_terms():
  config = smoke.get_config()
  config.execution.dtype = "bfloat16"
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-2, 0
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  fn = train_step.make_train_fn(config, model, optimizer)
  batch = _pattern()
  split = input_pipeline.Split(batch[0])
  bpd = lambda params: evaluation.evaluate(model, params, split, batch_size=8, draws=16,  # noqa: E731
                                           key=jax.random.key(5))["bpd"]
  before = bpd(state.params)
  for _ in range(30):
    state, metrics = fn(state, batch)
    assert metrics["train/bpd"].dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if hasattr(leaf, "dtype")
             and jnp.issubdtype(leaf.dtype, jnp.floating))
  after = bpd(state.params)
  assert after < before - 1.0, (before, after)


def test_bfloat16_runs_only_the_network_in_bfloat16():
  """Around a bf16 network the likelihood stays float32: the diffusion term equals the float64
  formula applied to the network's own ε̂, and the terms without the network equal float32's."""
  config = smoke.get_config()
  f32 = config_lib.build_model(config)
  config.execution.dtype = "bfloat16"
  bf16 = config_lib.build_model(config)
  x = jnp.asarray(_batch()[0])
  params = f32.init(jax.random.key(0), x, jax.random.key(1))
  params = perturbed(params)  # move off the identity-at-init network
  noise = model_lib.draw_noise(jax.random.key(2), x.shape)
  a, b = (jax.jit(m.apply)(params, x, None, noise=noise) for m in (f32, bf16))
  for term in ("loss_recon", "loss_prior"):
    assert b[term].dtype == jnp.float32
    np.testing.assert_array_equal(a[term], b[term])

  def eps_hat_and_weight(params):  # z_t as the model forms it; ε̂ from the bf16 network
    gamma = lambda t: bf16.apply(params, t, method=lambda m, t: m.gamma(t))  # noqa: E731
    gamma_t, dgamma = jax.jvp(gamma, (noise["t"],), (jnp.ones_like(noise["t"]),))
    alpha, sigma = model_lib.alpha_sigma(gamma_t[:, None, None, None])
    z_t = alpha * losses.encode(x) + sigma * noise["eps"]
    return bf16.apply(params, z_t, gamma_t, method=lambda m, z, g: m.eps_hat(z, g)), dgamma

  eps_hat, dgamma = jax.jit(eps_hat_and_weight)(params)
  assert eps_hat.dtype == jnp.float32
  err = np.asarray(noise["eps"], np.float64) - np.asarray(eps_hat, np.float64)
  want = 0.5 * np.asarray(dgamma, np.float64) * np.sum(err**2, axis=(1, 2, 3))
  np.testing.assert_allclose(b["loss_diff"], want, rtol=1e-5)
  assert not np.allclose(a["loss_diff"], b["loss_diff"], rtol=1e-3)  # the network did run in bf16 …
  np.testing.assert_allclose(a["loss_diff"], b["loss_diff"], rtol=0.05)  # … close to float32


def test_dropout_prngs_repeat_with_the_seed_and_draw_other_masks_than_threefry():
  """execution.dropout_rng="packed" (and "philox"): masks from another generator seeded by the step's key, so
  the same state and batch give the same step (runs repeat and resume exactly), with other masks than
  threefry's. ("rbg" takes the same path: its key is checked below, its masks in the network by the device
  check.)"""
  config = smoke.get_config()
  config.model.network.dropout = 0.5
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  state = state.replace(params=perturbed(state.params))  # every block gets a gradient
  raw = lambda s: s.replace(key=jax.random.key_data(s.key))  # noqa: E731
  stepped = {}
  for impl, times in (("packed", 2), ("philox", 1), ("threefry", 1)):
    config.execution.dropout_rng = impl
    fn = train_step.make_train_fn(config, model, optimizer)
    stepped[impl] = [jax.device_get(raw(fn(jax.tree.map(jnp.copy, state), _batch())[0])) for _ in range(times)]
  for x, y in zip(jax.tree.leaves(stepped["packed"][0]), jax.tree.leaves(stepped["packed"][1])):
    np.testing.assert_array_equal(x, y)
  # Other masks, other gradients (seen in Adam's first moment: the warm-up's first learning rate is 0).
  kernels = {impl: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(s[0].opt_state[0].mu)
                    if "kernel" in jax.tree_util.keystr(p)} for impl, s in stepped.items()}
  assert len(kernels["threefry"]) > 10
  for other in ("packed", "philox"):
    assert all(not np.allclose(x, kernels["threefry"][k]) for k, x in kernels[other].items())
  assert all(not np.allclose(x, kernels["philox"][k]) for k, x in kernels["packed"].items())


@pytest.mark.parametrize("impl", ["philox", "rbg", "packed"])
def test_dropout_key_keeps_the_rate_and_changes_with_the_step(impl):
  keys = [train_step.make_dropout_key(jax.random.fold_in(jax.random.key(0), n), impl) for n in range(2)]
  spec = dropout.PACKED if impl == "packed" else config_lib.DROPOUT_RNGS[impl]
  assert jax.random.key_impl(keys[0]) == jax.random.key_impl(jax.random.key(0, impl=spec))
  masks = [np.asarray(dropout.draw_keep(k, 0.9, (200_000,))[0]) for k in keys]
  for m in masks:
    assert abs(m.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / m.size)
  assert 0.75 < (masks[0] == masks[1]).mean() < 0.9  # independent masks agree on 0.9² + 0.1² = 82 %
  with pytest.raises(ValueError, match="dropout_rng: expected one of"):
    train_step.make_dropout_key(keys[0], "xorshift")
