"""Never lose work: kill and resume bitwise, SIGTERM checkpoints, non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import jax
from configs import smoke
from vdm import checkpoints, training
from vdm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config=configs/smoke.py", "--config.training.eval_every=0", "--config.eval.num_samples=0",
         "--config.eval.batch_size=500"]


def _start(workdir, *args):
  return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *QUICK, *args], cwd=ROOT,
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
  like = jax.eval_shape(lambda: training.create_train_state(config, model, optimizer, (28, 28, 1)))
  state = checkpoints.restore(checkpoints.manager(os.path.join(workdir, "checkpoints"), read_only=True), like)
  return state.replace(key=jax.random.key_data(state.key))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  args = ["--config.training.num_steps=16", "--config.training.checkpoint_every=2",
          "--config.training.checkpoints_to_keep=3"]
  straight = _start(tmp_path / "straight", *args)
  assert straight.wait(timeout=600) == 0, straight.communicate()[1][-2000:]
  killed = tmp_path / "killed"
  for count in (1, 3):  # killed twice at whatever moment it is in, possibly mid-write
    proc = _start(killed, *args)
    _wait_for_checkpoints(str(killed), count, proc)
    time.sleep(np.random.default_rng(count).uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed = _start(killed, *args)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-2000:]
  assert "resuming from step" in err
  a, b = _final_state(str(tmp_path / "straight")), _final_state(str(killed))
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_half_written_checkpoint_is_ignored(tmp_path):
  workdir = tmp_path / "run"
  first = _start(workdir, "--config.training.checkpoint_every=2")
  assert first.wait(timeout=300) == 0
  # What a kill during orbax's write of step 6 leaves: a temporary folder, never renamed.
  partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 10)
  resumed = _start(workdir, "--config.training.checkpoint_every=2", "--config.training.num_steps=6")
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-2000:]
  assert "resuming from step 4" in err
  assert int(_final_state(str(workdir)).step) == 6


def test_sigterm_checkpoints_the_current_step_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config.training.num_steps=2000", "--config.training.checkpoint_every=1000",
          "--config.training.log_every=1"]
  proc = _start(workdir, *args)
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
  resumed = _start(workdir, *args, "--config.training.num_steps=" + str(step + 2))
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0 and f"resuming from step {step}" in err
  assert json.loads(out.strip().splitlines()[-1])["step"] == step + 2


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
  proc = _start(tmp_path / "skip", "--config.training.debug_nonfinite_step=1")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  with open(tmp_path / "skip" / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if "train/bpd" in line]
  assert [m["train/skipped_steps"] for m in train] == [1.0, 0.0]
  assert np.isfinite(json.loads(out.strip().splitlines()[-1])["bpd"])
  state = _final_state(str(tmp_path / "skip"))
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_nonfinite_loss_stops_with_the_step_in_the_message(tmp_path):
  proc = _start(tmp_path / "stop", "--config.training.debug_nonfinite_step=2",
                "--config.training.on_nonfinite=stop")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert "non-finite loss_diff at step 3" in err
  state = _final_state(str(tmp_path / "stop"))  # the checkpoint of step 2, finite
  assert int(state.step) == 2
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))
