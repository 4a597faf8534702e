"""``python -m mst_fx demo``: a small Llama-shaped model trained a few steps with plain
torch.compile and with mst_backend, side by side: the explain table, both loss curves and
the peak memory of one training step each. Runs on CPU in a few minutes; uses a GPU when
there is one."""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mst_fx.backend import explain, make_backend
from mst_fx.memory import peak_bytes


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden)
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class TinyLlama(nn.Module):
    """Embedding, pre-norm blocks (causal attention, SwiGLU MLP), LM head, cross-entropy."""

    def __init__(self, vocab=2048, hidden=256, inter=1024, layers=2, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, inter, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def run(steps: int = 5, seq: int = 4096, seed: int = 0) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    base = TinyLlama().to(device)
    ids = torch.randint(0, 2048, (1, seq), device=device)
    labels = torch.roll(ids, -1, dims=1)

    print(f"mst_fx demo: TinyLlama (2 layers, hidden 256, SwiGLU 1024), {seq} tokens, {device}\n")
    print(explain(base, ids, labels))
    torch._dynamo.reset()

    results = {}
    for name, backend in [("torch.compile", "inductor"), ("mst_backend", make_backend())]:
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend=backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        start = time.perf_counter()
        for _ in range(steps):
            loss = compiled(ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        elapsed = time.perf_counter() - start

        def step():
            compiled(ids, labels).backward()

        peak = peak_bytes(step, device)
        model.zero_grad(set_to_none=True)
        results[name] = (losses, peak, elapsed)

    print(f"\n{'step':>4}  {'torch.compile':>14}  {'mst_backend':>14}")
    for i in range(steps):
        print(f"{i:>4}  {results['torch.compile'][0][i]:>14.6f}  {results['mst_backend'][0][i]:>14.6f}")
    plain, mst = results["torch.compile"][1], results["mst_backend"][1]
    print(f"\npeak memory of one training step (beyond weights and inputs): "
          f"torch.compile {plain / 2**20:.1f} MiB, mst_backend {mst / 2**20:.1f} MiB "
          f"({mst / plain:.2f}x)")
    print(f"wall time of {steps} steps incl. compilation: torch.compile "
          f"{results['torch.compile'][2]:.1f} s, mst_backend {results['mst_backend'][2]:.1f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mst_fx")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with and without mst_fx")
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run(steps=args.steps, seq=args.seq)
