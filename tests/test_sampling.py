"""Sampling filters and the seeded draw."""

from __future__ import annotations

import pytest
import torch

from dsv4cli.engine.sampling import InvalidSamplingParam, SamplingParams, filter_logits, make_sampler
from dsv4cli.errors import UsageError

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))


def kept(params: SamplingParams) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS, params)).nonzero().flatten().tolist()


def test_defaults_follow_deepseek():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert kept(p) == [0, 1, 2, 3, 4]


def test_top_k_top_p_min_p():
    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.5)) == [0]  # the first token alone reaches 0.5
    assert kept(SamplingParams(top_p=0.6)) == [0, 1]
    assert kept(SamplingParams(top_p=0.9)) == [0, 1, 2, 3]
    assert kept(SamplingParams(min_p=0.2)) == [0, 1, 2]  # p >= 0.1


def test_greedy_at_temperature_zero():
    sample = make_sampler(SamplingParams(temperature=0))
    assert all(sample(LOGITS) == 0 for _ in range(5))


def test_seed_reproduces_and_distribution_matches():
    a = make_sampler(SamplingParams(seed=3))
    b = make_sampler(SamplingParams(seed=3))
    draws = [a(LOGITS) for _ in range(4000)]
    assert draws[:50] == [b(LOGITS) for _ in range(50)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert torch.allclose(freq, LOGITS.exp(), atol=0.03)


def test_temperature_sharpens():
    cold = make_sampler(SamplingParams(temperature=0.1, seed=0))
    assert sum(cold(LOGITS) == 0 for _ in range(200)) > 195


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1}, {"temperature": NAN}, {"temperature": INF}, {"top_p": 0}, {"top_p": 1.5}, {"top_p": NAN},
    {"top_p": -INF}, {"top_k": -2}, {"top_k": 1.5}, {"top_k": True}, {"min_p": -0.1}, {"min_p": 1.5},
    {"min_p": NAN}, {"temperature": "hot"}, {"seed": "1"}, {"seed": 1.0},
])
def test_invalid_values_are_refused_with_the_parameter_named(kwargs):
    (name,) = kwargs
    with pytest.raises(InvalidSamplingParam, match=name) as caught:
        SamplingParams(**kwargs)
    assert isinstance(caught.value, UsageError) and isinstance(caught.value, ValueError)
    assert caught.value.param == name and "--" not in caught.value.one_line()


def test_edges_of_the_ranges_are_valid():
    assert kept(SamplingParams(min_p=1.0)) == [0]  # only the most likely token
    assert kept(SamplingParams(top_p=1.0, min_p=0.0, top_k=0)) == [0, 1, 2, 3, 4]


def test_tiny_temperature_is_greedy_not_nan_and_any_whole_seed_works():
    sample = make_sampler(SamplingParams(temperature=1e-37, seed=2**70))  # logits / T would overflow to -inf
    assert all(sample(LOGITS.flip(0) * 100) == 4 for _ in range(5))
    assert make_sampler(SamplingParams(seed=-1))(LOGITS) in range(5)


def test_with_value_parses_repl_input():
    p = SamplingParams().with_value("temperature", "0.7").with_value("top_k", "40").with_value("seed", "5")
    assert (p.temperature, p.top_k, p.seed) == (0.7, 40, 5)
    assert p.with_value("seed", "none").seed is None
    with pytest.raises(UsageError, match="unknown"):
        p.with_value("nucleus", "1")
    with pytest.raises(UsageError, match="number"):
        p.with_value("top_p", "high")
    with pytest.raises(UsageError, match="temperature"):
        p.with_value("temperature", "nan")  # `/set temperature nan` in the REPL
