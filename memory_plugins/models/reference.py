"""A small pre-LN causal decoder with rotary positions whose attention follows ``MemoryAttention``.

It is the backbone of our examples and the reference for custom decoders: ``Attention.forward`` shows
the whole integration (one call to ``memory_hook``, prepend its source vectors, mix its per-head
result before the output projection, add its output).

Notation: b batch, n segment length, m memory length, h heads, d head dim, e model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import check_float, check_int
from ..interface import MemoryRead
from ..splice import add_output, memory_key_mask, mix_heads


@dataclass
class DecoderConfig:
    vocab_size: int = 256
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    rotary_base: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "ff_mult"):
            check_int(self, name, 1)
        check_float(self, "rotary_base", 1.0, low_open=True)
        if self.dim % (2 * self.heads):
            raise ValueError(f"DecoderConfig.dim must be a multiple of 2*heads={2 * self.heads}, got {self.dim}")


def rotate(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary embedding of ``x`` (b, h, n, d) at integer positions ``pos`` (n,) or per sample (b, n)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = pos.to(torch.float32)[..., None] * inv_freq  # (n, d/2) or (b, n, d/2)
    if ang.dim() == 3:
        ang = ang[:, None]  # (b, 1, n, d/2) shared by the heads
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)  # (…, n, d/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (b, h, n, d/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (b, h, n, d/2, 2)
    return out.flatten(-2)  # (b, h, n, d)


class Attention(nn.Module):
    """Causal multi-head self-attention (SDPA) that any memory backend can extend."""

    def __init__(self, dim: int, heads: int, rotary_base: float) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = dim, heads, dim // heads
        self.rotary_base = rotary_base
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.memory_hook = None  # set by memory_plugins.wrap()

    def project_q(self, x: Tensor) -> Tensor:
        return rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (b, h, n, d)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = rearrange(self.to_kv(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        return k, v  # (b, h, m, d) each

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``x`` (b, n, e); ``attn_mask`` (n, n) bool, True = may attend (default: causal); ``mask`` (b, n)
        bool, True = real token (padding is neither attended to nor written to memory). With a
        ``mask``, rotary positions count real tokens only, so left padding shifts nothing."""
        b, n, _ = x.shape
        q = self.project_q(x)  # (b, h, n, d)
        read: MemoryRead | None = self.memory_hook(x, q, mask) if self.memory_hook is not None else None
        k, v = self.project_kv(x)  # (b, h, n, d)
        m = 0
        if read is not None and read.kv_source is not None:
            km, vm = self.project_kv(read.kv_source.to(x.dtype))  # (b, h, m, d)
            m = km.shape[2]
            k, v = torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)  # (b, h, m + n, d)
        if mask is None:
            pos = torch.arange(-m, n, device=x.device)  # (m + n,) memory at -m … -1, segment at 0 … n-1
            q, k = rotate(q, pos[m:], self.rotary_base), rotate(k, pos, self.rotary_base)
        else:  # real tokens at 0, 1, … whatever padding precedes them; memory just before
            seg = mask.long().cumsum(dim=1) - 1  # (b, n)
            pos = torch.cat([torch.arange(-m, 0, device=x.device).expand(b, m), seg], dim=1)  # (b, m + n)
            q, k = rotate(q, pos[:, m:], self.rotary_base), rotate(k, pos, self.rotary_base)
        if m == 0 and attn_mask is None and mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, n, d)
        else:
            allowed = torch.ones(n, m + n, dtype=torch.bool, device=x.device).tril(m)  # (n, m + n) causal
            if attn_mask is not None:
                allowed[:, m:] &= attn_mask
            allowed = allowed.expand(b, n, m + n)  # (b, n, m + n)
            keys = memory_key_mask(read.kv_mask if m else None, mask, b, m, n, x.device)  # (b, m + n)
            allowed = allowed & keys[:, None, :]  # (b, n, m + n)
            if mask is not None:  # a padded query keeps its own key, so that no row is empty (no NaN)
                own = torch.zeros(n, m + n, dtype=torch.bool, device=x.device)  # (n, m + n)
                own[:, m:] = torch.eye(n, dtype=torch.bool, device=x.device)
                allowed = allowed | own
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (b, h, n, d)
        out = mix_heads(out, read, mask)  # (b, h, n, d) per-head memory result, gated (kNN memory)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (b, n, e)
        return add_output(out, read)  # Eq. 12: Z = Z_T + Z_LTM


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.rotary_base)
        self.ff = nn.Sequential(nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim), nn.GELU(), nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, mask)  # (b, n, e)
        return x + self.ff(self.norm2(x))  # (b, n, e)


class ReferenceDecoder(nn.Module):
    """Token ids (b, n) → logits (b, n, V). ``attn_mask`` (n, n) bool overrides the causal mask;
    ``mask`` (b, n) bool marks real tokens (False: padding, left or right)."""

    def __init__(self, cfg: DecoderConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else DecoderConfig(**kwargs)  # type: ignore[arg-type]
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool):
            raise ValueError(f"ReferenceDecoder: mask must be a bool tensor shaped like tokens {tuple(tokens.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        x = self.embed(tokens)  # (b, n, e)
        for block in self.blocks:
            x = block(x, attn_mask, mask)
        return self.head(self.norm(x))  # (b, n, V)
