"""pipeline.evaluate: the two losses, the top-k counts, and the eval loop on a stub model and stub batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import config, data
from pipeline import evaluate as ev
from pipeline.dataset_json import DatasetInfo
from pipeline.evaluate import evaluate, loss_fn, topk_hits


def one_hot(labels: list[int] | torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels), k).float()


def multi_hot(rows: list[list[int]], k: int) -> torch.Tensor:
    t = torch.zeros(len(rows), k)
    for i, labels in enumerate(rows):
        t[i, labels] = 1.0
    return t


# --- loss_fn ---------------------------------------------------------------------------------------------------------


def test_softmax_loss_on_one_hot_targets_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 10, generator=g) * 3, torch.randint(0, 10, (8,), generator=g)
    loss = loss_fn(logits, one_hot(labels, 10), "softmax")
    assert loss.shape == ()
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_softmax_loss_on_mixed_targets_mixes_the_two_cross_entropies():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g) * 2
    a, b = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    lam = 0.3
    targets = lam * one_hot(a, 5) + (1 - lam) * one_hot(b, 5)
    expected = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    assert loss_fn(logits, targets, "softmax").item() == pytest.approx(expected.item(), rel=1e-6)


def test_softmax_loss_shares_a_multi_hot_row_out_evenly():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0]])
    rows = [[0, 2], [1, 2, 3]]
    expected = 0.0
    for i, labels in enumerate(rows):  # -sum_j t_j log p_j with t = 1/len(labels) on each label
        log_z = math.log(sum(math.exp(x) for x in logits[i].tolist()))
        expected += sum(log_z - logits[i, j].item() for j in labels) / len(labels)
    expected /= len(rows)
    assert loss_fn(logits, multi_hot(rows, 4), "softmax").item() == pytest.approx(expected, rel=1e-6)
    # only the shape of the row matters, not its sum
    assert loss_fn(logits, 5 * multi_hot(rows, 4), "softmax").item() == pytest.approx(expected, rel=1e-6)


def test_softmax_loss_is_computed_in_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(16, 100, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 100, (16,), generator=g)
    loss = loss_fn(logits, one_hot(labels, 100), "softmax")
    assert loss.dtype == torch.float32
    # the same logits in fp32 give the same loss to fp32 precision (a bf16 log-softmax would be off by ~1e-2)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.float(), labels).item(), rel=1e-6)


def test_sigmoid_loss_is_bce_summed_over_classes_and_averaged_over_examples():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0], [0.1, 0.2, -0.3], [10.0, -10.0, 0.0]])
    targets = multi_hot([[0], [1, 2], [], [0, 1]], 3)
    expected = 0.0
    for row_x, row_t in zip(logits.tolist(), targets.tolist(), strict=True):
        for x, t in zip(row_x, row_t, strict=True):
            p = 1 / (1 + math.exp(-x))
            expected += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    expected /= len(logits)
    loss = loss_fn(logits, targets, "sigmoid")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn(logits.bfloat16(), targets, "sigmoid").dtype == torch.float32


# --- topk_hits -------------------------------------------------------------------------------------------------------


def logits_from_ranks(ranking: list[list[int]]) -> torch.Tensor:
    """Each row lists the classes from the highest logit to the lowest."""
    k = len(ranking[0])
    out = torch.zeros(len(ranking), k)
    for i, order in enumerate(ranking):
        for rank, cls in enumerate(order):
            out[i, cls] = float(k - rank)
    return out


def test_topk_hits_counts_top1_and_top5():
    ranking = [
        [3, 0, 1, 2, 4, 5, 6],  # label 3 first: top-1 and top-5
        [0, 1, 2, 4, 6, 3, 5],  # label 6 fifth: top-5 only
        [0, 1, 2, 4, 6, 3, 5],  # label 3 sixth: neither
        [5, 2, 0, 1, 3, 4, 6],  # labels {2, 5}, 5 first: top-1 (precision@1) and top-5
        [1, 4, 0, 2, 3, 5, 6],  # labels {4, 6}, 4 second, 6 last: top-5 only
        [0, 1, 2, 3, 4, 5, 6],  # labels {5, 6}: neither
    ]
    targets = multi_hot([[3], [6], [3], [2, 5], [4, 6], [5, 6]], 7)
    top1, top5 = topk_hits(logits_from_ranks(ranking), targets)
    assert (int(top1), int(top5)) == (2, 4)


def test_topk_hits_with_fewer_than_five_classes_counts_any_label():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
    targets = one_hot([0, 0, 2], 3)
    top1, top5 = topk_hits(logits, targets)
    assert (int(top1), int(top5)) == (1, 3)  # every label is within the top 3 of 3 classes


def test_topk_hits_counts_each_mixed_label():
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    mixed = 0.3 * one_hot([1], 7) + 0.7 * one_hot([0], 7)  # the top-1 class is the minor one of the mix
    top1, top5 = topk_hits(logits, mixed)
    assert (int(top1), int(top5)) == (1, 1)


# --- evaluate --------------------------------------------------------------------------------------------------------


class LogitsFromImages(torch.nn.Module):
    """A stub model whose logits are its input images flattened: each test writes the logits it wants into them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool, torch.dtype]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled(), images.dtype))
        return images.flatten(1)


def as_batch(logits: torch.Tensor, targets: torch.Tensor, first_key: int) -> data.Batch:
    n, k = logits.shape
    return data.Batch(logits.reshape(n, 1, 1, k), targets, [f"{first_key + i:06d}" for i in range(n)])


def fake_eval_batches(monkeypatch: pytest.MonkeyPatch, batches: list[data.Batch]) -> list[tuple]:
    calls: list[tuple] = []

    def eval_batches(info, split, image_size, batch_size, rank, world_size, **kwargs):
        calls.append((info, split, image_size, batch_size, rank, world_size))
        yield from batches

    monkeypatch.setattr(ev.data, "eval_batches", eval_batches)
    return calls


def eval_spec(loss: str = "softmax") -> config.Spec:
    return config.from_dict({
        "model": {"variant": "tiny", "image_size": 32},
        "data": {"dataset": "ds", "streams": 8, "loader_workers": 0, "eval_split": "val"},
        "loss": loss,
        "schedule": {"total_steps": 10},
        "batch": {"global": 32, "micro": 8},
        "eval": {"batch_size": 3},
        "run": {"url": "run"},
    })


def dataset_info(k: int, multi_label: bool) -> DatasetInfo:
    return DatasetInfo(url="ds", classes=[f"c{i}" for i in range(k)], multi_label=multi_label, splits={})


def cross_entropy_by_hand(logits: torch.Tensor, labels: list[int]) -> list[float]:
    out = []
    for row, label in zip(logits.tolist(), labels, strict=True):
        out.append(math.log(sum(math.exp(x) for x in row)) - row[label])
    return out


# Five images over two batches, six classes; integer logits so that bf16 images carry them exactly.
LOGITS = torch.tensor([
    [6.0, 5, 4, 3, 2, 1],  # label 0 ranked 1st: top-1 and top-5
    [6.0, 5, 4, 3, 2, 1],  # label 2 ranked 3rd: top-5 only
    [6.0, 5, 4, 3, 2, 1],  # label 5 ranked 6th: neither
    [1.0, 2, 3, 4, 5, 6],  # label 5 ranked 1st: top-1 and top-5
    [1.0, 2, 3, 4, 5, 6],  # label 0 ranked 6th: neither
])
LABELS = [0, 2, 5, 5, 0]


def single_label_batches() -> list[data.Batch]:
    targets = one_hot(LABELS, 6)
    return [as_batch(LOGITS[:3], targets[:3], 0), as_batch(LOGITS[3:], targets[3:], 3)]


def test_evaluate_reports_top1_top5_loss_and_samples_over_all_batches(monkeypatch):
    calls = fake_eval_batches(monkeypatch, single_label_batches())
    monkeypatch.setattr(ev.dist, "all_reduce", lambda *a, **k: pytest.fail("all-reduce without a process group"))
    spec, info, net = eval_spec(), dataset_info(6, multi_label=False), LogitsFromImages()
    out = evaluate(net, spec, info, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    assert calls == [(info, "val", 32, 3, 0, 1)]
    assert out["samples"] == 5
    assert out["top1"] == pytest.approx(2 / 5)
    assert out["top5"] == pytest.approx(3 / 5)
    # the loss is the mean over images, not over batches (the batches here have 3 and 2 images)
    assert out["loss"] == pytest.approx(sum(cross_entropy_by_hand(LOGITS, LABELS)) / 5, rel=1e-6)
    assert "prec1" not in out
    # the model ran in eval mode without gradients, and is back in train mode afterwards
    assert [(training, grad) for training, grad, _ in net.seen] == [(False, False), (False, False)]
    assert net.training


def test_evaluate_feeds_images_in_the_dtype_asked(monkeypatch):
    fake_eval_batches(monkeypatch, single_label_batches())
    net = LogitsFromImages()
    out = evaluate(net, eval_spec(), dataset_info(6, False), 0, 1, torch.device("cpu"), torch.bfloat16)
    assert {dtype for _, _, dtype in net.seen} == {torch.bfloat16}
    assert (out["top1"], out["top5"]) == (pytest.approx(2 / 5), pytest.approx(3 / 5))
    assert out["loss"] == pytest.approx(sum(cross_entropy_by_hand(LOGITS, LABELS)) / 5, rel=1e-6)


def test_multi_label_evaluation_reports_precision_at_1(monkeypatch):
    rows = [[0, 3], [2], [4, 5], [1, 5]]
    logits = torch.tensor([
        [1.0, 0, 0, 5, 0, 0],  # top-1 is 3, a label: hit
        [4.0, 0, 3, 0, 0, 0],  # top-1 is 0; label 2 is 2nd: top-5 only
        [0.0, 0, 0, 0, 3, 0],  # top-1 is 4, a label: hit
        [0.0, 0, 9, 8, 7, 6],  # top-1 is 2; label 5 is 4th: top-5 only
    ])
    targets = multi_hot(rows, 6)
    fake_eval_batches(monkeypatch, [as_batch(logits, targets, 0)])
    out = evaluate(LogitsFromImages(), eval_spec("sigmoid"), dataset_info(6, multi_label=True), 0, 1,
                   torch.device("cpu"), torch.float32)
    assert out["prec1"] == out["top1"] == pytest.approx(2 / 4)
    assert out["top5"] == pytest.approx(4 / 4)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    assert out["loss"] == pytest.approx(bce.item(), rel=1e-6)


def test_evaluate_sums_across_ranks_when_a_process_group_is_up(monkeypatch):
    """With a group, the counts are all-reduced before the rates: a second rank that saw the same images doubles the
    samples and leaves the rates unchanged."""
    fake_eval_batches(monkeypatch, single_label_batches())
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.clone())
        tensor.mul_(2)

    monkeypatch.setattr(ev.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ev.dist, "all_reduce", all_reduce)
    out = evaluate(LogitsFromImages(), eval_spec(), dataset_info(6, False), 0, 2, torch.device("cpu"), torch.float32)
    assert len(reduced) == 1
    assert out["samples"] == 10
    assert (out["top1"], out["top5"]) == (pytest.approx(2 / 5), pytest.approx(3 / 5))
    assert out["loss"] == pytest.approx(sum(cross_entropy_by_hand(LOGITS, LABELS)) / 5, rel=1e-6)


def test_an_empty_eval_split_reports_zero_samples(monkeypatch):
    fake_eval_batches(monkeypatch, [])
    out = evaluate(LogitsFromImages(), eval_spec(), dataset_info(6, False), 0, 1, torch.device("cpu"), torch.float32)
    assert out == {"top1": 0.0, "top5": 0.0, "loss": 0.0, "samples": 0}
