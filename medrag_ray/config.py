"""Job configuration: frozen dataclasses validated in ``__post_init__``, loaded from YAML + dotted overrides.

Every job has one config class here and one or more YAML files under ``jobs/configs/``. A job is launched
as ``python jobs/<job>.py [--config FILE] [section.key=value ...]``; overrides are parsed as YAML scalars
(``data.n_per_domain=50``, ``ray.num_cpus=4``, ``domains=[radiology,pathology]``) and checked against
the dataclass field types, so a typo or a wrong type fails before any work starts, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medrag_ray.data.schema import DOMAINS
from medrag_ray.models.configs import DualEncoderConfig, ReaderConfig
from medrag_ray.retrieval.retrieval_config import RetrievalConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


# --------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """How a job reaches Ray. Only ``jobs/`` and ``serve/`` read this; the core never imports ray."""

    address: str = ""
    """``""`` starts a local Ray; ``auto`` joins the running cluster (what ``ray job submit`` gives)."""
    num_cpus: int = 0
    """Logical CPUs for a local Ray (0 = detect). Has no effect when joining a cluster."""
    auth_mode: str = "disabled"
    """Ray's token auth (``RAY_AUTH_MODE``): ``disabled`` for local runs, ``token`` on a shared cluster."""
    actor_num_cpus: float = 0.5
    """CPUs per actor in Ray Data actor pools; fractional so read tasks still run on 2 cores."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ConfigError(f"ray.num_cpus must be >= 0 (0 = detect), got {self.num_cpus}")
        if self.auth_mode not in ("disabled", "token"):
            raise ConfigError(f"ray.auth_mode must be 'disabled' or 'token', got {self.auth_mode!r}")
        if not 0 < self.actor_num_cpus <= 64:
            raise ConfigError(f"ray.actor_num_cpus must be in (0, 64], got {self.actor_num_cpus}")


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    """The embedded default dataset (see :mod:`medrag_ray.data.synthetic`)."""

    domains: tuple[str, ...] = ("radiology", "ophthalmology", "pathology")
    n_per_domain: int = 240
    """Cases per domain, split into train/val/test by ``split_fractions``."""
    n_phenotypes: int = 6
    """Latent phenotypes per domain; cases of one phenotype share subtle findings (what retrieval carries)."""
    image_size: int = 64
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    subtle_consistency: float = 0.9
    """Probability that a case has its phenotype's value of a subtle finding (the rest deviate: there,
    retrieved same-phenotype reports mislead)."""
    subtle_contrast: float = 1.0
    """Scale of the subtle findings' rendering contrast (0 = not drawn at all; ~4 makes them plainly visible)."""

    def __post_init__(self) -> None:
        if len(self.domains) < 1 or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"data.domains must be distinct and non-empty, got {list(self.domains)}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ConfigError(f"data.domains has unknown domains {unknown}; choose from {list(DOMAINS)}")
        if self.n_per_domain < 10:
            raise ConfigError(f"data.n_per_domain must be >= 10 to fill three splits, got {self.n_per_domain}")
        if self.n_phenotypes < 2:
            raise ConfigError(f"data.n_phenotypes must be >= 2, got {self.n_phenotypes}")
        if self.n_per_domain < 3 * self.n_phenotypes:
            raise ConfigError(
                f"data.n_per_domain ({self.n_per_domain}) must be >= 3 * data.n_phenotypes "
                f"({3 * self.n_phenotypes}) so every phenotype has a case in each split; raise n_per_domain "
                "or lower n_phenotypes"
            )
        if not 0.5 <= self.subtle_consistency <= 1.0:
            raise ConfigError(f"data.subtle_consistency must be in [0.5, 1], got {self.subtle_consistency}")
        if not 0.0 <= self.subtle_contrast <= 10.0:
            raise ConfigError(f"data.subtle_contrast must be in [0, 10], got {self.subtle_contrast}")
        if not 16 <= self.image_size <= 512:
            raise ConfigError(f"data.image_size must be in [16, 512], got {self.image_size}")
        if len(self.split_fractions) != 3 or any(f <= 0 for f in self.split_fractions):
            raise ConfigError(f"data.split_fractions must be three positive numbers, got {self.split_fractions}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ConfigError(f"data.split_fractions must sum to 1, got {sum(self.split_fractions)}")


# ------------------------------------------------------------------------------------- job configs


@dataclasses.dataclass(frozen=True)
class MakeDataConfig:
    """``jobs/make_data.py``: generate the embedded synthetic dataset."""

    out_dir: str = "artifacts/data/synthetic"
    """Output directory (absolute paths recommended under ``ray job submit``, which runs in a copy)."""
    overwrite: bool = False
    """Replace an existing dataset in ``out_dir``; without it, an existing one is an error."""
    data: SyntheticDataConfig = SyntheticDataConfig()

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise ConfigError("out_dir must be a directory path, got an empty string")


# ----------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``key`` otherwise.

    A mapping given for a nested config section overrides only the keys it names: the others keep the
    section's default (``default``), not the section class's own defaults.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.", base=default)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}: {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "", base: Any = None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    names = list(fields)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(names)}"
        )
    kwargs: dict[str, Any] = {}
    for name in names:
        current = getattr(base, name) if base is not None else _field_default(fields[name])
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{prefix}{name}", current)
        elif base is not None:
            kwargs[name] = current
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> None:
    """Set each dotted ``key=value`` override in the nested mapping ``tree`` (sections created as needed)."""
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus dotted ``key=value`` overrides, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML with --config")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
    apply_overrides(tree, overrides)
    where = f" (from {path})" if path else ""
    try:
        return _build(cls, tree)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_job_args(cls: type[T], argv: Sequence[str] | None, default_config: str | Path | None = None) -> T:
    """Parse ``[--config FILE] [key=value ...]`` for a job; ``default_config`` is used without --config."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    parser.add_argument("--config", default=None, help="YAML config file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as data.n_per_domain=50")
    args = parser.parse_args(argv)
    path = args.config if args.config is not None else default_config
    return load_config(cls, path, args.overrides)


@dataclasses.dataclass(frozen=True)
class ConvertDataConfig:
    """``jobs/convert_data.py``: convert one real source, unchanged, into schema records (Parquet)."""

    source: str = "vqa_rad"
    """Source name, one of ``medrag_ray.data.readers.SOURCE_NAMES``."""
    input_path: str = ""
    """Source file or folder; ``""`` = the source's default location in the shared data folder."""
    image_root: str = ""
    """Folder holding the source's images (``""`` = the source's default: beside the files, or none)."""
    out_path: str = ""
    """Output Parquet file; ``""`` = ``artifacts/data/converted/<source>.parquet``."""
    skip_bad: bool = False
    """Reject bad records into ``rejects_path`` and go on (else the first bad record stops the job)."""
    rejects_path: str = ""
    """``""`` = ``<out_path stem>.rejects.jsonl`` next to the output."""
    missing_images_path: str = ""
    """``""`` = ``<out_path stem>.missing_images.jsonl`` next to the output."""
    limit: int = 0
    """Stop after this many kept records (0 = all)."""
    check_images: bool = True
    """Decode every image that is found (unreadable ones are bad records)."""
    embed_images: bool = False
    """Store the image file bytes in ``image_bytes`` (self-contained output for a cluster)."""
    domain: str = ""
    """Override the domain where the source infers it (MMed-RAG); ``""`` = infer."""
    split: str = ""
    """Override the split where the source allows it; ``""`` = the source's rule."""

    def __post_init__(self) -> None:
        from medrag_ray.data.readers.registry import SOURCE_NAMES
        from medrag_ray.data.schema import SPLITS

        if self.source not in SOURCE_NAMES:
            raise ConfigError(f"source must be one of {list(SOURCE_NAMES)}, got {self.source!r}")
        if self.out_path and not self.out_path.endswith(".parquet"):
            raise ConfigError(f"out_path must end with .parquet, got {self.out_path!r}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all records), got {self.limit}")
        if self.domain and self.domain not in DOMAINS:
            raise ConfigError(f"domain must be '' (infer) or one of {list(DOMAINS)}, got {self.domain!r}")
        if self.split and self.split not in SPLITS:
            raise ConfigError(f"split must be '' (source rule) or one of {list(SPLITS)}, got {self.split!r}")
        if self.rejects_path and not self.skip_bad:
            raise ConfigError("rejects_path is set but skip_bad is false; set skip_bad=true to write rejects")

    def output_path(self) -> str:
        return self.out_path or f"artifacts/data/converted/{self.source}.parquet"


# ------------------------------------------------------------------------- models and the pipeline


@dataclasses.dataclass(frozen=True)
class TinyModelsConfig:
    """Sizes of the tiny offline models the pipeline builds when no real weights are given."""

    tokenizer_vocab_size: int = 2048
    """BPE vocabulary trained offline on the dataset's reports, questions and answers."""
    encoder: DualEncoderConfig = DualEncoderConfig()
    """The CLIP-style dual encoder: retriever R_d and the router's image tower."""
    reader: ReaderConfig = ReaderConfig(image_size=64, patch_size=8, max_length=768)
    """The LLaVA-style reader M."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 300 <= self.tokenizer_vocab_size <= 65536:
            raise ConfigError(f"models.tokenizer_vocab_size must be in [300, 65536], got {self.tokenizer_vocab_size}")


@dataclasses.dataclass(frozen=True)
class PrepareModelsConfig:
    """``jobs/prepare_models.py``: train the tokenizer and build the initial tiny models for a dataset."""

    dataset_dir: str = "artifacts/data/synthetic"
    """A dataset written by ``jobs/make_data.py`` (or converted samples + corpus in the same layout)."""
    out_dir: str = "artifacts/models/init"
    overwrite: bool = False
    """Replace existing models in ``out_dir``; without it, an existing one is an error."""
    models: TinyModelsConfig = TinyModelsConfig()

    def __post_init__(self) -> None:
        for name in ("dataset_dir", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a directory path, got an empty string")


@dataclasses.dataclass(frozen=True)
class ConvertLlavaMedConfig:
    """``jobs/convert_llava_med.py``: the original LLaVA-Med v1.5 checkpoint -> llava-hf (what ``load_reader`` reads);
    see :mod:`medrag_ray.models.convert_llava_med`."""

    src_dir: str = "checkpoints/llava-med-v1.5-mistral-7b"
    """The original release as downloaded (config.json with ``model_type: llava_mistral``, weights, tokenizer)."""
    vision_tower_dir: str = "checkpoints/clip-vit-large-patch14-336"
    """The local CLIP tower its ``mm_vision_tower`` names, in Hugging Face format (config, image processor, and
    the weights when the checkpoint has no tower)."""
    out_dir: str = "checkpoints/llava-med-v1.5-mistral-7b-hf"
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` keeps the checkpoint's ``torch_dtype``."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("src_dir", "vision_tower_dir", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a directory path, got an empty string")
        if Path(self.out_dir).resolve() == Path(self.src_dir).resolve():
            raise ConfigError("out_dir must differ from src_dir: the original checkpoint is kept as it is")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


# ------------------------------------------- real-data routing set, router and retrieval evaluation (issue 3)


ROUTING_SOURCE_NAMES: tuple[str, ...] = (
    "vqa_rad", "medpix2", "pathvqa", "retinamnist", "pneumoniamnist", "dermamnist",
)  # fmt: skip
"""Sources of the real-data routing dataset (``medrag_ray.data.routing.ROUTING_SOURCES`` describes each)."""


@dataclasses.dataclass(frozen=True)
class RoutingDataConfig:
    """What goes into the real-data domain-routing dataset (see :mod:`medrag_ray.data.routing`)."""

    sources: tuple[str, ...] = ROUTING_SOURCE_NAMES
    """Sources, by their ``Sample.source`` name."""
    max_per_source_split: int = 400
    """At most this many images per (source, split), a deterministic hash sample; 0 = no cap."""
    val_fraction: float = 0.1
    """Share of a source's train images carved into val (by image hash) where the source has no val (VQA-RAD)."""
    seed: int = 0
    """Seed of the capped sampling (the split of an image never depends on it)."""
    max_image_side: int = 0
    """0 = keep each image's original encoded bytes; > 0 = downscale larger images to this side (PNG)."""
    skip_bad: bool = False
    """Skip (and count) bad records and undecodable images instead of stopping at the first."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in ROUTING_SOURCE_NAMES]
        if unknown or not self.sources or len(set(self.sources)) != len(self.sources):
            raise ConfigError(
                f"data.sources must be distinct names from {list(ROUTING_SOURCE_NAMES)}, got {list(self.sources)}"
            )
        if self.max_per_source_split < 0:
            raise ConfigError(f"data.max_per_source_split must be >= 0 (0 = no cap), got {self.max_per_source_split}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_image_side != 0 and self.max_image_side < 16:
            raise ConfigError(f"data.max_image_side must be 0 (keep) or >= 16, got {self.max_image_side}")


@dataclasses.dataclass(frozen=True)
class MakeRoutingDataConfig:
    """``jobs/make_routing_data.py``: build the real-data domain-routing dataset from the shared data folder."""

    shared_dir: str = ""
    """The real-data folder; ``""`` = ``$MEDRAG_SHARED_DATA`` or ``../shared/data`` beside the checkout."""
    out_dir: str = "artifacts/data/routing_real"
    overwrite: bool = False
    """Replace an existing dataset in ``out_dir``; without it, an existing one is an error."""
    data: RoutingDataConfig = RoutingDataConfig()

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise ConfigError("out_dir must be a directory path, got an empty string")


RETRIEVAL_EVAL_SETS: tuple[str, ...] = ("synthetic", "medpix")
"""Image->text evaluation sets: the synthetic test reports (per domain) and MedPix test captions (radiology)."""


def _default_eval_encoders() -> dict[str, str]:
    return {
        "trained": "artifacts/models/retriever",
        "untrained": "artifacts/models/init/encoder",
        "domain_agnostic": "artifacts/models/retriever_all",
    }


@dataclasses.dataclass(frozen=True)
class EvalRetrievalConfig:
    """``jobs/eval_retrieval.py``: image->text recall@k per domain for several named encoders."""

    encoders: dict[str, str] = dataclasses.field(default_factory=_default_eval_encoders)
    """name -> a dual-encoder dir (one encoder for every domain) or a dir of ``<domain>/`` dual-encoder dirs."""
    eval_sets: tuple[str, ...] = RETRIEVAL_EVAL_SETS
    synthetic_path: str = "artifacts/data/synthetic/samples_test.parquet"
    """Samples whose ``answer_type == "report"`` rows give the (image, report) pairs."""
    medpix_dir: str = ""
    """MedPix 2.0 folder (``descriptions_test.jsonl`` + ``images/``); ``""`` = ``<shared data>/medpix2``."""
    domains: tuple[str, ...] = ()
    """Evaluate only these domains (empty = every domain an eval set has)."""
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 64
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when present)."""
    out_dir: str = "artifacts/eval"
    """Writes ``retrieval.json`` and ``retrieval.md`` here."""

    def __post_init__(self) -> None:
        if not self.encoders:
            raise ConfigError("encoders is empty; give at least one name: path, e.g. encoders={untrained: DIR}")
        for name, path in self.encoders.items():
            if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
                raise ConfigError(f"encoders must map non-empty names to directory paths, got {name!r}: {path!r}")
        unknown = [s for s in self.eval_sets if s not in RETRIEVAL_EVAL_SETS]
        if unknown or not self.eval_sets or len(set(self.eval_sets)) != len(self.eval_sets):
            raise ConfigError(
                f"eval_sets must be distinct names from {list(RETRIEVAL_EVAL_SETS)}, got {list(self.eval_sets)}"
            )
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ConfigError(f"domains has unknown domains {bad}; choose from {list(DOMAINS)} (or [] for all)")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"ks must be distinct positive integers, got {list(self.ks)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.out_dir.strip():
            raise ConfigError("out_dir must be a directory path, got an empty string")


@dataclasses.dataclass(frozen=True)
class EvalRouterConfig:
    """``jobs/eval_router.py``: domain-router accuracy, per-domain precision/recall and confusion on a split."""

    router_dir: str = "artifacts/models/router"
    """A router saved by ``save_router`` (``artifacts/models/init/router`` is the untrained one)."""
    dataset_dir: str = "artifacts/data/routing_real"
    """A dir with ``samples_<split>.parquet`` (``jobs/make_routing_data.py`` or ``jobs/make_data.py``)."""
    split: str = "test"
    batch_size: int = 64
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when present)."""
    out_dir: str = "artifacts/eval"
    """Writes ``router_<dataset dir name>.json`` / ``.md`` here (``_<split>`` appended unless test)."""

    def __post_init__(self) -> None:
        from medrag_ray.data.schema import SPLITS

        for name in ("router_dir", "dataset_dir", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a directory path, got an empty string")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


# ------------------------------------------------------------- training jobs: router and retrievers (issue 3)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
GPU_USE: tuple[str, ...] = ("auto", "never", "always")


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """Optimisation settings of a training job: AdamW, linear warmup then cosine decay, DeepSpeed ZeRO."""

    epochs: int = 30
    batch_size: int = 32
    """Examples per worker per step (the global batch is ``batch_size * ray_train.num_workers``)."""
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    """Share of all steps spent warming up; kept below 0.5 so warmup can never outlast the run (a known
    pitfall of the reference code: 10,000 warmup steps in a shorter run left recall@1 near zero)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = none)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (1 and 2 shard optimizer state / gradients; 3 also parameters)."""
    precision: str = "auto"
    """``auto`` = bf16 on GPU workers, fp32 on CPU workers; or ``fp32`` / ``bf16``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(
                f"train.batch_size must be >= 2 (contrastive losses need negatives), got {self.batch_size}"
            )
        if not 0 < self.lr < 1:
            raise ConfigError(f"train.lr must be in (0, 1), got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 0.5:
            raise ConfigError(f"train.warmup_fraction must be in [0, 0.5), got {self.warmup_fraction}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 = none), got {self.grad_clip}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True)
class RayTrainConfig:
    """How a training job runs on Ray Train (``TorchTrainer``)."""

    num_workers: int = 2
    """Data-parallel workers (one GPU each on GPU nodes)."""
    use_gpu: str = "auto"
    """``auto`` = GPU workers when the cluster has GPUs; ``never``; ``always`` (waits for GPU nodes)."""
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    """Worker failures (a killed process, a lost node) recovered from the last checkpoint; -1 = unlimited."""
    storage_path: str = "artifacts/ray_train"
    """Where runs keep checkpoints: a local path (made absolute) or a URI (``s3://...``) that every node
    can reach. A re-run with the same run name resumes from that run's last checkpoint."""
    num_to_keep: int = 2
    """Checkpoints kept per run (the newest)."""
    resume: bool = True
    """Resume a run with the same name from its last checkpoint; false deletes that run's folder first."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"ray_train.num_workers must be >= 1, got {self.num_workers}")
        if self.use_gpu not in GPU_USE:
            raise ConfigError(f"ray_train.use_gpu must be one of {list(GPU_USE)}, got {self.use_gpu!r}")
        if not 0 < self.cpus_per_worker <= 256:
            raise ConfigError(f"ray_train.cpus_per_worker must be in (0, 256], got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"ray_train.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if not self.storage_path.strip():
            raise ConfigError("ray_train.storage_path must be a path or URI, got an empty string")
        if self.num_to_keep < 1:
            raise ConfigError(f"ray_train.num_to_keep must be >= 1, got {self.num_to_keep}")


def _check_domains_field(name: str, domains: tuple[str, ...]) -> None:
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or len(set(domains)) != len(domains):
        raise ConfigError(f"{name} must be distinct names from {list(DOMAINS)} (or [] = all), got {list(domains)}")


@dataclasses.dataclass(frozen=True)
class TrainRetrieverConfig:
    """``jobs/train_retriever.py``: fine-tune one retriever R_d per domain with the InfoNCE of Eq. 1."""

    dataset_dir: str = "artifacts/data/synthetic"
    """Needs ``corpus.parquet`` (train pairs) and ``samples_val.parquet`` (validation reports)."""
    init_encoder_dir: str = "artifacts/models/init/encoder"
    """The dual encoder every retriever starts from: the tiny init encoder or a real open_clip/BiomedCLIP dir."""
    out_dir: str = "artifacts/models/retriever"
    """Receives ``<domain>/`` (one dual-encoder dir each) and ``metrics.json``; with ``domain_agnostic``
    the single retriever is written to ``out_dir`` itself."""
    domains: tuple[str, ...] = ()
    """Domains to train (``[]`` = every domain in the corpus)."""
    domain_agnostic: bool = False
    """Train one retriever on every domain's pairs (the baseline MMed-RAG's per-domain R_d improves on)."""
    run_name: str = "retriever"
    """Ray Train run name prefix; runs are ``<run_name>-<domain>`` (``-all`` when domain-agnostic)."""
    overwrite: bool = False
    train: TrainLoopConfig = TrainLoopConfig()
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("dataset_dir", "init_encoder_dir", "out_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        _check_domains_field("domains", self.domains)


@dataclasses.dataclass(frozen=True)
class TrainRouterConfig:
    """``jobs/train_router.py``: fine-tune the domain router F(x_v) (image tower + linear head)."""

    dataset_dir: str = "artifacts/data/synthetic"
    """Needs ``samples_train.parquet`` and ``samples_val.parquet`` (Sample rows with inline images; the
    label is ``domain``); the real-data set of ``jobs/make_routing_data.py`` has the same layout."""
    init_encoder_dir: str = "artifacts/models/init/encoder"
    out_dir: str = "artifacts/models/router"
    domains: tuple[str, ...] = ()
    """The router's classes (``[]`` = every domain in the training split)."""
    unknown_keep: float = 1.0
    """Share of the validation images (all of known domains) whose calibrated confidence must stay above the
    unknown-domain threshold; images under it route to "unknown". 1 (default) = no threshold: measured, it caught
    no image of a domain the router never saw and flagged 3.5% of in-domain synthetic test images (see README).
    Images whose top domain has no index route to "unknown" whatever this is."""
    run_name: str = "router"
    overwrite: bool = False
    train: TrainLoopConfig = TrainLoopConfig(epochs=6, lr=5e-4)
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        if not 0.5 <= self.unknown_keep <= 1.0:
            raise ConfigError(
                f"unknown_keep must be in [0.5, 1] (1 = no confidence threshold), got {self.unknown_keep}"
            )
        for name in ("dataset_dir", "init_encoder_dir", "out_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        _check_domains_field("domains", self.domains)


# ------------------------------------------------------------------ embedding + index build (issue 3)

INDEX_JOB_MODES: tuple[str, ...] = ("build", "add")
EMBED_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class BuildIndexConfig:
    """``jobs/build_index.py``: embed a corpus with Ray Data and build (or extend) the per-domain FAISS indexes.

    Encoders: ``encoder_dir``, when set, embeds every domain (e.g. ``artifacts/models/init/encoder``, the
    untrained baseline, or ``artifacts/models/retriever_all``) and ``retrievers_dir`` is ignored; otherwise
    each domain ``d`` uses ``retrievers_dir/d/`` (``jobs/train_retriever.py``).
    """

    corpus_path: str = "artifacts/data/synthetic/corpus.parquet"
    """A Parquet file or folder of CorpusDoc rows; with ``mode=add``, only the documents to add."""
    out_dir: str = "artifacts/index"
    """The index store (manifest.json, text/, image/, embeddings/, docs/, rejects.jsonl)."""
    retrievers_dir: str = "artifacts/models/retriever"
    """One ``<domain>/`` dual-encoder directory per domain (the trained retrievers R_d)."""
    encoder_dir: str = ""
    """One dual encoder for every domain; when set it takes precedence over ``retrievers_dir``."""
    mode: str = "build"
    """``build``: write a new store (atomically); ``add``: append documents to the store in ``out_dir``."""
    overwrite: bool = False
    """``mode=build``: replace an existing store (only once the new one is complete)."""
    domains: tuple[str, ...] = ()
    """Index only these domains (``[]`` = every domain in the corpus)."""
    image_root: str = ""
    """Folder that relative ``image_path`` values are resolved against (``""`` = as given)."""
    device: str = "auto"
    """Where each actor embeds: ``auto`` (CUDA when the actor has a GPU), ``cpu`` or ``cuda``."""
    batch_size: int = 64
    """Documents per encoder forward pass (and per Ray Data block sent to an actor)."""
    num_actors: int = 2
    """Embedding actors per domain (each loads the encoder once; one GPU each on GPU clusters)."""
    max_actors: int = 0
    """0 = a fixed pool of ``num_actors``; > num_actors = an autoscaling pool ``(num_actors, max_actors)``."""
    index: Any = None
    """FAISS settings: ``medrag_ray.retrieval.index.IndexConfig`` fields (``index.kind=hnsw``, ``index.nlist``,
    ...); ``None`` = IndexConfig() defaults (exact flat inner product). Ignored by ``mode=add``, which keeps
    the existing indexes' settings."""
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        for name in ("corpus_path", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a path, got an empty string")
        if not self.encoder_dir.strip() and not self.retrievers_dir.strip():
            raise ConfigError(
                "set retrievers_dir (one <domain>/ retriever each, from jobs/train_retriever.py) or encoder_dir "
                "(one encoder for all domains, e.g. artifacts/models/init/encoder)"
            )
        if self.mode not in INDEX_JOB_MODES:
            raise ConfigError(f"mode must be one of {list(INDEX_JOB_MODES)}, got {self.mode!r}")
        if self.mode == "add" and self.overwrite:
            raise ConfigError("overwrite=true has no meaning with mode=add (add never replaces the store); drop it")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or len(set(self.domains)) != len(self.domains):
            raise ConfigError(
                f"domains must be distinct names from {list(DOMAINS)} (or [] = all), got {list(self.domains)}"
            )
        if self.device not in EMBED_DEVICES:
            raise ConfigError(f"device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.max_actors != 0 and self.max_actors < self.num_actors:
            raise ConfigError(
                f"max_actors={self.max_actors} must be 0 (fixed pool) or >= num_actors={self.num_actors}"
            )
        if self.index is not None:
            object.__setattr__(self, "index", _index_config(self.index))

    def index_config(self) -> Any:
        """The FAISS settings as an ``IndexConfig`` (defaults when ``index`` is None)."""
        return self.index if self.index is not None else _index_config({})

    def actor_pool_size(self) -> int | tuple[int, int]:
        """``num_actors``, or ``(num_actors, max_actors)`` for an autoscaling pool."""
        return (self.num_actors, self.max_actors) if self.max_actors > self.num_actors else self.num_actors


def _index_config(value: Any) -> Any:
    """``value`` (an IndexConfig or a mapping of its fields) as an IndexConfig; imported here, not at module
    level, because medrag_ray.retrieval.index imports this module."""
    from medrag_ray.retrieval.index import IndexConfig

    if isinstance(value, IndexConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"index must be a mapping of IndexConfig fields, got {value!r}")
    names = [f.name for f in dataclasses.fields(IndexConfig)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key index.{unknown[0]}; valid keys under index: {', '.join(names)}")
    return IndexConfig(**value)


# ---------------------------------------------------------------- reader RAG-SFT and mining (issue 4)

PROMPT_STYLES: tuple[str, ...] = ("mmed", "jomed")
READER_TASKS: tuple[str, ...] = ("closed", "report")
READER_FINETUNES: tuple[str, ...] = ("lora", "full")
READER_CONTEXT_SOURCES: tuple[str, ...] = ("retrieval", "phenotype")
DEFAULT_READER_RETRIEVAL = RetrievalConfig(k=5, k_max=3, adaptive="gap", gamma=0.01)
"""Top-5 from the domain index, at most 3 kept by the paper's gap rule (the tiny reader's context is 512 tokens)."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA on the reader's language model (peft). The reference code adapts every linear layer except the
    vision tower, the projector and ``lm_head`` (r=128, alpha=256, dropout 0.05 for a 7B model)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()
    """Module-name suffixes to adapt (``[]`` = every ``nn.Linear`` of the language model, as the reference)."""
    modules_to_save: tuple[str, ...] = ("multi_modal_projector", "lm_head")
    """Modules trained in full beside the adapters (peft ``modules_to_save``). The tiny reader is random: its
    projector must learn to make image features readable, and its ``lm_head`` (init std 0.02, after a unit
    RMSNorm) cannot give any token a logit margin above ~1, so LoRA alone stays at chance. For a pretrained
    VLM set ``[]`` (the reference code trains adapters only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")


@dataclasses.dataclass(frozen=True)
class ReaderContextConfig:
    """Where a reader job's retrieved context comes from (router -> domain retriever -> adaptive-k)."""

    router_dir: str = "artifacts/models/router"
    index_dir: str = "artifacts/index"
    retrieval: RetrievalConfig = DEFAULT_READER_RETRIEVAL
    style: str = "mmed"
    """``mmed``: retrieved reports numbered in the prompt (MMed-RAG); ``jomed``: each retrieved (image, text)
    pair prepended to the query (JOMED)."""

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ConfigError(f"style must be one of {list(PROMPT_STYLES)}, got {self.style!r}")


@dataclasses.dataclass(frozen=True)
class TrainReaderConfig:
    """``jobs/train_reader.py``: retrieval-augmented SFT of the reader with LoRA (JOMED stage 1), or the full
    pretraining of the tiny default reader (``finetune=full``, ``rag_fraction=0``: train_reader_pretrain.yaml)."""

    dataset_dir: str = "artifacts/data/synthetic"
    """Needs ``samples_train.parquet`` and ``samples_val.parquet`` (Sample rows with inline images)."""
    reader_dir: str = "artifacts/models/reader_base"
    """The reader to fine-tune: the pretrained tiny reader (``pipeline.py steps=[..., pretrain_reader]``), the
    random init reader (to pretrain it), or a real local VLM directory (Hugging Face format)."""
    out_dir: str = "artifacts/models/reader"
    """Receives the merged reader (``load_reader`` loads it), ``adapter/`` (the LoRA weights) and ``metrics.json``."""
    data_dir: str = "artifacts/data/reader_sft"
    """Where the driver writes the SFT examples with their retrieved context (``train.parquet``, ``val.parquet``)
    for the workers to read; on a multi-node cluster put it on shared storage."""
    context: ReaderContextConfig = ReaderContextConfig()
    tasks: tuple[str, ...] = ("closed",)
    """Sample kinds to train on: ``closed`` (yes/no questions) and/or ``report`` (report generation)."""
    meta_filter: dict[str, str] = dataclasses.field(default_factory=dict)
    """Keep only samples whose ``meta`` JSON has these values, e.g. ``{finding_kind: visible}`` (empty = all)."""
    finetune: str = "lora"
    """``lora``: peft adapters (``lora``) on a pretrained VLM, as JOMED / MMed-RAG. ``full``: every parameter
    trains -- for the tiny default reader, which starts random and has no pretrained VLM to adapt."""
    freeze_vision_tower: bool = False
    """Keep the vision tower fixed with ``finetune=full`` (LLaVA's recipe: the pretrained image encoder is never
    trained; ``pretrain_vision`` trains the tiny one first). LoRA never adapts the vision tower anyway."""
    rag_fraction: float = 0.5
    """Share of training examples that get the retrieved context in the prompt; the rest are asked without,
    so the reader answers both M(x_v, x_t + x_r) and M(x_v, x_t) (what preference mining compares). With
    ``context_source=phenotype``: the share of the pretraining conversations with reports."""
    context_source: str = "retrieval"
    """``retrieval``: the reports the router -> domain index -> adaptive-k returns (RAG-SFT). ``phenotype``: the
    tiny reader's pretraining conversations (:mod:`medrag_ray.reader.curriculum`) from a synthetic dataset's ground
    truth (``dataset_dir/manifest.json`` and ``corpus.parquet``): per case, ``context.retrieval.k_max`` (else ``k``)
    reports of other cases (or none) and every finding asked as a turn; no retriever."""
    draws: int = 1
    """``context_source=phenotype``: conversations per training case, each with its own reports and question order
    (one epoch goes over all of them; validation uses one per case)."""
    max_val: int = 240
    """Validation examples scored each epoch (closed accuracy with and without retrieval), spread evenly over the
    domains (:mod:`medrag_ray.data.subset`); 0 = all."""
    run_name: str = "reader-sft"
    overwrite: bool = False
    lora: LoraSettings = LoraSettings()
    train: TrainLoopConfig = TrainLoopConfig(epochs=4, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_fraction=0.05)
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("dataset_dir", "reader_dir", "out_dir", "data_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        bad = [t for t in self.tasks if t not in READER_TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty subset of {list(READER_TASKS)}, got {list(self.tasks)}")
        if not 0.0 <= self.rag_fraction <= 1.0:
            raise ConfigError(f"rag_fraction must be in [0, 1], got {self.rag_fraction!r}")
        if self.context_source not in READER_CONTEXT_SOURCES:
            raise ConfigError(
                f"context_source must be one of {list(READER_CONTEXT_SOURCES)}, got {self.context_source!r}"
            )
        if self.max_val < 0:
            raise ConfigError(f"max_val must be >= 0, got {self.max_val!r}")
        if not isinstance(self.draws, int) or isinstance(self.draws, bool) or self.draws < 1:
            raise ConfigError(f"draws must be an integer >= 1, got {self.draws!r}")
        if self.finetune not in READER_FINETUNES:
            raise ConfigError(f"finetune must be one of {list(READER_FINETUNES)}, got {self.finetune!r}")
        bad_filter = {k: v for k, v in self.meta_filter.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad_filter:
            raise ConfigError(f"meta_filter must map meta keys to string values, got {bad_filter}")


FINDING_KINDS: tuple[str, ...] = ("visible", "subtle")
"""Kinds of finding of the synthetic data: drawn clearly in the pixels, or faint (what retrieval carries)."""


@dataclasses.dataclass(frozen=True)
class PretrainVisionConfig:
    """``jobs/pretrain_vision.py``: multi-label pretraining of the tiny reader's vision tower on the findings its
    images' reports state -- the stand-in for the pretrained CLIP tower a real LLaVA-style reader starts from."""

    dataset_dir: str = "artifacts/data/reader_pretrain"
    """Needs ``samples_train.parquet`` (and ``samples_val.parquet`` for validation) of the synthetic generator:
    the findings are read from each image's report with the domain's vocabulary."""
    reader_dir: str = "artifacts/models/init/reader"
    """The tiny LLaVA-style reader whose vision tower is trained (``prepare_models``' random reader)."""
    out_dir: str = "artifacts/models/reader_vision"
    """Receives the whole reader with the trained vision tower (``load_reader`` loads it) and ``metrics.json``."""
    finding_kinds: tuple[str, ...] = ("visible",)
    """Which findings are labels: ``visible`` ones are what an image shows; ``subtle`` ones are what retrieval
    adds (training on them would teach the tower the pretraining set's phenotypes)."""
    run_name: str = "reader-vision"
    overwrite: bool = False
    train: TrainLoopConfig = TrainLoopConfig(epochs=80, batch_size=16, lr=3e-3, weight_decay=0.0, warmup_fraction=0.05)
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("dataset_dir", "reader_dir", "out_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        bad = [k for k in self.finding_kinds if k not in FINDING_KINDS]
        if bad or not self.finding_kinds:
            raise ConfigError(
                f"finding_kinds must be a non-empty subset of {list(FINDING_KINDS)}, got {list(self.finding_kinds)}"
            )


def _check_reader_job(cfg: Any) -> None:
    """The checks every reader job's config shares: its paths are not empty and ``limit >= 0``."""
    for name in ("samples_path", "reader_dir", "out_dir"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name} must be a path, got an empty string")
    for name in ("router_dir", "index_dir"):
        if not getattr(cfg.context, name).strip():
            raise ConfigError(f"context.{name} must be a directory path, got an empty string")
    if cfg.limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 = all), got {cfg.limit!r}")


@dataclasses.dataclass(frozen=True)
class EvalReaderConfig:
    """``jobs/eval_reader.py``: closed-question (yes/no) accuracy of a reader with and without retrieval."""

    samples_path: str = "artifacts/data/synthetic/samples_test.parquet"
    """Sample Parquet (file or directory); only closed yes/no questions are scored, the others are counted."""
    reader_dir: str = "artifacts/models/reader"
    """The reader (``jobs/train_reader.py`` output, ``artifacts/models/init/reader``, or a real local VLM)."""
    context: ReaderContextConfig = ReaderContextConfig()
    route: bool = True
    """Pick the domain with the router F(x_v) (the paper); false uses each sample's labelled domain."""
    limit: int = 0
    """Evaluate ``limit`` rows of ``samples_path``, spread evenly over the domains
    (:mod:`medrag_ray.data.subset`); 0 = all."""
    batch_size: int = 32
    """Samples decoded, retrieved for and scored per step (also the reader's forward-pass batch)."""
    device: str = "auto"
    """Reader and retriever device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    out_dir: str = "artifacts/eval"
    """Writes ``reader.json`` and ``reader.md`` here."""
    name: str = ""
    """Optional tag written in the report (e.g. ``synthetic-test``, ``vqa_rad-test``)."""

    def __post_init__(self) -> None:
        _check_reader_job(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.device not in EMBED_DEVICES:
            raise ConfigError(f"device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")


DCM_RULE_CHOICES: tuple[str, ...] = ("algorithm", "text")
NOISE_KIND_CHOICES: tuple[str, ...] = ("diffusion", "gaussian")


@dataclasses.dataclass(frozen=True)
class MinePrefsConfig:
    """``jobs/mine_prefs.py``: mine RAG-PT preference pairs (D_cm, D_oa1, D_oa2) with Ray Data."""

    samples_path: str = "artifacts/data/synthetic/samples_train.parquet"
    """Sample Parquet (file or directory) to mine; only closed (yes/no) questions give pairs, others are rejected."""
    reader_dir: str = "artifacts/models/reader"
    """The reader M (``jobs/train_reader.py`` output, or any reader / real local VLM directory)."""
    context: ReaderContextConfig = ReaderContextConfig()
    out_dir: str = "artifacts/prefs"
    """Ledger, ``pairs/``, ``alignment/``, ``rejects.jsonl`` and ``summary.json``; re-running resumes it."""
    dcm_rule: str = "algorithm"
    """D_cm reading: ``algorithm`` (Algorithm 1, 3 reader passes) or ``text`` (§2.3 wording, a 4th pass)."""
    noise_kind: str = "diffusion"
    """``diffusion`` (Eq. 2, the paper) or ``gaussian`` (clipped N(0,1), the released trainer)."""
    noise_step: int = 500
    """Diffusion step s in [0, 999] of x_v* (500 keeps sqrt(xi_bar) ~ 0.6 of the least-similar image)."""
    route: bool = True
    """Pick the domain with the router F(x_v) (the paper); false uses each sample's labelled domain."""
    seed: int = 0
    limit: int = 0
    """Mine ``limit`` samples, spread evenly over the domains (:mod:`medrag_ray.data.subset`); 0 = all. The same
    limit selects the same samples on every run."""
    batch_size: int = 32
    """Samples per actor batch (the unit of the exactly-once ledger)."""
    reader_batch_size: int = 32
    """Reader inputs per forward pass inside an actor."""
    num_actors: int = 2
    device: str = "auto"
    """Reader and retriever device in the actors: auto (cuda when the actor has a GPU), cpu or cuda."""
    shard_size: int = 5000
    """Pairs per output Parquet part."""
    build_missing: bool = True
    """Build missing prerequisites (data, router, retrievers, index, reader) with the pipeline first, saying so."""
    artifacts_dir: str = "artifacts"
    """Where the pipeline builds the prerequisites (only used when something is missing)."""
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("samples_path", "reader_dir", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        if self.dcm_rule not in DCM_RULE_CHOICES:
            raise ConfigError(f"dcm_rule must be one of {list(DCM_RULE_CHOICES)}, got {self.dcm_rule!r}")
        if self.noise_kind not in NOISE_KIND_CHOICES:
            raise ConfigError(f"noise_kind must be one of {list(NOISE_KIND_CHOICES)}, got {self.noise_kind!r}")
        if not isinstance(self.noise_step, int) or not 0 <= self.noise_step <= 999:
            raise ConfigError(f"noise_step must be an integer in [0, 999], got {self.noise_step!r}")
        for name in ("batch_size", "reader_batch_size", "num_actors", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


# ---------------------------------------------------------------------------------------- RAG-PT (issue 5)

DPO_PAIR_KINDS: tuple[str, ...] = ("cm", "oa1", "oa2", "oa")
"""Pair kinds a DPO stage can select: as mined, and ``oa`` for released pairs of unknown type without a noised side."""


@dataclasses.dataclass(frozen=True)
class TrainDPOConfig:
    """``jobs/train_dpo.py``: RAG-PT (MMed-RAG §2.3) -- DPO of the reader with LoRA, in stages, on mined pairs."""

    pairs_path: str = "artifacts/prefs/pairs"
    """PreferencePair Parquet (file or directory): ``jobs/mine_prefs.py``'s ``pairs/`` or converted alignment files."""
    reader_dir: str = "artifacts/models/reader"
    """The reader stage 1 starts from (the RAG-SFT reader, or a real local VLM directory)."""
    out_dir: str = "artifacts/models/reader_dpo"
    """Receives the last stage's reader (merged; ``adapter/`` beside it) and ``metrics.json`` (every stage)."""
    work_dir: str = "artifacts/data/dpo"
    """Per stage, the driver writes the train/val pairs here and the stage's reader, which the next stage starts
    from; on a multi-node cluster put it on shared storage."""
    stages: tuple[tuple[str, ...], ...] = (("cm",), ("oa1", "oa2", "oa"))
    """Pair kinds of each stage, in order; each stage starts from the previous stage's weights, which are also
    its frozen reference. MMed-RAG: stage 1 on D_cm (image side), stage 2 on D_oa (answer side)."""
    beta: float = 0.1
    """DPO inverse temperature (MMed-RAG's alpha; 0.1 in the reference code)."""
    val_fraction: float = 0.1
    """Share of samples whose pairs are held out for validation (seeded, by sample id)."""
    noise_kind: str = "diffusion"
    """For pairs without a stored noisy image: ``diffusion`` (Eq. 2) or ``gaussian`` (the released trainer)."""
    noise_step: int = 500
    run_name: str = "reader-dpo"
    """Ray Train runs are named ``<run_name>-stage<i>``; a re-run resumes each from its last checkpoint."""
    overwrite: bool = False
    lora: LoraSettings = LoraSettings(modules_to_save=())
    """LoRA adapters only, as the reference code (the reader has been through RAG-SFT: its projector and lm_head
    are trained; training them in full here collapsed the tiny reader's answers in a trial with lr 2e-3)."""
    train: TrainLoopConfig = TrainLoopConfig(epochs=3, batch_size=4, lr=5e-4, weight_decay=0.0, warmup_fraction=0.1)
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("pairs_path", "reader_dir", "out_dir", "work_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        if not self.stages or any(not stage for stage in self.stages):
            raise ConfigError(f"stages must be a non-empty list of non-empty pair-kind lists, got {self.stages!r}")
        bad = sorted({k for stage in self.stages for k in stage} - set(DPO_PAIR_KINDS))
        if bad:
            raise ConfigError(f"stages name unknown pair kinds {bad}; choose from {list(DPO_PAIR_KINDS)}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.noise_kind not in NOISE_KIND_CHOICES:
            raise ConfigError(f"noise_kind must be one of {list(NOISE_KIND_CHOICES)}, got {self.noise_kind!r}")
        if not isinstance(self.noise_step, int) or not 0 <= self.noise_step <= 999:
            raise ConfigError(f"noise_step must be an integer in [0, 999], got {self.noise_step!r}")


@dataclasses.dataclass(frozen=True)
class DistillRetrieverConfig:
    """``jobs/distill_retriever.py``: JOMED's sequential dual-head distillation from the frozen reader (text head,
    then image head, Sharp Perplexity KL) and MR-RAG's fusion weights from the reader's confidence."""

    dataset_dir: str = "artifacts/data/synthetic"
    """``samples_train.parquet`` (scored and trained on) and ``samples_val.parquet`` (validation); only closed
    questions with a yes/no answer are used."""
    reader_dir: str = "artifacts/models/reader"
    """The frozen reader whose answers teach the retriever (JOMED trains it with ``context.style=jomed``)."""
    context: ReaderContextConfig = ReaderContextConfig()
    """The router and the index whose per-domain retrievers are distilled."""
    out_dir: str = "artifacts/models/retriever_jomed"
    """Receives one dual-head retriever per domain (``<domain>/``: encoder, heads, fusion weights) and
    ``metrics.json``; pass them as ``retriever_dirs`` to ``MultimodalRetriever.from_artifacts``."""
    work_dir: str = "artifacts/data/distill"
    """The scoring pass writes ``scores/`` here (every head and split); each run exports to ``heads/<part>/``."""
    k: int = 4
    """Candidates per question (JOMED retrieves r = 4 pairs)."""
    temperature: float = 0.1
    """tau of the retriever's distribution softmax(s / tau) over the candidates' cosines."""
    fusion_temperature: float = 0.1
    """tau of MR-RAG's Eq. 2 InfoNCE."""
    n_negatives: int = 2
    """MR-RAG's bottom-m negatives per question."""
    limit: int = 0
    """Score ``limit`` closed questions of each split, spread evenly over the domains
    (:mod:`medrag_ray.data.subset`); 0 = all of them."""
    route: bool = True
    """Route with F(x_v) (the paper); false uses each sample's labelled domain."""
    reader_batch_size: int = 32
    batch_size: int = 32
    """Samples per scoring actor batch."""
    num_actors: int = 2
    device: str = "auto"
    run_name: str = "retriever-distill"
    """Ray Train runs are ``<run_name>-text``, ``-image`` and ``-fusion``; a re-run resumes each."""
    overwrite: bool = False
    head_train: TrainLoopConfig = TrainLoopConfig(epochs=10, batch_size=16, lr=1e-3, weight_decay=0.0)
    fusion_train: TrainLoopConfig = TrainLoopConfig(epochs=10, batch_size=16, lr=1e-2, weight_decay=0.0)
    ray_train: RayTrainConfig = RayTrainConfig()
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        for name in ("dataset_dir", "reader_dir", "out_dir", "work_dir", "run_name"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        if self.k < 2:
            raise ConfigError(f"k must be >= 2 (the loss compares candidates), got {self.k!r}")
        for name in ("temperature", "fusion_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("n_negatives", "reader_batch_size", "batch_size", "num_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """``jobs/evaluate.py``: the RAG-PT ablation (MMed-RAG Table 2 shape) with CR / OR rates, and FT RAG vs JOMED vs
    the oracle on consistent / inconsistent questions (JOMED Table 5 shape). Test splits only evaluate."""

    samples_path: str = "artifacts/data/synthetic/samples_test.parquet"
    """Closed yes/no questions are evaluated; other rows are skipped and counted."""
    reader_dir: str = "artifacts/models/reader"
    """The RAG-SFT reader: the no-retrieval, fixed-k and adaptive-k rows, and FT RAG / JOMED's reader."""
    rag_pt_reader_dirs: tuple[str, ...] = ("artifacts/data/dpo/stage1/reader", "artifacts/models/reader_dpo")
    """One ``+ RAG-PT stage <i>`` row per reader (``jobs/train_dpo.py``'s stage readers); missing ones are skipped."""
    ground_truth_dir: str = "artifacts/data/synthetic"
    """A synthetic dataset directory (``manifest.json`` with each case's phenotype and findings, ``corpus.parquet``)
    of ``samples_path``: adds the diagnostics rows (oracle context, retrieval phenotype precision, majority of
    reports). Empty, or a directory without a manifest (real data), skips them."""
    context: ReaderContextConfig = ReaderContextConfig()
    """Router, index, prompt style and the adaptive-k settings of the adaptive rows."""
    fixed_k: int = 3
    """k of the ``+ retrieval (fixed k)`` row (adaptive-k off)."""
    jomed_retriever_dir: str = "artifacts/models/retriever_jomed"
    """``jobs/distill_retriever.py``'s output (per-domain directories); empty or missing skips the JOMED table."""
    jomed_k: int = 4
    jomed_temperature: float = 0.1
    """tau of p_R = softmax(s / tau) in the logit fusion."""
    alignment: bool = True
    """Also compute CR / OR rates (three reader passes per question) for the SFT and the last RAG-PT reader."""
    noise_step: int = 500
    route: bool = True
    limit: int = 0
    """Evaluate ``limit`` rows of ``samples_path``, spread evenly over the domains
    (:mod:`medrag_ray.data.subset`); 0 = all."""
    batch_size: int = 32
    device: str = "auto"
    out_dir: str = "artifacts/eval"
    """Writes ``rag_pt.json/.md`` and ``jomed.json/.md`` here."""
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("samples_path", "reader_dir", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a path, got an empty string")
        for name in ("fixed_k", "jomed_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.jomed_temperature > 0:
            raise ConfigError(f"jomed_temperature must be > 0, got {self.jomed_temperature!r}")
        if not isinstance(self.noise_step, int) or not 0 <= self.noise_step <= 999:
            raise ConfigError(f"noise_step must be an integer in [0, 999], got {self.noise_step!r}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit!r}")
        if self.device not in EMBED_DEVICES:
            raise ConfigError(f"device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")


IFA_LAYER_CRITERIA: tuple[str, ...] = ("abs_delta_gold", "kl", "accuracy_drop")
"""How ``jobs/find_ifa_layers.py`` ranks layers: mean |Δ p(gold)|, mean KL(unblocked ‖ blocked), accuracy lost."""


@dataclasses.dataclass(frozen=True)
class FindIFALayersConfig:
    """``jobs/find_ifa_layers.py``: MR-RAG's attention-blocking experiment on validation closed questions -- block
    question -> document attention one decoder layer at a time and keep the layers where the answers change most
    (the critical layers IFA biases)."""

    samples_path: str = "artifacts/data/synthetic/samples_val.parquet"
    """Validation samples (file or directory); only closed yes/no questions with retrieved documents are used."""
    reader_dir: str = "artifacts/models/reader_dpo"
    """The reader IFA will run on (the RAG-PT reader by default, or any reader / real local VLM directory)."""
    context: ReaderContextConfig = ReaderContextConfig()
    """Router, index, prompt style and the adaptive-k retrieval whose kept documents are blocked."""
    route: bool = True
    """Pick the domain with the router F(x_v) (the paper); false uses each sample's labelled domain."""
    limit: int = 64
    """Use ``limit`` closed yes/no questions, spread evenly over the domains (:mod:`medrag_ray.data.subset`);
    0 = all."""
    top_n: int = 1
    """How many critical layers to keep."""
    criterion: str = "abs_delta_gold"
    """Ranking of the layers: ``abs_delta_gold`` (mean |Δ p(gold)|), ``kl`` or ``accuracy_drop``."""
    batch_size: int = 16
    device: str = "auto"
    out_dir: str = "artifacts/eval"
    """Writes ``critical_layers.json`` and ``critical_layers.md`` here."""
    name: str = ""

    def __post_init__(self) -> None:
        _check_reader_job(self)
        for name in ("top_n", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.criterion not in IFA_LAYER_CRITERIA:
            raise ConfigError(f"criterion must be one of {list(IFA_LAYER_CRITERIA)}, got {self.criterion!r}")
        if self.device not in EMBED_DEVICES:
            raise ConfigError(f"device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")


# ------------------------------------------------------------------------------------- the pipeline

PIPELINE_STEPS: tuple[str, ...] = (
    "make_data", "prepare_models", "train_router", "train_retriever", "build_index", "pretrain_vision",
    "pretrain_reader", "train_reader", "mine_prefs", "train_dpo", "distill_retriever", "evaluate",
    "find_ifa_layers",
)
"""The pipeline's steps in order."""


def steps_before(step: str) -> tuple[str, ...]:
    """The pipeline steps that run before ``step``: what a job needs built before it runs (in pipeline order)."""
    if step not in PIPELINE_STEPS:
        raise ConfigError(f"{step!r} is not a pipeline step; choose from {list(PIPELINE_STEPS)}")
    return PIPELINE_STEPS[: PIPELINE_STEPS.index(step)]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """``jobs/pipeline.py``: run every step on the embedded default, building what is missing."""

    artifacts_dir: str = "artifacts"
    """Every step reads and writes under this folder (data/, models/, ...)."""
    steps: tuple[str, ...] = PIPELINE_STEPS
    """Steps to run, in pipeline order; a step whose outputs exist is skipped (and says so)."""
    rebuild: bool = False
    """Re-run the selected steps even when their outputs exist."""
    data: SyntheticDataConfig = SyntheticDataConfig()
    models: TinyModelsConfig = TinyModelsConfig()
    router_train: TrainLoopConfig = TrainLoopConfig(epochs=6, lr=5e-4)
    """``train`` of ``jobs/train_router.py``."""
    retriever_train: TrainLoopConfig = TrainLoopConfig(epochs=40, batch_size=16)
    """``train`` of ``jobs/train_retriever.py`` (one run per domain). 168 pairs per domain: batches of 16 per worker
    give 5 steps an epoch (32 gave 2; 20 epochs of those left val recall@1 at 0.0-0.17, 40 of 16 reach 0.42-0.58)."""
    reader_pretrain_cases: int = 800
    """Cases per domain of the reader's separate pretraining set (``data`` with ``seed + 1``: other phenotypes,
    so the base reader learns to see the visible findings but cannot learn the retrieval corpus's phenotypes)."""
    reader_vision: TrainLoopConfig = PretrainVisionConfig().train
    """``train`` of the ``pretrain_vision`` step (``jobs/pretrain_vision.py`` on the pretraining set): the tiny
    reader's vision tower learns the visible findings -- the stand-in for a pretrained CLIP tower."""
    reader_pretrain: TrainLoopConfig = TrainLoopConfig(
        epochs=3, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_fraction=0.05
    )
    """``train`` of the ``pretrain_reader`` step (``jobs/configs/train_reader_pretrain.yaml``: full fine-tune of the
    tiny reader on conversations about the pretraining set's cases, looking at the image for visible findings and
    reading the reports for subtle ones) -- the stand-in for LLaVA-Med."""
    reader_train: TrainLoopConfig = dataclasses.replace(TrainReaderConfig().train, epochs=2)
    """``train`` of ``jobs/train_reader.py`` (the reader's RAG-SFT with LoRA, on the pretrained base reader)."""
    mining_limit: int = 320
    """``limit`` of ``jobs/mine_prefs.py`` (0 = mine every train sample; about 30 min on 2 cores)."""
    dpo_train: TrainLoopConfig = TrainDPOConfig().train
    """``train`` of ``jobs/train_dpo.py`` (RAG-PT: DPO stage 1 on D_cm, stage 2 on D_oa, on the mined pairs)."""
    distill_limit: int = 600
    """``limit`` of ``jobs/distill_retriever.py``: train (and val) questions whose candidates the reader scores."""
    distill_head_train: TrainLoopConfig = DistillRetrieverConfig().head_train
    """``head_train`` of ``jobs/distill_retriever.py`` (the text head, then the image head)."""
    distill_fusion_train: TrainLoopConfig = DistillRetrieverConfig().fusion_train
    """``fusion_train`` of ``jobs/distill_retriever.py`` (MR-RAG's fusion weights)."""
    eval_limit: int = 0
    """``limit`` of ``jobs/evaluate.py`` on the synthetic test split (0 = all)."""
    ifa_layers_limit: int = FindIFALayersConfig().limit
    """``limit`` of ``jobs/find_ifa_layers.py`` on the synthetic validation split (0 = all)."""
    ray_train: RayTrainConfig = RayTrainConfig(storage_path="ray_train")
    """Ray Train settings of the training steps (runs are named router / retriever-<domain> / reader-sft); a relative
    ``storage_path`` is taken under ``artifacts_dir``. ``rebuild=true`` also sets ``resume=false``."""
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        if not self.artifacts_dir.strip():
            raise ConfigError("artifacts_dir must be a directory path, got an empty string")
        unknown = [s for s in self.steps if s not in PIPELINE_STEPS]
        if unknown or not self.steps:
            raise ConfigError(f"steps has unknown or no steps {unknown}; choose from {list(PIPELINE_STEPS)}")
        order = [PIPELINE_STEPS.index(s) for s in self.steps]
        if order != sorted(set(order)):
            raise ConfigError(
                f"steps must be distinct and in pipeline order {list(PIPELINE_STEPS)}, got {list(self.steps)}"
            )
        try:
            self.reader_pretrain_data  # noqa: B018 - validates reader_pretrain_cases against data
        except ConfigError as exc:
            raise ConfigError(f"reader_pretrain_cases={self.reader_pretrain_cases} is invalid: {exc}") from exc

    @property
    def reader_pretrain_data(self) -> SyntheticDataConfig:
        """The reader's pretraining set: ``data`` with another seed (other phenotypes) and more cases."""
        return dataclasses.replace(self.data, seed=self.data.seed + 1, n_per_domain=self.reader_pretrain_cases)


# ------------------------------------------------------------------------------------- serving

SERVE_TASKS: tuple[str, ...] = ("closed", "open", "report")
SERVE_FUSIONS: tuple[str, ...] = ("concat", "jomed")


def config_from_mapping(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Build ``cls`` from a mapping (e.g. the ``args`` of a Serve config file), validated like a YAML file."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of {cls.__name__} keys, got {values!r}")
    try:
        return _build(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{f' (in {where})' if where else ''}") from None


@dataclasses.dataclass(frozen=True)
class DeploymentSettings:
    """Ray Serve options of one deployment (``serve/app.py`` applies them with ``Deployment.options``)."""

    min_replicas: int = 1
    max_replicas: int = 1
    """Autoscaling range; ``min_replicas == max_replicas`` is a fixed replica count."""
    target_ongoing_requests: float = 2.0
    """Autoscaler target of requests in flight per replica."""
    max_ongoing_requests: int = 8
    """Requests a replica runs at once (a batching deployment needs at least its ``max_batch_size``)."""
    max_queued_requests: int = 64
    """Requests waiting for a replica beyond which callers get a back-pressure error (HTTP 503); -1 = unbounded."""
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_batch_size: int = 8
    """``serve.batch``: requests merged into one forward pass (router, retriever and reader)."""
    batch_wait_timeout_s: float = 0.01
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}: need 0 <= min_replicas <= "
                "max_replicas and max_replicas >= 1"
            )
        if not self.target_ongoing_requests > 0:
            raise ConfigError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.max_batch_size < 1 or self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests={self.max_ongoing_requests} must be >= max_batch_size={self.max_batch_size} "
                ">= 1, or a replica can never fill a batch"
            )
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ConfigError(f"max_queued_requests must be >= 1 or -1 (unbounded), got {self.max_queued_requests}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"num_cpus={self.num_cpus} and num_gpus={self.num_gpus} must be >= 0")
        for name in ("batch_wait_timeout_s", "health_check_period_s", "health_check_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        """Serve's ``autoscaling_config``, or None for a fixed replica count."""
        if self.min_replicas == self.max_replicas:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What a request may carry; anything beyond is answered with a 4xx naming the limit."""

    max_body_bytes: int = 12 * 2**20
    """Whole HTTP body (multipart or JSON with base64): 413 beyond."""
    max_image_bytes: int = 8 * 2**20
    """Encoded image: 413 beyond."""
    max_image_pixels: int = 4096 * 4096
    """Decoded width x height, checked from the header before any pixel is decoded (PNG bombs): 413 beyond."""
    max_question_chars: int = 2000
    max_k: int = 20
    """Largest ``k`` a request may ask for."""
    max_new_tokens: int = 128
    """Longest open answer or report a request may ask for."""
    max_choices: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"limits.{f.name} must be >= 1, got {getattr(self, f.name)!r}")
        if self.max_image_bytes > self.max_body_bytes:
            raise ConfigError(
                f"limits.max_image_bytes={self.max_image_bytes} exceeds limits.max_body_bytes={self.max_body_bytes}; "
                "an image that large could never arrive"
            )


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """``serve/app.py`` and ``serve run serve/config.yaml``: router -> per-domain retrievers -> reader behind HTTP.

    Model paths left empty are taken under ``artifacts_dir`` (what ``jobs/pipeline.py`` writes)."""

    artifacts_dir: str = "artifacts"
    router_dir: str = ""
    """Default ``<artifacts_dir>/models/router``."""
    index_dir: str = ""
    """Default ``<artifacts_dir>/index``; one Retriever deployment serves each domain of its manifest."""
    reader_dir: str = ""
    """Default: ``<artifacts_dir>/models/reader_dpo`` (the RAG-PT reader), else ``models/reader`` (RAG-SFT)."""
    jomed_retriever_dir: str = ""
    """JOMED's distilled retrievers (``fusion=jomed``); default ``<artifacts_dir>/models/retriever_jomed`` when it
    exists. Without it ``fusion=jomed`` uses the index's own retriever."""
    ifa_layers: tuple[int, ...] = ()
    """IFA's critical decoder layers; empty reads ``ifa_layers_path``."""
    ifa_layers_path: str = ""
    """Default ``<artifacts_dir>/eval/critical_layers.json`` (``jobs/find_ifa_layers.py``)."""
    ifa_strength: float = 1.0
    retrieval: RetrievalConfig = DEFAULT_READER_RETRIEVAL
    """Retrieval of ``fusion=concat`` (a request's ``k`` / ``adaptive`` override ``k`` / ``adaptive``)."""
    style: str = "mmed"
    """Prompt style of ``fusion=concat`` (as the reader was trained: ``mmed`` or ``jomed``)."""
    jomed_k: int = 4
    """Candidates of ``fusion=jomed`` when the request gives no ``k``."""
    jomed_temperature: float = 0.1
    """tau of p_R = softmax(s / tau) in JOMED's logit fusion."""
    consistency: bool = True
    """Closed questions also score each kept document alone and flag disagreement (one batched pass)."""
    device: str = "auto"
    host: str = "127.0.0.1"
    """HTTP bind address (``0.0.0.0`` exposes the service to the network: put authentication in front)."""
    port: int = 8000
    request_timeout_s: float = 60.0
    """An answer not ready by then is a 504."""
    limits: ServeLimits = ServeLimits()
    ingress: DeploymentSettings = DeploymentSettings(max_ongoing_requests=32, max_queued_requests=64, num_cpus=0.1)
    router: DeploymentSettings = DeploymentSettings(num_cpus=0.25, max_batch_size=16, max_ongoing_requests=32)
    retriever: DeploymentSettings = DeploymentSettings(num_cpus=0.25, max_batch_size=16, max_ongoing_requests=32)
    """Applied to each domain's Retriever deployment."""
    reader: DeploymentSettings = DeploymentSettings(num_cpus=0.5, max_batch_size=8, max_ongoing_requests=16)
    ray: RayConfig = RayConfig(num_cpus=4)

    def __post_init__(self) -> None:
        if not self.artifacts_dir.strip():
            raise ConfigError("artifacts_dir must be a directory path, got an empty string")
        if self.style not in PROMPT_STYLES:
            raise ConfigError(f"style must be one of {list(PROMPT_STYLES)}, got {self.style!r}")
        if self.jomed_k < 1 or not self.jomed_temperature > 0:
            raise ConfigError(f"jomed_k={self.jomed_k} must be >= 1 and jomed_temperature={self.jomed_temperature} > 0")
        if any(layer < 0 for layer in self.ifa_layers) or len(set(self.ifa_layers)) != len(self.ifa_layers):
            raise ConfigError(f"ifa_layers={list(self.ifa_layers)} must be distinct decoder layer indices >= 0")
        if not self.ifa_strength >= 0:
            raise ConfigError(f"ifa_strength must be >= 0, got {self.ifa_strength!r}")
        if self.device not in EMBED_DEVICES:
            raise ConfigError(f"device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.retrieval.k > self.limits.max_k:
            raise ConfigError(f"retrieval.k={self.retrieval.k} exceeds limits.max_k={self.limits.max_k}")

    def path(self, value: str, default: str) -> Path:
        """``value`` or, when empty, ``default`` under ``artifacts_dir``."""
        return Path(value) if value else Path(self.artifacts_dir) / default

    @property
    def resolved_router_dir(self) -> Path:
        return self.path(self.router_dir, "models/router")

    @property
    def resolved_index_dir(self) -> Path:
        return self.path(self.index_dir, "index")

    @property
    def resolved_reader_dir(self) -> Path:
        if self.reader_dir:
            return Path(self.reader_dir)
        dpo = Path(self.artifacts_dir) / "models" / "reader_dpo"
        return dpo if dpo.is_dir() else Path(self.artifacts_dir) / "models" / "reader"

    @property
    def resolved_jomed_dir(self) -> Path | None:
        path = self.path(self.jomed_retriever_dir, "models/retriever_jomed")
        if self.jomed_retriever_dir and not path.is_dir():
            raise ConfigError(f"jomed_retriever_dir={path} does not exist; run jobs/distill_retriever.py or unset it")
        return path if path.is_dir() else None

    @property
    def resolved_ifa_layers_path(self) -> Path:
        return self.path(self.ifa_layers_path, "eval/critical_layers.json")
