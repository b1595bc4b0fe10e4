"""train.py end to end on the smoke config: outputs, resume, eval JSON, user errors."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def test_train_resume_and_eval(tmp_path, small_data):
  """On 64 training and 10 test digits (the embedded data's 500-image evaluation is Quick start's)."""
  workdir = str(tmp_path / "run")
  data = f"--config.data.dataset={small_data}"
  first = run("--config=configs/smoke.py", f"--workdir={workdir}", data)
  record = _last_json(first.stdout)
  assert record["step"] == 4 and record["num_examples"] == 10 and record["split"] == "test"
  for key in ("bpd", "bpd_stderr", "bpd_recon", "bpd_prior", "bpd_diff"):
    assert isinstance(record[key], float) and record[key] == record[key] and abs(record[key]) < 1e3
  assert abs(record["bpd"] - (record["bpd_recon"] + record["bpd_prior"] + record["bpd_diff"])) < 1e-3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [m["step"] for m in lines if "train/bpd" in m] == [2, 4]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.path.isfile(os.path.join(workdir, "samples", "step_4.png"))
  with open(os.path.join(workdir, "eval", "gamma_step4.json")) as f:  # the learned schedule, as evaluated
    curve = json.load(f)
  assert len(curve["t"]) == len(curve["gamma"]) == 101 and curve["t"][0] == 0.0 and curve["t"][-1] == 1.0
  assert all(b > a for a, b in zip(curve["gamma"], curve["gamma"][1:]))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["training"]["num_steps"] == 4

  # The same command with more steps resumes at 4, not 0; keeps the last 2 checkpoints.
  second = run("--config=configs/smoke.py", f"--workdir={workdir}", data, "--config.training.num_steps=6")
  assert "resuming from step 4" in second.stderr
  assert _last_json(second.stdout)["step"] == 6
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/bpd" in line]
  assert steps == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]

  # Run again with fewer steps than the checkpoint has: nothing is trained, and it says so. The programs it
  # compiles (evaluation, sampling) go to --compilation_cache; the same run without it gives the same record.
  cache = tmp_path / "xla"
  past = run("--config=configs/smoke.py", f"--workdir={workdir}", data, "--config.training.num_steps=4",
             f"--compilation_cache={cache}")
  assert "step 6 is not below training.num_steps (4): nothing to train" in past.stderr
  assert _last_json(past.stdout)["step"] == 6
  assert any(name.endswith("-cache") for name in os.listdir(cache))
  uncached = run("--config=configs/smoke.py", f"--workdir={workdir}", data, "--config.training.num_steps=4",
                 "--compilation_cache=none")
  assert _last_json(uncached.stdout) == _last_json(past.stdout)

  evaluated = run("--config=configs/smoke.py", f"--workdir={workdir}", data, "--mode=eval",
                  f"--checkpoint={workdir}/checkpoints/4")
  record = _last_json(evaluated.stdout)
  assert record["step"] == 4
  with open(os.path.join(workdir, "eval", "test_step4.json")) as f:
    assert json.load(f) == record


def test_help_exits_0_and_print_config_lists_fields_with_their_meaning():
  for script in ("train.py", "sample.py"):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr
  assert "--print_config" in run("--help").stdout
  out = run("--config=configs/smoke.py", "--print_config", "--config.training.num_steps=7").stdout
  lines = out.splitlines()
  assert "training.num_steps = 7  # optimiser steps in total" in lines
  assert "model.network.channels = 8  # width of the U-Net blocks at full resolution (× channel_mult below it)" in lines
  assert any(line.startswith("execution.matmul_precision = 'default'  # jax.default_matmul_precision") for line in lines)
  assert len(lines) > 40  # every field, one a line
  missing = run("--config=configs/smoke.py", check=False)
  assert missing.returncode == 2 and missing.stderr.strip() == "error: --workdir: required (a folder for checkpoints, "\
      "metrics and samples)"


def test_a_diverging_run_with_on_nonfinite_stop_exits_1_with_one_line(tmp_path):
  """A learning rate of 1e30 makes step 3's loss non-finite; train.py says so in one line and exits 1."""
  workdir = str(tmp_path / "run")
  proc = run("--config=configs/smoke.py", f"--workdir={workdir}", "--config.optimizer.learning_rate=1e30",
             "--config.training.on_nonfinite=stop", "--config.training.num_steps=6", check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "non-finite" in errors[0] and "training.on_nonfinite='stop'" in errors[0]
  assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # the last finite state is kept


def test_compilation_cache_folder_per_device_kind_and_a_bad_folder_is_one_line(tmp_path, monkeypatch):
  import jax

  import vdm
  from vdm import compilation_cache
  kind = compilation_cache.device_kind()  # this CPU: architecture and a hash of its instruction-set flags
  assert kind.startswith(f"cpu-{os.uname().machine}-") and len(kind.split("-")[-1]) == 8
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
  assert vdm.enable_compilation_cache() == str(tmp_path / "jax_own")  # JAX's own folder, left as it is
  assert updates == [("jax_enable_compilation_cache", True)]
  updates.clear()
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  folder = tmp_path / "cache" / "vdm" / "xla" / kind
  assert vdm.enable_compilation_cache() == str(folder) and folder.is_dir()
  assert updates == [("jax_enable_compilation_cache", True), ("jax_compilation_cache_dir", str(folder))]
  assert vdm.enable_compilation_cache("none") is None and updates[-1] == ("jax_enable_compilation_cache", False)

  blocker = tmp_path / "a_file"
  blocker.write_text("")
  bad = run("--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}", f"--compilation_cache={blocker}/xla",
            check=False)
  assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: --compilation_cache: cannot create "
                                                               f"'{blocker}/xla'"), bad.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
