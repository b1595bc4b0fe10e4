"""Train or evaluate a VDM.

    python train.py --config=configs/mnist.py --workdir=runs/mnist
    python train.py --config=configs/mnist.py --workdir=runs/mnist --mode=eval
    python train.py --config=configs/mnist.py --workdir=runs/mnist --mode=eval --likelihood=ode  # exact, by the ODE
    python train.py --config=configs/mnist.py --print_config      # every field, its value and meaning

Running the same training command again resumes from the latest checkpoint.
``--mode=eval`` prints one JSON object as the last line of stdout.
SIGTERM or SIGINT: the current step finishes, a checkpoint is written, and
the program exits with status 143 (SIGTERM) or 130 (SIGINT).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm import cli, preemption, train_step, training
from vdm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (then evaluate) or only evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Checkpoint to evaluate (default: latest in --workdir).")
_LIKELIHOOD = flags.DEFINE_enum("likelihood", "elbo", ["elbo", "ode"],
                                "--mode=eval: the variational bound (elbo), or the probability-flow ODE's "
                                "(ode: config.eval.ode; needs the [ode] extra).")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_config_mismatch", False,
                                    "Load a checkpoint even if its model config differs from --config.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print every field of the config (overrides applied) "
                                   "with its meaning, check it, and exit.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    with cli.user_errors():
      config_lib.validate(config)
    print(cli.describe_config(config))
    return
  if not _WORKDIR.value:
    cli.fail("--workdir: required (a folder for checkpoints, metrics and samples)")
  if _LIKELIHOOD.value != "elbo" and _MODE.value != "eval":
    cli.fail(f"--likelihood={_LIKELIHOOD.value}: only with --mode=eval (training reports the ELBO)")
  cli.initialize_distributed()
  cli.enable_compilation_cache()
  try:
    with cli.user_errors():
      if _MODE.value == "train":
        record = training.train_and_evaluate(config, _WORKDIR.value,
                                             allow_config_mismatch=_ALLOW_MISMATCH.value)
      else:
        record = training.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value,
                                              allow_config_mismatch=_ALLOW_MISMATCH.value,
                                              likelihood=_LIKELIHOOD.value)
  except preemption.Preempted as e:  # SIGINT: exit 130; SIGTERM: exit 143
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
    print("stopped at once by a second Ctrl-C; run the same command to resume from the latest checkpoint",
          file=sys.stderr, flush=True)
    sys.exit(130)
  except train_step.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
