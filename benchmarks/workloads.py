"""The models, batches and per-example losses that the benchmarks time.

Shared by ``step_ratio.py`` (pergrad's modes against a plain step) and ``run.py`` (pergrad against
torch.func, Opacus and BackPACK). A :class:`Workload` is one model and one batch: every method timed on
a workload sees the same weights and the same inputs, and ``loss_fn(model(x), y)`` gives the
per-example losses, shape ``(n,)``.
"""

from __future__ import annotations

import os
import sys
import time

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- models ----------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """64 → 512 → 512 → 10 with ReLU: (n, 64) -> (n, 10)."""

    def __init__(self):
        super().__init__(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


class SmallCNN(nn.Module):
    """Two 3×3 convs 1 → 16 → 32 with ReLU and 2×2 max-pool, linear head: (n, 1, 28, 28) -> (n, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (n, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (n, 32, 7, 7)
        return self.head(x.flatten(1))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); (n, t, d) -> (n, t, d)."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Causal language model: tokens (n, t) -> logits (n, t, vocab)."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, hidden: int = 512, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)  # True = not attended
        x = self.embed(tokens)  # (n, t, d)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


class SDPAAttention(nn.Module):
    """Causal multi-head self-attention from four ``nn.Linear`` and
    ``F.scaled_dot_product_attention``: (n, t, d) -> (n, t, d)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape

        def split(z: Tensor) -> Tensor:  # (n, t, d) -> (n, heads, t, d / heads)
            return z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(n, t, d))


class SDPABlock(nn.Module):
    """Pre-LN block with :class:`SDPAAttention` and parameter-free LayerNorms (as in OLMo)."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = SDPAAttention(d, heads)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SDPATransformer(nn.Module):
    """Causal language model built only from Embedding and Linear layers with trainable parameters:
    tokens (n, t) -> logits (n, t, vocab)."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, hidden: int = 512, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(SDPABlock(d, heads, hidden) for _ in range(layers)))
        self.ln = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.ln(self.blocks(self.embed(tokens))))


# --- losses ----------------------------------------------------------------------------------


def classification_losses(out: Tensor, y: Tensor) -> Tensor:
    """(n, classes), (n,) -> (n,) cross-entropy per example."""
    return F.cross_entropy(out, y, reduction="none")


def next_token_losses(logits: Tensor, y: Tensor) -> Tensor:
    """(n, t, vocab), (n, t) -> (n,): each example's cross-entropy averaged over its tokens."""
    n, t, vocab = logits.shape
    return F.cross_entropy(logits.reshape(n * t, vocab), y.reshape(n * t), reduction="none").reshape(n, t).mean(1)


# --- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model, one batch, and the per-example loss: ``loss_fn(model(x), y)`` is (n,)."""

    key: str
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    @property
    def n(self) -> int:
        return self.x.shape[0]


def mlp(n: int = 256, seed: int = 0, device: str = "cpu", key: str = "mlp") -> Workload:
    torch.manual_seed(seed)
    model = MLP()
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    return Workload(key, f"MLP 64-512-512-10, n={n}", model.to(device), x.to(device), y.to(device),
                    classification_losses)


def cnn(n: int = 64, seed: int = 0, device: str = "cpu", key: str = "cnn") -> Workload:
    torch.manual_seed(seed)
    model = SmallCNN()
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    return Workload(key, f"CNN 1-16-32 28x28, n={n}", model.to(device), x.to(device), y.to(device),
                    classification_losses)


def transformer(n: int = 32, t: int = 64, seed: int = 0, device: str = "cpu", key: str = "transformer",
                sdpa: bool = False) -> Workload:
    """Two blocks, d=128, 4 heads, vocabulary 1000; next-token targets from the same random tokens."""
    torch.manual_seed(seed)
    model = SDPATransformer() if sdpa else TinyTransformer()
    tokens = torch.randint(0, 1000, (n, t + 1))  # inputs and next-token targets
    kind = "SDPA" if sdpa else "MHA"
    return Workload(key, f"Transformer 2L d128 {kind}, n={n} t={t}", model.to(device),
                    tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device),
                    next_token_losses)


class LogitsOf(nn.Module):
    """A Hugging Face model called on one tensor, returning its logits."""

    def __init__(self, model: nn.Module, keyword: str):
        super().__init__()
        self.model, self.keyword = model, keyword

    def forward(self, x: Tensor) -> Tensor:
        return self.model(**{self.keyword: x}).logits


def llama(n: int = 16, t: int = 64, seed: int = 0, device: str = "cpu", key: str = "llama", layers: int = 2,
          d: int = 128, heads: int = 4, kv_heads: int = 2, hidden: int = 344) -> Workload:
    """transformers' LlamaForCausalLM, random init: ``layers`` layers (2), width ``d`` (128), ``heads``
    heads (4) of which ``kv_heads`` key-value heads (2), SwiGLU ``hidden`` (344), RMSNorm, RoPE,
    vocabulary 1000, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=d, intermediate_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=t,
                         attn_implementation="sdpa")
    model = LogitsOf(LlamaForCausalLM(config), "input_ids")
    tokens = torch.randint(0, 1000, (n, t + 1))
    return Workload(key, f"Llama (transformers) {layers}L d{d}, n={n} t={t}", model.to(device),
                    tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device),
                    next_token_losses)


def gpt2_tied(n: int = 8, t: int = 128, layers: int = 2, seed: int = 0, device: str = "cpu",
              key: str = "gpt2-tied", d: int = 768, heads: int = 12, vocab: int = 50257) -> Workload:
    """transformers' GPT2LMHeadModel, by default at GPT-2 small's width, random init: d=768, 12 heads,
    MLP 4d, vocabulary 50257, ``layers`` blocks (GPT-2 small has 12), no dropout, SDPA attention. The
    output head's weight IS the token embedding's (``lm_head.weight is transformer.wte.weight``, GPT-2's
    default), so its per-example gradient is the sum of two modules' contributions; an engine that
    materialises it builds (n, vocab, d) floats: n · 154 MB at GPT-2's size.

    The tokens include token 0 (every 16th position) and tokens repeated within and across
    examples (token 0, and vocab - 1 at every 16th position from the 8th)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=t, n_embd=d, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="sdpa")
    lm = GPT2LMHeadModel(config)
    if lm.lm_head.weight is not lm.transformer.wte.weight:
        raise RuntimeError("GPT2LMHeadModel did not tie lm_head.weight to transformer.wte.weight")
    tokens = torch.randint(0, vocab, (n, t + 1))
    tokens[:, ::16] = 0
    tokens[:, 8::16] = vocab - 1
    return Workload(key, f"GPT-2 (transformers) {layers}L d{d} V{vocab} tied, n={n} t={t}",
                    LogitsOf(lm, "input_ids").to(device), tokens[:, :-1].contiguous().to(device),
                    tokens[:, 1:].contiguous().to(device), next_token_losses)


def vit(n: int = 32, seed: int = 0, device: str = "cpu", key: str = "vit") -> Workload:
    """transformers' ViTForImageClassification, random init: 32x32 images, patches 4x4 (64
    tokens and a class token), 2 layers, d=128, 4 heads, MLP 512, 10 classes."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=128, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=512, num_labels=10, attn_implementation="sdpa")
    model = LogitsOf(ViTForImageClassification(config), "pixel_values")
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    return Workload(key, f"ViT (transformers) 2L d128, 32x32/4, n={n}", model.to(device), x.to(device),
                    y.to(device), classification_losses)


def seconds_per_step(step: Callable[[], object], steps: int) -> float:
    """Seconds per call over ``steps`` consecutive calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


#: glibc malloc settings of a timing process: freed memory is kept for reuse, never handed back to
#: the system. With the defaults, whether a large block is given back (and page-faulted in again,
#: zeroed, on the next step: hundreds of faults per MLP step) depends on the heap's history, and
#: the same step's time jumps by 30-50% between processes, for the plain step and every tool alike.
#: PyTorch's CPU tuning guides give the same advice through jemalloc or tcmalloc.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 32) - 1)}


def steady_allocator(system_malloc: bool) -> None:
    """Restart this script under :data:`STEADY_MALLOC` (glibc reads it at start), once; a no-op with
    ``system_malloc``, when already set, or off Linux."""
    if system_malloc or not sys.platform.startswith("linux") or all(os.environ.get(k) for k in STEADY_MALLOC):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})


def allocator_note() -> str:
    """How this process's allocator was set, for a results header."""
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return "glibc malloc with freed memory kept for reuse (" + ", ".join(f"{k}={v}" for k, v in STEADY_MALLOC.items()) + ")"
    return "the system's malloc defaults"
