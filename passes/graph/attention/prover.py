"""Is a mask_mod (read by masks.extract) exactly the causal mask (kv <= q), or always true?

    prove(mask_mod, sizes) -> Verdict: decided without evaluating the S x S mask: buffers
        that depend on no graph input are evaluated (they are O(S)), index arithmetic is
        tracked as integer affine expressions in q and kv, and a conjunction of conditions
        on q - kv as an interval. Symbolic sizes (dynamic shapes): every bound must hold
        for every value of the symbols; a buffer of a symbolic length is never evaluated
        (that would fix the length) but read by sequence_value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from mst_fx.fx import op_name
from mst_fx.passes.graph.attention.masks import (
    MaskMod,
    arange_start_step,
    elementwise_op,
    is_arange,
    node_args,
    placement,
)
from mst_fx.passes.graph.tokenwise import known, same_size, value

INF = float("inf")


@dataclass(frozen=True)
class Verdict:
    kind: str  # "causal", "full" (always true) or "mask" (needs the mask)
    reason: str


@dataclass(frozen=True)
class _Aff:  # a*q + c*kv + k, integers
    a: int
    c: int
    k: int


@dataclass(frozen=True)
class _Band:  # true iff lo <= q - kv <= hi
    lo: float
    hi: float


@dataclass(frozen=True)
class _Idx:  # the batch or head index (only used to look up per-token tensors)
    axis: str


@dataclass(frozen=True)
class _Mono:  # table[row, axis] of a table strictly increasing along the tokens
    table: int
    axis: str
    row: tuple  # the other indices (batch index, constants): equal rows compare in order


@dataclass(frozen=True)
class _Same:  # an unknown value read from a tensor at an index, plus k
    name: str
    idx: tuple
    k: int = 0


@dataclass(frozen=True)
class _Buf:
    tensor: torch.Tensor | None  # None: depends on a graph input, or has a symbolic length
    name: str
    seq: "_Seq | None" = None  # its values as a function of the token index (symbolic length)


class _Opaque(Exception):
    pass


def prove(mm: MaskMod, sizes: dict[str, int]) -> Verdict:
    """Whether ``mm`` is the causal mask (Q == KV), always true, or neither (with why)."""
    try:
        out = _Prover(mm, sizes).run()
    except _Opaque as e:
        return Verdict("mask", str(e))
    if isinstance(out, bool):
        return Verdict("full", "always true") if out else Verdict("mask", "never true")
    if not isinstance(out, _Band):
        return Verdict("mask", "not a condition on q - kv")
    # q - kv ranges over [-(KV - 1), Q - 1]; a bound past an end restricts nothing. With
    # symbolic lengths a finite bound is a restriction at some length, so it stays.
    lo_free = _at_most(out.lo, 1 - sizes["kv"])
    hi_free = _at_most(sizes["q"] - 1, out.hi)
    if lo_free and hi_free:
        return Verdict("full", "always true")
    if same_size(sizes["q"], sizes["kv"]) and hi_free and out.lo == 0:
        return Verdict("causal", "kv <= q")
    what = []
    if not lo_free:
        what.append(f"q - kv >= {int(out.lo)}")
    if not hi_free:
        what.append(f"q - kv <= {int(out.hi)} (sliding window)")
    return Verdict("mask", " and ".join(what))


def _at_most(a, b) -> bool:
    """a <= b for every value of the symbols in them (ints, SymInts or +-inf)."""
    if a == -INF or b == INF:
        return True
    if a == INF or b == -INF:
        return False
    return known(a <= b)


def diagonal_allowed(mm: MaskMod, sizes: dict[str, int]) -> bool:
    """Whether every query may attend to its own position (mask(b, h, i, i) is true for
    all i), so that no row of the mask is empty: read with kv = q, where a per-token
    tensor compared with itself at the same index is equal whatever its values."""
    if not same_size(sizes["q"], sizes["kv"]):
        return False
    try:
        out = _Prover(mm, sizes, diagonal=True).run()
    except _Opaque:
        return False
    return isinstance(out, bool) and out


class _Prover:
    def __init__(self, mm: MaskMod, sizes: dict[str, int], diagonal: bool = False):
        self.mm, self.sizes, self.diagonal = mm, sizes, diagonal
        self.tables: list[torch.Tensor] = []

    def run(self):
        env: dict[Node, object] = {}
        bufs = iter(self.mm.buffers)
        for n in self.mm.module.graph.nodes:
            if n.op == "placeholder":
                env[n] = self.placeholder(n.target, bufs)
            elif n.op == "output":
                return env[n.args[0]]
            else:
                args = torch.fx.node.map_arg(n.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
                env[n] = self.step(n, args, kwargs)
        raise _Opaque("empty mask function")

    def placeholder(self, name: str, bufs):
        if name in ("q", "kv"):
            return _Aff(1, 0, 0) if name == "q" or self.diagonal else _Aff(0, 1, 0)
        if name in ("b", "h"):
            return _Idx(name)
        node = next(bufs)
        return _Buf(constant_value(node), node.name, sequence_value(node))

    def step(self, n: Node, args, kwargs):
        t = n.target
        if n.op == "call_method" and t in ("reshape", "squeeze"):
            buf = args[0]
            if isinstance(buf, _Buf):
                return _Buf(None if buf.tensor is None else getattr(buf.tensor, t)(args[1]), buf.name,
                            buf.seq)
            raise _Opaque(f"{t} of a computed value")
        if t is operator.getitem:
            return self.lookup(args[0], args[1])
        op = elementwise_op(n)
        if op in ("cast", "same"):
            if any(isinstance(a, torch.dtype) for a in (*args[1:], *kwargs.values())) or \
                    n.target in ("bool", "long", "int", "float"):
                raise _Opaque(f"uses {op_name(n)}")  # a dtype change: not followed
            return args[0]
        if op == "and":
            return _and(*args[:2])
        if op == "or":
            return _or(*args[:2])
        if op == "add":
            return _lin(args[0], args[1], 1)
        if op == "sub":
            return _lin(args[0], args[1], -1)
        if op == "neg":
            return _lin(0, args[0], -1)
        if op in ("le", "lt", "ge", "gt", "eq"):
            return _compare(op, *args[:2], self.sizes)
        raise _Opaque(f"uses {op_name(n)}")

    def lookup(self, buf, idx):
        if not isinstance(buf, _Buf):
            raise _Opaque("indexes a computed value")
        idx = idx if isinstance(idx, tuple) else (idx,)
        if buf.tensor is None and self.diagonal:  # unknown values, but the same at the same index
            return _Same(buf.name, idx)
        if buf.tensor is None and buf.seq is not None:
            return self.sequence_lookup(buf, idx)
        if buf.tensor is None:
            raise _Opaque(f"{buf.name} depends on the graph's inputs")
        table = buf.tensor
        token = [i for i, x in enumerate(idx) if isinstance(x, _Aff)]
        if len(token) != 1 or any(not isinstance(x, (_Aff, _Idx, int)) or isinstance(x, bool)
                                  for x in idx):
            raise _Opaque(f"reads {buf.name} at an index it cannot follow")
        (d,) = token
        pos = idx[d]
        axis = {(1, 0, 0): "q", (0, 1, 0): "kv"}.get((pos.a, pos.c, pos.k))
        if axis is None:
            raise _Opaque(f"reads {buf.name} at a shifted index")
        rows = table.movedim(d, -1).reshape(-1, table.shape[d]).to("cpu")
        if bool((rows == rows.flatten()[0]).all()):
            return rows.flatten()[0].item()
        n = rows.shape[-1]
        ramp = torch.arange(n, dtype=rows.dtype)
        shift = rows[:, :1] - ramp[:1]
        if not rows.is_floating_point() and bool((rows - ramp == shift).all()) \
                and bool((shift == shift[0, 0]).all()):
            k = int(shift[0, 0])
            return _Aff(1, 0, k) if axis == "q" else _Aff(0, 1, k)
        if n > 1 and bool((rows[:, 1:] > rows[:, :-1]).all()):
            # Strictly increasing along the tokens: order comparisons within a row follow
            # the indices.
            row = tuple(x for i, x in enumerate(idx) if i != d)
            for i, t in enumerate(self.tables):
                if t is table:
                    return _Mono(i, axis, row)
            self.tables.append(table)
            return _Mono(len(self.tables) - 1, axis, row)
        raise _Opaque(f"reads {buf.name}, whose values it cannot reduce")


    def sequence_lookup(self, buf, idx):
        """A read of a buffer known as a function of the token index (see sequence_value):
        the same token index, the others plain indices."""
        token = [x for x in idx if isinstance(x, _Aff)]
        if len(token) != 1 or any(not isinstance(x, (_Aff, _Idx, int)) or isinstance(x, bool) for x in idx):
            raise _Opaque(f"reads {buf.name} at an index it cannot follow")
        axis = {(1, 0, 0): "q", (0, 1, 0): "kv"}.get((token[0].a, token[0].c, token[0].k))
        seq = buf.seq
        if axis is None or seq.first != seq.k:  # a shifted index, or a first value apart
            raise _Opaque(f"reads {buf.name}, whose values it cannot reduce")
        if seq.a == 0:
            return seq.k
        if seq.a == 1 and not isinstance(seq.k, bool):
            return _Aff(1, 0, seq.k) if axis == "q" else _Aff(0, 1, seq.k)
        raise _Opaque(f"reads {buf.name}, whose values it cannot reduce")


def _as_aff(x):
    if isinstance(x, _Aff):
        return x
    if isinstance(x, bool):
        raise _Opaque("arithmetic on a condition")
    if isinstance(x, int):
        return _Aff(0, 0, x)
    raise _Opaque("arithmetic on a value it cannot follow")


def _lin(x, y, sign: int):
    if isinstance(x, _Same) and isinstance(y, int) and not isinstance(y, bool):
        return _Same(x.name, x.idx, x.k + sign * y)
    if isinstance(y, _Same) and isinstance(x, int) and not isinstance(x, bool) and sign == 1:
        return _Same(y.name, y.idx, y.k + x)
    a, b = _as_aff(x), _as_aff(y)
    return _Aff(a.a + sign * b.a, a.c + sign * b.c, a.k + sign * b.k)


def _compare(op: str, x, y, sizes: dict[str, int]):
    if isinstance(x, _Same) or isinstance(y, _Same):
        if isinstance(x, _Same) and isinstance(y, _Same) and (x.name, x.idx) == (y.name, y.idx):
            return _holds(op, x.k - y.k)
        raise _Opaque("compares values it cannot follow")
    if isinstance(x, _Mono) or isinstance(y, _Mono):
        if not (isinstance(x, _Mono) and isinstance(y, _Mono) and x.table == y.table
                and x.row == y.row):
            raise _Opaque("compares values it cannot follow")
        x = _Aff(1, 0, 0) if x.axis == "q" else _Aff(0, 1, 0)
        y = _Aff(1, 0, 0) if y.axis == "q" else _Aff(0, 1, 0)
    d = _lin(x, y, -1)  # x OP y  <=>  d OP 0,  d = a*q + c*kv + k
    if d.a == 0 and d.c == 0:
        return _holds(op, d.k)
    if d.a == 0 or d.c == 0:  # on one index alone: linear, so its ends decide
        n = sizes["q"] if d.c == 0 else sizes["kv"]
        ends = [_known_holds(op, d.k + (d.a or d.c) * i) for i in (0, n - 1)]
        if op != "eq" and ends[0] is not None and ends[0] == ends[1]:
            return ends[0]
        raise _Opaque("a condition on q or kv alone (a prefix or a range)")
    if (d.a, d.c) not in ((1, -1), (-1, 1)):
        raise _Opaque("a condition that is not on q - kv")
    if d.a == -1:  # -(q - kv) + k OP 0  <=>  (q - kv) OP' k
        op = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq"}[op]
        bound = d.k
    else:  # (q - kv) + k OP 0  <=>  (q - kv) OP -k
        bound = -d.k
    return {"le": _Band(-INF, bound), "lt": _Band(-INF, bound - 1), "ge": _Band(bound, INF),
            "gt": _Band(bound + 1, INF), "eq": _Band(bound, bound)}[op]


def _holds(op: str, d: int) -> bool:
    return {"le": d <= 0, "lt": d < 0, "ge": d >= 0, "gt": d > 0, "eq": d == 0}[op]


def _known_holds(op: str, d) -> bool | None:
    """``d OP 0`` for every value of d's symbols: True, False, or None when that depends on
    them (no guard added)."""
    if isinstance(d, int):
        return _holds(op, d)
    if known({"le": d <= 0, "lt": d < 0, "ge": d >= 0, "gt": d > 0, "eq": d == 0}[op]):
        return True
    if known({"le": d > 0, "lt": d >= 0, "ge": d < 0, "gt": d <= 0, "eq": d != 0}[op]):
        return False
    return None


def _cond(x):
    if isinstance(x, (bool, _Band)):
        return x
    raise _Opaque("combines values that are not conditions")


def _and(x, y):
    x, y = _cond(x), _cond(y)
    if isinstance(x, bool):
        return y if x else False
    if isinstance(y, bool):
        return x if y else False
    return _Band(max(x.lo, y.lo), min(x.hi, y.hi))


def _or(x, y):
    x, y = _cond(x), _cond(y)
    if isinstance(x, bool):
        return True if x else y
    if isinstance(y, bool):
        return True if y else x
    raise _Opaque("an 'or' of two conditions")


@dataclass(frozen=True)
class _Seq:
    """A tensor along the tokens whose element i is ``a * i + k`` for i >= 1 and ``first``
    at i = 0, at every length (booleans: a = 0); its other dims are broadcast copies."""

    a: int
    k: int | bool
    first: int | bool


def sequence_value(n: Node) -> _Seq | None:
    """What ``constant_value`` gives at a static length, for a buffer whose length is
    symbolic: its elements as a function of the token index, read from how the graph
    computes it from ``arange(S)`` (the index arithmetic transformers does for positions
    and packed-sequence ids: +/- constants, diff with a prepended first value, comparisons
    with constants, cumsum, placement of size-1 dims). Holds for every S; None for
    anything else."""
    try:
        return _seq(n, {})
    except _Opaque:
        return None


def _seq(n, memo: dict) -> _Seq:
    if isinstance(n, (int, bool)):
        return _Seq(0, n, n)
    if not isinstance(n, Node):
        raise _Opaque("not a sequence")
    if n in memo:
        return memo[n]
    v = value(n)
    if not isinstance(v, torch.Tensor) or v.is_floating_point():
        raise _Opaque("not an integer sequence")
    token = [d for d in v.shape if not isinstance(d, int)]
    if len(token) > 1 or any(isinstance(d, int) and d != 1 for d in v.shape) and not token:
        raise _Opaque("not one token axis")
    op = elementwise_op(n)
    if is_arange(n):
        start, step = arange_start_step(n)
        out = _Seq(step, start, start)
    elif n.op == "call_method" and n.target in ("unsqueeze", "expand", "view", "reshape") or \
            n.op == "call_function" and n.target is torch.unsqueeze:
        if placement(n) is None:
            raise _Opaque("regroups the tokens")
        out = _seq(n.args[0], memo)
    elif n.op == "call_function" and n.target is operator.getitem and _first_only(n):
        x = _seq(n.args[0], memo)
        out = _Seq(0, x.first, x.first)
    elif n.op == "call_function" and n.target is torch.diff and len(n.args) == 1 and \
            n.kwargs.get("dim", -1) in (-1, value(n).dim() - 1) and n.kwargs.get("n", 1) == 1:
        x, p = _seq(n.args[0], memo), _seq(n.kwargs.get("prepend"), memo)
        if p.a != 0 or x.first != x.k or value(n.kwargs["prepend"]).shape[-1] != 1:
            raise _Opaque("diff of a sequence it cannot follow")
        out = _Seq(0, x.a, x.first - p.k)
    elif n.op == "call_method" and n.target == "cumsum" and n.args[1:] in ((-1,), (v.dim() - 1,)):
        x = _seq(n.args[0], memo)
        if x.a != 0:
            raise _Opaque("cumsum of a growing sequence")
        out = _Seq(int(x.k), int(x.first), int(x.first))  # first + k * i
    elif op in ("add", "sub", "mul") and len(n.args) == 2:
        x, y = (_seq(a, memo) for a in n.args)
        f = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op]
        if op == "mul" and x.a and y.a:
            raise _Opaque("a product of two growing sequences")
        if op == "mul":
            c, z = (x, y) if not x.a else (y, x)
            if c.first != c.k:
                raise _Opaque("a product with a sequence it cannot follow")
            out = _Seq(z.a * c.k, z.k * c.k, z.first * c.k)
        else:
            out = _Seq(f(x.a, y.a), f(x.k, y.k), f(x.first, y.first))
    elif op in ("eq", "ne", "lt", "le", "gt", "ge") and len(n.args) == 2:
        x, y = (_seq(a, memo) for a in n.args)
        if x.a or y.a:
            raise _Opaque("a comparison of growing sequences")
        f = getattr(operator, op)
        out = _Seq(0, bool(f(x.k, y.k)), bool(f(x.first, y.first)))
    else:
        raise _Opaque(f"{op_name(n)} is not index arithmetic")
    memo[n] = out
    return out


def _first_only(n: Node) -> bool:
    """x[..., :1] (or x[:, :1] on [B, S]): the first token only."""
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    last = idx[-1] if idx else None
    return isinstance(last, slice) and last.start in (None, 0) and last.stop == 1 and last.step in (None, 1) \
        and all(i is Ellipsis or i == slice(None) for i in idx[:-1])


# Ops a constant buffer may be computed with (all cheap, deterministic, O(tokens)).
_MAX_CONSTANT_NUMEL = 1 << 24


def constant_value(n: Node) -> torch.Tensor | None:
    """The value of ``n`` if it depends on no graph input (placeholder, parameter), by
    running the ops that compute it; None otherwise."""
    order, seen, stack = [], set(), [n]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op not in ("call_function", "call_method") or _random_or_inplace(x):
            return None
        v = value(x)
        if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
            return None  # its size is symbolic: running it here would fix the length
        if isinstance(v, torch.Tensor) and v.numel() > _MAX_CONSTANT_NUMEL:
            return None
        order.append(x)
        stack.extend(node_args(x))
    env: dict[Node, object] = {}
    try:
        for x in sorted(order, key=_position(n.graph)):
            args = torch.fx.node.map_arg(x.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(x.kwargs, env.__getitem__)
            if x.op == "call_function":
                env[x] = x.target(*args, **kwargs)
            else:
                env[x] = getattr(args[0], x.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - an op we cannot run here: treat as unknown
        return None
    out = env[n]
    return out if isinstance(out, torch.Tensor) else None


def _random_or_inplace(n: Node) -> bool:
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") or any(
        w in name for w in ("rand", "normal", "bernoulli", "dropout", "multinomial", "uniform"))


def _position(graph: Graph):
    order = {x: i for i, x in enumerate(graph.nodes)}
    return order.__getitem__
