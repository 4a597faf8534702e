"""Vocabulary-projection pass: projection + loss over mini-sequences of tokens.

Detection (structural): a projection (linear, or matmul by a 2-D weight) to V outputs
with V >= 4 x its input features, followed by ops that treat every token alone:
*vocab-level* ops on [tokens, V] (casts, scaling, softcapping c*tanh(x/c), bias,
log_softmax/softmax over V, views that keep V), *row reductions* to one value per token
(cross_entropy / nll_loss with reduction "none", logsumexp over V), *token-level* ops on
those values with other per-token tensors (labels, weights, masks), and *exits*: a loss
summed or averaged over all tokens (cross_entropy / nll_loss with reduction "sum"/"mean",
``.sum()``, ``.mean()``), a per-token tensor used by anything else, or logits returned by
the graph. Other tensors read on the way must be per-token (chunked along with the
tokens) or per-vocabulary / scalar (passed whole). Anything else (an op that mixes the
tokens of the logits, class weights) leaves the head unchanged, with the reason in
explain. A symbolic token count (dynamic shapes) is chunked in either mode, M chosen
from the traced length (see mst_fx.chunking.symbolic_rows); the forward mode's bodies are
then traced at symbolic row counts.

Rewriting: the head becomes a loop over M chunks of tokens, each an invoke_subgraph call
of one compiled body, with one of two gradient modes (MSTConfig.lm_head_grad):
- "forward": when the head's only loss exit is one scalar, each chunk's body computes its
  loss *and* its gradients (d hidden, d logits; traced with make_fx from autograd). The
  weight gradient is accumulated chunk by chunk into one buffer (fp32 for bf16 weights,
  mst_fx.ops.mm_acc then addmm_into), the hidden gradient written into one [tokens, H]
  buffer. The loss is returned as ``L + (S - S.detach())`` with ``S = <h, dh> + ...`` and
  the weight gradient attached by mst_fx.ops.with_grad: its value is exactly L and
  autograd's gradient of it is exactly the stored gradients times the incoming one, so
  the projection runs once instead of twice.
- "recompute": the body (projection + loss) runs under activation checkpointing; its
  logits are recomputed in backward. Used for per-token losses and several loss terms.
Logits that the graph returns are written chunk by chunk into one buffer in the model's
dtype (mst_fx.ops.write_rows), without gradient; MSTConfig.logits="drop" returns an empty
tensor instead.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from mst_fx.chunking import Body, _checkpointed, bounded_chunks, build_body, chunk_rows, symbolic_rows
from mst_fx.config import MSTConfig
from mst_fx.projections import Projection, find
from mst_fx.report import Region, Report, Skipped
from mst_fx.tokenwise import (LOSS_FUNCTIONS, arg_of, chunk_call, classify, hint, last_dim_only, numel,
                              op_name, same_size, value)

KIND = "lm_head"
MIN_VOCAB_RATIO = 4

ROWWISE_FUNCTIONS = {F.log_softmax, F.softmax, torch.log_softmax, torch.softmax}
ROWWISE_METHODS = {"log_softmax", "softmax"}
REDUCE_FUNCTIONS = {torch.sum: "sum", torch.mean: "mean"}
REDUCE_METHODS = {"sum": "sum", "mean": "mean"}
INVOKE = torch.ops.higher_order.invoke_subgraph
# F.cross_entropy's parameters in order (F.nll_loss's are the same, without the last).
LOSS_PARAMS = ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
               "label_smoothing"]


class CantChunk(Exception):
    """Raised inside detection; turned into a Skipped at the pass boundary."""


class NotAHead(Exception):
    """The projection is not a vocabulary projection feeding a loss (e.g. an MLP's up
    projection): not reported."""


@dataclass
class Exit:
    node: Node
    kind: str  # "scalar" (a loss over all tokens), "tokens" (per-token values), "logits"
    mean: object = None  # scalar exits that average: a divisor (int) or ("count", labels, ignore)


@dataclass
class HeadPlan:
    proj: Node
    data: Node
    weight: Node
    bias: Node | None
    matmul: bool  # h @ W with W [H, V] (else linear: W [V, H])
    nodes: list[Node]  # region after the projection, graph order
    exits: list[Exit]
    whole: list[Node]  # outside tensors passed whole to every chunk
    per_token: list[Node]  # outside tensors chunked along with the tokens
    width: int
    vocab: int
    tokens: int
    mode: str
    drop_logits: bool
    fp32_weight_grad: bool
    after: Node  # the loop goes right after this node
    proj_nodes: list[Node]  # the projection: [proj], or its base and adapters (graph order)
    adapted: Body | None  # for a projection with adapters: its nodes as a body (recompute mode)
    symbolic: bool = False  # the token count is symbolic (dynamic shapes)

    def proj_inputs(self) -> list[Node]:
        """What the projection reads besides the tokens, passed whole to each chunk."""
        if self.adapted is not None:
            return self.adapted.externals
        return [self.weight]


def detect(gm: GraphModule, config: MSTConfig, checkpointed: bool, where) -> Report:
    report = Report()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units = find(gm.graph)
    for n in gm.graph.nodes:
        unit = units.get(n)
        if unit is None or unit.out is not n or unit.out_width < MIN_VOCAB_RATIO * unit.in_width:
            continue
        try:
            report.regions.append(_plan(gm, unit, config, order, where))
        except NotAHead:
            continue
        except CantChunk as e:
            report.skipped.append(Skipped(KIND, where(list(unit.nodes)), str(e)))
    return report


def _plan(gm: GraphModule, unit: Projection, config: MSTConfig, order: dict, where) -> Region:
    base = unit.base
    if base.target not in (torch._C._nn.linear, F.linear, torch.matmul, operator.matmul):
        raise NotAHead()
    proj = unit.out
    matmul = base.target in (torch.matmul, operator.matmul)
    weight = base.args[1] if len(base.args) > 1 else base.kwargs.get("weight")
    bias = None if matmul else (base.args[2] if len(base.args) > 2 else base.kwargs.get("bias"))
    dv, zv = value(unit.data), value(proj)
    if dv is None or zv is None or dv.dim() < 2:
        raise NotAHead()
    width, vocab, token_count = dv.shape[-1], unit.out_width, numel(tuple(dv.shape[:-1]))
    if not isinstance(width, int):  # dynamic=True: known equal to the weight's width
        if not same_size(width, unit.in_width):
            raise CantChunk("symbolic feature width")
        width = unit.in_width
    # Symbolic token count (dynamic shapes): M from the traced length.
    symbolic = not isinstance(token_count, int)
    tokens = hint(token_count)

    nodes, exits, whole, per_token = _grow(proj, vocab, token_count)
    if symbolic:
        for e in exits:
            if e.kind != "scalar" and _shape_dims(value(e.node).shape, dv.shape, token_count) is None:
                raise CantChunk(f"{e.node.name} {tuple(value(e.node).shape)}: symbolic token dims "
                                f"other than the input's")
            if e.kind == "scalar" and e.mean is not None and not isinstance(e.mean, (int, tuple)):
                raise CantChunk(f"{op_name(e.node)}: a mean over a symbolic count of elements")
    if not any(e.kind != "logits" for e in exits):
        raise CantChunk("no loss over the logits in this graph (logits only)")
    if not zv.requires_grad:
        raise CantChunk("no gradient in this graph (inference): nothing to save for backward")
    if bias is not None and (value(bias) is None or value(bias).dim() != 1):
        raise CantChunk("projection bias is not a vector")
    adapted = None
    if unit.low_rank:  # the projection's own nodes, copied into the body whole
        for m in unit.nodes:
            info = classify(m)
            if info.kind == "dropout" and last_dim_only(m, info):
                # Unlike the MLP pass's bodies, a recomputed head body with dropout gave
                # gradients of another mask (finite differences, torch 2.13, float64).
                raise CantChunk(f"LoRA adapter with dropout p={arg_of(m, 1, 'p', 0.5)} in training: "
                                f"the recomputed head would draw a different mask")
        adapted = build_body(gm, list(unit.nodes), unit.data, proj, checkpoint=False)
        weight, bias = None, None

    proj_inputs = adapted.externals if adapted else [weight] + ([bias] if bias is not None else [])
    inputs = [unit.data] + proj_inputs + whole + per_token
    after = max(inputs, key=order.__getitem__)
    for e in exits:
        for u in e.node.users:
            if u not in nodes and u.op != "output" and order[u] <= order[after]:
                raise CantChunk(f"{op_name(u)} uses {e.node.name} before the head's inputs are all computed")

    scalars = [e for e in exits if e.kind == "scalar"]
    mode = config.lm_head_grad
    if mode == "forward" and (len(scalars) != 1 or any(e.kind == "tokens" for e in exits)
                              or any(_needs_grad(t) for t in per_token) or adapted):
        # Gradients in the forward need one scalar loss and one weight (no adapters).
        mode = "recompute"
    if mode == "forward" and torch.is_autocast_enabled(dv.device.type):
        # The forward mode's bodies are traced here and call mst_fx's matmul ops, which
        # autocast (on around the compiled region) does not cast: the recompute mode's
        # bodies are the model's own ops, traced by AOTAutograd under the same autocast.
        mode = "recompute"
    wv = value(weight) if weight is not None else None
    fp32_acc = mode == "forward" and config.fp32_weight_grad and wv is not None \
        and wv.dtype in (torch.bfloat16, torch.float16)
    chunks = _chunk_count(config, tokens, width, vocab, fp32_acc, symbolic)
    logits_bytes = tokens * vocab * zv.element_size()
    if fp32_acc and config.chunks is None and not symbolic and \
            logits_bytes <= 2 * wv.numel() * wv.element_size():
        # The fp32 buffer costs about twice the weight's bytes beyond the final gradient
        # (H100, V=128256, H=4096, 4096 tokens: 2.10 GB over the gradients vs 1.05 GB for
        # plain compile); below that size chunking raises the peak.
        raise CantChunk(f"logits ({logits_bytes / 2**20:.0f} MiB) are no larger than the fp32 "
                        f"weight-gradient buffer: chunking would not lower the peak "
                        f"(fp32_weight_grad=False or chunks=N chunk it)")
    held = tokens * vocab * 4  # fp32 logits (or their gradient): what plain compile holds
    lora = f", LoRA r={'/'.join(map(str, unit.ranks))}" if unit.low_rank else ""
    detail = f"{width}->{vocab}, " + ", ".join(_exit_name(e) for e in exits) + f", grad={mode}{lora}" \
        + (", symbolic tokens" if symbolic else "")
    return Region(
        kind=KIND, where=where(list(unit.nodes)), tokens=tokens, chunks=chunks,
        bytes_saved=held - held // chunks, detail=detail,
        plan=HeadPlan(proj, unit.data, weight, bias, matmul, sorted(nodes, key=order.__getitem__),
                      exits, whole, per_token, width, vocab, tokens, mode,
                      config.logits == "drop", config.fp32_weight_grad, after,
                      list(unit.nodes), adapted, symbolic))


def _needs_grad(n: Node) -> bool:
    v = value(n)
    return v is not None and v.requires_grad


def _exit_name(e: Exit) -> str:
    if e.kind == "scalar":
        return f"loss({_target_name(e.node)})"
    return "per-token" if e.kind == "tokens" else "logits out"


def _target_name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


# ---- detection: which nodes belong to the head -------------------------------------------

def _level(v: torch.Tensor | None, vocab: int, tokens: int) -> str | None:
    if v is None:
        return None
    if v.dim() >= 1 and same_size(v.shape[-1], vocab) and same_size(numel(tuple(v.shape[:-1])), tokens):
        return "vocab"
    if v.dim() >= 1 and same_size(numel(tuple(v.shape)), tokens):
        return "tokens"
    if v.dim() == 0:
        return "scalar"
    return None


def _grow(proj: Node, vocab: int, tokens: int):
    """Region nodes after ``proj``, exits, whole and per-token outside inputs."""
    region: set[Node] = set()
    level = {proj: "vocab"}
    exits: dict[Node, Exit] = {}
    queue = [proj]
    while queue:
        n = queue.pop()
        for u in list(n.users):
            if u in region:
                continue
            if u.op == "output":
                kind = "logits" if level[n] == "vocab" else "tokens"
                exits.setdefault(n, Exit(n, kind))
                continue
            lv, mean = _head_op(u, n, level, vocab, tokens)
            if lv is None:  # not an op that runs per token
                if level[n] == "tokens" and n is not proj:
                    exits.setdefault(n, Exit(n, "tokens"))
                    continue
                if classify(u) is not None and classify(u).kind == "linear":
                    raise NotAHead()
                raise CantChunk(f"{op_name(u)} is not token-wise (uses {n.name}, "
                                f"{'logits' if level[n] == 'vocab' else 'per-token values'})")
            region.add(u)
            level[u] = lv
            if lv == "scalar":
                exits[u] = Exit(u, "scalar", mean)
            else:
                queue.append(u)
    # Outside inputs once the region is known (an input reached later by the walk is not
    # outside). None may depend on the head itself: the loop computes the head at once.
    whole: list[Node] = []
    per_token: list[Node] = []
    inside = region | {proj}
    for u in [n for n in proj.graph.nodes if n in region]:  # graph order: stable bodies
        _outside_inputs(u, inside, level, vocab, tokens, whole, per_token)
    for a in whole + per_token:
        if _depends_on(a, inside):
            raise CantChunk(f"{a.name} is computed from the head's own values by an op that is "
                            f"not token-wise")
    for e in exits.values():
        if e.kind == "logits" and e.node is not proj and value(e.node).shape[-1] != vocab:
            raise CantChunk(f"{e.node.name} is returned with an unexpected shape")
    return region, list(exits.values()), whole, per_token


def _depends_on(node: Node, targets: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def _head_op(u: Node, src: Node, level: dict, vocab: int, tokens: int):
    """(level of u's output, mean divisor for scalar exits) if ``u`` can run on a chunk of
    tokens, (None, None) if it is not a per-token op at all. Raises CantChunk for per-token
    ops in a form this pass does not handle."""
    v = value(u)
    src_level = level[src]
    if u.op == "call_function" and u.target in LOSS_FUNCTIONS:
        if u.args[0] is not src:
            raise CantChunk(f"{op_name(u)} takes the logits as its target")
        reduction, ignore = _loss_args(u)
        if value(src).dim() != 2:
            raise CantChunk(f"{op_name(u)} on {value(src).dim()}-D logits (classes not last)")
        if reduction == "none":
            return "tokens", None
        mean = ("count", arg_of(u, 1, "target"), ignore) if reduction == "mean" else None
        return "scalar", mean
    is_sum = (u.op == "call_function" and u.target in REDUCE_FUNCTIONS) or \
        (u.op == "call_method" and u.target in REDUCE_METHODS)
    if is_sum:
        if len(u.args) > 1 or u.kwargs:
            return None, None  # a reduction over some dims: not a loss over all tokens
        op = REDUCE_FUNCTIONS.get(u.target) or REDUCE_METHODS.get(u.target)
        return "scalar", (numel(tuple(value(src).shape)) if op == "mean" else None)
    if _is_rowwise(u):
        dim = arg_of(u, 1, "dim")
        if src_level != "vocab" or dim not in (-1, value(src).dim() - 1):
            return None, None
        return "vocab", None
    if (u.op == "call_function" and u.target is torch.logsumexp) or \
            (u.op == "call_method" and u.target == "logsumexp"):
        dim = arg_of(u, 1, "dim")
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        if src_level != "vocab" or dim not in (-1, value(src).dim() - 1) or arg_of(u, 2, "keepdim", False):
            return None, None
        return "tokens", None
    info = classify(u)
    if info is None or info.kind in ("linear", "split", "item"):
        return None, None
    if info.kind in ("view", "slice", "dropout"):
        if info.kind == "slice":
            return None, None
        if last_dim_only(u, info) is not None and info.kind == "dropout":
            raise CantChunk(last_dim_only(u, info))
        if u.args[0] is not src:
            return None, None
    lv = _level(v, vocab, tokens)
    if lv is None or (lv == "vocab" and src_level == "tokens"):
        return None, None
    if info.kind == "view" and lv != src_level:
        return None, None
    if lv == "scalar":
        return None, None
    return lv, None


def _is_rowwise(u: Node) -> bool:
    return (u.op == "call_function" and u.target in ROWWISE_FUNCTIONS) or \
        (u.op == "call_method" and u.target in ROWWISE_METHODS)


def _loss_args(u: Node):
    got = dict(zip(LOSS_PARAMS, u.args))
    got.update(u.kwargs)
    if got.get("weight") is not None:
        raise CantChunk(f"{op_name(u)} with class weights")
    if got.get("size_average") is not None or got.get("reduce") is not None:
        raise CantChunk(f"{op_name(u)} with legacy size_average/reduce")
    reduction = got.get("reduction", "mean")
    if not isinstance(reduction, str) or not isinstance(got.get("ignore_index", -100), int):
        raise CantChunk(f"{op_name(u)}: reduction or ignore_index is not a constant")
    return reduction, got.get("ignore_index", -100)


def _outside_inputs(u: Node, region: set, level: dict, vocab: int, tokens: int,
                    whole: list, per_token: list) -> None:
    for a in u.all_input_nodes:
        if a in region:
            continue
        av = value(a)
        if av is None:
            raise CantChunk(f"{op_name(u)} reads {a.name}, which is not a tensor")
        if same_size(av.numel(), 1) and av.dim() <= 1:
            kind = whole
        elif level[u] == "vocab" and same_size(av.shape[-1], vocab) and same_size(numel(tuple(av.shape[:-1])), 1):
            kind = whole  # bias-like, per vocabulary entry
        elif level[u] in ("tokens", "scalar") and same_size(av.numel(), tokens) and \
                (av.dim() == 1 or any(value(s) is not None and _same_shape(value(s).shape, av.shape)
                                      for s in u.all_input_nodes if s in region)):
            kind = per_token
        else:
            raise CantChunk(f"{op_name(u)} reads {a.name} {tuple(av.shape)}, neither per token "
                            f"nor per vocabulary entry")
        if a not in kind:
            kind.append(a)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _shape_dims(shape, data_shape, token_count):
    """For each dim of ``shape``: an int, ("data", i) for the input's token dim i, or
    ("tokens",) for the flattened token count; None if a symbolic dim is neither."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        i = next((i for i, t in enumerate(data_shape[:-1]) if same_size(d, t)), None)
        if i is not None:
            out.append(("data", i))
        elif same_size(d, token_count):
            out.append(("tokens",))
        else:
            return None
    return out


def _chunk_count(config: MSTConfig, tokens: int, width: int, vocab: int, fp32_acc: bool,
                 symbolic: bool = False) -> int:
    if symbolic and (config.chunk_bytes is not None or fp32_acc):
        # Both rules below scale M with the token count, which a symbolic graph does not
        # know: plan for long sequences (see chunking.bounded_chunks).
        natural = config.max_chunks
    elif config.chunk_bytes is not None:
        natural = math.ceil(tokens * vocab * 4 / config.chunk_bytes)
    elif fp32_acc:
        # The fp32 weight-gradient buffer (V x H x 4 bytes) is held anyway; a chunk's logits
        # and their gradient (2 x n x V in the model's dtype) as large as the weight cost no
        # more peak, and fewer chunks mean fewer passes over that buffer (H100, H=4096,
        # V=128256, 32k tokens: M=16 167 ms vs M=32 188 ms, same peak).
        natural = math.ceil(2 * tokens / width)
    else:  # MsT: a chunk's logits about the size of the head's input
        natural = math.ceil(vocab / width)
    chunks, too_few = bounded_chunks(config, tokens, natural, symbolic)
    if chunks < 2:
        raise CantChunk(too_few)
    return chunks


# ---- rewriting ----------------------------------------------------------------------------

def rewrite(gm: GraphModule, region: Region, names: dict) -> None:
    plan: HeadPlan = region.plan
    rows = _symbolic_counts(plan, region.chunks) if plan.symbolic else chunk_rows(plan.tokens, region.chunks)
    rest, outs = _rest_module(gm, plan)
    if plan.mode == "forward":
        new = _emit_forward(gm, plan, rest, rows, names)
    else:
        new = _emit_recompute(gm, plan, rest, rows, names)
    for e, n in zip(plan.exits, new):
        if e.kind == "logits":
            n.meta["mst_fx_logits"] = True
        for u in list(e.node.users):
            if u not in plan.nodes:
                u.replace_input_with(e.node, n)
    for n in reversed(plan.proj_nodes + plan.nodes):
        gm.graph.erase_node(n)


def _exit_order(plan: HeadPlan) -> list[Exit]:
    """Body outputs: scalars, then per-token values, then logits."""
    rank = {"scalar": 0, "tokens": 1, "logits": 2}
    return sorted(plan.exits, key=lambda e: rank[e.kind])


def _rest_module(owner: GraphModule, plan: HeadPlan) -> tuple[GraphModule, list[Exit]]:
    """Everything after the projection, on one chunk: inputs (z [n, V], *whole,
    *per-token chunks), outputs the exits in _exit_order (scalar exits as chunk sums)."""
    g = Graph()
    env: dict[Node, Node] = {plan.proj: g.placeholder("z")}
    extra = [plan.bias] if plan.bias is not None else []
    for i, e in enumerate(extra + plan.whole):
        env[e] = g.placeholder(f"w_{i}")
    for i, e in enumerate(plan.per_token):
        env[e] = g.placeholder(f"t_{i}")
    if plan.bias is not None:
        env[plan.proj] = g.call_function(operator.add, (env[plan.proj], env[plan.bias]))
    scalar_exits = {e.node for e in plan.exits if e.kind == "scalar"}
    for n in plan.nodes:
        env[n] = _chunk_node(g, n, env, n in scalar_exits)
    outs = _exit_order(plan)
    g.output(tuple(env[e.node] for e in outs))
    return GraphModule(owner, g), outs


def _chunk_node(g: Graph, n: Node, env: dict, scalar_exit: bool) -> Node:
    m = lambda a: map_arg(a, env.__getitem__)  # noqa: E731
    if n.op == "call_function" and n.target in LOSS_FUNCTIONS:
        kwargs = dict(n.kwargs)
        for k, a in zip(LOSS_PARAMS[2:], n.args[2:]):
            kwargs[k] = a
        kwargs["reduction"] = "sum" if scalar_exit else "none"
        return g.call_function(n.target, (m(n.args[0]), m(n.args[1])), m(kwargs))
    if scalar_exit:  # .sum() / .mean() of everything: the chunk's sum
        return g.call_function(torch.sum, (m(n.args[0]),))
    if _is_rowwise(n):
        kwargs = {k: v for k, v in n.kwargs.items() if k != "dim"}
        return g.call_function(F.log_softmax if "log" in _target_name(n) else F.softmax,
                               (m(n.args[0]),), {"dim": -1, **m(kwargs)})
    if _target_name(n) == "logsumexp":
        return g.call_function(torch.logsumexp, (m(n.args[0]), -1))
    info = classify(n)
    call = chunk_call(n, info)
    if call is None or info.kind == "view":  # regrouping tokens: identity on a chunk
        return env[n.args[0]]
    op, target, args, kwargs = call
    return g.create_node(op, target, m(args), m(kwargs))


def _whole_inputs(plan: HeadPlan) -> list[Node]:
    return ([plan.bias] if plan.bias is not None else []) + plan.whole


def _emit_forward(gm: GraphModule, plan: HeadPlan, rest: GraphModule, rows: list[int],
                  names: dict) -> list[Node]:
    from mst_fx import ops  # noqa: F401  (registers torch.ops.mst_fx)

    g = gm.graph
    whole = _whole_inputs(plan)
    need_h, need_w = _needs_grad(plan.data), _needs_grad(plan.weight)
    grad_whole = [i for i, w in enumerate(whole) if _needs_grad(w) and value(w).is_floating_point()]
    wv = value(plan.weight)
    low = wv.dtype in (torch.bfloat16, torch.float16)
    acc_dtype = torch.float32 if low and plan.fp32_weight_grad else wv.dtype
    outs = _exit_order(plan)
    logits = [e for e in outs if e.kind == "logits"]
    zdtype = value(plan.proj).dtype

    with g.inserting_before(plan.after.next):
        cursor = _Cursor(g)
        flat = cursor.method("reshape", plan.data, (-1, plan.width))
        hd = cursor.method("detach", flat)
        wd = cursor.method("detach", plan.weight)
        whole_d = [cursor.method("detach", w) for w in whole]
        split, sizes, n_tokens, body_sizes = _splitter(g, cursor, plan, flat, len(rows))
        parts = split(hd)
        tok_parts = [split(cursor.method("reshape", cursor.method("detach", t), (-1,))) for t in plan.per_token]
        acc = None  # the weight gradient: the first chunk's product, then added into
        gh = cursor.fn(torch.empty_like, hd) if need_h else None
        bufs = [None if plan.drop_logits else
                cursor.method("new_empty", hd, (n_tokens, plan.vocab), dtype=zdtype) for _ in logits]
        sums, whole_grads = [], [None] * len(grad_whole)
        start = 0
        for k, n in enumerate(rows):
            if plan.symbolic:
                start = cursor.fn(operator.mul, sizes[0], k)
            attr, ident = _body_name(gm, plan, rest, names, n, "forward", need_h, need_w, grad_whole,
                                     len(body_sizes))
            piece = cursor.fn(operator.getitem, parts, k)
            toks = [cursor.fn(operator.getitem, p, k) for p in tok_parts]
            call = cursor.fn(INVOKE, cursor.get_attr(attr), ident, piece, wd, *whole_d, *toks, *body_sizes)
            n_out = 1 + need_h + need_w + len(grad_whole) + len(bufs)
            got = [cursor.fn(operator.getitem, call, i) for i in range(n_out)]  # body outputs
            sums.append(got.pop(0))
            if need_h:
                cursor.fn(torch.ops.mst_fx.write_rows, gh, start, got.pop(0))
            if need_w:
                dz = got.pop(0)
                # W [H, V]: dW += h^T dz; W [V, H]: dW += dz^T h
                a, b = (cursor.method("t", piece), dz) if plan.matmul else (cursor.method("t", dz), piece)
                if acc is None:
                    acc = cursor.fn(torch.ops.mst_fx.mm_acc, a, b, acc_dtype)
                else:
                    cursor.fn(torch.ops.mst_fx.addmm_into, acc, a, b)
            for j in range(len(grad_whole)):
                gpart = got.pop(0)
                whole_grads[j] = gpart if whole_grads[j] is None else cursor.fn(operator.add, whole_grads[j], gpart)
            for b in bufs:
                lg = got.pop(0)
                if b is not None:
                    cursor.fn(torch.ops.mst_fx.write_rows, b, start, lg)
            if not plan.symbolic:
                start += n
        total = cursor.method("sum", cursor.fn(torch.stack, sums))
        terms = []
        if need_h:
            terms.append(cursor.method("sum", cursor.fn(operator.mul, flat, gh), dtype=torch.float32))
        for j, i in enumerate(grad_whole):
            terms.append(cursor.method("sum", cursor.fn(operator.mul, whole[i], whole_grads[j]),
                                       dtype=torch.float32))
        loss_dtype = value(outs[0].node).dtype
        zero = None  # an exactly zero term that carries the gradients (docstring)
        if terms:
            s = terms[0]
            for t in terms[1:]:
                s = cursor.fn(operator.add, s, t)
            zero = cursor.method("to", cursor.fn(operator.sub, s, cursor.method("detach", s)), loss_dtype)
        if need_w:
            # Autograd keeps the weight gradient from the forward to the backward (for a tied
            # weight, to the end of it): in the weight's dtype, the fp32 accumulator rounded
            # once here (see mst_fx.ops).
            dw = acc if acc_dtype == wv.dtype else cursor.method("to", acc, wv.dtype)
            if zero is None:
                zero = cursor.method("to", cursor.fn(torch.zeros_like, total), loss_dtype)
            zero = cursor.fn(torch.ops.mst_fx.with_grad, zero, plan.weight, dw)
        new = {outs[0].node: _mean(cursor, plan, outs[0], total, zero)}
        for e, b in zip(logits, bufs):
            new[e.node] = _logits_value(cursor, plan, e, b, hd)
    return [new[e.node] for e in plan.exits]


def _emit_recompute(gm: GraphModule, plan: HeadPlan, rest: GraphModule, rows: list[int],
                    names: dict) -> list[Node]:
    from mst_fx import ops  # noqa: F401

    g = gm.graph
    whole = _whole_inputs(plan)
    outs = _exit_order(plan)
    zdtype = value(plan.proj).dtype
    with g.inserting_before(plan.after.next):
        cursor = _Cursor(g)
        flat = cursor.method("reshape", plan.data, (-1, plan.width))
        split, sizes, n_tokens, body_sizes = _splitter(g, cursor, plan, flat, len(rows))
        parts = split(flat)
        tok_parts = [split(cursor.method("reshape", t, (-1,))) for t in plan.per_token]
        logit_exits = [e for e in outs if e.kind == "logits"]
        bufs = [None if plan.drop_logits else
                cursor.method("new_empty", flat, (n_tokens, plan.vocab), dtype=zdtype)
                for _ in logit_exits]
        collected: list[list[Node]] = [[] for _ in outs]
        start = 0
        for k, n in enumerate(rows):
            if plan.symbolic:
                start = cursor.fn(operator.mul, sizes[0], k)
            attr, ident = _body_name(gm, plan, rest, names, n, "recompute", True, True, [], len(body_sizes))
            piece = cursor.fn(operator.getitem, parts, k)
            toks = [cursor.fn(operator.getitem, p, k) for p in tok_parts]
            call = cursor.fn(INVOKE, cursor.get_attr(attr), ident, piece, *plan.proj_inputs(), *whole, *toks,
                             *body_sizes)
            for i, e in enumerate(outs):
                y = cursor.fn(operator.getitem, call, i)
                if e.kind == "logits":
                    b = bufs[logit_exits.index(e)]
                    if b is not None:
                        cursor.fn(torch.ops.mst_fx.write_rows, b, start, cursor.method("detach", y))
                else:
                    # A fresh tensor per chunk: every chunk's incoming gradient then has the
                    # same metadata and one backward body serves all chunks.
                    collected[i].append(cursor.fn(operator.mul, y, 1.0))
            if not plan.symbolic:
                start += n
        new = {}
        for i, e in enumerate(outs):
            if e.kind == "scalar":
                new[e.node] = _mean(cursor, plan, e, cursor.method("sum", cursor.fn(torch.stack, collected[i])))
            elif e.kind == "tokens":
                joined = cursor.fn(torch.cat, collected[i])
                new[e.node] = cursor.method("reshape", joined, _shape_of(cursor, plan, e.node, flat))
            else:
                new[e.node] = _logits_value(cursor, plan, e, bufs[logit_exits.index(e)], flat)
    return [new[e.node] for e in plan.exits]


def _splitter(g: Graph, cursor, plan: HeadPlan, flat: Node, chunks: int):
    """How the loop cuts the tokens: (split function, row-count nodes or None, token count,
    size nodes passed to every body). Symbolic token counts: see mst_fx.chunking (no guard
    on n; the bodies take the symbolic sizes so that Inductor can bind their shapes)."""
    if not plan.symbolic:
        return (lambda t: cursor.fn(torch.tensor_split, t, chunks)), None, plan.tokens, []
    sizes = symbolic_rows(g, flat, chunks)
    body_sizes = [cursor.method("size", plan.data, i) for i, d in enumerate(value(plan.data).shape[:-1])
                  if not isinstance(d, int)]
    return (lambda t: cursor.fn(torch.split, t, sizes)), sizes, cursor.method("size", flat, 0), body_sizes


def _mean(cursor, plan: HeadPlan, e: Exit, total: Node, zero: Node | None = None) -> Node:
    """The exit's value from the sum of its chunks; ``zero`` (forward mode) is the exactly
    zero term that carries the gradients."""
    if e.mean is None or isinstance(e.mean, int):
        value_ = total if zero is None else cursor.fn(operator.add, total, zero)
        return value_ if e.mean is None else cursor.fn(operator.truediv, value_, e.mean)
    _, target, ignore = e.mean
    count = cursor.method("sum", cursor.fn(operator.ne, target, ignore))
    mean = cursor.fn(operator.truediv, total, count)
    if zero is None:
        return mean
    # With every label ignored the mean is 0/0 = nan and eager's gradients are zero; the
    # stored gradients are zero then, and dividing them by 1 keeps them zero (1/0 would
    # make them nan).
    return cursor.fn(operator.add, mean,
                     cursor.fn(operator.truediv, zero, cursor.method("clamp", count, min=1)))


def _logits_value(cursor, plan: HeadPlan, e: Exit, buf: Node | None, like: Node) -> Node:
    if buf is None:
        return cursor.method("new_empty", like, (0,), dtype=value(e.node).dtype)
    return cursor.method("reshape", buf, _shape_of(cursor, plan, e.node, like))


def _shape_of(cursor, plan: HeadPlan, node: Node, flat: Node) -> tuple:
    """``node``'s shape as reshape arguments; symbolic dims read at run time."""
    if not plan.symbolic:
        return tuple(value(node).shape)
    data_shape = value(plan.data).shape
    dims = _shape_dims(value(node).shape, data_shape, numel(tuple(data_shape[:-1])))
    return tuple(d if isinstance(d, int) else cursor.method("size", plan.data, d[1]) if d[0] == "data"
                 else cursor.method("size", flat, 0) for d in dims)


class _Cursor:
    """Appends nodes one after another at the graph's insertion point."""

    def __init__(self, g: Graph):
        self.g = g

    def fn(self, target, *args, **kwargs) -> Node:
        return self.g.call_function(target, args, kwargs)

    def method(self, name, *args, **kwargs) -> Node:
        return self.g.call_method(name, args, kwargs)

    def get_attr(self, name) -> Node:
        return self.g.get_attr(name)


def _body_name(gm: GraphModule, plan: HeadPlan, rest: GraphModule, names: dict, rows: int,
               mode: str, need_h: bool, need_w: bool, grad_whole: list[int], n_sizes: int = 0) -> tuple[str, str]:
    """The attribute and invoke_subgraph identifier of the body for chunks of ``rows``
    tokens, built on first use; equal heads (same code, shapes, dtypes) share one."""
    whole = _whole_inputs(plan)
    sig = [(tuple(value(a).shape), str(value(a).dtype))
           for a in [plan.data] + plan.proj_inputs() + whole + plan.per_token]
    proj = plan.adapted.key if plan.adapted is not None else plan.matmul
    key = f"{KIND}|{rest.code}|{mode}|{proj}|{need_h}|{need_w}|{grad_whole}|{sig}|rows={rows}|sizes={n_sizes}"
    if key not in names:
        i = len(names)
        attr, ident = f"mst_{KIND}_body_{i}", f"mst_{KIND}_{i}"
        if mode == "forward":
            body = _grad_body(plan, rest, rows, need_h, need_w, grad_whole, n_sizes)
        else:
            n_in = 1 + len(plan.proj_inputs()) + len(whole) + len(plan.per_token) + n_sizes
            body = _checkpointed(_full_body(gm, plan, rest, n_sizes), n_in, len(plan.exits))
        names[key] = (attr, ident, body)
    attr, ident, body = names[key]
    if not hasattr(gm, attr):
        gm.add_submodule(attr, body)
    return attr, ident


def _project(h, w, matmul: bool):
    return h @ w if matmul else F.linear(h, w)


def _full_body(owner: GraphModule, plan: HeadPlan, rest: GraphModule, n_sizes: int = 0) -> GraphModule:
    """Projection and rest in one graph, for the recompute mode; ``n_sizes`` unused size
    inputs last (symbolic token counts, see mst_fx.chunking.build_body)."""
    g = Graph()
    h = g.placeholder("h")
    ws = [g.placeholder(f"w_{i}") for i in range(len(plan.proj_inputs()))]
    others = [g.placeholder(f"x_{i}") for i in range(len(_whole_inputs(plan)) + len(plan.per_token))]
    for i in range(n_sizes):
        g.placeholder(f"size_{i}")
    root = torch.nn.Module()
    root.rest = rest
    if plan.adapted is not None:  # base + adapters, as the model wrote them
        root.proj = plan.adapted.module
        z = g.call_function(operator.getitem, (g.call_module("proj", (h, *ws)), 0))
    else:
        z = g.call_function(torch.matmul if plan.matmul else F.linear, (h, *ws))
    g.output(g.call_module("rest", (z, *others)))
    return GraphModule(root, g)


def _grad_body(plan: HeadPlan, rest: GraphModule, rows, need_h: bool, need_w: bool,
               grad_whole: list[int], n_sizes: int = 0) -> GraphModule:
    """make_fx graph of one chunk's loss and gradients (see the module docstring). ``rows``:
    the chunk's row count; when symbolic, the body is traced at that count in the graph's
    own shape environment, and takes ``n_sizes`` unused size inputs last (see
    mst_fx.chunking.build_body)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    whole = _whole_inputs(plan)
    n_logits = sum(e.kind == "logits" for e in plan.exits)
    matmul = plan.matmul
    n_others = len(whole) + len(plan.per_token)

    def body(h, w, *rest_inputs):
        others = rest_inputs[:n_others]
        z = _project(h, w, matmul)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(need_h or need_w)
            xs = list(others)
            for i in grad_whole:
                xs[i] = xs[i].detach().requires_grad_()
            outs = rest(zz, *xs)
            wrt = ([zz] if need_h or need_w else []) + [xs[i] for i in grad_whole]
            grads = torch.autograd.grad(outs[0], wrt, allow_unused=True) if wrt else []
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, wrt)]
        result = [outs[0].detach()]
        if need_h or need_w:
            dz = grads[0]
            if need_h:
                result.append(dz @ w.t() if matmul else dz @ w)
            if need_w:
                result.append(dz)
            grads = grads[1:]
        result += [gr.float() if gr.dtype in (torch.bfloat16, torch.float16) else gr for gr in grads]
        result += [o.detach() for o in outs[len(outs) - n_logits:]]
        return tuple(result)

    examples = []
    dv = value(plan.data)
    fake_mode = dv.fake_mode
    with fake_mode:
        examples.append(torch.empty((rows, plan.width), dtype=dv.dtype, device=dv.device))
        for a in [plan.weight] + whole:
            v = value(a)
            examples.append(torch.empty(tuple(v.shape), dtype=v.dtype, device=v.device))
        for t in plan.per_token:
            v = value(t)
            examples.append(torch.empty((rows,), dtype=v.dtype, device=v.device))
        examples += [d for d in dv.shape[:-1] if not isinstance(d, int)][:n_sizes]
        gm = make_fx(body, tracing_mode="symbolic" if plan.symbolic else "real")(*examples)
    return gm


def _symbolic_counts(plan: HeadPlan, chunks: int) -> list:
    """symbolic_rows' row counts as SymInts of the graph's token count (M-1 of n // M, then
    the rest): a chunk body's shape, and in its name, two bodies per head as for static n."""
    n = numel(tuple(value(plan.data).shape[:-1]))
    q = n // chunks
    return [q] * (chunks - 1) + [n - q * (chunks - 1)]
