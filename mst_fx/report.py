"""What the passes found: rewritten regions, skipped candidates, and the printed table.

Detection produces these records; rewriting only consumes them. ``explain()`` returns a
Report, and the backend keeps the Report of every graph it compiled. A pass that cannot take
a candidate raises ``Skip`` (a reason code and the readable text) inside detection; the pass
boundary records it with ``Report.skip``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Region:
    """One block a pass can rewrite (or did rewrite).

    ``kind`` is the pass name ("mlp", "lm_head", "attention"); ``where`` the module
    path when the graph knows it; ``tokens`` the flattened leading dims; ``chunks`` the
    number of mini-sequences; ``bytes_saved`` an estimate of the activation bytes that are
    no longer held for backward; ``detail`` a short shape summary. ``plan`` carries the
    pass's private data from detection to rewriting and is not printed. What the backend
    needs to know of a region is a field: ``aliases_inputs``, its chunk bodies are
    differentiated by autograd and may return their inputs as saved values (Inductor's
    buffer reuse must be off, see mst_fx.backend); ``flex``, it calls flex_attention (the
    backend compiles again without it if Inductor fails); ``assumes``, the graph inputs
    (placeholder names) whose mask it took as read in an earlier graph (the backend checks
    them at run time, see attention/crossing.py).
    """

    kind: str
    where: str
    tokens: int
    chunks: int
    bytes_saved: int
    detail: str = ""
    applied: bool = False
    aliases_inputs: bool = False
    flex: bool = False
    assumes: tuple[str, ...] = ()
    plan: Any = field(default=None, repr=False, compare=False)


class Reason(enum.Enum):
    """Why a candidate was left unchanged, as a code (the text says it for a reader)."""

    NOT_A_REGION = "not a region"  # not this pass's business (not reported)
    NOT_TOKENWISE = "not token-wise"  # an op mixes tokens, or is not per token
    SHAPE = "shape"  # dims, ranks or layouts the pass cannot chunk or read
    ESCAPES = "escapes"  # a value of the region is used outside it, or too early
    SYMBOLIC = "symbolic sizes"  # dynamic shapes the pass cannot plan for
    NO_GAIN = "no gain"  # too few tokens, or chunking would not lower the peak
    NO_GRADIENT = "no gradient"  # an inference graph
    RANDOM = "random"  # dropout the rewrite would draw differently
    MASK = "mask"  # attention: a mask that cannot be read, proved or dropped
    UNSUPPORTED = "unsupported"  # a form of an op the pass does not handle
    FAILED = "failed"  # a pass or Inductor failed; the graph was compiled unchanged


class Skip(Exception):
    """Raised inside a pass's detection; the pass boundary turns it into a Skipped."""

    def __init__(self, code: Reason, reason: str = ""):
        super().__init__(reason)
        self.code = code


@dataclass
class Skipped:
    """A candidate a pass looked at and left unchanged, with the reason."""

    kind: str
    where: str
    reason: str
    code: Reason = Reason.UNSUPPORTED


@dataclass
class Report:
    """Regions and skips of one graph (or of several, extended). ``symbols``: the symbolic
    sizes the graph was compiled for (dynamic shapes: a graph that serves every length),
    empty for a static graph."""

    regions: list[Region] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    offload: list[Any] = field(default_factory=list)  # select.Saved, every saved tensor
    offload_notes: list[str] = field(default_factory=list)

    def note_offload(self, plans: list, none: str) -> None:
        """Record the offload plans of this graph's partitions; ``none`` says why there are
        none, if so."""
        if not plans:
            self.offload_notes.append(f"offload: {none}")
        for found, note in plans:
            self.offload.extend(found)
            if note:
                self.offload_notes.append(note)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes moved to host memory per step, at the compiled sizes."""
        return sum(s.nbytes for s in self.offload if s.offloaded)

    def skip(self, kind: str, where: str, e: Skip) -> None:
        """Record ``e`` for the candidate at ``where`` (nothing for NOT_A_REGION)."""
        if e.code is not Reason.NOT_A_REGION:
            self.skipped.append(Skipped(kind, where, str(e), e.code))

    def extend(self, other: "Report") -> None:
        self.regions.extend(other.regions)
        self.skipped.extend(other.skipped)
        self.symbols.extend(s for s in other.symbols if s not in self.symbols)
        self.offload.extend(other.offload)
        self.offload_notes.extend(other.offload_notes)

    def __str__(self) -> str:
        sym = f" (symbolic sizes {', '.join(self.symbols)})" if self.symbols else ""
        lines = [f"mst_fx: {len(self.regions)} region(s) to chunk, {len(self.skipped)} skipped{sym}"]
        if self.regions:
            rows = [("kind", "where", "tokens", "chunks", "est. saved", "shapes")]
            rows += [(r.kind, r.where, str(r.tokens), str(r.chunks) if r.chunks else "-",
                      _mib(r.bytes_saved), r.detail)
                     for r in self.regions]
            lines += _table(rows)
        if self.offload or self.offload_notes:
            moved = [s for s in self.offload if s.offloaded]
            lines.append(f"offload to host: {len(moved)} of {len(self.offload)} saved tensors, "
                         f"{_mib(self.offloaded_bytes)} a step (pinned host memory)")
            rows = [("saved", "bytes", "size", "offloaded")]
            rows += [(s.name, _mib(s.nbytes), s.size,
                      ("yes, checkpoint boundary" if s.boundary else "yes") if s.offloaded else f"no: {s.reason}")
                     for s in self.offload]
            lines += _table(rows) + ["  " + n for n in self.offload_notes]
        if self.skipped:
            lines.append("skipped:")
            rows = [("kind", "where", "reason")] + [(s.kind, s.where, s.reason) for s in self.skipped]
            lines += _table(rows)
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
