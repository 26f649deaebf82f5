"""Sampling defaults of `dsv4 chat` when the user gives none: the demo's, or the checkpoint's generation_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4cli.chat.service import sampling_defaults
from dsv4cli.demo.model import DEMO_TEMPERATURE
from dsv4cli.runtime.open import OpenModel
from dsv4cli.runtime.resolve import DEMO, DIRECTORY, ModelRef


def opened(path: Path, is_demo: bool = False) -> OpenModel:
    ref = ModelRef("demo" if is_demo else path.name, DEMO if is_demo else DIRECTORY, path)
    return OpenModel(model=None, checkpoint=None, ref=ref, tokenizer=None, label="")


def test_demo_samples_cooler_than_deepseek_default(tmp_path):
    assert sampling_defaults(opened(tmp_path, is_demo=True)) == (DEMO_TEMPERATURE, 1.0)
    assert 0 < DEMO_TEMPERATURE < 1


@pytest.mark.parametrize(("config", "expected"), [
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.95}, (0.7, 0.95)),
    ({"do_sample": False, "temperature": 0.7}, (0.0, 1.0)),  # greedy
    ({"temperature": 1.0, "top_p": 1.0, "bos_token_id": 0}, (1.0, 1.0)),  # the official V4 file
    ({"temperature": -1}, (1.0, 1.0)),
    ({"temperature": "hot"}, (1.0, 1.0)),
    ({"temperature": float("inf")}, (1.0, 1.0)),  # json writes and reads Infinity and NaN
    ({"temperature": 0.7, "top_p": float("nan")}, (1.0, 1.0)),
    ([1, 2], (1.0, 1.0)),
])
def test_generation_config_gives_the_defaults(tmp_path, config, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert sampling_defaults(opened(tmp_path)) == expected


def test_missing_or_broken_generation_config_falls_back_to_deepseek(tmp_path):
    assert sampling_defaults(opened(tmp_path)) == (1.0, 1.0)
    (tmp_path / "generation_config.json").write_text("{not json")
    assert sampling_defaults(opened(tmp_path)) == (1.0, 1.0)
