"""RoPE scaling: frequencies and attention factors against the published formulas, computed here
independently in plain float64 Python, at several scale factors."""

import math

import pytest
import torch

from ltstudy.models.rope import Rotary, rope_frequencies

D, BASE, ORIGINAL = 128, 500000.0, 8192


def theta(i: int, base: float = BASE) -> float:
    """Frequency of dimension pair i: base^(-2i/d)."""
    return base ** (-2 * i / D)


def close(actual, expected):
    assert actual.shape == (D // 2,)
    torch.testing.assert_close(
        actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0
    )


FACTORS = [2.0, 4.0, 8.0, 32.0]


def test_no_scaling():
    freqs, factor = rope_frequencies(D, BASE, None)
    close(freqs, [theta(i) for i in range(D // 2)])
    assert factor == 1.0


@pytest.mark.parametrize("s", FACTORS)
def test_linear_interpolation(s):
    freqs, factor = rope_frequencies(D, BASE, {"type": "linear", "factor": s})
    close(freqs, [theta(i) / s for i in range(D // 2)])
    assert factor == 1.0


@pytest.mark.parametrize("s", FACTORS)
def test_ntk_aware(s):
    freqs, _ = rope_frequencies(D, BASE, {"type": "ntk", "factor": s})
    close(freqs, [theta(i, BASE * s ** (D / (D - 2))) for i in range(D // 2)])


@pytest.mark.parametrize("s", FACTORS)
def test_dynamic_ntk_grows_the_base_beyond_the_original_length(s):
    scaling = {"type": "dynamic", "factor": s, "original_context": ORIGINAL}
    close(
        rope_frequencies(D, BASE, scaling, seq_len=ORIGINAL)[0], [theta(i) for i in range(D // 2)]
    )
    T = 3 * ORIGINAL
    grown = BASE * (s * T / ORIGINAL - (s - 1)) ** (D / (D - 2))
    close(
        rope_frequencies(D, BASE, scaling, seq_len=T)[0], [theta(i, grown) for i in range(D // 2)]
    )


@pytest.mark.parametrize("s", FACTORS)
@pytest.mark.parametrize("base", [10000.0, 1e6])
def test_yarn(s, base):
    scaling = {"type": "yarn", "factor": s, "original_context": ORIGINAL}
    freqs, factor = rope_frequencies(D, base, scaling)

    def corr(n_rotations):  # dimension whose wavelength makes n rotations over the original context
        return D * math.log(ORIGINAL / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), D - 1)
    expected = []
    for i in range(D // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1 - ramp  # extrapolation weight: 1 for high frequencies
        t = theta(i, base)
        expected.append(t / s * (1 - keep) + t * keep)
    close(freqs, expected)
    assert factor == pytest.approx(0.1 * math.log(s) + 1)
    assert freqs[0] == pytest.approx(theta(0, base))  # fastest dimension untouched
    assert freqs[-1] == pytest.approx(theta(D // 2 - 1, base) / s)  # slowest fully interpolated


@pytest.mark.parametrize("s", FACTORS)
def test_llama3(s):
    scaling = {
        "type": "llama3",
        "factor": s,
        "original_context": ORIGINAL,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    freqs, factor = rope_frequencies(D, BASE, scaling)
    expected = []
    for i in range(D // 2):
        t = theta(i)
        wavelen = 2 * math.pi / t
        if wavelen < ORIGINAL / 4:  # high frequency: unchanged
            expected.append(t)
        elif wavelen > ORIGINAL / 1:  # low frequency: interpolated
            expected.append(t / s)
        else:
            smooth = (ORIGINAL / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * t / s + smooth * t)
    close(freqs, expected)
    assert factor == 1.0


def test_rotary_tables_carry_the_attention_factor_and_offset():
    rotary = Rotary(D, BASE, {"type": "yarn", "factor": 4.0, "original_context": ORIGINAL})
    cos, sin = rotary(10, 5, torch.device("cpu"))
    m = 0.1 * math.log(4.0) + 1
    freqs, _ = rope_frequencies(D, BASE, rotary.scaling)
    angle = 12 * freqs[3].item()  # position 10 + 2, dimension 3
    assert cos[2, 3].item() == pytest.approx(m * math.cos(angle), rel=1e-5)
    assert sin[2, 3 + D // 2].item() == pytest.approx(m * math.sin(angle), rel=1e-5)
