"""Bad input of every kind: one clear line, a non-zero exit (or a specific exception), nothing changed."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import jax
import vdm
from configs import smoke
from vdm import checkpoints, input_pipeline, sharding, training
from vdm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
  """A smoke workdir with checkpoints, and a float npz that is not image data."""
  path = tmp_path_factory.mktemp("bad")
  config = smoke.get_config()
  config.data.dataset = small_data
  config.eval.num_samples = 0
  training.train_and_evaluate(config, str(path / "run"), progress=False)
  np.savez(path / "float.npz", train=np.zeros((4, 8, 8), np.float32), test=np.zeros((2, 8, 8), np.float32))
  (path / "broken.py").write_text("def get_config(:\n")
  (path / "raising.py").write_text("def get_config():\n  raise ValueError('no such dataset here')\n")
  corrupt = path / "corrupt" / "checkpoints" / "3"
  corrupt.mkdir(parents=True)
  (corrupt / "garbage").write_text("not a checkpoint")
  return path


def _snapshot(folder):
  return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(folder) for f in files) if os.path.isdir(folder) else []


TRAIN = [  # (arguments after --config=configs/smoke.py, words expected on stderr)
    (["--config.training.nope=3"], "unknown config field config.training.nope"),
    (["--config.training.num_step=3"], "unknown config field config.training.num_step; did you mean "
                                       "config.training.num_steps?"),
    (["--config=configs/smoke_typo.py"], "--config: no such file 'configs/smoke_typo.py'; did you mean "
                                         "configs/smoke.py?"),
    (["--config={tmp}/broken.py"], "broken.py' could not be loaded: SyntaxError"),
    (["--config={tmp}/raising.py"], "raising.py' could not be loaded: ValueError: no such dataset here"),
    (["--print_config", "--config.model.network.dropout=2.0"],
     "config.model.network.dropout: expected a rate in [0, 1)"),
    (["--print_config", "--config.model.channels=16"],  # a field from before the config had sections
     "unknown config field config.model.channels; it moved to config.model.network.channels"),
    (["--print_config", "--config.model.schedule=cosine"],
     "config.model.schedule is a section now; set config.model.schedule.name"),
    (["--config.training.num_steps=abc"], "config.training.num_steps"),
    (["--config.model.schedule.gamma_min=9.0"],
     "config.model.schedule.gamma_min: expected < model.schedule.gamma_max"),
    (["--config.model.schedule.name=wobbly"], "config.model.schedule.name: expected one of"),
    (["--config.model.decoder=gauss"], "config.model.decoder: expected one of"),
    (["--config.model.vocab_size=1"], "config.model.vocab_size: expected an integer ≥ 2"),
    (["--config.optimizer.learning_rate=-1.0"], "config.optimizer.learning_rate: expected > 0"),
    (["--config.execution.remat_policy=some"], "config.execution.remat_policy: expected one of ('convs', 'full')"),
    (["--config.model.network.dropout=1.5"], "config.model.network.dropout: expected a rate in [0, 1)"),
    (["--print_config", "--config.model.network.norm_groups=3"],
     "config.model.network.norm_groups: expected a divisor of model.network.channels (8), got 3"),
    (["--config.model.network.channel_mult=(1,2,2,2)"],
     "config.model.network.channel_mult: expected at most as many levels as halvings of the images' 28×28"),
    (["--config.optimizer.ema_rate=1.5"], "config.optimizer.ema_rate: expected a decay in [0, 1)"),
    (["--config.training.steps_per_call=3"], "config.training.num_steps: expected a multiple of"),
    (["--config.model.num_classes=5"], "config.model.num_classes: the training split has labels up to 9, "
                                       "expected all < num_classes (5)"),
    (["--likelihood=ode"], "--likelihood=ode: only with --mode=eval"),
    (["--config.training.grad_accum_steps=3"], "config.training.batch_size: expected a multiple of"),
    (["--config.training.on_nonfinite=ignore"], "config.training.on_nonfinite: expected 'skip' or 'stop'"),
    (["--config.eval.split=validation"], "config.eval.split: expected one of ['test', 'train']"),
    (["--config.data.dataset=npz:/no/such.npz"], "no file '/no/such.npz'"),
    (["--config.data.dataset=imagenet7"], "unknown dataset 'imagenet7'"),
    (["--config.model.vocab_size=16"], "the data hold values up to 255, expected all < vocab_size (16)"),
    (["--config.data.dataset=npz:{tmp}/float.npz"], "expected a non-empty uint8 array"),
    (["--mode=eval"], "no checkpoint under"),
    (["--coordinator_address=127.0.0.1:1"], "--coordinator_address needs --num_processes and --process_id"),
    (["--mode=eval", "--checkpoint={tmp}/nothing"], "no checkpoint under"),
    (["--config.model.network.channels=16", "--workdir={tmp}/run"],
     "was made by a different model (model.network.channels"),
    (["--mode=eval", "--config.model.network.num_blocks=2", "--workdir={tmp}/run"],
     "model.network.num_blocks: checkpoint 1"),
    (["--mode=eval", "--workdir={tmp}/corrupt"], "has no readable config"),
    (["--mode=eval", "--checkpoint={tmp}/run/checkpoints/3"], "no checkpoint of step 3 in"),
    (["--mode=eval", "--checkpoint={tmp}/run/checkpoints/3"], "saved steps: 2, 4"),
    (["--config.model.network.channels=16", "--workdir={tmp}/run", "--allow_config_mismatch"],
     "cannot be loaded even with --allow_config_mismatch"),
    (["--mode=eval", "--config.model.network.channels=16", "--workdir={tmp}/run", "--allow_config_mismatch"],
     "drop the overrides of model.network.channels (the checkpoint has model.network.channels=8)"),
]

SAMPLE = [
    (["--workdir={tmp}/run", "--num_steps=0"], "num_steps: expected ≥ 1"),
    (["--workdir={tmp}/run", "--eta=1.5"], "eta: expected a value in [0, 1]"),
    (["--workdir={tmp}/run", "--sampler=euler"], "unknown sampler 'euler'"),
    (["--workdir={tmp}/run", "--langevin_steps=-1"], "langevin_steps: expected an integer ≥ 0"),
    (["--workdir={tmp}/run", "--sampler=ode", "--langevin_steps=1"], "the ODE sampler takes no corrector steps"),
    (["--workdir={tmp}/run", "--num_samples=0"], "num_samples: expected ≥ 1"),
    (["--checkpoint={tmp}/no/such"], "no checkpoint under"),
    ([], "give --workdir or --checkpoint"),
    (["--checkpoint={tmp}/run/checkpoints/7"], "saved steps: 2, 4"),
    (["--workdir={tmp}/run", "--labels=3"], "--labels: this model is unconditional (config.model.num_classes = 0)"),
]


def _run(script, args, tmp):
  args = [a.replace("{tmp}", str(tmp)) for a in args]
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args,words", TRAIN, ids=[w[:40] for _, w in TRAIN])
def test_train_py_refuses(trained, tmp_path, args, words):
  workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path / 'w'}"]
  before = _snapshot(trained)
  proc = _run("train.py", ["--config=configs/smoke.py", *workdir, *args], trained)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert _snapshot(trained) == before
  assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


@pytest.mark.parametrize("args,words", SAMPLE, ids=[w[:40] for _, w in SAMPLE])
def test_sample_py_refuses(trained, args, words):
  before = _snapshot(trained)
  proc = _run("sample.py", [*args, "--output={tmp}/out"], trained)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert words in proc.stderr and "Traceback" not in proc.stderr
  assert _snapshot(trained) == before


def test_python_api_refuses(trained):
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    vdm.load(str(trained / "nowhere"))
  with pytest.raises(checkpoints.CheckpointError, match="has no readable config"):
    vdm.load(str(trained / "corrupt"))
  model = vdm.load(str(trained / "run"))
  for kwargs, words in [(dict(num_samples=0), "num_samples"), (dict(num_samples=2, batch_size=0), "batch_size"),
                        (dict(num_samples=2, eta=-0.1), "eta"),
                        (dict(num_samples=2, langevin_steps=1, langevin_snr=0.0), "langevin_snr: expected a value > 0")]:
    n = kwargs.pop("num_samples")
    with pytest.raises(config_lib.ConfigError, match=words):
      model.sample(jax.random.key(0), n, **kwargs)
  with pytest.raises(config_lib.ConfigError, match="images: expected integers"):
    model.evaluate_bpd(np.zeros((2, 28, 28, 1), np.float32), jax.random.key(0))
  with pytest.raises(config_lib.ConfigError, match=r"images: values must lie in \[0, 255\]"):
    model.evaluate_bpd(np.full((2, 28, 28, 1), 300, np.int32), jax.random.key(0))
  with pytest.raises(config_lib.ConfigError, match="labels: this model is unconditional"):
    model.sample(jax.random.key(0), 2, labels=[1, 2])
  with pytest.raises(config_lib.ConfigError, match="guidance: expected 0 without labels"):
    model.sample(jax.random.key(0), 2, guidance=1.0)
  with pytest.raises(config_lib.ConfigError, match="rtol, atol: expected tolerances > 0"):
    model.sample(jax.random.key(0), 2, sampler="ode", rtol=0.0)
  with pytest.raises(config_lib.ConfigError, match=r"latents: expected \[N, 28, 28, 1\]"):
    model.decode(np.zeros((2, 8, 8, 1)), 4)
  with pytest.raises(config_lib.ConfigError, match="num_points: expected ≥ 2"):
    model.interpolate(np.zeros((28, 28, 1), np.uint8), np.zeros((28, 28, 1), np.uint8), num_points=1)
  for field, value, words in [("model.num_classes", -1, "config.model.num_classes: expected an integer ≥ 0"),
                              ("model.label_dropout", 1.0, "config.model.label_dropout: expected a rate in [0, 1)"),
                              ("eval.guidance", -2.0, "config.eval.guidance: expected a weight ≥ −1"),
                              ("eval.langevin_steps", -1, "config.eval.langevin_steps: expected an integer ≥ 0"),
                              ("eval.langevin_snr", 0.0, "config.eval.langevin_snr: expected > 0"),
                              ("eval.ode.rtol", 0.0, "config.eval.ode.rtol: expected tolerances > 0"),
                              ("eval.ode.dequantization", "gauss", "config.eval.ode.dequantization: expected "
                                                                   "'uniform' or 'decoder'"),
                              ("eval.ode.examples", -1, "config.eval.ode.examples: expected ≥ 0")]:
    bad = smoke.get_config()
    section, name = field.rsplit(".", 1)
    node = bad
    for part in section.split("."):
      node = node[part]
    node[name] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(words)):
      config_lib.validate(bad)
  unlabelled = input_pipeline.Split(np.zeros((4, 8, 8, 1), np.uint8))
  with pytest.raises(input_pipeline.DataError, match="^num_classes: a class-conditional model needs labels, and the "
                                                     "data has none"):
    input_pipeline.check_labels(unlabelled, 10)
  # The library names its own arguments; only train.py / sample.py speak of flags and config fields.
  with pytest.raises(config_lib.ConfigError, match="^coordinator_address needs num_processes and process_id$"):
    sharding.initialize("127.0.0.1:1")
  with pytest.raises(input_pipeline.DataError, match="^dataset: unknown dataset 'imagenet7'"):
    input_pipeline.load_dataset("imagenet7")
  config = smoke.get_config()
  config.data.dataset = "imagenet7"
  with pytest.raises(input_pipeline.DataError, match="^config.data.dataset: unknown dataset 'imagenet7'"):
    training.train_and_evaluate(config, str(trained / "never"), progress=False)
  assert not (trained / "never").exists()
