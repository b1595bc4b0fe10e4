"""CIFAR-10, the paper's recipe (Kingma et al. 2021, table 1 and appendix B).

    python train.py --config=configs/cifar10.py --workdir=runs/cifar10

Target: 2.65 test bits/dim after 10 M steps (public checkpoint: 2.637).
Learned-endpoint linear γ ∈ [−13.3, 5], continuous time, antithetic t;
U-Net of 32 blocks × 128 channels, no downsampling, attention in the middle,
Fourier features 2^6, 2^7, dropout 0.1 (30.6 M parameters); AdamW lr 2e-4,
β 0.9/0.99, ε 1e-8, weight decay 0.01, 100 warm-up steps, batch 128,
EMA 0.9999. Needs the TFDS data source (see the README).

The blocks are scanned and rematerialised with the "convs" policy (the
convolutions' outputs are kept, norms and activations recomputed: no extra
convolution, same gradients): a batch-8 step needs 1.5 GB of activations
instead of 5.3 GB on CPU; at batch 128 on an H100, 16.1 GB of XLA
temporaries, while without remat the step does not fit in 80 GB, and in
bf16 remat is also the faster step (110 vs 151 ms; docs/performance.md).

On GPUs and TPUs the blocks compute in bfloat16 (``execution.dtype="auto"``;
parameters, optimiser state, γ, the likelihood and the loss stay float32,
evaluation runs in float32): on an H200 a step takes 96 ms instead of
TF32's 176 ms, 1.62× the 2022 reference's images/s, and the Quick start
trained this way reports the same bpd. ``--config.execution.dtype=float32``
trains in TF32. Dropout masks come from Philox and the up path's skips join
after the norm (the same function; 2 % faster there). On CPUs: float32.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.dataset = "cifar10"
  config.execution.remat = True  # remat_policy "convs" (base): same FLOPs, 0.29× the activation memory
  config.execution.dtype = "auto"  # bf16 blocks on GPUs/TPUs, float32 on CPUs
  config.execution.dropout_rng = "packed"
  config.execution.skip_concat = "after_norm"
  config.training.log_every = 1000
  config.training.eval_every = 50_000
  config.training.checkpoint_every = 10_000
  config.eval.periodic_examples = 2048
  config.eval.sample_steps = 1000
  return config
