"""Comparisons the kernel tests share."""
import torch


def assert_matches(results, reference, rtol):
    """Each result within rtol of the reference's largest entry (at least 1): gradients that are
    zero but for rounding (a bias right before a BatchNorm) compare on that floor; integer
    results (a BatchNorm's batch count) must be equal."""
    for i, (got, expected) in enumerate(zip(results, reference, strict=True)):
        if expected.dtype == torch.int64:
            assert torch.equal(got, expected), i
            continue
        scale = expected.abs().max().clamp_min(1.0)
        assert (got - expected).abs().max() <= rtol * scale, i
