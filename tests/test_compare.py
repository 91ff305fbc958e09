"""The parity tests' oracle, tests/common.py's `compare`: what it lets through and what it catches."""

import pytest
import torch

from common import assert_close, compare


def _weights():
    generator = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(8, 8, generator=generator), "bias": torch.full((8,), 1e-3)}


def test_a_small_tensor_is_held_to_its_own_size():
    expected = _weights()
    wrong = {**expected, "bias": expected["bias"] * 1.01}
    # Relative to the largest value compared, 1e-5 off: what max|a - b| / max|a| let through.
    assert (wrong["bias"] - expected["bias"]).abs().max() / expected["weight"].abs().max() < 1e-5
    comparison = compare(wrong, expected)
    assert not comparison.ok and comparison.name == "bias"
    assert comparison.ratio == pytest.approx(1e-5 / (1e-5 * 1e-3 + 1e-6 * 1e-3), rel=1e-3)


def test_float32_rounding_passes():
    expected = _weights()
    rounded = {name: (t.double() * (1 + 3e-7)).float() for name, t in expected.items()}
    assert compare(rounded, expected).ok


def test_near_zero_elements_are_measured_against_their_tensors_rms():
    expected = torch.tensor([1.0, -1.0, 0.0])  # rms sqrt(2/3)
    assert compare(torch.tensor([1.0, -1.0, 8e-7]), expected).ok
    comparison = compare(torch.tensor([1.0, -1.0, 9e-7]), expected)
    assert not comparison.ok and comparison.index == (2,)
    assert comparison.allowed == pytest.approx(1e-6 * (2 / 3) ** 0.5)


def test_zero_stays_zero_and_nan_never_matches():
    assert not compare(torch.tensor([1e-30]), torch.zeros(1)).ok
    assert not compare(torch.tensor([float("nan")]), torch.tensor([float("nan")])).ok
    assert compare(torch.tensor([float("inf")]), torch.tensor([float("inf")])).ok


def test_names_lengths_shapes_and_dtypes_must_match():
    expected = _weights()
    with pytest.raises(AssertionError, match=r"missing \['bias'\], extra \[\]"):
        compare({"weight": expected["weight"]}, expected)
    with pytest.raises(AssertionError, match=r"missing \['#1'\]"):
        compare([expected["weight"]], list(expected.values()))
    with pytest.raises(AssertionError, match=r"bias: torch.float32\[1\] compared with torch.float32\[8\]"):
        compare({**expected, "bias": expected["bias"][:1]}, expected)
    with pytest.raises(AssertionError, match=r"bias: torch.float64\[8\] compared with torch.float32\[8\]"):
        compare({**expected, "bias": expected["bias"].double()}, expected)


def test_the_failure_names_the_worst_tensor_and_element():
    expected = _weights()
    wrong = {**expected, "weight": expected["weight"].clone()}
    wrong["weight"][3, 5] += 0.5
    with pytest.raises(AssertionError, match=r"^step 7: worst element weight\[3, 5\]: "):
        assert_close(wrong, expected, msg="step 7")
