"""The model zoo: one small training model per family (2 layers, hidden <= 128, random
weights, no downloads), each with its inputs, its loss and what mst_fx should find in it.

Hugging Face families come from ``XConfig(...)`` + ``XForCausalLM(config)`` (BERT and T5 from
their masked-LM and seq2seq classes); two more are written here without transformers:
a nanoGPT-style GPT and a torchtitan-style Llama. ``FAMILIES`` maps a family name to a
Family; tests/zoo/test_zoo.py runs each one, tests/golden/<name>.txt holds its report.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, BATCH, SEQ = 256, 2, 23  # vocab >= 4 x hidden (a head); 46 tokens: no chunk count divides them
LAYERS = 2
HEADS = dict(num_attention_heads=4)
NO_DROPOUT = dict(attention_dropout=0.0)


@dataclass
class Family:
    """One family of the zoo.

    ``build()`` returns (model, kwargs of one training call); ``loss`` reads the scalar loss
    from the model's output. ``blocks``: the token-wise MLP blocks the model has (one per
    layer; a mixture-of-experts layer counts as one). ``mlp``, ``lm_head``, ``attention``:
    the rewrites expected (``mlp`` defaults to ``blocks``; ``lm_head`` is 1 where the loss
    is computed in the graph of the projection). ``note``: what is not chunked and why,
    shown in the model table (docs/models.md). ``context``: a context manager the compiled step runs in
    (a Dynamo setting the user would change).
    """

    build: Callable[[], tuple[nn.Module, dict]]
    blocks: int = LAYERS
    mlp: int | None = None
    lm_head: int = 1
    attention: int = 0
    loss: Callable = field(default=lambda out: out.loss)
    note: str = ""
    context: Callable = contextlib.nullcontext

    def __post_init__(self):
        if self.mlp is None:
            self.mlp = self.blocks


def _ids(vocab: int = VOCAB, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, seq))


def _causal(model_cls, config_cls, **cfg):
    def build():
        import transformers

        config = getattr(transformers, config_cls)(vocab_size=VOCAB, **cfg)
        ids = _ids()
        return getattr(transformers, model_cls)(config), {"input_ids": ids, "labels": ids}
    return build


LLAMA_LIKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=LAYERS,
                  num_key_value_heads=2, **HEADS)


def _quiet_hf_warnings():
    """Dynamo breaks the graph at every logging call; HF warns (``logger.warning_once``)
    inside GPT2's loss. torch's own switch makes Dynamo drop that call instead."""
    import torch._dynamo
    import transformers.modeling_utils

    ignored = torch._dynamo.config.ignore_logging_functions | {transformers.modeling_utils.logger.warning_once}
    return torch._dynamo.config.patch(ignore_logging_functions=ignored)


def _bert():
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, intermediate_size=256,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **HEADS)
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]  # masked-LM labels: a third of the positions count
    return transformers.BertForMaskedLM(config), {"input_ids": ids, "labels": labels}


def _t5():
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=256, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config), {
        "input_ids": _ids(), "labels": _ids(seq=19)}


# --- written without transformers ---------------------------------------------------------

class NanoGPT(nn.Module):
    """nanoGPT's model, small: fused qkv, SDPA causal attention, GELU MLP, tied head, and
    ``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)``."""

    def __init__(self, vocab=VOCAB, block=64, layers=LAYERS, heads=4, dim=64, parallel=False,
                 act=F.gelu, loss=None, checkpointed=False):
        super().__init__()
        self.checkpointed = checkpointed
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(NanoBlock(dim, heads, parallel, act) for _ in range(layers))
        self.loss = loss
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        if self.loss is not None:
            return logits, self.loss(logits, targets)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class NanoBlock(nn.Module):
    """``parallel``: GPT-J / PaLM's parallel block, ``x + attn(ln(x)) + mlp(ln(x))``, one
    norm read by the fused QKV (3x the width) and by the MLP."""

    def __init__(self, dim, heads, parallel=False, act=F.gelu):
        super().__init__()
        self.heads, self.parallel, self.act = heads, parallel, act
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = None if parallel else nn.LayerNorm(dim)
        self.c_attn, self.attn_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.c_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attn(self, h):
        b, t, c = h.shape
        q, k, v = self.c_attn(h).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h) + self.c_proj(self.act(self.c_fc(h)))
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class TanhGELU(torch.autograd.Function):
    """GELU (tanh form) with a hand-written backward, as some model code writes it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x))
        dt = (1.0 - t * t) * 0.7978845608 * (1.0 + 3 * 0.044715 * x * x)
        return grad * (0.5 * (1.0 + t) + 0.5 * x * dt)


def chunked_cross_entropy(logits, targets, chunk_size=16, ignore_index=-1):
    """A training library's loss already split over tokens: the flattened logits and
    targets split into pieces of ``chunk_size`` tokens, cross-entropy per piece, the pieces
    concatenated, summed and divided by the count of targets."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    pieces = [F.cross_entropy(lc, tc, ignore_index=ignore_index, reduction="none")
              for lc, tc in zip(logits.split(chunk_size), targets.split(chunk_size))]
    count = (targets != ignore_index).sum()
    return torch.cat(pieces).sum() / count.maximum(torch.ones_like(count))


def _nanogpt(**kw):
    def build():
        ids = _ids()
        targets = ids.clone()
        targets[:, -1] = -1
        return NanoGPT(**kw), {"idx": ids, "targets": targets}
    return build


class TitanLlama(nn.Module):
    """torchtitan's Llama, small: RMSNorm, RoPE with complex frequencies
    (``torch.view_as_complex``), GQA through SDPA ``is_causal``, FeedForward
    ``w2(silu(w1(x)) * w3(x))``, untied output. As in torchtitan the model returns logits;
    the training step computes the loss (``cross_entropy(pred.flatten(0, 1).float(), ...)``),
    here inside the compiled function."""

    def __init__(self, vocab=VOCAB, dim=64, layers=LAYERS, heads=4, kv_heads=2, hidden=192):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): TitanBlock(dim, heads, kv_heads, hidden) for i in range(layers)})
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // heads
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(64).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        freqs = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, freqs)
        return self.output(self.norm(h))


class TitanBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x, freqs):
        b, s, _ = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(b, s, self.heads, self.head_dim)
        k = self.wk(h).view(b, s, self.kv_heads, self.head_dim)
        v = self.wv(h).view(b, s, self.kv_heads, self.head_dim)
        q, k = _rope(q, freqs), _rope(k, freqs)
        rep = self.heads // self.kv_heads
        k, v = (z.repeat_interleave(rep, dim=2) for z in (k, v))
        y = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def _rope(x, freqs):
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    z = z * freqs.view(1, x.shape[1], 1, -1)
    return torch.view_as_real(z).flatten(3).type_as(x)


class TitanStep(nn.Module):
    """The model and torchtitan's loss, as one module so that one compile covers both."""

    def __init__(self):
        super().__init__()
        self.model = TitanLlama()

    def forward(self, tokens, labels):
        pred = self.model(tokens)
        return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


def _titan():
    ids = _ids()
    return TitanStep(), {"tokens": ids, "labels": torch.roll(ids, -1, 1)}


MOE_NOTE = ("experts run as one grouped GEMM over the tokens sorted by expert; chunking it "
            "needs per-chunk expert offsets (not done); the router, attention and head are as usual")

FAMILIES: dict[str, Family] = {
    "llama": Family(_causal("LlamaForCausalLM", "LlamaConfig", **LLAMA_LIKE)),
    "mistral": Family(_causal("MistralForCausalLM", "MistralConfig", **LLAMA_LIKE, sliding_window=None)),
    "qwen2": Family(_causal("Qwen2ForCausalLM", "Qwen2Config", **LLAMA_LIKE)),
    "qwen3": Family(_causal("Qwen3ForCausalLM", "Qwen3Config", **LLAMA_LIKE, head_dim=16)),
    "gemma": Family(_causal("GemmaForCausalLM", "GemmaConfig", **LLAMA_LIKE, head_dim=16)),
    "gemma2": Family(_causal("Gemma2ForCausalLM", "Gemma2Config", **LLAMA_LIKE, head_dim=16,
                             sliding_window=8),
                     note="sliding-window and softcapped attention become flex_attention on CUDA only"),
    "phi3": Family(_causal("Phi3ForCausalLM", "Phi3Config", hidden_size=64, intermediate_size=160,
                           num_hidden_layers=LAYERS, num_key_value_heads=4, pad_token_id=0,
                           resid_pdrop=0.0, embd_pdrop=0.0, **HEADS, **NO_DROPOUT)),
    "gpt2": Family(_causal("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=LAYERS, n_head=4,
                           n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                   lm_head=0,
                   note="HF logs a warning (logger.warning_once) between GPT2's head and loss; "
                        "Dynamo breaks the graph there (plain torch.compile too), so the head is "
                        "not chunked; model.loss_type = 'ForCausalLM' or gpt2_quiet's Dynamo "
                        "setting avoid it"),
    "gpt2_quiet": Family(_causal("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=LAYERS, n_head=4,
                                 n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                         context=_quiet_hf_warnings,
                         note="gpt2 with that warning in torch._dynamo.config.ignore_logging_functions: "
                              "one graph, head chunked"),
    "gpt_neox": Family(_causal("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=64,
                               intermediate_size=256, num_hidden_layers=LAYERS,
                               use_parallel_residual=True, hidden_dropout=0.0, **HEADS,
                               **NO_DROPOUT)),
    "opt": Family(_causal("OPTForCausalLM", "OPTConfig", hidden_size=64, ffn_dim=256,
                          num_hidden_layers=LAYERS, word_embed_proj_dim=64, dropout=0.0,
                          max_position_embeddings=64, **HEADS, **NO_DROPOUT)),
    "falcon": Family(_causal("FalconForCausalLM", "FalconConfig", hidden_size=64,
                             num_hidden_layers=LAYERS, new_decoder_architecture=False,
                             multi_query=True, parallel_attn=True, hidden_dropout=0.0, **HEADS,
                             **NO_DROPOUT), attention=LAYERS),
    "olmo2": Family(_causal("Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE)),
    "stablelm": Family(_causal("StableLmForCausalLM", "StableLmConfig", **LLAMA_LIKE,
                               hidden_dropout=0.0)),
    "mixtral": Family(_causal("MixtralForCausalLM", "MixtralConfig", **LLAMA_LIKE,
                              num_local_experts=4, num_experts_per_tok=2), mlp=0, note=MOE_NOTE),
    "qwen3_moe": Family(_causal("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **LLAMA_LIKE, head_dim=16,
                                moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2),
                        mlp=0, note=MOE_NOTE),
    "bert": Family(_bert, note="masked LM: prediction-head transform, then the tied decoder with bias"),
    "t5": Family(_t5, blocks=2 * LAYERS, note="encoder-decoder; the tied lm_head is scaled by d_model**-0.5"),
    "nanogpt": Family(_nanogpt(), loss=lambda out: out[1], note="written in the tests, no transformers"),
    "parallel_block": Family(_nanogpt(parallel=True), loss=lambda out: out[1],
                             note="written in the tests: attention and MLP read one norm (GPT-J/PaLM "
                                  "parallel block); the fused QKV, 3x the width, leaves the MLP's group"),
    "autograd_gelu": Family(_nanogpt(act=TanhGELU.apply), loss=lambda out: out[1],
                            note="written in the tests: the MLP's GELU is a torch.autograd.Function "
                                 "(forward and backward bodies both pointwise)"),
    "chunked_loss": Family(_nanogpt(loss=chunked_cross_entropy), loss=lambda out: out[1],
                           note="written in the tests: the loss already split over tokens by the "
                                "model's code (cross-entropy per 16 tokens, concatenated, summed)"),
    "torchtitan_llama": Family(_titan, loss=lambda out: out, attention=LAYERS,
                               note="written in the tests; complex RoPE; loss computed in the compiled step; "
                                    "repeated key/value heads shared (enable_gqa)"),
}
