"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Image BxCxHxW (+ its positional encoding) and tokens BxNxC; returns both updated.

        The image may have batch 1 for B token sets: it is then shared until the first
        image-to-token attention makes it prompt-specific. Returns the tokens BxNxC and the
        image tokens Bx(HW)xC.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens to image, token MLP, image to tokens (each post-norm)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def token_self_attention(self, queries: Tensor, query_pe: Tensor) -> Tensor:
        """The block's first step: the prompt tokens attend to each other (then norm1)."""
        if self.skip_first_layer_pe:
            # The first layer replaces the tokens (they already carry their positions).
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        return self.norm1(queries)

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        queries = self.token_self_attention(queries, query_pe)
        k = keys + key_pe
        queries = self.norm2(
            queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys)
        )
        queries = self.norm3(queries + self.mlp(queries))

        attn_out = self.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
        keys = self.norm4(keys + attn_out)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of q (B or 1) x Nq x C over k, v (B or 1) x Nk x C.

        A side with batch 1 is shared by the whole batch and projected once (the image tokens
        before their first update, when no prompt carries a mask).
        """
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        batch, n = max(q.shape[0], k.shape[0]), q.shape[1]
        if k.shape[0] == 1 and batch > 1:
            # Shared keys: every query row attends independently, so fold the batch into the
            # query sequence instead of copying the keys per prompt.
            q = q.reshape(1, batch * n, -1)
        elif q.shape[0] == 1 and batch > 1:
            q = q.expand(batch, -1, -1)
        out = F.scaled_dot_product_attention(
            self._separate_heads(q), self._separate_heads(k), self._separate_heads(v)
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, self.internal_dim))
