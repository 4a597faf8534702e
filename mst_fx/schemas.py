"""Compile time: the schema of a chunk body's invoke_subgraph call, traced once per body.

Every ``invoke_subgraph`` call that autograd sees has its schema generated
(``HigherOrderOperator.py_autograd_impl`` -> ``gen_schema``), and generating it re-traces
the whole body (``materialize_as_graph``) only to learn whether the body writes to one of
its inputs. A rewritten Llama-3.2-1B graph makes 16 layers x 8 chunks of such calls,
traced again by AOTAutograd's metadata pass and its joint trace: on the H100 656
re-traces took about a fifth of the compile (cProfile, 8k tokens).

Calls with the same identifier run the same body (that is what the identifier means to
invoke_subgraph; mst_fx gives one identifier per distinct body and chunk shape), so within
one compile the schema of an ``mst_`` call is computed once per identifier and operand
layout and reused. invoke_subgraph's autograd names the forward and backward graphs it
derives from a body ``fw_<identifier>`` and ``bw_<identifier>_<n>``; torch 2.11 generates
the schema of every ``fw_`` call too (256 re-traces for 16 layers x 8 chunks), so those
names are memoized as well. Other calls (a user's own nested_compile_region) are not
touched.
"""

from __future__ import annotations

import contextlib

import torch

from mst_fx import fx


@contextlib.contextmanager
def cached_chunk_schemas():
    """Within the block, invoke_subgraph's gen_schema is memoized for mst_fx's bodies."""
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    original = invoke_subgraph.gen_schema  # the bound method, or an instance attribute
    cache: dict = {}

    def gen_schema(subgraph, identifier, *operands):
        if not (isinstance(identifier, str) and fx.is_ours(identifier)):
            return original(subgraph, identifier, *operands)
        key = (identifier, id(subgraph), tuple(_layout(o) for o in operands))
        if key not in cache:
            cache[key] = original(subgraph, identifier, *operands)
        return cache[key]

    had_attr = "gen_schema" in vars(invoke_subgraph)
    invoke_subgraph.gen_schema = gen_schema
    try:
        yield
    finally:
        if had_attr:
            invoke_subgraph.gen_schema = original
        else:
            del invoke_subgraph.gen_schema


def _layout(o):
    if isinstance(o, torch.Tensor):
        return ("tensor", tuple(map(str, o.shape)), tuple(map(str, o.stride())), o.dtype,
                o.requires_grad, o.device.type)
    return (type(o).__name__, str(o))
