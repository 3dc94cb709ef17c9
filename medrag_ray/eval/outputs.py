"""Writing an evaluation's result: a JSON file for machines and a markdown table for people."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json_and_markdown(out_dir: str | Path, stem: str, payload: Mapping[str, Any], markdown: str) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (each via a temp file); returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in ((out / f"{stem}.json", json.dumps(payload, indent=1) + "\n"), (out / f"{stem}.md", markdown)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written[0]
