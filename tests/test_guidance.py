"""Class-conditional models, classifier-free guidance, encoding to z_1 and interpolation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import oracles

import jax
import jax.numpy as jnp
import vdm
from configs import smoke
from vdm import guidance, input_pipeline, networks, sampling, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_drop_labels_replaces_a_share_by_the_null_class_and_nothing_else():
  labels = jnp.arange(20_000) % 10
  assert guidance.drop_labels(jax.random.key(0), labels, 0.0, 10) is labels
  dropped = np.asarray(guidance.drop_labels(jax.random.key(0), labels, 0.3, 10))
  changed = dropped != np.asarray(labels)
  assert set(dropped[changed]) == {10}
  assert abs(changed.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 20_000)


def test_guided_eps_is_the_classifier_free_combination_in_one_call():
  calls = []

  def eps_fn(z, gamma, labels):  # a stand-in whose output says which label it saw
    calls.append(z.shape[0])
    return z * 0 + labels[:, None].astype(jnp.float32) + gamma[:, None]

  z, gamma, labels = jnp.ones((3, 2)), jnp.array([0.5, 1.0, 2.0]), jnp.array([1, 2, 3])
  got = guidance.guided_eps_hat(eps_fn, z, gamma, labels, 2.5, 10)
  want = 3.5 * (labels[:, None] + gamma[:, None]) - 2.5 * (10 + gamma[:, None])
  np.testing.assert_allclose(np.asarray(got), np.broadcast_to(want, (3, 2)), rtol=1e-6)
  assert calls == [6]  # both halves in one batch of twice the size
  np.testing.assert_allclose(np.asarray(guidance.guided_eps_hat(eps_fn, z, gamma, labels, 0.0, 10)),
                             np.broadcast_to(labels[:, None] + gamma[:, None], (3, 2)))
  assert calls == [6, 3]  # w = 0: the conditional model alone


def test_labels_condition_the_network_and_no_labels_means_the_null_class():
  net = networks.ScoreUNet(channels=8, num_blocks=1, dropout=0.0, mid_attention=False, fourier_exponents=(),
                           scan_blocks=False, num_classes=3)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = net.init(jax.random.key(1), z, jnp.zeros((2,)), labels=jnp.array([0, 1]))
  # The output layer starts at zero; perturb it so the conditioning shows in ε̂.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  out = lambda labels: net.apply(params, z, jnp.zeros((2,)), labels=labels)  # noqa: E731
  assert params["params"]["label_emb"]["embedding"].shape == (4, 32)  # 3 classes + the null class
  assert float(jnp.abs(out(jnp.array([0, 0])) - out(jnp.array([1, 1]))).max()) > 1e-3
  np.testing.assert_array_equal(out(None), out(jnp.array([3, 3])))


def test_batches_carry_each_images_label(small_data):
  split = input_pipeline.load_dataset(small_data)["train"]
  first = next(input_pipeline.train_batches(split, 16, seed=0, labels=True, steps_per_call=2))
  assert first["labels"].shape == (2, 16) and first["labels"].dtype == np.int32
  lookup = {split.images[i].tobytes(): split.labels[i] for i in range(len(split))}
  for image, label in zip(first["images"].reshape(-1, 28, 28, 1), first["labels"].reshape(-1)):
    assert lookup[image.tobytes()] == label
  images, mask, labels = next(input_pipeline.eval_batches(split, 16, labels=True))
  np.testing.assert_array_equal(labels, split.labels[:16])
  assert "labels" not in next(input_pipeline.train_batches(split, 16, seed=0))


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, small_data):
  """A conditional smoke model trained 4 steps on 64 labelled digits (the test split: 10)."""
  workdir = str(tmp_path_factory.mktemp("conditional"))
  config = smoke.get_config()
  config.data.dataset = small_data
  config.model.num_classes = 10
  config.model.label_dropout = 0.5
  config.eval.guidance = 1.0
  config.eval.num_samples = 20
  config.eval.sample_steps = 3
  record = training.train_and_evaluate(config, workdir, progress=False)
  return workdir, record


def test_a_conditional_model_reports_both_likelihoods_and_draws_a_row_per_class(conditional):
  workdir, record = conditional
  assert record["num_examples"] == 10
  for key in ("bpd", "bpd_stderr", "bpd_unconditional", "bpd_unconditional_stderr"):
    assert np.isfinite(record[key])
  assert record["bpd"] != record["bpd_unconditional"]  # labels reach the network
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_4.png")))
  assert grid.shape == (10 * 29 + 1, 2 * 29 + 1)  # 10 rows (classes) of 2


def test_conditional_sampling_and_scoring_take_labels(conditional):
  workdir, _ = conditional
  trained = vdm.load(workdir)
  assert trained.num_classes == 10
  key, labels = jax.random.key(0), np.array([3, 3, 7])
  guided = trained.sample(key, 3, num_steps=3, labels=labels, guidance=2.0, progress=False)
  assert guided.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(trained.sample(key, 3, num_steps=3, labels=labels, guidance=2.0, progress=False,
                                               batch_size=2), guided)
  assert not np.array_equal(trained.sample(key, 3, num_steps=3, labels=labels, progress=False), guided)
  images = input_pipeline.load_dataset("mnist5k")["test"].images[:4]
  a = trained.evaluate_bpd(images, jax.random.key(1), labels=[7, 2, 1, 0])
  b = trained.evaluate_bpd(images, jax.random.key(1))  # the null class: −log p(x)
  assert np.isfinite(a["bpd"]) and a["bpd"] != b["bpd"]
  with pytest.raises(vdm.config.ConfigError, match=r"labels: expected classes in \[0, 9\]"):
    trained.sample(key, 2, labels=[0, 10])
  with pytest.raises(vdm.config.ConfigError, match="labels: expected 2 integers"):
    trained.sample(key, 2, labels=[0.5, 1.0])


def test_sample_py_draws_one_row_per_label_and_saves_the_labels(conditional, tmp_path):
  workdir, _ = conditional
  proc = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", "--labels=1,4", "--num_samples=3",
                         "--num_steps=2", "--guidance=1.5", f"--output={tmp_path}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(tmp_path / "ancestral_step4_n2_seed0_w1.5.npz") as out:
    np.testing.assert_array_equal(out["labels"], [1, 1, 1, 4, 4, 4])
    assert out["samples"].shape == (6, 28, 28, 1)
  rows = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", "--interpolate=2", "--points=3",
                         "--num_steps=3", f"--output={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rows.returncode == 0, rows.stderr[-2000:]
  with np.load(tmp_path / "interpolate_step4_n3_seed0.npz") as out:
    assert out["samples"].shape == (6, 28, 28, 1)  # 2 rows of 3
  unlabelled = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", "--num_samples=1",
                               "--num_steps=1", f"--output={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
  assert unlabelled.returncode == 0, unlabelled.stderr[-2000:]
  assert "without --labels it samples p(x) through its null class" in unlabelled.stderr
  bad = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", "--labels=1,x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "--labels: expected integers or 'all', got '1,x'" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_ddim_encoding_inverts_ddim_sampling_as_the_steps_grow():
  eps_fn = oracles.gaussian([0.3, -0.5, 0.0], [0.2, 0.05, 0.3])
  gamma_fn = lambda t: -13.3 + 18.3 * t  # noqa: E731
  z_0 = jnp.array([[0.31, -0.52, 0.1], [0.1, -0.45, -0.4]]) * jnp.sqrt(jax.nn.sigmoid(13.3))
  errors = []
  for n in (10, 100, 1000):
    z_1 = sampling.encode_loop(eps_fn, gamma_fn, z_0, n)
    back = sampling.sample_loop(eps_fn, gamma_fn, z_1, None, n, sampler="ddim", eta=0.0)
    errors.append(float(jnp.abs(back - z_0).max()))
  # DDIM is a first-order method: ten times the steps, about a tenth of the error (measured 0.15, 0.018, 0.0018).
  assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5 and errors[2] < 3e-3


def test_slerp_keeps_the_endpoints_and_the_norm():
  a = jnp.array([3.0, 0.0, 0.0])
  b = jnp.array([0.0, 3.0, 0.0])
  path = np.asarray(sampling.slerp(a, b, [0.0, 0.5, 1.0]))
  np.testing.assert_allclose(path[0], a, atol=1e-6)
  np.testing.assert_allclose(path[2], b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(path, axis=1), 3.0, rtol=1e-6)
  np.testing.assert_allclose(path[1], [3 / np.sqrt(2), 3 / np.sqrt(2), 0.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sampling.slerp(a, a, [0.25])), a[None], rtol=1e-6)  # parallel: no NaN


def test_encode_then_decode_converges_to_the_images_and_interpolation_keeps_its_ends(conditional):
  workdir, _ = conditional
  trained = vdm.load(workdir)
  images = input_pipeline.load_dataset("mnist5k")["test"].images[:2]
  errors = []
  for n in (10, 40):
    z_1 = trained.encode(images, n)
    assert z_1.shape == (2, 28, 28, 1) and z_1.dtype == np.float32
    back = trained.decode(z_1, n)
    assert back.dtype == np.uint8
    errors.append(np.abs(back.astype(int) - images.astype(int)).mean())
  # First order: 4× the steps, about ¼ of the pixel error (this 4-step model: 22 → 6.2 → 1.4 at 10, 40, 160).
  assert errors[0] / errors[1] > 2.5, errors
  row = trained.interpolate(images[0], images[1], num_points=4, num_steps=40)
  assert row.shape == (4, 28, 28, 1)
  np.testing.assert_array_equal(row[0], back[0])
  np.testing.assert_array_equal(row[-1], back[1])


def test_the_ode_sampler_is_deterministic_and_the_ode_likelihood_runs_from_the_command_line(conditional):
  workdir, _ = conditional
  trained = vdm.load(workdir)
  stats = {}
  a = trained.sample(jax.random.key(0), 2, sampler="ode", rtol=1e-3, atol=1e-3, progress=False, stats=stats)
  assert a.shape == (2, 28, 28, 1) and len(stats["solver_steps"]) == 1 and stats["solver_steps"][0] > 0
  np.testing.assert_array_equal(trained.sample(jax.random.key(0), 2, sampler="ode", rtol=1e-3, atol=1e-3,
                                               progress=False), a)
  proc = subprocess.run([sys.executable, "train.py", "--config=configs/smoke.py", f"--workdir={workdir}",
                         "--mode=eval", "--likelihood=ode", f"--config.data.dataset={trained.config.data.dataset}",
                         "--config.model.num_classes=10", "--config.model.label_dropout=0.5",
                         "--config.eval.ode.rtol=1e-3", "--config.eval.ode.atol=1e-3", "--config.eval.ode.examples=3"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["likelihood"] == "ode" and record["num_examples"] == 3 and record["nfe"] > 6
  assert np.isfinite(record["bpd"]) and record["bpd"] > 0
  with open(os.path.join(workdir, "eval", "test_step4_ode.json")) as f:
    assert json.load(f) == record
