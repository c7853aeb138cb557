"""The job spec: the issue's example shape loads; bad specs fail before any worker starts, saying what to change."""

from __future__ import annotations

import textwrap

import pytest

from pipeline import config, run
from pipeline.config import SpecError

EXAMPLE = textwrap.dedent("""
    model: {variant: B/16, image_size: 224, stoch_depth: 0.1, dropout: 0.0, head_bias: 0.0}
    data: {dataset: s3://bucket/i21k-wds, train_split: train, eval_split: val,
           crop_scale: [0.08, 1.0], flip: true, randaug: {layers: 2, magnitude: 10}, mixup: 0.2}
    loss: softmax            # or sigmoid
    optim: {name: adam, lr: 1.0e-3, betas: [0.9, 0.999], weight_decay: 0.1, clip_grad_norm: 1.0}
    schedule: {warmup_steps: 10000, decay: linear, end_lr: 1.0e-5, epochs: 300}   # or total_steps
    batch: {global: 4096, micro: 64}
    deepspeed: {zero_stage: 2, bf16: true, offload_optimizer: false}
    cluster: {workers: 64, gpus_per_worker: 1, cpus_per_worker: 8}
    eval: {every_steps: 5000}
    checkpoint: {every_steps: 1000, keep_last: 3}
    run: {url: s3://bucket/runs/mixer-b16-i21k}
    seed: 0
""")


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE)
    return path


def test_the_documented_spec_shape_loads(example):
    spec = config.load(example)
    assert spec.model.variant == "B/16" and spec.batch.global_ == 4096 and spec.data.randaug.magnitude == 10
    assert spec.optim.betas == (0.9, 0.999) and spec.schedule.epochs == 300.0
    # the resolved spec round-trips through YAML with the same identity
    again = config.from_dict(__import__("yaml").safe_load(spec.to_yaml()))
    assert again == spec and again.hash() == spec.hash()


def test_overrides_apply_and_keep_types(example):
    spec = config.load(example, ["optim.lr=3e-3", "batch.micro=32", "data.crop_scale=[0.5, 1.0]"])
    assert spec.optim.lr == 3e-3 and spec.batch.micro == 32 and spec.data.crop_scale == (0.5, 1.0)


def test_hash_ignores_cluster_size_but_not_the_recipe(example):
    base = config.load(example)
    assert config.load(example, ["cluster.workers=32"]).hash() == base.hash()
    # where the views are made is how, not what: a run may resume on the other path
    assert config.load(example, ["data.decode=gpu"]).hash() == base.hash()
    assert config.load(example, ["optim.lr=2e-3"]).hash() != base.hash()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; allowed here: name, lr, betas"),
        ("batch.global=many", "batch.global: got 'many' (str); expected int"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: got 4 (int); expected one of 0, 1, 2, 3"),
        ("batch.global=4000", "not divisible by batch.micro x cluster.workers = 64 x 64"),
        ("model.variant=Q/7", "model.variant: unknown variant 'Q/7'"),
        ("data.streams=64", "data.streams=64 is not divisible by cluster.workers x max(data.loader_workers, 1)"),
        ("schedule.total_steps=10", "give exactly one of schedule.epochs or schedule.total_steps"),
        ("cluster.min_workers=65 cluster.elastic=true", "cluster.min_workers: 65 must be between 1 and"),
        ("cluster.elastic=true cluster.max_failures=0", "set cluster.max_failures >= 1"),
        ("cluster.elastic=true cluster.min_workers=32",
         "every size from cluster.min_workers=32 to cluster.workers=64 must fit the batch and the streams, and 33 "
         "does not: batch.global=4096 is not divisible by batch.micro x cluster.workers = 64 x 33"),
        ("cluster.elastic=true", "The sizes that fit are 1, 2, 4, 8, 16, 32, 64: raise cluster.min_workers"),
    ],
)
def test_bad_specs_name_the_key_and_what_to_change(example, override, message):
    with pytest.raises(SpecError) as err:
        config.load(example, override.split())
    assert message in str(err.value)
    assert str(example) in str(err.value)


def test_an_elastic_range_whose_every_size_fits_is_taken(example):
    spec = config.load(example, ["cluster.elastic=true", "cluster.min_workers=64", "cluster.workers=64"])
    assert list(config.world_sizes(spec.cluster)) == [64]
    spec = config.load(example, ["cluster.elastic=true", "cluster.min_workers=1", "cluster.workers=2"])
    assert list(config.world_sizes(spec.cluster)) == [1, 2]
    # turning elasticity on for a run under way keeps its identity: it resumes
    elastic = config.load(example, ["cluster.elastic=true", "cluster.min_workers=64"])
    assert elastic.hash() == config.load(example).hash()


def test_a_dataset_without_dataset_json_fails_before_workers_start(example, tmp_path):
    spec = config.load(example, [f"data.dataset={tmp_path / 'nothing-here'}", f"run.url={tmp_path / 'run'}"])
    with pytest.raises(SpecError) as err:
        run.preflight(spec)
    assert "dataset.json does not exist" in str(err.value) and "mixer prepare" in str(err.value)
