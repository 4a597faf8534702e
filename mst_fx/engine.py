"""Run the configured passes over a Dynamo graph: detect everywhere, then rewrite.

A Dynamo graph may hold activation-checkpointed regions as ``tag_activation_checkpoint``
calls whose bodies are submodules; blocks inside them are found too, and marked so that
the rewrite does not recompute them a second time (see mst_fx.passes.graph.chunking).

``snapshot``/``restore`` keep the original graphs so that the backend can fall back to the
unchanged graph if anything goes wrong after a rewrite.
"""

from __future__ import annotations

import logging
import re

from torch.fx import Graph, GraphModule, Node

from mst_fx import fx
from mst_fx.config import MSTConfig
from mst_fx.report import Report

log = logging.getLogger("mst_fx.engine")


def graph_modules(gm: GraphModule) -> list[tuple[GraphModule, bool]]:
    """``gm`` and the bodies of its activation-checkpointed regions, each once, with a flag
    saying whether the module runs under activation checkpointing."""
    found = {}
    for mod, path in fx.checkpoint_bodies(gm):
        found.setdefault(id(mod), (mod, bool(path)))
    return list(found.values())


def detect(gm: GraphModule, config: MSTConfig) -> list[tuple[GraphModule, Report]]:
    """Detection only: one Report per graph module, the graph untouched."""
    from mst_fx.passes import PASSES

    out = []
    for mod, checkpointed in graph_modules(gm):
        report = Report()
        for name in config.passes:
            report.extend(PASSES[name].detect(mod, config, checkpointed, module_path))
        out.append((mod, report))
    return out


def normalize(gm: GraphModule) -> int:
    """The value-preserving normalizations detection relies on, on ``gm`` and its checkpoint
    bodies: frozen-weight linears written as autograd.Functions opened into a linear
    (passes/graph/quantized.py), and a loss the model's code split over tokens joined back
    (passes/graph/normalize.py). Returns how many were made (also
    ``counters["mst_fx_graph"]``)."""
    from torch._dynamo.utils import counters

    from mst_fx.passes.graph.normalize import merge_token_splits
    from mst_fx.passes.graph.quantized import open_frozen_linears

    total = 0
    for mod, _ in graph_modules(gm):
        for name, fn in (("opened_frozen_linears", open_frozen_linears),
                         ("merged_token_splits", merge_token_splits)):
            made = fn(mod)
            if made:
                mod.graph.lint()
                mod.recompile()
                fill_example_values(mod)
                counters["mst_fx_graph"][name] += made
                total += made
    return total


def rewrite(gm: GraphModule, config: MSTConfig) -> Report:
    """Normalize, then detect and apply every region; returns the combined Report (regions
    marked applied)."""
    from mst_fx.passes import PASSES

    normalize(gm)
    total = Report()
    names: dict[str, tuple[str, str]] = {}
    for mod, report in detect(gm, config):
        for region in report.regions:
            PASSES[region.kind].rewrite(mod, region, names)
            region.applied = True
        if report.regions:
            mod.graph.lint()
            mod.recompile()
            fill_example_values(mod)
        total.extend(report)
    return total


def fill_example_values(gm: GraphModule) -> int:
    """Give the nodes a rewrite added the ``example_value`` (fake tensor) that Dynamo gives
    every node of its graphs; returns how many were filled.

    AOTAutograd's cache refuses a graph with a method call on a node without one ("Unsupported
    call_method target"), so without them no rewritten graph was ever cached. Values are
    computed by running each new node on its inputs' fake values in the graph's fake mode
    (a chunk body is run whole). A node that cannot be run keeps no value: its graph is
    still compiled, only not cached by AOTAutograd.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.node import map_arg

    mode = next((v.fake_mode for n in gm.graph.nodes
                 if isinstance(v := n.meta.get("example_value"), FakeTensor)), None)
    if mode is None:
        return 0
    filled = 0
    with mode:
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method") or "example_value" in n.meta:
                continue
            missing = []
            args, kwargs = map_arg((n.args, n.kwargs), lambda a: _fake(gm, a, missing))
            if missing:
                continue
            try:
                if n.op == "call_method":
                    v = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.target is fx.INVOKE:
                    v = tuple(args[0](*args[2:]))
                else:
                    v = n.target(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - only caching is lost
                log.debug("mst_fx: no example value for %s: %r", n.format_node(), e)
                continue
            n.meta["example_value"] = v
            filled += 1
    return filled


def _fake(gm: GraphModule, a: Node, missing: list):
    if a.op == "get_attr":
        return getattr(gm, a.target)
    if "example_value" not in a.meta:
        missing.append(a)
    return a.meta.get("example_value")


def snapshot(gm: GraphModule) -> list[tuple[GraphModule, Graph]]:
    """Copies of the graphs of ``gm`` and its checkpoint bodies, for ``restore``."""
    saved = []
    for mod, _ in graph_modules(gm):
        g, copies = Graph(), {}
        g.output(g.graph_copy(mod.graph, copies))
        for old, new in copies.items():
            # Dynamo keeps facts as plain node attributes (placeholders' _dynamo_source),
            # which graph_copy does not carry over; Inductor needs them.
            for k, v in vars(old).items():
                if k not in vars(new):
                    setattr(new, k, v)
        saved.append((mod, g))
    return saved


def restore(saved: list[tuple[GraphModule, Graph]]) -> None:
    for mod, g in saved:
        mod.graph = g
        mod.recompile()


def module_path(nodes: list[Node]) -> str:
    """The deepest module that holds all ``nodes``, from Dynamo's nn_module_stack, written
    as in ``model.named_modules()`` ("model.layers.0.mlp"); "?" when unknown."""
    paths = []
    for n in nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            paths.append(_clean(list(stack.values())[-1][0]).split("."))
    if not paths:
        return "?"
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common) or "<root>"


def _clean(path: str) -> str:
    # The root: L['self'], or L['args'][0] when the model's forward is wrapped by a
    # decorator taking *args (transformers 5.24's causal-LM forward).
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"(^|\.)__dict__\._modules(?=\.)", "", path)  # wrappers such as PEFT's
    return path.lstrip(".")
