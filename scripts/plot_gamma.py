"""Plot the noise schedules γ(t) of checkpoints into one PNG (for the README).

    python scripts/plot_gamma.py --out=docs/gamma.png \\
        --run="learned_linear=runs/linear" --run="monotone ×10=runs/monotone" \\
        --optimum="best for monotone ×10=ev.jsonl:runs/monotone"

Each ``--run`` is ``label=workdir``: γ at 201 points of t from the
checkpoint's EMA parameters. Each ``--optimum`` is ``label=file:workdir``:
the ``gamma_optimal`` points (t = 0, 0.1, …, 1) that
``benchmarks/estimator_variance.py --optimum_cells=K`` printed for that
workdir into ``file`` (its JSON lines), drawn as dots. Needs only Pillow.
"""

import json
import os
import sys

from absl import app, flags
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_OUT = flags.DEFINE_string("out", "gamma.png", "PNG to write.")
_RUNS = flags.DEFINE_multi_string("run", [], "label=workdir")
_OPTIMA = flags.DEFINE_multi_string("optimum", [], "label=jsonl_file:workdir")

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 560, 360, 52, 16, 16, 40


def _split(spec: str, flag: str) -> tuple[str, str]:
  if "=" not in spec:
    raise app.UsageError(f"--{flag}={spec!r}: expected label=…")
  label, value = spec.rsplit("=", 1)  # the label may hold "=", a path rarely does
  return label, value


def schedule_curve(workdir: str, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
  import vdm  # noqa: PLC0415
  trained = vdm.load(workdir)
  t = np.linspace(0.0, 1.0, points)
  gamma = trained.model.apply({"params": trained.params}, jnp.asarray(t, jnp.float32), method="gamma")
  return t, np.asarray(gamma, np.float64)


def optimum_points(spec: str) -> tuple[np.ndarray, np.ndarray]:
  path, workdir = spec.rsplit(":", 1)
  with open(path) as f:
    for line in f:
      if line.startswith("{"):
        record = json.loads(line)
        if record.get("checkpoint") == os.path.abspath(workdir) and "gamma_optimal" in record:
          gamma = np.array(record["gamma_optimal"], np.float64)
          return np.linspace(0.0, 1.0, len(gamma)), gamma
  raise app.UsageError(f"--optimum: no gamma_optimal record of {os.path.abspath(workdir)} in {path}")


def draw(curves, dots, out: str) -> None:
  """``curves``, ``dots``: lists of (label, t, γ)."""
  image = Image.new("RGB", (WIDTH, HEIGHT), "white")
  pen = ImageDraw.Draw(image)
  every = np.concatenate([g for _, _, g in curves + dots])
  low, high = np.floor(every.min() / 5) * 5, np.ceil(every.max() / 5) * 5

  def xy(t, g):
    x = LEFT + t * (WIDTH - LEFT - RIGHT)
    y = TOP + (high - g) / (high - low) * (HEIGHT - TOP - BOTTOM)
    return float(x), float(y)

  for g in np.arange(low, high + 1e-9, 5.0):  # grid and axis labels
    pen.line([xy(0, g), xy(1, g)], fill=(225, 225, 225))
    pen.text((4, xy(0, g)[1] - 6), f"{g:g}", fill="black")
  for t in np.linspace(0, 1, 6):
    pen.line([xy(t, low), xy(t, high)], fill=(225, 225, 225))
    pen.text((xy(t, low)[0] - 8, HEIGHT - BOTTOM + 4), f"{t:.1f}", fill="black")
  pen.text((WIDTH // 2 - 4, HEIGHT - 16), "t", fill="black")
  pen.text((4, 0), "gamma(t)", fill="black")
  pen.rectangle([xy(0, high), xy(1, low)], outline="black")
  for i, (label, t, g) in enumerate(curves + dots):
    colour = COLOURS[i % len(COLOURS)]
    if i < len(curves):
      pen.line([xy(a, b) for a, b in zip(t, g)], fill=colour, width=2)
    else:
      for a, b in zip(t, g):
        x, y = xy(a, b)
        pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    pen.text((LEFT + 10, TOP + 6 + 14 * i), label, fill=colour)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  image.save(out)


def main(argv):
  del argv
  if not _RUNS.value and not _OPTIMA.value:
    raise app.UsageError("give at least one --run=label=workdir")
  curves = [(label, *schedule_curve(workdir)) for label, workdir in (_split(s, "run") for s in _RUNS.value)]
  dots = [(label, *optimum_points(spec)) for label, spec in (_split(s, "optimum") for s in _OPTIMA.value)]
  draw(curves, dots, _OUT.value)
  print(_OUT.value)


if __name__ == "__main__":
  app.run(main)
