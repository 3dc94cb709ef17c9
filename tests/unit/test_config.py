from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medrag_ray.config import (
    ConfigError,
    MakeDataConfig,
    RayConfig,
    SyntheticDataConfig,
    load_config,
    parse_job_args,
    parse_override,
    to_dict,
)


def test_defaults_are_valid_and_frozen() -> None:
    cfg = MakeDataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out_dir = "x"  # type: ignore[misc]
    assert cfg.data.domains == ("radiology", "ophthalmology", "pathology")


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: /a\ndata:\n  n_per_domain: 50\n  seed: 3\n")
    cfg = load_config(MakeDataConfig, path, ["data.seed=7", "data.domains=[pathology, radiology]"])
    assert cfg.out_dir == "/a"
    assert cfg.data.n_per_domain == 50
    assert cfg.data.seed == 7
    assert cfg.data.domains == ("pathology", "radiology")
    assert cfg.data.split_fractions == SyntheticDataConfig().split_fractions


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.n_per_domian=5", "unknown config key data.n_per_domian"),
        ("data.n_per_domain=many", "data.n_per_domain must be an integer"),
        ("data.n_per_domain=3", "data.n_per_domain must be >= 10"),
        ("data.domains=[radiology, cardiology]", "unknown domains ['cardiology']"),
        ("data.split_fractions=[0.5, 0.5]", "data.split_fractions must have 3 items"),
        ("data.split_fractions=[0.5, 0.4, 0.3]", "must sum to 1"),
        ("overwrite=yes please", "overwrite must be true or false"),
        ("out_dir.x=1", "out_dir must be a string"),
        ("no_equals_sign", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MakeDataConfig, None, [override])
    assert message in str(info.value)


def test_missing_and_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(MakeDataConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(MakeDataConfig, bad)
    with_value = tmp_path / "v.yaml"
    with_value.write_text("out_dir: /a\n")
    with pytest.raises(ConfigError, match="'out_dir' is a value, not a section"):
        load_config(MakeDataConfig, with_value, ["out_dir.x=1"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(MakeDataConfig, broken)


def test_error_mentions_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(MakeDataConfig, path)
    assert "data.image_size must be in [16, 512]" in str(info.value)
    assert str(path) in str(info.value)


def test_round_trip_through_dict() -> None:
    cfg = load_config(MakeDataConfig, None, ["data.seed=11"])
    again = load_config(MakeDataConfig, None, [f"data.seed={to_dict(cfg)['data']['seed']}"])
    assert again == cfg
    assert to_dict(cfg)["data"]["domains"] == ["radiology", "ophthalmology", "pathology"]


def test_parse_override_types() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("--a=x") == ("a", "x")
    assert parse_override("a=") == ("a", "")


def test_ray_config_validation() -> None:
    assert RayConfig().auth_mode == "disabled"
    with pytest.raises(ConfigError, match="auth_mode"):
        RayConfig(auth_mode="none")
    with pytest.raises(ConfigError, match="actor_num_cpus"):
        RayConfig(actor_num_cpus=0)


def test_parse_job_args_uses_default_then_config(tmp_path: Path) -> None:
    default = tmp_path / "default.yaml"
    default.write_text("out_dir: /default\n")
    other = tmp_path / "other.yaml"
    other.write_text("out_dir: /other\n")
    assert parse_job_args(MakeDataConfig, [], default).out_dir == "/default"
    assert parse_job_args(MakeDataConfig, ["--config", str(other)], default).out_dir == "/other"
    assert parse_job_args(MakeDataConfig, ["out_dir=/cli"], default).out_dir == "/cli"


def test_partial_section_override_keeps_the_parent_default() -> None:
    from medrag_ray.config import PipelineConfig, TinyModelsConfig

    default_reader = TinyModelsConfig().reader
    cfg = load_config(PipelineConfig, None, ["models.reader.text_layers=3"])
    assert cfg.models.reader.text_layers == 3
    # image_size comes from TinyModelsConfig's reader default (64), not ReaderConfig's own (32).
    assert cfg.models.reader.image_size == default_reader.image_size == 64
    assert cfg.models.reader.max_length == default_reader.max_length


def test_model_config_errors_are_config_errors() -> None:
    from medrag_ray.config import PipelineConfig

    with pytest.raises(ConfigError, match="models.reader"):
        load_config(PipelineConfig, None, ["models.reader.patch_size=7"])
    with pytest.raises(ConfigError, match="steps must be distinct and in pipeline order"):
        load_config(PipelineConfig, None, ["steps=[prepare_models, make_data]"])
