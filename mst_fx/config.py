"""MSTConfig: the one knob-set every pass reads.

A frozen dataclass, validated at construction so that a bad value fails where the user
wrote it (ValueError naming the field), never later inside torch.compile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def known_passes() -> tuple[str, ...]:
    """The graph passes that exist, in the order they run: the registry's names."""
    from mst_fx.passes import PASSES

    return tuple(PASSES)


LM_HEAD_GRADS = ("forward", "recompute")
LOGITS = ("keep", "drop")
FLEX_ATTENTION = ("cuda", "all", "off")


@dataclass(frozen=True)
class MSTConfig:
    """How mst_fx rewrites a graph.

    Args:
        passes: which graph passes run, by name (see ``mst_fx.passes.PASSES``).
        chunks: a fixed number of mini-sequences M for every region. ``None``: choose M
            per region (see ``chunk_bytes``).
        chunk_bytes: when ``chunks`` is None and this is set, M is chosen so that one
            chunk's intermediates take about this many bytes. When both are None, M follows
            MsT: the widths of the block's expanding projections over its input width
            (about intermediate / hidden), so a chunk's intermediates are about the size of
            the block's input.
        min_chunk_tokens: floor on tokens per chunk so that the chunk GEMMs stay efficient;
            M is lowered until every chunk has at least this many tokens. A region that
            cannot get two chunks is left unchanged (and says so in ``explain``).
        max_chunks: ceiling on M.
        min_expansion: a projection opens a block when out_features >= this x in_features.
        lm_head_grad: how the vocabulary projection + loss gets its gradients.
            "forward": each chunk's gradients are computed in the forward, right after its
            loss (the projection runs once, not twice); used where the loss is one scalar.
            "recompute": each chunk's logits are recomputed in backward (needed for
            per-token losses, several loss terms); also the fallback of "forward".
        logits: what happens to a logits tensor that the graph returns next to the loss
            in training. "keep": returned, written chunk by chunk in the model's dtype,
            without gradient (backward through it raises an error that says so).
            "drop": returned as an empty tensor, saving its tokens x vocab memory (what
            HF Trainer needs: it reads only the loss in training). Graphs without
            gradients (inference, evaluation) always keep exact logits.
        fp32_weight_grad: accumulate the vocabulary projection's weight gradient over the
            chunks in fp32 when the weight is bf16/fp16 (costs a V x H fp32 buffer).
        recompute_in_checkpoint: an MLP block inside a region the model already checkpoints
            (gradient checkpointing) still runs each chunk under its own checkpoint. The
            outer recompute re-runs the layer's whole forward before its backward, so
            without this every chunk's intermediates are alive at once there (measured on
            Llama-3.2-1B at 32k: 1.6 GB, as much as the unchunked MLP); with it only one
            chunk's are, for a third forward pass of each chunk's GEMMs. False: one chunk
            loop recomputed by the outer checkpoint (faster, more memory).
        native_embedding_backward: a bf16/fp16 embedding's weight gradient is computed by
            mst_fx::embedding_dense_backward (on CUDA torch's own kernel; fp32 sums per row,
            one rounding to the weight's dtype) instead of Inductor's decomposition, which
            builds it in a [V, H] fp32 buffer first (1.05 GB for Llama-3.2-1B's 128256 x
            2048, alive at the end of backward). Applies to every graph the backend compiles.
        recompute_embedding: in a checkpointed model, the token embedding lookup (the first
            layer's input, [tokens, hidden]) is repeated in the backward from the token ids
            instead of being saved from the forward to the end of the backward (see
            mst_fx.passes.joint.embedding_recompute). Applies to every graph the backend compiles.
        flex_attention: where the attention pass turns a mask it cannot drop (packing,
            padding, sliding window) into flex_attention. "cuda": on CUDA devices only
            (torch's CPU flex kernel has no backward, and gave wrong values at some
            lengths in torch 2.13); "all": on every device; "off": never (causal masks
            are still dropped).
        offload: move the tensors the step saves for its backward to pinned host memory
            between the forward and the backward: every checkpoint boundary (a checkpointed
            layer's input) and any other saved tensor of at least ``offload_min_bytes``. The
            copies run on a side stream, each started when its tensor is computed and
            brought back one checkpointed layer ahead of its use (see
            mst_fx.passes.partition). A step whose tensors the host cannot take fails
            before it copies anything, saying so. Applies to every graph the backend
            compiles; explain() lists what is offloaded.
        offload_min_bytes: the size floor for saved tensors that are not checkpoint
            boundaries (at the size the graph is compiled for).
        sequence_parallel: the process group (a ProcessGroup, a 1-D DeviceMesh or a group's
            name; stored as the name) whose ranks each hold a piece of every sequence
            (DeepSpeed-Ulysses; see mst_fx.sequence_parallel, whose ``shard`` cuts a batch).
            Every attention call then runs over the whole sequence between two all-to-alls;
            a graph whose attention cannot be made so raises SequenceParallelError.
            ``None``: each rank's tokens are its own sequences.

    Example:
        >>> MSTConfig(chunks=8).chunks
        8
    """

    passes: tuple[str, ...] = dataclasses.field(default_factory=known_passes)
    chunks: int | None = None
    chunk_bytes: int | None = None
    min_chunk_tokens: int = 1024
    max_chunks: int = 64
    min_expansion: float = 2.0
    lm_head_grad: str = "forward"
    logits: str = "keep"
    fp32_weight_grad: bool = True
    recompute_in_checkpoint: bool = True
    native_embedding_backward: bool = True
    recompute_embedding: bool = True
    flex_attention: str = "cuda"
    offload: bool = False
    offload_min_bytes: int = 32 * 2**20
    sequence_parallel: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.passes, str) or not isinstance(self.passes, (tuple, list)):
            raise ValueError(f"MSTConfig.passes must be a tuple of pass names, got {self.passes!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        unknown = [p for p in self.passes if p not in known_passes()]
        if unknown:
            raise ValueError(f"MSTConfig.passes: unknown pass {unknown}; known: {known_passes()}")
        _check_int("chunks", self.chunks, minimum=1, optional=True)
        _check_int("chunk_bytes", self.chunk_bytes, minimum=1, optional=True)
        if self.chunks is not None and self.chunk_bytes is not None:
            raise ValueError("MSTConfig.chunks and MSTConfig.chunk_bytes are exclusive; set one")
        _check_int("min_chunk_tokens", self.min_chunk_tokens, minimum=1)
        _check_int("max_chunks", self.max_chunks, minimum=1)
        if not isinstance(self.min_expansion, (int, float)) or isinstance(self.min_expansion, bool) \
                or not self.min_expansion > 1:
            raise ValueError(f"MSTConfig.min_expansion must be a number > 1, got {self.min_expansion!r}")

        if self.lm_head_grad not in LM_HEAD_GRADS:
            raise ValueError(f"MSTConfig.lm_head_grad must be one of {LM_HEAD_GRADS}, got {self.lm_head_grad!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"MSTConfig.logits must be one of {LOGITS}, got {self.logits!r}")
        if self.flex_attention not in FLEX_ATTENTION:
            raise ValueError(f"MSTConfig.flex_attention must be one of {FLEX_ATTENTION}, "
                             f"got {self.flex_attention!r}")
        _check_int("offload_min_bytes", self.offload_min_bytes, minimum=0)
        if self.sequence_parallel is not None:
            from mst_fx.sequence_parallel import group_name

            object.__setattr__(self, "sequence_parallel", group_name(self.sequence_parallel))
        for name in ("fp32_weight_grad", "recompute_in_checkpoint", "native_embedding_backward",
                     "recompute_embedding", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MSTConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def replace(self, **overrides) -> "MSTConfig":
        """A copy with some fields changed (validated again); unknown names raise ValueError."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"MSTConfig has no field {bad}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"MSTConfig.{name} must be an int >= {minimum}, got {value!r}")
