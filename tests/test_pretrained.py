"""vdm.load and sample.py on a smoke checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import vdm
from configs import smoke
from vdm import training
from vdm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_data):
  path = str(tmp_path_factory.mktemp("smoke"))
  config = smoke.get_config()
  config.data.dataset = small_data
  config.eval.num_samples = 0
  config.eval.periodic_examples = 16
  config.eval.batch_size = 10  # small_data: 10 test digits, one batch
  training.train_and_evaluate(config, path, progress=False)
  return path


def test_load_a_workdir_or_a_checkpoint_folder(workdir):
  trained = vdm.load(workdir)
  assert trained.step == 4 and trained.image_shape == (28, 28, 1)
  assert trained.config.model.network.channels == 8
  again = vdm.load(os.path.join(workdir, "checkpoints", "2"))
  assert again.step == 2
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(again.params))]
  assert max(moved) > 0  # different steps, different EMA params
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    vdm.load(os.path.join(workdir, "nothing-here"))


def test_samples_depend_only_on_key_and_index(workdir):
  trained = vdm.load(workdir)
  key = jax.random.key(3)
  a = trained.sample(key, 3, num_steps=4)
  assert a.dtype == np.uint8 and a.shape == (3, 28, 28, 1)
  assert a.std() > 0  # not constant
  np.testing.assert_array_equal(trained.sample(key, 3, num_steps=4), a)
  one_at_a_time = trained.sample(key, 3, num_steps=4, batch_size=1)
  np.testing.assert_array_equal(one_at_a_time, a)
  np.testing.assert_array_equal(trained.sample(key, 2, num_steps=4, batch_size=2), a[:2])
  assert not np.array_equal(trained.sample(jax.random.key(4), 3, num_steps=4), a)
  images, latents = trained.sample(key, 2, num_steps=4, sampler="ddim", eta=0.0, return_latents=True)
  assert latents.shape == (2, 28, 28, 1) and latents.dtype == np.float32


def test_the_corrector_defaults_to_the_checkpoint_config(workdir):
  trained = vdm.load(workdir)
  key = jax.random.key(3)
  assert trained.langevin("ancestral") == (0, 0.1)  # base config: no corrector
  plain = trained.sample(key, 2, num_steps=4)
  corrected = trained.sample(key, 2, num_steps=4, langevin_steps=2, langevin_snr=0.2)
  assert not np.array_equal(corrected, plain)
  trained.config.eval.langevin_steps, trained.config.eval.langevin_snr = 2, 0.2  # as configs/mnist_samples.py sets
  assert trained.langevin("ancestral") == (2, 0.2) and trained.langevin("ode") == (0, 0.2)
  assert trained.langevin("ddim", 0, 0.3) == (0, 0.3)  # given values win
  np.testing.assert_array_equal(trained.sample(key, 2, num_steps=4), corrected)


def test_evaluate_bpd_of_user_images(workdir):
  trained = vdm.load(workdir)
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
  out = trained.evaluate_bpd(images, jax.random.key(0), draws=2)
  assert out["num_examples"] == 5 and out["per_example"].shape == (5,)
  np.testing.assert_allclose(out["per_example"].mean(), out["bpd"], rtol=1e-5)
  # A second call reuses the compiled eval step: no new jit, no new compilation.
  from vdm import evaluation
  hits = evaluation.make_eval_step.cache_info().hits
  again = trained.evaluate_bpd(images, jax.random.key(0), draws=2)
  assert evaluation.make_eval_step.cache_info().hits == hits + 1
  np.testing.assert_array_equal(again["per_example"], out["per_example"])


def _sample_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_sample_cli_writes_png_and_npz(workdir, tmp_path):
  proc = _sample_cli(f"--workdir={workdir}", "--num_samples=4", "--num_steps=3", f"--output={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  npz = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
  png = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert len(npz) == 1 and len(png) == 1 and str(tmp_path) in proc.stdout
  assert "read only" not in proc.stderr and "save_interval_steps" not in proc.stderr  # orbax's expected notes
  assert "sample:" in proc.stderr and "| 1/3 [" in proc.stderr  # the bar counts sampler steps, not batches
  with np.load(tmp_path / npz[0]) as f:
    assert f["samples"].shape == (4, 28, 28, 1) and f["samples"].dtype == np.uint8


def test_with_execution_changes_how_the_network_computes_not_what(workdir, tmp_path):
  trained = vdm.load(workdir)
  fast = trained.with_execution(dtype="bfloat16")
  assert fast.model.network.dtype == jnp.bfloat16 and fast.config.execution.dtype == "bfloat16"
  assert trained.model.network.dtype == jnp.float32 and trained.config.execution.dtype == "float32"  # untouched
  assert fast.params is trained.params and fast.step == trained.step
  key = jax.random.key(3)
  a, b = trained.sample(key, 4, num_steps=4), fast.sample(key, 4, num_steps=4)
  assert not np.array_equal(a, b)  # bf16 arithmetic: other roundings …
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0  # … of the same samples (grey levels of 0–255)
  with pytest.raises(ConfigError, match="execution.dtype"):
    trained.with_execution(dtype="float16")
  with pytest.raises(ConfigError, match="execution.channels: no such field"):
    trained.with_execution(channels=4)
  proc = _sample_cli(f"--workdir={workdir}", "--num_samples=2", "--num_steps=2", "--dtype=float16",
                     f"--output={tmp_path}")
  assert proc.returncode == 2 and "execution.dtype" in proc.stderr


def test_sample_quality_scores_several_seeds_and_their_mean(workdir, capsys):
  from vdm import sample_quality
  sample_quality.main([f"--workdir={workdir}", "--num_samples=12", "--num_steps=2", "--classifier_steps=3",
                       "--seed=0,1,2"])
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert len(lines) == 4 and [r["seed"] for r in lines[:3]] == [0, 1, 2]
  ratios = np.array([r["fd_ratio"] for r in lines[:3]])
  assert len(set(ratios.tolist())) == 3  # other samples and another classifier per seed
  summary = lines[3]
  assert summary["seeds"] == [0, 1, 2] and summary["fd_ratios"] == ratios.tolist()
  assert summary["fd_ratio_mean"] == pytest.approx(ratios.mean())
  assert summary["fd_ratio_sem"] == pytest.approx(np.std(ratios, ddof=1) / np.sqrt(3))
  assert summary["step"] == 4 and summary["num_steps"] == 2 and "label_accuracy_mean" not in summary
  # One seed: its line alone, the same as that seed's line among several.
  sample_quality.main([f"--workdir={workdir}", "--num_samples=12", "--num_steps=2", "--classifier_steps=3",
                       "--seed=1"])
  assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == [lines[1]]
  for bad in ("1,x", "0,0", ""):
    with pytest.raises(SystemExit) as stop:
      sample_quality.main([f"--workdir={workdir}", f"--seed={bad}"])
    assert stop.value.code == 2
    assert "--seed: expected distinct integers" in capsys.readouterr().err
  with pytest.raises(ValueError, match="two or more seeds"):
    sample_quality.summarize(lines[:1])
