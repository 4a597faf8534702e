"""MSTConfig validation and the public construction paths."""

import pytest

import mst_fx


@pytest.mark.parametrize("field,value", [
    ("chunks", 0), ("chunks", 2.5), ("chunks", True), ("chunk_bytes", -1),
    ("min_chunk_tokens", 0), ("max_chunks", 0), ("min_expansion", 1.0),
    ("min_expansion", "2"), ("passes", "mlp"), ("passes", ("mlp", "nope")),
])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        mst_fx.MSTConfig(**{field: value})


def test_chunks_and_chunk_bytes_are_exclusive():
    with pytest.raises(ValueError, match="chunk_bytes"):
        mst_fx.MSTConfig(chunks=4, chunk_bytes=1 << 20)


def test_config_is_frozen():
    with pytest.raises(Exception):
        mst_fx.MSTConfig().chunks = 3


def test_make_backend_overrides():
    backend = mst_fx.make_backend(chunks=8)
    assert backend.config.chunks == 8 and backend.config.passes == ("mlp", "lm_head", "attention")
    base = mst_fx.MSTConfig(min_chunk_tokens=64)
    backend = mst_fx.make_backend(base, max_chunks=4)
    assert (backend.config.min_chunk_tokens, backend.config.max_chunks) == (64, 4)
    with pytest.raises(ValueError, match="no field"):
        mst_fx.make_backend(chunk=8)
    with pytest.raises(ValueError, match="chunks"):
        mst_fx.make_backend(chunks=-2)


def test_passes_package_is_importable():
    from mst_fx.passes import PASSES
    from mst_fx.passes.graph import mlp

    assert PASSES["mlp"] is mlp and mlp.KIND == "mlp"


@pytest.mark.parametrize("field,bad", [("lm_head_grad", "backward"), ("logits", "none"),
                                       ("fp32_weight_grad", 1)])
def test_lm_head_fields_are_validated(field, bad):
    with pytest.raises(ValueError, match=field):
        mst_fx.MSTConfig(**{field: bad})


def test_passes_can_leave_the_head_alone():
    assert mst_fx.MSTConfig(passes=("mlp",)).passes == ("mlp",)
