"""The mask decoder for many point prompts on one image, computed as shared work plus small
per-prompt terms. Same outputs as ``MaskDecoder`` (up to float rounding), several times less work.

Why it is exact. Before the first image-to-token attention, the image tokens are the same for
every prompt. That attention adds to each image token a mix of the prompt tokens' values: per
token, a combination of at most T*H vectors (T prompt tokens x H heads, 7 x 8 = 56 of 256
channels). LayerNorm is a per-token affine map. So the image tokens of prompt b stay, exactly,

    tokens[b, n] = scale[b, n] * shared[n] + coeffs[b, n] @ basis[b] + offset

with ``shared`` (N x C) common to all prompts and rank(basis) growing by T*H per layer. A linear
map of the tokens is then ``scale * (shared @ W.T)`` (computed once per image) plus
``coeffs @ (basis @ W.T)`` (rank-sized), and a LayerNorm needs only each token's mean and
variance, which follow from inner products of those pieces. Nothing N x C is built per prompt
until a mask is wanted; masks are then made only for the prompts that ask for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .mask_decoder import MaskDecoder
from .transformer import Attention, TwoWayAttentionBlock

# Prompts per group when making masks (bounds the size of the upscaled maps).
MASK_GROUP = 8


class MaskState(NamedTuple):
    """The decoded prompts' state that masks are made from (``ManyPromptDecoder.mask_state``):
    mask tokens and image tokens in low-rank form, with the first upscaling's shared pieces.
    Plain tensors, so a graph can hand them to another (decoder_many*.onnx)."""

    mask_tokens: torch.Tensor  # B x M x C
    coeffs: torch.Tensor  # B x r x N
    basis: torch.Tensor  # B x r x C
    scale: torch.Tensor  # B x N
    shared: torch.Tensor  # N x 4C/4: the shared tokens through the first upscaling
    constant: torch.Tensor  # 4C/4: the offset through it, plus its bias


@dataclass
class HeadRows:
    """Basis rows made by an attention update: row (h, t) is (out_proj_h @ value[t, h]) * gamma,
    plus ``corrections`` (per-row scalars times fixed vectors) that later LayerNorms add.

    Knowing this factorisation, the rows' inner products with the shared tokens cost a
    d-sized dot per row instead of a C-sized one (see ``LowRankTokens.layer_norm``).
    """

    start: int
    values: torch.Tensor  # B x T x H x d
    w_out: torch.Tensor  # C x H x d
    gamma: torch.Tensor  # C, product of the LayerNorm scales applied since
    corrections: list[tuple[torch.Tensor, torch.Tensor]]  # (B x rows, C)

    @property
    def stop(self) -> int:
        return self.start + self.values.shape[1] * self.values.shape[2]

    def dots(self, shared_c: torch.Tensor, cached) -> torch.Tensor:
        """Each row's inner product with each centred shared token: B x rows x N.

        ``cached(key, fn)`` memoises the prompt-independent products across batches.
        """
        batch, t, heads, d = self.values.shape
        z = cached(
            ("z", self.start),
            lambda: ((shared_c * self.gamma) @ self.w_out.flatten(1)).view(-1, heads, d),
        )  # N x H x d
        # Per head, all prompts' values at once: (B*T x d) @ (d x N). A matmul, not an einsum:
        # ONNX Runtime's Einsum kernel is slow.
        values = self.values.permute(2, 0, 1, 3).reshape(heads, batch * t, d)
        out = (values @ z.permute(1, 2, 0)).view(heads, batch, t, -1).transpose(0, 1)
        out = out.flatten(1, 2)
        for i, (scalars, vector) in enumerate(self.corrections):
            corr = cached(("corr", self.start, i), lambda v=vector: shared_c @ v)
            out += scalars[..., None] * corr
        return out

    def normalized(self, row_means: torch.Tensor, gamma: torch.Tensor) -> HeadRows:
        """After a LayerNorm: rows become (row - mean) * gamma."""
        corrections = [(s, v * gamma) for s, v in self.corrections] + [(-row_means, gamma)]
        return HeadRows(self.start, self.values, self.w_out, self.gamma * gamma, corrections)

    def select(self, rows: torch.Tensor) -> HeadRows:
        corrections = [(s[rows], v) for s, v in self.corrections]
        return HeadRows(self.start, self.values[rows], self.w_out, self.gamma, corrections)


@dataclass
class LowRankTokens:
    """B x N x C image tokens as ``scale * shared + coeffs^T @ basis + offset`` (see module doc).

    ``coeffs`` is stored r x N per prompt (token index last), which keeps the softmax over the
    few prompt tokens and the per-token scalings on contiguous rows. ``head_rows`` factorise
    the basis rows that attention updates made; the other rows are fixed vectors, the same for
    every prompt.
    """

    shared: torch.Tensor  # N x C, common to all prompts
    scale: torch.Tensor  # B x N (or 1 x N)
    coeffs: torch.Tensor  # B x r x N
    basis: torch.Tensor  # B x r x C
    offset: torch.Tensor  # C
    head_rows: list[HeadRows]
    cache: dict  # prompt-independent products, shared across batches of one image
    stage: int = 0  # LayerNorms applied so far
    unit_scale: bool = False  # scale is all ones (before the first LayerNorm)

    @property
    def rank(self) -> int:
        """Rows of the basis (a Python int: the same for every prompt)."""
        return self.coeffs.shape[1]

    def cached(self, key, compute):
        """Memoise a product that depends only on the image and the stage, not the prompts."""
        full_key = (self.stage, *key)
        if full_key not in self.cache:
            self.cache[full_key] = compute()
        return self.cache[full_key]

    def scores(
        self, queries: torch.Tensor, proj: torch.nn.Linear, extra: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-head dot products of queries (B x H x T x d) with ``proj`` of every token
        (plus ``extra``, N x out, e.g. the positional encoding's projection): B x H x T x N.

        Never builds the projected tokens: q . (W_h x + b_h) = (W_h^T q) . x, and x is the
        low-rank sum, so the work is per-head d-sized dots with the shared tokens' projection
        and rank-sized products with the coefficients.
        """
        batch, heads, t, d = queries.shape
        weight = proj.weight.view(heads, d, -1)  # H x d x C
        reduced = (queries @ weight).flatten(1, 2)  # B x HT x C
        bias_part = (queries * proj.bias.view(heads, 1, d)).sum(-1).flatten(1)  # B x HT
        constant = reduced @ self.offset + bias_part
        n = self.shared.shape[0]
        q_heads = queries.transpose(0, 1).reshape(heads, batch * t, d)  # H x B*T x d
        if self.unit_scale and not self.rank and extra is not None:
            # The first attentions: every prompt sees the same keys, one product per head.
            keys = self.cached(
                ("keys", id(proj)),
                lambda: (self.shared @ proj.weight.T + extra).T.reshape(heads, d, -1),
            )  # H x d x N
            out = (q_heads @ keys).view(heads, batch, t, n).transpose(0, 1)
            return out + constant.view(batch, heads, t, 1)
        if self.rank:
            out = torch.baddbmm(
                constant[..., None], reduced @ self.basis.transpose(1, 2), self.coeffs
            )
        else:
            out = constant[..., None].expand(batch, heads * t, n).contiguous()
        out = out.view(batch, heads, t, n)  # low-rank part, B x H x T x N
        # Shared part: per head, q . (W_h shared[n]) scaled per token; and the extra term.
        shared = self.cached(
            ("scores", id(proj)), lambda: (self.shared @ proj.weight.T).T.reshape(heads, d, -1)
        )  # H x d x N
        shared_part = (q_heads @ shared).view(heads, batch, t, -1).transpose(0, 1)
        out.addcmul_(shared_part, self.scale[:, None, None, :])
        if extra is not None:
            extra_part = q_heads @ extra.T.reshape(heads, d, -1)  # H x B*T x N
            out += extra_part.view(heads, batch, t, -1).transpose(0, 1)
        return out

    def weighted_sum(self, probs: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
        """sum_n probs[n] * proj(token n) per head, for probs (B x H x T x N) summing to 1
        over n: B x H x T x d."""
        batch, heads, t, n = probs.shape
        d = proj.out_features // heads
        shared = self.cached(
            ("values", id(proj)),
            lambda: (self.shared @ proj.weight.T).view(n, heads, d).transpose(0, 1),
        )  # H x N x d
        scaled = probs if self.unit_scale else probs * self.scale[:, None, None, :]
        scaled = scaled.transpose(0, 1).reshape(heads, batch * t, n)
        out = (scaled @ shared).view(heads, batch, t, d).transpose(0, 1)  # B x H x T x d
        if self.rank:
            mixed = probs.flatten(1, 2) @ self.coeffs.transpose(1, 2)  # B x HT x r
            projected = (self.basis @ proj.weight.T).view(batch, -1, heads, d).transpose(1, 2)
            out = out + mixed.view(batch, heads, t, -1) @ projected  # B x H x T x d
        return out + (proj.weight @ self.offset + proj.bias).view(heads, d)[:, None, :]

    def add_heads(
        self, coeffs: torch.Tensor, values: torch.Tensor, w_out: torch.Tensor, offset: torch.Tensor
    ) -> LowRankTokens:
        """Add an attention update: coeffs (B x H*T x N) over rows out_proj_h @ values[t, h]."""
        rows = HeadRows(self.rank, values, w_out, torch.ones_like(offset), [])
        basis = (values.transpose(1, 2) @ w_out.permute(1, 2, 0)).flatten(1, 2)  # B x HT x C
        if self.rank:
            coeffs = torch.cat([self.coeffs, coeffs], dim=1)
            basis = torch.cat([self.basis, basis], dim=1)
        return LowRankTokens(
            self.shared,
            self.scale,
            coeffs,
            basis,
            self.offset + offset,
            [*self.head_rows, rows],
            self.cache,
            self.stage,
            self.unit_scale,
        )

    def layer_norm(self, norm: torch.nn.LayerNorm) -> LowRankTokens:
        """LayerNorm over channels, kept in low-rank form (exact)."""
        channels = self.shared.shape[-1]
        # Centre every piece; the token's mean is the sum of the pieces' means.
        shared_c = self.cached(
            ("centred",), lambda: self.shared - self.shared.mean(-1, keepdim=True)
        )
        row_means = self.basis.mean(-1)  # B x r
        basis_c = self.basis - row_means[..., None]
        offset_c = self.offset - self.offset.mean()
        scale, coeffs = self.scale, self.coeffs
        # |token - mean|^2 = scale^2 |s|^2 + |o|^2 + 2 scale s.o
        #                    + sum_k c_k [(G c)_k + 2 scale (s.b_k) + 2 (b_k.o)]
        # Summed over the rows part by part (each part's B x rows x N terms in place on one
        # fresh buffer): the B x r x N terms are the largest tensors here.
        gram = basis_c @ basis_c.transpose(1, 2)  # B x r x r
        with_offset = 2 * (basis_c @ offset_c)  # B x r
        var = (
            scale * scale * self.cached(("sq",), lambda: (shared_c * shared_c).sum(-1))
            + offset_c @ offset_c
            + 2 * scale * self.cached(("offset",), lambda: shared_c @ offset_c)
        )
        for start, stop, dots in self._shared_dots(shared_c):
            per_row = torch.mul(dots, 2 * scale[:, None, :])  # B x rows x N
            per_row.add_(with_offset[:, start:stop, None])
            per_row.baddbmm_(gram[:, start:stop], coeffs)
            var = var + per_row.mul_(coeffs[:, start:stop]).sum(1)
        var = var / channels
        inv_std = torch.rsqrt(var + norm.eps)  # B x N
        gamma = norm.weight
        batch = coeffs.shape[0]
        head_rows = [
            rows.normalized(row_means[:, rows.start : rows.stop], gamma) for rows in self.head_rows
        ]
        new_coeffs = scaled_rows(coeffs, inv_std)
        return LowRankTokens(
            self.cached(("normed",), lambda: shared_c * gamma),
            scale * inv_std,
            new_coeffs,
            torch.cat([basis_c * gamma, (offset_c * gamma).expand(batch, 1, channels)], dim=1),
            norm.bias,
            head_rows,
            self.cache,
            self.stage + 1,
        )

    def _shared_dots(self, shared_c: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """basis rows . centred shared tokens, in parts of rows (start, stop, B x rows x N),
        rows' means aside (they do not matter here)."""
        batch, r = self.basis.shape[:2]

        def fixed(start: int, stop: int) -> tuple[int, int, torch.Tensor]:
            # Rows no attention made are fixed vectors, the same for every prompt.
            dots = self.cached(("fixed", start), lambda: self.basis[0, start:stop] @ shared_c.T)
            return start, stop, dots.expand(batch, -1, -1)

        parts, position = [], 0
        for rows in sorted(self.head_rows, key=lambda rows: rows.start):
            if rows.start > position:
                parts.append(fixed(position, rows.start))
            parts.append((rows.start, rows.stop, rows.dots(shared_c, self.cached)))
            position = rows.stop
        if position < r:
            parts.append(fixed(position, r))
        return parts

    def select(self, rows: torch.Tensor) -> LowRankTokens:
        scale = self.scale[rows] if self.scale.shape[0] > 1 else self.scale
        return LowRankTokens(
            self.shared,
            scale,
            self.coeffs[rows],
            self.basis[rows],
            self.offset,
            [r.select(rows) for r in self.head_rows],
            self.cache,
            self.stage,
            self.unit_scale,
        )

    def dense(self) -> torch.Tensor:
        """The tokens themselves, B x N x C."""
        out = torch.baddbmm(self.offset, self.coeffs.transpose(1, 2), self.basis)
        return out.addcmul_(self.scale[..., None], self.shared)


def exporting() -> bool:
    """Inside a graph export (ONNX, torch.export), where in-place slice writes become slow
    ScatterND nodes and concatenation is the better graph."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def scaled_rows(coeffs: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """``cat([coeffs * per_token, per_token])`` (B x r+1 x N for B x r x N and B x N), written
    once: the coefficients are the largest tensors here."""
    if exporting():
        return torch.cat([coeffs * per_token[:, None, :], per_token[:, None, :]], dim=1)
    batch, rank, n = coeffs.shape
    out = coeffs.new_empty(batch, rank + 1, n)
    torch.mul(coeffs, per_token[:, None, :], out=out[:, :rank])
    out[:, rank] = per_token
    return out


class ManyPromptDecoder:
    """``MaskDecoder`` for many prompts against one image embedding, without mask prompts.

    ``decode(sparse)`` gives every prompt's IoU predictions (and keeps what masks need);
    ``masks(rows)`` then makes low-res logits for the chosen prompts only.
    """

    def __init__(
        self,
        decoder: MaskDecoder,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
    ) -> None:
        transformer = decoder.transformer
        if not all(isinstance(layer, TwoWayAttentionBlock) for layer in transformer.layers):
            raise TypeError("ManyPromptDecoder needs SAM's two-way transformer")
        self.decoder = decoder
        c, h, w = image_embedding.shape[1:]
        self.grid = (h, w)
        self.image = (image_embedding + dense_embedding[:1]).flatten(2)[0].T  # N x C
        self.pe = image_pe.flatten(2)[0].T  # N x C
        self._pe_cache: dict[int, torch.Tensor] = {}
        self._shared_cache: dict = {}
        self.state: tuple | None = None

    @torch.no_grad()
    def decode(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU predictions (B x 4) and the IoU and mask tokens' outputs (B x 5 x C) for B
        prompt sets (sparse embeddings B x T_sparse x C)."""
        dec = self.decoder
        tf = dec.transformer
        batch = sparse.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse], dim=1)
        query_pe = tokens
        queries = tokens
        image = self._initial_tokens(batch)
        for layer in tf.layers:
            queries = layer.token_self_attention(queries, query_pe)
            t2i = layer.cross_attn_token_to_image
            attended = self._token_to_image(t2i, image, queries + query_pe)
            queries = layer.norm2(queries + attended)
            queries = layer.norm3(queries + layer.mlp(queries))
            image = self._image_to_token(layer, image, queries, query_pe)
        # Only the IoU and mask tokens' final outputs are used: attend for those alone.
        kept = 1 + dec.num_mask_tokens
        queries, query_pe = queries[:, :kept], query_pe[:, :kept]
        final = tf.final_attn_token_to_image
        hs = tf.norm_final_attn(queries + self._token_to_image(final, image, queries + query_pe))
        iou = dec.iou_prediction_head(hs[:, 0, :])
        self.state = (hs, image)
        return iou, hs

    def _token_to_image(
        self, attn: Attention, image: LowRankTokens, queries: torch.Tensor
    ) -> torch.Tensor:
        """Prompt tokens (B x T x C) attending to the image tokens (keys see +pe)."""
        batch, t, _ = queries.shape
        heads = attn.num_heads
        d = attn.internal_dim // heads
        q = attn.q_proj(queries).view(batch, t, heads, d).transpose(1, 2)  # B x H x T x d
        # Scale the few queries rather than the B x H x T x N logits.
        logits = image.scores(q * d**-0.5, attn.k_proj, self._pe_proj(attn.k_proj))
        out = image.weighted_sum(logits.softmax(dim=-1), attn.v_proj)  # B x H x T x d
        return attn.out_proj(out.transpose(1, 2).reshape(batch, t, heads * d))

    def _image_to_token(
        self,
        layer: TwoWayAttentionBlock,
        image: LowRankTokens,
        queries: torch.Tensor,
        query_pe: torch.Tensor,
    ) -> LowRankTokens:
        """Image tokens (queries, +pe) attending to the prompt tokens, then norm4: a low-rank
        update with the attention probabilities as coefficients."""
        attn = layer.cross_attn_image_to_token
        batch, t, _ = queries.shape
        heads = attn.num_heads
        d = attn.internal_dim // heads
        k = attn.k_proj(queries + query_pe).view(batch, t, heads, d).transpose(1, 2)
        v = attn.v_proj(queries).view(batch, t, heads, d)  # B x T x H x d
        logits = image.scores(k * d**-0.5, attn.q_proj, self._pe_proj(attn.q_proj))
        probs = logits.softmax(dim=2).flatten(1, 2)  # over the prompt tokens; B x HT x N
        w_out = attn.out_proj.weight.view(-1, heads, d)
        return image.add_heads(probs, v, w_out, attn.out_proj.bias).layer_norm(layer.norm4)

    def _pe_proj(self, proj: torch.nn.Linear) -> torch.Tensor:
        """The positional encoding's share of a projection, pe @ W.T (N x out), cached."""
        key = id(proj)
        if key not in self._pe_cache:
            self._pe_cache[key] = self.pe @ proj.weight.T
        return self._pe_cache[key]

    def _initial_tokens(self, batch: int) -> LowRankTokens:
        """The image tokens before any update: the shared ones, rank 0."""
        n, c = self.image.shape
        image = self.image
        return LowRankTokens(
            image,
            image.new_ones(1, n),
            image.new_zeros(batch, 0, n),
            image.new_zeros(batch, 0, c),
            image.new_zeros(c),
            [],
            self._shared_cache,
            unit_scale=True,
        )

    @torch.no_grad()
    def masks(
        self, rows: torch.Tensor | None = None, group: int | None = MASK_GROUP
    ) -> torch.Tensor:
        """Low-res logits (all num_mask_tokens) for the decoded prompts in ``rows``.

        Made ``group`` prompts at a time (the upscaled maps are large, and small groups stay
        in cache); ``group=None`` makes all at once, as a graph for export must.
        """
        if group is None:
            return self.masks_from_state(self.mask_state(rows))
        if rows is None:
            hs = self._decoded()[0]
            rows = torch.arange(hs.shape[0], device=hs.device)
        h, w = self.grid
        parts = [self.image.new_zeros(0, self.decoder.num_mask_tokens, 4 * h, 4 * w)]
        for chunk in rows.split(group):
            if len(chunk):
                parts.append(self.masks_from_state(self.mask_state(chunk)))
        return torch.cat(parts)

    def mask_state(self, rows: torch.Tensor | None = None) -> MaskState:
        """What making masks needs of the decoded prompts in ``rows``, as plain tensors."""
        hs, image = self._decoded()
        if rows is not None:
            hs, image = hs[rows], image.select(rows)
        weight, bias = self._first_upscale()
        batch, n = hs.shape[0], image.shared.shape[0]
        return MaskState(
            hs[:, 1 : 1 + self.decoder.num_mask_tokens, :],
            image.coeffs,
            image.basis,
            image.scale.expand(batch, n),
            image.cached(("up1",), lambda: image.shared @ weight.T),
            weight @ image.offset + bias,
        )

    def masks_from_state(self, state: MaskState) -> torch.Tensor:
        return masks_from_state(self.decoder, state, self.grid)

    def _first_upscale(self) -> tuple[torch.Tensor, torch.Tensor]:
        return first_upscale(self.decoder)

    def _decoded(self) -> tuple[torch.Tensor, LowRankTokens]:
        if self.state is None:
            raise RuntimeError("call decode() first")
        return self.state


def first_upscale(decoder: MaskDecoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's first transposed convolution as a matrix ((di, dj, c_out) x C) and bias."""
    up1 = decoder.output_upscaling[0]
    weight = up1.weight.permute(2, 3, 1, 0).reshape(-1, up1.in_channels)
    return weight, up1.bias.repeat(4)


def masks_from_state(decoder: MaskDecoder, state: MaskState, grid: tuple[int, int]) -> torch.Tensor:
    """Low-res logits B x num_mask_tokens x 4h x 4w from ``ManyPromptDecoder.mask_state``.

    The first transposed convolution maps each token to its own 2x2 output block: a linear
    map of the tokens, applied straight to the low-rank form.
    """
    weight, _ = first_upscale(decoder)
    h, w = grid
    first = torch.baddbmm(state.constant, state.coeffs.transpose(1, 2), state.basis @ weight.T)
    first = first.addcmul_(state.scale[..., None], state.shared)
    first = first.view(state.mask_tokens.shape[0], h, w, 2, 2, -1)
    return decoder.masks_from_first_upscale(first, state.mask_tokens)
