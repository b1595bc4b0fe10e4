"""One line per recipe and sampler setting from recipes_check.sh's records: the FD ratio over training seeds.

    python benchmarks/recipes_summary.py recipes.jsonl

Each "recipe" record holds one training seed's sample-quality lines: one per
sample seed, and with several sample seeds ``vdm.sample_quality``'s summary
of them. A training seed's value for a setting (sampler steps, sampler, η,
guidance weight) is that summary's ``fd_ratio_mean``, or the single seed's
``fd_ratio``. The summary gives each training seed's value, their mean and
its standard error (the spread between training seeds: it holds the sample
noise too), the mean test bpd, and for a conditional model the label
accuracy the same way.
"""

import json
import math
import sys

SETTING = ("num_steps", "sampler", "eta", "clip_denoised", "langevin_steps", "guidance")


def per_seed_values(quality: list[dict], metric: str = "fd_ratio") -> dict[tuple, float]:
  """{setting: value} of one training seed's sample-quality lines (a summary line wins over single lines)."""
  singles, summaries = {}, {}
  for line in quality:
    key = tuple(line.get(k) for k in SETTING)
    if f"{metric}_mean" in line:
      summaries[key] = line[f"{metric}_mean"]
    elif metric in line:
      singles.setdefault(key, line[metric])
  return {**singles, **summaries}


def _mean_sem(values: list[float]) -> tuple[float, float | None]:
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, None
  return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1) / len(values))


def summarize(records: list[dict]) -> list[dict]:
  by_recipe: dict[str, list[dict]] = {}
  for r in records:
    if r.get("benchmark") == "recipe":
      by_recipe.setdefault(r["recipe"], []).append(r)
  out = []
  for name, runs in by_recipe.items():
    values = [per_seed_values(r.get("sample_quality") or []) for r in runs]
    accuracies = [per_seed_values(r.get("sample_quality") or [], "label_accuracy") for r in runs]
    bpds = [r["eval"]["bpd"] for r in runs if isinstance(r.get("eval"), dict) and "bpd" in r["eval"]]
    settings = []
    for v in values:
      settings += [k for k in v if k not in settings]
    for key in settings:
      ratios = [v[key] for v in values if key in v]
      mean, sem = _mean_sem(ratios)
      record = {"benchmark": "recipe_summary", "recipe": name,
                **{k: v for k, v in zip(SETTING, key) if v is not None},
                "training_seeds": [r.get("training_seed") for r, v in zip(runs, values) if key in v],
                "fd_ratios": ratios, "fd_ratio_mean": mean, "fd_ratio_sem": sem}
      accuracy = [a[key] for a in accuracies if key in a]
      if accuracy:
        record["label_accuracy_mean"], record["label_accuracy_sem"] = _mean_sem(accuracy)
      if bpds:
        record["bpd_mean"] = sum(bpds) / len(bpds)
      out.append(record)
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 1:
    sys.exit("usage: python benchmarks/recipes_summary.py recipes.jsonl")
  with open(argv[0]) as f:
    records = [json.loads(line) for line in f if line.strip().startswith("{")]
  for record in summarize(records):
    print(json.dumps(record))


if __name__ == "__main__":
  main(sys.argv[1:])
