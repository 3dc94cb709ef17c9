"""``python jobs/convert_llava_med.py ...`` as the README prints it, from a clean working directory (seconds, no
Ray): the converted directory is a reader every job loads; a second run without overwrite keeps it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from medrag_ray.models.reader import load_reader
from medrag_ray.reader.engine import ReaderEngine
from medrag_ray.reader.prompts import closed_prompt, single_image_input
from tests.conftest import REPO_ROOT
from tests.unit.conformance.builders import image, llava_med_direct, write_llava_med_original


def test_the_readme_command_converts_a_release(tmp_path: Path) -> None:
    direct_dir, tower_dir = llava_med_direct(tmp_path / "build")
    write_llava_med_original(direct_dir, tmp_path / "llava-med-v1.5-mistral-7b", with_tower=False)
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, str(REPO_ROOT / "jobs" / "convert_llava_med.py"),
            f"src_dir={tmp_path / 'llava-med-v1.5-mistral-7b'}", f"vision_tower_dir={tower_dir}", "out_dir=hf"]
    res = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    converted, processor = load_reader(work / "hf")
    reference, ref_processor = load_reader(direct_dir)
    inputs = [single_image_input(image(90, (70, 56)), closed_prompt("Is there cardiomegaly?"))]
    got = ReaderEngine(converted, processor).score_closed(inputs).probs
    assert np.abs(got - ReaderEngine(reference, ref_processor).score_closed(inputs).probs).max() < 1e-6

    again = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "overwrite=true" in again.stderr
    assert (work / "hf" / "config.json").is_file()
