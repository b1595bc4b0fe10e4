"""The benchmarks' FLOP counter (benchmarks/flops.py) against closed forms and XLA's own count, the profile
summary (benchmarks/profile.py), the dropout generators' benchmark, the variance-optimal schedule of
benchmarks/estimator_variance.py, the recipes check's summary over training seeds, and the device check's
summary of records made under other XLA flags."""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
from benchmarks import common, device_summary, estimator_variance, flops, profile
from configs import cifar10
from vdm import config as config_lib
from vdm import train_step, training


def test_matmul_and_convolution_are_two_flops_per_multiply_add():
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))  # batched matmul
  assert flops.count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 2
  x, k = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count(conv, x, k) == 2 * (2 * 9 * 9 * 6) * (3 * 3 * 4)
  assert flops.count(jnp.sin, x) == 0  # element-wise work is not counted


def test_loops_count_every_iteration_and_cond_its_larger_branch():
  m = jnp.ones((4, 4))
  one = 2 * 4 * 4 * 4
  assert flops.count(lambda m: jax.lax.fori_loop(0, 5, lambda i, c: c @ m, m), m) == 5 * one
  scanned = lambda m: jax.lax.scan(lambda c, _: (c @ m @ m, None), m, None, length=3)[0]  # noqa: E731
  assert flops.count(scanned, m) == 6 * one
  branches = lambda p, m: jax.lax.cond(p, lambda m: m @ m @ m, lambda m: m, m)  # noqa: E731
  assert flops.count(branches, True, m) == 2 * one
  assert flops.count(jax.jit(lambda m: m @ m), m) == one  # through jit
  assert flops.count(jax.grad(lambda m: jnp.sum(m @ m)), m) == 3 * one  # forward + two backward matmuls


def _train_step_flops(scan_blocks: bool, **execution):
  config = cifar10.get_config()
  config.model.network.update(channels=32, num_blocks=2, scan_blocks=scan_blocks)
  config.execution.update(execution)
  config.training.batch_size = 2
  model, optimizer, mesh, init = training.setup(config, (32, 32, 3))
  fn = train_step.make_train_fn(config, model, optimizer, mesh)
  like, batch = jax.eval_shape(init), jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.uint8)
  return flops.count(fn, like, batch), fn, like, batch


def test_train_step_count_agrees_with_xla_and_does_not_depend_on_how_it_runs():
  unrolled, fn, like, batch = _train_step_flops(scan_blocks=False, remat=False, conv_grad="xla")
  xla = flops.xla_flops(fn.lower(like, batch))  # XLA adds the element-wise work
  assert xla is not None and 1.0 <= xla / unrolled < 1.03, (xla, unrolled)
  scanned, *_ = _train_step_flops(scan_blocks=True, remat=False, conv_grad="dot")
  assert scanned == pytest.approx(unrolled, rel=1e-9)  # the scan body counted once per block
  convs, *_ = _train_step_flops(scan_blocks=True, remat=True, remat_policy="convs", conv_grad="dot")
  # This policy recomputes no matmul: the convolutions are kept, and the blocks' conditioning projections
  # run before the loop, outside the rematerialised blocks.
  assert convs == pytest.approx(unrolled, rel=1e-9)
  full, *_ = _train_step_flops(scan_blocks=True, remat=True, remat_policy="full", conv_grad="dot")
  assert unrolled < full < 1.34 * unrolled  # the forward pass of the blocks again (≈ 1/3 of the step)


def test_peak_table_matches_device_kinds_and_precisions():
  assert flops.peak_tflops("NVIDIA H200", "bfloat16") == pytest.approx(989.4)
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == pytest.approx(494.7)
  assert flops.peak_tflops("NVIDIA H100 PCIe", "float32") == pytest.approx(51.2)
  assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == pytest.approx(312.0)
  assert flops.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197.0)
  assert flops.peak_tflops("cpu", "float32") is None
  assert flops.matmul_kind("float32", "default", "gpu") == "tf32"
  assert flops.matmul_kind("float32", "highest", "gpu") == "float32"
  assert flops.matmul_kind("bfloat16", "highest", "gpu") == "bfloat16"
  assert flops.matmul_kind("float32", "default", "tpu") == "bfloat16"
  assert flops.matmul_kind("float32", "default", "cpu") == "float32"


def test_profile_sums_the_traced_steps_by_op_kind_and_source(tmp_path):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(256, name="wide")(jnp.tanh(x)).sum()

  x = jnp.ones((512, 256))
  params = Net().init(jax.random.key(0), x)
  f = jax.jit(jax.grad(lambda p, x: Net().apply(p, x)))
  compiled = f.lower(params, x).compile()
  compiled(params, x)
  run = lambda: jax.block_until_ready(compiled(params, x))  # noqa: E731
  summary = profile.trace(run, steps=2, keep=str(tmp_path / "t.xplane.pb.gz"), hlo=compiled.as_text())
  assert summary["steps"] == 2 and summary["device_busy_ms_per_step"] > 0
  assert sum(summary["by_kind_ms_per_step"].values()) == pytest.approx(summary["device_busy_ms_per_step"], rel=1e-2)
  assert summary["top_ops_ms_per_step"] and all(calls >= 1 for _, _, calls in summary["top_ops_ms_per_step"])
  # Every kernel found its instruction in the HLO, and the time is attributed to the module that made it.
  sources = {name: ms for name, ms, _ in summary["top_sources_ms_per_step"]}
  assert not [name for name in sources if name.startswith("(not in the HLO)")]
  assert any(name.startswith("Net/wide/") for name in sources)
  # The saved trace and HLO read back to the same figures.
  with gzip.open(summary["hlo_file"], "rt") as f:
    again = profile.summarize(summary["trace_file"], steps=2, hlo_text=f.read())
  assert again["by_kind_ms_per_step"] == summary["by_kind_ms_per_step"]
  assert again["top_sources_ms_per_step"] == summary["top_sources_ms_per_step"]


def test_profile_names_kinds_and_sources_as_written():
  assert profile._kind("sm90_xmma_fprop_implicit_gemm_bf16") == "matmul/conv"
  assert profile._kind("loop_add_compare_fusion_1") == "fusion"
  assert profile._kind("input_reduce_fusion_4") == "reduce"
  hlo = ('  %loop_add_fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name='
         '"jit(steps)/transpose(jvp(ScoreUNet))/down/while/body/closed_call/resnet/GroupNorm_0/add"}\n'
         '  ROOT %cudnn-conv.1 = f32[2]{0} custom-call(%p), metadata={op_name="jit(steps)/jvp(ScoreUNet)/conv_in/conv"}')
  assert profile.hlo_sources(hlo) == {"loop_add_fusion_3": "ScoreUNet/down/resnet/GroupNorm_0/add [bwd]",
                                      "cudnn_conv_1": "ScoreUNet/conv_in/conv"}


def test_dropout_rng_benchmark_times_every_generator_and_draws_the_keep_rate():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "benchmarks/dropout_rng.py", "--shape=16,16,16,16", "--repeats=1"], cwd=root,
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [row["dropout_rng"] for row in record["rows"]] == list(config_lib.DROPOUT_RNGS)
  assert record["rows"][0]["vs_threefry"] == 1.0
  for row in record["rows"]:
    assert abs(row["keep_rate"] - 0.9) < 5 * (0.9 * 0.1 / 16**4) ** 0.5 and row["ms_median"] > 0


def test_input_pipeline_benchmark_times_each_epoch_of_whole_batches(tmp_path, small_data):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = tmp_path / "results.jsonl"
  proc = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", f"--dataset={small_data}", "--batch_size=16",
                         "--epochs=2", "--augment", f"--results={results}"], cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [r["epoch"] for r in records] == [0, 1] and records == [json.loads(x) for x in results.read_text().splitlines()]
  for r in records:  # 64 training digits: 4 batches of 16
    assert (r["train_images"], r["steps"], r["image_shape"], r["augment"]) == (64, 4, [28, 28, 1], True)
    assert r["images_per_s"] == pytest.approx(64 / r["seconds"])
  too_big = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", f"--dataset={small_data}",
                            "--batch_size=65", f"--results={results}"], cwd=root, capture_output=True, text=True,
                           timeout=300)
  assert too_big.returncode == 1 and "--batch_size=65: more than the 64 training images" in too_big.stderr


def test_variance_optimal_density_removes_a_shared_shape_and_keeps_a_flat_one():
  rng = np.random.default_rng(0)
  t = (np.arange(64) + 0.5) / 64
  shape, scale = 1.0 + 30.0 * (1.0 - t) ** 4, rng.uniform(0.5, 2.0, 5)  # every example ∝ the same h(t)
  values = (shape[:, None] * scale[None, :])[:, None, :]  # [K, R=1, B]
  now, best, q = estimator_variance.variance_optimal(values)
  np.testing.assert_allclose(now, np.sqrt(np.mean(scale**2) * shape.var()), rtol=1e-12)
  assert best < 1e-6 * now  # q ∝ h makes each L/q constant in t
  np.testing.assert_allclose(q, shape / shape.mean(), rtol=1e-12)
  flat = 1.0 + rng.standard_normal((16, 8, 5))  # no dependence on t: uniform q is already best
  now, best, q = estimator_variance.variance_optimal(flat)
  np.testing.assert_allclose(q, 1.0, rtol=0.3)
  assert best <= now * (1 + 1e-12) and best > 0.95 * now


def test_gamma_under_a_density_composes_the_old_schedule_with_its_inverse_cdf():
  gamma_edges = np.array([-10.0, 0.0, 6.0])  # old γ at t = 0, 0.5, 1 (linear between)
  points = np.array([0.0, 0.375, 0.75, 0.875, 1.0])
  np.testing.assert_allclose(estimator_variance.gamma_under(np.ones(2), gamma_edges, points),
                             np.interp(points, [0.0, 0.5, 1.0], gamma_edges))
  # q = (1.5, 0.5): three quarters of the draws fall in the first half of the old t.
  np.testing.assert_allclose(estimator_variance.gamma_under(np.array([1.5, 0.5]), gamma_edges, points),
                             [-10.0, -5.0, 0.0, 3.0, 6.0])


def test_the_optimum_of_a_checkpoint_keeps_its_endpoints_and_is_no_noisier(tmp_path):
  import vdm
  from configs import smoke
  from vdm import checkpoints
  config = smoke.get_config()
  config.model.schedule.name = "monotone_net"
  model, optimizer = config_lib.build_model(config), config_lib.build_optimizer(config)
  state = train_step.create_train_state(config, model, optimizer, (8, 8, 1))
  checkpoints.save(checkpoints.manager(checkpoints.checkpoint_dir(str(tmp_path))), state, config,
                   {"image_shape": [8, 8, 1]})
  trained = vdm.load(str(tmp_path))
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)).astype(np.int32)
  record = estimator_variance.measure_optimum(trained, images, cells=8, draws=2)
  gamma, best = np.array(record["gamma"]), np.array(record["gamma_optimal"])
  np.testing.assert_allclose([best[0], best[-1]], [gamma[0], gamma[-1]], rtol=1e-6)
  np.testing.assert_allclose([gamma[0], gamma[-1]], [-13.3, 5.0], rtol=1e-5)
  assert np.all(np.diff(best) > 0) and np.all(np.diff(gamma) > 0)
  assert 0 < record["std_per_example_optimal"] <= record["std_per_example_grid"]
  now = estimator_variance.measure(trained, images, draws=16)["std_per_example"]
  assert now / 1.5 < record["std_per_example_grid"] < now * 1.5  # the grid and random t agree


def test_plot_gamma_draws_each_curve_where_it_lies(tmp_path):
  import importlib.util
  from PIL import Image
  spec = importlib.util.spec_from_file_location("plot_gamma", os.path.join(os.path.dirname(__file__), "..",
                                                                            "scripts", "plot_gamma.py"))
  plot_gamma = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot_gamma)
  t = np.linspace(0, 1, 101)
  out = str(tmp_path / "gamma.png")
  plot_gamma.draw([("linear", t, -10 + 15 * t)], [("dots", np.array([0.5]), np.array([-8.0]))], out)
  image = np.asarray(Image.open(out).convert("RGB")).astype(int)
  assert image.shape == (plot_gamma.HEIGHT, plot_gamma.WIDTH, 3)

  def colour_near(t, g):  # axes from −10 to 5 (multiples of 5 around the data)
    x = plot_gamma.LEFT + t * (plot_gamma.WIDTH - plot_gamma.LEFT - plot_gamma.RIGHT)
    y = plot_gamma.TOP + (5 - g) / 15 * (plot_gamma.HEIGHT - plot_gamma.TOP - plot_gamma.BOTTOM)
    patch = image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3)
    return {tuple(p) for p in patch}

  assert plot_gamma.COLOURS[0] in colour_near(0.3, -10 + 15 * 0.3)
  assert plot_gamma.COLOURS[1] in colour_near(0.5, -8.0)
  assert plot_gamma.COLOURS[0] not in colour_near(0.5, -8.0)
  assert plot_gamma._split("a = 1=runs/x", "run") == ("a = 1", "runs/x")


def test_compiled_counts_each_launch_and_the_bytes_of_a_loops_slice():
  from benchmarks import compiled

  def scanned(xs, h):
    def body(h, x):
      h = jnp.tanh(h * 2.0 + x)
      return h, jnp.sin(h)
    return jax.lax.scan(body, h, xs)

  xs, h = jnp.ones((7, 64, 32)), jnp.ones((64, 32))
  found = compiled.kernels(jax.jit(scanned).lower(xs, h).compile().as_text())
  in_loop = [k for k in found if k["launches"] == 7]
  assert in_loop and all(k["launches"] in (1, 7) for k in found)  # the body's kernels, once per iteration
  tanh = next(k for k in in_loop if "tanh" in k["name"])
  assert tanh["out_bytes"] == 64 * 32 * 4 and max(tanh["operand_bytes"]) == 64 * 32 * 4  # x: one slice of xs
  update = next(k for k in in_loop if "update" in k["name"])
  assert update["out_bytes"] == 64 * 32 * 4  # the stacked output, written one slice at a time
  summary = compiled.summarize(found, top=3)
  assert summary["kernels_per_step"] == sum(k["launches"] for k in found)
  assert summary["gb_per_step"] == pytest.approx(sum(k["launches"] * compiled.traffic(k) for k in found) / 1e9,
                                                 abs=0.01)
  assert compiled.nbytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[])") == 12 + 16 + 1
  assert all(k["cycles"] == 0 for k in found)  # a CPU's kernels carry no cost model's estimate

  # A TPU's loops name no known_trip_count: the count is read from the loop's condition (i < 7) instead.
  text = jax.jit(scanned).lower(xs, h).compile().as_text()
  unnamed = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
  assert unnamed != text and [k["launches"] for k in compiled.kernels(unnamed)] == [k["launches"] for k in found]
  condition = [("c", "s32[]{:T(128)}", "constant", "7), metadata={}"), ("i", "s32[]", "get-tuple-element", "%p)"),
               ("lt", "pred[]", "compare", "%i, %c), direction=LT")]
  assert compiled._trip_count(condition) == 7
  assert compiled._trip_count(condition[:2] + [("ne", "pred[]", "compare", "%i, %c), direction=NE")]) == 1
  assert compiled._trip_count(condition + [("d", "s32[]", "constant", "3)")]) == 1  # which bound: not known

  # A slice, fused or not, reads its part of the operand (the parts of an all-reduced buffer of gradients).
  hlo = """ENTRY %main (p: f32[1000]) -> f32[1000] {
  %p = f32[1000]{0} parameter(0)
  %wrapped_slice.1 = f32[10]{0} fusion(%p), kind=kLoop, calls=%wrapped_slice_computation.1
  %slice.2 = f32[10]{0} slice(%p), slice={[0:10]}
  ROOT %fusion.3 = f32[1000]{0} fusion(%p), kind=kLoop, calls=%negate_fusion
}
%wrapped_slice_computation.1 (param_0: f32[1000]) -> f32[10] {
  %param_0 = f32[1000]{0} parameter(0)
  ROOT %slice.0 = f32[10]{0} slice(%param_0), slice={[0:10]}
}
%negate_fusion (q: f32[1000]) -> f32[1000] {
  %q = f32[1000]{0} parameter(0)
  ROOT %n = f32[1000]{0} negate(%q)
}
"""
  assert {k["name"]: k["operand_bytes"] for k in compiled.kernels(hlo)} == {
      "wrapped_slice.1": [40], "slice.2": [40], "fusion.3": [4000]}


def test_recipes_summary_averages_each_training_seeds_mean_over_sample_seeds(tmp_path):
  def line(seed, ratio, num_steps=100):
    return {"seed": seed, "fd_ratio": ratio, "num_steps": num_steps, "sampler": "ancestral", "eta": 1.0}

  def run(training_seed, ratios, long_ratio, bpd):
    quality = [line(s, r) for s, r in enumerate(ratios)]
    quality.append({"seeds": list(range(len(ratios))), "fd_ratio_mean": float(np.mean(ratios)), "num_steps": 100,
                    "sampler": "ancestral", "eta": 1.0})
    quality.append(line(0, long_ratio, num_steps=1000))  # a second setting, one sample seed
    return {"benchmark": "recipe", "recipe": "shipped", "training_seed": training_seed, "eval": {"bpd": bpd},
            "sample_quality": quality}

  records = [run(0, [2.0, 3.0], 2.5, 2.6), run(1, [1.0, 2.0], 1.9, 2.8),
             {"benchmark": "recipe", "recipe": "wider", "training_seed": 0, "eval": None,
              "sample_quality": [line(0, 4.0)]},
             {"benchmark": "recipe", "recipe": "conditional", "training_seed": 3, "eval": {"bpd": 2.4},
              "sample_quality": [{**line(0, 3.0), "guidance": 2.0, "label_accuracy": 0.8},
                                 {**line(0, 3.5), "guidance": 5.0, "label_accuracy": 0.9}]},
             {"benchmark": "recipe_summary", "recipe": "shipped", "fd_ratio_mean": 99.0}]  # an earlier summary
  path = tmp_path / "recipes.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = subprocess.run([sys.executable, "benchmarks/recipes_summary.py", str(path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
  got = [json.loads(x) for x in out.splitlines()]
  assert [(g["recipe"], g["num_steps"], g.get("guidance")) for g in got] == [
      ("shipped", 100, None), ("shipped", 1000, None), ("wider", 100, None), ("conditional", 100, 2.0),
      ("conditional", 100, 5.0)]
  first = got[0]
  assert first["training_seeds"] == [0, 1] and first["fd_ratios"] == [2.5, 1.5]  # each seed's mean over samples
  assert first["fd_ratio_mean"] == pytest.approx(2.0) and first["fd_ratio_sem"] == pytest.approx(0.5)
  assert first["bpd_mean"] == pytest.approx(2.7) and first["sampler"] == "ancestral" and "guidance" not in first
  assert got[1]["fd_ratios"] == [2.5, 1.9]
  assert got[2]["fd_ratios"] == [4.0] and got[2]["fd_ratio_sem"] is None and "bpd_mean" not in got[2]
  assert "label_accuracy_mean" not in first
  assert [(g["fd_ratio_mean"], g["label_accuracy_mean"]) for g in got[3:]] == [(3.0, 0.8), (3.5, 0.9)]


def test_gpu_compile_resolves_the_auto_fields_as_one_gpu_would():
  from benchmarks import compiled
  from configs import cifar10
  config = cifar10.get_config()
  config.execution.update(group_norm="auto", scan_unroll=0)
  compiled.as_on(config, compiled.ON_GPU)
  ex = config.execution
  assert (ex.dtype, ex.conv_grad, ex.skip_projection, ex.attention, ex.group_norm, ex.scan_unroll) == (
      "bfloat16", "xla", "conv", "cudnn", "pallas", config.model.network.num_blocks + 1)
  config = cifar10.get_config()
  config.execution.update(dtype="float32", skip_projection="dense", scan_unroll=2)  # set ones stay
  compiled.as_on(config, compiled.ON_GPU)
  assert (config.execution.dtype, config.execution.skip_projection, config.execution.group_norm,
          config.execution.scan_unroll) == ("float32", "dense", "xla", 2)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_the_auto_fields_compiled_for_a_device_are_what_vdm_resolves_on_it(monkeypatch, backend):
  # gpu_compile/tpu_compile run on a CPU, so they set the "auto" fields as the device would: the same values
  # as vdm.config's resolvers give on that backend (an H200; the Pallas norms passing their on-device check).
  import types
  from benchmarks import compiled
  from vdm import group_norm
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability="9.0", device_kind="x")])
  monkeypatch.setattr(group_norm, "_checked", lambda launch: None)
  config = cifar10.get_config()
  config.execution.update(dtype="auto", conv_grad="auto", skip_projection="auto", attention="auto",
                          group_norm="auto", scan_unroll=0)
  ex = config.execution
  resolved = {"dtype": config_lib.resolve_dtype(ex.dtype),
              "conv_grad": config_lib.resolve_conv_grad(ex.conv_grad, config.model.network.scan_blocks),
              "skip_projection": config_lib.resolve_skip_projection(ex.skip_projection),
              "attention": config_lib.resolve_attention(ex.attention),
              "group_norm": "xla" if config_lib.group_norm_launch(config) == "xla" else "pallas"}
  unroll = config_lib.resolve_scan_unroll(config)
  assert resolved == (compiled.ON_GPU if backend == "gpu" else compiled.ON_TPU)
  compiled.as_on(config, resolved)
  assert config.execution.scan_unroll == unroll == config.model.network.num_blocks + 1


def test_tpu_compile_resolves_the_auto_fields_as_a_tpu_would_and_reads_the_cost_model():
  from benchmarks import compiled
  from configs import cifar10
  config = cifar10.get_config()
  config.execution.update(group_norm="auto", scan_unroll=0, attention="auto", skip_projection="auto")
  compiled.as_on(config, compiled.ON_TPU)
  ex = config.execution
  assert (ex.dtype, ex.conv_grad, ex.skip_projection, ex.attention, ex.group_norm, ex.scan_unroll) == (
      "bfloat16", "xla", "dense", "xla", "xla", config.model.network.num_blocks + 1)
  config = cifar10.get_config()
  config.execution.update(dtype="float32", scan_unroll=4)  # set ones stay
  compiled.as_on(config, compiled.ON_TPU)
  assert (config.execution.dtype, config.execution.scan_unroll) == ("float32", 4)

  # Each kernel's estimated cycles times its launches; families ranked by them.
  hlo = """ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0:T(256)} parameter(0)
  %fusion.1 = f32[8]{0:T(256)} fusion(%p), kind=kLoop, calls=%f, backend_config={"window_config":{"estimated_cycles":"100"}}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %fusion.2 = f32[8]{0:T(256)} fusion(%fusion.1), kind=kLoop, calls=%g, backend_config={"estimated_cycles":"5"}
}
%cond (a: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%a), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}
%body (b: (s32[], f32[8])) -> (s32[], f32[8]) {
  %convolution.7 = f32[8]{0:T(256)} convolution(%x, %y), backend_config={"estimated_cycles":"1000"}
}
"""
  found = compiled.kernels(hlo)
  assert {k["name"]: (k["launches"], k["cycles"]) for k in found} == {
      "fusion.1": (1, 100), "fusion.2": (1, 5), "convolution.7": (3, 1000)}
  assert compiled.cost(found, top=2) == {"cost_model_cycles": 3105,
                                            "top_families_by_cycles": {"convolution": 3000, "fusion": 105}}


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_compiled_sample_step_is_one_step_of_the_sampler(scan_blocks):
  # The sampler's loop bounds are arguments of generate()'s program, so its body is counted once: one
  # sampling step holds each of the network's convolutions once (conv_in, 2 a block: 2 down, 2 mid, 3 up,
  # conv_out), whatever the number of steps; the scanned blocks' own loops count their trips.
  from benchmarks import compiled
  from configs import mnist
  config = mnist.get_config()
  config.model.network.update(channels=8, num_blocks=2, scan_blocks=scan_blocks)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  program, seconds = compiled.compile_step("sample", config, mesh, 4, (8, 8, 1))
  convs = [k for k in compiled.kernels(program.as_text()) if k["op_name"].endswith("conv_general_dilated")]
  assert sum(k["launches"] for k in convs) == 1 + 2 * (2 + 2 + 3) + 1 and seconds > 0
  trained, _ = compiled.compile_step("train", config, mesh, 4, (8, 8, 1))
  assert sum(k["launches"] for k in compiled.kernels(trained.as_text())
             if k["op_name"].endswith("conv_general_dilated")) >= 2 * 16  # and their gradients


def test_tpu_compile_sums_a_devices_memory_and_says_whether_it_fits():
  from benchmarks import compiled
  gib = 2 ** 30
  stats = types.SimpleNamespace(argument_size_in_bytes=2 * gib, output_size_in_bytes=2 * gib,
                                alias_size_in_bytes=2 * gib - gib // 2, temp_size_in_bytes=13 * gib)
  got = compiled.memory(stats, hbm_gib=16)
  assert got == {"arguments_gib": 2.0, "temp_gib": 13.0, "peak_gib": 15.5, "hbm_gib": 16, "fits": True}
  assert not compiled.memory(stats, hbm_gib=15)["fits"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_tpu_compile_without_libtpu_says_what_to_install():
  done = subprocess.run([sys.executable, "benchmarks/tpu_compile.py", "--config=configs/mnist.py",
                         f"--results={os.devnull}"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 1 and f'pip install "jax[tpu]=={jax.__version__}"' in done.stderr


def test_gpu_compile_reads_the_pallas_kernels_registers_and_spills_from_ptxas():
  from benchmarks import gpu_compile
  # Each target's description is complete (every field of the template filled) and names its architecture.
  for target, (cores, major, arch) in {"h200": (132, 9, "sm_90a"), "h100": (132, 9, "sm_90a"),
                                       "a100": (108, 8, "sm_80")}.items():
    text = gpu_compile._DEVICE.format(**gpu_compile.TARGETS[target])
    assert f"core_count: {cores} " in text and f"cuda_compute_capability {{ major: {major} minor: 0 }}" in text
    assert f'device_description_str: "{gpu_compile.TARGETS[target]["name"]}"' in text
    assert gpu_compile.ptx_arch(target) == arch
  output = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_add_fusion_3' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion_3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers
ptxas info    : Compiling entry function '_forward_kernel__1' for 'sm_90a'
ptxas info    : Function properties for _forward_kernel__1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 392 bytes cmem[0]
ptxas info    : Compiling entry function '_backward_kernel' for 'sm_90a'
ptxas info    : Function properties for _backward_kernel
    64 bytes stack frame, 40 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
"""
  assert gpu_compile.ptxas_registers(output) == {"_forward_kernel__1": {"registers": 96, "spill_bytes": 0},
                                                 "_backward_kernel": {"registers": 255, "spill_bytes": 64}}


def test_records_note_their_xla_flags_and_the_device_summary_keeps_them(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = tmp_path / "train_step.jsonl"
  emit = ("from absl import app; from benchmarks import common; "
          "app.run(lambda _: common.emit({'benchmark': 'train_step', 'batch_size': 8, 'step_ms_median': 50.0, "
          "'images_per_s': 160.0, 'first_call_s': 5.0, 'variant': {'execution.dtype': 'auto'}}))")
  for flags_value in ("", "--xla_gpu_enable_command_buffer=+WHILE"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags_value:
      env["XLA_FLAGS"] = flags_value
    subprocess.run([sys.executable, "-c", emit, f"--results={results}"], cwd=root, env=env, check=True,
                   capture_output=True)
  plain, flagged = [json.loads(x) for x in results.read_text().splitlines()]
  assert "xla_flags" not in plain and flagged["xla_flags"] == "--xla_gpu_enable_command_buffer=+WHILE"
  (tmp_path / "reference.jsonl").write_text(json.dumps({"benchmark": "reference_train_step", "step_ms_median": 100.0,
                                                        "images_per_s": 80.0, "first_call_s": 20.0}) + "\n")
  with open(results, "a") as f:  # a faster variant, and one that failed
    f.write(json.dumps({"benchmark": "train_step", "batch_size": 8, "step_ms_median": 25.0, "images_per_s": 320.0,
                        "first_call_s": 6.0, "variant": {"execution.group_norm": "pallas"}}) + "\n")
    f.write(json.dumps({"benchmark": "train_step", "batch_size": 8, "error": "OOM", "variant": {"x": 1}}) + "\n")
  summary = device_summary.summarize(str(tmp_path))
  rows = summary["train_step"]
  assert [r.get("xla_flags") for r in rows] == [None, "--xla_gpu_enable_command_buffer=+WHILE", None, None]
  assert [r.get("images_per_s_vs_reference") for r in rows] == [2.0, 2.0, 4.0, None]
  assert rows[0]["first_call_vs_reference"] == pytest.approx(0.25) and rows[3]["error"] == "OOM"
  assert summary["fastest_train_step"] == {"variant": {"execution.group_norm": "pallas"}, "step_ms": 25.0,
                                           "images_per_s": 320.0, "images_per_s_vs_reference": 4.0,
                                           "first_call_s": 6.0}


def test_the_device_summary_says_whether_to_ship_the_candidate_default():
  def row(variant, images_per_s, first_call_s=10.0, bpd=8.0, kernel="pallas", **extra):
    return {"variant": variant, "images_per_s": images_per_s, "first_call_s": first_call_s,
            "first_step_bpd": bpd, "group_norm_kernel": kernel, **extra}
  shipped = row(device_summary.SHIPPED, 1300.0, kernel="xla")
  candidate = dict(device_summary.CANDIDATE)
  reference = {"first_call_s": 80.0}
  verdict = device_summary.candidate_verdict([shipped, row(candidate, 2100.0)], reference)
  assert verdict["ship"] and verdict["speedup"] == pytest.approx(2100 / 1300)
  assert verdict["first_call_limit_s"] == pytest.approx(24.0)
  for bad, failed in ((row(candidate, 1200.0), "faster"), (row(candidate, 2100.0, first_call_s=30.0),
                                                           "first_call_within_target"),
                      (row(candidate, 2100.0, bpd=8.1), "same_first_step"),  # 8.05 would pass: bf16's rounding
                      (row(candidate, 2100.0, kernel="xla"), "pallas_kernels_used")):
    verdict = device_summary.candidate_verdict([shipped, bad], reference)
    assert verdict["ship"] is False and not verdict[failed], (failed, verdict)
  # The kernels' check counts with the first call: a user's first step waits for both.
  verdict = device_summary.candidate_verdict([shipped, row(candidate, 2100.0, first_call_s=20.0,
                                                           group_norm_check_s=5.0)], reference)
  assert verdict["ship"] is False and verdict["first_call_s"] == pytest.approx(25.0)
  # A candidate too slow to compile: the kernels with the loops kept are judged as the fallback.
  scanned = row(device_summary.PALLAS_SCANNED, 1500.0, first_call_s=17.0)
  verdict = device_summary.candidate_verdict([shipped, row(candidate, 2100.0, first_call_s=30.0), scanned],
                                             reference)
  assert verdict["ship"] is False and verdict["group_norm_auto_alone"]["ship"] is True
  assert verdict["group_norm_auto_alone"]["speedup"] == pytest.approx(1500 / 1300)
  assert "group_norm_auto_alone" not in device_summary.candidate_verdict([shipped, row(candidate, 2100.0),
                                                                          scanned], reference)
  # Without the reference: 22 s. A warm row or one under other XLA flags is not the candidate's row.
  assert device_summary.candidate_verdict([shipped, row(candidate, 2100.0, first_call_s=23.0)])["ship"] is False
  others = [row(candidate, 2100.0, compilation_cache="hit"), row(candidate, 2100.0, xla_flags="--x")]
  assert device_summary.candidate_verdict([shipped, *others])["ship"] is None


def test_the_device_summary_judges_the_rows_the_device_check_measures():
  # device_summary.py names the device check's train-step rows by their variants; they must be the ones
  # device_check.sh passes to train_step.py (bash and Python cannot share the strings).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "benchmarks", "device_check.sh")) as f:
    script = f.read()
  assigned = dict(re.findall(r"^(PALLAS|AUTO)=(\S+)$", script, re.M))
  default = re.search(r'VARIANTS:-([^}]*)}', script).group(1).split()
  rows = common.variants("", [assigned.get(v.lstrip("$"), v) for v in default])
  assert rows == [device_summary.SHIPPED, device_summary.PALLAS_SCANNED, device_summary.CANDIDATE]
  warm = re.search(r"step train_step_warm .*?--variant=(\S+) --variant=\$AUTO", script, re.S)
  assert common.variants("", [warm.group(1), assigned["AUTO"]]) == [device_summary.SHIPPED, device_summary.CANDIDATE]


def test_train_step_records_a_variant_that_fails_and_measures_the_next(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = tmp_path / "train_step.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")

  def run(*variants):
    return subprocess.run([sys.executable, "benchmarks/train_step.py", "--config=configs/smoke.py", "--repeats=1",
                           "--image_shape=8,8,1", "--batch_size=2", f"--results={results}",
                           *[f"--variant={v}" for v in variants]],
                          cwd=root, capture_output=True, text=True, timeout=300, env=env)

  proc = run("execution.group_norm=bogus", "execution.group_norm=auto,execution.scan_unroll=0")
  assert proc.returncode == 0, proc.stderr[-2000:]
  failed, measured = [json.loads(x) for x in results.read_text().splitlines()]
  assert failed["error"] == ("ConfigError: config.execution.group_norm: expected one of ('xla', 'pallas', "
                             "'auto'), got 'bogus'") and failed["variant"] == {"execution.group_norm": "bogus"}
  assert measured["step_ms_median"] > 0 and "error" not in measured
  # The "auto" fields as they resolved on this CPU.
  assert measured["group_norm_kernel"] == "xla" and measured["blocks_per_iteration"] == 1
  assert 0 <= measured["group_norm_check_s"] < 1  # off GPUs "auto" runs no check
  assert measured["skip_projection"] == "dense" and measured["attention"] == "xla"
  assert np.isfinite(measured["first_step_bpd"]) and measured["first_step_grad_norm"] > 0
  assert run("execution.group_norm=bogus").returncode == 1  # nothing measured: a failure


def test_train_step_says_whether_its_step_was_compiled_or_loaded_from_the_compilation_cache(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results, cache = tmp_path / "train_step.jsonl", tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' own cache
  for cache_flag in ([f"--compilation_cache={cache}"], [f"--compilation_cache={cache}"], []):  # then no folder
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--config=configs/smoke.py", "--compile_only",
                           "--image_shape=8,8,1", "--batch_size=2", f"--results={results}", *cache_flag],
                          cwd=root, capture_output=True, text=True, timeout=300, env=dict(env, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
  compiled, loaded, uncached = [json.loads(x) for x in results.read_text().splitlines()]
  # Without a folder JAX still asks for a cache key: that is no cache.
  assert [r["compilation_cache"] for r in (compiled, loaded, uncached)] == ["miss", "hit", None]
  assert os.listdir(cache) and compiled["flops_per_step"] == loaded["flops_per_step"]
  (tmp_path / "reference.jsonl").write_text("")
  with open(results, "w") as f:  # the warm row is kept, but is not the variant to ship
    for cache_use, step_ms in (("miss", 50.0), ("hit", 40.0)):
      f.write(json.dumps({"benchmark": "train_step", "batch_size": 8, "step_ms_median": step_ms,
                          "images_per_s": 8000 / step_ms, "first_call_s": 5.0 if cache_use == "miss" else 1.0,
                          "compilation_cache": cache_use, "variant": {}}) + "\n")
  summary = device_summary.summarize(str(tmp_path))
  assert [r["compilation_cache"] for r in summary["train_step"]] == ["miss", "hit"]
  assert summary["fastest_train_step"]["first_call_s"] == 5.0


def test_pallas_check_passes_the_kernels_and_fails_a_wrong_one(monkeypatch):
  from benchmarks import pallas_check
  from vdm import group_norm
  launch = group_norm.Launch(programs=2)
  for case, dtype in (("up_norm_0", "float32"), ("norm_1", "bfloat16")):
    (record,) = pallas_check.check(case, dtype, [launch], batch=2, shape=(4, 4), channels=8, groups=4, repeats=0)
    names = {"y", "dx0", "dscale", "dbias"} | ({"dx1"} if case == "up_norm_0" else {"dshift"})
    assert record["ok"] and set(record["max_rel_err"]) == names, record
    assert max(record["max_rel_err"].values()) < record["tolerance"] / 10
  assert pallas_check.parse_launch("programs=1,num_warps=8,accumulate=rows") == group_norm.Launch(
      programs=1, num_warps=8, accumulate="rows")
  right = pallas_check._pallas  # a kernel whose scale is 1 % off: the check must fail it

  def wrong(args, groups, dtype, launch):
    return lambda parts, shift, scale, bias: right(args, groups, dtype, launch)(parts, shift, scale * 1.01, bias)
  monkeypatch.setattr(pallas_check, "_pallas", wrong)
  (record,) = pallas_check.check("norm_0", "float32", [launch], batch=2, shape=(4, 4), channels=8, groups=4,
                                 repeats=0)
  assert not record["ok"] and record["max_rel_err"]["y"] > 1e-3
  mask = pallas_check.check_mask(batch=2, shape=(4, 4), channels=8, repeats=1)  # each example rounded up to one program
  assert mask["ok"] and mask["mismatches"] == 0 and mask["activations"] == 2 * 4 * 1024 and mask["kernel_ms"] > 0
  assert abs(mask["keep_rate"] - 0.9) < 0.03
