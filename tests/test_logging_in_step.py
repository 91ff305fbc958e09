"""Logging inside the step never blocks capture: a call with constant arguments runs once, at
capture; one that reads a tensor is dropped; LORDO_LOGS=graphs notes each with its line."""

import functools
import logging
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.models import MLP

log = logging.getLogger("test_logging_in_step")
_SOURCE = pathlib.Path(__file__).read_text().splitlines()


@functools.lru_cache(None)
def warning_once(self, *args, **kwargs):
    """transformers.utils.logging.warning_once, which transformers installs on logging.Logger."""
    self.warning(*args, **kwargs)


@pytest.fixture(autouse=True)
def _warning_once(monkeypatch):
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    warning_once.cache_clear()


def _train(compiled: bool, steps: int = 4):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        log.warning("a batch %d wide", x.shape[1])
        log.warning_once("this model warns once")
        warnings.warn("a warning from the step", UserWarning)
        log.info("loss %s", loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = lc.compile(train_step, compiler="aot_eager") if compiled else train_step
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(torch.randn(4, 8, generator=generator), torch.randn(4, 2, generator=generator))
    return named_parameters(model), step


def _recorded(caplog, compiled: bool):
    warning_once.cache_clear()
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        params, step = _train(compiled)
    messages = [r.getMessage() for r in caplog.records if r.name == log.name]
    ours = [(w.filename, w.lineno, w.category) for w in warned if str(w.message) == "a warning from the step"]
    notes = [r.getMessage() for r in caplog.records if r.name == "lordo_compile"]
    return params, step, messages, ours, notes


def _line(text: str) -> str:
    return f"{__file__}:{next(i for i, line in enumerate(_SOURCE, 1) if text in line and 'def ' not in line)}"


def test_logging_calls_run_once_at_capture_and_the_step_equals_eager(caplog):
    reference, _, eager_messages, eager_warnings, _ = _recorded(caplog, compiled=False)
    params, step, messages, warned, _ = _recorded(caplog, compiled=True)
    assert step.captures == 1
    assert_close(params, reference)
    # Eagerly every step logs; compiled, each constant call logs once, and the tensor's is dropped.
    assert messages == list(dict.fromkeys(m for m in eager_messages if not m.startswith("loss ")))
    assert messages == ["a batch 8 wide", "this model warns once"]
    assert warned == eager_warnings[:1]


def test_graphs_channel_notes_each_logging_call(monkeypatch, caplog):
    monkeypatch.setenv("LORDO_LOGS", "graphs")
    _, step, _, _, notes = _recorded(caplog, compiled=True)
    ran = "ran once, at capture; the compiled step does not repeat it"
    assert [n for n in notes if "(...)" in n] == [
        f"{_line('log.warning(')}: logger 'test_logging_in_step'.warning(...) {ran}",
        f"{_line('log.warning_once(')}: logger 'test_logging_in_step'.warning_once(...) {ran}",
        f"{_line('warnings.warn(')}: warnings.warn(...) {ran}",
        f"{_line('log.info(')}: logger 'test_logging_in_step'.info(...) dropped: it reads a tensor, whose value "
        "exists only inside the graph; return the value from the step and log it there",
    ]
    assert "logging calls in the step: 3 ran once at capture, 1 dropped" in step.explain()


def test_other_logger_methods_are_left_to_dynamo():
    model = MLP((8, 16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(x, y):
        log.setLevel(logging.INFO)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    with pytest.raises(lc.CaptureError, match=r"logging.Logger method not supported.*log.setLevel"):
        lc.compile(train_step, compiler="aot_eager")(torch.randn(4, 8), torch.randn(4, 2))
