"""`mixer plan`: per-GPU memory for ZeRO 1/2/3 follows the exact parameter count; steps, checkpoint size, time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import config, dataset_json, plan
from pipeline.cli import main
from pipeline.dataset_json import DatasetInfo, Shard, Split
from pipeline.model import VARIANTS, build

JOBS = Path(__file__).resolve().parent.parent / "jobs"
H14 = str(JOBS / "mixer_h14_jft.yaml")
JFT_CLASSES = 18_291
# REFERENCE.md section 1: H/14 without head; the head adds C x K + K.
H14_PARAMS = 431_069_952 + 1280 * JFT_CLASSES + JFT_CLASSES
GIB = 2**30


def test_h14_on_64_gpus_memory_terms_are_exact(capsys):
    spec = config.load(H14)
    p = plan.plan_resources(spec, 64, train_samples=300_000_000, num_classes=JFT_CLASSES, gpu_memory_gib=80)
    assert p.num_params == H14_PARAMS
    zero1, zero2, zero3 = p.stages
    # bf16 parameter 2 + bf16 gradient 2 bytes; fp32 master 4 + Adam m, v 8 bytes
    assert zero1.params == H14_PARAMS * 2 and zero1.grads == H14_PARAMS * 2
    assert zero1.optimizer == H14_PARAMS * 12 / 64
    assert zero2.params == H14_PARAMS * 2 and zero2.grads == H14_PARAMS * 2 / 64
    assert zero2.optimizer == H14_PARAMS * 12 / 64
    assert zero3.params == H14_PARAMS * 2 / 64 and zero3.grads == H14_PARAMS * 2 / 64
    assert zero3.optimizer == H14_PARAMS * 12 / 64
    # activations: the same for every stage, far less with checkpointing, and linear in the micro batch
    assert zero1.activations == zero3.activations > 5 * zero1.activations_checkpointed
    half = plan.plan_resources(config.load(H14, ["batch.micro=32"]), 64, train_samples=10**6, num_classes=JFT_CLASSES)
    assert half.stages[0].activations == pytest.approx(zero1.activations / 2, rel=1e-9)
    # steps: 14 epochs of whole global batches
    assert p.steps == 14 * (300_000_000 // 4096)
    assert p.checkpoint_bytes == H14_PARAMS * 14 and p.export_bytes == H14_PARAMS * 4

    assert main(["plan", H14, "--gpus", "64", "--gpu-memory", "80", "--train-samples", "300000000",
                 "--num-classes", str(JFT_CLASSES), "--images-per-sec", "100"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {H14_PARAMS:,}; 16 bytes each" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1] in "123" and "fits" in line]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for row, stage in zip(rows, p.stages, strict=True):
        assert row[1:4] == [f"{stage.params / GIB:.2f}", f"{stage.grads / GIB:.2f}", f"{stage.optimizer / GIB:.2f}"]
    assert f"steps: {14 * (300_000_000 // 4096):,}" in out
    hours = 14 * (300_000_000 // 4096) * 4096 / (100 * 64) / 3600
    assert "time: " in out and f"{int(hours) // 24}d" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_count_matches_what_autograd_saves(dtype):
    # The module and its input in `dtype`, no autocast: how the trainer runs fp32 and bf16.
    torch.manual_seed(0)
    net = build("S/16", num_classes=10, image_size=224).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = net((torch.rand(2, 3, 224, 224) * 2 - 1).to(dtype))
        F.cross_entropy(logits.float(), torch.tensor([1, 2]))
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    element = torch.finfo(dtype).bits // 8
    estimate = plan.activation_bytes(VARIANTS["S/16"], 224, 10, 2, element, checkpointing=False)
    assert measured <= estimate <= 1.02 * measured, (estimate, measured)


def test_what_does_not_fit_is_flagged(capsys):
    # ZeRO-1 keeps full bf16 params and grads: 4 bytes x 454M params = 1.7 GiB, over a 1.5 GiB card; ZeRO-3 fits
    # once activations are small (micro batch 1 with checkpointing).
    assert main(["plan", H14, "--gpus", "64", "--gpu-memory", "1.5", "--train-samples", "1000000", "--num-classes",
                 str(JFT_CLASSES), "--set", "batch.micro=1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()[:1] in "123" and "/" in line}
    assert rows["1"].endswith("DOES NOT FIT / DOES NOT FIT")
    assert rows["3"].endswith("/ fits")


def test_fp32_sgd_and_offload_bytes():
    spec = config.load(JOBS / "quickstart.yaml", ["optim.name=sgd"])
    p = plan.plan_resources(spec, 2, num_classes=10)
    n = p.num_params
    assert (p.bytes_per_param.param, p.bytes_per_param.grad, p.bytes_per_param.master, p.bytes_per_param.optim) == \
        (4, 4, 4, 4)
    assert p.stages[0].optimizer == n * (4 + 4) / 2  # ZeRO keeps an fp32 copy even of fp32 parameters
    no_zero = plan.plan_resources(config.load(JOBS / "quickstart.yaml", ["deepspeed.zero_stage=0"]), 2, num_classes=10)
    assert no_zero.this_spec.optimizer == n * 8 and no_zero.this_spec.params == n * 4  # Adam on the model's own
    offload = plan.plan_resources(config.load(H14, ["deepspeed.offload_optimizer=true"]), 8, train_samples=10**6,
                             num_classes=JFT_CLASSES)
    assert all(st.optimizer == 0 for st in offload.stages)


def test_steps_from_a_reachable_dataset_and_time_from_a_run(tmp_path, capsys):
    ds = str(tmp_path / "ds")
    shards = [Shard(f"train-{i:06d}.tar", 250, 1000, "0" * 64) for i in range(40)]
    dataset_json.save(DatasetInfo(url=ds, classes=[f"c{i}" for i in range(7)], multi_label=False,
                                  splits={"train": Split(shards)}))
    spec = config.load(JOBS / "mixer_b16_i21k.yaml", [f"data.dataset={ds}"])
    p = plan.plan_resources(spec, 32)
    assert p.num_classes == 7 and p.train_samples == 10_000 and p.steps == 300 * (10_000 // 4096)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config.load(JOBS / "quickstart.yaml").to_yaml())  # 2 workers
    records = [{"kind": "train", "step": s, "images_per_s": v} for s, v in ((5, 90.0), (10, 100.0), (15, 400.0))]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert plan.measured_images_per_s_per_gpu(str(run)) == 50.0  # median 100 over 2 workers
    assert main(["plan", str(JOBS / "mixer_b16_i21k.yaml"), "--gpus", "32", "--set", f"data.dataset={ds}",
                 "--from-run", str(run)]) == 0
    assert "50.0 images/s per GPU x 32 = 1,600 images/s" in capsys.readouterr().out


def test_unreachable_dataset_says_which_option_to_pass(tmp_path, capsys):
    assert main(["plan", H14, "--gpus", "8", "--set", f"data.dataset={tmp_path}/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "dataset.json cannot be read" in err and "--num-classes" in err
    # memory needs no dataset: the plan is made, and says what the steps need
    assert main(["plan", H14, "--gpus", "8", "--num-classes", "10", "--set", f"data.dataset={tmp_path}/x"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "steps: unknown: " in out and "pass --train-samples N" in out


def test_a_model_whose_whole_states_fit_is_told_that_zero_only_saves_memory(capsys):
    """Mixer-H/14's whole model states (16 bytes x 454M parameters) are 6.8 GiB: on an 80 GiB card the plan says
    partitioning buys nothing it needs; on a 16 GiB one (with the activations) it does not."""
    p = plan.plan_resources(config.load(H14), 64, train_samples=10**6, num_classes=JFT_CLASSES)
    assert p.unpartitioned.model_states == p.num_params * 16
    assert p.unpartitioned.params == p.num_params * 2 and p.unpartitioned.optimizer == p.num_params * 12
    for memory, told in (("80", True), ("16", False)):
        assert main(["plan", H14, "--gpus", "64", "--gpu-memory", memory, "--train-samples", "1000000",
                     "--num-classes", str(JFT_CLASSES)]) == 0
        out = capsys.readouterr().out
        assert "without partitioning (ZeRO-0) the model states take 6.77 GiB per GPU" in out
        assert ("that fits, so ZeRO saves memory this run does not need" in out) is told
