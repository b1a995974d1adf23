"""``pipelines.generate`` exposes the three generate wrappers under one module."""

import pytest

import pipelines.generate as generate
from pipelines.generate_dllm import dllm_generate
from pipelines.generate_llm import ftp_generate
from tokenprune.fopru import fopru_generate


def test_generate_entry_points_resolve_to_the_wrappers():
    assert generate.dllm_generate is dllm_generate
    assert generate.ftp_generate is ftp_generate
    assert generate.fopru_generate is fopru_generate
    with pytest.raises(AttributeError, match="no attribute 'beam_search'"):
        generate.beam_search
