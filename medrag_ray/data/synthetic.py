"""The embedded default dataset: a deterministic synthetic multi-domain medical image / report / VQA generator.

Why synthetic
    No machine here may download weights or data sets, yet every feature (domain routing, per-domain
    retrievers, adaptive-k, preference mining D_cm / D_oa1 / D_oa2, DPO, evaluation) needs data on which
    retrieval *measurably* matters. This generator makes such data in seconds, from one seed.

Generative model (per domain)
    * ``n_phenotypes`` latent **phenotypes**. Each has a clearly visible global *signature* -- an
      oriented sinusoidal texture (rib pattern, choroidal pattern, stromal fibres, skin lines) with a
      phenotype-specific wave vector and phase, plus a colour tint for RGB domains -- and a fixed pattern
      of **subtle findings** (present/absent), balanced so each subtle finding is present in about half of
      the phenotypes.
    * Each **case** draws a phenotype, independent **visible findings** (prevalence 0.5, rendered large
      and high-contrast) and inherits the phenotype's subtle findings; with probability
      ``1 - subtle_consistency`` per subtle finding the case deviates from its phenotype (those cases are
      where copying retrieved reports hurts). Subtle findings are rendered faintly (a few percent of the
      dynamic range, under correlated pixel noise and the signature texture), scaled by
      ``subtle_contrast``.
    * The **report** states every finding of the case, present or negated ("No pleural effusion."), with
      phrasing variants chosen by the seed; every sentence about a finding contains the finding's
      ``term`` exactly once, negative sentences contain a negation cue from :data:`NEGATION_CUES` and
      positive ones none, so :func:`parse_findings` reads the findings back from any report.
    * **Questions**: one closed yes/no question per finding per case (MMed-RAG style, "Is there a
      pleural effusion?"), and one ``answer_type="report"`` sample per case (report generation).

What this buys (asserted in ``tests/unit/data/test_synthetic.py``)
    * Visible findings are detectable from the query image alone (a local pixel statistic at the finding's
      region separates present from absent).
    * Subtle findings are nearly invisible in a single image, but cases of the same phenotype look alike
      (the signature) and share them: nearest neighbours of a query image among the train-split corpus
      images are of its phenotype, and their **reports** state its subtle findings. Retrieval therefore
      carries information the image does not show ("retrieval helps", D_oa1), while copying the retrieved
      reports' *visible* findings, which are independent per case, is wrong half of the time
      ("retrieval hurts", D_oa2, and the over-reliance the paper measures).
    * Caveat: a reader *trained* on the train split's subtle-finding questions can learn phenotype ->
      finding itself (that is what retrieval does with the corpus). Keep subtle questions out of a reader's
      SFT data, or raise ``n_phenotypes``, when the experiment needs retrieval to be indispensable.

Splits are by case and stratified by phenotype (every phenotype has at least one case in each split);
the retrieval corpus is the train split's reports with their images, never a val/test case.
Geometry is in normalised image coordinates (x to the right, y down, both in [0, 1]), so content does not
depend on ``image_size``; pixel noise is spatially correlated with a fixed normalised length, so the
subtle findings' signal-to-noise ratio does not grow much with the resolution.
Radiology images are single-channel ("L" PNG); the other domains are RGB.

Output: :func:`generate` builds a :class:`SyntheticDataset` in memory; :func:`write_dataset` writes
``samples_{train,val,test}.parquet`` (:class:`~medrag_ray.data.schema.Sample` rows, PNG bytes inline),
``corpus.parquet`` (:class:`~medrag_ray.data.schema.CorpusDoc` rows, train split only) and
``manifest.json`` (config, counts, vocabulary, per-case ground truth, phenotypes, file and content
hashes), atomically (temp dir, then rename). Same config -> byte-identical files, on a given platform and
library versions (float32 rendering uses CPU-dispatched SIMD math whose last bits may differ across CPUs;
the manifest's ``content_hash`` tells). Each sample row carries its case's PNG, so the Parquet files hold
every image ``n_findings + 1`` times (about 28 KB per case at 64 px, 250 MB for 3 x 3,000 cases).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medrag_ray.config import FINDING_KINDS, SyntheticDataConfig, to_dict
from medrag_ray.data.schema import DOMAINS, SPLITS, CorpusDoc, Sample, dumps_meta, write_parquet
from medrag_ray.utils import atomic_output_dir, sha256_file

logger = logging.getLogger(__name__)

SOURCE = "synthetic"
GENERATOR_VERSION = 2
MANIFEST_NAME = "manifest.json"
CORPUS_NAME = "corpus.parquet"
NEGATION_CUES: tuple[str, ...] = ("no", "not", "without", "negative for", "absent")
_NEGATION_RE = re.compile(r"\b(?:" + "|".join(re.escape(c) for c in NEGATION_CUES) + r")\b", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")

VISIBLE_PREVALENCE = 0.5
CHUNK = 256
"""Cases rendered per vectorised chunk (fixed: noise streams are seeded per chunk, so it is part of the
definition of the data, not a tuning knob)."""
_PROGRESS_MIN_CASES = 2000
NOISE_STD = 0.03
NOISE_CORR = 0.6 / 64
"""Correlation length of the pixel noise in normalised units (0.6 px at 64 px)."""
PHASE_JITTER = 0.25
"""Per-case standard deviation (radians) of the signature's phase around the phenotype's phase."""


def samples_name(split: str) -> str:
    """File name of one split's samples inside a dataset directory."""
    return f"samples_{split}.parquet"


# ----------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Finding:
    """One finding of a domain: how it is named, phrased in reports and asked about.

    ``positive`` / ``negative`` are sentence templates formatted with the case's attributes (``side``,
    ``eye``, ``cdr``); each contains ``term`` exactly once.
    """

    key: str
    term: str
    kind: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    questions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"finding {self.key}: kind must be one of {FINDING_KINDS}, got {self.kind!r}")
        for template in self.positive + self.negative:
            if template.lower().count(self.term.lower()) != 1:
                raise ValueError(f"finding {self.key}: template {template!r} must contain {self.term!r} once")
        for template in self.positive:
            if _NEGATION_RE.search(template):
                raise ValueError(f"finding {self.key}: positive template {template!r} has a negation cue")
        for template in self.negative:
            if not _NEGATION_RE.search(template):
                raise ValueError(f"finding {self.key}: negative template {template!r} lacks a negation cue")


@dataclass(frozen=True)
class DomainSpec:
    """A domain's channels, findings (in report order), framing sentences and the name its reports give the
    phenotype signature's texture (:func:`signature_sentence`)."""

    name: str
    channels: int
    findings: tuple[Finding, ...]
    openers: tuple[str, ...]
    closers: tuple[str, ...]
    texture: str

    def keys(self, kind: str | None = None) -> tuple[str, ...]:
        return tuple(f.key for f in self.findings if kind is None or f.kind == kind)


_RADIOLOGY = DomainSpec(
    name="radiology",
    channels=1,
    findings=(
        Finding(
            "cardiomegaly",
            "cardiomegaly",
            "visible",
            (
                "The cardiac silhouette is enlarged, consistent with cardiomegaly.",
                "Moderate cardiomegaly.",
                "There is cardiomegaly.",
            ),
            ("Heart size is normal, without cardiomegaly.", "No cardiomegaly.", "There is no cardiomegaly."),
            (
                "Is there cardiomegaly?",
                "Is the heart enlarged, indicating cardiomegaly?",
                "Does the chest X-ray show cardiomegaly?",
            ),
        ),
        Finding(
            "opacity_right",
            "opacity in the right lung",
            "visible",
            (
                "There is a focal opacity in the right lung.",
                "Patchy opacity in the right lung, concerning for pneumonia.",
                "A rounded opacity in the right lung is seen.",
            ),
            (
                "No opacity in the right lung.",
                "There is no focal opacity in the right lung.",
                "No consolidative opacity in the right lung.",
            ),
            (
                "Is there an opacity in the right lung?",
                "Does the right lung show an opacity?",
                "Is there a focal opacity in the right lung?",
            ),
        ),
        Finding(
            "opacity_left",
            "opacity in the left lung",
            "visible",
            (
                "There is a focal opacity in the left lung.",
                "Patchy opacity in the left lung, concerning for pneumonia.",
                "A rounded opacity in the left lung is seen.",
            ),
            (
                "No opacity in the left lung.",
                "There is no focal opacity in the left lung.",
                "No consolidative opacity in the left lung.",
            ),
            (
                "Is there an opacity in the left lung?",
                "Does the left lung show an opacity?",
                "Is there a focal opacity in the left lung?",
            ),
        ),
        Finding(
            "pleural_effusion",
            "pleural effusion",
            "visible",
            (
                "Small {side} pleural effusion.",
                "There is a {side} pleural effusion with blunting of the costophrenic angle.",
                "A {side} pleural effusion is present.",
            ),
            ("No pleural effusion.", "There is no pleural effusion.", "No evidence of pleural effusion."),
            (
                "Is there a pleural effusion?",
                "Does the patient have a pleural effusion?",
                "Is a pleural effusion seen on the chest X-ray?",
            ),
        ),
        Finding(
            "nodule",
            "pulmonary nodule",
            "subtle",
            (
                "A small pulmonary nodule is noted in the {side} upper zone.",
                "There is a subtle pulmonary nodule.",
                "Small pulmonary nodule, follow-up CT recommended.",
            ),
            ("No pulmonary nodule.", "No discrete pulmonary nodule is seen.", "There is no pulmonary nodule."),
            ("Is there a pulmonary nodule?", "Does the image show a lung nodule?", "Is a pulmonary nodule present?"),
        ),
        Finding(
            "interstitial",
            "interstitial markings",
            "subtle",
            (
                "Mildly increased interstitial markings in the {side} lower zone.",
                "There are increased interstitial markings.",
                "Subtle reticular interstitial markings are present.",
            ),
            (
                "No increased interstitial markings.",
                "The interstitial markings are not increased.",
                "No prominent interstitial markings.",
            ),
            (
                "Are there increased interstitial markings?",
                "Are the interstitial markings increased?",
                "Is there an interstitial pattern in the lungs?",
            ),
        ),
    ),
    openers=("PA view of the chest.", "Frontal radiograph of the chest.", "Single frontal view of the chest."),
    closers=(
        "No acute osseous abnormality.",
        "The osseous structures are intact.",
        "Visualized bones are unremarkable.",
    ),
    texture="bronchovascular pattern",
)

_OPHTHALMOLOGY = DomainSpec(
    name="ophthalmology",
    channels=3,
    findings=(
        Finding(
            "cupping",
            "enlarged optic cup",
            "visible",
            (
                "The optic disc shows an enlarged optic cup with a cup-to-disc ratio of about {cdr}, "
                "suspicious for glaucoma.",
                "Enlarged optic cup (cup-to-disc ratio {cdr}); glaucoma suspect.",
                "There is an enlarged optic cup, cup-to-disc ratio {cdr}.",
            ),
            (
                "No enlarged optic cup; the cup-to-disc ratio is {cdr}.",
                "The optic disc is healthy without an enlarged optic cup (cup-to-disc ratio {cdr}).",
                "There is no enlarged optic cup.",
            ),
            (
                "Is there an enlarged optic cup?",
                "Is the optic cup enlarged, suggesting glaucoma?",
                "Does the fundus image show signs of glaucoma?",
            ),
        ),
        Finding(
            "hemorrhages",
            "retinal hemorrhages",
            "visible",
            (
                "Scattered retinal hemorrhages are present.",
                "There are several dot-blot retinal hemorrhages.",
                "Multiple retinal hemorrhages are seen.",
            ),
            ("No retinal hemorrhages.", "There are no retinal hemorrhages.", "No retinal hemorrhages are seen."),
            ("Are there retinal hemorrhages?", "Does the fundus show hemorrhages?", "Are retinal hemorrhages present?"),
        ),
        Finding(
            "exudates",
            "hard exudates",
            "visible",
            (
                "Hard exudates are present.",
                "There are scattered yellow hard exudates.",
                "Several hard exudates are seen.",
            ),
            ("No hard exudates.", "There are no hard exudates.", "No hard exudates are seen."),
            ("Are there hard exudates?", "Does the retina show hard exudates?", "Are hard exudates present?"),
        ),
        Finding(
            "microaneurysms",
            "microaneurysms",
            "subtle",
            (
                "A few microaneurysms are noted.",
                "Scattered microaneurysms are present.",
                "There are several microaneurysms.",
            ),
            ("No microaneurysms.", "No microaneurysms are seen.", "There are no microaneurysms."),
            ("Are there microaneurysms?", "Does the fundus show microaneurysms?", "Are microaneurysms present?"),
        ),
        Finding(
            "drusen",
            "drusen",
            "subtle",
            (
                "Small drusen are present at the macula.",
                "A few macular drusen are noted.",
                "There are scattered drusen in the macular region.",
            ),
            ("No drusen.", "The macula shows no drusen.", "There are no drusen."),
            ("Are there drusen?", "Does the macula show drusen?", "Are drusen present?"),
        ),
    ),
    openers=(
        "Color fundus photograph of the {eye} eye.",
        "Fundus image, {eye} eye.",
        "Color fundus image of the {eye} eye, centered on the posterior pole.",
    ),
    closers=(
        "The retinal vessels are of normal caliber.",
        "The retina is attached.",
        "The fovea is centered in the image.",
    ),
    texture="choroidal pattern",
)

_PATHOLOGY = DomainSpec(
    name="pathology",
    channels=3,
    findings=(
        Finding(
            "tumor",
            "tumor cells",
            "visible",
            (
                "Sheets of atypical tumor cells with enlarged hyperchromatic nuclei are present.",
                "There are clusters of tumor cells with pleomorphic nuclei.",
                "Infiltrating tumor cells are identified.",
            ),
            ("No tumor cells are identified.", "Negative for tumor cells.", "There are no tumor cells."),
            (
                "Are there tumor cells?",
                "Does the section contain tumor cells?",
                "Is this tissue infiltrated by tumor cells?",
            ),
        ),
        Finding(
            "necrosis",
            "necrosis",
            "visible",
            ("A focus of coagulative necrosis is present.", "There is an area of necrosis.", "Necrosis is seen."),
            ("No necrosis.", "There is no necrosis.", "No necrosis is identified."),
            ("Is there necrosis?", "Is necrosis present in the tissue?", "Does the image show an area of necrosis?"),
        ),
        Finding(
            "hemorrhage",
            "hemorrhage",
            "visible",
            (
                "There is focal hemorrhage.",
                "Fresh hemorrhage with extravasated red blood cells is present.",
                "An area of hemorrhage is seen.",
            ),
            ("No hemorrhage.", "There is no hemorrhage.", "No hemorrhage is seen."),
            ("Is there hemorrhage?", "Is hemorrhage present in the section?", "Does the image show hemorrhage?"),
        ),
        Finding(
            "mitoses",
            "mitotic figures",
            "subtle",
            (
                "Scattered mitotic figures are identified.",
                "Occasional mitotic figures are seen.",
                "Mitotic figures are present.",
            ),
            ("No mitotic figures are identified.", "Mitotic figures are not seen.", "There are no mitotic figures."),
            ("Are there mitotic figures?", "Are mitotic figures present?", "Does the section show mitotic figures?"),
        ),
        Finding(
            "lymphocytes",
            "lymphocytic infiltrate",
            "subtle",
            (
                "A mild lymphocytic infiltrate is present.",
                "There is a patchy lymphocytic infiltrate.",
                "A lymphocytic infiltrate is seen in the stroma.",
            ),
            (
                "No lymphocytic infiltrate.",
                "There is no lymphocytic infiltrate.",
                "No significant lymphocytic infiltrate is seen.",
            ),
            (
                "Is there a lymphocytic infiltrate?",
                "Are lymphocytes infiltrating the tissue?",
                "Does the section show a lymphocytic infiltrate?",
            ),
        ),
    ),
    openers=(
        "H&E-stained tissue section.",
        "Hematoxylin and eosin stained section, high power.",
        "Microscopic image of an H&E-stained section.",
    ),
    closers=(
        "Correlation with the clinical history is recommended.",
        "Margins cannot be assessed on this image.",
        "Additional levels may be examined if clinically indicated.",
    ),
    texture="stromal fibre pattern",
)

_DERMATOLOGY = DomainSpec(
    name="dermatology",
    channels=3,
    findings=(
        Finding(
            "veil",
            "blue-white veil",
            "visible",
            (
                "A blue-white veil is present.",
                "There is a blue-white veil over part of the lesion.",
                "Blue-white veil is seen.",
            ),
            ("No blue-white veil.", "There is no blue-white veil.", "Blue-white veil is absent."),
            ("Is there a blue-white veil?", "Does the lesion show a blue-white veil?", "Is a blue-white veil present?"),
        ),
        Finding(
            "globules",
            "globules",
            "visible",
            (
                "Irregular dark globules are seen.",
                "There are dark dots and globules in the lesion.",
                "Clustered dark globules are present.",
            ),
            ("No globules.", "No dark globules are seen.", "There are no globules."),
            ("Are there dark globules?", "Does the lesion contain globules?", "Are globules present?"),
        ),
        Finding(
            "milia",
            "milia-like cysts",
            "visible",
            (
                "Milia-like cysts are present.",
                "There are several milia-like cysts.",
                "Scattered milia-like cysts are seen.",
            ),
            ("No milia-like cysts.", "There are no milia-like cysts.", "No milia-like cysts are seen."),
            ("Are there milia-like cysts?", "Does the lesion show milia-like cysts?", "Are milia-like cysts present?"),
        ),
        Finding(
            "regression",
            "regression structures",
            "subtle",
            (
                "Subtle regression structures are noted.",
                "There are regression structures.",
                "Regression structures are present.",
            ),
            ("No regression structures.", "There are no regression structures.", "No regression structures are seen."),
            (
                "Are there regression structures?",
                "Does the lesion show regression structures?",
                "Are regression structures present?",
            ),
        ),
        Finding(
            "dotted_vessels",
            "dotted vessels",
            "subtle",
            ("Dotted vessels are seen.", "There are a few dotted vessels.", "Fine dotted vessels are present."),
            ("No dotted vessels.", "There are no dotted vessels.", "No dotted vessels are seen."),
            ("Are there dotted vessels?", "Does the lesion show dotted vessels?", "Are dotted vessels present?"),
        ),
    ),
    openers=(
        "Dermoscopic image of a pigmented skin lesion.",
        "Dermoscopy of a pigmented lesion.",
        "Dermoscopic view of a melanocytic lesion.",
    ),
    closers=(
        "Correlation with the clinical history is recommended.",
        "Follow-up dermoscopy may be considered.",
        "The surrounding skin is unremarkable.",
    ),
    texture="skin line pattern",
)

DOMAIN_SPECS: dict[str, DomainSpec] = {s.name: s for s in (_RADIOLOGY, _OPHTHALMOLOGY, _PATHOLOGY, _DERMATOLOGY)}


def vocabulary(domain: str) -> dict[str, dict[str, Any]]:
    """The finding vocabulary of a domain: ``{key: {term, kind, questions}}`` in report order."""
    spec = _spec(domain)
    return {f.key: {"term": f.term, "kind": f.kind, "questions": list(f.questions)} for f in spec.findings}


def parse_findings(text: str, domain: str) -> dict[str, bool | None]:
    """Read a domain's findings back from report text: True (stated present), False (negated), None (absent
    from the text, or stated both ways). A sentence negates a finding when it holds a :data:`NEGATION_CUES`
    word; usable on generated reports too (clinical-efficacy style metrics)."""
    spec = _spec(domain)
    sentences = [s for s in _SENTENCE_RE.split(text.strip()) if s]
    out: dict[str, bool | None] = {}
    for f in spec.findings:
        term = f.term.lower()
        verdicts = {not _NEGATION_RE.search(s) for s in sentences if term in s.lower()}
        out[f.key] = verdicts.pop() if len(verdicts) == 1 else None
    return out


def _spec(domain: str) -> DomainSpec:
    if domain not in DOMAIN_SPECS:
        raise ValueError(f"no synthetic generator for domain {domain!r}; choose from {sorted(DOMAIN_SPECS)}")
    return DOMAIN_SPECS[domain]


# ------------------------------------------------------------------------------------ phenotypes


@dataclass(frozen=True)
class Phenotype:
    """A latent phenotype: visible signature (grating wave vector in cycles per image, phase, tint), the words
    its reports describe the signature with (``pattern``) and its subtle-finding pattern."""

    index: int
    kx: float
    ky: float
    phase: float
    tint: tuple[float, float, float]
    pattern: str
    subtle: dict[str, bool]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.index,
            "signature": {
                "kx": round(self.kx, 6),
                "ky": round(self.ky, 6),
                "phase": round(self.phase, 6),
                "tint": [round(t, 6) for t in self.tint],
                "pattern": self.pattern,
            },
            "subtle": dict(self.subtle),
        }


SIGNATURE_ORIENTATIONS: tuple[str, ...] = ("vertically", "obliquely upward", "horizontally", "obliquely downward")
"""How the signature's stripes run, by the wave vector's angle (0, 45, 90, 135 degrees; y points down): stripes
are perpendicular to the wave vector."""
SIGNATURE_SPACINGS: tuple[str, ...] = ("coarse", "medium", "fine")
"""The signature's spacing, by the wave vector's length in thirds of its range."""


def _wave_range(image_size: int) -> tuple[float, float]:
    """Lengths of the signature's wave vector (cycles per image)."""
    return 2.5, min(9.0, image_size / 4.0)


def _cell_range(cell: int, image_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The (length, angle) ranges of a descriptor cell ``orientation * 3 + spacing``, kept off the cell's borders
    so the words name the signature unambiguously."""
    orientation, spacing = divmod(cell, len(SIGNATURE_SPACINGS))
    k_min, k_max = _wave_range(image_size)
    width = (k_max - k_min) / len(SIGNATURE_SPACINGS)
    lo = k_min + spacing * width
    step = math.pi / len(SIGNATURE_ORIENTATIONS)
    centre = orientation * step
    return (lo + 0.1 * width, lo + 0.9 * width), (centre - 0.35 * step, centre + 0.35 * step)


def signature_pattern(kx: float, ky: float, image_size: int) -> str:
    """The words a report uses for a signature of wave vector ``(kx, ky)``: its spacing and how its stripes run
    (``"fine, running obliquely upward"``)."""
    k_min, k_max = _wave_range(image_size)
    mag, ang = math.hypot(kx, ky), math.atan2(ky, kx) % math.pi
    spacing = min(len(SIGNATURE_SPACINGS) - 1, max(0, int((mag - k_min) / (k_max - k_min) * len(SIGNATURE_SPACINGS))))
    orientation = round(ang / (math.pi / len(SIGNATURE_ORIENTATIONS))) % len(SIGNATURE_ORIENTATIONS)
    return f"{SIGNATURE_SPACINGS[spacing]}, running {SIGNATURE_ORIENTATIONS[orientation]}"


def signature_sentence(spec: DomainSpec, pattern: str) -> str:
    """The report sentence describing the phenotype's signature texture (names no finding)."""
    return f"The {spec.texture} is {pattern}."


def _wave_vectors(n: int, image_size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """``n`` grating wave vectors (cycles per image) whose complex exponentials are nearly orthogonal over
    the image, so signatures of different phenotypes stay apart whatever their phases; each in its own
    descriptor cell (:data:`SIGNATURE_SPACINGS` x :data:`SIGNATURE_ORIENTATIONS`, 12 cells), so reports name
    different phenotypes' signatures with different words (beyond 12 phenotypes, words repeat)."""
    c = (np.arange(image_size) + 0.5) / image_size
    n_cells = len(SIGNATURE_SPACINGS) * len(SIGNATURE_ORIENTATIONS)
    chosen: list[tuple[float, float]] = []
    cells = [int(x) for x in rng.permutation(n_cells)]
    for cell in cells * (1 + (n - 1) // n_cells):
        if len(chosen) == n:
            break
        (m_lo, m_hi), (a_lo, a_hi) = _cell_range(cell, image_size)
        for _ in range(500):
            mag, ang = rng.uniform(m_lo, m_hi), rng.uniform(a_lo, a_hi)
            k = (mag * math.cos(ang), mag * math.sin(ang))
            if all(_overlap(k, other, c) < 0.3 for other in chosen):
                chosen.append(k)
                break
    if len(chosen) < n:
        raise ValueError(
            f"cannot place {n} distinguishable phenotype signatures at image_size={image_size} "
            f"(found {len(chosen)}); lower data.n_phenotypes or raise data.image_size"
        )
    return chosen


def _overlap(k1: tuple[float, float], k2: tuple[float, float], c: np.ndarray) -> float:
    """|mean of exp(2πi (k1-k2)·x)| over the pixel grid (separable per axis)."""
    ox = abs(np.exp(2j * math.pi * (k1[0] - k2[0]) * c).mean())
    oy = abs(np.exp(2j * math.pi * (k1[1] - k2[1]) * c).mean())
    return float(ox * oy)


_TINT_STD = {"radiology": 0.0, "ophthalmology": 0.05, "pathology": 0.09, "dermatology": 0.05}
"""Per-phenotype colour tint (stain / pigmentation / skin tone); pathology's is larger because its nuclei
clutter is larger."""


def _make_phenotypes(spec: DomainSpec, cfg: SyntheticDataConfig, rng: np.random.Generator) -> list[Phenotype]:
    n = cfg.n_phenotypes
    waves = _wave_vectors(n, cfg.image_size, rng)
    phases = rng.uniform(0.0, 2 * math.pi, n)
    tints = rng.normal(0.0, _TINT_STD[spec.name], (n, 3))
    patterns = {}
    for key in spec.keys("subtle"):
        base = np.arange(n) < (n + 1) // 2
        patterns[key] = rng.permutation(base)
    return [
        Phenotype(
            index=p,
            kx=waves[p][0],
            ky=waves[p][1],
            phase=float(phases[p]),
            tint=(float(tints[p, 0]), float(tints[p, 1]), float(tints[p, 2])),
            pattern=signature_pattern(waves[p][0], waves[p][1], cfg.image_size),
            subtle={k: bool(v[p]) for k, v in patterns.items()},
        )
        for p in range(n)
    ]


# ------------------------------------------------------------------------------------- cases


def _assign_splits(
    phenotype: np.ndarray, n_phenotypes: int, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Split index per case, stratified by phenotype with at least one case of each phenotype per split."""
    split = np.zeros(len(phenotype), dtype=np.int64)
    for p in range(n_phenotypes):
        idx = rng.permutation(np.flatnonzero(phenotype == p))
        m = len(idx)
        n_val = max(1, round(m * fractions[1]))
        n_test = max(1, round(m * fractions[2]))
        n_train = m - n_val - n_test
        if n_train < 1:
            raise ValueError(f"phenotype {p} has {m} cases, too few for three splits; raise data.n_per_domain")
        split[idx[n_train : n_train + n_val]] = 1
        split[idx[n_train + n_val :]] = 2
    return split


@dataclass(frozen=True)
class _Cases:
    """All cases of one domain as arrays (length n) plus per-case parameter arrays for rendering."""

    phenotype: np.ndarray
    split: np.ndarray
    present: dict[str, np.ndarray]
    deviates: dict[str, np.ndarray]
    params: dict[str, np.ndarray]


def _draw_cases(
    spec: DomainSpec, cfg: SyntheticDataConfig, phenotypes: list[Phenotype], rng: np.random.Generator
) -> _Cases:
    n = cfg.n_per_domain
    phen = rng.permutation(np.arange(n) % cfg.n_phenotypes)
    split = _assign_splits(phen, cfg.n_phenotypes, cfg.split_fractions, rng)
    present: dict[str, np.ndarray] = {}
    deviates: dict[str, np.ndarray] = {}
    for f in spec.findings:
        if f.kind == "visible":
            present[f.key] = rng.random(n) < VISIBLE_PREVALENCE
        else:
            base = np.array([phenotypes[p].subtle[f.key] for p in phen], dtype=bool)
            flip = rng.random(n) >= cfg.subtle_consistency
            present[f.key] = base ^ flip
            deviates[f.key] = flip
    params = _DRAW[spec.name](rng, n, present)
    params["kx"] = np.array([phenotypes[p].kx for p in phen], dtype=np.float32)
    params["ky"] = np.array([phenotypes[p].ky for p in phen], dtype=np.float32)
    params["phase"] = (np.array([phenotypes[p].phase for p in phen]) + rng.normal(0, PHASE_JITTER, n)).astype(
        np.float32
    )
    params["tint"] = np.array([phenotypes[p].tint for p in phen], dtype=np.float32)
    params["gain"] = rng.uniform(0.94, 1.06, n).astype(np.float32)
    params["offset"] = rng.uniform(-0.02, 0.02, n).astype(np.float32)
    return _Cases(phen, split, present, deviates, params)


def _u(rng: np.random.Generator, lo: float, hi: float, n: int | tuple[int, ...]) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float32)


def _spots_in(
    rng: np.random.Generator,
    n: int,
    k_max: int,
    k_min: int,
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    spot_r: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Up to ``k_max`` spots per case, uniformly inside each case's ROI disk; ``valid`` marks the drawn count;
    ``r`` (spot radii) only when ``spot_r`` gives their range (nuclei have a fixed size instead)."""
    rad = r[:, None] * np.sqrt(rng.random((n, k_max)))
    ang = rng.uniform(0, 2 * math.pi, (n, k_max))
    count = rng.integers(k_min, k_max + 1, n)
    spots = {
        "x": (cx[:, None] + rad * np.cos(ang)).astype(np.float32),
        "y": (cy[:, None] + rad * np.sin(ang)).astype(np.float32),
        "valid": np.arange(k_max)[None, :] < count[:, None],
    }
    if spot_r is not None:
        spots["r"] = _u(rng, spot_r[0], spot_r[1], (n, k_max))
    return spots


def _roi(params: dict[str, np.ndarray], key: str, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> None:
    params[f"{key}.x"], params[f"{key}.y"], params[f"{key}.r"] = (a.astype(np.float32) for a in (x, y, r))


def _add_spots(params: dict[str, np.ndarray], key: str, spots: dict[str, np.ndarray]) -> None:
    for name, value in spots.items():
        params[f"{key}.spot_{name}"] = value


def _slots(
    rng: np.random.Generator, n: int, centers: np.ndarray, n_used: int, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n_used`` distinct slot centres per case (returns x, y of shape (n, n_used))."""
    order = np.argsort(rng.random((n, len(centers))), axis=1)[:, :n_used]
    xy = centers[order] + rng.uniform(-jitter, jitter, (n, n_used, 2))
    return xy[..., 0].astype(np.float32), xy[..., 1].astype(np.float32)


def _draw_radiology(rng: np.random.Generator, n: int, present: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {
        "dx": _u(rng, -0.015, 0.015, n),
        "dy": _u(rng, -0.015, 0.015, n),
        "scale": _u(rng, 0.96, 1.04, n),
    }
    lung_x = {"right": 0.32 + p["dx"], "left": 0.68 + p["dx"]}  # patient's right lung is on the image's left
    cy = 0.46 + p["dy"]
    for side in ("right", "left"):
        key = f"opacity_{side}"
        _roi(p, key, lung_x[side] + _u(rng, -0.035, 0.035, n), cy + _u(rng, -0.08, 0.02, n), _u(rng, 0.06, 0.08, n))
    eff_left = rng.random(n) < 0.5
    p["pleural_effusion.side"] = eff_left
    lat = np.where(eff_left, 1.0, -1.0)
    ex = np.where(eff_left, lung_x["left"], lung_x["right"]) + 0.05 * lat
    _roi(p, "pleural_effusion", ex, cy + 0.22 * p["scale"], np.full(n, 0.065))
    p["heart_scale"] = np.where(present["cardiomegaly"], _u(rng, 1.45, 1.6, n), _u(rng, 0.95, 1.05, n)).astype(
        np.float32
    )
    _roi(p, "cardiomegaly", 0.54 + p["dx"], 0.66 + p["dy"], 0.11 * 1.5 * p["scale"])  # the enlarged extent
    nod_left = rng.random(n) < 0.5
    p["nodule.side"] = nod_left
    nx = np.where(nod_left, lung_x["left"], lung_x["right"]) + _u(rng, -0.04, 0.04, n)
    _roi(p, "nodule", nx, cy - 0.19 + _u(rng, -0.025, 0.025, n), _u(rng, 0.018, 0.024, n))
    int_left = rng.random(n) < 0.5
    p["interstitial.side"] = int_left
    ix = np.where(int_left, lung_x["left"], lung_x["right"]) + _u(rng, -0.02, 0.02, n)
    _roi(p, "interstitial", ix, cy + 0.1 + _u(rng, -0.02, 0.02, n), np.full(n, 0.06))
    p["interstitial.angle"] = _u(rng, 0, math.pi, n)
    return p


def _draw_ophthalmology(rng: np.random.Generator, n: int, present: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {"dx": _u(rng, -0.015, 0.015, n), "dy": _u(rng, -0.015, 0.015, n)}
    right_eye = rng.random(n) < 0.5
    p["right_eye"] = right_eye
    side = np.where(right_eye, 1.0, -1.0)
    disc_x, disc_y = 0.5 + 0.18 * side + p["dx"], 0.5 + p["dy"]
    p["disc_r"] = _u(rng, 0.08, 0.09, n)
    p["cdr"] = np.where(present["cupping"], _u(rng, 0.65, 0.8, n), _u(rng, 0.2, 0.35, n)).astype(np.float32)
    _roi(p, "cupping", disc_x, disc_y, p["disc_r"])
    p["mac_x"], p["mac_y"] = (disc_x - 0.26 * side).astype(np.float32), disc_y.astype(np.float32)
    p["arcade_b"] = _u(rng, 0.19, 0.23, n)
    _roi(p, "drusen", p["mac_x"], p["mac_y"], np.full(n, 0.07))
    _add_spots(
        p, "drusen", _spots_in(rng, n, 7, 4, p["mac_x"], p["mac_y"], np.full(n, 0.06, np.float32), (0.010, 0.014))
    )
    slot_centers = np.array([[0.30, 0.24], [0.70, 0.24], [0.30, 0.76], [0.70, 0.76]])
    sx, sy = _slots(rng, n, slot_centers, 3, 0.03)
    for j, (key, k_range, spot_r) in enumerate(
        (
            ("hemorrhages", (4, 7), (0.035, 0.045)),
            ("exudates", (5, 8), (0.02, 0.026)),
            ("microaneurysms", (4, 7), (0.008, 0.011)),
        )
    ):
        r = np.full(n, 0.12, np.float32)
        _roi(p, key, sx[:, j], sy[:, j], r)
        _add_spots(p, key, _spots_in(rng, n, k_range[1], k_range[0], sx[:, j], sy[:, j], r * 0.85, spot_r))
    return p


def _draw_pathology(rng: np.random.Generator, n: int, present: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {}
    grid = np.array([[x, y] for y in (0.2, 0.5, 0.8) for x in (0.2, 0.5, 0.8)])
    sx, sy = _slots(rng, n, grid, 5, 0.01)
    radii = {"tumor": 0.14, "necrosis": 0.13, "hemorrhage": 0.12, "mitoses": 0.1, "lymphocytes": 0.1}
    for j, (key, r) in enumerate(radii.items()):
        _roi(p, key, sx[:, j], sy[:, j], np.full(n, r))
    n_bg = 80
    p["bg_nuc_x"], p["bg_nuc_y"] = _u(rng, 0, 1, (n, n_bg)), _u(rng, 0, 1, (n, n_bg))
    r_full = {k: np.full(n, v * 0.9, np.float32) for k, v in radii.items()}
    _add_spots(p, "tumor", _spots_in(rng, n, 45, 38, sx[:, 0], sy[:, 0], r_full["tumor"]))
    _add_spots(p, "mitoses", _spots_in(rng, n, 4, 2, sx[:, 3], sy[:, 3], r_full["mitoses"]))
    _add_spots(p, "lymphocytes", _spots_in(rng, n, 16, 12, sx[:, 4], sy[:, 4], r_full["lymphocytes"]))
    _add_spots(p, "necrosis", _spots_in(rng, n, 8, 5, sx[:, 1], sy[:, 1], r_full["necrosis"]))
    return p


def _draw_dermatology(rng: np.random.Generator, n: int, present: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {
        "les_x": _u(rng, 0.47, 0.53, n),
        "les_y": _u(rng, 0.47, 0.53, n),
        "les_rx": _u(rng, 0.32, 0.36, n),
        "les_ry": _u(rng, 0.27, 0.31, n),
        "les_wobble": _u(rng, 0, 2 * math.pi, n),
    }
    rot = rng.uniform(0, 2 * math.pi, n)
    ang = rot[:, None] + np.arange(5)[None, :] * (2 * math.pi / 5)
    order = np.argsort(rng.random((n, 5)), axis=1)
    ang = np.take_along_axis(ang, order, axis=1)
    sx, sy = p["les_x"][:, None] + 0.16 * np.cos(ang), p["les_y"][:, None] + 0.14 * np.sin(ang)
    for j, key in enumerate(("veil", "globules", "milia", "regression", "dotted_vessels")):
        _roi(p, key, sx[:, j], sy[:, j], np.full(n, 0.07))
    r = np.full(n, 0.06, np.float32)
    _add_spots(
        p,
        "globules",
        _spots_in(rng, n, 7, 5, sx[:, 1].astype(np.float32), sy[:, 1].astype(np.float32), r, (0.012, 0.016)),
    )
    _add_spots(
        p, "milia", _spots_in(rng, n, 6, 4, sx[:, 2].astype(np.float32), sy[:, 2].astype(np.float32), r, (0.010, 0.013))
    )
    _add_spots(
        p,
        "dotted_vessels",
        _spots_in(rng, n, 9, 6, sx[:, 4].astype(np.float32), sy[:, 4].astype(np.float32), r, (0.006, 0.008)),
    )
    return p


_DRAW: dict[str, Callable[[np.random.Generator, int, Mapping[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "radiology": _draw_radiology,
    "ophthalmology": _draw_ophthalmology,
    "pathology": _draw_pathology,
    "dermatology": _draw_dermatology,
}


# --------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Canvas:
    """Pixel-centre coordinates for one image size, broadcastable against (m, 1, 1) case parameters."""

    size: int
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def make(cls, size: int) -> _Canvas:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        return cls(size, c[None, None, :], c[None, :, None])


def _c(a: np.ndarray) -> np.ndarray:
    """(m,) -> (m, 1, 1) for broadcasting against images."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _ellipse(cv: _Canvas, cx: Any, cy: Any, rx: Any, ry: Any, edge_px: float = 1.0) -> np.ndarray:
    """Antialiased filled ellipse mask in [0, 1]."""
    d = np.sqrt(((cv.x - cx) / rx) ** 2 + ((cv.y - cy) / ry) ** 2)
    sharp = np.asarray(np.minimum(rx, ry) * cv.size / edge_px, np.float32)
    return np.clip(0.5 + (1.0 - d) * sharp, 0.0, 1.0)


def _gauss(cv: _Canvas, cx: Any, cy: Any, sigma: Any) -> np.ndarray:
    return np.exp(-((cv.x - cx) ** 2 + (cv.y - cy) ** 2) / (2.0 * sigma**2))


def _spots(cv: _Canvas, params: Mapping[str, np.ndarray], key: str, on: np.ndarray) -> np.ndarray:
    """Max of Gaussian spots of finding ``key`` (only for cases where ``on``), shape (m, H, W)."""
    x, y, r, valid = (params[f"{key}.spot_{k}"] for k in ("x", "y", "r", "valid"))
    out = np.zeros((len(on), cv.size, cv.size), np.float32)
    for k in range(x.shape[1]):
        w = _c(valid[:, k] & on)
        out = np.maximum(out, w * _gauss(cv, _c(x[:, k]), _c(y[:, k]), _c(r[:, k]) * 0.7))
    return out


def _gauss_matrix(size: int, sigma_px: float, normalize: bool) -> np.ndarray:
    i = np.arange(size, dtype=np.float32)
    g = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2.0 * max(sigma_px, 1e-3) ** 2))
    return (g / g.sum(axis=1, keepdims=True)) if normalize else g


def _blur(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable blur of (m, H, W) images with matrix ``g`` on both axes, as two large GEMMs (a batched
    matmul of many small matrices is far slower, and erratic under BLAS thread contention)."""
    m, h, w = a.shape
    rows = (a.reshape(m * h, w) @ g.T).reshape(m, h, w)
    cols = g @ rows.transpose(1, 0, 2).reshape(h, m * w)
    return np.ascontiguousarray(cols.reshape(h, m, w).transpose(1, 0, 2))


def _impulses(cv: _Canvas, xs: np.ndarray, ys: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Point map (m, H, W): an impulse of height ``weights[i, k]`` (default 1; 0 or False = not drawn) at
    each point (xs[i, k], ys[i, k]) of case i."""
    m, k = xs.shape
    w = np.ones(xs.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    ok = ((w > 0) & (xs >= 0) & (xs < 1) & (ys >= 0) & (ys < 1)).ravel()
    rows = np.repeat(np.arange(m), k)[ok]
    xi = np.clip((xs.ravel()[ok] * cv.size).astype(np.int64), 0, cv.size - 1)
    yi = np.clip((ys.ravel()[ok] * cv.size).astype(np.int64), 0, cv.size - 1)
    out = np.zeros((m, cv.size, cv.size), np.float32)
    np.add.at(out, (rows, yi, xi), w.ravel()[ok])
    return out


def _nuclei(cv: _Canvas, xs: np.ndarray, ys: np.ndarray, sigma: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Soft nuclei map in [0, 1]: impulses blurred by an unnormalised Gaussian (peak = weight per nucleus)."""
    g = _gauss_matrix(cv.size, sigma * cv.size, normalize=False)
    return np.clip(_blur(_impulses(cv, xs, ys, weights), g), 0.0, 1.0)


def _grating(cv: _Canvas, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """The phenotype signature texture in [-1, 1], shape (m, H, W)."""
    arg = 2.0 * math.pi * (_c(params["kx"]) * cv.x + _c(params["ky"]) * cv.y) + _c(params["phase"])
    return np.cos(arg)


def _blend(img: np.ndarray, alpha: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """Alpha-blend a colour into an (m, H, W, 3) image with an (m, H, W) alpha (updates ``img`` in place)."""
    diff = np.asarray(colour, np.float32) - img
    diff *= alpha[..., None]
    img += diff
    return img


def _noise(cv: _Canvas, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Spatially correlated Gaussian noise with std NOISE_STD, shape (m, H, W, C)."""
    sigma_px = NOISE_CORR * cv.size
    g = _gauss_matrix(cv.size, sigma_px, normalize=True)
    white = rng.standard_normal(shape, dtype=np.float32)
    gain = float(np.sqrt((g**2).sum(axis=1)).mean() ** 2)
    out = np.stack([_blur(white[..., ch], g) for ch in range(shape[-1])], axis=-1)
    return out * (NOISE_STD / gain)


def _render_radiology(
    cv: _Canvas, p: Mapping[str, np.ndarray], on: Mapping[str, np.ndarray], subtle: float
) -> np.ndarray:
    dx, dy, s = _c(p["dx"]), _c(p["dy"]), _c(p["scale"])
    body = _ellipse(cv, 0.5 + dx, 0.56 + dy, 0.46 * s, 0.5 * s, edge_px=3.0)
    img = 0.05 + 0.55 * body
    lungs = {
        side: _ellipse(cv, x + dx, 0.46 + dy, 0.13 * s, 0.27 * s, edge_px=2.0)
        for side, x in (("right", 0.32), ("left", 0.68))
    }
    img = img - 0.36 * (lungs["right"] + lungs["left"])
    img = img + 0.12 * _ellipse(cv, 0.5 + dx, 0.45 + dy, 0.05, 0.32 * s)
    heart_r = 0.11 * _c(p["heart_scale"] * p["scale"])
    heart = _ellipse(cv, _c(p["cardiomegaly.x"]), _c(p["cardiomegaly.y"]), heart_r, heart_r * 0.8, 2.0)
    img = img + heart * (0.66 - img)  # a uniform soft-tissue density that occludes the lungs
    img = img + 0.09 * body * _grating(cv, p)
    for side in ("right", "left"):
        key = f"opacity_{side}"
        blob = _gauss(cv, _c(p[f"{key}.x"]), _c(p[f"{key}.y"]), _c(p[f"{key}.r"]) * 0.6)
        img = img + 0.35 * _c(on[key]) * blob * np.maximum(lungs[side], 0.3)
    eff_left = p["pleural_effusion.side"]
    lung = np.where(_c(eff_left) > 0, lungs["left"], lungs["right"])
    lat = np.where(eff_left, 1.0, -1.0)
    lung_cx = np.where(eff_left, 0.68, 0.32) + p["dx"]
    level = 0.46 + p["dy"] + 0.27 * p["scale"] * 0.45
    meniscus = _c(level) - 0.6 * np.clip((cv.x - _c(lung_cx)) * _c(lat), 0.0, None)
    fluid = np.clip(0.5 + (cv.y - meniscus) * cv.size / 1.5, 0.0, 1.0) * lung * (1.0 - heart)
    img = img + 0.34 * _c(on["pleural_effusion"]) * fluid
    nod = _gauss(cv, _c(p["nodule.x"]), _c(p["nodule.y"]), _c(p["nodule.r"]) * 0.8)
    img = img + 0.03 * subtle * _c(on["nodule"]) * nod
    ang = _c(p["interstitial.angle"])
    u, v = cv.x * np.cos(ang) + cv.y * np.sin(ang), -cv.x * np.sin(ang) + cv.y * np.cos(ang)
    net = 0.5 + 0.5 * np.cos(2 * math.pi * 15 * u) * np.cos(2 * math.pi * 15 * v)
    window = _gauss(cv, _c(p["interstitial.x"]), _c(p["interstitial.y"]), _c(p["interstitial.r"]) * 0.8)
    img = img + 0.05 * subtle * _c(on["interstitial"]) * window * net
    return img[..., None]


def _render_ophthalmology(
    cv: _Canvas, p: Mapping[str, np.ndarray], on: Mapping[str, np.ndarray], subtle: float
) -> np.ndarray:
    m = len(p["dx"])
    rr = (cv.x - 0.5) ** 2 + (cv.y - 0.5) ** 2
    fundus = _ellipse(cv, 0.5, 0.5, 0.47, 0.47, edge_px=1.5)
    img = np.broadcast_to(np.asarray([0.80, 0.34, 0.14], np.float32), (m, cv.size, cv.size, 3)).copy()
    img = img + p["tint"][:, None, None, :]
    shade = (1.0 - 0.35 * rr / 0.47**2) * (1.0 + 0.08 * _grating(cv, p))
    img = img * shade[..., None]
    img = _blend(img, 0.35 * _gauss(cv, _c(p["mac_x"]), _c(p["mac_y"]), 0.06), (0.35, 0.10, 0.05))
    dxd = cv.x - _c(p["cupping.x"])
    dyd = cv.y - _c(p["cupping.y"])
    toward_mac = np.sign(_c(p["mac_x"] - p["cupping.x"]))
    arc = np.sqrt((dxd / 0.42) ** 2 + (dyd / _c(p["arcade_b"])) ** 2)
    temporal = np.clip(dxd * toward_mac * cv.size, 0.0, 1.0)
    nasal = np.sqrt((dxd / 0.14) ** 2 + (dyd / 0.24) ** 2)
    vessels = np.maximum(
        temporal * np.exp(-(((arc - 1.0) * 0.2 / 0.009) ** 2)),
        (1 - temporal) * np.exp(-(((nasal - 1.0) * 0.14 / 0.008) ** 2)),
    )
    img = _blend(img, 0.8 * vessels, (0.50, 0.08, 0.05))
    disc = _ellipse(cv, _c(p["cupping.x"]), _c(p["cupping.y"]), _c(p["disc_r"]), _c(p["disc_r"]) * 1.1, 1.0)
    img = _blend(img, 0.95 * disc, (0.96, 0.78, 0.50))
    cup_r = _c(p["disc_r"] * p["cdr"])
    img = _blend(
        img, 0.95 * _ellipse(cv, _c(p["cupping.x"]), _c(p["cupping.y"]), cup_r, cup_r * 1.1, 1.0), (1.0, 0.96, 0.88)
    )
    img = _blend(img, 0.95 * _spots(cv, p, "hemorrhages", on["hemorrhages"]), (0.36, 0.03, 0.02))
    img = _blend(img, 0.9 * _spots(cv, p, "exudates", on["exudates"]), (0.98, 0.92, 0.40))
    img = _blend(img, 0.1 * subtle * _spots(cv, p, "microaneurysms", on["microaneurysms"]), (0.45, 0.04, 0.03))
    img = _blend(img, 0.05 * subtle * _spots(cv, p, "drusen", on["drusen"]), (0.98, 0.90, 0.45))
    return img * fundus[..., None] + 0.02 * (1.0 - fundus[..., None])


def _render_pathology(
    cv: _Canvas, p: Mapping[str, np.ndarray], on: Mapping[str, np.ndarray], subtle: float
) -> np.ndarray:
    m = len(p["kx"])
    fibres = _grating(cv, p)
    img = np.broadcast_to(np.asarray([0.93, 0.62, 0.78], np.float32), (m, cv.size, cv.size, 3)).copy()
    img = img + p["tint"][:, None, None, :]
    img = img * (1.0 + 0.18 * fibres)[..., None]
    # stromal nuclei lie along the fibres: their intensity follows the signature at their position
    xs, ys = p["bg_nuc_x"], p["bg_nuc_y"]
    along = np.cos(2.0 * math.pi * (p["kx"][:, None] * xs + p["ky"][:, None] * ys) + p["phase"][:, None])
    nuclei = _nuclei(cv, xs, ys, 0.012, 0.2 + 0.8 * (0.5 + 0.5 * along))
    img = _blend(img, 0.7 * nuclei, (0.32, 0.18, 0.52))
    tumor_on = on["tumor"]
    tumor_region = _c(tumor_on) * _gauss(cv, _c(p["tumor.x"]), _c(p["tumor.y"]), _c(p["tumor.r"]) * 0.7)
    img = _blend(img, 0.25 * tumor_region, (0.55, 0.30, 0.62))
    valid = p["tumor.spot_valid"] & tumor_on[:, None]
    big = _nuclei(cv, p["tumor.spot_x"], p["tumor.spot_y"], 0.02, valid)
    img = _blend(img, 0.85 * big, (0.20, 0.08, 0.38))
    hem = _c(on["hemorrhage"]) * _ellipse(
        cv, _c(p["hemorrhage.x"]), _c(p["hemorrhage.y"]), _c(p["hemorrhage.r"]), _c(p["hemorrhage.r"]), 2.0
    )
    img = _blend(img, 0.75 * hem * (0.85 + 0.15 * fibres), (0.86, 0.16, 0.20))
    nec = _c(on["necrosis"]) * _ellipse(
        cv, _c(p["necrosis.x"]), _c(p["necrosis.y"]), _c(p["necrosis.r"]), _c(p["necrosis.r"]), 2.0
    )
    img = _blend(img, 0.8 * nec, (0.97, 0.86, 0.90))
    debris = _nuclei(
        cv, p["necrosis.spot_x"], p["necrosis.spot_y"], 0.006, p["necrosis.spot_valid"] & on["necrosis"][:, None]
    )
    img = _blend(img, 0.7 * debris, (0.35, 0.20, 0.50))
    valid = p["mitoses.spot_valid"] & on["mitoses"][:, None]
    img = _blend(
        img, 0.15 * subtle * _nuclei(cv, p["mitoses.spot_x"], p["mitoses.spot_y"], 0.008, valid), (0.10, 0.03, 0.18)
    )
    valid = p["lymphocytes.spot_valid"] & on["lymphocytes"][:, None]
    img = _blend(
        img,
        0.14 * subtle * _nuclei(cv, p["lymphocytes.spot_x"], p["lymphocytes.spot_y"], 0.008, valid),
        (0.20, 0.10, 0.45),
    )
    return img


def _render_dermatology(
    cv: _Canvas, p: Mapping[str, np.ndarray], on: Mapping[str, np.ndarray], subtle: float
) -> np.ndarray:
    m = len(p["kx"])
    img = np.broadcast_to(np.asarray([0.88, 0.68, 0.58], np.float32), (m, cv.size, cv.size, 3)).copy()
    img = img + p["tint"][:, None, None, :]
    ang = np.arctan2(cv.y - _c(p["les_y"]), cv.x - _c(p["les_x"]))
    wobble = 1.0 + 0.08 * np.sin(3 * ang + _c(p["les_wobble"]))
    lesion = _ellipse(cv, _c(p["les_x"]), _c(p["les_y"]), _c(p["les_rx"]) * wobble, _c(p["les_ry"]) * wobble, 2.0)
    img = _blend(img, 0.85 * lesion, (0.45, 0.28, 0.18))
    img = img * (1.0 + 0.08 * _grating(cv, p))[..., None]  # skin lines run across skin and lesion
    veil = _c(on["veil"]) * _gauss(cv, _c(p["veil.x"]), _c(p["veil.y"]), _c(p["veil.r"]) * 0.7)
    img = _blend(img, 0.85 * veil, (0.55, 0.62, 0.78))
    img = _blend(img, 0.9 * _spots(cv, p, "globules", on["globules"]), (0.18, 0.09, 0.06))
    img = _blend(img, 0.9 * _spots(cv, p, "milia", on["milia"]), (0.97, 0.95, 0.88))
    reg = _c(on["regression"]) * _gauss(cv, _c(p["regression.x"]), _c(p["regression.y"]), _c(p["regression.r"]) * 0.6)
    img = _blend(img, 0.03 * subtle * reg, (0.95, 0.92, 0.92))
    img = _blend(img, 0.14 * subtle * _spots(cv, p, "dotted_vessels", on["dotted_vessels"]), (0.80, 0.10, 0.15))
    return img


_RENDER: dict[str, Callable[[_Canvas, Mapping[str, np.ndarray], Mapping[str, np.ndarray], float], np.ndarray]] = {
    "radiology": _render_radiology,
    "ophthalmology": _render_ophthalmology,
    "pathology": _render_pathology,
    "dermatology": _render_dermatology,
}


def render_images(spec: DomainSpec, cases: _Cases, cfg: SyntheticDataConfig, noise_seed: Sequence[int]) -> np.ndarray:
    """Render every case of a domain as uint8 (n, H, W, C), in fixed-size chunks with per-chunk noise streams."""
    cv = _Canvas.make(cfg.image_size)
    n = len(cases.phenotype)
    out = np.empty((n, cfg.image_size, cfg.image_size, spec.channels), np.uint8)
    starts = range(0, n, CHUNK)
    bar = tqdm(starts, desc=f"render {spec.name}", unit="chunk", disable=n < _PROGRESS_MIN_CASES)
    for start in bar:
        sl = slice(start, min(start + CHUNK, n))
        params = {k: v[sl] for k, v in cases.params.items()}
        on = {k: v[sl] for k, v in cases.present.items()}
        img = _RENDER[spec.name](cv, params, on, cfg.subtle_contrast)
        img = img * _c(params["gain"])[..., None] + _c(params["offset"])[..., None]
        noise_rng = np.random.default_rng(np.random.SeedSequence([*noise_seed, start // CHUNK]))
        img = img + _noise(cv, img.shape, noise_rng)
        out[sl] = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 1) -> "L" PNG, (H, W, 3) -> "RGB" PNG."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W, C) with C = 1 (grayscale) or 3."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16") else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------------------- text and records


@dataclass(frozen=True)
class CaseRecord:
    """Ground truth of one generated case."""

    case_id: str
    domain: str
    split: str
    phenotype: int
    findings: dict[str, bool]
    deviates: tuple[str, ...]
    """Subtle findings where this case differs from its phenotype (retrieval misleads on those)."""
    attributes: dict[str, str]
    geometry: dict[str, dict[str, float]]
    """Per finding, the region where it is (or would be) rendered: centre x, y and radius r, normalised."""
    report: str
    questions: dict[str, str]
    """Per finding, the closed question asked about it (one phrasing variant chosen by the seed)."""

    def meta(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "phenotype": self.phenotype,
            "findings": dict(self.findings),
            "deviates": list(self.deviates),
            "attributes": dict(self.attributes),
            "geometry": {k: dict(v) for k, v in self.geometry.items()},
            "generator": f"{SOURCE}/v{GENERATOR_VERSION}",
        }


def _attributes(spec: DomainSpec, params: Mapping[str, np.ndarray], i: int) -> dict[str, str]:
    """Case attributes used in report templates; ``finding.name`` keys apply to that finding's sentence."""
    side = {True: "left", False: "right"}
    if spec.name == "radiology":
        return {f"{k}.side": side[bool(params[f"{k}.side"][i])] for k in ("pleural_effusion", "nodule", "interstitial")}
    if spec.name == "ophthalmology":
        return {"eye": "right" if params["right_eye"][i] else "left", "cdr": f"{float(params['cdr'][i]):.1f}"}
    return {}


def _template_values(attrs: Mapping[str, str], finding: str | None) -> dict[str, str]:
    values = {k: v for k, v in attrs.items() if "." not in k}
    if finding is not None:
        prefix = f"{finding}."
        values.update({k[len(prefix) :]: v for k, v in attrs.items() if k.startswith(prefix)})
    return values


def _report(
    spec: DomainSpec, pattern: str, findings: Mapping[str, bool], attrs: Mapping[str, str], rng: np.random.Generator
) -> str:
    sentences = [spec.openers[rng.integers(len(spec.openers))].format(**_template_values(attrs, None))]
    sentences.append(signature_sentence(spec, pattern))
    for f in spec.findings:
        options = f.positive if findings[f.key] else f.negative
        sentences.append(options[rng.integers(len(options))].format(**_template_values(attrs, f.key)))
    sentences.append(spec.closers[rng.integers(len(spec.closers))])
    return " ".join(sentences)


def _geometry(spec: DomainSpec, params: Mapping[str, np.ndarray], i: int) -> dict[str, dict[str, float]]:
    return {f.key: {a: round(float(params[f"{f.key}.{a}"][i]), 4) for a in ("x", "y", "r")} for f in spec.findings}


@dataclass(frozen=True)
class DomainData:
    """One domain's phenotypes, generated cases and their PNG images (aligned with ``cases``)."""

    spec: DomainSpec
    phenotypes: list[Phenotype]
    cases: list[CaseRecord]
    images: list[bytes]


def generate_domain(domain: str, cfg: SyntheticDataConfig) -> DomainData:
    """Generate one domain; its content depends only on (config, domain), not on the other domains listed."""
    spec = _spec(domain)
    dom = DOMAINS.index(domain)
    pheno_ss, case_ss, text_ss = np.random.SeedSequence([cfg.seed, dom]).spawn(3)
    phenotypes = _make_phenotypes(spec, cfg, np.random.default_rng(pheno_ss))
    cases = _draw_cases(spec, cfg, phenotypes, np.random.default_rng(case_ss))
    pixels = render_images(spec, cases, cfg, noise_seed=(cfg.seed, dom, 99))
    images = [encode_png(img) for img in pixels]
    text_rng = np.random.default_rng(text_ss)
    records = []
    for i in range(len(cases.phenotype)):
        findings = {f.key: bool(cases.present[f.key][i]) for f in spec.findings}
        attrs = _attributes(spec, cases.params, i)
        records.append(
            CaseRecord(
                case_id=f"{SOURCE}-{domain}-{i:05d}",
                domain=domain,
                split=SPLITS[int(cases.split[i])],
                phenotype=int(cases.phenotype[i]),
                findings=findings,
                deviates=tuple(k for k in spec.keys("subtle") if cases.deviates[k][i]),
                attributes=attrs,
                geometry=_geometry(spec, cases.params, i),
                report=_report(spec, phenotypes[int(cases.phenotype[i])].pattern, findings, attrs, text_rng),
                questions={f.key: f.questions[text_rng.integers(len(f.questions))] for f in spec.findings},
            )
        )
    return DomainData(spec, phenotypes, records, images)


def case_samples(record: CaseRecord, image: bytes, spec: DomainSpec) -> list[Sample]:
    """The samples of one case: a closed yes/no question per finding, then one report-generation sample."""
    base = record.meta()
    out = []
    for j, f in enumerate(spec.findings):
        meta = {**base, "finding": f.key, "finding_kind": f.kind}
        out.append(
            Sample(
                id=f"{record.case_id}-q{j}",
                domain=record.domain,
                split=record.split,
                source=SOURCE,
                text=record.report,
                question=record.questions[f.key],
                answer="yes" if record.findings[f.key] else "no",
                answer_type="closed",
                image_bytes=image,
                image_available=True,
                meta=dumps_meta(meta),
            )
        )
    out.append(
        Sample(
            id=f"{record.case_id}-report",
            domain=record.domain,
            split=record.split,
            source=SOURCE,
            text=record.report,
            answer_type="report",
            image_bytes=image,
            image_available=True,
            meta=dumps_meta(base),
        )
    )
    return out


def corpus_doc(record: CaseRecord, image: bytes) -> CorpusDoc:
    """A train-split case as a retrievable document (its report and image)."""
    if record.split != "train":
        raise ValueError(f"case {record.case_id} is in split {record.split!r}; the corpus holds train cases only")
    return CorpusDoc(
        id=record.case_id,
        domain=record.domain,
        split=record.split,
        source=SOURCE,
        text=record.report,
        image_bytes=image,
        image_available=True,
        meta=dumps_meta(record.meta()),
    )


# ----------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class SyntheticDataset:
    """The generated dataset in memory: samples per split, the retrieval corpus (train split, all domains;
    filter by ``domain`` for one domain's index) and the ground truth."""

    config: SyntheticDataConfig
    samples: dict[str, list[Sample]]
    corpus: list[CorpusDoc]
    cases: list[CaseRecord]
    phenotypes: dict[str, list[Phenotype]]

    def corpus_for(self, domain: str) -> list[CorpusDoc]:
        return [d for d in self.corpus if d.domain == domain]

    def counts(self) -> dict[str, Any]:
        """Counts per domain / split / answer type (closed answers split into yes and no)."""
        samples: dict[str, dict[str, dict[str, int]]] = {}
        for split, rows in self.samples.items():
            for s in rows:
                kind = f"closed_{s.answer}" if s.answer_type == "closed" else s.answer_type
                by_split = samples.setdefault(s.domain, {}).setdefault(split, {})
                by_split[kind] = by_split.get(kind, 0) + 1
        cases = Counter((c.domain, c.split) for c in self.cases)
        return {
            "samples": {d: {sp: dict(sorted(v.items())) for sp, v in by.items()} for d, by in samples.items()},
            "cases": {d: {sp: cases[(d, sp)] for sp in SPLITS} for d in self.config.domains},
            "corpus": dict(sorted(Counter(d.domain for d in self.corpus).items())),
            "samples_per_split": {sp: len(self.samples[sp]) for sp in SPLITS},
        }


def generate(cfg: SyntheticDataConfig) -> SyntheticDataset:
    """Generate the whole dataset for ``cfg`` (deterministic in ``cfg``)."""
    samples: dict[str, list[Sample]] = {sp: [] for sp in SPLITS}
    corpus: list[CorpusDoc] = []
    cases: list[CaseRecord] = []
    phenotypes: dict[str, list[Phenotype]] = {}
    for domain in cfg.domains:
        data = generate_domain(domain, cfg)
        phenotypes[domain] = data.phenotypes
        for record, image in zip(data.cases, data.images, strict=True):
            cases.append(record)
            samples[record.split].extend(case_samples(record, image, data.spec))
            if record.split == "train":
                corpus.append(corpus_doc(record, image))
        logger.info("generated %s: %d cases, %d phenotypes", domain, len(data.cases), len(data.phenotypes))
    return SyntheticDataset(cfg, samples, corpus, cases, phenotypes)


def manifest(ds: SyntheticDataset, files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The dataset's manifest: config, counts, vocabulary, ground truth, phenotypes, file hashes."""
    content = hashlib.sha256()
    for name in sorted(files):
        content.update(f"{name}:{files[name]['sha256']}\n".encode())
    return {
        "format": "medrag-ray synthetic dataset",
        "generator_version": GENERATOR_VERSION,
        "source": SOURCE,
        "config": to_dict(ds.config),
        "content_hash": content.hexdigest(),
        "files": {name: dict(files[name]) for name in sorted(files)},
        "counts": ds.counts(),
        "negation_cues": list(NEGATION_CUES),
        "vocabulary": {d: vocabulary(d) for d in ds.config.domains},
        "phenotypes": {d: [p.as_dict() for p in ps] for d, ps in ds.phenotypes.items()},
        "cases": [
            {
                "case_id": c.case_id,
                "domain": c.domain,
                "split": c.split,
                "phenotype": c.phenotype,
                "findings": dict(c.findings),
                "deviates": list(c.deviates),
            }
            for c in ds.cases
        ],
    }



def write_split_samples(samples: Mapping[str, list[Sample]], directory: Path) -> dict[str, dict[str, Any]]:
    """Write ``samples_<split>.parquet`` for every split into ``directory``; returns rows and sha256 per file."""
    files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        name = samples_name(split)
        rows = write_parquet(samples[split], Sample, directory / name)
        files[name] = {"rows": rows, "sha256": sha256_file(directory / name)}
    return files


def write_dataset(ds: SyntheticDataset, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the dataset atomically (:func:`~medrag_ray.utils.atomic_output_dir`): a crash never leaves a
    half-written dataset, and an existing one is replaced only once the new one is complete."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        files = write_split_samples(ds.samples, tmp)
        rows = write_parquet(ds.corpus, CorpusDoc, tmp / CORPUS_NAME)
        files[CORPUS_NAME] = {"rows": rows, "sha256": sha256_file(tmp / CORPUS_NAME)}
        text = json.dumps(manifest(ds, files), indent=1, sort_keys=True, ensure_ascii=False)
        (tmp / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
    return Path(out_dir)


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read a written dataset's manifest (raises naming the job that makes it when absent)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; generate the dataset with `python jobs/make_data.py out_dir={out_dir}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))
