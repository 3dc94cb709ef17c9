from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medrag_ray.data.schema import (
    CORPUS_SCHEMA,
    SAMPLE_SCHEMA,
    CorpusDoc,
    PreferencePair,
    ReadStats,
    RecordError,
    Sample,
    dumps_meta,
    from_rows,
    read_parquet,
    write_parquet,
)


def _sample(**kw: object) -> Sample:
    base: dict[str, object] = dict(
        id="s1", domain="radiology", split="train", source="unit", question="Is there an effusion?",
        answer="yes", answer_type="closed", image_bytes=b"\x89PNG", image_available=True,
        meta=dumps_meta({"case": 3}),
    )
    base.update(kw)
    return Sample(**base)  # type: ignore[arg-type]


def test_parquet_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = [_sample(), _sample(id="s2", answer="no", image_bytes=None, image_available=False)]
    path = tmp_path / "s.parquet"
    assert write_parquet(records, Sample, path) == 2
    assert pq.read_schema(path).equals(SAMPLE_SCHEMA, check_metadata=False)
    assert read_parquet(path, Sample) == records
    docs = [CorpusDoc(id="d1", domain="pathology", split="train", source="unit", text="Necrosis.")]
    write_parquet(docs, CorpusDoc, tmp_path / "c.parquet")
    assert pq.read_schema(tmp_path / "c.parquet").equals(CORPUS_SCHEMA, check_metadata=False)
    assert read_parquet(tmp_path / "c.parquet", CorpusDoc) == docs


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"id": " "}, "id"),
        ({"domain": "cardiology"}, "domain"),
        ({"split": "dev"}, "split"),
        ({"answer_type": "multiple"}, "answer_type"),
        ({"answer": ""}, "answer"),
        ({"question": ""}, "question"),
        ({"meta": "[1]"}, "meta"),
        ({"meta": "{oops"}, "meta"),
    ],
)
def test_invalid_sample_names_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(RecordError) as info:
        _sample(**kw)
    assert info.value.field_name == field
    assert f"field '{field}'" in str(info.value)


def test_pair_flags_and_text_required() -> None:
    ok = PreferencePair(id="p", domain="ophthalmology", source="u", pair_type="cm", prompt="q", chosen="yes",
                        rejected="no", rejected_noised=1)
    assert ok.rejected_noised == 1
    with pytest.raises(RecordError, match="rejected_noised"):
        PreferencePair(id="p", domain="ophthalmology", source="u", pair_type="cm", prompt="q", chosen="y",
                       rejected="n", rejected_noised=2)
    with pytest.raises(RecordError, match="'text'"):
        CorpusDoc(id="d", domain="pathology", split="train", source="u", text="")


def test_from_rows_rejects_unknown_fields() -> None:
    with pytest.raises(RecordError, match="colour"):
        list(from_rows([{"id": "d", "domain": "pathology", "split": "train", "source": "u", "text": "t",
                         "colour": 1}], CorpusDoc))


def test_read_stats_counts_by_field() -> None:
    stats = ReadStats()
    stats.reject("image")
    stats.reject("image")
    stats.reject("question")
    assert (stats.rejected, stats.rejects_by_field) == (3, {"image": 2, "question": 1})
