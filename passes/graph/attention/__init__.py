"""Attention pass: no S x S masks under compile; flash or flex kernels at long sequence.

Under torch.compile, Hugging Face models cannot prove a mask causal, so they build an
S x S boolean mask from index comparisons and call scaled_dot_product_attention with it,
which rules out the flash kernel and costs S^2 bytes. This pass looks at every
scaled_dot_product_attention call, in the graph and in its activation-checkpointed bodies,
follows attn_mask back to the graph that computed it, reads the mask back as a function of
(batch, head, q, kv) (masks.extract, beside this file) and decides (prover.prove):

- "causal": provably kv <= q with as many queries as keys: the mask is dropped and the
  call gets is_causal=True. "full": provably always true: the mask is dropped.
- "flex": any other mask of that form (packed sequences through position ids, padding,
  sliding windows, prefix-LM): the call becomes flex_attention with that function as its
  mask_mod and a block mask computed once per mask (mst_fx.passes.graph.attention.flex), so memory is O(S) and
  fully masked blocks are skipped. By default only on CUDA (MSTConfig.flex_attention):
  torch's CPU flex kernel has no backward. It has no dropout either.
- unchanged, with the reason: masks that read an S x S tensor or ops it cannot follow,
  additive float masks, dropout with a non-causal mask, a comparison with a symbolic
  length itself. Symbolic lengths (dynamic shapes) are otherwise handled like static ones:
  the proofs hold for every length and the block mask is built at run time.

Grouped-query attention: HF repeats each key/value head for its group of query heads
(``repeat_kv``: unsqueeze, expand, reshape) before SDPA when it builds a mask, torchtitan
does the same before moving the heads first, others call repeat_interleave. Where an SDPA
call stays an SDPA call, keys and values that are repeated this way are passed unrepeated with enable_gqa=True (the same
head grouping): the repeated copies and their full-head gradients are never built
(one call on an H100 at 64k tokens, 32/8 heads: 1.76 -> 1.36 GB, time unchanged with
cuDNN's kernel; benchmarks/bench_gqa.py).

Attention written out without SDPA (HF's eager path; Gemma 2 takes it for its logit
softcapping) is matched from its softmax: q @ k^T, constant elementwise ops on the scores
(they become the flex score_mod), + where(mask, 0, very negative), softmax, p @ v. It goes
to flex_attention when no query row can be empty (masks.diagonal_allowed), since eager
averages an empty row (finite additive mask) where flex_attention gives zeros.

A mask that is an input of the graph (built in an earlier graph, past a graph break such
as FSDP2's per-layer hooks) is taken as the reading that graph made of it, where it made
one (crossing.py, beside this file); the backend checks at run time that the input is
still that mask.

Rewriting changes only the attention calls: the mask's values in the new graph come from
the same nodes, so results never change beyond kernel rounding. A mask that no call
uses any more is removed (and its arguments to checkpointed bodies with it).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from mst_fx import fx
from mst_fx.config import MSTConfig
from mst_fx.fx import Step
from mst_fx.passes.graph.attention import crossing, flex
from mst_fx.passes.graph.attention.masks import MaskMod, extract, mask_sizes
from mst_fx.passes.graph.attention.prover import Verdict, constant_value, diagonal_allowed, prove
from mst_fx.passes.graph.tokenwise import arg_of, hint, same_size, size_node, value
from mst_fx.report import Reason, Region, Report, Skip, Skipped

KIND = "attention"
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class Shared:
    """Rewrite state shared by all calls of one compile: what was already inserted."""

    block_masks: dict = field(default_factory=dict)  # (module, mask) -> (parts, layout)
    threaded: dict = field(default_factory=dict)  # (body, outer node) -> placeholder
    attrs: dict = field(default_factory=dict)  # (module, id(mask/score mod)) -> attribute name


@dataclass
class AttentionPlan:
    call: Node
    owner: GraphModule  # the module holding the call
    path: list[Step]  # from the module that computed the mask down to owner
    mask: Node | None  # in path[0].parent (or owner when path is empty); None: no mask
    mode: str  # "causal", "full" or "flex"
    sizes: dict
    mask_mod: MaskMod | None
    shared: Shared
    eager: "EagerAttention | None" = None  # set when the call is HF's eager attention path
    shared_kv: tuple | None = None  # key's and value's (base, n, transposed) for enable_gqa=True
    layout: tuple | None = None  # flex: the block mask's flex.layout, worked out at detection


def detect(gm: GraphModule, config: MSTConfig, checkpointed: bool, where) -> Report:
    """Every attention call of ``gm`` and of its checkpointed bodies (reported with the
    graph itself, since a body's mask comes from outside)."""
    report = Report()
    if checkpointed:
        return report
    shared, counted = Shared(), set()
    for owner, steps in fx.checkpoint_bodies(gm):
        path = list(steps)
        for n in list(owner.graph.nodes):
            try:
                if n.op == "call_function" and n.target in SDPA:
                    region = _plan(n, owner, path, shared, where, config)
                elif _is_softmax(n):
                    eager = match_eager(n)
                    if eager is None:
                        continue
                    region = _plan_eager(eager, owner, path, shared, where, config)
                else:
                    continue
            except Skip as e:
                report.skip(KIND, where([n]), e)
                continue
            except Exception as e:  # noqa: BLE001 - a graph this pass misreads stays as it is
                report.skipped.append(Skipped(KIND, where([n]), f"could not read this attention: {e!r}",
                                              Reason.FAILED))
                continue
            if region.plan.eager is None and region.plan.mask is not None:
                # an SDPA mask is stored once, whoever reads it
                if region.plan.mask in counted:
                    region.bytes_saved = 0
                counted.add(region.plan.mask)
            report.regions.append(region)
    return report


def rewrite(gm: GraphModule, region: Region, names) -> None:
    plan: AttentionPlan = region.plan
    n = plan.call
    if plan.eager is not None:
        e = plan.eager
        args = {"query": e.query, "key": e.key, "value": e.value, "scale": 1.0}
        local_mask = e.mask
    else:
        args = {name: arg_of(n, i, name) for i, name in enumerate(SDPA_ARGS)}
        local_mask = args["attn_mask"]
    if plan.mode in ("causal", "full", "kept"):
        kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value") and v is not None}
        if plan.mode != "kept":
            kwargs.update(attn_mask=None, is_causal=plan.mode == "causal")
        key, val = args["key"], args["value"]
        if plan.shared_kv is not None:
            key, val = (_heads_first(n, base, transposed) for base, _, transposed in plan.shared_kv)
            kwargs["enable_gqa"] = True
        n.args = (args["query"], key, val)
        n.kwargs = kwargs
        if plan.shared_kv is not None:
            for x in (args["key"], args["value"]):
                _prune(x)
    else:
        _to_flex(plan, args)
    if plan.eager is not None:
        for x in plan.eager.inputs_of_end:
            _prune(x)
    if local_mask is not None:
        _release(plan, local_mask)
    for m in _touched(plan):
        m.graph.lint()
        m.recompile()


def _heads_first(call: Node, base: Node, transposed: bool) -> Node:
    """``base`` as SDPA takes it ([B, KV, S, D]): a [B, S, KV, D] one transposed before ``call``."""
    if not transposed:
        return base
    with call.graph.inserting_before(call):
        t = call.graph.call_method("transpose", (base, 1, 2))
    t.meta["example_value"] = value(base).transpose(1, 2)
    return t


def _touched(plan: AttentionPlan) -> list[GraphModule]:
    mods = [s.parent for s in plan.path] + [plan.owner]
    return list({id(m): m for m in mods}.values())


def _plan(n: Node, owner: GraphModule, path: list[Step], shared: Shared, where,
          config: MSTConfig) -> Region:
    args = {name: arg_of(n, i, name) for i, name in enumerate(SDPA_ARGS)}
    q, k, mask = args["query"], args["key"], args["attn_mask"]
    shared_kv, gqa, gqa_bytes = _shared_heads(args)
    if mask is None:
        what = "is_causal=True" if args["is_causal"] else "no mask"
        if shared_kv is None:
            raise Skip(Reason.NO_GAIN, f"{what}: nothing to do")
        return Region(kind=KIND, where=where([n]), tokens=hint(value(q).shape[2]), chunks=0,
                      bytes_saved=gqa_bytes, detail=f"{what}; {gqa}",
                      plan=AttentionPlan(n, owner, [], None, "kept", {}, None, shared, shared_kv=shared_kv))
    if not isinstance(mask, Node):
        raise Skip(Reason.MASK, "the mask is not a graph value")
    mask, path = _outer(mask, path)
    _check_unshared(path)
    sizes = mask_sizes(q, k)
    mm, verdict, assumes = read_mask(mask, sizes)
    held = hint(sizes["b"]) * hint(sizes["q"]) * hint(sizes["kv"])  # a bool per (batch, q, kv), at least
    if verdict.kind in ("causal", "full"):
        detail = f"{verdict.kind}: mask dropped ({verdict.reason})" + (f"; {gqa}" if gqa else "")
        mode = verdict.kind
        held += gqa_bytes
    else:
        shared_kv = None  # flex_attention gets the keys and values as they are
        qv = value(q)
        dropout = args["dropout_p"]
        if dropout not in (None, 0, 0.0):
            raise Skip(Reason.RANDOM, f"dropout_p={dropout} inside attention: flex_attention has none "
                                      f"(mask kept: {verdict.reason})")
        if not _flex_allowed(config, qv):
            raise Skip(Reason.MASK, f"mask kept: {verdict.reason}; flex_attention={config.flex_attention!r} "
                                    f"and the device is {qv.device.type}")
        reads = ", ".join(b.name for b in mm.buffers) or "only the indices"
        detail = f"flex: {verdict.reason} (mask_mod reads {reads})"
        mode = "flex"
    plan = AttentionPlan(n, owner, path, mask, mode, sizes, mm if mode == "flex" else None,
                         shared, shared_kv=shared_kv)
    if mode == "flex":
        plan.layout = _fake_layout(plan)
    if assumes:  # the mask was built and is held by the earlier graph's caller all the same
        detail += "; read where an earlier graph built it, checked at run time"
        held = gqa_bytes if mode != "flex" else 0
    return Region(kind=KIND, where=where([n]), tokens=hint(sizes["q"]), chunks=0, bytes_saved=held,
                  detail=detail + _symbolic_note(sizes), flex=mode == "flex", plan=plan, assumes=assumes)


def read_mask(mask: Node, sizes: dict) -> tuple[MaskMod | None, Verdict, tuple[str, ...]]:
    """The mask's mask_mod and verdict, and the graph inputs that rely on a reading made
    in another graph (crossing.py): a mask that is a graph input has one, or raises Skip."""
    if mask.op != "placeholder":
        mm = extract(mask, sizes)
        return mm, prove(mm, sizes), ()
    r = crossing.of(mask, sizes["q"], sizes["kv"])
    kind = r.kind if r.kind in ("causal", "full") else "mask"
    return r.mask_mod, Verdict(kind, r.reason), (mask.name,)


def _symbolic_note(sizes: dict) -> str:
    return ", symbolic tokens" if not isinstance(sizes["q"], int) else ""


def _shared_heads(args: dict) -> tuple[tuple | None, str, int]:
    """Keys and values both repeated per query group (see _unrepeated) in a call without
    enable_gqa: (their _unrepeated answers, the report's words, bytes of the two copies);
    (None, "", 0) otherwise."""
    if args["enable_gqa"] or value(args["query"]) is None:
        return None, "", 0
    k, v = _unrepeated(args["key"]), _unrepeated(args["value"])
    if k is None or v is None or k[1:] != v[1:] or not same_size(value(args["query"]).shape[1],
                                                               value(args["key"]).shape[1]):
        return None, "", 0
    rep = value(args["key"])
    copies = 2 * hint(rep.numel()) * rep.element_size()
    return (k, v), f"key/value heads shared with enable_gqa=True (not repeated {k[1]}x)", copies


def _unrepeated(x) -> tuple[Node, int, bool] | None:
    """(base, n, transposed) when ``x`` [B, KV * n, S, D] repeats each head of ``base`` n
    times, kv-major (query head j reads kv head j // n, as enable_gqa does):
        base[:, :, None].expand(B, KV, n, S, D).reshape(B, KV * n, S, D)    (transformers)
        base.repeat_interleave(n, dim=1)
    or those on the heads of a [B, S, KV, D] base followed by .transpose(1, 2) (torchtitan);
    ``transposed`` then says that SDPA needs base.transpose(1, 2)."""
    transposed = False
    if isinstance(x, Node) and x.op == "call_method" and x.target == "transpose" and \
            sorted(x.args[1:3]) == [1, 2]:
        x, transposed = x.args[0], True
    head = 2 if transposed else 1
    found = _repeat_of(x, head)
    if found is None:
        return None
    base, n = found
    b, out = value(base), value(x)
    if b is None or out is None or b.dim() != 4 or out.dim() != 4 or not isinstance(n, int) or n < 2:
        return None
    want = list(b.shape)
    want[head] = want[head] * n
    if not all(same_size(a, w) for a, w in zip(out.shape, want)):
        return None
    return base, n, transposed


def _repeat_of(x, head: int) -> tuple[Node, int] | None:
    """(base, n) for x = base repeated n times along dim ``head`` (see _unrepeated)."""
    if not isinstance(x, Node):
        return None
    if (x.op == "call_method" and x.target == "repeat_interleave") or \
            (x.op == "call_function" and x.target is torch.repeat_interleave):
        n, dim = arg_of(x, 1, "repeats"), arg_of(x, 2, "dim")
        if isinstance(x.args[0], Node) and isinstance(n, int) and dim in (head, head - 4):
            return x.args[0], n
        return None
    if not (x.op == "call_method" and x.target in ("reshape", "view")):
        return None
    e = x.args[0]
    if not (isinstance(e, Node) and e.op == "call_method" and e.target == "expand" and len(e.users) == 1):
        return None
    u = e.args[0]
    if not (isinstance(u, Node) and u.op == "call_function" and u.target is operator.getitem
            and isinstance(u.args[0], Node) and len(u.users) == 1):
        return None
    full = slice(None, None, None)
    index = u.args[1]
    if not (isinstance(index, tuple) and len(index) >= head + 2 and index[head + 1] is None
            and all(i == full for i in index[:head + 1])
            and all(i == full or i is Ellipsis for i in index[head + 2:])):
        return None
    ex, base = value(e), value(u.args[0])
    if ex is None or base is None or ex.dim() != 5 or base.dim() != 4:
        return None
    n = ex.shape[head + 1]
    want = list(base.shape[:head + 1]) + [n] + list(base.shape[head + 1:])
    if not all(same_size(a, w) for a, w in zip(ex.shape, want)):
        return None
    return u.args[0], n


def _flex_allowed(config: MSTConfig, q: torch.Tensor) -> bool:
    return config.flex_attention == "all" or (config.flex_attention == "cuda" and q.device.type == "cuda")


def _check_unshared(path: list[Step]) -> None:
    """Arguments are added to and removed from the bodies on ``path``: each must have one caller."""
    for s in path:
        if len(s.parent.graph.find_nodes(op="get_attr", target=s.call.args[0].target)) != 1 or \
                len(s.call.args[0].users) != 1:
            raise Skip(Reason.UNSUPPORTED, "a checkpointed body shared by several calls")


# ---------------------------------------------------------------------------------------
# Attention written out (HF's "eager" path, used by Gemma 2 for its logit softcapping):
#   s = q @ k.transpose(-2, -1); s = f(s) (scale, softcap); s = s + mask;
#   p = softmax(s, -1) [.to(dtype)] [dropout(p=0)]; out = p @ v
# becomes flex_attention with score_mod = f and the mask's mask_mod.
# ---------------------------------------------------------------------------------------

SOFTMAX = {F.softmax, torch.softmax}
# Elementwise ops on the scores with a constant: they make the score_mod.
SCORE_FUNCTIONS = {operator.mul, operator.truediv, operator.add, operator.sub, operator.neg,
                   torch.tanh, torch.mul, torch.div, torch.add, torch.sub, F.tanh}
SCORE_METHODS = {"tanh", "mul", "div", "add", "sub", "neg"}
NEG_LARGE = -1e30  # an additive mask value at or below this counts as "masked out"


@dataclass
class EagerAttention:
    query: Node
    key: Node
    value: Node
    end: Node  # the p @ v matmul, replaced by flex_attention
    mask: Node | None  # the additive float mask added to the scores (in the call's module)
    score_mod: GraphModule  # (score, b, h, q, kv) -> score
    inputs_of_end: list[Node]  # what the removed nodes read, for pruning


def _is_softmax(n: Node) -> bool:
    return (n.op == "call_function" and n.target in SOFTMAX) or \
        (n.op == "call_method" and n.target == "softmax")


def match_eager(softmax: Node) -> EagerAttention | None:
    """The written-out attention around ``softmax``, or None if it is not one (a softmax
    elsewhere); raises Skip for an attention it recognizes but cannot take."""
    dim = arg_of(softmax, 1, "dim")
    x = softmax.args[0]
    if dim not in (-1, 3) or not isinstance(x, Node):
        return None
    # forward: [.to(dtype)] [dropout] then p @ v
    p = softmax
    while len(p.users) == 1:
        u = next(iter(p.users))
        if u.op == "call_method" and u.target in ("to", "type_as") or \
                (u.op == "call_function" and u.target in (F.dropout, torch.dropout)):
            if u.target in (F.dropout, torch.dropout) and arg_of(u, 1, "p", 0.5) not in (0, 0.0) \
                    and arg_of(u, 2, "training", True):
                raise Skip(Reason.RANDOM, "attention dropout p > 0 in training: flex_attention has none")
            p = u
            continue
        break
    if len(p.users) != 1:
        return None
    end = next(iter(p.users))
    if not (end.op == "call_function" and end.target in (torch.matmul, operator.matmul)) or end.args[0] is not p:
        return None
    v = end.args[1]
    # backward from the softmax: [+ mask], the score ops, q @ k^T
    mask = None
    if _is_add(x) and len(x.users) == 1:
        a, b = x.args[:2]
        scores, mask = (a, b) if _float_mask(b) else (b, a) if _float_mask(a) else (None, None)
        if scores is None:
            raise Skip(Reason.MASK, "scores plus a term that is not an additive mask")
        x = scores
    chain = []
    while not (x.op == "call_function" and x.target in (torch.matmul, operator.matmul)):
        if len(x.users) != 1 or not _score_op(x):
            raise Skip(Reason.NOT_TOKENWISE, f"scores go through {x.name}, which is not a constant elementwise op")
        chain.append(x)
        x = x.args[0] if isinstance(x.args[0], Node) else x.args[1]
    qk = x
    if len(qk.users) != 1:
        return None
    q, kt = qk.args[:2]
    if not (isinstance(kt, Node) and kt.op == "call_method" and kt.target == "transpose"
            and sorted(kt.args[1:3]) in ([2, 3], [-2, -1])) or len(kt.users) != 1:
        return None
    k = kt.args[0]
    if any(value(t) is None or value(t).dim() != 4 for t in (q, k, v)):
        return None
    if value(q).shape[1] != value(k).shape[1]:
        raise Skip(Reason.UNSUPPORTED, "written-out attention with fewer key heads than query heads")
    return EagerAttention(q, k, v, end, mask, _score_mod(list(reversed(chain))),
                          list(end.all_input_nodes))


def _is_add(n: Node) -> bool:
    return (n.op == "call_function" and n.target in (operator.add, torch.add)) or \
        (n.op == "call_method" and n.target == "add")


def _float_mask(n) -> bool:
    """A [.., Q, KV] float tensor (graph value) that may be an additive mask; checked in full
    where it is computed (_bool_of)."""
    v = value(n)
    return v is not None and v.is_floating_point() and v.dim() >= 2


def _score_op(n: Node) -> bool:
    ok = (n.op == "call_function" and n.target in SCORE_FUNCTIONS) or \
        (n.op == "call_method" and n.target in SCORE_METHODS)
    tensors = n.all_input_nodes
    return ok and len(tensors) == 1 and (n.args[0] is tensors[0] or n.target in (
        operator.mul, operator.add, torch.mul, torch.add))


def _score_mod(chain: list[Node]) -> GraphModule:
    g = torch.fx.Graph()
    score = g.placeholder("score")
    for name in ("b", "h", "q", "kv"):
        g.placeholder(name)
    x = score
    for n in chain:
        prev = n.all_input_nodes[0]
        args = tuple(x if a is prev else a for a in n.args)
        x = g.create_node(n.op, n.target, args, dict(n.kwargs))
    g.output(x)
    return GraphModule(torch.nn.Module(), g)


def _bool_of(mask: Node) -> Node:
    """The boolean mask behind an additive one: ``where(keep, 0, very negative)``."""
    if mask.op == "call_function" and mask.target is torch.where and len(mask.args) == 3:
        keep, zero, neg = mask.args
        if _is_zero(zero) and isinstance(neg, (int, float)) and neg <= NEG_LARGE and isinstance(keep, Node):
            return keep
    raise Skip(Reason.MASK, f"additive mask {mask.name} is not where(mask, 0, very negative)")


def _is_zero(x) -> bool:
    """0, or a graph constant equal to 0 (torch.zeros(()), torch.tensor(0.0), a lifted one)."""
    if not isinstance(x, Node):
        return x in (0, 0.0) and not isinstance(x, bool)
    if x.op == "get_attr":
        v = getattr(x.graph.owning_module, x.target, None)
    else:
        v = constant_value(x)
    return isinstance(v, torch.Tensor) and v.numel() == 1 and bool(v.reshape(()) == 0)


def _plan_eager(e: EagerAttention, owner: GraphModule, path: list[Step], shared: Shared, where,
                config: MSTConfig) -> Region:
    qv = value(e.query)
    if not _flex_allowed(config, qv):
        raise Skip(Reason.UNSUPPORTED, f"written-out attention left as it is: flex_attention="
                                       f"{config.flex_attention!r} and the device is {qv.device.type}")
    sizes = mask_sizes(e.query, e.key)
    if e.mask is None:
        mask, path, mm = None, [], _no_mask()
        why = "no mask"
    else:
        outer, path = _outer(e.mask, path)
        mask = _bool_of(outer)
        mm = extract(mask, sizes)
        why = prove(mm, sizes).reason
        if not diagonal_allowed(mm, sizes):
            # A row with no key allowed: eager averages it (its additive mask is finite),
            # flex_attention gives zeros. Only take masks where that cannot happen.
            raise Skip(Reason.MASK, f"written-out attention left as it is: a query may have no key "
                                    f"to attend to (padding?), where flex_attention would differ ({why})")
    _check_unshared(path)
    ops = ", ".join(_op_text(n) for n in e.score_mod.graph.nodes if n.op in ("call_function", "call_method"))
    detail = f"flex: written-out attention, score_mod {ops or 'none'}; {why}"
    plan = AttentionPlan(e.end, owner, path, mask, "flex", sizes, mm, shared, eager=e)
    plan.layout = _fake_layout(plan)
    return Region(kind=KIND, where=where([e.end]), tokens=hint(sizes["q"]), chunks=0,
                  bytes_saved=math.prod(hint(v) for v in sizes.values()) * 4,
                  detail=detail + _symbolic_note(sizes), flex=True, plan=plan)


def _no_mask() -> MaskMod:
    g = torch.fx.Graph()
    b, h, q, kv = (g.placeholder(a) for a in ("b", "h", "q", "kv"))
    g.output(g.call_function(operator.ge, (kv, 0)))
    return MaskMod(GraphModule(torch.nn.Module(), g), [], frozenset({"kv"}))


def _op_text(n: Node) -> str:
    name = fx.target_name(n)
    consts = [repr(a) for a in n.args if isinstance(a, (int, float))]
    return name + (f" {consts[0]}" if consts else "")


def _outer(node: Node, path: list[Step]) -> tuple[Node, list[Step]]:
    """Follow a body's placeholder out to the value passed in; returns that node and the
    steps from its module down to the call's."""
    k = len(path)
    while node.op == "placeholder" and k:
        step = path[k - 1]
        i = [p for p in step.body.graph.nodes if p.op == "placeholder"].index(node)
        operands = step.call.args[1:]
        if i >= len(operands) or not isinstance(operands[i], Node):
            raise Skip(Reason.UNSUPPORTED, "a checkpointed body argument it cannot follow")
        node, k = operands[i], k - 1
    if node.op == "placeholder" and crossing.READING not in node.meta:
        raise Skip(Reason.MASK, "the mask is a graph input (computed outside the compiled graph)")
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
        mm = g.get_attr(_attr(plan.owner, plan.mask_mod.module, plan.shared))
        sm = g.get_attr(_attr(plan.owner, plan.eager.score_mod, plan.shared)) \
            if plan.eager is not None else None
        new = g.call_function(flex.attention, (args["query"], args["key"], args["value"], mm, lay,
                                               args["scale"], len(parts), *inner),
                              {"score_mod": sm} if sm is not None else {})
    new.meta["example_value"] = n.meta.get("example_value")
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _block_mask(home: GraphModule, plan: AttentionPlan) -> tuple[list[Node], tuple]:
    """The block-mask tensors of the plan's mask in ``home`` (inserted once per mask)."""
    key = (id(home), plan.mask)
    if key in plan.shared.block_masks:
        return plan.shared.block_masks[key]
    mm, s, lay = plan.mask_mod, plan.sizes, plan.layout
    B, H = _mask_heads(plan)
    device = value(plan.call.args[0]).device
    g = home.graph
    with insertion_point(home, plan.mask, plan.call):
        attr = g.get_attr(_attr(home, mm.module, plan.shared))
    # Symbolic sizes (dynamic shapes) are read from the graph at run time: the block mask is
    # built for the current length, with no recompile per length.
    dims = [size_node(home, d, attr) for d in (B, H, s["q"], s["kv"])]
    with g.inserting_after(attr):
        call = g.call_function(flex.block_mask, (attr, *dims, device, *mm.buffers))
    parts, last = [], call
    for i, p in enumerate(lay):
        if p == flex.TENSOR:
            with g.inserting_after(last):
                last = g.call_function(operator.getitem, (call, i))
            parts.append(last)
    plan.shared.block_masks[key] = (parts, lay)
    return parts, lay


def insertion_point(home: GraphModule, mask: Node | None, call: Node):
    """Where a mask's derived values go in ``home``: after the mask, or after the inputs
    when the mask is one; before ``call`` when there is no mask."""
    g = home.graph
    if mask is None:
        return g.inserting_before(call)
    if mask.op == "placeholder":
        return g.inserting_before(next(n for n in g.nodes if n.op != "placeholder"))
    return g.inserting_after(mask)


def _mask_heads(plan: AttentionPlan) -> tuple:
    """The block mask's batch and head sizes: 1 where the mask does not depend on them."""
    s, uses = plan.sizes, plan.mask_mod.uses
    return (s["b"] if "b" in uses else 1), (s["h"] if "h" in uses else 1)


def _fake_layout(plan: AttentionPlan) -> tuple:
    """Which entries of the block-mask tuple are tensors or sequence lengths, from a run on
    fake tensors (in the graph's own fake mode, so symbolic lengths stay symbolic)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mm, s = plan.mask_mod, plan.sizes
    B, H = _mask_heads(plan)
    Q, KV = s["q"], s["kv"]
    qv = value(plan.call.args[0])
    bufs = [value(b) for b in mm.buffers]
    if any(not isinstance(b, FakeTensor) for b in bufs):
        raise Skip(Reason.MASK, "the mask's inputs have no single fake-tensor mode")
    modes = {id(t.fake_mode): t.fake_mode for t in bufs + [qv] if isinstance(t, FakeTensor)}
    if len(modes) > 1:
        raise Skip(Reason.MASK, "the mask's inputs have no single fake-tensor mode")
    mode = next(iter(modes.values())) if modes else FakeTensorMode()
    # The python dispatcher runs the decompositions that symbolic sizes need (padding to
    # whole blocks), as AOTAutograd does when it traces the same call.
    with mode, enable_python_dispatcher():
        parts = flex.block_mask(mm.module, B, H, Q, KV, qv.device, *bufs)
    try:
        return flex.layout(parts, Q, KV)
    except ValueError as e:
        raise Skip(Reason.MASK, str(e)) from None


def _attr(mod: GraphModule, fn: GraphModule, shared: Shared) -> str:
    key = (id(mod), id(fn))
    if key not in shared.attrs:
        name = fx.attr_name(f"attention_mod_{len(shared.attrs)}")
        mod.add_submodule(name, fn)
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
                ph = step.body.graph.placeholder(fx.attr_name(x.name))
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
        if x in erased or getattr(x, "_erased", False) or x.users or \
                x.op not in ("call_function", "call_method") or x.is_impure():
            continue
        inputs = list(x.all_input_nodes)
        x.graph.erase_node(x)
        erased.add(x)
        stack.extend(inputs)
