"""SAM's mask decoder: output tokens + prompt tokens through the two-way transformer, then
per-token hypernetworks turn an upscaled image embedding into mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import GELU, MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        # Token 0 is the single-mask output, tokens 1.. the multimask outputs.
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns low-res mask logits BxMx(4h)x(4w) and IoU predictions BxM.

        M is ``num_multimask_outputs`` with ``multimask_output`` (TinySAM's default), else 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        return_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """All ``num_mask_tokens`` masks and IoU predictions, for B prompt sets.

        ``image_embeddings`` is either one embedding (1xCxhxw), shared by every prompt set, or one
        per prompt set (BxCxhxw). ``return_tokens`` adds the two-way transformer's output tokens
        (B x T x C), which distillation compares.
        """
        hs, image_tokens, (c, h, w) = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        batch = hs.shape[0]
        first = _conv_transpose_2x2(image_tokens.view(batch, h, w, c), self.output_upscaling[0])
        masks = self.masks_from_first_upscale(first, hs[:, 1 : 1 + self.num_mask_tokens, :])
        iou = self.iou_prediction_head(hs[:, 0, :])
        return (masks, iou, hs) if return_tokens else (masks, iou)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Output tokens + prompt tokens through the two-way transformer: returns the tokens
        B x T x C, the image tokens B x hw x C and the image's (C, h, w)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or {batch}"
            )
        if image_embeddings.shape[0] == 1 and dense_prompt_embeddings.stride(0) == 0:
            # One image and no mask prompts: the transformer shares the image tokens across
            # the batch until they first attend to the prompts.
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = image_embeddings + dense_prompt_embeddings
        hs, image_tokens = self.transformer(src, image_pe, tokens)
        return hs, image_tokens, tuple(src.shape[1:])

    def masks_from_first_upscale(
        self, first: torch.Tensor, mask_tokens_out: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits from the first transposed convolution's output, B x h x w x 2 x 2 x C/4
        (channels-last 2x2 blocks), and the mask tokens' outputs B x M x C: B x M x 4h x 4w.

        The rest of ``output_upscaling`` runs channels-last, with each 2x2 stride-2 transposed
        convolution as one matrix product; the hypernetwork dot comes before the final 2x2
        interleave, so the reorder moves M channels instead of C/8.
        """
        _, norm, act1, up2, act2 = self.output_upscaling
        batch, h, w = first.shape[:3]
        x = first.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * h, 2 * w, -1)
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        blocks = act2(_conv_transpose_2x2(x, up2))  # B x 2h x 2w x 2 x 2 x C/8
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        masks = blocks.reshape(batch, -1, blocks.shape[-1]) @ hyper_in.transpose(1, 2)
        masks = masks.view(batch, 2 * h, 2 * w, 2, 2, -1).permute(0, 5, 1, 3, 2, 4)
        return masks.reshape(batch, -1, 4 * h, 4 * w)


def _conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution on channels-last BxHxWxC input.

    The 2x2 output patches do not overlap, so it is one matrix product:
    out[i, j, di, dj] = x[i, j] @ W[:, :, di, dj] + bias, returned as B x H x W x 2 x 2 x C_out
    (pixel (2i+di, 2j+dj) of the usual output).
    """
    b, h, w, c_in = x.shape
    c_out = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # columns: di, dj, c_out
    flat = x.reshape(-1, c_in)
    y = flat @ weight if conv.bias is None else torch.addmm(conv.bias.repeat(4), flat, weight)
    return y.view(b, h, w, 2, 2, c_out)
