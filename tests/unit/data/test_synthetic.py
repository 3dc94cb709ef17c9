"""The embedded synthetic dataset: determinism, splits, report/answer consistency, atomic writing, and the
property the whole pipeline relies on -- visible findings are in the pixels, subtle findings are not
(locally) but retrieval of same-phenotype cases recovers them from their reports."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medrag_ray.config import ConfigError, SyntheticDataConfig
from medrag_ray.data import synthetic as syn
from medrag_ray.data.schema import SPLITS, CorpusDoc, Sample, read_parquet

ALL_DOMAINS = ("radiology", "ophthalmology", "pathology", "dermatology")
SMALL = SyntheticDataConfig(domains=ALL_DOMAINS, n_per_domain=60, n_phenotypes=4, image_size=32, seed=7)
FILES = (*(syn.samples_name(s) for s in SPLITS), syn.CORPUS_NAME, syn.MANIFEST_NAME)


@pytest.fixture(scope="module")
def small() -> syn.SyntheticDataset:
    return syn.generate(SMALL)


def _meta(row: Sample | CorpusDoc) -> dict:
    return json.loads(row.meta)


def _all_samples(ds: syn.SyntheticDataset) -> list[Sample]:
    return [s for split in SPLITS for s in ds.samples[split]]


# ------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_terms_are_unambiguous_within_a_domain() -> None:
    for domain in ALL_DOMAINS:
        vocab = syn.vocabulary(domain)
        terms = [v["term"].lower() for v in vocab.values()]
        assert len(set(terms)) == len(terms)
        for a in terms:
            assert not any(a != b and a in b for b in terms), f"{domain}: term {a!r} is inside another term"
        kinds = Counter(v["kind"] for v in vocab.values())
        assert kinds["visible"] >= 3 and kinds["subtle"] >= 2, kinds


def test_finding_rejects_inconsistent_templates() -> None:
    ok = dict(key="k", term="effusion", kind="visible", questions=("Is there an effusion?",))
    syn.Finding(positive=("An effusion.",), negative=("No effusion.",), **ok)
    with pytest.raises(ValueError, match="negation cue"):
        syn.Finding(positive=("No effusion.",), negative=("No effusion.",), **ok)
    with pytest.raises(ValueError, match="lacks a negation cue"):
        syn.Finding(positive=("An effusion.",), negative=("An effusion.",), **ok)
    with pytest.raises(ValueError, match="once"):
        syn.Finding(positive=("An effusion, a large effusion.",), negative=("No effusion.",), **ok)
    with pytest.raises(ValueError, match="kind"):
        syn.Finding(positive=("An effusion.",), negative=("No effusion.",), **{**ok, "kind": "hidden"})


def test_parse_findings_on_handwritten_reports() -> None:
    text = "PA view. There is cardiomegaly. No pleural effusion. A small pulmonary nodule is noted."
    parsed = syn.parse_findings(text, "radiology")
    assert parsed["cardiomegaly"] is True
    assert parsed["pleural_effusion"] is False
    assert parsed["nodule"] is True
    assert parsed["opacity_left"] is None and parsed["interstitial"] is None
    contradictory = "Small left pleural effusion. No pleural effusion."
    assert syn.parse_findings(contradictory, "radiology")["pleural_effusion"] is None
    with pytest.raises(ValueError, match="no synthetic generator"):
        syn.parse_findings(text, "cardiology")


# ----------------------------------------------------------------------------------- structure


def test_counts_follow_the_config(small: syn.SyntheticDataset) -> None:
    counts = small.counts()
    for domain in ALL_DOMAINS:
        n_findings = len(syn.vocabulary(domain))
        cases = counts["cases"][domain]
        assert sum(cases.values()) == SMALL.n_per_domain
        for split in SPLITS:
            got = counts["samples"][domain][split]
            assert got["report"] == cases[split]
            assert got.get("closed_yes", 0) + got.get("closed_no", 0) == cases[split] * n_findings
        assert counts["corpus"][domain] == cases["train"]
        # split sizes follow split_fractions (stratified rounding per phenotype, >= 1 per phenotype)
        fractions = np.array([cases[s] for s in SPLITS]) / SMALL.n_per_domain
        assert np.allclose(fractions, SMALL.split_fractions, atol=0.06), fractions
    assert counts["samples_per_split"] == {s: len(small.samples[s]) for s in SPLITS}


def test_splits_are_disjoint_by_case_and_corpus_is_train_only(small: syn.SyntheticDataset) -> None:
    case_split = {c.case_id: c.split for c in small.cases}
    assert len(case_split) == len(small.cases)
    for split in SPLITS:
        for s in small.samples[split]:
            assert s.split == split and case_split[_meta(s)["case_id"]] == split
    train_cases = {c.case_id for c in small.cases if c.split == "train"}
    corpus_ids = [d.id for d in small.corpus]
    assert len(corpus_ids) == len(set(corpus_ids))
    assert set(corpus_ids) == train_cases
    assert all(d.split == "train" for d in small.corpus)
    for domain in ALL_DOMAINS:
        for split in SPLITS:
            phenos = {c.phenotype for c in small.cases if c.domain == domain and c.split == split}
            assert phenos == set(range(SMALL.n_phenotypes)), (domain, split, phenos)


def test_images_are_inline_pngs_of_the_configured_size(small: syn.SyntheticDataset) -> None:
    by_case = {d.id: d.image_bytes for d in small.corpus}
    for s in _all_samples(small):
        assert s.image_available and s.image_bytes and not s.image_path
        img = syn.decode_png(s.image_bytes)
        channels = 1 if s.domain == "radiology" else 3
        assert img.shape == (SMALL.image_size, SMALL.image_size, channels)
        assert img.std() > 5, "an image should not be flat"
        case = _meta(s)["case_id"]
        if case in by_case:
            assert s.image_bytes == by_case[case]


def test_reports_state_exactly_the_findings(small: syn.SyntheticDataset) -> None:
    """Parse every report back with the vocabulary's terms and an independent negation rule."""
    negation = re.compile(r"\b(no|not|without|negative for|absent)\b", re.IGNORECASE)
    for case in small.cases:
        vocab = syn.vocabulary(case.domain)
        sentences = re.split(r"(?<=\.)\s+", case.report)
        for key, entry in vocab.items():
            mentions = [s for s in sentences if entry["term"].lower() in s.lower()]
            assert len(mentions) == 1, (case.case_id, key, case.report)
            stated = not negation.search(mentions[0])
            assert stated == case.findings[key], (case.case_id, key, mentions[0])
        assert syn.parse_findings(case.report, case.domain) == case.findings
    reports = Counter(c.report for c in small.cases)
    assert len(reports) > 0.8 * len(small.cases), "phrasing variants should make most reports distinct"


def test_reports_describe_the_phenotype_signature_in_words(small: syn.SyntheticDataset) -> None:
    """Each report's second sentence names its phenotype's signature (spacing, stripe direction) and no finding;
    the words follow the wave vector and differ between the phenotypes of a domain."""
    for domain, phenotypes in small.phenotypes.items():
        spec = syn.DOMAIN_SPECS[domain]
        assert len({p.pattern for p in phenotypes}) == len(phenotypes), (domain, [p.pattern for p in phenotypes])
        for p in phenotypes:
            mag, ang = np.hypot(p.kx, p.ky), np.degrees(np.arctan2(p.ky, p.kx)) % 180
            spacing, _, orientation = p.pattern.partition(", running ")
            lo, hi = 2.5, min(9.0, SMALL.image_size / 4)
            assert spacing == syn.SIGNATURE_SPACINGS[int((mag - lo) / (hi - lo) * 3)], (p.pattern, mag)
            expected = {0: "vertically", 1: "obliquely upward", 2: "horizontally", 3: "obliquely downward"}
            assert orientation == expected[int(round(ang / 45)) % 4], (p.pattern, ang)
            sentence = syn.signature_sentence(spec, p.pattern)
            assert all(v is None for v in syn.parse_findings(sentence, domain).values()), sentence
    for case in small.cases:
        pattern = small.phenotypes[case.domain][case.phenotype].pattern
        second = re.split(r"(?<=\.)\s+", case.report)[1]
        assert second == syn.signature_sentence(syn.DOMAIN_SPECS[case.domain], pattern), case.report


def test_questions_and_answers_follow_the_findings(small: syn.SyntheticDataset) -> None:
    per_case: dict[str, list[Sample]] = defaultdict(list)
    for s in _all_samples(small):
        per_case[_meta(s)["case_id"]].append(s)
    truth = {c.case_id: c for c in small.cases}
    for case_id, rows in per_case.items():
        case = truth[case_id]
        vocab = syn.vocabulary(case.domain)
        closed = [r for r in rows if r.answer_type == "closed"]
        reports = [r for r in rows if r.answer_type == "report"]
        assert len(reports) == 1 and reports[0].text == case.report and not reports[0].question
        assert sorted(_meta(r)["finding"] for r in closed) == sorted(vocab)
        for r in closed:
            meta = _meta(r)
            assert meta["findings"] == case.findings and meta["phenotype"] == case.phenotype
            assert r.answer == ("yes" if case.findings[meta["finding"]] else "no")
            assert r.question in vocab[meta["finding"]]["questions"]
            assert meta["finding_kind"] == vocab[meta["finding"]]["kind"]
            assert r.text == case.report
    answers = Counter(s.answer for s in _all_samples(small) if s.answer_type == "closed")
    assert set(answers) == {"yes", "no"}
    assert 0.4 <= answers["yes"] / sum(answers.values()) <= 0.6, answers
    for domain in ALL_DOMAINS:
        d = Counter(s.answer for s in _all_samples(small) if s.domain == domain and s.answer_type == "closed")
        assert 0.35 <= d["yes"] / sum(d.values()) <= 0.65, (domain, d)


def test_subtle_findings_follow_the_phenotype_up_to_consistency() -> None:
    cfg = dataclasses.replace(SMALL, n_per_domain=400, image_size=16, subtle_consistency=0.8)
    ds = syn.generate(cfg)
    for domain in ALL_DOMAINS:
        pattern = {p.index: p.subtle for p in ds.phenotypes[domain]}
        subtle = [k for k, v in syn.vocabulary(domain).items() if v["kind"] == "subtle"]
        agree = []
        for case in (c for c in ds.cases if c.domain == domain):
            for key in subtle:
                same = case.findings[key] == pattern[case.phenotype][key]
                assert same == (key not in case.deviates)
                agree.append(same)
        assert abs(np.mean(agree) - 0.8) < 0.05, (domain, np.mean(agree))
        # each subtle finding is present in about half of the phenotypes (balanced yes/no)
        for key in subtle:
            share = np.mean([pattern[p][key] for p in pattern])
            assert 0.25 <= share <= 0.75


def test_subtle_findings_are_in_the_pixels_and_only_there() -> None:
    """Same seed, subtle_contrast 0 vs 1: only images of cases with a subtle finding change."""
    cfg = dataclasses.replace(SMALL, n_per_domain=24, n_phenotypes=2)
    off = syn.generate(dataclasses.replace(cfg, subtle_contrast=0.0))
    on = syn.generate(cfg)
    assert [c.findings for c in off.cases] == [c.findings for c in on.cases]
    img_off = {d.id: d.image_bytes for d in off.corpus}
    n_changed = 0
    for doc in on.corpus:
        case = next(c for c in on.cases if c.case_id == doc.id)
        has_subtle = any(case.findings[k] for k, v in syn.vocabulary(case.domain).items() if v["kind"] == "subtle")
        changed = doc.image_bytes != img_off[doc.id]
        assert changed == has_subtle, (doc.id, case.findings)
        n_changed += changed
    assert n_changed > 0


def test_a_domain_does_not_depend_on_the_other_domains_generated() -> None:
    cfg = dataclasses.replace(SMALL, n_per_domain=20, n_phenotypes=2)
    alone = syn.generate(dataclasses.replace(cfg, domains=("pathology",)))
    mixed = syn.generate(dataclasses.replace(cfg, domains=("radiology", "pathology")))
    assert alone.samples["train"] == [s for s in mixed.samples["train"] if s.domain == "pathology"]


def test_config_validation_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="n_per_domain"):
        SyntheticDataConfig(n_per_domain=12, n_phenotypes=6)
    with pytest.raises(ConfigError, match="subtle_consistency"):
        SyntheticDataConfig(subtle_consistency=0.3)
    with pytest.raises(ConfigError, match="subtle_contrast"):
        SyntheticDataConfig(subtle_contrast=-1.0)


# ------------------------------------------------------------------------------------- writing


def test_write_is_deterministic_byte_for_byte(tmp_path: Path, small: syn.SyntheticDataset) -> None:
    a = syn.write_dataset(small, tmp_path / "a")
    b = syn.write_dataset(syn.generate(SMALL), tmp_path / "b")
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = syn.write_dataset(syn.generate(dataclasses.replace(SMALL, seed=8)), tmp_path / "c")
    assert syn.load_manifest(other)["content_hash"] != syn.load_manifest(a)["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temp dirs may be left"


def test_written_files_round_trip_and_manifest_describes_them(tmp_path: Path, small: syn.SyntheticDataset) -> None:
    out = syn.write_dataset(small, tmp_path / "ds")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for split in SPLITS:
        assert read_parquet(out / syn.samples_name(split), Sample) == small.samples[split]
    assert read_parquet(out / syn.CORPUS_NAME, CorpusDoc) == small.corpus
    man = syn.load_manifest(out)
    assert man["config"]["n_per_domain"] == SMALL.n_per_domain and man["config"]["seed"] == SMALL.seed
    assert man["counts"] == json.loads(json.dumps(small.counts()))
    assert man["files"][syn.CORPUS_NAME]["rows"] == len(small.corpus)
    assert man["vocabulary"]["radiology"]["pleural_effusion"]["kind"] == "visible"
    assert len(man["cases"]) == len(small.cases)
    first = man["cases"][0]
    assert first["findings"] == small.cases[0].findings and first["phenotype"] == small.cases[0].phenotype
    assert len(man["phenotypes"]["pathology"]) == SMALL.n_phenotypes
    assert re.fullmatch(r"[0-9a-f]{64}", man["content_hash"])


def test_existing_dataset_needs_overwrite(tmp_path: Path, small: syn.SyntheticDataset) -> None:
    out = syn.write_dataset(small, tmp_path / "ds")
    before = {n: (out / n).read_bytes() for n in FILES}
    other = syn.generate(dataclasses.replace(SMALL, seed=1))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        syn.write_dataset(other, out)
    assert {n: (out / n).read_bytes() for n in FILES} == before
    syn.write_dataset(other, out, overwrite=True)
    assert syn.load_manifest(out)["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_crash_while_writing_leaves_no_half_dataset(
    tmp_path: Path, small: syn.SyntheticDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = syn.write_dataset(small, tmp_path / "ds")
    before = {n: (out / n).read_bytes() for n in FILES}
    calls = {"n": 0}
    real = syn.write_parquet

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "write_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        syn.write_dataset(small, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        syn.write_dataset(small, out, overwrite=True)
    assert {n: (out / n).read_bytes() for n in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_load_manifest_names_the_job_when_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make_data.py"):
        syn.load_manifest(tmp_path)


# ------------------------------------------------------------- what the images and reports carry


def _roi_features(img: np.ndarray, roi: dict[str, float]) -> np.ndarray:
    """Local contrast at a finding's region: (mean, 95th, 5th percentile inside the disk) minus the mean of
    the surrounding annulus, per channel. Differences cancel the phenotype's global tint."""
    size = img.shape[0]
    c = (np.arange(size) + 0.5) / size
    d = np.hypot(c[None, :] - roi["x"], c[:, None] - roi["y"])
    inside, ring = d <= roi["r"], (d > roi["r"]) & (d <= 2 * roi["r"])
    a = img.astype(np.float64) / 255.0
    ring_mean = a[ring].mean(axis=0)
    stats = (a[inside].mean(axis=0), np.percentile(a[inside], 95, axis=0), np.percentile(a[inside], 5, axis=0))
    return np.concatenate([s - ring_mean for s in stats])


def _images(ds: syn.SyntheticDataset, domain: str) -> dict[str, np.ndarray]:
    return {
        _meta(s)["case_id"]: syn.decode_png(s.image_bytes)
        for split in SPLITS
        for s in ds.samples[split]
        if s.domain == domain and s.answer_type == "report"
    }


def _pixel_stat_accuracy(ds: syn.SyntheticDataset, domain: str) -> dict[str, float]:
    """Per finding: a logistic regression on the local contrast at the finding's (known) region, fitted on
    train cases and scored on test cases."""
    images = _images(ds, domain)
    train = [c for c in ds.cases if c.domain == domain and c.split == "train"]
    test = [c for c in ds.cases if c.domain == domain and c.split == "test"]
    out = {}
    for key in syn.vocabulary(domain):

        def xy(cases: list[syn.CaseRecord], key: str = key) -> tuple[np.ndarray, np.ndarray]:
            x = np.array([_roi_features(images[c.case_id], c.geometry[key]) for c in cases])
            return x, np.array([c.findings[key] for c in cases])

        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(*xy(train))
        out[key] = float(clf.score(*xy(test)))
    return out


def _neighbours(ds: syn.SyntheticDataset, domain: str, k: int) -> tuple[list, list[CorpusDoc], np.ndarray]:
    """Test cases, the domain's train corpus, and each test case's top-k corpus docs by raw-pixel cosine."""
    images = _images(ds, domain)
    test = [c for c in ds.cases if c.domain == domain and c.split == "test"]
    corpus = ds.corpus_for(domain)

    def unit(rows: list[np.ndarray]) -> np.ndarray:
        x = np.stack([r.astype(np.float64).ravel() for r in rows])
        x -= x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    q = unit([images[c.case_id] for c in test])
    index = unit([syn.decode_png(d.image_bytes) for d in corpus])
    top = np.argsort(-(q @ index.T), axis=1, kind="stable")[:, :k]
    return test, corpus, top


STATS = SyntheticDataConfig(domains=ALL_DOMAINS, n_per_domain=400, n_phenotypes=6, image_size=64, seed=0)


@pytest.fixture(scope="module")
def local_pixel_accuracy() -> dict[str, dict[str, float]]:
    """Pixel-statistic accuracy per domain and finding on data whose subtle findings are independent of the
    phenotype (consistency 0.5): there nothing but the pixels at the finding can predict them."""
    ds = syn.generate(dataclasses.replace(STATS, subtle_consistency=0.5))
    return {domain: _pixel_stat_accuracy(ds, domain) for domain in ALL_DOMAINS}


@pytest.mark.slow
def test_visible_findings_are_visible_and_subtle_ones_are_not(local_pixel_accuracy: dict) -> None:
    """A local pixel statistic separates visible findings almost perfectly, subtle ones barely above chance."""
    for domain in ALL_DOMAINS:
        acc = local_pixel_accuracy[domain]
        for key, entry in syn.vocabulary(domain).items():
            if entry["kind"] == "visible":
                assert acc[key] > 0.9, (domain, key, acc)
            else:
                assert acc[key] < 0.72, (domain, key, acc)


@pytest.mark.slow
def test_retrieval_by_image_recovers_phenotype_and_subtle_findings(local_pixel_accuracy: dict) -> None:
    """Nearest train-corpus images (raw pixels) are of the query's phenotype, and the majority of the top-5
    neighbours' *reports* states the query's subtle findings far better than its own pixels do. (The ceiling
    is about ``subtle_consistency`` = 0.9: deviating cases are where retrieval misleads.)"""
    ds = syn.generate(STATS)
    for domain in ALL_DOMAINS:
        test, corpus, top = _neighbours(ds, domain, k=5)
        phenotype = {d.id: _meta(d)["phenotype"] for d in corpus}
        top1 = np.mean([phenotype[corpus[row[0]].id] == c.phenotype for c, row in zip(test, top, strict=True)])
        assert top1 > 0.9, (domain, top1)
        for key, entry in syn.vocabulary(domain).items():
            if entry["kind"] != "subtle":
                continue
            votes = [sum(bool(syn.parse_findings(corpus[j].text, domain)[key]) for j in row) >= 3 for row in top]
            vote_acc = np.mean([v == c.findings[key] for v, c in zip(votes, test, strict=True)])
            pixel = local_pixel_accuracy[domain][key]
            assert vote_acc > 0.75, (domain, key, vote_acc)
            assert vote_acc > pixel + 0.15, (domain, key, vote_acc, pixel)
