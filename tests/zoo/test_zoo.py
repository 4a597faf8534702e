"""Every family of the zoo (tests/zoo/families.py): a compiled training step with
mst_backend equals eager in fp32 (loss and every gradient), with the expected number of
rewrites, as many graphs as plain Dynamo captures, and the explain report of the golden
file (tests/zoo/golden.py). The family table of docs/models.md must be the one the golden files
give (tests/zoo/readme_table.py).

The rewritten graphs run through AOTAutograd with eager kernels (aot_eager_compiler): the
rewrite is checked on every family within the suite's time on 2 cores; Inductor's kernels
are checked on GPT2, Phi3, BERT (tests/test_models.py) and Llama (tests/test_attention.py),
and on every family with ``MST_FX_ZOO_INDUCTOR=1``.
"""

import os

import golden
import pytest
import readme_table
import torch
from families import BATCH, FAMILIES, SEQ
from helpers import TOL, check_rewrite

import mst_fx
from mst_fx.backend import aot_eager_compiler

pytest.importorskip("transformers")

CFG = mst_fx.MSTConfig(chunks=4)
INDUCTOR = os.environ.get("MST_FX_ZOO_INDUCTOR") == "1"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name):
    family = FAMILIES[name]
    model, kwargs = family.build()
    model.train()
    expect = {"mlp": family.mlp, "lm_head": family.lm_head, "attention": family.attention}
    with family.context():
        backend = check_rewrite(model, [], kwargs=kwargs, expect=expect, config=CFG, loss_fn=family.loss,
                                compiler=None if INDUCTOR else aot_eager_compiler)
        plain = torch._dynamo.explain(model)(**kwargs)
    grads = sum(p.grad is not None for p in model.parameters())
    assert grads == sum(p.requires_grad for p in model.parameters())

    assert len(backend.reports) == plain.graph_count, "mst_backend saw a different number of graphs"

    tol = TOL[torch.float32]
    header = {
        "family": name,
        "input": f"{BATCH} x {SEQ} tokens, MSTConfig(chunks=4)",
        "mlp blocks": str(family.blocks),
        "rewrites": ", ".join(f"{k} {v}" for k, v in expect.items()),
        "graphs": f"{plain.graph_count} (plain torch.compile: {plain.graph_count})",
        "exact": f"loss and {grads} gradients equal eager in fp32 (rtol {tol['rtol']}, atol {tol['atol']})",
        "note": family.note or "-",
    }
    golden.check(name, golden.render(header, str(backend.report)))


def test_readme_table_is_generated_from_the_golden_files():
    assert readme_table.in_docs() == readme_table.render(golden.load_all()), \
        "docs/models.md's family table is stale: run python tests/zoo/readme_table.py"
