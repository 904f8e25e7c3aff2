"""Default PerExample on third-party models (Hugging Face transformers, peft), random-init small
configs, float64, against an independent reference: an unhooked copy of the model run on one
example at a time, differentiated by autograd.

timm is not here: it requires torchvision, whose only wheel on PyPI for torch 2.13.0 is the CUDA
build, which does not load beside the CPU torch (see docs/your-model.md). The patterns timm
models use (class tokens and position tables on the model itself, layer scale, a LayerNorm
subclass that permutes) are covered by the transformers ViT/ConvNeXt below and by the pattern
cases in test_model_patterns.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pergrad

transformers = pytest.importorskip("transformers")  # in the test extra: never skipped in CI

V, T = 40, 6


def _lm_loss(out, batch):
    """Per-example loss of a causal LM: mean next-token cross-entropy over its tokens."""
    logits = out.logits[:, :-1]
    target = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def _seq2seq_loss(out, batch):
    return F.cross_entropy(out.logits.transpose(1, 2), batch["labels_"], reduction="none").mean(1)


def _cls_loss(out, batch):
    return F.cross_entropy(out.logits, batch["labels_"], reduction="none")


def _with_token_0(ids):
    """Token ids as real data has them: token 0 (BART's and T5's BOS/padding, BERT's [PAD])
    first and again at position 3, and a repeated token."""
    ids[:, 0] = ids[:, 3] = 0
    ids[:, 2] = ids[:, 1]
    return ids


def _text(n, labels=None, seq2seq=False, mask=False):
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": _with_token_0(torch.randint(0, V, (n, T), generator=g))}
    if mask:
        batch["attention_mask"] = torch.ones(n, T, dtype=torch.long)
        batch["attention_mask"][0, -2:] = 0  # example 0 is padded
    if seq2seq:
        batch["decoder_input_ids"] = _with_token_0(torch.randint(0, V, (n, T - 1), generator=g))
        batch["labels_"] = torch.randint(0, V, (n, T - 1), generator=g)
    if labels:
        batch["labels_"] = torch.randint(0, labels, (n,), generator=g)
    return batch


def _images(n, size):
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
            "labels_": torch.randint(0, 3, (n,), generator=g)}


def _small(cls, **kw):
    return lambda: getattr(transformers, cls)(**kw)


T_ = transformers
_H = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


class _Embeds(torch.nn.Module):
    """A model whose output is image embeddings (CLIP's vision tower), with ``.logits`` for the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return type("Out", (), {"logits": self.model(**kw).image_embeds})()


def _embeds_loss(out, batch):
    return out.logits.square().sum(1)

# name -> (model builder, batch builder, loss, relative tolerance and why it is not 1e-10)
MODELS = {
    "gpt2": (lambda: T_.GPT2LMHeadModel(T_.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)),
             _text, _lm_loss, 1e-10),
    "bert": (lambda: T_.BertForSequenceClassification(T_.BertConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, num_labels=3)),
             lambda n: _text(n, labels=3, mask=True), _cls_loss, 1e-10),
    "roberta": (lambda: T_.RobertaForSequenceClassification(T_.RobertaConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, num_labels=3, pad_token_id=0)),
             lambda n: _text(n, labels=3), _cls_loss, 1e-10),
    "distilbert": (lambda: T_.DistilBertForSequenceClassification(T_.DistilBertConfig(
                vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3)),
             lambda n: _text(n, labels=3, mask=True), _cls_loss, 1e-10),
    # Llama-family attention rounds its softmax through float32 on purpose: 1e-6
    "llama": (lambda: T_.LlamaForCausalLM(T_.LlamaConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, max_position_embeddings=16)),
              _text, _lm_loss, 1e-6),
    "qwen2": (lambda: T_.Qwen2ForCausalLM(T_.Qwen2Config(
                vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, max_position_embeddings=16)),
              _text, _lm_loss, 1e-6),
    "opt": (lambda: T_.OPTForCausalLM(T_.OPTConfig(
                vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                max_position_embeddings=16, word_embed_proj_dim=16)),
            _text, _lm_loss, 1e-10),
    "bart": (lambda: T_.BartForConditionalGeneration(T_.BartConfig(
                vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16)),
             lambda n: _text(n, seq2seq=True), _seq2seq_loss, 1e-10),
    # T5's RMSNorm takes its variance in float32 on purpose: 1e-6
    "t5": (lambda: T_.T5ForConditionalGeneration(T_.T5Config(
                vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)),
           lambda n: _text(n, seq2seq=True, mask=True), _seq2seq_loss, 1e-6),
    "vit": (lambda: T_.ViTForImageClassification(T_.ViTConfig(
                image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=32, num_labels=3)),
            lambda n: _images(n, 8), _cls_loss, 1e-10),
    "swin": (lambda: T_.SwinForImageClassification(T_.SwinConfig(
                image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                window_size=4, num_labels=3)),
             lambda n: _images(n, 16), _cls_loss, 1e-10),
    "clip-vision": (lambda: _Embeds(T_.CLIPVisionModelWithProjection(T_.CLIPVisionConfig(
                image_size=8, patch_size=4, num_channels=3, projection_dim=8, **_H))),
                    lambda n: _images(n, 8), _embeds_loss, 1e-10),
    "falcon": (lambda: T_.FalconForCausalLM(T_.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2)),
               _text, _lm_loss, 1e-10),
    "gemma": (lambda: T_.GemmaForCausalLM(T_.GemmaConfig(vocab_size=V, num_key_value_heads=1, head_dim=8,
                                                        max_position_embeddings=16, **_H)),
              _text, _lm_loss, 1e-6),
    "albert": (lambda: T_.AlbertForSequenceClassification(T_.AlbertConfig(
                vocab_size=V, embedding_size=8, max_position_embeddings=16, num_labels=3, **_H)),
               lambda n: _text(n, labels=3), _cls_loss, 1e-10),
    "deberta-v2": (lambda: T_.DebertaV2ForSequenceClassification(T_.DebertaV2Config(
                vocab_size=V, max_position_embeddings=16, num_labels=3, **_H)),
                   lambda n: _text(n, labels=3, mask=True), _cls_loss, 1e-10),
    "convnext": (lambda: T_.ConvNextForImageClassification(T_.ConvNextConfig(
                num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
                 lambda n: _images(n, 16), _cls_loss, 1e-10),
}


def _inputs(batch):
    return {k: v for k, v in batch.items() if not k.endswith("_")}


def _one(batch, j):
    return {k: v[j : j + 1] for k, v in batch.items()}


def reference(model, batch, loss_fn, n):
    """{name: (n, *p.shape)}: autograd on an unhooked copy, one example at a time."""
    copy_ = copy.deepcopy(model)
    names = [k for k, p in copy_.named_parameters() if p.requires_grad]
    params = [p for p in copy_.parameters() if p.requires_grad]
    rows = []
    for j in range(n):
        one = _one(batch, j)
        copy_.zero_grad(set_to_none=True)
        loss_fn(copy_(**_inputs(one)), one)[0].backward()  # plain backward: reentrant checkpointing allows no other
        rows.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(names)}


def _check(model, batch, loss_fn, tol, n=3, **kwargs):
    want = reference(model, batch, loss_fn, n)
    with pergrad.PerExample(model, grads=True, second_moment=True, **kwargs) as pe:
        result = pe.backward(loss_fn(model(**_inputs(batch)), batch))
    # without gradients (the cheaper forms) and without the first-backward check: right on their own
    with pergrad.PerExample(model, second_moment=True, verify=False, **kwargs) as pe:
        cheap = pe.backward(loss_fn(model(**_inputs(batch)), batch))
        norms, paths = cheap.param_sq_norms, pe.paths
    # errors relative to the whole model's scale (some gradients are exactly zero in theory,
    # as the key bias's under softmax, and only rounding noise in practice)
    scale = max(w.abs().max() for w in want.values())
    total_sq = sum(w.reshape(n, -1).square().sum(1) for w in want.values())  # (n,)
    for name, w in want.items():
        assert (result.grads[name] - w).abs().max() <= tol * scale, name
        assert ((norms[name] - w.reshape(n, -1).square().sum(1)).abs() <= tol * total_sq).all(), name
        for second in (result.second_moment[name], cheap.second_moment[name]):
            assert (second - w.square().sum(0)).abs().max() <= tol * scale**2 * n, name
    return paths


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_per_example_matches_autograd_one_example_at_a_time(name):
    build, make_batch, loss_fn, tol = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    paths = _check(model, make_batch(3), loss_fn, tol)
    assert not any(p.startswith("torch.func") for p in paths.values()), paths


def _paths_after_one_step(name: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The named model, and ``pe.paths`` once a step of it (default PerExample) has run."""
    build, make_batch, loss_fn, _ = MODELS[name]
    model = build().double().eval()
    batch = make_batch(2)
    with pergrad.PerExample(model) as pe:
        pe.backward(loss_fn(model(**_inputs(batch)), batch))
    return model, pe.paths


def test_t5_relative_bias_looked_up_by_positions_only_takes_the_direct_path():
    _, paths = _paths_after_one_step("t5")
    path = paths["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert path.startswith("rule EmbeddingRule; direct (") and path.endswith(") for calls without an example axis")


def test_paths_say_which_modules_take_which_path():
    model, paths = _paths_after_one_step("gpt2")
    assert paths["transformer.h.0.attn.c_attn"] == "direct (addmm)"  # GPT-2's Conv1D
    assert paths["transformer.wte"] == "rule EmbeddingRule"
    assert paths["transformer.h.0.ln_1"] == "rule LayerNormRule"
    assert set(paths) == {k for k, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}


def test_lora_adapters_on_a_frozen_base():
    peft = pytest.importorskip("peft")
    build, make_batch, loss_fn, tol = MODELS["llama"]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(build(), config).double().eval()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    _check(model, make_batch(3), loss_fn, tol)


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing(reentrant):
    build, make_batch, loss_fn, tol = MODELS["gpt2"]
    torch.manual_seed(0)
    model = T_.GPT2LMHeadModel(T_.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})  # was gradient_checkpointing_enable
    model.train()
    _check(model, make_batch(3), loss_fn, tol)
