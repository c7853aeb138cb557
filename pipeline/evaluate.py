"""Losses and evaluation: what the trainer minimises and what it reports on held-out data."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import data
from pipeline.config import Spec
from pipeline.dataset_json import DatasetInfo


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """`softmax`: cross-entropy against the targets normalised to sum to 1 (mixup's mixed one-hots, or a multi-hot
    row shared out evenly); `sigmoid`: big_vision's sigmoid cross-entropy, summed over classes. Both averaged over
    examples, computed in fp32."""
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()


def topk_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images whose top-1 prediction is one of their labels, images with any of their labels in the top 5).
    For multi-label data the first count over the images is precision@1."""
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = targets.gather(1, top5) > 0
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate(model: Any, spec: Spec, info: DatasetInfo, rank: int, world_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-5 and the loss over the whole eval split, summed across ranks; images go in as `dtype`, the
    model's."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss*n, n
    for batch in data.eval_batches(info, spec.data.eval_split, spec.model.image_size, spec.eval.batch_size, rank,
                                   world_size, resize=spec.data.eval_resize,
                                   loader_workers=spec.data.loader_workers):
        images, targets = batch.images.to(device).to(dtype), batch.targets.to(device)
        logits = model(images).float()
        top1, top5 = topk_hits(logits, targets)
        sums[0] += top1
        sums[1] += top5
        sums[2] += loss_fn(logits, targets, spec.loss).double() * len(images)
        sums[3] += len(images)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    n = int(sums[3].item())
    per = 1.0 / max(n, 1)  # an empty split reports zeros, not a division by zero
    out = {"top1": sums[0].item() * per, "top5": sums[1].item() * per, "loss": sums[2].item() * per, "samples": n}
    if info.multi_label:
        out["prec1"] = out["top1"]
    return out


def evaluate_weights(spec: Spec, weights: str, split: str | None = None) -> dict[str, float]:
    """`mixer eval`: this process alone evaluates a checkpoint (run or step URL) or exported weights on a split."""
    from pipeline import convert
    from pipeline.dataset_json import DatasetError

    info = data.check_dataset(spec.data.dataset)
    net = convert.load_weights(weights, image_size=spec.model.image_size, gelu=spec.model.gelu)
    if net.num_classes != info.num_classes:
        raise DatasetError(f"{weights}: a head of {net.num_classes} classes cannot be scored on "
                           f"{spec.data.dataset}, which has {info.num_classes}")
    if split:
        spec.data.eval_split = split
    return evaluate(net, spec, info, 0, 1, torch.device("cpu"), torch.float32)


def fewshot_weights(spec: Spec, weights: str) -> dict[str, float]:
    """`mixer eval --fewshot`: this process alone runs the spec's few-shot evaluation (eval.fewshot) on a checkpoint
    (run or step URL) or exported weights; the numbers are those a run of any size logs for the same weights."""
    from pipeline import convert, fewshot
    from pipeline.config import SpecError

    f = spec.eval.fewshot
    if not f.datasets:
        raise SpecError("eval.fewshot.datasets is empty: name the downstream datasets (made by `mixer prepare`), "
                        "e.g. --set 'eval.fewshot.datasets=[s3://bucket/datasets/pets]'")
    net = convert.load_weights(weights, image_size=spec.model.image_size, gelu=spec.model.gelu)
    size, resize, batch = spec.model.image_size, spec.data.eval_resize, spec.eval.batch_size
    downstream = fewshot.prepare(f, size, resize, batch, 0, 1, spec.seed)
    return fewshot.evaluate(net, f, downstream, size, resize, batch, 0, 1, torch.device("cpu"), torch.float32)
