"""Bad input gets a clear error that names the parameter, the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memory_plugins as mp
from memory_plugins.models import DecoderConfig, ReferenceDecoder


def _model() -> ReferenceDecoder:
    return ReferenceDecoder(vocab_size=11, dim=16, depth=1, heads=2)


def test_unknown_memory_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown memory 'lstm'; choose from \[.*'xl'.*\]"):
        mp.wrap(_model(), "lstm")


def test_misspelled_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"no option 'memlen' \(did you mean 'mem_len'\?\)"):
        mp.wrap(_model(), "xl", memlen=8)


@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_bad_value_names_parameter_value_and_range(value: object) -> None:
    with pytest.raises(ValueError, match=r"XLConfig\.mem_len must be an int >= 1, got"):
        mp.wrap(_model(), "xl", mem_len=value)


@pytest.mark.parametrize("option", ["kl_weight", "sigma_0", "ridge_lambda", "fit_cache_mib"])
def test_an_infinite_float_is_refused_by_a_range_that_says_it_is_open(option: str) -> None:
    """Non-finite floats are refused, so a range without an upper bound reads (…, inf), never …, inf]."""
    with pytest.raises(ValueError, match=rf"ContinuousConfig\.{option} must be a float in [\[(][^,]+, inf\), got inf"):
        mp.ContinuousConfig(**{option: float("inf")})


def test_config_object_and_options_together_is_refused() -> None:
    with pytest.raises(TypeError, match="config object and extra options"):
        mp.wrap(_model(), mp.XLConfig(mem_len=4), mem_len=8)


def test_bad_reset_mask_is_explained() -> None:
    wrapped = mp.wrap(_model(), "xl", mem_len=4)
    wrapped(torch.randint(0, 11, (3, 5)))
    with pytest.raises(ValueError, match="1-D bool tensor over the batch, got torch.int64"):
        wrapped.reset_memory(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="has 2 entries but the memory holds 3 samples"):
        wrapped.reset_memory(torch.tensor([True, False]))


def test_unsupported_model_names_the_supported_ones_and_the_protocol() -> None:
    with pytest.raises(TypeError, match=r"no adapter handles it.*protocol.*MemoryAttention"):
        mp.wrap(nn.Sequential(nn.Linear(4, 4)), "xl")


def test_double_wrap_and_unmatched_targets_are_refused() -> None:
    wrapped = mp.wrap(_model(), "xl", mem_len=4)
    with pytest.raises(ValueError, match="already wrapped"):
        mp.wrap(wrapped, "xl")
    with pytest.raises(ValueError, match="already has a memory hook"):
        mp.wrap(wrapped.model, "xl")
    with pytest.raises(ValueError, match=r"targets=\['decoder\.\*'\] matches none"):
        mp.wrap(_model(), "xl", targets=["decoder.*"])


def test_targets_select_layers_by_glob() -> None:
    model = ReferenceDecoder(vocab_size=11, dim=16, depth=3, heads=2)
    wrapped = mp.wrap(model, "xl", mem_len=4, targets=["blocks.2.*"])
    assert wrapped.memory.names == ["blocks.2.attn"]
    assert model.blocks[0].attn.memory_hook is None and model.blocks[2].attn.memory_hook is not None


def test_decoder_config_validation() -> None:
    with pytest.raises(ValueError, match=r"DecoderConfig\.dim must be a multiple of 2\*heads=8, got 20"):
        DecoderConfig(dim=20, heads=4)
    with pytest.raises(ValueError, match=r"DecoderConfig\.depth must be an int >= 1, got 0"):
        DecoderConfig(depth=0)


def test_runner_validates_its_arguments() -> None:
    wrapped = mp.wrap(_model(), "xl", mem_len=4)
    with pytest.raises(ValueError, match="segment_len must be an int >= 1, got 0"):
        mp.SegmentRunner(wrapped, 0)
    with pytest.raises(ValueError, match="needs a memory built with detach=False"):
        mp.SegmentRunner(wrapped, 4, bptt_segments=2)


def test_registering_a_different_backend_under_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'xl' is already registered"):
        mp.register_memory("xl", mp.XLConfig, nn.Identity)
