"""Few-shot linear evaluation, the measure the paper follows pretraining with ("ImageNet 5-shot linear"): the frozen
model's pre-logits (the head's input: final LayerNorm, then the average over tokens) for n images per class of a
downstream dataset, an l2-regularised least-squares fit from them to the labels in closed form, and top-1 on the
dataset's test split.

The solver is big_vision's `fewshot_lsr`: features whitened with the shots' mean and std, a constant bias column of
100 (so the bias is all but unregularised), targets 2 * one_hot - 1, and one eigendecomposition of the smaller Gram
matrix, after which every l2 strength costs one matrix product; all of it in float64.

The shots are a class-balanced draw that depends on the seed alone: the train split's shards in a seeded order, each
shard's samples in a seeded order, the first ones of each class kept. Batches are fixed runs of samples (of the drawn
set, or of one test shard) and batch j goes to rank j mod world size, so every batch, and with it every feature,
accuracy and l2 choice, is the same on any number of workers.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import data
from pipeline.config import FewShotSpec, SpecError
from pipeline.dataset_json import DatasetError, DatasetInfo

log = logging.getLogger(__name__)

BIAS = 100.0
EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the closed-form solver


@dataclass
class Solver:
    """What the shots leave for scoring: their whitening, and the eigendecomposition that makes any l2 cheap."""

    mean: np.ndarray
    std: np.ndarray
    eigs: np.ndarray
    lhs: np.ndarray
    rhs: np.ndarray


def _design(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (features.astype(np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS)], axis=1)


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Solver:
    """Prepare the least-squares fit of `labels` (ints) from `features` (N x D) for any l2 strength."""
    x = features.astype(np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + EPS
    x = _design(x, mean, std)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    if len(x) >= x.shape[1]:  # (x^T x + l2 I)^-1 x^T y, with x^T x = q e q^T
        eigs, q = np.linalg.eigh(x.T @ x)
        return Solver(mean, std, eigs, q, q.T @ (x.T @ y))
    eigs, q = np.linalg.eigh(x @ x.T)  # x^T (x x^T + l2 I)^-1 y, with x x^T = q e q^T
    return Solver(mean, std, eigs, x.T @ q, q.T @ y)


def predict(solver: Solver, features: np.ndarray, l2: float) -> np.ndarray:
    """The predicted class of each row of `features` for l2 strength `l2`."""
    w = (solver.lhs / (solver.eigs + l2)) @ solver.rhs
    return np.argmax(_design(features, solver.mean, solver.std) @ w, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# the draw of the shots


@dataclass(frozen=True, order=True)
class Pick:
    shard: int  # position in the split's shard list
    index: int  # sample position in the shard
    label: int


def draw(info: DatasetInfo, split: str, per_class: int, seed: int, number: int) -> list[list[Pick]]:
    """Draw `number` of seed `seed`: `per_class` samples of each class of `split`, per class in draw order (so the
    first n of a larger draw are the draw of n). Shards are read in a seeded order only until every class has its
    share; a split that runs out first is an error naming the class."""
    shards = info.split(split).shards
    rng = np.random.default_rng([seed, number])
    picked: list[list[Pick]] = [[] for _ in range(info.num_classes)]
    short = info.num_classes
    for position in rng.permutation(len(shards)):
        labels = data.shard_labels(info, shards[position])
        for index in rng.permutation(len(labels)):
            label = _single_label(labels[index], info, shards[position].name)
            if len(picked[label]) < per_class:
                picked[label].append(Pick(int(position), int(index), label))
                short -= len(picked[label]) == per_class
        if short == 0:
            return picked
    counts = [len(p) for p in picked]
    worst = int(np.argmin(counts))
    raise DatasetError(f"{info.url}: split '{split}' holds {counts[worst]} images of class {worst} "
                       f"({info.classes[worst]}); eval.fewshot draws {per_class} of each class (the most shots, "
                       "plus eval.fewshot.holdout_per_class when l2 is a list): lower eval.fewshot.shots")


def _single_label(labels: tuple[int, ...], info: DatasetInfo, shard: str) -> int:
    if len(labels) != 1:
        raise DatasetError(f"{info.url}: a sample of shard {shard} has labels {list(labels)}; few-shot linear "
                           "evaluation takes single-label datasets")
    return labels[0]


# ---------------------------------------------------------------------------------------------------------------
# features on all ranks


@dataclass
class Downstream:
    """One downstream dataset, ready to score: its draws, and this rank's share of the drawn images (decoded once,
    kept for every evaluation of the run)."""

    name: str
    info: DatasetInfo
    draws: list[list[list[Pick]]]  # [seed][class] -> picks
    picks: list[Pick]  # the union of the draws, sorted
    views: dict[Pick, torch.Tensor]


def _runs(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def prepare(spec: FewShotSpec, image_size: int, resize: int | None, batch_size: int, rank: int,
            world_size: int, seed: int) -> list[Downstream]:
    """Check and draw every downstream dataset of `spec`, and read this rank's share of the drawn images."""
    out = []
    for url in spec.datasets:
        info = data.check_dataset(url)
        if info.multi_label:
            raise SpecError(f"eval.fewshot.datasets: {url} is multi-label; few-shot linear evaluation takes "
                            "single-label datasets")
        data.check_shards_present(info, [spec.train_split, spec.test_split])
        per_class = max(spec.shots) + (spec.holdout_per_class if isinstance(spec.l2, list) else 0)
        draws = [draw(info, spec.train_split, per_class, seed, number) for number in range(spec.seeds)]
        picks = sorted({p for d in draws for c in d for p in c})
        mine = [p for j, run in enumerate(_runs(len(picks), batch_size)) if j % world_size == rank
                for p in (picks[i] for i in run)]
        views = _read_views(info, info.split(spec.train_split).shards, mine, image_size, resize)
        out.append(Downstream(dataset_name(url), info, draws, picks, views))
    return out


def dataset_name(url: str) -> str:
    """What the metrics call a downstream dataset: the last part of its URL."""
    return posixpath.basename(url.rstrip("/")) or url


def _read_views(info: DatasetInfo, shards: list, picks: list[Pick], image_size: int,
                resize: int | None) -> dict[Pick, torch.Tensor]:
    views: dict[Pick, torch.Tensor] = {}
    by_shard: dict[int, dict[int, Pick]] = {}
    for p in picks:
        by_shard.setdefault(p.shard, {})[p.index] = p
    for position, wanted in sorted(by_shard.items()):
        for index, _, view in data.eval_views(info, shards[position], set(wanted), image_size, resize):
            views[wanted[index]] = view
    return views


def _test_batches(info: DatasetInfo, split: str, image_size: int, resize: int | None, batch_size: int, rank: int,
                  world_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """This rank's batches of the test split: runs of `batch_size` samples of one shard, the j-th run of the split
    to rank j mod world size. Each shard with runs of this rank is read once, up to its last such run."""
    shards = info.split(split).shards
    runs = [(position, run) for position, shard in enumerate(shards) for run in _runs(shard.samples, batch_size)]
    mine: dict[int, list[range]] = {}
    for j, (position, run) in enumerate(runs):
        if j % world_size == rank:
            mine.setdefault(position, []).append(run)
    for position, shard_runs in mine.items():
        wanted = {i for run in shard_runs for i in run}
        views: dict[int, tuple[torch.Tensor, int]] = {}
        ends = iter(shard_runs)
        run = next(ends)
        for index, sample, view in data.eval_views(info, shards[position], wanted, image_size, resize):
            while index >= run.stop:  # the views of the runs before this sample's are all in
                yield from _batch(views)
                run = next(ends)
            views[index] = (view, _single_label(sample.labels, info, shards[position].name))
        yield from _batch(views)


def _batch(views: dict[int, tuple[torch.Tensor, int]]) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """The views gathered so far as one batch (none if every sample of the run was unusable), then emptied."""
    if views:
        yield torch.stack([v for v, _ in views.values()]), [label for _, label in views.values()]
    views.clear()


class _Features:
    """Pre-logits of a Mixer for batches of uint8 views, through its eager `forward_features` (a compiled module
    compiles its `forward` only; a ZeRO-3 engine's hooks gather each submodule's parameters as in any forward)."""

    def __init__(self, module: Any, device: torch.device, dtype: torch.dtype):
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, views: torch.Tensor) -> np.ndarray:
        return self.module.forward_features(data.to_float(views).to(self.device).to(self.dtype)).float().cpu().numpy()


def _lockstep(batches: Iterator[Any], features: _Features, world_size: int, device: torch.device,
              template: torch.Tensor) -> Iterator[tuple[np.ndarray, Any]]:
    """(features, extra) for each batch, every rank running as many forwards as the busiest one (ZeRO-3's forward
    is a collective): a rank out of batches runs a throwaway forward while any other still has one."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if world_size > 1:
            more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(more)
            if not more.item():
                return
        elif batch is None:
            return
        if batch is None:
            features(template)
            continue
        yield features(batch[0]), batch[1]


def _gather(parts: list[Any], world_size: int) -> list[list[Any]]:
    if world_size == 1:
        return [parts]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, parts)
    return everyone


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(module: Any, spec: FewShotSpec, downstream: list[Downstream], image_size: int,
             resize: int | None, batch_size: int, rank: int, world_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Few-shot top-1 of `module` (a Mixer, or the module of a DeepSpeed engine) on every downstream dataset:
    `{"fewshot/<name>/<n>shot": accuracy averaged over the draws}`, `.../<n>shot/l2` when l2 is picked from a
    list, and `fewshot/seconds`. Every rank takes part and gets the results."""
    start = time.monotonic()
    module.eval()
    features = _Features(module, device, dtype)
    template = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
    results: dict[str, float] = {}
    try:
        with torch.no_grad():
            for ds in downstream:
                shots = _shot_features(ds, features, batch_size, rank, world_size, device, template)
                tests = list(_lockstep(_test_batches(ds.info, spec.test_split, image_size, resize, batch_size, rank,
                                                     world_size), features, world_size, device, template))
                everyone = [batch for part in _gather(tests, world_size) for batch in part]
                test_x = np.concatenate([x for x, _ in everyone])
                test_y = np.array([y for _, ys in everyone for y in ys])
                results.update(_score(ds, spec, shots, test_x, test_y))
    finally:
        module.train()
    results["fewshot/seconds"] = round(time.monotonic() - start, 3)
    return results


def _shot_features(ds: Downstream, features: _Features, batch_size: int, rank: int, world_size: int,
                   device: torch.device, template: torch.Tensor) -> dict[Pick, np.ndarray]:
    mine = [[ds.picks[i] for i in run] for j, run in enumerate(_runs(len(ds.picks), batch_size))
            if j % world_size == rank]
    batches = ((torch.stack([ds.views[p] for p in run if p in ds.views]), [p for p in run if p in ds.views])
               for run in mine if any(p in ds.views for p in run))
    done = list(_lockstep(batches, features, world_size, device, template))
    return {p: row for part in _gather(done, world_size) for x, picks in part for p, row in zip(picks, x, strict=True)}


def _score(ds: Downstream, spec: FewShotSpec, shots: dict[Pick, np.ndarray], test_x: np.ndarray,
           test_y: np.ndarray) -> dict[str, float]:
    """Accuracy per shot count, averaged over the draws; a drawn image that could not be decoded is left out."""
    out: dict[str, float] = {}
    most = max(spec.shots)
    for n in spec.shots:
        accuracies, l2s = [], []
        for per_class in ds.draws:
            chosen = [p for picks in per_class for p in picks[:n] if p in shots]
            solver = fit(np.stack([shots[p] for p in chosen]), np.array([p.label for p in chosen]),
                         ds.info.num_classes)
            l2 = spec.l2
            if isinstance(l2, list):
                held = [p for picks in per_class for p in picks[most:] if p in shots]
                l2 = _pick_l2(solver, l2, np.stack([shots[p] for p in held]), np.array([p.label for p in held]))
                l2s.append(l2)
            accuracies.append(float(np.mean(predict(solver, test_x, l2) == test_y)))
        key = f"fewshot/{ds.name}/{n}shot"
        out[key] = float(np.mean(accuracies))
        if l2s:
            out[f"{key}/l2"] = float(np.exp(np.mean(np.log(l2s))))
    return out


def _pick_l2(solver: Solver, l2s: list[float], x: np.ndarray, y: np.ndarray) -> float:
    """The l2 strength that scores best on the held-out draw; ties go to the first in the list."""
    scores = [float(np.mean(predict(solver, x, l2) == y)) for l2 in l2s]
    return l2s[int(np.argmax(scores))]
