"""Checkpoints of the 2022 reference code (google-research/vdm) load as the same model.

``benchmarks/reference_layout.py`` writes checkpoints in the reference's
on-disk layout, with random values everywhere (zero-initialised layers
included, so every parameter matters). A plain float64 re-implementation of the
reference's forward pass, written from the paper and those names, is what
the loaded model must agree with.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vdm
from benchmarks import reference_layout
from configs import smoke
from vdm import reference
from vdm.checkpoints import CheckpointError
from vdm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


# ---- The reference's forward pass, in float64 numpy, from the paper and its names ----

def _swish(x):
  return x / (1.0 + np.exp(-x))


def _group_norm(x, p, groups=32):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * p["scale"] + p["bias"]


def _conv(x, p):
  k = p["kernel"].astype(np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], k[i, j]) for i in range(3) for j in range(3))
  return out + p["bias"]


def _dense(x, p):
  return x @ p["kernel"].astype(np.float64) + (p["bias"] if "bias" in p else 0.0)


def _block(x, cond, p):
  h = _conv(_swish(_group_norm(x, p["GroupNorm_0"])), p["conv1"])
  h = h + _dense(cond, p["cond_proj"])[:, None, None, :]
  h = _conv(_swish(_group_norm(h, p["GroupNorm_1"])), p["conv2"])
  if "nin_shortcut" in p:
    x = _dense(x, p["nin_shortcut"])
  return x + h


def _attn(x, p):
  b, hh, ww, c = x.shape
  h = _group_norm(x, p["GroupNorm_0"]).reshape(b, hh * ww, c)
  q, k, v = (_dense(h, p[n]) for n in ("q", "k", "v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return x + _dense(weights @ v, p["proj_out"]).reshape(x.shape)


def _reference_eps_hat(sm, z, gamma_t, conditioning, num_blocks, exponents=(6, 7), attention=False):
  """ε̂(z, γ_t) of the reference's score network; conditioning: its scalar per image."""
  z = z.astype(np.float64)
  channels = sm["conv_in"]["kernel"].shape[-1]
  # The arguments of sin/cos reach 1000 rad (time) and 800 rad (Fourier features): formed in float32, as
  # the reference forms them, or their float32 rounding (6e-5 rad) would be all the test sees.
  f32 = np.float32
  t = (np.asarray(gamma_t, f32) - f32(GAMMA_MIN)) / f32(GAMMA_MAX - GAMMA_MIN) * f32(1000.0)
  half = channels // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1)).astype(f32)
  args = (t[:, None] * freqs).astype(np.float64)
  emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  cond = np.concatenate([emb, np.asarray(conditioning, np.float64)[:, None]], axis=1)
  cond = _swish(_dense(_swish(_dense(cond, sm["dense0"])), sm["dense1"]))
  angles = [(f32(2.0 ** n * 2 * np.pi) * z[..., c].astype(f32)).astype(np.float64)
            for c in range(z.shape[-1]) for n in exponents]
  h = np.concatenate([z] + [np.sin(a)[..., None] for a in angles] + [np.cos(a)[..., None] for a in angles], -1)
  hs = [_conv(h, sm["conv_in"])]
  for i in range(num_blocks):
    h = _block(hs[-1], cond, sm[f"down.block_{i}"])
    hs.append(_attn(h, sm[f"down.attn_{i}"]) if attention else h)
  h = _block(hs[-1], cond, sm["mid.block_1"])
  h = _block(_attn(h, sm["mid.attn_1"]), cond, sm["mid.block_2"])
  for i in range(num_blocks + 1):
    h = _block(np.concatenate([h, hs.pop()], axis=-1), cond, sm[f"up.block_{i}"])
    h = _attn(h, sm[f"up.attn_{i}"]) if attention else h
  return z + _conv(_swish(_group_norm(h, sm["GroupNorm_0"])), sm["conv_out"])


def _config(channels, num_blocks, exponents=(6, 7), attention=False, augment=False, scan=True):
  config = smoke.get_config()
  net = config.model.network
  net.channels, net.num_blocks, net.fourier_exponents = channels, num_blocks, exponents
  net.attention_everywhere, net.scan_blocks, net.norm_groups = attention, scan, 32
  config.data.augment = augment
  return config


@pytest.mark.parametrize("attention,augment,scan", [(False, False, True), (True, True, False)])
def test_the_loaded_network_is_the_references_function(tmp_path, attention, augment, scan):
  ref = reference_layout.parameters(0, 64, 2, attention=attention)
  prefix = reference_layout.write(tmp_path / "ckpt", ref)
  config = _config(64, 2, attention=attention, augment=augment, scan=scan)
  trained = vdm.load(prefix, config=config, image_shape=(8, 8, 3))
  assert trained.step == 12345
  rng = np.random.default_rng(1)
  z = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  gamma = np.array([-13.3, -5.0, 0.5, 5.0], np.float32)
  codes = np.array([0, 1, 5, 7]) if augment else None
  ours = np.asarray(trained.model.apply({"params": trained.params}, z, gamma, codes, method="eps_hat"))
  expected = _reference_eps_hat(ref["score_model"], z, gamma, (codes > 0) if augment else np.zeros(4), 2,
                                attention=attention)
  assert np.max(np.abs(expected - z)) > 0.5  # far from the identity: a wrong weight shows
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_gamma_is_b_plus_abs_w_t_and_the_loss_terms_are_the_references(tmp_path):
  ref = reference_layout.parameters(2, 32, 1, exponents=(6,), w=-18.0, b=-13.0)
  trained = vdm.load(reference_layout.write(tmp_path, ref), config=_config(32, 1, exponents=(6,)),
                     image_shape=(8, 8, 3))
  t = np.linspace(0.0, 1.0, 11, dtype=np.float32)
  gamma = np.asarray(trained.model.apply({"params": trained.params}, t, method="gamma"))
  np.testing.assert_allclose(gamma, -13.0 + 18.0 * t.astype(np.float64), rtol=0, atol=2e-6)

  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (4, 8, 8, 3))
  noise = {"t": np.array([0.05, 0.3, 0.55, 0.8], np.float32), "eps": rng.normal(size=x.shape).astype(np.float32),
           "eps_0": rng.normal(size=x.shape).astype(np.float32)}
  out = trained.model.apply({"params": trained.params}, jnp.asarray(x), None, noise=noise)
  f = 2.0 * (x + 0.5) / 256 - 1.0
  g0, g1 = -13.0, 5.0
  sigmoid = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
  z0 = f + np.exp(0.5 * g0) * noise["eps_0"]
  values = 2.0 * (np.arange(256) + 0.5) / 256 - 1.0
  logits = -0.5 * ((z0[..., None] - values) * np.exp(-0.5 * g0)) ** 2
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  recon = -np.take_along_axis(logp, x[..., None], -1).sum(axis=(1, 2, 3, 4))
  var1 = sigmoid(g1)
  prior = 0.5 * ((1 - var1) * f ** 2 + var1 - np.log(var1) - 1).sum(axis=(1, 2, 3))
  g_t = -13.0 + 18.0 * noise["t"].astype(np.float64)
  z_t = (np.sqrt(sigmoid(-g_t))[:, None, None, None] * f
         + np.sqrt(sigmoid(g_t))[:, None, None, None] * noise["eps"])
  eps_hat = _reference_eps_hat(ref["score_model"], z_t, g_t, np.zeros(4), 1, exponents=(6,))
  diff = 0.5 * 18.0 * ((noise["eps"] - eps_hat) ** 2).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(out["loss_recon"], recon, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(out["loss_prior"], prior, rtol=1e-5)
  np.testing.assert_allclose(out["loss_diff"], diff, rtol=1e-5)

  images = trained.sample(jax.random.key(0), 3, num_steps=4, progress=False)
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8


def test_a_checkpoint_that_does_not_fit_the_config_names_the_parameter(tmp_path):
  prefix = reference_layout.write(tmp_path, reference_layout.parameters(4, 32, 1, exponents=(6,)))
  with pytest.raises(CheckpointError, match=r"score_model/conv_in/kernel: the checkpoint's shape is "
                     r"\(3, 3, 9, 32\), config.model.network needs \(3, 3, 15, 32\)"):
    vdm.load(prefix, config=_config(32, 1), image_shape=(8, 8, 3))
  with pytest.raises(CheckpointError, match=r"score_model/conv_in/kernel: the checkpoint's shape is "
                     r"\(3, 3, 9, 32\), config.model.network needs \(3, 3, 9, 64\)"):
    vdm.load(prefix, config=_config(64, 1, exponents=(6,)), image_shape=(8, 8, 3))
  with pytest.raises(CheckpointError, match=r"the checkpoint has no score_model/down.block_1/conv1/kernel "
                     r"\(3, 3, 32, 32\), which config.model.network needs \(its down_1/resnet/Conv_0/kernel\)"):
    vdm.load(prefix, config=_config(32, 2, exponents=(6,), scan=False), image_shape=(8, 8, 3))
  with pytest.raises(CheckpointError, match=r"the checkpoint's score_model/down.attn_0/"):
    vdm.load(reference_layout.write(tmp_path / "attn", reference_layout.parameters(4, 32, 1, (3), (6,), True)),
             config=_config(32, 1, exponents=(6,)), image_shape=(8, 8, 3))
  config = _config(32, 1, exponents=(6,))
  config.model.schedule.name = "monotone_net"
  with pytest.raises(ConfigError, match="config.model.schedule.name: the checkpoint learns γ.t. = b . .w. t; "
                     "expected 'learned_linear', got 'monotone_net'"):
    vdm.load(prefix, config=config, image_shape=(8, 8, 3))
  with pytest.raises(ConfigError, match="config: .* carries no config; give the one it trained with"):
    vdm.load(prefix)


def test_a_truncated_or_missing_file_is_one_clear_error(tmp_path):
  prefix = reference_layout.write(tmp_path, reference_layout.parameters(5, 32, 1, exponents=(6,)))
  data = open(prefix + ".flax", "rb").read()
  with open(prefix + ".flax", "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="not a readable google-research/vdm checkpoint .*is the file complete"):
    vdm.load(prefix, config=_config(32, 1, exponents=(6,)), image_shape=(8, 8, 3))
  with pytest.raises(FileNotFoundError, match="no such file"):
    vdm.load(str(tmp_path / "other.flax"), config=_config(32, 1, exponents=(6,)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--checkpoint={prefix}",
                         "--config=configs/smoke.py", f"--output={tmp_path}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  assert proc.stderr.startswith("error: ") and "is the file complete?" in proc.stderr


def test_eval_and_sample_commands_run_on_a_reference_checkpoint(tmp_path):
  prefix = reference_layout.write(tmp_path / "released", reference_layout.parameters(6, 32, 1, exponents=(6,)))
  rng = np.random.default_rng(0)
  data = tmp_path / "data.npz"
  np.savez(data, train=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
           test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
  overrides = ["--config=configs/smoke.py", "--config.model.network.channels=32",
               "--config.model.network.norm_groups=32", f"--config.data.dataset=npz:{data}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda script, *args: subprocess.run(  # noqa: E731
      [sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  evaluated = run("train.py", "--mode=eval", f"--checkpoint={prefix}", f"--workdir={tmp_path / 'eval'}",
                  *overrides)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  record = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert record["step"] == 12345 and record["num_examples"] == 10 and np.isfinite(record["bpd"])
  sampled = run("sample.py", f"--checkpoint={prefix}.flax", "--num_samples=2", "--num_steps=3",
                f"--output={tmp_path / 'samples'}", *overrides[:3])
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sorted(f.rsplit(".", 1)[1] for f in os.listdir(tmp_path / "samples")) == ["npz", "png"]


def test_a_checkpoint_is_found_by_its_prefix_file_or_folder(tmp_path):
  params = reference_layout.parameters(7, 32, 1, exponents=(6,))
  prefix = reference_layout.write(tmp_path, params)
  os.rename(prefix + ".flax", tmp_path / "checkpoints-2.flax")
  reference_layout.write(tmp_path, params)  # checkpoints-0.flax again
  assert str(reference.find(str(tmp_path))).endswith("checkpoints-2.flax")  # the highest-numbered
  assert str(reference.find(prefix)) == prefix + ".flax"
  assert str(reference.find(prefix + ".flax")) == prefix + ".flax"
  assert reference.find(str(tmp_path / "elsewhere")) is None  # not one: vdm's own checkpoints are tried


@pytest.mark.parametrize("config_module,channels", [("cifar10", 128), ("cifar10_aug_released", 320)])
def test_the_released_models_fit_their_configs(config_module, channels):
  """Every name and shape of the released models' networks (fewer blocks for the 190 M-parameter one)."""
  import importlib  # noqa: PLC0415
  config = importlib.import_module(f"configs.{config_module}").get_config()
  blocks = 32 if channels == 128 else 2
  config.model.network.num_blocks = blocks
  shapes = reference_layout.parameters(0, channels, blocks, shapes_only=True)
  params = reference.to_params(shapes, config, (32, 32, 3))
  count = sum(x.size for x in jax.tree.leaves(params["network"]))
  reference_count = sum(x.size for x in jax.tree.leaves(shapes["score_model"]))
  assert count == reference_count + (7 if config.data.augment else -1) * 4 * channels  # dense0's last row
  if channels == 128:
    assert round(count / 1e6, 1) == 30.6  # the paper's CIFAR-10 model
