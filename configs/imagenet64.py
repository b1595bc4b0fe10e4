"""ImageNet 64×64 (TFDS ``imagenet_resized/64x64``), sized to fit.

    python train.py --config=configs/imagenet64.py --workdir=runs/imagenet64

The paper reports 3.40 test bits/dim on the *original* downsampled ImageNet
64×64 (not comparable with TFDS's box-resized ``imagenet_resized``; see
configs/imagenet32.py for using the original files). The reference code's
ImageNet-64 config never ran. Here: the paper's 64 blocks × 256 channels at
full resolution, which only fits with full rematerialisation
(``execution.remat_policy="full"``: each block's forward pass runs again in the
backward pass; "convs" would keep the convolutions' outputs, 3.96 GB) and bfloat16
activations (parameters, optimiser and every likelihood term stay float32).
Global batch 512 as 4 micro-batches; raise ``training.grad_accum_steps``
further if memory runs out. Measured with XLA's memory analysis (README,
Performance): 3.4 GB of temporaries for a step on one example per
micro-batch (12.3 GB without remat), plus 3.8 GB of state (about 237 M
parameters, their EMA and two Adam moments). Needs ``pip install -e '.[tfds]'`` and the
ImageNet files (TFDS asks for a manual download).
"""

from configs import imagenet32


def get_config():
  config = imagenet32.get_config()
  config.data.dataset = "imagenet_resized/64x64"
  config.model.network.num_blocks = 64
  config.execution.remat_policy = "full"
  config.execution.dtype = "bfloat16"
  config.training.grad_accum_steps = 4
  return config
