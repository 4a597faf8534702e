"""Attention pass: no S x S masks under compile; flash or flex kernels at long sequence.

Under torch.compile, Hugging Face models cannot prove a mask causal, so they build an
S x S boolean mask from index comparisons and call scaled_dot_product_attention with it,
which rules out the flash kernel and costs S^2 bytes. This pass looks at every
scaled_dot_product_attention call, in the graph and in its activation-checkpointed bodies,
follows attn_mask back to the graph that computed it, reads the mask back as a function of
(batch, head, q, kv) (mst_fx.masks.extract) and decides (mst_fx.masks.prove):

- "causal": provably kv <= q with as many queries as keys: the mask is dropped and the
  call gets is_causal=True. "full": provably always true: the mask is dropped.
- "flex": any other mask of that form (packed sequences through position ids, padding,
  sliding windows, prefix-LM): the call becomes flex_attention with that function as its
  mask_mod and a block mask computed once per mask (mst_fx.flex), so memory is O(S) and
  fully masked blocks are skipped. By default only on CUDA (MSTConfig.flex_attention):
  torch's CPU flex kernel has no backward. It has no dropout either.
- unchanged, with the reason: masks that read an S x S tensor or ops it cannot follow,
  additive float masks, dropout with a non-causal mask, symbolic lengths.

Rewriting changes only the attention calls: the mask's values in the new graph come from
the same nodes, so results never change beyond kernel rounding. A mask that no call
uses any more is removed (and its arguments to checkpointed bodies with it).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from mst_fx import flex
from mst_fx.config import MSTConfig
from mst_fx.masks import MaskMod, NotAMaskMod, extract, mask_sizes, prove
from mst_fx.report import Region, Report, Skipped
from mst_fx.tokenwise import arg_of, value

KIND = "attention"
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class CantRewrite(Exception):
    """Raised inside detection; caught per call and turned into a Skipped."""


@dataclass
class Step:
    """One activation-checkpoint level between the mask's graph and the call's."""

    parent: GraphModule
    call: Node  # the tag_activation_checkpoint node in parent
    body: GraphModule


@dataclass
class Shared:
    """Rewrite state shared by all calls of one compile: what was already inserted."""

    block_masks: dict = field(default_factory=dict)  # (module, mask) -> (parts, layout)
    threaded: dict = field(default_factory=dict)  # (body, outer node) -> placeholder
    attrs: dict = field(default_factory=dict)  # (module, id(mask_mod)) -> attribute name


@dataclass
class AttentionPlan:
    call: Node
    owner: GraphModule  # the module holding the call
    path: list[Step]  # from the module that computed the mask down to owner
    mask: Node  # in path[0].parent (or owner when path is empty)
    mode: str  # "causal", "full" or "flex"
    sizes: dict
    mask_mod: MaskMod | None
    shared: Shared


def detect(gm: GraphModule, config: MSTConfig, checkpointed: bool, where) -> Report:
    """Every attention call of ``gm`` and of its checkpointed bodies (reported with the
    graph itself, since a body's mask comes from outside)."""
    report = Report()
    if checkpointed:
        return report
    shared, counted = Shared(), set()
    for owner, path in _modules(gm, []):
        for n in owner.graph.nodes:
            if n.op != "call_function" or n.target not in SDPA:
                continue
            try:
                region = _plan(n, owner, path, shared, where, config)
            except (CantRewrite, NotAMaskMod) as e:
                report.skipped.append(Skipped(KIND, where([n]), str(e)))
                continue
            if region.plan.mask in counted:  # the mask is stored once, whoever reads it
                region.bytes_saved = 0
            counted.add(region.plan.mask)
            report.regions.append(region)
    return report


def rewrite(gm: GraphModule, region: Region, names) -> None:
    plan: AttentionPlan = region.plan
    n = plan.call
    args = {name: arg_of(n, i, name) for i, name in enumerate(SDPA_ARGS)}
    local_mask = args["attn_mask"]
    if plan.mode in ("causal", "full"):
        kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value") and v is not None}
        kwargs.update(attn_mask=None, is_causal=plan.mode == "causal")
        n.args = (args["query"], args["key"], args["value"])
        n.kwargs = kwargs
    else:
        _to_flex(plan, args)
    _release(plan, local_mask)
    for m in _touched(plan):
        m.graph.lint()
        m.recompile()


def _touched(plan: AttentionPlan) -> list[GraphModule]:
    mods = [s.parent for s in plan.path] + [plan.owner]
    return list({id(m): m for m in mods}.values())


def _modules(gm: GraphModule, path: list[Step]):
    """``gm`` and its checkpointed bodies, each with the steps that lead to it."""
    yield gm, path
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is CHECKPOINT and n.args[0].op == "get_attr":
            body = getattr(gm, n.args[0].target)
            if isinstance(body, GraphModule):
                yield from _modules(body, path + [Step(gm, n, body)])


def _plan(n: Node, owner: GraphModule, path: list[Step], shared: Shared, where,
          config: MSTConfig) -> Region:
    args = {name: arg_of(n, i, name) for i, name in enumerate(SDPA_ARGS)}
    q, k, mask = args["query"], args["key"], args["attn_mask"]
    if mask is None:
        what = "is_causal=True" if args["is_causal"] else "no mask"
        raise CantRewrite(f"{what}: nothing to do")
    if not isinstance(mask, Node):
        raise CantRewrite("the mask is not a graph value")
    mask, path = _outer(mask, path)
    for s in path:
        if len(s.parent.graph.find_nodes(op="get_attr", target=s.call.args[0].target)) != 1 or \
                len(s.call.args[0].users) != 1:
            raise CantRewrite("a checkpointed body shared by several calls")
    sizes = mask_sizes(mask, q, k)
    mm = extract(mask, sizes)
    verdict = prove(mm, sizes)
    held = sizes["b"] * sizes["q"] * sizes["kv"]  # a bool per (batch, q, kv), at least
    if verdict.kind in ("causal", "full"):
        detail = f"{verdict.kind}: mask dropped ({verdict.reason})"
        mode = verdict.kind
    else:
        qv = value(q)
        dropout = args["dropout_p"]
        if dropout not in (None, 0, 0.0):
            raise CantRewrite(f"dropout_p={dropout} inside attention: flex_attention has none "
                              f"(mask kept: {verdict.reason})")
        if config.flex_attention == "off" or (
                config.flex_attention == "cuda" and qv.device.type != "cuda"):
            raise CantRewrite(f"mask kept: {verdict.reason}; flex_attention={config.flex_attention!r} "
                              f"and the device is {qv.device.type}")
        reads = ", ".join(b.name for b in mm.buffers) or "only the indices"
        detail = f"flex: {verdict.reason} (mask_mod reads {reads})"
        mode = "flex"
    return Region(kind=KIND, where=where([n]), tokens=sizes["q"], chunks=0, bytes_saved=held,
                  detail=detail,
                  plan=AttentionPlan(n, owner, path, mask, mode, sizes, mm if mode == "flex" else None,
                                     shared))


def _outer(node: Node, path: list[Step]) -> tuple[Node, list[Step]]:
    """Follow a body's placeholder out to the value passed in; returns that node and the
    steps from its module down to the call's."""
    k = len(path)
    while node.op == "placeholder" and k:
        step = path[k - 1]
        i = [p for p in step.body.graph.nodes if p.op == "placeholder"].index(node)
        operands = step.call.args[1:]
        if i >= len(operands) or not isinstance(operands[i], Node):
            raise CantRewrite("a checkpointed body argument it cannot follow")
        node, k = operands[i], k - 1
    if node.op == "placeholder":
        raise CantRewrite("the mask is a graph input (computed outside the compiled graph)")
    return node, path[k:]


# ---------------------------------------------------------------------------------------
# Rewriting
# ---------------------------------------------------------------------------------------

def _to_flex(plan: AttentionPlan, args: dict) -> None:
    home = plan.path[0].parent if plan.path else plan.owner
    parts, lay = _block_mask(home, plan)
    outer = parts + plan.mask_mod.buffers
    inner = [_thread(x, plan.path, plan.shared) for x in outer]
    g = plan.owner.graph
    n = plan.call
    with g.inserting_before(n):
        mm = g.get_attr(_attr(plan.owner, plan.mask_mod, plan.shared))
        new = g.call_function(flex.attention, (args["query"], args["key"], args["value"], mm, lay,
                                               args["scale"], len(parts), *inner))
    new.meta["example_value"] = n.meta.get("example_value")
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _block_mask(home: GraphModule, plan: AttentionPlan) -> tuple[list[Node], tuple]:
    """The block-mask tensors of the plan's mask in ``home`` (inserted once per mask)."""
    key = (id(home), plan.mask)
    if key in plan.shared.block_masks:
        return plan.shared.block_masks[key]
    mm, s = plan.mask_mod, plan.sizes
    B = s["b"] if "b" in mm.uses else 1
    H = s["h"] if "h" in mm.uses else 1
    device = value(plan.call.args[0]).device
    lay = _fake_layout(mm, B, H, s["q"], s["kv"], device)
    g = home.graph
    with g.inserting_after(plan.mask):
        attr = g.get_attr(_attr(home, mm, plan.shared))
    with g.inserting_after(attr):
        call = g.call_function(flex.block_mask, (attr, B, H, s["q"], s["kv"], device, *mm.buffers))
    parts, last = [], call
    for i, p in enumerate(lay):
        if p == flex.TENSOR:
            with g.inserting_after(last):
                last = g.call_function(operator.getitem, (call, i))
            parts.append(last)
    plan.shared.block_masks[key] = (parts, lay)
    return parts, lay


def _fake_layout(mm: MaskMod, B: int, H: int, Q: int, KV: int, device) -> tuple:
    """Which entries of the block-mask tuple are tensors, from a run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    bufs = [value(b) for b in mm.buffers]
    modes = {id(b.fake_mode): b.fake_mode for b in bufs if isinstance(b, FakeTensor)}
    if len(modes) > 1 or any(not isinstance(b, FakeTensor) for b in bufs):
        raise CantRewrite("the mask's inputs have no single fake-tensor mode")
    mode = next(iter(modes.values())) if modes else FakeTensorMode()
    with mode:
        return flex.layout(flex.block_mask(mm.module, B, H, Q, KV, device, *bufs))


def _attr(mod: GraphModule, mask_mod: MaskMod, shared: Shared) -> str:
    key = (id(mod), id(mask_mod))
    if key not in shared.attrs:
        name = f"mst_attention_mask_mod_{len(shared.attrs)}"
        mod.add_submodule(name, mask_mod.module)
        shared.attrs[key] = name
    return shared.attrs[key]


def _thread(x: Node, path: list[Step], shared: Shared) -> Node:
    """``x`` (a value of path[0].parent) made available in the last body of ``path``,
    as an extra argument of every checkpoint call on the way."""
    for step in path:
        key = (id(step.body), x)
        if key not in shared.threaded:
            step.call.args = (*step.call.args, x)
            last = [p for p in step.body.graph.nodes if p.op == "placeholder"][-1]
            with step.body.graph.inserting_after(last):
                ph = step.body.graph.placeholder(f"mst_{x.name}")
            ph.meta["example_value"] = x.meta.get("example_value")
            shared.threaded[key] = ph
        x = shared.threaded[key]
    return x


def _release(plan: AttentionPlan, local: Node) -> None:
    """Remove the mask from where nobody reads it any more: the body arguments that carried
    it, then the nodes that computed it."""
    path = list(plan.path)
    while local.op == "placeholder" and path and not local.users:
        step = path.pop()
        i = [p for p in step.body.graph.nodes if p.op == "placeholder"].index(local)
        outer = step.call.args[1 + i]
        step.call.args = step.call.args[:1 + i] + step.call.args[2 + i:]
        step.body.graph.erase_node(local)
        local = outer
    _prune(local)


def _prune(node: Node) -> None:
    stack, erased = [node], set()
    while stack:
        x = stack.pop()
        if x in erased or x.users or x.op not in ("call_function", "call_method") or x.is_impure():
            continue
        inputs = list(x.all_input_nodes)
        x.graph.erase_node(x)
        erased.add(x)
        stack.extend(inputs)
