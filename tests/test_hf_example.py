"""examples/hf_gpt2.py: a Hugging Face GPT-2, unchanged, trained through LoRDO's compiled step."""

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "hf_gpt2.py"


def test_gpt2_trains_under_lordo():
    spec = importlib.util.spec_from_file_location("hf_gpt2", _PATH)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "10", "--compiler", "aot_eager"])
    assert losses[-1] < losses[0] - 0.5
