"""Few-shot linear evaluation (pipeline/fewshot.py): the closed-form solver against scikit-learn's RidgeClassifier,
and the draw of the shots from a dataset made by `mixer prepare` (scikit-learn's digits). A run that logs few-shot
accuracies, equal on 1 and 2 workers and above a random model's: tests/test_resume.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from pipeline import config, data, fewshot
from pipeline.dataset_json import DatasetError


def clustered(rng: np.random.Generator, centers: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy, offset, unevenly scaled features around class centres: hard enough that the fits make mistakes."""
    labels = np.repeat(np.arange(len(centers)), per_class)
    x = 0.4 * centers[labels] + rng.normal(size=(len(labels), centers.shape[1])) * rng.uniform(0.5, 3.0,
                                                                                              centers.shape[1])
    return (x + 5.0).astype(np.float32), labels


@pytest.mark.parametrize("shots, dims", [(10, 64), (3, 256)], ids=["more-shots-than-dims", "more-dims-than-shots"])
@pytest.mark.parametrize("l2", [1.0, 1024.0])
def test_the_solver_agrees_with_scikit_learns_ridge_classifier(shots, dims, l2):
    rng = np.random.default_rng(shots * dims)
    centers = rng.normal(size=(10, dims))
    train_x, train_y = clustered(rng, centers, shots)
    test_x, test_y = clustered(rng, centers, 300)

    ours = fewshot.predict(fewshot.fit(train_x, train_y, 10), test_x, l2)
    x64 = train_x.astype(np.float64)
    mean, std = x64.mean(0), x64.std(0) + fewshot.EPS  # the same whitening, with its intercept unregularised
    theirs = RidgeClassifier(alpha=l2).fit((x64 - mean) / std, train_y).predict((test_x - mean) / std)

    assert np.mean(ours == theirs) >= 0.995
    ours_acc, theirs_acc = np.mean(ours == test_y), np.mean(theirs == test_y)
    assert abs(ours_acc - theirs_acc) <= 0.005
    assert 0.2 < ours_acc < 0.99, ours_acc  # neither chance nor trivially separable: agreement means something


def test_the_draw_is_class_balanced_nested_and_decided_by_the_seed(digits_dataset):
    info = data.check_dataset(digits_dataset)
    big = fewshot.draw(info, "train", 12, seed=0, number=0)
    assert big == fewshot.draw(info, "train", 12, seed=0, number=0)
    assert [len(c) for c in big] == [12] * 10
    shards = info.split("train").shards
    for label, picks in enumerate(big):
        assert len(set(picks)) == 12 and all(p.label == label for p in picks)
        for p in picks[:2]:  # the labels the draw records are the shard's own
            assert data.shard_labels(info, shards[p.shard])[p.index] == (label,)
    small = fewshot.draw(info, "train", 5, seed=0, number=0)
    assert small == [c[:5] for c in big]  # 5 shots are the first 5 of a larger draw
    others = [fewshot.draw(info, "train", 5, seed=s, number=n) for s, n in ((0, 1), (1, 0))]
    for other in others:
        assert other != small and [len(c) for c in other] == [5] * 10


def test_a_draw_a_class_cannot_fill_is_refused_naming_the_class(digits_dataset):
    info = data.check_dataset(digits_dataset)
    with pytest.raises(DatasetError, match=r"'train' holds \d+ images of class \d \(\d\); eval.fewshot draws 500"):
        fewshot.draw(info, "train", 500, seed=0, number=0)


def test_fewshot_on_one_process_scores_every_test_image_and_picks_l2_from_the_list(digits_dataset):
    from pipeline.model import build

    spec = config.FewShotSpec(datasets=[digits_dataset], shots=[1, 10], l2=[1.0, 1e6], seeds=2)
    net = build("tiny", num_classes=8, image_size=32)
    downstream = fewshot.prepare(spec, 32, None, 64, 0, 1, seed=0)
    assert len(downstream[0].picks) <= 2 * 10 * (10 + spec.holdout_per_class)
    results = fewshot.evaluate(net, spec, downstream, 32, None, 64, 0, 1, torch.device("cpu"),
                               torch.float32)
    assert set(results) == {"fewshot/digits/1shot", "fewshot/digits/1shot/l2", "fewshot/digits/10shot",
                            "fewshot/digits/10shot/l2", "fewshot/seconds"}
    # a random Mixer's features still separate the digits far above chance, more with 10 shots than with 1
    assert 0.1 < results["fewshot/digits/1shot"] < results["fewshot/digits/10shot"]
    assert all(1.0 <= results[f"fewshot/digits/{n}shot/l2"] <= 1e6 for n in (1, 10))
    assert net.training  # handed back in training mode


@pytest.mark.parametrize("fewshot_raw, message", [
    ({"datasets": ["a/digits", "b/digits"]}, "must end in distinct names"),
    ({"datasets": ["digits"], "shots": []}, "non-empty list of positive shot counts"),
    ({"datasets": ["digits"], "shots": [5, 0]}, "non-empty list of positive shot counts"),
    ({"datasets": ["digits"], "l2": [1.0, -1.0]}, "must be a positive strength"),
    ({"datasets": ["digits"], "seeds": 0}, "eval.fewshot.seeds: must be positive"),
    ({"datasets": ["digits"], "shots": "5"}, r"eval.fewshot.shots: got '5' \(str\); expected a list of int"),
])
def test_a_bad_fewshot_spec_is_refused_naming_the_key(fewshot_raw, message):
    raw = {"data": {"dataset": "ds"}, "run": {"url": "run"}, "schedule": {"total_steps": 10},
           "eval": {"fewshot": fewshot_raw}}
    with pytest.raises(config.SpecError, match=message):
        config.from_dict(raw)


def test_relative_fewshot_datasets_are_made_absolute_like_the_dataset():
    spec = config.from_dict({"data": {"dataset": "ds"}, "run": {"url": "run"}, "schedule": {"total_steps": 10},
                             "eval": {"fewshot": {"datasets": ["downstream/pets", "s3://b/flowers"]}}})
    changed = config.absolute_local_paths(spec, "/home/me/specs")
    assert spec.eval.fewshot.datasets == ["/home/me/specs/downstream/pets", "s3://b/flowers"]
    assert "eval.fewshot.datasets[0]" in changed
