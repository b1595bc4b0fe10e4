"""The sample metric: the Fréchet distance against closed forms; the classifier on real digits."""

import numpy as np
import pytest

from vdm import input_pipeline, sample_quality
from vdm.config import ConfigError


def test_frechet_distance_of_gaussians_matches_the_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
  sd1, sd2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 0.1])
  f1 = mu1 + sd1 * rng.normal(size=(400_000, 4))
  f2 = mu2 + sd2 * rng.normal(size=(400_000, 4))
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # commuting covariances
  assert sample_quality.frechet_distance(f1, f2) == pytest.approx(closed, rel=5e-3)
  # A full covariance, rotated: FD is invariant under a common rotation of both sets.
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  assert sample_quality.frechet_distance(f1 @ q, f2 @ q) == pytest.approx(
      sample_quality.frechet_distance(f1, f2), rel=1e-9)
  assert abs(sample_quality.frechet_distance(f1, f1)) < 1e-8
  shift = np.array([0.3, -0.4, 0.0, 1.2])
  assert sample_quality.frechet_distance(f1 + shift, f1) == pytest.approx(np.sum(shift ** 2), rel=1e-7)
  with pytest.raises(ConfigError, match="features: expected two"):
    sample_quality.frechet_distance(f1, f2[:, :3])


def test_the_bootstrap_std_is_the_spread_of_the_fd_over_independent_draws():
  rng = np.random.default_rng(0)
  d, n = 16, 300
  reference = rng.normal(size=(20_000, d))
  draw = lambda: 0.3 + 1.2 * rng.normal(size=(n, d))  # noqa: E731  samples off the reference: FD ≈ 2.4 ± 0.2
  spread = np.std([sample_quality.frechet_distance(draw(), reference) for _ in range(200)])
  estimates = [sample_quality.bootstrap_std(draw(), reference, seed=k) for k in range(5)]
  assert 0.6 * spread < np.mean(estimates) < 1.5 * spread
  assert sample_quality.bootstrap_std(reference[:n], reference) < 0.5 * spread  # from the reference itself


def test_the_classifier_tells_digits_apart_and_real_digits_are_closer_than_noise():
  data = input_pipeline.load_dataset("mnist5k")
  train, test = data["train"], data["test"]
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (500,) + train.image_shape).astype(np.uint8)
  blurred = (np.asarray(test.images).astype(np.int32) // 64 * 64).astype(np.uint8)  # 4 grey levels
  classifier = sample_quality.train_classifier(np.asarray(train.images), train.labels, steps=600)
  record = sample_quality.evaluate_samples(noise, train, test, classifier=classifier)
  assert record["classifier_test_accuracy"] > 0.9
  assert record["fd_samples"] > 20 * record["fd_test"]  # noise is far; held-out digits are close
  assert 0 < record["fd_samples_std"] < 0.1 * record["fd_samples"]
  assert record["fd_ratio_std"] == pytest.approx(record["fd_samples_std"] / record["fd_test"])
  coarse = sample_quality.evaluate_samples(blurred, train, test, classifier=classifier)
  assert record["fd_test"] < coarse["fd_samples"] < record["fd_samples"]
  # Samples drawn "for" classes: the share the classifier assigns to them (here: the test digits' own labels).
  right = sample_quality.evaluate_samples(test.images, train, test, classifier=classifier, sample_labels=test.labels)
  assert right["label_accuracy"] == record["classifier_test_accuracy"]
  wrong = sample_quality.evaluate_samples(test.images, train, test, classifier=classifier,
                                          sample_labels=(np.asarray(test.labels) + 1) % 10)
  assert wrong["label_accuracy"] < 0.1
  with pytest.raises(ConfigError, match="needs labels"):
    sample_quality.evaluate_samples(noise, input_pipeline.Split(np.asarray(train.images)), test)


def test_the_command_says_what_is_missing_in_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as stop:
    sample_quality.main([f"--workdir={tmp_path}/none"])
  assert stop.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no checkpoint under")
