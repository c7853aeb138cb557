"""The shared datasets other tests train on: shapes they rely on, and soundness by `mixer verify`."""

from __future__ import annotations

import json

import webdataset as wds

from data_prep.verify import verify
from pipeline import dataset_json


def test_sample_dataset_has_sixteen_train_shards_of_twenty(sample_dataset):
    info = dataset_json.load(sample_dataset)
    assert not info.multi_label and info.num_classes == 8
    assert [s.samples for s in info.split("train").shards] == [20] * 16
    assert info.split("val").samples == 40 and info.rejected == 0
    assert info.image_policy["max_size"] == 40
    assert verify(sample_dataset)[0] == []


def test_sample_multilabel_dataset_carries_label_lists(sample_multilabel_dataset):
    info = dataset_json.load(sample_multilabel_dataset)
    assert info.multi_label and info.num_classes == 8
    assert info.split("val").samples == 24 and info.split("train").samples == 216
    assert verify(sample_multilabel_dataset)[0] == []
    urls = [info.shard_url(s) for s in info.split("train").shards]
    labels = [json.loads(s["json"])["labels"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(labels) == 216 and any(len(x) >= 2 for x in labels)
