"""Which torch-level FX nodes act on every token independently, and how to run them on a chunk.

Dynamo hands the backend a graph of torch-level calls (``torch._C._nn.linear``,
``torch.nn.functional.silu``, ``operator.mul``, tensor methods such as ``x.float()``).
A node is *token-wise* when row t of its output depends only on row t of its token inputs;
"tokens" are all leading dims of a tensor flattened, the last dim is the feature dim.

``classify`` says what a node is (a projection, a pointwise op, a split of the feature dim,
a view that only regroups tokens, ...) or returns None. ``chunk_call`` gives the call to
emit for the same node inside a chunk body, where every token tensor is 2-D ``[n, d]``:
dims become -1, views that regroup tokens become the identity.

Shapes come from ``node.meta["example_value"]`` (fake tensors recorded by Dynamo).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Node

from mst_fx.fx import op_name, target_name  # noqa: F401 - op_name: re-exported for the passes

POINTWISE_FUNCTIONS = {
    F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh,
    torch._C._nn.gelu, torch._C._nn.silu, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
    torch.square, torch.sqrt, torch.rsqrt, torch.pow, torch.abs, torch.neg, torch.erf,
    torch.clamp, torch.mul, torch.add, torch.sub, torch.div,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg,
}
POINTWISE_METHODS = {
    "float", "half", "bfloat16", "double", "to", "mul", "add", "sub", "div", "pow",
    "sigmoid", "tanh", "relu", "exp", "neg", "clamp", "square", "sqrt", "rsqrt", "abs",
    "contiguous", "erf", "silu",
}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul}
VIEW_METHODS = {"view", "reshape", "flatten"}
VIEW_FUNCTIONS = {torch.reshape, torch.flatten}
SPLIT_METHODS = {"chunk", "split", "tensor_split"}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
AUTOGRAD_FUNCTION = torch.ops.higher_order.autograd_function_apply
_SET_GRAD = torch._C._set_grad_enabled
# Losses over the classes (vocabulary) of each token; the lm_head pass ends at these.
LOSS_FUNCTIONS = {F.cross_entropy, F.nll_loss}


@dataclass(frozen=True)
class OpInfo:
    """What a node is, for chunking purposes.

    kind: "linear" (a projection of ``data`` by a weight: in_width -> out_width),
    "pointwise", "dropout", "split" (splits the feature dim into a tuple), "item" (takes
    one part of a split), "slice" (indexes the feature dim), "view" (regroups tokens,
    feature dim unchanged), "type_as" (dtype cast to another tensor's dtype).
    """

    kind: str
    data: Node | None = None  # the token input of a projection
    in_width: int = 0
    out_width: int = 0


def value(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    v = node.meta.get("example_value")
    return v if isinstance(v, torch.Tensor) else None


def classify(node: Node) -> OpInfo | None:
    """Describe ``node`` if it is token-wise, else None. Shapes are checked by the caller."""
    if node.op == "call_function":
        t = node.target
        if t in LINEAR_FUNCTIONS:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            wv = value(w)
            if wv is not None and wv.dim() == 2:
                return OpInfo("linear", node.args[0], int(wv.shape[1]), int(wv.shape[0]))
            return None
        if t in MATMUL_FUNCTIONS:
            wv = value(node.args[1])
            if wv is not None and wv.dim() == 2:
                return OpInfo("linear", node.args[0], int(wv.shape[0]), int(wv.shape[1]))
            return None
        if t is torch.addmm:  # HF Conv1D: addmm(bias, x.view(-1, nx), weight)
            wv = value(node.args[2])
            if wv is not None and wv.dim() == 2 and set(node.kwargs) <= {"beta", "alpha"}:
                return OpInfo("linear", node.args[1], int(wv.shape[0]), int(wv.shape[1]))
            return None
        if t in POINTWISE_FUNCTIONS:
            return OpInfo("pointwise")
        if t in DROPOUT_FUNCTIONS:
            return OpInfo("dropout")
        if t in SPLIT_FUNCTIONS:
            return OpInfo("split")
        if t in VIEW_FUNCTIONS:
            return OpInfo("view")
        if t is operator.getitem:
            if isinstance(node.args[1], int) and value(node.args[0]) is None:
                return OpInfo("item")  # one part of a split
            return OpInfo("slice")
        if t is torch.narrow:
            return OpInfo("slice")
        if t is AUTOGRAD_FUNCTION and _pointwise_function(node):
            return OpInfo("pointwise")
        return None
    if node.op == "call_method":
        m = node.target
        if m in POINTWISE_METHODS:
            return OpInfo("pointwise")
        if m == "type_as":
            return OpInfo("type_as")
        if m in VIEW_METHODS:
            return OpInfo("view")
        if m in SPLIT_METHODS:
            return OpInfo("split")
        if m == "narrow":
            return OpInfo("slice")
        return None
    return None


def last_dim_only(node: Node, info: OpInfo, random_ok: bool = False) -> str | None:
    """For view/split/slice/dropout nodes: None when the op is safe per chunk, else why not.

    ``random_ok``: the chunk body is not inside a region the model checkpointed, so a
    dropout with p > 0 may run in it (the body's own checkpoint keeps the mask it drew;
    checked against finite differences in tests/test_lora.py). Inside a checkpointed region
    torch (2.13) draws a new mask when the outer region is recomputed: gradients then
    belong to another forward (measured: off by up to 120%), so it is refused there."""
    src = value(node.args[0])
    if info.kind == "view":  # the identity on a chunk only if the feature dim stays as it is
        out = value(node)
        if src is None or out is None or out.dtype != src.dtype or out.shape[-1] != src.shape[-1]:
            return f"{target_name(node)} changes the feature dim or dtype"
        return None
    if info.kind == "dropout":
        p = arg_of(node, 1, "p", 0.5)
        training = arg_of(node, 2, "training", True)
        if training and p != 0 and not random_ok:
            return (f"dropout p={p} in training inside an activation-checkpointed region: "
                    f"its recompute would draw a different mask in the chunk")
        return None
    if info.kind == "split":
        dim = arg_of(node, 2, "dim", 0)
        return None if _is_last(dim, src) else f"{target_name(node)} splits dim {dim}, not the feature dim"
    if info.kind == "slice":
        if node.target in (torch.narrow, "narrow"):
            dim = arg_of(node, 1, "dim", 0)
            return None if _is_last(dim, src) else f"narrow over dim {dim}, not the feature dim"
        return None if _feature_index(node.args[1], src.dim()) is not None else \
            f"indexing {node.args[1]!r} touches token dims"
    return None


def chunk_call(node: Node, info: OpInfo):
    """(op, target, args, kwargs) to emit for ``node`` in a 2-D chunk body; args still hold
    the original Nodes (the caller maps them). ``None`` means: the identity of args[0]."""
    if info.kind == "view":
        return None
    if info.kind == "type_as":
        return ("call_method", "to", (node.args[0], value(node.args[1]).dtype), {})
    if info.kind == "split":
        args, kwargs = list(node.args), dict(node.kwargs)
        if "dim" in kwargs:
            kwargs["dim"] = -1
        elif len(args) > 2:
            args[2] = -1
        else:
            kwargs["dim"] = -1
        return (node.op, node.target, tuple(args), kwargs)
    if info.kind == "slice":
        if node.target in (torch.narrow, "narrow"):
            args, kwargs = list(node.args), dict(node.kwargs)
            if "dim" in kwargs:
                kwargs["dim"] = -1
            else:
                args[1] = -1
            return (node.op, node.target, tuple(args), kwargs)
        index = _feature_index(node.args[1], value(node.args[0]).dim())
        return (node.op, node.target, (node.args[0], (Ellipsis, index)), {})
    return (node.op, node.target, node.args, node.kwargs)


def _pointwise_function(node: Node) -> bool:
    """A ``torch.autograd.Function`` (Dynamo's autograd_function_apply of a forward and a
    backward body) whose two bodies are pointwise throughout: then it is token-wise and its
    gradient per chunk is the chunk of its gradient. Anything else in either body (a
    reduction, a view, a matmul, an op not known here, a read of a size: Dynamo passes the
    symbolic sizes in, and a chunk's would differ) and it is not."""
    owner = node.graph.owning_module
    bodies = [getattr(owner, a.target, None) for a in node.args[:2] if isinstance(a, Node) and a.op == "get_attr"]
    if len(bodies) != 2 or owner is None or not all(isinstance(b, torch.fx.GraphModule) for b in bodies):
        return False
    for body in bodies:
        for m in body.graph.nodes:
            if m.op == "placeholder" and not isinstance(m.meta.get("example_value"), torch.Tensor) \
                    and any(u.op != "output" for u in m.users):  # only passed through (saved)
                return False
            if m.op in ("placeholder", "output") or (m.op == "call_function" and m.target is _SET_GRAD):
                continue
            info = classify(m)
            if info is None or info.kind != "pointwise":
                return False
    return True


def module_attr(node) -> bool:
    """A get_attr node of a submodule (an autograd.Function's body): copied into a chunk
    body as it is, not passed to it as a value."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    return isinstance(getattr(node.graph.owning_module, node.target, None), torch.nn.Module)


def arg_of(node: Node, pos: int, name: str, default=None):
    """An argument of a torch call or tensor method (methods count self as args[0])."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _is_last(dim, src: torch.Tensor | None) -> bool:
    return src is not None and isinstance(dim, int) and dim in (-1, src.dim() - 1)


def _feature_index(index, ndim: int):
    """For ``x[index]``: the slice applied to the feature dim when every token dim is taken
    whole (``x[..., a:b]``, ``x[:, :, a:b]``), else None."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(p is None or isinstance(p, (Node, torch.Tensor, list)) for p in parts):
        return None
    if Ellipsis in parts:
        i = parts.index(Ellipsis)
        parts = parts[:i] + (slice(None),) * (ndim - len(parts) + 1) + parts[i + 1:]
    parts = parts + (slice(None),) * (ndim - len(parts))
    if len(parts) != ndim or not isinstance(parts[-1], slice):
        return None
    if any(p != slice(None) for p in parts[:-1]):
        return None
    return parts[-1]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def hint(size) -> int:
    """An int for a size that may be symbolic (dynamic shapes): its value in the example
    Dynamo traced with. Used for choices (chunk counts, estimates), never for shapes."""
    if isinstance(size, int):
        return size
    env = size.node.shape_env
    read = getattr(env, "optimization_hint", None) or env.size_hint  # the former since torch 2.12
    return int(read(size.node.expr))


def same_size(a, b) -> bool:
    """Whether two sizes are equal for every value of their symbols, decided without adding
    a guard (a backend runs after Dynamo has fixed its guards)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return known(a == b)


def known(condition) -> bool:
    """Whether a condition on sizes (a bool, or a SymBool of symbolic sizes) holds for every
    value of its symbols; never adds a guard."""
    if isinstance(condition, bool):
        return condition
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)


def size_node(gm, size, before: Node):
    """``size`` as a graph argument usable just before ``before``: an int as it is; a symbolic
    size as a node of ``gm`` that holds it at run time (a SymInt input Dynamo passes, or a
    ``size()`` of an earlier tensor with that dim, inserted before ``before``). A SymInt
    object itself must never sit in a node's arguments: it would be a constant of the
    traced length. Raises ValueError when no earlier node has it."""
    if isinstance(size, int):
        return size
    for n in gm.graph.nodes:
        if n is before:
            break
        v = n.meta.get("example_value")
        if isinstance(v, torch.SymInt) and same_size(v, size):
            return n
        if isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                if not isinstance(s, int) and same_size(s, size):
                    with gm.graph.inserting_before(before):
                        got = gm.graph.call_method("size", (n, d))
                    got.meta["example_value"] = s
                    return got
    raise ValueError(f"no value of the graph holds the size {size}")
