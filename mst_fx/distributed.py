"""mst_fx under DistributedDataParallel: where Dynamo's graph split meets the chunking.

Dynamo compiles a DDP-wrapped model through its DDPOptimizer (``optimize_ddp`` mode
"ddp_optimizer", the default): it cuts the graph at DDP's gradient-bucket boundaries
(25 MiB of parameters by default, less than one MLP of a 1B model) *before* the backend
sees it, and hands the backend one piece at a time. A piece holds part of an MLP, so the
MLP cannot be chunked there; the skips of such a piece say so and name the fix. With
``torch._dynamo.config.optimize_ddp = False`` the backend gets the whole graph and chunks
it as in one process; DDP's reducer then all-reduces the buckets after the compiled
backward instead of during it (Dynamo's own "no_optimization" mode). FSDP2 needs nothing
here: its hooks run outside the compiled graphs, so the chunks read the weight the layer's
all-gather produced.
"""

from __future__ import annotations

import torch

from mst_fx.report import Reason, Report

# What a skip in a DDPOptimizer piece says: the fix is a Dynamo setting, not the model.
PIECE_HINT = ("Dynamo's DDPOptimizer cut this graph at a DDP bucket boundary before mst_fx saw it; "
              "set torch._dynamo.config.optimize_ddp = False to give mst_fx the whole graph")

# The skips a cut can cause: a region's value used in the next piece, or its input from the last.
_CUT = (Reason.ESCAPES, Reason.NOT_TOKENWISE, Reason.MASK)


def ddp_piece() -> bool:
    """True while the backend compiles one piece of a graph that DDPOptimizer split (the
    tracing context carries DDPOptimizer's per-bucket state then)."""
    ctx = torch._guards.TracingContext.try_get()
    return ctx is not None and getattr(ctx, "ddp_optimizer_ctx", None) is not None


def note_ddp_pieces(report: Report) -> None:
    """In a DDPOptimizer piece, add the cause and the fix to the skips a cut can cause."""
    if not ddp_piece():
        return
    for s in report.skipped:
        if s.code in _CUT:
            s.reason += f" ({PIECE_HINT})"
