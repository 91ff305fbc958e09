"""Steps as real clients write them (BatchNorm, gradient accumulation, bf16 autocast, tied
weights, fused AdamW, nn.MultiheadAttention, Hugging Face Llama and BERT), each trained for
three steps through `lc.compile(..., compiler="aot_eager")` and by eager Python from the
same initialisation, and required to end in the same losses, parameters and buffers."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lordo_compile as lc
from common import assert_close, named_parameters

STEPS = 3


def _named_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _twins(build: Callable):
    """Two identical (model, step) pairs from `build`, the first compiled."""
    torch.manual_seed(0)
    model, train_step = build()
    torch.manual_seed(0)
    reference, eager_step = build()
    return model, lc.compile(train_step, lc.Policy(), compiler="aot_eager"), reference, eager_step


def _check(build: Callable, batches, *, buffers: bool = False, skip: Callable[[str], bool] = lambda name: False):
    """Losses, parameters (and buffers) of the compiled twin equal eager's; returns the
    compiled model, its step and the eager model."""
    model, step, reference, eager_step = _twins(build)
    for batch in batches:
        assert_close(step(*batch), eager_step(*batch).detach(), msg="loss")
    kept = lambda tensors: {name: t for name, t in tensors.items() if not skip(name)}  # noqa: E731
    assert_close(kept(named_parameters(model)), kept(named_parameters(reference)))
    if buffers:
        assert_close(_named_buffers(model), _named_buffers(reference))
    return model, step, reference


def _batches(make: Callable, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [make(generator) for _ in range(STEPS)]


def _classification(batch: int, shape: tuple[int, ...], classes: int):
    return _batches(lambda g: (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)))


def _tokens(batch: int, length: int, vocab: int):
    def make(g):
        idx = torch.randint(0, vocab, (batch, length + 1), generator=g)
        return idx[:, :-1], idx[:, 1:]

    return _batches(make)


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable) -> Callable:
    def train_step(x, y):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return train_step


def _lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_batchnorm_cnn_updates_running_stats_like_eager():
    def build():
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, _step(model, opt, F.cross_entropy)

    model, step, _ = _check(build, _classification(8, (3, 8, 8), 10), buffers=True)
    assert int(model[1].num_batches_tracked) == STEPS
    assert step.captures == 1


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_gradient_accumulation_equals_eager(micro_batches):
    def build():
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def train_step(x, y):
            total = 0.0
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                loss = F.mse_loss(model(xs), ys) / micro_batches
                loss.backward()
                total = total + loss.detach()
            opt.step()
            opt.zero_grad()
            return total

        return model, train_step

    batches = _batches(lambda g: (torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)))
    _, step, _ = _check(build, batches)
    assert step.captures == 1


def test_bf16_autocast_equals_eager():
    def build():
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def train_step(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        return model, train_step

    _, step, _ = _check(build, _classification(16, (16,), 10))
    assert step.captures == 1
    # Equal losses would also come from a capture that dropped autocast and ran in float32.
    assert "bf16[" in str(step.graphs["step"]["captured"])


class _TiedLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.body(self.embed(idx)))


def test_tied_weights_stay_tied_and_equal_eager():
    def build():
        model = _TiedLM()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, _step(model, opt, _lm_loss)

    model, step, _ = _check(build, _tokens(4, 8, 64))
    assert model.head.weight is model.embed.weight
    assert step.captures == 1


def test_fused_adamw_equals_eager():
    opts = []

    def build():
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        opts.append(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True))
        return model, _step(model, opts[-1], F.mse_loss)

    batches = _batches(lambda g: (torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)))
    model, step, reference = _check(build, batches)
    assert step.captures == 1

    def state(model, opt):
        return {f"{name}.{key}": value for name, p in model.named_parameters() for key, value in opt.state[p].items()}

    assert_close(state(model, opts[0]), state(reference, opts[1]))


class _Attention(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.embed(idx)
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        out, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(h + out)


def test_multihead_attention_equals_eager():
    def build():
        model = _Attention()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, _step(model, opt, _lm_loss)

    _, step, _ = _check(build, _tokens(4, 8, 64))
    assert step.captures == 1


_TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _hf_step(model: nn.Module) -> Callable:
    # SGD, not Adam: see test_hf_example.py (zero-in-exact-arithmetic gradients).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step(x, y):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return train_step


def test_llama_with_labels_equals_eager():
    transformers = pytest.importorskip("transformers")

    def build():
        config = transformers.LlamaConfig(**_TINY, num_key_value_heads=2, attention_dropout=0.0)
        model = transformers.LlamaForCausalLM(config)
        return model, _hf_step(model)

    def make(g):
        x = torch.randint(0, 128, (2, 16), generator=g)
        return x, x  # a causal LM shifts its labels itself

    _, step, _ = _check(build, _batches(make))
    assert step.captures == 1


def test_bert_masked_lm_with_labels_equals_eager():
    transformers = pytest.importorskip("transformers")

    def build():
        config = transformers.BertConfig(**_TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForMaskedLM(config)
        return model, _hf_step(model)

    def make(g):
        x = torch.randint(0, 128, (2, 16), generator=g)
        masked = torch.rand(x.shape, generator=g) < 0.3
        return x.masked_fill(masked, 0), x.masked_fill(~masked, -100)

    # A key bias adds the same q.b_k to every score of a query, which softmax cancels: its
    # gradient is zero in exact arithmetic, and both runs' values are rounding noise (about
    # 1e-13 against weights of 0.02) that differs with evaluation order. It must stay noise.
    is_key_bias = lambda name: name.endswith("attention.self.key.bias")  # noqa: E731
    model, step, reference = _check(build, _batches(make), skip=is_key_bias)
    assert step.captures == 1
    for trained in (model, reference):
        for name, p in trained.named_parameters():
            if is_key_bias(name):
                assert p.abs().max() < 1e-9, name
