"""LDMBert: the text encoder of the LDM text-to-image model (ldm-text2im-large-256).

Rombach et al. 2022, arXiv:2112.10752, Sec. 4.3.1 ("we employ the BERT-tokenizer and implement tau_theta
as a transformer") and the appendix on implementations of tau_theta (an *unmasked* transformer): the prompt
becomes token embeddings tau_theta(y) (B, 77, 1280), trained from scratch jointly with the UNet, which reads
them through cross-attention, Sec. 3.3 (K = W_K tau_theta(y), V = W_V tau_theta(y)), trained with Eq. 3.
The transformer is a plain pre-norm encoder (Vaswani et al. 2017, arXiv:1706.03762, scaled dot-product
attention Eq. 1; LayerNorm before each sub-layer, as in GPT-2) with learned absolute position embeddings.
Despite the name it is not a pre-trained BERT: only BERT's tokenizer is borrowed.

Relation to the original code. CompVis `ldm.modules.encoders.modules.BERTEmbedder(n_embed=1280, n_layer=32)`
wraps lucidrains' x-transformers `TransformerWrapper(num_tokens=30522, max_seq_len=77,
attn_layers=Encoder(dim=1280, depth=32))` called with `return_embeddings=True`. With x-transformers'
defaults (8 heads of 64 channels, ff_mult 4, exact GELU, pre-norm LayerNorm, no attention mask) that is
exactly the network below. x-transformers names the weights `token_emb`, `pos_emb.emb`,
`attn_layers.layers.{2i}.1.to_q`, `...{2i+1}.1.net.0.0` (fc1), `norm`, ...; diffusers renamed them
BART-style (`embed_tokens`, `self_attn.q_proj`, `fc1`, `layer_norm`) in `LDMBertModel`, and this module
uses diffusers' names without the leading "model." (weights_tools translates the CompVis names).
The unused `to_logits` head of both (a (vocab, 1280) projection for a language-model loss that was never
used) is left out: drop `to_logits.*` keys when loading.

Note the width: n_heads * head_dim = 8 * 64 = 512 while n_embed = 1280, so q/k/v project 1280 -> 512 and
the output projection 512 -> 1280. Padding tokens are attended to (the original passes no mask), so the
embedding of a prompt depends on how many [PAD] tokens follow it: always pad to 77.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LDMBertConfig:
    """Defaults: ldm-text2im-large-256 (CompVis BERTEmbedder n_embed 1280, n_layer 32)."""

    vocab_size: int = 30522  # bert-base-uncased WordPiece vocabulary
    max_seq_len: int = 77  # learned positions 0..76; prompts are padded/truncated to 77 tokens
    n_embed: int = 1280  # model width (= UNet context_dim)
    n_layer: int = 32
    n_heads: int = 8
    head_dim: int = 64  # attention inner width n_heads * head_dim = 512 != n_embed
    ffn_dim: int = 5120  # 4 * n_embed


class SelfAttention(nn.Module):
    """Multi-head self-attention, Vaswani et al. Eq. 1: softmax(Q K^T / sqrt(d_head)) V, per head."""

    def __init__(self, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)  # no bias on q/k/v, as x-transformers
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim)  # with bias

    def forward(self, x: Tensor) -> Tensor:
        # 1/sqrt(head_dim) (not 1/sqrt(n_embed)) is applied to q before the product, as diffusers does.
        q = self.q_proj(x) * self.head_dim**-0.5  # (B, L, dim) -> (B, L, heads*head_dim)
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (y.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) for y in (q, k, v))
        # q, k, v: (B, heads, L, head_dim)
        if x.dtype == torch.float16:
            # float16 tops out at 65504: logits q.k (a sum over head_dim products) stored in float16 can
            # overflow to inf, and softmax then gives NaN (inf - inf). The attention is tiny (77 x 77 per
            # head), so it runs in float32 and only its result is cast back. (diffusers keeps float16
            # attention and instead clamps an inf in each layer's float16 output.)
            q, k, v = q.float(), k.float(), v.float()
        # Contiguous heads and the products written out, as diffusers: the memory layout picks the matmul
        # kernel, and a fused attention kernel sums in another order (~1e-6 from diffusers, not 0).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        weights = F.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, heads, L, L): each query over all keys
        out = (weights @ v).to(x.dtype).transpose(1, 2).flatten(2)  # (B, L, heads*head_dim)
        return self.out_proj(out)  # (B, L, dim)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, ffn_dim: int):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim)  # eps 1e-5 (torch default, as diffusers)
        self.self_attn = SelfAttention(dim, n_heads, head_dim)
        self.final_layer_norm = nn.LayerNorm(dim)  # the norm before the FFN, despite its name
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        h = F.gelu(self.fc1(self.final_layer_norm(x)))  # exact (erf) GELU, not the tanh approximation
        return x + self.fc2(h)  # (B, L, dim)


class LDMBert(nn.Module):
    """Token ids (B, L) -> text embeddings tau_theta(y) (B, L, n_embed) for the UNet's cross-attention."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.n_embed)  # learned, positions 0..L-1
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.n_embed, cfg.n_heads, cfg.head_dim, cfg.ffn_dim) for _ in range(cfg.n_layer)
        )
        self.layer_norm = nn.LayerNorm(cfg.n_embed)  # final norm (pre-norm stacks need one at the end)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"LDMBert expects integer token ids of shape (B, L), got {tuple(ids.shape)} {ids.dtype}; "
                "make them with ldm_mini.tokenizer.Tokenizer (which returns a LongTensor (B, 77))."
            )
        b, n = ids.shape
        if n > self.config.max_seq_len:
            raise ValueError(
                f"LDMBert has {self.config.max_seq_len} learned positions but got {n} tokens; "
                f"truncate the prompt to {self.config.max_seq_len} tokens (the Tokenizer does this)."
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            lo, hi = int(ids.min()), int(ids.max())
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]; "
                "the tokenizer's vocabulary does not fit this model's vocab_size."
            )
        pos = torch.arange(n, device=ids.device)
        x = self.embed_tokens(ids) + self.embed_positions(pos)  # (B, L, n_embed) + (L, n_embed)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)  # (B, L, n_embed)
