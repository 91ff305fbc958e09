"""Shared pieces: the tiny GPT step in its three forms, timing, tables, JSON."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

import lordo_compile as lc
from lordo_compile.data import ByteBatches
from lordo_compile.models import GPTConfig, TinyGPT
from lordo_compile.testing import training_step


# The model of every benchmark's --quick smoke run: compiles in seconds.
QUICK_GPT = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=32)


def timing_arguments(parser, steps: int, warmup: int) -> None:
    """The arguments every step-time benchmark takes: timed and untimed rounds, --quick, --json."""
    parser.add_argument("--steps", type=int, default=steps, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds after the first call")
    parser.add_argument("--quick", action="store_true", help="a smoke run on QUICK_GPT")
    parser.add_argument("--json")


def gpt_step(cfg: GPTConfig = GPTConfig(), seed: int = 0):
    """A fresh tiny GPT, its AdamW, and an ordinary training step over them."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    train_step = training_step(model.loss, opt)

    return model, opt, train_step


def batches(cfg: GPTConfig, batch_size: int, count: int, seed: int = 0):
    data = ByteBatches(block_size=cfg.block_size)
    generator = torch.Generator().manual_seed(seed)
    return [data.batch(batch_size, generator) for _ in range(count)]


def time_steps(step: Callable, data: list, warmup: int) -> tuple[float, list[float]]:
    """First call's seconds (compile included), then per-step seconds after `warmup` calls."""
    t0 = time.perf_counter()
    step(*data[0])
    first = time.perf_counter() - t0
    times = []
    for i, batch in enumerate(data[1:]):
        t0 = time.perf_counter()
        step(*batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return first, times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); each column as wide as its widest cell, a
    missing or None value an empty cell."""
    cells = [[format(row[key], spec) if row.get(key) not in (None, "") else "" for key, _, spec in columns]
             for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (_, header, _) in enumerate(columns)]
    left = [spec.startswith("<") for _, _, spec in columns]

    def line(texts):
        return "  ".join(t.ljust(w) if l else t.rjust(w) for t, w, l in zip(texts, widths, left)).rstrip()

    print(line([header for _, header, _ in columns]))
    for texts in cells:
        print(line(texts))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


def lordo_compile(train_step, policy=None, compiler="inductor"):
    return lc.compile(train_step, policy or lc.Policy(), compiler=compiler)
