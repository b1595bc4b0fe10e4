"""Data parallelism on faked CPU devices: 8 devices ≡ 1 device, two processes ≡ one, accumulation."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

import jax
from configs import smoke
from vdm import config as config_lib
from vdm import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  # NPROC=16 keeps CPU collectives on 2 cores from deadlocking.
  return dict(os.environ, JAX_PLATFORMS="cpu", NPROC="16",
              XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")


def _worker(tmp_path, devices, name, grad_accum=1, dropout_rng="", group_norm=""):
  out = tmp_path / f"{name}.npz"
  env = dict(_env(devices), **({"VDM_WORKER_GROUP_NORM": group_norm} if group_norm else {}))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py"), str(out), "3",
                         str(grad_accum), dropout_rng], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out))


def _assert_params_close(a, b, rtol=1e-5):
  keys = [k for k in a if k.startswith("[")]
  assert keys and set(keys) == {k for k in b if k.startswith("[")}
  for k in keys:
    scale = max(float(np.abs(a[k]).max()), 1e-6)
    assert float(np.abs(a[k] - b[k]).max()) <= rtol * scale + 1e-7, k


def test_eight_devices_equal_one(tmp_path):
  one = _worker(tmp_path, 1, "one")
  eight = _worker(tmp_path, 8, "eight")
  assert int(one["num_devices"]) == 1 and int(eight["num_devices"]) == 8
  # JAX's Threefry GPU kernel (execution.threefry_gpu_kernel) on one device only: XLA cannot split it.
  assert bool(one["threefry_kernel"]) and not bool(eight["threefry_kernel"])
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  _assert_params_close(one, eight)


def test_pallas_norms_run_on_each_devices_share_of_the_batch(tmp_path):
  # XLA cannot split a custom call over the batch: without vdm.sharding.on_mesh each device would gather the
  # whole batch for every norm (38 all-gathers in this step). Now none, and the same training as on one device.
  one = _worker(tmp_path, 1, "one", group_norm="pallas")
  four = _worker(tmp_path, 4, "four", group_norm="pallas")
  assert list(four["gathers"]) == [] and int(four["num_devices"]) == 4
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
  _assert_params_close(one, four)


def test_with_packed_dropout_masks_four_devices_equal_one(tmp_path):
  # The masks are a function of each activation's index in the whole batch, wherever it is computed.
  one = _worker(tmp_path, 1, "one", dropout_rng="packed")
  four = _worker(tmp_path, 4, "four", dropout_rng="packed")
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
  _assert_params_close(one, four)
  without = _worker(tmp_path, 1, "without")  # the masks did act: other gradients, other parameters
  assert max(float(np.abs(one[k] - without[k]).max()) for k in one if k.startswith("[")) > 1e-6


def test_philox_masks_over_several_devices_are_refused_with_the_alternative(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/smoke.py",
                         f"--workdir={tmp_path / 'w'}", "--config.model.network.dropout=0.1",
                         "--config.execution.dropout_rng=philox"],
                        cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
  if proc.returncode == 0:  # a JAX that partitions lax.mulhi: nothing to refuse
    return
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "execution.dropout_rng: 'philox' masks do not compile" in proc.stderr and "use 'packed'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_gradient_accumulation_equals_one_big_step(tmp_path):
  whole = _worker(tmp_path, 1, "whole", grad_accum=1)
  micro = _worker(tmp_path, 1, "micro", grad_accum=4)
  np.testing.assert_allclose(micro["losses"], whole["losses"], rtol=1e-5)
  _assert_params_close(whole, micro)


def test_batch_that_does_not_split_over_devices_fails_before_compiling(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/smoke.py",
                         f"--workdir={tmp_path / 'w'}", "--config.training.batch_size=6"],
                        cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "config.training.batch_size" in proc.stderr and "multiple of the 4 devices" in proc.stderr
  assert "Traceback" not in proc.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, small_data):
  args = ["--config=configs/smoke.py", f"--config.data.dataset={small_data}", "--config.model.network.dropout=0.0",
          "--config.training.num_steps=3",
          "--config.training.log_every=1", "--config.training.checkpoint_every=3",
          "--config.eval.sample_steps=2", "--config.eval.periodic_examples=0"]
  single = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'single'}", *args], cwd=ROOT,
                          env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "train.py", f"--workdir={tmp_path / 'multi'}", *args,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:] + "\n--- first part of stderr ---\n" + "\n".join(line for line in err.splitlines() if "train:" not in line)[:6000]
  single_record = json.loads(single.stdout.strip().splitlines()[-1])
  multi_record = json.loads(outs[0][0].strip().splitlines()[-1])
  assert multi_record["num_examples"] == single_record["num_examples"] == 10  # 10 over 4 devices: padded, masked
  np.testing.assert_allclose(multi_record["bpd"], single_record["bpd"], rtol=1e-4)
  # Only process 0 wrote the logs: one line per log step, one eval file.
  with open(tmp_path / "multi" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f if "train/bpd" in line] == [1, 2, 3]

  config = smoke.get_config()
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  like = jax.eval_shape(lambda: train_step.create_train_state(config, model, optimizer, (28, 28, 1)))
  from vdm import checkpoints
  states = [checkpoints.restore(checkpoints.manager(str(tmp_path / w / "checkpoints"), read_only=True), like)
            for w in ("single", "multi")]
  assert int(states[0].step) == int(states[1].step) == 3
  flat = [{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(s.params)}
          for s in states]
  _assert_params_close(*flat)

  # vdm.load(...).evaluate_bpd in two processes: each process gets every image's score, as one process does
  # (10 images over 2 × 2 devices: padded, masked, gathered).
  images = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 1)).astype(np.uint8)
  np.save(tmp_path / "images.npy", images)
  port = _free_port()
  evals = [subprocess.Popen([sys.executable, "tests/parallel_worker.py", "evaluate", str(tmp_path / "single"),
                             str(tmp_path / f"eval{i}.npz"), str(tmp_path / "images.npy"), f"127.0.0.1:{port}", "2",
                             str(i)], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in evals:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  import vdm
  want = vdm.load(str(tmp_path / "single")).evaluate_bpd(images, jax.random.key(7), draws=2)
  for i in range(2):
    with np.load(tmp_path / f"eval{i}.npz") as got:
      assert int(got["process_count"]) == 2 and int(got["device_count"]) == 4 and int(got["num_examples"]) == 10
      np.testing.assert_allclose(got["per_example"], want["per_example"], rtol=1e-5)
      np.testing.assert_allclose(got["bpd"], want["bpd"], rtol=1e-5)


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  import signal
  import time
  port = _free_port()
  args = ["--config=configs/smoke.py", "--config.training.num_steps=4000", "--config.training.log_every=1",
          "--config.training.checkpoint_every=4000", "--config.training.eval_every=0", "--config.eval.num_samples=0"]
  procs = [subprocess.Popen([sys.executable, "train.py", f"--workdir={tmp_path / 'multi'}", *args,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  metrics = tmp_path / "multi" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][1][-1500:] + outs[1][1][-1500:]
  steps = {int(err.split("at step ")[1].split(";")[0]) for _, err in outs}
  assert len(steps) == 1
  assert os.listdir(tmp_path / "multi" / "checkpoints") == [str(steps.pop())]
