"""Class-conditional MNIST with classifier-free guidance: the Quick-start recipe plus the digits' labels.

    python train.py --config=configs/mnist_conditional.py --workdir=runs/mnist_cond
    python sample.py --workdir=runs/mnist_cond --labels=all --num_samples=8 --guidance=2

The embedded 5,000 digits carry labels; one in ten is dropped to the null
class in training, so the same network gives p(x│c) and p(x) (evaluation
reports both) and samples can be guided, ε̃ = (1 + w) ε̂(z, c) − w ε̂(z, ∅).
Figures: README, Results.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.eval.num_samples = 80  # 10 rows (one per digit) of 8
  config.eval.guidance = 2.0
  return config
