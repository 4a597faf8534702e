"""Small MLP blocks written the ways real models write them (torch-level code only), and a
stack of pre-norm residual layers around them."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class GLU(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama), GeGLU (Gemma), sigmoid/tanh gating."""

    def __init__(self, hidden, inter, act=F.silu, bias=False):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=bias)
        self.up = nn.Linear(hidden, inter, bias=bias)
        self.down = nn.Linear(inter, hidden, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Plain(nn.Module):
    """fc2(act(fc1(x))): GELU + bias (BERT, GPT-NeoX), ReLU (OPT), squared ReLU."""

    def __init__(self, hidden, inter, act=F.gelu, bias=True, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter, bias=bias)
        self.fc2 = nn.Linear(inter, hidden, bias=bias)
        self.act = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class FusedGateUp(nn.Module):
    """One gate_up projection split in two (Phi-3), by chunk, split, slicing or narrow."""

    def __init__(self, hidden, inter, how="chunk"):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.inter, self.how = inter, how

    def forward(self, x):
        gu = self.gate_up(x)
        if self.how == "chunk":
            g, u = gu.chunk(2, dim=-1)
        elif self.how == "split":
            g, u = torch.split(gu, self.inter, dim=-1)
        elif self.how == "slice":
            g, u = gu[..., : self.inter], gu[..., self.inter :]
        else:
            g, u = gu.narrow(-1, 0, self.inter), gu.narrow(-1, self.inter, self.inter)
        return self.down(u * F.silu(g))


class Conv1DMLP(nn.Module):
    """GPT-2's MLP: HF Conv1D is addmm over a 2-D view, with tanh-approximated GELU."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.w_fc = nn.Parameter(torch.randn(hidden, inter) * 0.02)
        self.b_fc = nn.Parameter(torch.randn(inter) * 0.02)
        self.w_proj = nn.Parameter(torch.randn(inter, hidden) * 0.02)
        self.b_proj = nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, x):
        size = x.size()[:-1] + (self.w_fc.shape[1],)
        h = torch.addmm(self.b_fc, x.view(-1, x.size(-1)), self.w_fc).view(size)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        size = h.size()[:-1] + (self.w_proj.shape[1],)
        return torch.addmm(self.b_proj, h.view(-1, h.size(-1)), self.w_proj).view(size)


class MatmulMLP(nn.Module):
    """Raw parameters and @, casts to fp32 inside the block and back (mixed precision)."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, inter) * hidden**-0.5)
        self.bias = nn.Parameter(torch.zeros(inter))
        self.w2 = nn.Parameter(torch.randn(inter, hidden) * inter**-0.5)

    def forward(self, x):
        h = (x @ self.w1 + self.bias).float()
        return torch.square(F.relu(h)).type_as(x) @ self.w2


def squared_relu(x):
    return torch.square(F.relu(x))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class NF4Linear(nn.Module):
    """A frozen linear whose weight is stored as torchao's NF4 tensor (4-bit NormalFloat,
    per-block scales), applied as torchtune's QLoRA base layer applies it: ``linear_nf4``,
    an autograd.Function that dequantizes in forward and again in backward."""

    def __init__(self, fan_in, fan_out, bias=False):
        super().__init__()
        from torchao.quantization import to_nf4

        w = torch.randn(fan_out, fan_in) / fan_in**0.5
        self.weight = nn.Parameter(to_nf4(w), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(fan_out) * 0.1) if bias else None

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        out = linear_nf4(x, self.weight)
        return out + self.bias if self.bias is not None else out


def to_qlora(model: nn.Module, under: str, rank: int = 4) -> nn.Module:
    """Replace every nn.Linear below the submodule ``under`` by a LoRALinear on a 4-bit NF4
    base quantized from its weight (torchtune's QLoRA recipe: all linears of the decoder
    layers; the embedding and the head stay as they are)."""
    root = model.get_submodule(under)
    for name, lin in list(root.named_modules()):
        if not isinstance(lin, nn.Linear):
            continue
        from torchao.quantization import to_nf4

        q = LoRALinear(lin.in_features, lin.out_features, rank=rank, nf4=True)
        q.base.weight = nn.Parameter(to_nf4(lin.weight.detach()), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, q)
    return model


class LoRALinear(nn.Module):
    """A linear with low-rank adapters added the way PEFT's LoRA layer writes it:
    ``base(x) + B(A(dropout(x.to(A's dtype)))) * scaling`` per adapter, then a cast back.
    ``nf4``: the frozen base is an NF4Linear (QLoRA)."""

    def __init__(self, fan_in, fan_out, rank=4, adapters=1, dropout=0.0, bias=False, nf4=False):
        super().__init__()
        self.base = NF4Linear(fan_in, fan_out, bias) if nf4 else nn.Linear(fan_in, fan_out, bias=bias)
        if self.base.bias is not None and nf4:
            self.base.bias.requires_grad_(False)
        self.base.weight.requires_grad_(False)  # frozen, as in LoRA fine-tuning
        self.A = nn.ModuleList(nn.Linear(fan_in, rank, bias=False) for _ in range(adapters))
        self.B = nn.ModuleList(nn.Linear(rank, fan_out, bias=False) for _ in range(adapters))
        for b in self.B:  # PEFT starts B at zero; random here so the adapters matter
            nn.init.normal_(b.weight, std=0.2)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = 2.0

    def forward(self, x):
        result = self.base(x)
        dtype = result.dtype
        for a, b in zip(self.A, self.B):
            if x.dtype != a.weight.dtype:
                x = x.to(a.weight.dtype)
            result = result + b(a(self.dropout(x))) * self.scaling
        return result.to(dtype)


class LoRAGLU(nn.Module):
    """A SwiGLU block whose three projections carry LoRA adapters."""

    def __init__(self, hidden, inter, **lora):
        super().__init__()
        self.gate = LoRALinear(hidden, inter, **lora)
        self.up = LoRALinear(hidden, inter, **lora)
        self.down = LoRALinear(inter, hidden, **lora)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Stack(nn.Module):
    """Pre-norm residual SwiGLU layers, optionally each under torch.utils.checkpoint (as HF
    gradient checkpointing wraps a decoder layer)."""

    def __init__(self, layers=2, checkpointed=False, hidden=32, inter=96):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.mlps = nn.ModuleList(GLU(hidden, inter) for _ in range(layers))
        self.checkpointed = checkpointed

    def layer(self, i, x):
        return x + self.mlps[i](self.norms[i](x))

    def forward(self, x):
        for i in range(len(self.mlps)):
            if self.checkpointed:
                x = torch.utils.checkpoint.checkpoint(self.layer, i, x, use_reentrant=False)
            else:
                x = self.layer(i, x)
        return x
