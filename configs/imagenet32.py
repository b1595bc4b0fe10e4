"""ImageNet 32×32 (TFDS ``imagenet_resized/32x32``).

    python train.py --config=configs/imagenet32.py --workdir=runs/imagenet32

The paper reports 3.72 test bits/dim on the *original* downsampled ImageNet
32×32 (van den Oord et al. 2016). TFDS's ``imagenet_resized`` is the later
box-resized version (Chrabaszcz et al. 2017): its numbers are not comparable
with the paper's. For the original files, set
``--config.data.dataset=folder:/path`` (train/ and test/ PNGs) or an npz.
``imagenet_resized`` has no test split; its validation split is evaluated.
U-Net as in the paper: 32 blocks × 256 channels, no downsampling,
attention in the middle; batch 512. Needs ``pip install -e '.[tfds]'``
and the ImageNet files (TFDS asks for a manual download).
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = "imagenet_resized/32x32"
  config.model.network.channels = 256
  config.model.network.dropout = 0.0
  config.training.batch_size = 512
  config.training.num_steps = 2_000_000
  config.eval.periodic_examples = 4096
  return config
