"""Fashion-MNIST (TFDS ``fashion_mnist``): 60,000 train, 10,000 test, 28×28 grey.

    pip install -e '.[tfds]'
    python train.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

No published VDM figure exists for Fashion-MNIST; this is the MNIST default's
small U-Net (2 blocks × 32 channels), trained longer on the full data set,
to compare data sets or changes quickly on one accelerator.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.dataset = "fashion_mnist"
  config.training.num_steps = 20_000
  config.training.batch_size = 128
  config.training.log_every = 100
  config.training.eval_every = 5000
  config.training.checkpoint_every = 5000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.ema_rate = 0.9999
  config.eval.periodic_examples = 2000
  return config
