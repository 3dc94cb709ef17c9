import pytest

from medrag_ray.train.tasks import check_init_encoder, dataset_file, resolve_domains


def test_resolve_domains(tiny_training_dir) -> None:
    dataset_dir, encoder_dir = tiny_training_dir
    corpus = dataset_file(dataset_dir, "corpus.parquet")
    assert resolve_domains(corpus, []) == ["pathology", "radiology"]
    assert resolve_domains(corpus, ["radiology"]) == ["radiology"]
    with pytest.raises(ValueError, match=r"domains \['dermatology'\] have no rows"):
        resolve_domains(corpus, ["dermatology"])
    with pytest.raises(ValueError, match="needs at least 2"):
        resolve_domains(corpus, ["radiology"], min_domains=2)
    assert check_init_encoder(str(encoder_dir)) == str(encoder_dir.resolve())
    with pytest.raises(FileNotFoundError, match="jobs/prepare_models.py"):
        check_init_encoder(str(dataset_dir / "nope"))
    with pytest.raises(FileNotFoundError, match="jobs/make_data.py"):
        dataset_file(dataset_dir, "samples_nope.parquet")
