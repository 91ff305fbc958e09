"""LORDO_LOGS shows what the compiler did, without code changes."""

import logging

import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import training_step


def _run(policy):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    step(torch.randn(4, 8), torch.randn(4, 2))


def test_channels_log_passes_graphs_and_comm(monkeypatch, caplog):
    monkeypatch.setenv("LORDO_LOGS", "passes,graphs,comm")
    with caplog.at_level(logging.INFO, logger="lordo_compile"):
        _run(lc.Policy.galore(rank=4))
    by_channel = {}
    for record in caplog.records:
        by_channel.setdefault(record.channel, []).append(record.getMessage())
    assert any(line.startswith("pass low_rank:") for line in by_channel["passes"])
    assert any("lordo.galore_adamw_projected(" in line for line in by_channel["graphs"])
    assert by_channel["comm"][0].split()[:2] == ["graph", "runs"]


def test_nothing_is_logged_by_default(monkeypatch, caplog):
    monkeypatch.delenv("LORDO_LOGS", raising=False)
    with caplog.at_level(logging.INFO, logger="lordo_compile"):
        _run(lc.Policy())
    assert not [r for r in caplog.records if r.name == "lordo_compile"]


def test_an_unknown_channel_is_an_error(monkeypatch):
    monkeypatch.setenv("LORDO_LOGS", "passes,bogus")
    with pytest.raises(ValueError, match=r"LORDO_LOGS names \['bogus'\]; known channels: passes, graphs, comm"):
        _run(lc.Policy())
