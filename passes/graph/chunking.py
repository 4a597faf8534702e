"""The rewrite engine: turn a detected token-wise region into a loop over mini-sequences.

Mechanism (measured choices, see docs/design.md):
- The region's nodes are copied into a *body* GraphModule that takes one chunk of tokens
  ``[n, d]`` plus the region's other inputs (weights, biases) whole.
- The body is wrapped in ``tag_activation_checkpoint``, so autograd keeps only the body's
  inputs and recomputes its intermediates in backward. Inside a region that is itself under
  activation checkpointing the wrap stays by default (MSTConfig.recompute_in_checkpoint):
  the outer recompute re-runs all chunks before the first chunk's backward, so without it
  every chunk's intermediates would be alive at once; with it each chunk's forward runs a
  third time, right before its backward.
- Each chunk runs through ``invoke_subgraph``: a fusion and scheduling barrier, so Inductor
  compiles the body once (per chunk shape) and cannot merge the chunks back into one
  full-size computation.
- Chunks come from ``tensor_split`` over the flattened tokens (sizes differ by at most 1,
  so any token count works; with a symbolic count, ``symbolic_rows``) and go back together
  with ``cat``. Each chunk output is
  multiplied by 1.0 so that every chunk's incoming gradient is a fresh tensor with the
  same metadata, and one backward body serves all chunks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from mst_fx import fx
from mst_fx.passes.graph.tokenwise import chunk_call, classify, module_attr, value


@dataclass
class Body:
    """A chunk body ready to be emitted: the module, what it is fed, and its name."""

    module: GraphModule
    externals: list[Node]  # graph values passed whole to every chunk, after the chunk itself
    key: str  # equal keys mean interchangeable bodies (one compiled subgraph)


def build_body(owner: GraphModule, nodes: list[Node], data: Node, end: Node,
               checkpoint: bool, sizes: int = 0) -> Body:
    """Copy ``nodes`` (in graph order, ``end`` last) into a body over one chunk of ``data``.

    ``sizes``: the body also takes that many symbolic sizes, last (unused by its code):
    Inductor compiles a subgraph's symbolic shapes from the symbols its inputs bind, and a
    chunk's row count (a floor division of them) binds none."""
    region = set(nodes)
    calls = [(n, chunk_call(n, classify(n))) for n in nodes]
    externals: list[Node] = []

    attrs: list[Node] = []  # submodules an op calls (autograd.Function bodies): copied

    def collect(a: Node) -> Node:
        if module_attr(a):
            attrs.append(a)
        elif a is not data and a not in region and a not in externals:
            externals.append(a)
        return a

    for n, call in calls:
        # A view that only regroups tokens is the identity on a [n, d] chunk (call None).
        map_arg(n.args[0] if call is None else (call[2], call[3]), collect)

    inner = Graph()
    env: dict[Node, Node] = {data: inner.placeholder("chunk")}
    for i, e in enumerate(externals):
        env[e] = inner.placeholder(f"ext_{i}")
    for i in range(sizes):
        inner.placeholder(f"size_{i}")
    for a in attrs:
        env[a] = inner.get_attr(a.target)
    for n, call in calls:
        if call is None:
            env[n] = env[n.args[0]]
            continue
        op, target, args, kwargs = call
        # Names come from the targets, not the model's nodes, so that the same block in
        # every layer gives the same code, the same key, and one compiled body.
        env[n] = inner.create_node(op, target, map_arg(args, env.__getitem__),
                                   map_arg(kwargs, env.__getitem__))
    inner.output((env[end],))
    wrapped = GraphModule(owner, inner)

    module = checkpoint_wrapped(wrapped, len(externals) + 1 + sizes) if checkpoint else wrapped
    shapes = [tuple(value(e).shape) if value(e) is not None else repr(e) for e in externals]
    key = f"{wrapped.code}|{checkpoint}|{shapes}|{_dtypes(externals)}|sizes={sizes}"
    return Body(module, externals, key)


def emit_chunk_loop(owner: GraphModule, data: Node, end: Node, bodies: list[tuple[Body, str, str]],
                    width: int, symbolic: bool = False, size_args: list[Node] = ()) -> Node:
    """Insert, before ``end``, the loop that computes ``end``'s value; returns the new node.

    ``bodies`` has one entry per chunk: (body, attribute name, invoke_subgraph identifier).
    Interchangeable bodies share a name, so Inductor compiles them once. ``symbolic``: the
    token dims are symbolic and the same in ``data`` and ``end``; the output takes them
    from ``data`` at run time, and every body gets ``size_args`` last (size_inputs).
    """
    g = owner.graph
    ev = value(end)
    with g.inserting_before(end):
        sizes = [g.call_method("size", (data, i)) for i, s in enumerate(ev.shape[:-1])
                 if not isinstance(s, int)] if symbolic else []
        it = iter(sizes)
        out_shape = tuple(s if isinstance(s, int) else next(it) for s in ev.shape[:-1]) + (ev.shape[-1],)
        flat = g.call_method("reshape", (data, (-1, width)))
        parts = split_tokens(g, flat, len(bodies), symbolic)
        outs = []
        for i, (body, attr, ident) in enumerate(bodies):
            if not hasattr(owner, attr):
                owner.add_submodule(attr, body.module)
            piece = g.call_function(operator.getitem, (parts, i))
            call = g.call_function(fx.INVOKE,
                                   (g.get_attr(attr), ident, piece, *body.externals, *size_args))
            outs.append(fresh(g, g.call_function(operator.getitem, (call, 0))))
        joined = g.call_function(torch.cat, (outs,))
        result = g.call_method("reshape", (joined, out_shape))
    result.meta["example_value"] = end.meta.get("example_value")
    return result


def bounded_chunks(config, tokens: int, natural: int, symbolic: bool = False) -> tuple[int, str]:
    """M for a region of ``tokens`` whose pass would pick ``natural`` chunks: the config's
    fixed ``chunks`` if set, else ``natural`` capped by ``max_chunks`` and by
    ``tokens // min_chunk_tokens``. With it, the reason to give when M < 2.

    ``symbolic``: the graph serves every length (dynamic shapes), and ``tokens`` is only the
    one Dynamo traced with, which may be the shortest the run will see; M is then planned
    for long sequences (no ``min_chunk_tokens`` cap): at short lengths its chunks are
    smaller than a static graph's, never larger."""
    if symbolic:
        return (config.chunks or min(natural, config.max_chunks),
                f"chunks={config.chunks} or max_chunks={config.max_chunks}: nothing to split")
    if config.chunks is not None:
        return (min(config.chunks, tokens),
                f"chunks={config.chunks} with {tokens} tokens: nothing to split")
    return (min(natural, config.max_chunks, tokens // config.min_chunk_tokens),
            f"{tokens} tokens give fewer than 2 chunks of min_chunk_tokens={config.min_chunk_tokens}")


def split_tokens(g: Graph, t: Node, chunks: int, symbolic: bool, rows: list | None = None) -> Node:
    """The node splitting ``t`` (tokens first) into ``chunks`` pieces: tensor_split for a
    static token count, split at ``rows`` (default symbolic_rows of ``t``) for a symbolic one."""
    if not symbolic:
        return g.call_function(torch.tensor_split, (t, chunks))
    return g.call_function(torch.split, (t, rows if rows is not None else symbolic_rows(g, t, chunks)))


def size_inputs(owner: GraphModule, data: Node, dims) -> list[tuple[Node, torch.SymInt]]:
    """What a chunk body takes last so that Inductor can bind its symbolic shapes, as
    (node in ``owner``, example value): one per free symbol of the symbolic ``dims`` of
    ``data``, read from the graph input that holds that very symbol (a SymInt input, or a
    dim of an input tensor). Not the dims themselves, read from ``data``: a dim such as
    ``s0 + s1`` (HF's ``hidden[:, -logits_to_keep:]`` with a symbolic ``logits_to_keep``)
    binds neither symbol, and a dim read at run time may carry a symbol the shape
    environment has since replaced (FSDP2's layer graphs: ``s50``, replaced by ``s26``),
    which binds only the old name; Inductor then fails on the chunk sizes ("expected [s26]
    to have been codegen-ed"). Where a symbol has no such input, the dims of ``data``."""
    sym = [(i, d) for i, d in enumerate(dims) if isinstance(d, torch.SymInt)]
    wanted = sorted({x for _, d in sym for x in d.node.expr.free_symbols}, key=str)
    found = _symbol_sources(owner, set(wanted))
    picks = [found[x] for x in wanted] if len(found) == len(wanted) else [(data, i, d) for i, d in sym]
    first = next(n for n in owner.graph.nodes if n.op != "placeholder")
    out = []
    for node, i, v in picks:
        if i is None:
            out.append((node, v))
            continue
        with owner.graph.inserting_before(first if node.op == "placeholder" else node.next):
            out.append((owner.graph.call_method("size", (node, i)), v))
    return out


def _symbol_sources(owner: GraphModule, wanted: set) -> dict:
    """symbol -> (graph input, dim or None for a SymInt input, its SymInt) for the
    ``wanted`` symbols that a graph input holds as they are: its SymInt's own expression
    (``node._expr``, before the shape environment's replacements) is the symbol."""
    found: dict = {}
    for n in owner.graph.nodes:
        if n.op != "placeholder":
            break
        v = n.meta.get("example_value")
        dims = [(None, v)] if isinstance(v, torch.SymInt) else \
            list(enumerate(v.shape)) if isinstance(v, torch.Tensor) else []
        for i, d in dims:
            if isinstance(d, torch.SymInt):
                raw = getattr(d.node, "_expr", d.node.expr)
                if raw in wanted and raw == d.node.expr:
                    found.setdefault(raw, (n, i, d))
    return found


def fresh(g: Graph, y: Node) -> Node:
    """``y * 1.0``: a fresh tensor per chunk output, so that every chunk's incoming gradient
    has the same metadata and one backward body serves all chunks."""
    return g.call_function(operator.mul, (y, 1.0))


def symbolic_rows(g: Graph, flat: Node, chunks: int) -> list:
    """Row counts for a symbolic token count n: M-1 chunks of n // M and the rest last.
    (tensor_split's sizes depend on n % M, so it would guard on it: a recompile whenever
    the remainder changes sign.) Two shapes, so two compiled bodies, as with static n."""
    n = g.call_method("size", (flat, 0))
    q = g.call_function(operator.floordiv, (n, chunks))
    last = g.call_function(operator.sub, (n, g.call_function(operator.mul, (q, chunks - 1))))
    return [q] * (chunks - 1) + [last]


def symbolic_row_labels(chunks: int) -> list[str]:
    """Body keys for symbolic_rows' chunks."""
    return ["n//M"] * (chunks - 1) + ["n-(M-1)*(n//M)"]


def chunk_rows(tokens: int, chunks: int) -> list[int]:
    """Row counts of ``tensor_split(tokens, chunks)``: the first ``tokens % chunks`` get one more."""
    q, r = divmod(tokens, chunks)
    return [q + 1] * r + [q] * (chunks - r)


def checkpoint_wrapped(inner: GraphModule, n_inputs: int, n_outputs: int = 1) -> GraphModule:
    """A module calling ``inner`` under activation checkpointing (what Dynamo emits for
    ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)``)."""
    g = Graph()
    args = [g.placeholder(f"arg_{i}") for i in range(n_inputs)]
    out = g.call_function(fx.CHECKPOINT,
                          (g.get_attr("body"), *args), {"use_reentrant": False})
    g.output(tuple(g.call_function(operator.getitem, (out, i)) for i in range(n_outputs)))
    root = torch.nn.Module()
    root.body = inner
    return GraphModule(root, g)


def _dtypes(nodes: list[Node]) -> list[str]:
    return [str(value(n).dtype) if value(n) is not None else "-" for n in nodes]
