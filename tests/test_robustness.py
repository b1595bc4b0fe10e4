"""Never lose work: kill and resume bitwise, SIGTERM checkpoints, non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from configs import smoke
from vdm import checkpoints, train_step, training
from vdm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config=configs/smoke.py", "--config.training.eval_every=0", "--config.eval.num_samples=0",
         "--config.eval.batch_size=10"]  # small_data: 10 test digits, one batch


def _start(workdir, data, *args):
  return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *QUICK,
                           f"--config.data.dataset={data}", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoints(workdir, count, proc, timeout=300):
  deadline = time.time() + timeout
  folder = os.path.join(workdir, "checkpoints")
  while time.time() < deadline:
    done = [d for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    if len(done) >= count:
      return
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  raise AssertionError("no checkpoints in time")


def _final_state(workdir):
  config = smoke.get_config()
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  like = jax.eval_shape(lambda: train_step.create_train_state(config, model, optimizer, (28, 28, 1)))
  state = checkpoints.restore(checkpoints.manager(os.path.join(workdir, "checkpoints"), read_only=True), like)
  return state.replace(key=jax.random.key_data(state.key))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, small_data):
  args = ["--config.training.num_steps=16", "--config.training.checkpoint_every=2",
          "--config.training.checkpoints_to_keep=3"]
  straight = _start(tmp_path / "straight", small_data, *args)
  assert straight.wait(timeout=600) == 0, straight.communicate()[1][-2000:]
  killed = tmp_path / "killed"
  for count in (1, 3):  # killed twice at whatever moment it is in, possibly mid-write
    proc = _start(killed, small_data, *args)
    _wait_for_checkpoints(str(killed), count, proc)
    time.sleep(np.random.default_rng(count).uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed = _start(killed, small_data, *args)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-2000:]
  assert "resuming from step" in err
  a, b = _final_state(str(tmp_path / "straight")), _final_state(str(killed))
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _quick_config(data, **training_fields):
  """The smoke config as QUICK sets it (no periodic eval, no samples) on ``data``, with ``training_fields``."""
  config = smoke.get_config()
  config.data.dataset = data
  config.training.eval_every, config.eval.num_samples, config.eval.batch_size = 0, 0, 10
  config.training.update(training_fields)
  return config


def test_a_half_written_checkpoint_is_ignored(tmp_path, capsys, small_data):
  workdir = tmp_path / "run"
  training.train_and_evaluate(_quick_config(small_data, checkpoint_every=2), str(workdir), progress=False)
  # What a kill during orbax's write of step 6 leaves: a temporary folder, never renamed.
  partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 10)
  capsys.readouterr()
  training.train_and_evaluate(_quick_config(small_data, checkpoint_every=2, num_steps=6), str(workdir),
                              progress=False)
  assert "resuming from step 4" in capsys.readouterr().err
  assert int(_final_state(str(workdir)).step) == 6


def test_sigterm_checkpoints_the_current_step_and_resumes(tmp_path, small_data):
  workdir = tmp_path / "run"
  args = ["--config.training.num_steps=2000", "--config.training.checkpoint_every=1000",
          "--config.training.log_every=1"]
  proc = _start(workdir, small_data, *args)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "stopped by SIGTERM at step" in err
  assert "SIGTERM received: stopping after the current step and writing a checkpoint" in err  # said at once
  step = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert os.listdir(workdir / "checkpoints") == [str(step)]
  resumed = _start(workdir, small_data, *args, "--config.training.num_steps=" + str(step + 2))
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0 and f"resuming from step {step}" in err
  assert json.loads(out.strip().splitlines()[-1])["step"] == step + 2


class _PoisonedModel:
  """The model, except that its loss_diff is NaN where ``poison`` is True: a fault injected from outside."""

  def __init__(self, model, poison):
    self._model, self._poison = model, poison

  def __getattr__(self, name):
    return getattr(self._model, name)

  def apply(self, *args, **kwargs):
    out = self._model.apply(*args, **kwargs)
    return {**out, "loss_diff": jnp.where(self._poison, jnp.nan, out["loss_diff"])}


def _train_poisoned(monkeypatch, workdir, data, at_step, **training_fields):
  """train_and_evaluate on the smoke config, with the update of ``state.step == at_step`` poisoned."""
  clean_step = train_step.train_step

  def poisoned_step(state, batch, *, model, **kwargs):
    return clean_step(state, batch, model=_PoisonedModel(model, state.step == at_step), **kwargs)

  monkeypatch.setattr(train_step, "train_step", poisoned_step)
  return training.train_and_evaluate(_quick_config(data, **training_fields), str(workdir), progress=False)


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch, small_data, steps_per_call):
  record = _train_poisoned(monkeypatch, tmp_path, small_data, at_step=1, steps_per_call=steps_per_call)
  with open(tmp_path / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if "train/bpd" in line]
  assert [m["train/skipped_steps"] for m in train] == [1.0, 0.0]  # a count, also when 2 steps share a call
  assert all(np.isfinite(m["train/bpd"]) for m in train[1:])
  assert np.isfinite(record["bpd"])
  state = _final_state(str(tmp_path))
  assert int(state.step) == 4
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_skipped_update_leaves_the_state_as_it_was(monkeypatch):
  """The poisoned step advances only the step counter: params, EMA and optimiser state are unchanged."""
  config = smoke.get_config()
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  before = jax.device_get(state)
  batch = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 8, 1)).astype(np.uint8)
  clean_step = train_step.train_step
  monkeypatch.setattr(train_step, "train_step", lambda state, batch, *, model, **kw: clean_step(
      state, batch, model=_PoisonedModel(model, True), **kw))
  after, metrics = train_step.make_train_fn(config, model, optimizer)(state, batch)
  assert int(after.step) == 1
  assert float(metrics["train/nonfinite"]) == 1.0 and float(metrics["train/nonfinite_step"]) == 1.0
  assert train_step.NONFINITE_TERMS[int(metrics["train/nonfinite_term"])] == "loss_diff"
  for name in ("params", "ema_params", "opt_state", "key"):
    for a, b in zip(jax.tree.leaves(jax.device_get(getattr(after, name))),
                    jax.tree.leaves(getattr(before, name))):
      np.testing.assert_array_equal(jax.random.key_data(a) if name == "key" else a,
                                    jax.random.key_data(b) if name == "key" else b)


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_nonfinite_loss_stops_with_the_step_in_the_message(tmp_path, monkeypatch, small_data, steps_per_call):
  with pytest.raises(train_step.NonFiniteError, match="non-finite loss_diff at step 3 "):
    _train_poisoned(monkeypatch, tmp_path, small_data, at_step=2, on_nonfinite="stop", steps_per_call=steps_per_call)
  state = _final_state(str(tmp_path))  # the checkpoint of step 2, finite
  assert int(state.step) == 2
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))
