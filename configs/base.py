"""The base config: every field defined once, with its meaning and units.

Experiment configs import :func:`get_config` and change only what differs.
Any field can be overridden from the shell, e.g.
``python train.py --config=configs/mnist.py --config.training.num_steps=1000``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds parameter init, data order and all training noise

  config.data = ml_collections.ConfigDict()
  # "mnist5k" (embedded), "npz:/path/file.npz", "folder:/path" (train/, test/ of PNG/JPEG)
  # or a TFDS name: cifar10, mnist, fashion_mnist, imagenet_resized/32x32, …
  config.data.dataset = "mnist5k"
  config.data.data_dir = ""  # TFDS data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.augment = False  # random flips + 90° rotations, passed to the network as conditioning

  # What the model computes: the likelihood, the schedule γ(t), the network ε̂. Changing any of
  # these makes another model: a checkpoint refuses to resume with other values.
  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 256  # values per dimension (256 for 8-bit images)
  config.model.num_diffusion_steps = 0  # T of the discrete-time loss; 0 = continuous time
  config.model.antithetic_time_sampling = True  # low-discrepancy t over the batch
  config.model.decoder = "softmax"  # "softmax" (the paper's) or "cdf" (binned Gaussian)
  config.model.prediction = "eps"  # the network's output: "eps" (the paper's), "x" or "v"; converted to ε̂
  # w(λ) of the diffusion term in training (λ = −γ): "elbo" (w = 1, the paper's), "sigmoid" (sigmoid(b − λ)),
  # "edm_monotone" or "eps_mse" (Ho et al.'s simple loss). Evaluation always reports the unweighted ELBO.
  config.model.loss_weighting = "elbo"
  config.model.sigmoid_bias = 2.0  # b of the "sigmoid" weighting
  # Class-conditional: K > 0 classes (the data's labels, 0 … K−1) embedded into the network; 0 = unconditional.
  config.model.num_classes = 0
  # Share of training labels replaced by the null class, so the model also learns p(x) and samples can use
  # classifier-free guidance (Ho & Salimans 2021). Only for num_classes > 0.
  config.model.label_dropout = 0.1

  config.model.schedule = ml_collections.ConfigDict()
  config.model.schedule.name = "learned_linear"  # fixed_linear|learned_linear|monotone_net|linear_beta|cosine
  config.model.schedule.gamma_min = -13.3  # γ(0) (initial value, if learned): log SNR⁻¹ at t = 0
  config.model.schedule.gamma_max = 5.0  # γ(1) (initial value, if learned)
  config.model.schedule.hidden = 1024  # hidden units of the monotone_net schedule (others ignore it)

  config.model.network = ml_collections.ConfigDict()  # the U-Net's arguments (vdm.networks.ScoreUNet)
  config.model.network.channels = 128  # width of the U-Net blocks at full resolution (× channel_mult below it)
  config.model.network.num_blocks = 32  # ResNet blocks going down at each resolution (up has one more)
  # Width of each resolution level as a multiple of channels, full resolution first; each further level
  # halves H and W. (1,) = the paper's network without downsampling; (1, 2, 2) sees all of a 28×28 image.
  config.model.network.channel_mult = (1,)
  config.model.network.dropout = 0.1  # dropout rate in the blocks
  config.model.network.mid_attention = True  # self-attention between the two middle blocks
  config.model.network.attention_everywhere = False  # self-attention after every block
  config.model.network.fourier_exponents = (6, 7)  # base-2 exponents of Fourier features; () = none
  # Groups of every GroupNorm; 0 = 32, fewer in narrow layers (≥ 4 channels a group). The 2022
  # reference code always used 32 (set 32 to load its checkpoints of other widths).
  config.model.network.norm_groups = 0
  # > 1: the U-Net runs on p×p patches as channels (space to depth), without the full-resolution level.
  config.model.network.patch_size = 1
  # Output z + F(z), as the paper's code (for ε-prediction, ε ≈ z at high noise); False: F(z) alone,
  # for model.prediction="v" (v = α ε − σ x is close to z at no noise level).
  config.model.network.input_skip = True
  # Compile identical blocks once (nn.scan). Their parameters are then stacked, so a checkpoint
  # keeps the value it was trained with.
  config.model.network.scan_blocks = True

  # How the network is computed, not what: a checkpoint may be resumed, evaluated or sampled with
  # other values.
  config.execution = ml_collections.ConfigDict()
  config.execution.remat = False  # recompute activations in the backward pass (less memory)
  # What remat keeps: "convs" (convolution outputs; norms/activations recomputed, no extra
  # convolutions) or "full" (nothing; the forward pass runs twice, the least memory).
  config.execution.remat_policy = "convs"
  # Network compute dtype: float32, bfloat16 (params, loss stay float32) or "auto" (bf16 on GPUs/TPUs).
  config.execution.dtype = "float32"
  # jax.default_matmul_precision of the network's matmuls and convolutions in training and sampling:
  # "default" is the backend's fast float32 (TF32 on A100/H100/H200, one bf16 pass on TPUs, exact on
  # CPUs), as the paper trained; "highest" is true float32 (3.3x slower steps on an H200).
  config.execution.matmul_precision = "default"
  # Convolution backward pass: "dot" (as matmuls; fast inside nn.scan on CPU), "xla" (XLA's own;
  # faster unrolled) or "auto" ("dot" for scanned blocks on CPU, else "xla").
  config.execution.conv_grad = "auto"
  # The PRNG of the dropout masks: "threefry" (JAX's default), "packed" (threefry keys, one call per four
  # activations, vdm.dropout: cheaper; the same bits everywhere), "philox" (fewer rounds; with JAX 0.10.2
  # not with the batch over several devices) or "rbg" (the accelerator's own; its bits differ by backend).
  config.execution.dropout_rng = "threefry"
  # Identical blocks per loop iteration of a scanned stack (nn.scan's unroll): fewer, larger
  # iterations; 1 compiles fastest; at least a stack's length (e.g. 64): no loop, straight-line code
  # (for a GPU 0.5-0.7x the bytes moved and 2-4.6x the compilation, for a TPU v5e 0.5x the cost model's
  # cycles and 3x the compilation; README, Performance); 0 = automatic: no loop on GPUs and TPUs, one block
  # an iteration on CPUs.
  config.execution.scan_unroll = 1
  # Where the up path's skips join: "before_norm" (concatenate the inputs, as the paper's code) or
  # "after_norm" (normalise input and skip apart, concatenate the normalised: the same function and
  # parameters, without storing the concatenated inputs).
  config.execution.skip_concat = "before_norm"
  # With "after_norm": the up blocks' projections of input and skip, "dense" (a matmul each), "conv" (a 1×1
  # convolution each: on GPUs cuDNN fuses the additions around them) or "auto" (conv on GPUs). The same function.
  config.execution.skip_projection = "auto"
  # The attention blocks: "xla" (flax's: the attention weights formed), "cudnn" (cuDNN's fused attention for
  # bf16/fp16 activations; flax's otherwise) or "auto" (cudnn on GPUs of compute capability ≥ 8). Same function.
  config.execution.attention = "auto"
  # With dtype bfloat16: carry the blocks' residual stream (and the skips) in float32, the blocks'
  # insides in bf16 (more memory traffic; a smaller likelihood cost of bf16).
  config.execution.float32_residuals = False
  # GroupNorm (and the swish after it): "xla" (flax's nn.GroupNorm, fused by XLA) or "pallas" (one kernel
  # each way, vdm.group_norm: Triton on GPUs, Pallas's interpreter on CPUs, slow; not on TPUs; norms whose
  # group count or size is not a power of two stay XLA's; on several devices each takes its share of the
  # batch) or "auto" (the kernels on GPUs where they pass a check against the reference when the model is
  # built, else XLA's). The same function and parameters.
  config.execution.group_norm = "xla"
  # How the "pallas" kernels run on a GPU (the same function): warps per program, programs per example
  # (a power of two; each normalises its share of the groups; at least one per part of an up block's input)
  # and how their loops sum ("elementwise": reduced once, after the loop; "rows": in every iteration).
  config.execution.pallas_num_warps = 4
  config.execution.pallas_programs = 4
  config.execution.pallas_accumulate = "elementwise"
  # Threefry (JAX's random bits, the dropout masks' keys) lowered for GPUs as one kernel a call, JAX's own
  # (jax_threefry_gpu_kernel_lowering; a process-wide JAX setting): the same bits, and a compilation that
  # need not fuse ~130 integer instructions a call (the unrolled CIFAR-10 step: 0.54-0.60x the time). On one
  # device only: XLA cannot split that kernel over the batch, so with several each would draw all of it.
  config.execution.threefry_gpu_kernel = True

  config.training = ml_collections.ConfigDict()
  config.training.num_steps = 10_000_000  # optimiser steps in total
  config.training.batch_size = 128  # global batch, all devices together
  config.training.grad_accum_steps = 1  # micro-batches per step (less memory, same update)
  config.training.steps_per_call = 1  # steps per jitted call (lax.scan); divides the intervals below
  config.training.log_every = 100  # steps between metric writes
  config.training.eval_every = 10_000  # steps between evaluations + sample grids; 0 = never
  config.training.checkpoint_every = 10_000  # steps between checkpoints
  config.training.checkpoints_to_keep = 3  # older checkpoints are deleted
  config.training.on_nonfinite = "skip"  # a NaN/Inf loss or gradient: "skip" the update (counted) or "stop"
  # monotone_net in continuous time with the ELBO weighting: learn the schedule's interior by minimising
  # the diffusion loss's variance (paper appendix I.2; the ELBO gives it no gradient in expectation).
  config.training.minimize_variance = True
  # Adaptive importance sampling of t (Kingma & Gao 2023, app. F): K equal bins of t hold an EMA of the
  # diffusion loss²; t is drawn ∝ its square root (plus a uniform floor) and weighted by 1/q(t), so the
  # expectation is unchanged. 0 = off (t uniform). Changes the checkpointed state: a run resumes with the
  # K it saved, or from a checkpoint without it.
  config.training.importance_bins = 0
  config.training.importance_decay = 0.99  # EMA decay of the per-bin loss²
  config.training.importance_floor = 0.1  # share of the uniform density mixed into q

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4  # peak learning rate
  config.optimizer.b1 = 0.9  # Adam β1
  config.optimizer.b2 = 0.99  # Adam β2
  config.optimizer.eps = 1e-8  # Adam ε
  config.optimizer.weight_decay = 0.01  # AdamW decay; not applied to biases or norm scales
  config.optimizer.warmup_steps = 100  # linear warm-up from 0 to the peak rate
  config.optimizer.decay = "constant"  # after warm-up: constant|cosine|linear (to 0 at num_steps)
  config.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 = off
  # Learning-rate multiplier for the schedule's interior (monotone_net's l1–l3, which learn by variance
  # minimisation): its optimum is far from the initial near-linear curve, and at the network's rate it
  # gets only part of the way in a short run (README, Results: ×10 halves the estimator's std where ×1
  # lowers it by a third). Endpoints and network: ×1. Schedules without an interior: no effect.
  config.optimizer.schedule_lr_scale = 10.0
  config.optimizer.ema_rate = 0.9999  # EMA decay of the evaluated params; 0 = EMA equals params
  config.optimizer.ema_warmup = True  # decay min(rate, (1 + n)/(10 + n)) at step n

  config.eval = ml_collections.ConfigDict()
  config.eval.split = "test"  # split evaluated by --mode=eval and at the end of training
  config.eval.batch_size = 256  # evaluation batch, all devices together
  config.eval.draws = 1  # independent (t, ε) draws per example (R)
  # Evaluate bits/dim with float32 activations and "highest" matmul precision, whatever the model
  # trained with (the reported figure does not depend on the accelerator); False: as in training.
  config.eval.full_precision = True
  # How evaluation's t ~ U(0, 1) maps to γ in the continuous-time bound (the same expectation either
  # way, paper §5): "schedule" (γ(t), as training), "linear" (γ uniform between the schedule's
  # endpoints), or "auto": linear for cosine and linear_beta, whose steep ends make the uniform-t
  # estimate heavy-tailed, else the schedule's own path.
  config.eval.gamma_path = "auto"
  config.eval.periodic_examples = 0  # examples in periodic evals during training; 0 = all
  config.eval.num_samples = 64  # images in each sample grid written during training
  config.eval.sample_steps = 250  # ancestral steps for those samples
  config.eval.langevin_steps = 0  # Langevin corrector steps after each of them (one network evaluation each)
  config.eval.langevin_snr = 0.1  # the corrector's step size, as a signal-to-noise ratio r (Song et al. 2021)
  # Classifier-free guidance weight w of a conditional model's sample grids (one row per class):
  # ε̃ = (1 + w) ε̂(z, c) − w ε̂(z, ∅); 0 = the conditional model as trained.
  config.eval.guidance = 0.0
  # --mode=eval --likelihood=ode: the bound on −log P(x) by the probability-flow ODE (vdm.ode, the [ode] extra).
  config.eval.ode = ml_collections.ConfigDict()
  config.eval.ode.rtol = 1e-5  # Dormand–Prince relative tolerance
  config.eval.ode.atol = 1e-5  # and absolute tolerance
  config.eval.ode.max_steps = 4096  # solver steps before it gives up (an error, not a wrong number)
  # Density on the pixel bins: "decoder" (the model's own decoder at t = 0, as the ELBO) or "uniform" (y = x + U(bin)).
  config.eval.ode.dequantization = "decoder"
  config.eval.ode.examples = 0  # evaluate the first N examples of the split; 0 = all (each costs ~100s of passes)
  config.lock()  # a misspelt or moved field is an error, not a new field: set only those defined here
  return config
