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
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
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


PIPELINE_STEPS: tuple[str, ...] = ("make_data", "prepare_models")
"""The pipeline's steps in order; later issues append training, indexing, mining and serving."""


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
