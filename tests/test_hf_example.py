"""examples/hf_gpt2.py: a Hugging Face GPT-2, unchanged, its loss from `labels=`, trained
through a compiled step."""

import importlib.util
import pathlib
import sys

import pytest
import torch

import lordo_compile as lc
from common import assert_close, named_parameters

pytest.importorskip("transformers")

_PATH = pathlib.Path(__file__).parents[1] / "examples" / "hf_gpt2.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_gpt2", _PATH)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    return example


def test_gpt2_trains_under_lordo():
    losses = _example().main(["--steps", "10", "--compiler", "aot_eager"])
    assert losses[-1] < losses[0] - 0.5


def _labels_step(example):
    model, _, _ = example.build()
    # SGD, not the example's AdamW: the attention key bias's gradient is zero in exact arithmetic,
    # and Adam's normalisation turns its rounding noise into steps that differ with evaluation order.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step(x):
        loss = model(input_ids=x, labels=x).loss  # transformers calls logger.warning_once on this path
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, train_step


def test_gpt2_with_labels_equals_eager():
    example = _example()
    model, train_step = _labels_step(example)
    reference, eager_step = _labels_step(example)
    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 32), generator=generator)
        assert_close(step(x), eager_step(x).detach(), atol=0)
    assert step.captures == 1
    assert_close(named_parameters(model), named_parameters(reference))
