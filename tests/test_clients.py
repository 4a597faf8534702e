"""Real clients: Hugging Face Trainer and accelerate drive a LoRA model compiled with the
backend by name ("mst"); their losses and weights equal eager training."""

import pytest
import torch
from torch._dynamo.utils import counters

import mst_fx

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

SEQ, BATCH, VOCAB = 1024, 2, 512  # 2048 tokens per step: two chunks at min_chunk_tokens=1024


def _lora_llama():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176, max_position_embeddings=SEQ))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random so that adapters matter at once
            torch.nn.init.normal_(p, std=0.05)
    return model


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=6):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, model, **compile_args):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=3, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, **compile_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = getattr(model, "_orig_mod", model)  # compiled by the caller
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_lora_with_mst_equals_eager(tmp_path):
    """The reference run is Trainer's eager one. Trainer cannot take "mst" as
    torch_compile_backend (test below), so the mst run hands Trainer the model compiled by
    name, as the README shows."""
    torch._dynamo.reset()
    ref_losses, ref_weights = _train(tmp_path / "ref", _lora_llama())
    torch._dynamo.reset()
    counters.clear()
    model = _lora_llama()
    losses, weights = _train(tmp_path / "mst", torch.compile(model, backend="mst"))
    assert len(losses) == 3
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert counters["mst_fx"]["mlp"] == 2 and counters["mst_fx"]["lm_head"] == 1, dict(counters["mst_fx"])
    ids = Tokens().ids[:BATCH]
    report = mst_fx.explain(model, input_ids=ids, labels=ids)
    chunked = [r for r in report.regions if r.kind != "attention"]
    assert sorted(r.kind for r in chunked) == ["lm_head", "mlp", "mlp"], str(report)
    assert all("LoRA r=4" in r.detail for r in chunked), str(report)


def test_trainer_refuses_a_backend_string_it_does_not_list(tmp_path):
    """Tripwire: Trainer passes torch_compile_backend to accelerate's TorchDynamoPlugin,
    whose DynamoBackend enum lists fixed names only (accelerate 1.15). When this starts to
    pass through, the Trainer test above and the README should use the string instead."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          torch_compile=True, torch_compile_backend="mst")
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        transformers.Trainer(model=_lora_llama(), args=args, train_dataset=Tokens())


def test_accelerate_loop_with_compiled_model_equals_eager():
    """A plain accelerate training loop (prepare, backward through the Accelerator)."""
    def run(compile_):
        torch._dynamo.reset()
        model = _lora_llama()
        if compile_:
            model = torch.compile(model, backend="mst", options={"chunks": 2})
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        ids = Tokens()[0]["input_ids"][None, :256]
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    counters.clear()
    got = run(True)
    assert counters["mst_fx"]["mlp"] == 2 and counters["mst_fx"]["lm_head"] == 1, dict(counters["mst_fx"])
    torch.testing.assert_close(got, run(False), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Real runs: varying lengths in one process (torch.compile's default dynamic=None).
# ---------------------------------------------------------------------------------------

def _llama(layers=2):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176))


def _varying_rows(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


class Varying(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _by_graph(backend):
    """Applied rewrites of the static graphs and of the symbolic ones, and their skips."""
    out = {}
    for symbolic in (False, True):
        reports = [r for r in backend.reports if bool(r.symbols) == symbolic]
        out[symbolic] = (sorted((x.kind, x.where) for r in reports for x in r.regions if x.applied),
                         sorted(x.reason for r in reports for x in r.skipped if "min_chunk_tokens" not in x.reason))
    return out


def _run_args(out) -> dict:
    """The training arguments both trainers' runs share (CPU, seeded, no saving or logging out)."""
    return dict(output_dir=str(out), use_cpu=True, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)


def _losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_on_varying_lengths_compiles_twice_and_keeps_every_rewrite(tmp_path):
    """HF Trainer, one sequence a step of 300 to 700 tokens (the README recipe: the model
    compiled with the backend, handed to Trainer): losses equal eager Trainer's, two graphs
    (the first length static, then a symbolic one), every rewrite of the static graph also
    on the symbolic one."""
    rows = _varying_rows(6, 300, 700)

    def train(model, out):
        args = transformers.TrainingArguments(max_steps=len(rows), per_device_train_batch_size=1,
                                              remove_unused_columns=False, **_run_args(out))
        return _losses(transformers.Trainer(model=model, args=args, train_dataset=Varying(rows)))

    torch._dynamo.reset()
    ref = train(_llama(), tmp_path / "ref")
    torch._dynamo.reset()
    counters.clear()
    backend = mst_fx.make_backend(min_chunk_tokens=128, logits="drop")
    got = train(torch.compile(_llama(), backend=backend), tmp_path / "mst")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    graphs = _by_graph(backend)
    assert graphs[True] == graphs[False], "\n".join(map(str, backend.reports))
    assert {"mlp", "lm_head"} <= {k for k, _ in graphs[True][0]}, graphs


def test_sft_trainer_padding_free_on_varying_lengths(tmp_path):
    """TRL's SFTTrainer with padding_free=True (documents of varying lengths packed into one
    row, position ids restarting at each, no attention mask): losses equal the uncompiled
    run. The MLPs are chunked on the static and the symbolic graph; TRL (1.x) replaces the
    vocabulary projection with its own chunked log-probabilities, which break the graph,
    so there is no head to rewrite; the packed-documents mask is kept on CPU (flex_attention
    is CUDA-only by default) and says so."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1")
    data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in _varying_rows(6, 150, 350)]})

    def train(model, out):
        args = trl.SFTConfig(max_steps=3, per_device_train_batch_size=2, padding_free=True, max_length=None,
                             **_run_args(out))
        return _losses(trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok))

    torch._dynamo.reset()
    ref = train(_llama(), tmp_path / "ref")
    torch._dynamo.reset()
    counters.clear()
    backend = mst_fx.make_backend(min_chunk_tokens=128, logits="drop")
    model = _llama()
    model.compile(backend=backend)  # in place: SFTTrainer patches the model's own head
    got = train(model, tmp_path / "mst")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert counters["mst_fx_symbolic"]["mlp"] == 2 and counters["mst_fx"]["mlp"] == 4, dict(counters["mst_fx"])
    skips = [s.reason for r in backend.reports for s in r.skipped if s.kind == "attention"]
    assert skips and all("flex_attention='cuda'" in s for s in skips), skips
