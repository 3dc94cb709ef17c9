"""Convert the original LLaVA-Med v1.5 checkpoint to the llava-hf format every reader path loads (no Ray needed).

    python jobs/convert_llava_med.py [--config jobs/configs/convert_llava_med.yaml] \
        src_dir=DIR vision_tower_dir=DIR out_dir=DIR [dtype=bfloat16] [overwrite=true]

``src_dir`` is the release as downloaded (``model_type: llava_mistral``), ``vision_tower_dir`` the local CLIP tower
its ``mm_vision_tower`` names (``openai/clip-vit-large-patch14-336``). The output directory is what ``reader_dir``
of every job and the server take. The logic lives in :mod:`medrag_ray.models.convert_llava_med`.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import sys
from collections.abc import Sequence
from pathlib import Path

from medrag_ray.config import ConvertLlavaMedConfig, parse_job_args
from medrag_ray.models.convert_llava_med import convert_llava_med
from medrag_ray.utils import check_writable, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "convert_llava_med.yaml"


def parse_args(argv: Sequence[str] | None) -> ConvertLlavaMedConfig:
    return parse_job_args(ConvertLlavaMedConfig, argv, DEFAULT_CONFIG)


def main(cfg: ConvertLlavaMedConfig) -> Path:
    """Write the converted reader to ``cfg.out_dir``; returns that directory."""
    check_writable(cfg.out_dir, cfg.overwrite)  # fail before reading gigabytes of weights
    return convert_llava_med(cfg.src_dir, cfg.vision_tower_dir, cfg.out_dir, dtype=cfg.dtype, overwrite=cfg.overwrite)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
