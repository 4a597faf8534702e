"""Vocabulary-projection pass: projection + loss over mini-sequences of tokens.

Detection (structural): a projection (linear, or matmul by a 2-D weight) to V outputs
with V >= 4 x its input features, followed by ops that treat every token alone:
*vocab-level* ops on [tokens, V] (casts, scaling, softcapping c*tanh(x/c), bias,
log_softmax/softmax over V, views that keep V), *row reductions* to one value per token
(cross_entropy / nll_loss with reduction "none", logsumexp over V), *token-level* ops on
those values with other per-token tensors (labels, weights, masks), and *exits*: a loss
summed or averaged over all tokens (cross_entropy / nll_loss with reduction "sum"/"mean",
``.sum()``, ``.mean()``), a per-token tensor used by anything else, or logits returned by
the graph. Other tensors read on the way must be per-token (chunked along with the
tokens) or per-vocabulary / scalar (passed whole). Anything else (an op that mixes the
tokens of the logits, class weights) leaves the head unchanged, with the reason in
explain. A symbolic token count (dynamic shapes) is chunked in either mode, M chosen
from the traced length (see mst_fx.passes.graph.chunking.symbolic_rows); the forward mode's bodies are
then traced at symbolic row counts.

Rewriting: the head becomes a loop over M chunks of tokens, each an invoke_subgraph call
of one compiled body, with one of two gradient modes (MSTConfig.lm_head_grad):
- "forward": when the head's only loss exit is one scalar, each chunk's body computes its
  loss *and* its gradients (d hidden, d logits; traced with make_fx from autograd). The
  weight gradient is accumulated chunk by chunk into one buffer (fp32 for bf16 weights,
  mst_fx.ops.mm_acc then addmm_into), the hidden gradient written into one [tokens, H]
  buffer. The loss is returned as ``L + (S - S.detach())`` with ``S = <h, dh> + ...`` and
  the weight gradient attached by mst_fx.ops.with_grad: its value is exactly L and
  autograd's gradient of it is exactly the stored gradients times the incoming one, so
  the projection runs once instead of twice.
- "recompute": the body (projection + loss) runs under activation checkpointing; its
  logits are recomputed in backward. Used for per-token losses and several loss terms.
Logits that the graph returns are written chunk by chunk into one buffer in the model's
dtype (mst_fx.ops.write_rows), without gradient; MSTConfig.logits="drop" returns an empty
tensor instead.
"""

from mst_fx.passes.graph.lm_head.detect import KIND, detect
from mst_fx.passes.graph.lm_head.emit import rewrite
from mst_fx.passes.graph.lm_head.guard import wrap_compiled

__all__ = ["KIND", "detect", "rewrite", "wrap_compiled"]
