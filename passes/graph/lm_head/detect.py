"""lm_head, detection: find a vocabulary projection and the per-token ops after it up to
its exits (losses, per-token values, returned logits), decide the gradient mode and M, and
describe it as a Region with a HeadPlan (see the package docstring for the rules)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from mst_fx import fx
from mst_fx.config import MSTConfig
from mst_fx.passes.graph.chunking import Body, bounded_chunks, build_body
from mst_fx.passes.graph.projections import Projection, find
from mst_fx.passes.graph.tokenwise import (
    AUTOGRAD_FUNCTION,
    LOSS_FUNCTIONS,
    arg_of,
    classify,
    hint,
    last_dim_only,
    numel,
    op_name,
    same_size,
    value,
)
from mst_fx.report import Reason, Region, Report, Skip

KIND = "lm_head"
MIN_VOCAB_RATIO = 4

ROWWISE_FUNCTIONS = {F.log_softmax, F.softmax, torch.log_softmax, torch.softmax}
ROWWISE_METHODS = {"log_softmax", "softmax"}
REDUCE_FUNCTIONS = {torch.sum: "sum", torch.mean: "mean"}
REDUCE_METHODS = {"sum": "sum", "mean": "mean"}
# F.cross_entropy's parameters in order (F.nll_loss's are the same, without the last).
LOSS_PARAMS = ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
               "label_smoothing"]


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
        except Skip as e:  # NOT_A_REGION: not a vocabulary projection feeding a loss
            report.skip(KIND, where(list(unit.nodes)), e)
    return report


def _plan(gm: GraphModule, unit: Projection, config: MSTConfig, order: dict, where) -> Region:
    base = unit.base
    if base.target not in (torch._C._nn.linear, F.linear, torch.matmul, operator.matmul):
        raise Skip(Reason.NOT_A_REGION)
    proj = unit.out
    matmul = base.target in (torch.matmul, operator.matmul)
    weight = base.args[1] if len(base.args) > 1 else base.kwargs.get("weight")
    bias = None if matmul else (base.args[2] if len(base.args) > 2 else base.kwargs.get("bias"))
    dv, zv = value(unit.data), value(proj)
    if dv is None or zv is None or dv.dim() < 2:
        raise Skip(Reason.NOT_A_REGION)
    width, vocab, token_count = dv.shape[-1], unit.out_width, numel(tuple(dv.shape[:-1]))
    if not isinstance(width, int):  # dynamic=True: known equal to the weight's width
        if not same_size(width, unit.in_width):
            raise Skip(Reason.SYMBOLIC, "symbolic feature width")
        width = unit.in_width
    # Symbolic token count (dynamic shapes): M from the traced length.
    symbolic = not isinstance(token_count, int)
    tokens = hint(token_count)

    nodes, exits, whole, per_token = _grow(proj, vocab, token_count)
    if symbolic:
        for e in exits:
            if e.kind != "scalar" and shape_dims(value(e.node).shape, dv.shape, token_count) is None:
                raise Skip(Reason.SYMBOLIC, f"{e.node.name} {tuple(value(e.node).shape)}: symbolic token dims "
                                            f"other than the input's")
            if e.kind == "scalar" and e.mean is not None and not isinstance(e.mean, (int, tuple)):
                raise Skip(Reason.SYMBOLIC, f"{op_name(e.node)}: a mean over a symbolic count of elements")
    if not any(e.kind != "logits" for e in exits):
        raise Skip(Reason.NO_GAIN, "no loss over the logits in this graph (logits only)")
    if not zv.requires_grad:
        raise Skip(Reason.NO_GRADIENT, "no gradient in this graph (inference): nothing to save for backward")
    if bias is not None and (value(bias) is None or value(bias).dim() != 1):
        raise Skip(Reason.SHAPE, "projection bias is not a vector")
    adapted = None
    if unit.low_rank:  # the projection's own nodes, copied into the body whole
        for m in unit.nodes:
            info = classify(m)
            if info.kind == "dropout" and last_dim_only(m, info):
                # Unlike the MLP pass's bodies, a recomputed head body with dropout gave
                # gradients of another mask (finite differences, torch 2.13, float64).
                raise Skip(Reason.RANDOM, f"LoRA adapter with dropout p={arg_of(m, 1, 'p', 0.5)} in training: "
                                          f"the recomputed head would draw a different mask")
        adapted = build_body(gm, list(unit.nodes), unit.data, proj, checkpoint=False)
        weight, bias = None, None

    proj_inputs = adapted.externals if adapted else [weight] + ([bias] if bias is not None else [])
    inputs = [unit.data] + proj_inputs + whole + per_token
    after = max(inputs, key=order.__getitem__)
    for e in exits:
        for u in e.node.users:
            if u not in nodes and u.op != "output" and order[u] <= order[after]:
                raise Skip(Reason.ESCAPES, f"{op_name(u)} uses {e.node.name} before the head's inputs are all computed")

    scalars = [e for e in exits if e.kind == "scalar"]
    mode = config.lm_head_grad
    if mode == "forward" and (len(scalars) != 1 or any(e.kind == "tokens" for e in exits)
                              or any(needs_grad(t) for t in per_token) or adapted):
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
        raise Skip(Reason.NO_GAIN, f"logits ({logits_bytes / 2**20:.0f} MiB) are no larger than the fp32 "
                                   f"weight-gradient buffer: chunking would not lower the peak "
                                   f"(fp32_weight_grad=False or chunks=N chunk it)")
    held = tokens * vocab * 4  # fp32 logits (or their gradient): what plain compile holds
    lora = f", LoRA r={'/'.join(map(str, unit.ranks))}" if unit.low_rank else ""
    detail = f"{width}->{vocab}, " + ", ".join(_exit_name(e) for e in exits) + f", grad={mode}{lora}" \
        + (", symbolic tokens" if symbolic else "")
    return Region(
        kind=KIND, where=where(list(unit.nodes)), tokens=tokens, chunks=chunks,
        bytes_saved=held - held // chunks, detail=detail,
        aliases_inputs=mode != "forward",  # forward mode: bodies get detached inputs
        plan=HeadPlan(proj, unit.data, weight, bias, matmul, sorted(nodes, key=order.__getitem__),
                      exits, whole, per_token, width, vocab, tokens, mode,
                      config.logits == "drop", config.fp32_weight_grad, after,
                      list(unit.nodes), adapted, symbolic))


def needs_grad(n: Node) -> bool:
    v = value(n)
    return v is not None and v.requires_grad


def _exit_name(e: Exit) -> str:
    if e.kind == "scalar":
        return f"loss({fx.target_name(e.node)})"
    return "per-token" if e.kind == "tokens" else "logits out"


# ---- which nodes belong to the head ---------------------------------------------------------

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
                    raise Skip(Reason.NOT_A_REGION)
                raise Skip(Reason.NOT_TOKENWISE, f"{op_name(u)} is not token-wise (uses {n.name}, "
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
            raise Skip(Reason.NOT_TOKENWISE, f"{a.name} is computed from the head's own values by an op that is "
                                             f"not token-wise")
    for e in exits.values():
        if e.kind == "logits" and e.node is not proj and value(e.node).shape[-1] != vocab:
            raise Skip(Reason.SHAPE, f"{e.node.name} is returned with an unexpected shape")
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
    tokens, (None, None) if it is not a per-token op at all. Raises Skip for per-token
    ops in a form this pass does not handle."""
    v = value(u)
    src_level = level[src]
    if u.op == "call_function" and u.target in LOSS_FUNCTIONS:
        if u.args[0] is not src:
            raise Skip(Reason.UNSUPPORTED, f"{op_name(u)} takes the logits as its target")
        reduction, ignore = _loss_args(u)
        if value(src).dim() != 2:
            raise Skip(Reason.SHAPE, f"{op_name(u)} on {value(src).dim()}-D logits (classes not last)")
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
    if is_rowwise(u):
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
    if u.target is AUTOGRAD_FUNCTION or (u.target is operator.getitem and isinstance(u.args[0], Node)
                                         and u.args[0].target is AUTOGRAD_FUNCTION):
        # a torch.autograd.Function, and its output (per token if classify says pointwise)
        return (src_level, None) if classify(u.args[0] if u.target is operator.getitem else u) else (None, None)
    info = classify(u)
    if info is None or info.kind in ("linear", "split", "item"):
        return None, None
    if info.kind in ("view", "slice", "dropout"):
        if info.kind == "slice":
            return None, None
        if last_dim_only(u, info) is not None and info.kind == "dropout":
            raise Skip(Reason.NOT_TOKENWISE, last_dim_only(u, info))
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


def is_rowwise(u: Node) -> bool:
    return (u.op == "call_function" and u.target in ROWWISE_FUNCTIONS) or \
        (u.op == "call_method" and u.target in ROWWISE_METHODS)


def _loss_args(u: Node):
    got = dict(zip(LOSS_PARAMS, u.args))
    got.update(u.kwargs)
    if got.get("weight") is not None:
        raise Skip(Reason.UNSUPPORTED, f"{op_name(u)} with class weights")
    if got.get("size_average") is not None or got.get("reduce") is not None:
        raise Skip(Reason.UNSUPPORTED, f"{op_name(u)} with legacy size_average/reduce")
    reduction = got.get("reduction", "mean")
    if not isinstance(reduction, str) or not isinstance(got.get("ignore_index", -100), int):
        raise Skip(Reason.UNSUPPORTED, f"{op_name(u)}: reduction or ignore_index is not a constant")
    return reduction, got.get("ignore_index", -100)


def _outside_inputs(u: Node, region: set, level: dict, vocab: int, tokens: int,
                    whole: list, per_token: list) -> None:
    for a in u.all_input_nodes:
        if a in region:
            continue
        av = value(a)
        if av is None:
            raise Skip(Reason.UNSUPPORTED, f"{op_name(u)} reads {a.name}, which is not a tensor")
        if same_size(av.numel(), 1) and av.dim() <= 1:
            kind = whole
        elif level[u] == "vocab" and same_size(av.shape[-1], vocab) and same_size(numel(tuple(av.shape[:-1])), 1):
            kind = whole  # bias-like, per vocabulary entry
        elif level[u] in ("tokens", "scalar") and same_size(av.numel(), tokens) and \
                (av.dim() == 1 or any(value(s) is not None and _same_shape(value(s).shape, av.shape)
                                      for s in u.all_input_nodes if s in region)):
            kind = per_token
        else:
            raise Skip(Reason.SHAPE, f"{op_name(u)} reads {a.name} {tuple(av.shape)}, neither per token "
                                     f"nor per vocabulary entry")
        if a not in kind:
            kind.append(a)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def shape_dims(shape, data_shape, token_count):
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
        raise Skip(Reason.NO_GAIN, too_few)
    return chunks


def whole_inputs(plan: HeadPlan) -> list[Node]:
    """What every chunk body reads whole besides the projection's weight: its bias and the
    per-vocabulary / scalar tensors of the rest of the head."""
    return ([plan.bias] if plan.bias is not None else []) + plan.whole

