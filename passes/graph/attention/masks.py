"""Attention masks built inside the graph, read back as functions of (batch, head, q, kv).

Hugging Face models (and hand-written ones) build the boolean mask they give to
scaled_dot_product_attention from index ranges: an arange along q and one along kv,
broadcast against each other, compared, and combined with per-token tensors looked up by
those indices (position ids, document ids of packed sequences, padding masks). Such a mask
is an elementwise function of the four indices, which is what flex_attention calls a
``mask_mod``.

    extract(mask node, sizes) -> MaskMod: the function copied out of the graph as
        module(b, h, q, kv, *buffers) -> bool, with the per-token tensors it reads as
        buffers (graph values passed in); Skip(reason) when the mask is not of
        that form (it reads an S x S tensor, an op that mixes positions, ...).

What the function is (causal, always true, or a mask to keep) is decided in prover.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from mst_fx.fx import op_name
from mst_fx.passes.graph.tokenwise import hint, same_size, value
from mst_fx.report import Reason, Skip

AXES = ("b", "h", "q", "kv")

# Elementwise ops that may appear between the index ranges and the mask, by canonical name.
# Copied as they are into the mask_mod, where every tensor is a 0-d value of one
# (b, h, q, kv) element. Dynamo writes the same op several ways (operator.eq, torch.eq,
# Tensor.eq, Tensor.__eq__, the method "eq"), depending on the torch version.
_NAMES = {
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne",
    "and_": "and", "logical_and": "and", "bitwise_and": "and", "and": "and",
    "or_": "or", "logical_or": "or", "bitwise_or": "or", "or": "or",
    "xor": "xor", "logical_xor": "xor", "bitwise_xor": "xor",
    "invert": "not", "not_": "not", "logical_not": "not", "bitwise_not": "not",
    "add": "add", "sub": "sub", "mul": "mul", "neg": "neg", "abs": "abs",
    "floordiv": "floordiv", "floor_divide": "floordiv", "mod": "mod", "remainder": "mod",
    "where": "where", "minimum": "minimum", "maximum": "maximum",
    "to": "cast", "bool": "cast", "long": "cast", "int": "cast", "float": "cast",
    "contiguous": "same", "clone": "same",
}
# Reflected dunders (a.__rsub__(b) is b - a) only where the order does not matter.
_REFLECTED = {"radd": "add", "rmul": "mul", "rand": "and", "ror": "or", "rxor": "xor"}


def _function_names() -> dict:
    out = {}
    for name, canon in list(_NAMES.items()) + list(_REFLECTED.items()):
        for owner in (operator, torch, torch.Tensor):
            for attr in (name, f"__{name.rstrip('_')}__"):
                f = getattr(owner, attr, None)
                if callable(f) and not (owner is operator and name in _REFLECTED):
                    out.setdefault(f, canon)
    return out


_FUNCTIONS = _function_names()


def elementwise_op(n: Node) -> str | None:
    """The canonical name of an elementwise op node ("le", "and", "cast", ...), else None."""
    if n.op == "call_function":
        try:
            return _FUNCTIONS.get(n.target)
        except TypeError:  # an unhashable target
            return None
    if n.op == "call_method":
        name = n.target[2:-2] if n.target.startswith("__") and n.target.endswith("__") else n.target
        return _NAMES.get(name) or _NAMES.get(name + "_") or _REFLECTED.get(name)
    return None


# Ops that only add, drop or broadcast size-1 dims: the identity on one element.
PLACEMENT_METHODS = {"unsqueeze", "view", "reshape", "expand", "expand_as"}
PLACEMENT_FUNCTIONS = {torch.unsqueeze, torch.reshape}


@dataclass
class MaskMod:
    """A mask read back from the graph.

    ``module(b, h, q, kv, *buffers)`` returns the mask's element (a 0-d bool tensor);
    ``buffers`` are the graph values it reads, in argument order; ``uses`` which of
    b, h, q, kv it depends on.
    """

    module: GraphModule
    buffers: list[Node]
    uses: frozenset[str]


def mask_sizes(q: Node, k: Node) -> dict[str, int]:
    """The sizes of the four axes (b, h, q, kv) of attention between ``q`` and ``k``; any of
    them may be symbolic (dynamic shapes): every fact read from a mask then holds for all
    values of the symbols (see _is_one, prove), and no guard is added."""
    qv, kv = value(q), value(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        raise Skip(Reason.SHAPE, "query/key are not 4-D [batch, heads, tokens, dim]")
    return {"b": qv.shape[0], "h": qv.shape[1], "q": qv.shape[2], "kv": kv.shape[2]}


def _is_one(size) -> bool:
    """A size-1 (broadcast) dim. Dynamo specializes sizes 0 and 1, so a symbolic size is
    never 1."""
    return same_size(size, 1)


def extract(mask: Node, sizes: dict[str, int]) -> MaskMod:
    """The mask_mod that computes ``mask`` element by element; raises Skip."""
    mv = value(mask)
    if mv is None or mv.dtype != torch.bool:
        raise Skip(Reason.MASK, "not a boolean mask (an additive float mask is left as it is)")
    if mv.dim() > 4:
        raise Skip(Reason.SHAPE, f"mask of rank {mv.dim()}")
    return _Extractor(sizes).run(mask, _aligned(mv.shape, AXES[4 - mv.dim():], sizes))


class _Extractor:
    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.g = Graph()
        self.index = {a: self.g.placeholder(a) for a in AXES}
        self.buffers: list[Node] = []
        self.buffer_ph: dict[Node, Node] = {}
        self.memo: dict[tuple[Node, tuple], object] = {}
        self.derived: dict[Node, bool] = {}
        self.used: set[str] = set()

    def run(self, mask: Node, bind: tuple) -> MaskMod:
        out = self.emit(mask, bind)
        if not isinstance(out, Node):
            raise Skip(Reason.MASK, "the mask is a constant")
        self.g.output(out)
        module = GraphModule(torch.nn.Module(), self.g)
        return MaskMod(module, self.buffers, frozenset(self.used))

    # Which nodes depend on an index range; the others are buffers computed outside.
    # Iterative: a mask may read values computed deep in the model.
    def index_derived(self, n) -> bool:
        if not isinstance(n, Node):
            return False
        stack = [n]
        while stack:
            x = stack[-1]
            if x in self.derived:
                stack.pop()
                continue
            todo = [a for a in node_args(x) if a not in self.derived]
            if todo and not is_arange(x):
                stack.extend(todo)
                continue
            stack.pop()
            self.derived[x] = is_arange(x) or any(self.derived[a] for a in node_args(x))
        return self.derived[n]

    def emit(self, n, bind: tuple):
        """The mask_mod value of graph value ``n``, whose dims are bound to the axes in
        ``bind`` (None: a size-1 dim)."""
        if not isinstance(n, Node):
            if isinstance(n, (list, tuple)):
                raise Skip(Reason.MASK, "a list of tensors inside the mask")
            return n
        key = (n, bind)
        if key not in self.memo:
            self.memo[key] = self._emit(n, bind)
        return self.memo[key]

    def _emit(self, n: Node, bind: tuple):
        v = value(n)
        if not isinstance(v, torch.Tensor):
            raise Skip(Reason.MASK, f"{op_name(n)} is not a tensor")
        if not self.index_derived(n):
            return self.lookup(n, bind)
        if is_arange(n):
            return self.arange(n, bind)
        if n.op == "call_method" and n.target in ("new_ones", "new_zeros") and v.dim() == 0:
            one = n.target == "new_ones"  # a constant; its tensor argument gives only dtype/device
            return one if v.dtype == torch.bool else (int(one) if not v.is_floating_point() else float(one))
        if _is_advanced_index(n):
            return self.advanced_index(n, bind)
        dims = placement(n)
        if dims is not None:
            src = n.args[0]
            sv = value(src)
            inner = tuple(None if _is_one(sv.shape[i]) or d is None else bind[d] for i, d in enumerate(dims))
            return self.emit(src, inner)
        if elementwise_op(n) is not None:
            args = [self.emit_operand(a, bind) for a in n.args]
            kwargs = {k: self.emit_operand(a, bind) for k, a in n.kwargs.items()}
            return self.g.create_node(n.op, n.target, tuple(args), kwargs)
        try:  # computed from the index ranges by other ops (a cumsum, ...): read its values
            return self.lookup(n, bind)
        except Skip:
            raise Skip(Reason.NOT_TOKENWISE, f"{op_name(n)} is not elementwise over the mask's positions") from None

    def emit_operand(self, a, bind: tuple):
        if isinstance(a, Node) and isinstance(value(a), torch.Tensor):
            return self.emit(a, _broadcast_bind(value(a).shape, bind))
        if isinstance(a, Node) and isinstance(a.meta.get("example_value"), torch.SymInt):
            raise Skip(Reason.SYMBOLIC, f"compares with the symbolic size {op_name(a)} (dynamic shapes)")
        if isinstance(a, Node):
            raise Skip(Reason.MASK, f"{op_name(a)} is not a tensor")
        if isinstance(a, (list, tuple)) and any(isinstance(x, Node) for x in a):
            raise Skip(Reason.MASK, "a list of tensors inside the mask")
        return a

    def arange(self, n: Node, bind: tuple):
        start, step = arange_start_step(n)
        (axis,) = bind
        if axis is None:  # a length-1 range broadcast: its only value
            return start
        self.used.add(axis)
        x = self.index[axis]
        if step != 1:
            x = self.g.call_function(operator.mul, (x, step))
        if start != 0:
            x = self.g.call_function(operator.add, (x, start))
        return x

    def advanced_index(self, n: Node, bind: tuple):
        table, idx = n.args
        idx = idx if isinstance(idx, tuple) else (idx,)
        tv = value(table)
        if len(idx) != tv.dim():
            raise Skip(Reason.SHAPE, f"{op_name(n)} indexes {len(idx)} of {tv.dim()} dims")
        self.check_small(table)
        emitted = tuple(self.emit(i, _broadcast_bind(value(i).shape, bind)) for i in idx)
        return self.g.call_function(operator.getitem, (self.buffer(table), emitted))

    def lookup(self, n: Node, bind: tuple):
        """A per-token tensor broadcast into the mask: read at the element's indices."""
        self.check_small(n)
        shape = tuple(value(n).shape)
        idx, kept, ones = [], [], []
        for d, (size, axis) in enumerate(zip(shape, bind)):
            if _is_one(size):
                ones.append(d)
                continue
            if axis is None or not same_size(size, self.sizes[axis]):
                raise Skip(Reason.SHAPE, f"{op_name(n)} has shape {list(shape)}, not broadcastable "
                                         "to the mask's positions")
            self.used.add(axis)
            idx.append(self.index[axis])
            kept.append(size)
        buf = self.buffer(n)
        if ones:  # by position, not by sizes: a symbolic size must not enter the mask_mod
            buf = self.g.call_method("squeeze", (buf, tuple(ones)))
        return self.g.call_function(operator.getitem, (buf, tuple(idx))) if idx else buf

    def check_small(self, n: Node) -> None:
        s = {k: hint(v) for k, v in self.sizes.items()}  # a size test, not a proof
        if hint(value(n).numel()) > s["b"] * s["h"] * (s["q"] + s["kv"]):
            raise Skip(Reason.SHAPE, f"reads {op_name(n)} of shape {list(value(n).shape)}: "
                                     "a materialized mask, not per-token values")

    def buffer(self, n: Node) -> Node:
        if n not in self.buffer_ph:
            with self.g.inserting_after(self.index["kv"] if not self.buffers
                                        else self.buffer_ph[self.buffers[-1]]):
                self.buffer_ph[n] = self.g.placeholder(f"buf_{len(self.buffers)}")
            self.buffers.append(n)
        return self.buffer_ph[n]


def _aligned(shape, axes, sizes) -> tuple:
    bind = []
    for size, axis in zip(shape, axes):
        if _is_one(size):
            bind.append(None)
        elif same_size(size, sizes[axis]):
            bind.append(axis)
        else:
            raise Skip(Reason.SHAPE, f"mask of shape {list(shape)} does not fit the attention "
                                     f"({sizes})")
    return tuple(bind)


def _broadcast_bind(shape, bind: tuple) -> tuple:
    """Bind an operand's dims by right-aligned broadcasting against its result's."""
    if len(shape) > len(bind):
        raise Skip(Reason.SHAPE, "operand of higher rank than its result")
    tail = bind[len(bind) - len(shape):]
    return tuple(None if _is_one(size) else axis for size, axis in zip(shape, tail))


def node_args(n: Node) -> list[Node]:
    out = []
    torch.fx.node.map_arg((n.args, n.kwargs), out.append)
    return out


def is_arange(n: Node) -> bool:
    return n.op == "call_function" and n.target is torch.arange


def arange_start_step(n: Node) -> tuple[int, int]:
    """An arange's start and step, ints. Its end may be symbolic (``arange(S)`` at a
    symbolic length): the range's length is bound to an axis by its shape, like any
    other dim, and element i is start + i * step whatever the end."""
    args = n.args
    start = args[0] if len(args) >= 2 else n.kwargs.get("start", 0)
    step = args[2] if len(args) >= 3 else n.kwargs.get("step", 1)
    end = args[1] if len(args) >= 2 else (args[0] if args else n.kwargs.get("end"))
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in (start, step)) or \
            not (isinstance(end, int) or _symbolic_size(end)):
        raise Skip(Reason.MASK, "arange with non-integer bounds")
    return start, step


def _symbolic_size(x) -> bool:
    """A graph value that is a symbolic int (a size Dynamo passes as a SymInt)."""
    return isinstance(x, Node) and isinstance(x.meta.get("example_value"), torch.SymInt)


def _is_advanced_index(n: Node) -> bool:
    if not (n.op == "call_function" and n.target is operator.getitem):
        return False
    idx = n.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, Node) for i in idx)


def placement(n: Node) -> list[int | None] | None:
    """For an op that only inserts, drops or broadcasts size-1 dims: where each input dim
    goes in the output (None: a size-1 dim that is dropped). None for any other op."""
    if not n.args or not isinstance(n.args[0], Node):
        return None
    src, out = value(n.args[0]), value(n)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if n.op == "call_function" and n.target is operator.getitem:
        return _getitem_dims(n.args[1], src.dim(), out.dim())
    is_place = (n.op == "call_method" and n.target in PLACEMENT_METHODS) or \
        (n.op == "call_function" and n.target in PLACEMENT_FUNCTIONS)
    if not is_place:
        return None
    if n.target in ("expand", "expand_as"):  # right-aligned broadcast
        off = out.dim() - src.dim()
        return [off + i for i in range(src.dim())]
    # unsqueeze / view / reshape: the non-1 dims must come out in the same order and sizes.
    big_in = [i for i, s in enumerate(src.shape) if not _is_one(s)]
    big_out = [i for i, s in enumerate(out.shape) if not _is_one(s)]
    if len(big_in) != len(big_out) or \
            not all(same_size(src.shape[i], out.shape[j]) for i, j in zip(big_in, big_out)):
        return None
    where = dict(zip(big_in, big_out))
    return [where.get(i) for i in range(src.dim())]


def _getitem_dims(idx, src_rank: int, out_rank: int) -> list[int | None] | None:
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None, None, None)
    if not all(i is None or i is Ellipsis or i == full for i in idx):
        return None
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    consumed = sum(i == full for i in idx if i is not None and i is not Ellipsis)
    dims, pos, src = [], 0, 0
    for i in idx:
        if i is None:
            pos += 1
        elif i is Ellipsis:
            for _ in range(src_rank - consumed):
                dims.append(pos)
                pos += 1
                src += 1
        else:
            dims.append(pos)
            pos += 1
            src += 1
    while src < src_rank:  # dims after the index list are kept as they are
        dims.append(pos)
        pos += 1
        src += 1
    return dims if pos == out_rank else None
