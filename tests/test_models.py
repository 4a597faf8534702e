"""Hugging Face models from small configs (random weights, no downloads) through Inductor:
every MLP is chunked and a training step equals eager under gradient checkpointing, and
BERT's residual over the MLP input. Every family without checkpointing: tests/zoo."""

import pytest
import torch
from helpers import check_rewrite

import mst_fx
from mst_fx.backend import aot_eager_compiler

transformers = pytest.importorskip("transformers")

CFG = mst_fx.MSTConfig(chunks=4)
SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def gpt2():  # Conv1D MLP with gelu_new, tied head
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def phi3():  # fused gate_up projection
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **SMALL, intermediate_size=160, num_key_value_heads=4, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))


# Without checkpointing every family is checked in tests/zoo (AOTAutograd, eager kernels);
# Llama under checkpointing and Inductor with every pass in tests/test_attention.py. GPT-2
# through AOTAutograd with eager kernels (suite time), Phi-3 through Inductor.
@pytest.mark.parametrize("make", [gpt2, phi3], ids=["gpt2", "phi3"])
def test_checkpointed_training_step_matches_eager(make):
    model = make().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 23))  # 46 tokens: not divisible by 4
    # Without a cache (checkpointing turns it off) HF builds a causal mask in the graph,
    # which the attention pass drops. Inductor compiles the nested bodies (chunk
    # checkpoints inside the layer's).
    backend = check_rewrite(model, [ids], kwargs={"labels": ids}, expect={"mlp": 2, "attention": 2},
                            config=CFG, loss_fn=lambda out: out.loss,
                            compiler=aot_eager_compiler if make is gpt2 else None)
    wheres = sorted(r.where for r in backend.report.regions if r.kind == "mlp")
    assert len(wheres) == 2 and all(w.endswith("mlp") for w in wheres), wheres


def test_bert_residual_over_mlp_input_matches_eager():
    """BERT adds the MLP's own input back after it; without inplace_buffers=False Inductor
    wrote that add into the buffer the chunks' saved inputs alias (gradients off by 2e-3)."""
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    ids = torch.randint(0, 96, (2, 20))
    check_rewrite(model, [ids], kwargs={"labels": ids}, expect={"mlp": 2}, config=CFG,
                  loss_fn=lambda out: out.loss)
