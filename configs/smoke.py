"""A tiny model for tests: trains in seconds on a CPU.

    python train.py --config=configs/smoke.py --workdir=/tmp/vdm_smoke

It learns nothing useful; it exercises every part of training, evaluation,
checkpointing and sampling.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.network.channels = 8
  config.model.network.num_blocks = 1
  config.model.network.dropout = 0.0
  config.model.network.fourier_exponents = (6,)
  config.model.schedule.hidden = 8
  config.training.num_steps = 4
  config.training.batch_size = 8
  config.training.log_every = 2
  config.training.eval_every = 4
  config.training.checkpoint_every = 2
  config.training.checkpoints_to_keep = 2
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.optimizer.ema_rate = 0.999
  config.eval.batch_size = 16  # the tests' small data sets: one batch, little padding
  config.eval.periodic_examples = 100
  config.eval.num_samples = 4
  config.eval.sample_steps = 5
  return config
