"""Class-conditional MNIST with classifier-free guidance: the sample recipe plus the digits' labels.

    python train.py --config=configs/mnist_conditional.py --workdir=runs/mnist_cond
    python sample.py --workdir=runs/mnist_cond --labels=all --num_samples=8 --guidance=2

``configs/mnist_samples.py`` (a U-Net at three resolutions, the eps_mse
weighting, the Quick start's data and budget) with labels: the paper's
single-resolution network cannot draw whole digits, so guidance had no
shape to steer. The embedded 5,000 digits carry labels; one in ten is dropped to the null
class in training, so the same network gives p(x│c) and p(x) (evaluation
reports both) and samples can be guided, ε̃ = (1 + w) ε̂(z, c) − w ε̂(z, ∅).
Figures: README, Results; they were measured with the earlier sample
recipe's network and budget (32 channels at (1, 2, 2), 1,200 steps), which
this config keeps.
"""

from configs import mnist_samples


def get_config():
  config = mnist_samples.get_config()
  config.model.network.channels = 32  # the network its README figures were measured with
  config.model.network.channel_mult = (1, 2, 2)
  config.training.num_steps = 1200
  config.training.checkpoint_every = 500
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.eval.num_samples = 80  # 10 rows (one per digit) of 8
  config.eval.guidance = 2.0
  return config
