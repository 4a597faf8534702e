"""MLP pass: find token-wise MLP blocks and run them over mini-sequences of tokens.

Detection (structural, no model classes): an *expanding* projection (linear, matmul,
addmm as in HF Conv1D; out_features >= min_expansion x in_features) opens a block; every
expanding projection of the same input joins it (gate and up of a GLU). A projection with
LoRA adapters added (mst_fx.passes.graph.projections) counts as one projection. The block grows
forward through token-wise ops (activations, gating products, bias adds, casts, splits of
the feature dim, views that only regroup tokens, dropout) and ends at the one
*contracting* projection. Anything else reached on the way (an op that mixes tokens, an
intermediate also used outside the block, a second token-shaped input, dropout inside a
region the model checkpointed, symbolic token dims that the block regroups) leaves the
block unchanged with that reason.

Mixture-of-experts layers whose experts run as one grouped GEMM over the tokens sorted by
expert (``torch._grouped_mm`` with per-expert row offsets, as Hugging Face's default
"grouped_mm" experts) are not chunked: a chunk of those rows would need the offsets
re-based to it, which this pass does not do. Each such layer is reported as skipped.

Symbolic token counts (dynamic shapes): the chunk count is chosen once, from the length
Dynamo traced with, and the chunks are n // M rows each and the rest last (sizes that
need no guard on n, so one compiled graph serves every length).

Rewriting hands the block to the engine (mst_fx.passes.graph.chunking): a body over one chunk of
tokens, recomputed in backward, called once per chunk through invoke_subgraph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch.fx import GraphModule, Node

from mst_fx import fx
from mst_fx.config import MSTConfig
from mst_fx.passes.graph.chunking import (
    Body,
    bounded_chunks,
    build_body,
    chunk_rows,
    emit_chunk_loop,
    size_inputs,
    symbolic_row_labels,
)
from mst_fx.passes.graph.projections import Projection, find
from mst_fx.passes.graph.tokenwise import (
    AUTOGRAD_FUNCTION,
    LOSS_FUNCTIONS,
    OpInfo,
    chunk_call,
    classify,
    hint,
    last_dim_only,
    module_attr,
    numel,
    op_name,
    same_size,
    value,
)
from mst_fx.report import Reason, Region, Report, Skip, Skipped

KIND = "mlp"


@dataclass
class MLPPlan:
    data: Node  # the block's input, [*tokens, width]
    nodes: list[Node]  # the block in graph order, the contracting projection last
    width: int
    checkpointed: bool  # the block already sits inside an activation-checkpointed region
    symbolic: bool = False  # the token count is symbolic (dynamic shapes)
    wrap: bool = True  # the body runs under its own checkpoint (MSTConfig.recompute_in_checkpoint)

    @property
    def end(self) -> Node:
        return self.nodes[-1]


def detect(gm: GraphModule, config: MSTConfig, checkpointed: bool, where) -> Report:
    """Regions and skipped candidates of ``gm``; ``where(nodes)`` names a module path."""
    report = Report()
    report.skipped += _grouped_experts(gm, where)
    units = find(gm.graph)
    starts_by_data: dict[Node, list[Projection]] = {}
    for n in gm.graph.nodes:
        p = units.get(n)
        if p is not None and p.out is n and p.out_width >= config.min_expansion * p.in_width:
            starts_by_data.setdefault(p.data, []).append(p)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[Node] = set()
    for data, starts in starts_by_data.items():
        try:
            region = _plan(data, starts, units, config, checkpointed, order, where)
        except Skip as e:  # NOT_A_REGION: the projection feeds a loss (the lm_head pass's)
            region = _without_strays(data, starts, units, config, checkpointed, order, where, report)
            if region is None:
                report.skip(KIND, where([p.base for p in starts]), e)
                continue
        if claimed.intersection(region.plan.nodes):
            report.skip(KIND, where([p.base for p in starts]),
                        Skip(Reason.ESCAPES, "overlaps a block found before it (an expansion inside a block)"))
            continue
        claimed.update(region.plan.nodes)
        report.regions.append(region)
    return report


def _without_strays(data: Node, starts: list[Projection], units: dict[Node, Projection], config: MSTConfig,
                    checkpointed: bool, order: dict[Node, int], where, report: Report) -> Region | None:
    """The block of ``starts`` less the projections that do not reach its contracting
    projection, after the whole group failed: in a parallel block, attention's fused QKV
    (3x the width) reads the MLP's input too, and grows into the head reshape instead of the
    MLP's down projection. Each start is grown alone; those that close at one contracting
    projection are the block (the most of them), the others are skipped with their own
    reason. None unless some starts close alone, all at one projection, and others do not
    (the group's reason stands)."""
    if len(starts) < 2:
        return None
    by_end: dict[Node, list[Projection]] = {}
    strays: list[tuple[Projection, Skip]] = []
    for p in starts:
        try:
            by_end.setdefault(_grow([p], units, checkpointed)[1], []).append(p)
        except Skip as e:
            strays.append((p, e))
    if len(by_end) != 1 or not strays:
        return None
    (group,) = by_end.values()
    try:
        region = _plan(data, group, units, config, checkpointed, order, where)
    except Skip:
        return None
    for p, e in strays:
        report.skip(KIND, where([p.base]), e)
    return region


def _grouped_experts(gm: GraphModule, where) -> list[Skipped]:
    """One Skipped per module that runs grouped GEMMs (MoE experts; see the docstring)."""
    seen: dict[str, Skipped] = {}
    for n in gm.graph.nodes:
        name = fx.target_name(n)
        if n.op == "call_function" and "grouped_mm" in name:
            at = where([n])
            seen.setdefault(at, Skipped(KIND, at, (
                f"mixture-of-experts grouped GEMM ({name}) over tokens sorted by expert: "
                "chunking it needs per-chunk expert offsets, not done"), Reason.UNSUPPORTED))
    return list(seen.values())


def rewrite(gm: GraphModule, region: Region, names: dict[str, tuple[str, str]]) -> None:
    """Replace the block by the chunk loop. ``names`` maps body keys to (attribute,
    identifier) across the whole compile, so identical bodies are compiled once."""
    plan: MLPPlan = region.plan
    extra = size_inputs(gm, plan.data, value(plan.data).shape[:-1]) if plan.symbolic else []
    body = build_body(gm, plan.nodes, plan.data, plan.end, checkpoint=plan.wrap,
                      sizes=len(extra))
    per_chunk: list[tuple[Body, str, str]] = []
    rows_of = symbolic_row_labels if plan.symbolic else partial(chunk_rows, region.tokens)
    for rows in rows_of(region.chunks):
        key = f"{body.key}|rows={rows}"
        if key not in names:
            names[key] = fx.body_names(KIND, len(names))
        per_chunk.append((body, *names[key]))
    new = emit_chunk_loop(gm, plan.data, plan.end, per_chunk, plan.width, plan.symbolic,
                          [x for x, _ in extra])
    plan.end.replace_all_uses_with(new)
    attrs = [a for n in plan.nodes for a in n.all_input_nodes if module_attr(a)]
    for n in reversed(plan.nodes):
        gm.graph.erase_node(n)
    for a in dict.fromkeys(attrs):  # now only the chunk body calls them
        if not a.users:
            gm.graph.erase_node(a)


def _plan(data: Node, starts: list[Projection], units: dict[Node, Projection],
          config: MSTConfig, checkpointed: bool, order: dict[Node, int], where) -> Region:
    if _feeds_loss([p.out for p in starts]):
        raise Skip(Reason.NOT_A_REGION)
    dv = value(data)
    if dv is None or dv.dim() < 2:
        raise Skip(Reason.SHAPE, "input has no token dims")
    width, token_count = dv.shape[-1], numel(tuple(dv.shape[:-1]))
    if not isinstance(width, int):  # dynamic=True: known equal to the weights' width
        if not same_size(width, starts[0].in_width):
            raise Skip(Reason.SYMBOLIC, "symbolic feature width")
        width = starts[0].in_width
    # With dynamic shapes the token count is symbolic: one chunk count serves every length
    # this graph runs at, planned for long ones (chunking.bounded_chunks).
    symbolic = not isinstance(token_count, int)
    tokens = hint(token_count)

    nodes, end = _grow(starts, units, checkpointed)
    _check_shapes(nodes, data, width, token_count)
    ev = value(end)
    if symbolic and (ev.dim() != dv.dim() or
                     not all(same_size(a, b) for a, b in zip(ev.shape[:-1], dv.shape[:-1]))):
        raise Skip(Reason.SYMBOLIC, f"symbolic token dims regrouped between the input {tuple(dv.shape)} "
                                    f"and the output {tuple(ev.shape)}")

    widths = [p.out_width for p in starts]
    itemsize = max(value(n).element_size() for n in nodes if value(n) is not None)
    held = tokens * sum(widths) * itemsize  # what plain compile keeps for backward, about
    chunks = _chunk_count(config, tokens, sum(widths), width, held, _weight_bytes(nodes), symbolic)
    nodes.sort(key=order.__getitem__)
    if nodes[-1] is not end:
        raise Skip(Reason.ESCAPES, f"{op_name(end)} is not the block's last node")
    ranks = sorted({r for p in starts + [units[end]] for r in p.ranks})
    lora = f", LoRA r={'/'.join(map(str, ranks))}" if ranks else ""
    return Region(
        kind=KIND, where=where(nodes), tokens=tokens, chunks=chunks,
        bytes_saved=held - held // chunks, aliases_inputs=True,
        detail=f"{width}->{'+'.join(map(str, widths))}->{units[end].out_width}{lora}"
               + (", symbolic tokens" if symbolic else ""),
        plan=MLPPlan(data, nodes, width, checkpointed, symbolic,
                     wrap=not checkpointed or config.recompute_in_checkpoint))


def _feeds_loss(starts: list[Node], limit: int = 64) -> bool:
    """Whether a loss is reached from ``starts`` through ops that are not projections
    (a vocabulary projection, for the lm_head pass), looking at ``limit`` nodes at most."""
    queue, seen = list(starts), set(starts)
    while queue and len(seen) < limit:
        for u in queue.pop().users:
            if u in seen:
                continue
            if u.op == "call_function" and u.target in LOSS_FUNCTIONS:
                return True
            info = classify(u)
            if info is None or info.kind != "linear":
                seen.add(u)
                queue.append(u)
    return False


def _grow(starts: list[Projection], units: dict[Node, Projection],
          checkpointed: bool) -> tuple[list[Node], Node]:
    """All nodes reachable from ``starts`` up to contracting projections; one end allowed."""
    for p in starts:
        _check_adapter_dropout(p, checkpointed)
    region = {m for p in starts for m in p.nodes}
    ends, queue = [], [p.out for p in starts]
    while queue:
        n = queue.pop()
        for u in n.users:
            if u in region:
                continue
            if u.op == "output":
                raise Skip(Reason.ESCAPES, f"intermediate {n.name} is also an output of the graph")
            info = classify(u)
            if u.op == "call_function" and u.target in LOSS_FUNCTIONS:
                raise Skip(Reason.NOT_A_REGION)  # a vocabulary projection: the lm_head pass's
            if info is None:
                raise Skip(Reason.NOT_TOKENWISE, f"{op_name(u)} is not token-wise (uses {n.name})")
            unit = units.get(u)
            if unit is not None:  # a projection of n, with its adapters if it has any
                if unit.data is not n:
                    raise Skip(Reason.ESCAPES, f"{n.name} is used as a weight by {op_name(u)}")
                _check_adapter_dropout(unit, checkpointed)
                region.update(unit.nodes)
                if unit.out_width < unit.in_width:
                    ends.append(unit.out)
                else:
                    queue.append(unit.out)
                continue
            why = last_dim_only(u, info, random_ok=not checkpointed)
            if why:
                raise Skip(Reason.NOT_TOKENWISE, why)
            region.add(u)
            queue.append(u)
    if len(ends) != 1:
        raise Skip(Reason.UNSUPPORTED, "no contracting projection closes the block" if not ends else
                                       f"{len(ends)} contracting projections ({', '.join(e.name for e in ends)})")
    return list(region), ends[0]


def _check_adapter_dropout(unit: Projection, checkpointed: bool) -> None:
    for m in unit.nodes:
        info = classify(m)
        why = last_dim_only(m, info, random_ok=not checkpointed) if info.kind == "dropout" else None
        if why:
            raise Skip(Reason.UNSUPPORTED, f"LoRA adapter: {why}")


def _check_shapes(nodes: list[Node], data: Node, width: int, tokens: int) -> None:
    """Every tensor in the block keeps the token dims; every outside tensor it reads is a
    weight, a bias or a broadcast over the feature dim (passed whole to each chunk)."""
    region = set(nodes)
    for n in nodes:
        v = value(n)
        # Views may regroup tokens ([B*S, d] <-> [B, S, d]) but never reorder them.
        if v is not None and (v.dim() < 2 or not same_size(numel(tuple(v.shape[:-1])), tokens)):
            raise Skip(Reason.SHAPE, f"{op_name(n)} changes the token dims to {tuple(v.shape)}")
        info = classify(n)
        call = chunk_call(n, info)
        if call is None:
            continue
        for a in _input_nodes(call):
            if a is data or a in region or module_attr(a):
                continue
            av = value(a)
            if av is None and n.target is AUTOGRAD_FUNCTION and isinstance(a.meta.get("example_value"), torch.SymInt):
                continue  # a symbolic size Dynamo passes to the function's bodies, which do not read it
            if av is None:
                raise Skip(Reason.UNSUPPORTED, f"{op_name(n)} reads {a.name}, which is not a tensor")
            if _is_weight_of(n, info, a):
                continue
            if av.dim() > 2 or any(s != 1 for s in av.shape[:-1]):
                raise Skip(Reason.NOT_TOKENWISE, f"{op_name(n)} reads a second token-shaped input {a.name} "
                                                 f"{tuple(av.shape)}")


def _is_weight_of(n: Node, info: OpInfo, a: Node) -> bool:
    return info.kind == "linear" and a is not info.data and value(a).dim() <= 2


def _input_nodes(call) -> list[Node]:
    found: list[Node] = []
    from torch.fx.node import map_arg
    map_arg((call[2], call[3]), found.append)
    return found


def _weight_bytes(nodes: list[Node]) -> int:
    total = 0
    for n in nodes:
        info = classify(n)
        if info.kind == "linear":
            total += sum(value(a).numel() * value(a).element_size()
                         for a in n.all_input_nodes if a is not info.data and value(a) is not None)
    return total


def _chunk_count(config: MSTConfig, tokens: int, expanded: int, width: int, held: int,
                 weights: int, symbolic: bool = False) -> int:
    if config.chunk_bytes is not None:  # scales with the tokens: a symbolic graph plans for long ones
        natural = config.max_chunks if symbolic else math.ceil(held / config.chunk_bytes)
    else:  # MsT: a chunk's intermediates about the size of the block's input
        natural = math.ceil(expanded / width)
    chunks, too_few = bounded_chunks(config, tokens, natural, symbolic)
    if chunks < 2:
        raise Skip(Reason.NO_GAIN, too_few)
    if config.chunks is not None or symbolic:  # a symbolic graph also serves long lengths
        return chunks
    # Each chunk's backward makes its own partial gradient of every weight, so chunking
    # costs about the block's weight bytes; below that it saves nothing (H100, Llama-3-8B
    # MLP, 4096 tokens: 0.89 GB chunked vs 0.62 GB plain compile).
    if held <= weights:
        raise Skip(Reason.NO_GAIN, f"intermediates ({held / 2**20:.1f} MiB) are no larger than the "
                                   f"weights ({weights / 2**20:.1f} MiB): chunking would not lower the peak")
    return chunks
