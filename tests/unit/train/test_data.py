import hashlib

import pytest
import torch

from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.train.data import (
    ImageTextDataset,
    LabeledImage,
    LabeledImageDataset,
    corpus_pairs,
    domain_examples,
    report_pairs,
)


def test_domain_examples_one_per_distinct_image(tiny_training_dir) -> None:
    dataset_dir, _ = tiny_training_dir
    rows = read_parquet(dataset_dir / "samples_train.parquet", Sample)
    distinct = {hashlib.sha1(r.image_bytes).hexdigest() for r in rows}
    examples = domain_examples(dataset_dir / "samples_train.parquet")
    assert len(rows) > len(examples) == len(distinct)
    only = domain_examples(dataset_dir / "samples_train.parquet", ["pathology"])
    assert only and {e.label for e in only} == {"pathology"}


def test_pairs_filter_by_domain_and_dedupe(tiny_training_dir) -> None:
    dataset_dir, _ = tiny_training_dir
    pairs = corpus_pairs(dataset_dir / "corpus.parquet", ["radiology"])
    assert pairs and all(p.domain == "radiology" and p.text for p in pairs)
    val = report_pairs(dataset_dir / "samples_val.parquet")
    assert len({hashlib.sha1(p.image_bytes).hexdigest() for p in val}) == len(val)


def test_datasets_yield_tensors_and_labels(tiny_training_dir) -> None:
    dataset_dir, _ = tiny_training_dir
    examples = domain_examples(dataset_dir / "samples_train.parquet")
    ds = LabeledImageDataset(examples, ["pathology", "radiology"], lambda im: torch.zeros(3, 4, 4))
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [["pathology", "radiology"].index(e.label) for e in examples]
    pairs = corpus_pairs(dataset_dir / "corpus.parquet")
    tok = ImageTextDataset(pairs, lambda im: torch.ones(3, 2, 2), lambda texts: torch.arange(len(texts))[:, None])
    assert int(tok[3][1]) == 3
    with pytest.raises(ValueError, match=r"labels \['radiology'\] outside"):
        LabeledImageDataset(examples, ["pathology"], lambda im: im)


def test_undecodable_image_error_names_the_row() -> None:
    ds = LabeledImageDataset([LabeledImage("x7", b"not a png", "a")], ["a"], lambda im: im)
    with pytest.raises(ValueError, match="example x7"):
        ds[0]
    with pytest.raises(ValueError, match="no examples"):
        LabeledImageDataset([], ["a"], lambda im: im)
    assert LabeledImage("a", b"", "b").label == "b"
