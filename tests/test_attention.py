"""Attention pass: masks built inside the graph are read back; provably causal ones are
dropped (is_causal=True), the others run as flex_attention; results equal eager.

Causal rewrites run through Inductor. Flex rewrites run through MSTBackend's
aot_eager_compiler on CPU: that checks the rewritten graph (mask_mod, block mask, the
flex_attention op and its autograd) with torch's reference flex kernels, since Inductor has
no CPU flex backward; test_flex_on_gpu runs the same through Inductor on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_rewrite
from hypothesis import given, settings
from hypothesis import strategies as st

import mst_fx
from mst_fx.backend import aot_eager_compiler
from mst_fx.passes.graph.attention.masks import extract, mask_sizes
from mst_fx.passes.graph.attention.prover import diagonal_allowed, prove

transformers = pytest.importorskip("transformers")

FLEX = mst_fx.MSTConfig(passes=("attention",), flex_attention="all")


class Attention(torch.nn.Module):
    """Self-attention whose boolean mask comes from ``build(S, device, *extra)``."""

    def __init__(self, build, width=16, heads=2, dropout=0.0):
        super().__init__()
        self.build, self.heads, self.dropout = build, heads, dropout
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x, *extra):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.build(S, x.device, *extra),
                                           dropout_p=self.dropout)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


def _qk(S, device):
    i = torch.arange(S, device=device)
    return i[:, None], i[None, :]


def causal_2d(S, device):
    q, kv = _qk(S, device)
    return q >= kv


def causal_hf(S, device):  # the index layout of transformers' sdpa_mask
    q = torch.arange(S, device=device)[None, None, :, None]
    kv = torch.arange(S, device=device)[None, None, None, :]
    return q.new_ones((), dtype=torch.bool) & (kv <= q)


def causal_positions(S, device):  # strictly increasing positions the graph computed itself
    pos = torch.arange(S, device=device) * 3 + 5
    q, kv = _qk(S, device)
    return pos[q] >= pos[kv]


def causal_one_document(S, device):  # packed-sequence detection finding one document
    pos = torch.arange(S, device=device)
    doc = (torch.diff(pos, prepend=pos[:1] - 1) != 1).cumsum(-1)
    q, kv = _qk(S, device)
    return (doc[q] == doc[kv]) & (kv <= q)


def causal_wide_window(S, device):
    q, kv = _qk(S, device)
    return (kv <= q) & (q - kv < S + 3)


def always_true(S, device):
    q, kv = _qk(S, device)
    return (q >= 0) & (kv < S)


def window(S, device):
    q, kv = _qk(S, device)
    return (kv <= q) & (q - kv < 5)


def prefix_lm(S, device):
    q, kv = _qk(S, device)
    return (kv <= q) | (kv < 4)


def documents(S, device, doc):  # document ids given as an input
    q, kv = _qk(S, device)
    return (doc[q] == doc[kv]) & (kv <= q)


def padding(S, device, keep):  # [B, S] padding mask given as an input
    q, kv = _qk(S, device)
    return (kv <= q) & keep[:, None, None, :]


def materialized(S, device):
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()


def additive(S, device):
    q, kv = _qk(S, device)
    return torch.zeros(S, S, device=device).masked_fill(kv > q, float("-inf"))


def _tensor_shapes(gm):
    """Fake shapes of every tensor node of the rewritten graph and its bodies."""
    from mst_fx.engine import graph_modules

    shapes = []
    for mod, _ in graph_modules(gm):
        for n in mod.graph.nodes:
            v = n.meta.get("example_value")
            if isinstance(v, torch.Tensor):
                shapes.append(tuple(v.shape))
    return shapes


def recording(inner):
    """A compiler that keeps the rewritten graphs it is given."""
    seen = []

    def compiler(gm, example_inputs, config_patches=None):
        seen.append(gm)
        return inner(gm, example_inputs, config_patches=config_patches)

    compiler.seen = seen
    return compiler


def inductor(gm, example_inputs, config_patches=None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config_patches)


@pytest.mark.parametrize("build,kind", [
    (causal_2d, "causal"), (causal_hf, "causal"), (causal_positions, "causal"),
    (causal_one_document, "causal"), (causal_wide_window, "causal"), (always_true, "full"),
])
def test_provable_masks_are_dropped(build, kind):
    S = 24
    compiler = recording(inductor)
    backend = check_rewrite(Attention(build), [torch.randn(2, S, 16, requires_grad=True)],
                            expect={"attention": 1}, config=FLEX, compiler=compiler)
    (region,) = backend.report.regions
    assert region.kind == "attention" and region.detail.startswith(kind), region.detail
    shapes = [s for gm in compiler.seen for s in _tensor_shapes(gm)]
    assert not [s for s in shapes if s[-2:] == (S, S)], shapes  # no S x S tensor left


@pytest.mark.parametrize("build,extra,why", [
    (window, [], "q - kv <= 4 (sliding window)"),
    (prefix_lm, [], "a prefix"),
    (documents, [torch.tensor([0] * 7 + [1] * 10 + [2] * 7)], "depends on the graph's inputs"),
    (padding, [torch.tensor([[False] * 5 + [True] * 19, [True] * 20 + [False] * 4])],
     "depends on the graph's inputs"),
])
def test_other_masks_become_flex_attention(build, extra, why):
    x = torch.randn(2, 24, 16, requires_grad=True)
    backend = check_rewrite(Attention(build), [x, *extra], expect={"attention": 1},
                            config=FLEX, compiler=aot_eager_compiler)
    (region,) = backend.report.regions
    assert region.detail.startswith("flex") and why in region.detail, region.detail


@pytest.mark.parametrize("module,extra,why", [
    (Attention(materialized), [], "materialized mask"),
    (Attention(additive), [], "not a boolean mask"),
    (Attention(lambda S, device, m: m), [torch.ones(24, 24, dtype=torch.bool).tril()], "graph input"),
    (Attention(window, dropout=0.1), [], "dropout_p=0.1"),
])
def test_unsupported_masks_are_left_with_a_reason(module, extra, why):
    report = mst_fx.explain(module, torch.randn(2, 24, 16), *extra, config=FLEX)
    assert not report.regions
    (skip,) = report.skipped
    assert skip.kind == "attention" and why in skip.reason, skip.reason


def test_flex_is_cuda_only_by_default():
    report = mst_fx.explain(Attention(window), torch.randn(2, 24, 16))
    (skip,) = [s for s in report.skipped if s.kind == "attention"]
    assert "flex_attention='cuda'" in skip.reason and "sliding window" in skip.reason


# ---------------------------------------------------------------------------------------
# Soundness over random masks: the mask_mod equals the mask, and "causal"/"full" are true.
# ---------------------------------------------------------------------------------------

def _capture(fn, *args):
    torch._dynamo.reset()  # one capture per hypothesis example, not a recompile
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


@settings(max_examples=20, deadline=None)
@given(S=st.integers(2, 20), causal=st.booleans(), win=st.one_of(st.none(), st.integers(1, 24)),
       docs=st.one_of(st.none(), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
       docs_as_input=st.booleans(), prefix=st.one_of(st.none(), st.integers(0, 5)))
def test_mask_mods_are_exact_and_verdicts_sound(S, causal, win, docs, docs_as_input, prefix):
    from torch.fx import Interpreter
    from torch.nn.attention.flex_attention import create_mask

    lengths = docs or [S]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc_ids = torch.cat([doc_ids, doc_ids.new_full((max(0, S - len(doc_ids)),), len(lengths))])[:S]
    doc_list = doc_ids.tolist()

    def build(q, kdoc):
        i = torch.arange(S)
        qi, kvi = i[None, None, :, None], i[None, None, None, :]
        doc = kdoc if docs_as_input else torch.tensor(doc_list)
        m = (doc[qi] == doc[kvi]) if docs is not None else kvi >= 0
        if causal:
            m = m & (kvi <= qi)
        if win is not None:
            m = m & (qi - kvi < win)
        if prefix is not None:
            m = m | (kvi < prefix)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=m)

    q = torch.randn(1, 1, S, 4)
    gm, inputs = _capture(build, q, doc_ids)
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention
                or n.target is torch._C._nn.scaled_dot_product_attention)
    mask = sdpa.kwargs["attn_mask"]
    values = {}

    class Record(Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(*inputs)
    real = values[mask].expand(1, 1, S, S)
    sizes = mask_sizes(sdpa.args[0], sdpa.args[1])
    mm = extract(mask, sizes)
    bufs = [values[b] for b in mm.buffers]
    dense = create_mask(lambda b, h, qi, kvi: mm.module(b, h, qi, kvi, *bufs), 1, 1, S, S, "cpu")
    assert torch.equal(dense, real)
    verdict = prove(mm, sizes)
    if verdict.kind == "causal":
        assert torch.equal(real[0, 0], torch.ones(S, S, dtype=torch.bool).tril())
    if verdict.kind == "full":
        assert bool(real.all())
    if diagonal_allowed(mm, sizes):  # then no query row is empty
        assert bool(real[0, 0].diagonal().all())
    if docs is None and prefix is None and causal and (win is None or win >= S):
        assert verdict.kind == "causal" or (S == 1), verdict  # what must be proved, is


# ---------------------------------------------------------------------------------------
# Hugging Face models: no mask, all-ones, left/right padding, packed sequences.
def repeat_kv(x, n):  # as transformers writes it
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def repeat_kv_titan(x, n):  # torchtitan's, on [B, S, KV, D] before the heads move
    b, s, h, d = x.shape
    return x[:, :, :, None, :].expand(b, s, h, n, d).reshape(b, s, h * n, d)


REPEATS = {  # how: (heads first?, the repeat)
    "transformers": (True, repeat_kv),
    "interleave": (True, lambda x, n: x.repeat_interleave(n, dim=1)),
    "torchtitan": (False, repeat_kv_titan),
    "interleave_then_transpose": (False, lambda x, n: torch.repeat_interleave(x, n, dim=2)),
}


class GroupedAttention(torch.nn.Module):
    """4 query heads, 2 key/value heads repeated for their query groups (``how``, see
    REPEATS); causal by is_causal or by a mask the graph builds."""

    def __init__(self, masked, how="transformers", width=32, heads=4, kv_heads=2):
        super().__init__()
        self.masked, self.how, self.heads, self.kv_heads = masked, how, heads, kv_heads
        self.q = torch.nn.Linear(width, width)
        self.kv = torch.nn.Linear(width, 2 * width * kv_heads // heads)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        B, S, D = x.shape
        hd = D // self.heads
        n = self.heads // self.kv_heads
        heads_first, repeat = REPEATS[self.how]
        q = self.q(x).view(B, S, self.heads, hd).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 2, self.kv_heads, hd).unbind(2)
        if heads_first:
            k, v = repeat(k.transpose(1, 2), n), repeat(v.transpose(1, 2), n)
        else:
            k, v = repeat(k, n).transpose(1, 2), repeat(v, n).transpose(1, 2)
        mask = causal_hf(S, x.device) if self.masked else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not self.masked)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


GQA_CASES = [(False, "transformers"), (True, "transformers"), (False, "interleave"),
             (False, "torchtitan"), (True, "interleave_then_transpose")]


@pytest.mark.parametrize("masked,how", GQA_CASES,
                         ids=[f"{h}-{'mask' if m else 'is_causal'}" for m, h in GQA_CASES])
def test_repeated_key_value_heads_are_shared(masked, how):
    """SDPA gets the unrepeated keys and values with enable_gqa=True: no repeat is left in
    the graph, and the step equals eager (Inductor, fp32)."""
    S = 24
    compiler = recording(inductor)
    backend = check_rewrite(GroupedAttention(masked, how), [torch.randn(2, S, 32, requires_grad=True)],
                            expect={"attention": 1}, config=FLEX, compiler=compiler)
    (region,) = backend.report.regions
    assert "key/value heads shared with enable_gqa=True (not repeated 2x)" in region.detail, region.detail
    assert region.detail.startswith("causal: mask dropped" if masked else "is_causal=True;"), region.detail
    (call,) = [n for gm in compiler.seen for n in gm.graph.nodes if n.target in (F.scaled_dot_product_attention,
                                                                              torch._C._nn.scaled_dot_product_attention)]
    assert call.kwargs["enable_gqa"] is True and call.kwargs["is_causal"] is True
    assert [tuple(a.meta["example_value"].shape) for a in call.args[1:3]] == [(2, 2, S, 8)] * 2
    assert not [n for gm in compiler.seen for n in gm.graph.nodes
                if n.target in ("expand", "repeat_interleave", torch.repeat_interleave)]


def test_other_repeats_are_left():
    """Keys repeated but values not (or by another count): the call stays as it is."""

    class Mixed(GroupedAttention):
        def forward(self, x):
            B, S, D = x.shape
            q = self.q(x).view(B, S, 4, 8).transpose(1, 2)
            k, v = self.kv(x).view(B, S, 2, 2, 8).permute(2, 0, 3, 1, 4)
            # v.repeat tiles the heads (query head j reads kv head j % 2): not enable_gqa's grouping
            y = F.scaled_dot_product_attention(q, repeat_kv(k, 2), v.repeat(1, 2, 1, 1), is_causal=True)
            return self.out(y.transpose(1, 2).reshape(B, S, D))

    report = mst_fx.explain(Mixed(False), torch.randn(2, 24, 32), config=FLEX)
    assert not report.regions and "nothing to do" in report.skipped[0].reason, report


# ---------------------------------------------------------------------------------------

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def hf_model(family, **changes):
    extra = {"mistral": dict(sliding_window=6), "qwen2": dict(use_sliding_window=False),
             "gemma2": dict(sliding_window=6, head_dim=16)}  # sliding and global layers
    config = transformers.AutoConfig.for_model(family, **{**SMALL, **changes}, **extra.get(family, {}))
    # Gemma 2 softcaps its attention logits: HF runs it through its written-out attention.
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).train()


def hf_inputs(case, B=2, S=24):
    if case == "single":  # one sequence: the batch index range has length 1
        case, B = "none", 1
    ids = torch.randint(0, 96, (B, S))
    labels, kwargs = ids.clone(), {"use_cache": False}
    if case in ("ones", "left", "right"):
        keep = torch.ones(B, S, dtype=torch.long)
        if case == "left":
            keep[0, :5] = 0
        if case == "right":
            keep[1, -7:] = 0
        labels[keep == 0] = -100
        kwargs["attention_mask"] = keep
    if case == "packed":  # three documents in each row, positions restarting at each
        a, b = S * 7 // 24, S * 10 // 24
        kwargs["position_ids"] = torch.cat([torch.arange(a), torch.arange(b), torch.arange(S - a - b)]).repeat(B, 1)
    kwargs["labels"] = labels
    return ids, kwargs


HF_CASES = [
    ("llama", "none", False, "causal"), ("llama", "ones", False, "flex"),
    ("llama", "left", False, "flex"), ("llama", "right", True, "flex"),
    ("llama", "packed", True, "flex"), ("mistral", "none", False, "flex"),
    ("mistral", "left", True, "flex"), ("qwen2", "packed", False, "flex"),
    ("qwen2", "none", True, "causal"), ("llama", "single", True, "causal"),
    ("gemma2", "none", False, "flex"), ("gemma2", "packed", True, "flex"),
]


@pytest.mark.parametrize("family,case,checkpointing,kind", HF_CASES,
                         ids=[f"{f}-{c}-{'gc' if g else 'plain'}" for f, c, g, _ in HF_CASES])
def test_hf_models_match_eager(family, case, checkpointing, kind):
    model = hf_model(family)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, kwargs = hf_inputs(case)
    backend = check_rewrite(model, [ids], kwargs=kwargs, expect={"attention": 2}, config=FLEX,
                            compiler=aot_eager_compiler, loss_fn=lambda out: out.loss)
    details = [r.detail for r in backend.report.regions]
    assert len(details) == 2 and all(d.startswith(kind) for d in details), details


def test_written_out_attention_keeps_its_softcap_and_layers():
    """Gemma 2: alternating sliding-window and global layers, attention logits softcapped
    in a written-out attention; each becomes flex_attention with the softcap as score_mod."""
    report = mst_fx.explain(hf_model("gemma2"), *hf_inputs("none")[:1], **hf_inputs("none")[1],
                            config=FLEX)
    first, second = (r.detail for r in report.regions)
    for d in (first, second):
        assert "score_mod mul 0.0625, truediv 50.0, tanh, mul 50.0" in d, d  # 256 ** -0.5
    assert "sliding window" in first and second.endswith("kv <= q"), (first, second)
    default = mst_fx.explain(hf_model("gemma2"), *hf_inputs("none")[:1], **hf_inputs("none")[1])
    assert all("written-out attention left as it is" in s.reason
               for s in default.skipped if s.kind == "attention")
    # With padding a query may have no key at all: eager then averages over the keys (its
    # additive mask is finite) where flex_attention gives zeros, so it stays as it is.
    ids, kwargs = hf_inputs("left")
    padded = mst_fx.explain(hf_model("gemma2"), ids, **kwargs, config=FLEX)
    assert not padded.regions and all("no key to attend to" in s.reason
                                      for s in padded.skipped if s.kind == "attention")


def test_hf_causal_under_inductor_with_every_pass():
    """The common training case end to end: no mask given, gradient checkpointing, all
    passes, Inductor; the rewritten graphs hold no S x S tensor."""
    S = 48
    model = hf_model("llama", vocab_size=512)  # V >= 4 H: a vocabulary projection
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, kwargs = hf_inputs("none", S=S)
    compiler = recording(inductor)
    check_rewrite(model, [ids], kwargs=kwargs, loss_fn=lambda out: out.loss, compiler=compiler,
                  config=mst_fx.MSTConfig(chunks=2), expect={"attention": 2, "mlp": 2, "lm_head": 1})
    shapes = [s for gm in compiler.seen for s in _tensor_shapes(gm)]
    assert not [s for s in shapes if s[-2:] == (S, S)], shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,case,checkpointing,kind", HF_CASES,
                         ids=[f"{f}-{c}-{'gc' if g else 'plain'}" for f, c, g, _ in HF_CASES])
def test_flex_on_gpu(family, case, checkpointing, kind):
    """The same cases through Inductor's flex kernels (Triton) on a GPU, fp32."""
    model = hf_model(family).cuda()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, kwargs = hf_inputs(case, S=200)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    backend = check_rewrite(model, [ids.cuda()], kwargs=kwargs, expect={"attention": 2},
                            config=mst_fx.MSTConfig(passes=("attention",)),
                            loss_fn=lambda out: out.loss)
    assert all(r.detail.startswith(kind) for r in backend.report.regions)
