"""The job specs in jobs/: each loads and validates, and the pre-training ones match the paper's recipe.

The expected numbers are typed from the paper (Appendix B, Table 4), not read from the specs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config

JOBS = Path(__file__).resolve().parent.parent / "jobs"

# Table 4: model, data -> epochs, lr, paper weight decay, RandAugment magnitude, mixup, stochastic depth.
PRETRAIN = {
    "mixer_b16_i21k.yaml": ("B/16", "i21k", 300, 1e-3, 0.1, 10, 0.2, 0.1),
    "mixer_l16_i21k.yaml": ("L/16", "i21k", 300, 1e-3, 0.1, 20, 0.5, 0.1),
    "mixer_s16_jft.yaml": ("S/16", "jft", 5, 3e-3, 0.03, None, None, None),
    "mixer_b16_jft.yaml": ("B/16", "jft", 7, 3e-3, 0.03, None, None, None),
    "mixer_l16_jft.yaml": ("L/16", "jft", 7, 1e-3, 0.03, None, None, None),
    "mixer_h14_jft.yaml": ("H/14", "jft", 14, 1e-3, 0.03, None, None, None),
}
FINETUNE = {
    "finetune_b16_imagenet_224.yaml": ("B/16", 224),
    "finetune_l16_imagenet_448.yaml": ("L/16", 448),
}


def test_every_spec_in_jobs_is_covered():
    names = {p.name for p in JOBS.glob("*.yaml")}
    assert names == set(PRETRAIN) | set(FINETUNE) | {"quickstart.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_spec_loads_validates_and_documents_itself(name):
    text = (JOBS / name).read_text()
    spec = config.load(JOBS / name)  # validates: batch divisibility, streams, variant, patch size...
    assert spec.hash()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "mixer submit" in header or "mixer train" in header, "the header gives the command that runs it"
    assert "Expected" in header or "Quickstart" in header
    round_trip = config.from_dict(yaml.safe_load(spec.to_yaml()))
    assert round_trip.hash() == spec.hash()


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretraining_specs_follow_table_4(name):
    variant, data, epochs, lr, wd, randaug_m, mixup, stoch_depth = PRETRAIN[name]
    spec = config.load(JOBS / name)
    assert spec.model.variant == variant and spec.model.image_size == 224
    # all rows: Adam (0.9, 0.999), 10k warmup then linear decay, batch 4096, clipping 1
    assert spec.optim.name == "adam" and spec.optim.betas == (0.9, 0.999)
    assert spec.schedule.warmup_steps == 10_000 and spec.schedule.decay == "linear"
    assert spec.batch.global_ == 4096 and spec.optim.clip_grad_norm == 1.0
    assert spec.schedule.epochs == epochs and spec.schedule.total_steps is None
    assert spec.optim.lr == pytest.approx(lr)
    # The spec holds the paper's weight decay; the trainer's AdamW multiplies it by the lr (decoupled), so the
    # per-step decay at the peak lr is lr x wd: 1e-4 for i21k, big_vision's decoupled number.
    assert spec.optim.weight_decay == pytest.approx(wd)
    if data == "i21k":
        assert spec.optim.lr * spec.optim.weight_decay == pytest.approx(1e-4)
        assert (spec.data.randaug.layers, spec.data.randaug.magnitude) == (2, randaug_m)
        assert spec.data.mixup == pytest.approx(mixup)
        assert spec.model.stoch_depth == pytest.approx(stoch_depth)
        assert spec.loss == "softmax"
    else:  # JFT: inception crop + flip only, sigmoid loss with the head bias at -6.9
        assert spec.data.crop_scale == (0.08, 1.0) and spec.data.flip
        assert spec.data.randaug.layers == 0 and spec.data.mixup == 0.0 and spec.model.stoch_depth == 0.0
        assert spec.loss == "sigmoid" and spec.model.head_bias == pytest.approx(-6.9)
    assert spec.deepspeed.bf16 and spec.cluster.gpus_per_worker == 1
    assert spec.data.dataset.startswith("s3://YOUR-BUCKET/") and spec.run.url.startswith("s3://YOUR-BUCKET/")


def test_trainer_applies_weight_decay_decoupled_and_scaled_by_lr():
    """What the specs' comments promise: optim.weight_decay goes to DeepSpeed's AdamW (decoupled, multiplied by the
    current lr) on kernels only."""
    import torch

    from pipeline.optim import deepspeed_config, param_groups, step_shape

    spec = config.load(JOBS / "mixer_b16_i21k.yaml")
    ds = deepspeed_config(spec, step_shape(spec, 32, 100), on_gpu=True)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.1
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(net, spec.optim.weight_decay)
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    # torch's AdamW, like DeepSpeed's in adam_w_mode, shrinks a weight by lr x wd per step before the Adam update
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([w], lr=spec.optim.lr, weight_decay=spec.optim.weight_decay)
    w.grad = torch.zeros(1)
    opt.step()
    assert w.item() == pytest.approx(1 - 1e-4)


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetuning_specs_follow_the_paper(name):
    variant, size = FINETUNE[name]
    spec = config.load(JOBS / name)
    assert spec.model.variant == variant and spec.model.image_size == size and spec.model.init
    assert spec.optim.name == "sgd" and spec.optim.momentum == 0.9 and spec.optim.weight_decay == 0.0
    assert spec.optim.lr == pytest.approx(0.03) and spec.optim.clip_grad_norm == 1.0
    assert spec.schedule.decay == "cosine" and spec.schedule.warmup_steps == 500
    assert spec.batch.global_ == 512
    assert spec.data.randaug.layers == 0 and spec.data.mixup == 0.0


def test_quickstart_is_a_tiny_cpu_run():
    spec = config.load(JOBS / "quickstart.yaml")
    assert (spec.model.variant, spec.model.image_size) == ("tiny", 32)
    assert spec.cluster.workers == 2 and spec.cluster.gpus_per_worker == 0 and not spec.deepspeed.bf16
    assert spec.deepspeed.zero_stage == 2 and spec.batch.global_ == 32 and spec.batch.micro == 8
    assert spec.data.streams == 8 and spec.data.loader_workers == 0
    assert spec.schedule.total_steps == 40 and spec.schedule.warmup_steps == 5
    assert spec.eval.every_steps == 20 and spec.checkpoint.every_steps == 20
    assert (spec.run.url, spec.data.dataset) == ("out/quickstart/run", "out/quickstart/dataset")
