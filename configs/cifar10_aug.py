"""CIFAR-10 with data augmentation, the paper's second CIFAR-10 model.

    python train.py --config=configs/cifar10_aug.py --workdir=runs/cifar10_aug

Target: 2.49 test bits/dim (paper, table 1; public checkpoint: 2.522).
Random horizontal flips and 90° rotations (the 8 symmetries of the square),
the applied one passed to the network as conditioning (code 0, the
identity, at evaluation and sampling). Compared with configs/cifar10.py:
256 channels, attention after every block, the monotone-network γ schedule,
dropout 0.05, batch 1024 (the public run used 768). Needs the TFDS data
source (``pip install -e '.[tfds]'``) and several accelerators.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.augment = True
  config.model.network.channels = 256
  config.model.network.attention_everywhere = True
  config.model.schedule.name = "monotone_net"
  config.model.network.dropout = 0.05
  config.training.batch_size = 1024
  return config
