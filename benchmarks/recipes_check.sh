#!/usr/bin/env bash
# Sample-quality recipes on an accelerator: which MNIST-5k recipe draws the best digits, in minutes.
#
#   bash benchmarks/recipes_check.sh [OUT_DIR]           # default OUT_DIR: recipes_check/; ~2 minutes a recipe on an H200
#   RECIPES="shipped longer" bash benchmarks/recipes_check.sh OUT   # only these, in this order
#   SEEDS="0 1 2" SAMPLE_SEEDS=0,1,2,3 bash benchmarks/recipes_check.sh OUT   # training and sample seeds
#   SMALL=1 bash benchmarks/recipes_check.sh /tmp/rc     # tiny runs: try the script on a CPU
#
# One draw of the sample metric is noisy (500 samples: FD ratios of one checkpoint range over ~0.9 between
# sample seeds) and so is one training run (the training seed moves a recipe's mean by ~±0.2): each recipe
# trains once per training seed in SEEDS (default "0 1") and is scored at every seed in SAMPLE_SEEDS
# (default 0,1,2,3; each also trains the feature classifier anew), and the script ends with one summary
# line per recipe: the mean FD ratio of each training seed, their mean and its standard error.
#
# On 2 CPU cores one recipe is ~25–30 minutes of training and ~5–9 of sampling; on an H200 the recipe as
# it was until 2026-11-27 (1,800 steps at batch 32) took about 2 minutes in all (measured; today's 8,000
# steps at batch 16 not yet), so a short GPU slot can compare what the CPU cannot (issues "objectives" and
# "conditional"). Each recipe trains configs/mnist_samples.py (or mnist_conditional.py) as shipped or with
# some overrides (without labels, the recipe until 2026-11-28, afternoon: FD ratio 2.47 on a CPU against
# the labelled recipe's 1.34 ± 0.01; the sigmoid weighting, b = 2, the recipe's until 2026-11-28, morning: on a CPU 0.4 bpd
# worse ELBO than edm_monotone and samples no better; twice the steps; EMA decay 0.995; learning rate
# 4e-3; the eps_mse weighting, the recipe's until 2026-11-27, late evening; ε-prediction; 32 channels;
# the conditional model, also three times as long), then
# `python -m vdm.sample_quality` draws 500 samples and gives their Fréchet distance in the features of a
# classifier trained on the training digits, beside held-out real digits' (`fd_ratio`: samples' FD over
# held-out digits'; the objectives issue asks for ≤ 2), and for the conditional model the label accuracy
# at several guidance weights.
#
# Same needs as device_check.sh (JAX for the accelerator, flax, optax, orbax-checkpoint, absl-py, tqdm,
# pillow; ml-collections from .whl/). Writes into OUT_DIR:
#   recipes.jsonl   per recipe and training seed: its overrides, training wall seconds, the final eval
#                   JSON (ELBO bpd) and the sample-quality records (one per sample seed and sampler setting /
#                   guidance weight, and sample_quality's summary over the seeds); then per recipe a
#                   "recipe_summary" record over its training seeds
#   log.txt         everything the steps printed
OUT=${1:-recipes_check}
BUDGET=${BUDGET:-540}
SEEDS=${SEEDS:-0 1}
SAMPLE_SEEDS=${SAMPLE_SEEDS:-0,1,2,3}
source "$(dirname "$0")/device_common.sh"

if [[ -n "${SMALL:-}" ]]; then  # tiny runs, to check the script itself on a CPU
  TRAIN=(--config.training.num_steps=6 --config.training.log_every=3 --config.training.checkpoint_every=6
         --config.eval.num_samples=0 --config.eval.draws=1)
  QUALITY=(--num_samples=20 --num_steps=5 --classifier_steps=5); LONG_STEPS=10; LONGER_TRAINING=12
  CONDITIONAL_LONGER=12
else
  TRAIN=(--config.eval.num_samples=0); QUALITY=(--num_samples=500 --num_steps=100); LONG_STEPS=1000
  LONGER_TRAINING=16000  # twice the recipe's 8,000 steps
  CONDITIONAL_LONGER=5400  # three times the conditional recipe's 1,800
fi

recipe() {  # recipe NAME CONFIG QUALITY_ARGS -- OVERRIDES…: per training seed, train, then sample quality
  # QUALITY_ARGS: extra sample_quality flags; several settings separated by '|' (one model, several samplers):
  # the first is scored at every seed of SAMPLE_SEEDS, the others at its first seed only
  local name=$1 config=$2 qualities=$3; shift 4
  local seed dir t0 train_s quality settings i
  IFS='|' read -ra settings <<<"$qualities"
  ((${#settings[@]})) || settings=("")
  for seed in $SEEDS; do
    dir=$(mktemp -d)
    t0=$SECONDS
    step "train_${name}_seed$seed" 240 bash -c "$PY train.py --config=$config --workdir='$dir' --config.seed=$seed ${TRAIN[*]} $* | tail -n 1 > '$dir/eval.json'"
    train_s=$((SECONDS - t0))
    for i in "${!settings[@]}"; do
      quality="--seed=$SAMPLE_SEEDS ${settings[$i]}"
      ((i == 0)) || quality="--seed=${SAMPLE_SEEDS%%,*} ${settings[$i]}"
      step "quality_${name}_seed$seed" 300 bash -c "$PY -m vdm.sample_quality --workdir='$dir' ${QUALITY[*]} $quality >> '$dir/quality.jsonl'"
    done
    $PY - "$name" "$config" "$seed" "$train_s" "$dir" "$@" >>"$OUT/recipes.jsonl" <<'EOF'
import json, os, sys
name, config, seed, train_s, folder, *overrides = sys.argv[1:]
def read(path):
  try:
    with open(os.path.join(folder, path)) as f:
      return [json.loads(line) for line in f if line.strip().startswith("{")]
  except (OSError, ValueError):
    return []
print(json.dumps({"benchmark": "recipe", "recipe": name, "config": config, "overrides": overrides,
                  "training_seed": int(seed), "train_and_eval_wall_s": int(train_s),
                  "eval": (read("eval.json") or [None])[-1], "sample_quality": read("quality.jsonl")}))
EOF
  done
}

# RECIPES="a b …" runs only those, in that order (default: all but shipped_quick, in this order).
KNOWN="shipped shipped_quick unconditional sigmoid_b2 longer ema_0995 lr_4e-3 eps_mse eps_prediction wider conditional conditional_longer"
RECIPES=${RECIPES:-${KNOWN/ shipped_quick/}}
for name in $RECIPES; do  # a misspelt name stops the script before it spends the slot
  [[ " $KNOWN " == *" $name "* ]] || { echo "recipes_check.sh: unknown recipe $name (known: $KNOWN)" | tee -a "$LOG"; exit 2; }
done
M=configs/mnist_samples.py
for name in $RECIPES; do
  case $name in
    shipped) recipe shipped "$M" "|--num_steps=$LONG_STEPS" -- ;;
    shipped_quick) recipe shipped_quick "$M" "" -- ;;  # the shipped recipe, one sampler setting
    unconditional) recipe unconditional "$M" "" -- --config.model.num_classes=0 ;;
    sigmoid_b2) recipe sigmoid_b2 "$M" "" -- --config.model.loss_weighting=sigmoid --config.model.sigmoid_bias=2 ;;
    longer) recipe longer "$M" "" -- --config.training.num_steps=$LONGER_TRAINING ;;
    lr_4e-3) recipe lr_4e-3 "$M" "" -- --config.optimizer.learning_rate=4e-3 ;;
    eps_mse) recipe eps_mse "$M" "" -- --config.model.loss_weighting=eps_mse ;;
    eps_prediction) recipe eps_prediction "$M" "" -- --config.model.prediction=eps ;;
    wider) recipe wider "$M" "" -- --config.model.network.channels=32 ;;
    ema_0995) recipe ema_0995 "$M" "" -- --config.optimizer.ema_rate=0.995 ;;
    conditional) recipe conditional configs/mnist_conditional.py "--guidance=0,2,5" -- ;;
    conditional_longer) recipe conditional_longer configs/mnist_conditional.py "--guidance=0,2,5" -- \
      --config.training.num_steps=$CONDITIONAL_LONGER ;;
  esac
done
$PY benchmarks/recipes_summary.py "$OUT/recipes.jsonl" | tee -a "$OUT/recipes.jsonl" "$LOG"
