"""Vision Transformers (Dosovitskiy et al., 2021), laid out as torchvision's ``VisionTransformer``.

Registered: ``vit_tiny_p4`` (width 192, 3 heads) and ``vit_small_p4`` (width 384, 6 heads) with 4x4
patches for 32x32 images (64 patches), and ``vit_b16`` (ViT-B/16: width 768, 12 heads, 16x16
patches, 224x224 images, 196 patches); all 12 layers deep with an MLP 4x as wide, pre-norm
blocks, LayerNorm eps 1e-6, a class token, learned position embeddings, GELU.

Parameter names equal torchvision's (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``, ``...mlp.0``, ``...mlp.3``,
``encoder.ln``, ``heads.head``): ViT-B/16 has torchvision's 86,567,656 parameters with 1000 classes.
For ViTs the patch embedding is the stem, and the patch size is part of the name: there is no
automatic switch (use the ``_p4`` models for 32x32 images).

``image_size`` fixes the length of the position embedding. Any other input size whose sides are
multiples of the patch size also works: the embedding grid is resized bicubically on the fly, and
``adapt_state_dict`` resizes a checkpoint's embedding the same way (a ViT-B/16 trained at 224 loads
into one built for 384).

Initialisation as torchvision (truncated-normal patch projection with std sqrt(1/fan_in),
position embedding N(0, 0.02), zero class token, Xavier-uniform MLP weights) except the classifier:
torchvision zeroes it, which gives every other layer a zero gradient on the first step; we draw it
from a truncated normal with std 0.02 (timm's choice).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fixmatch.models import register_model
from fixmatch.models.stem import ImageSize

LN_EPS = 1e-6


class EncoderBlock(nn.Module):
    """x + attention(LN(x)), then + MLP(LN(.))."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden, eps=LN_EPS)
        # Indices 0 and 3 hold the weights, as in torchvision's MLPBlock.
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, hidden), nn.Dropout(dropout))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, hidden: int, heads: int, mlp_dim: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(hidden, heads, mlp_dim, dropout, attention_dropout))
            for i in range(layers)))
        self.ln = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor, pos_embedding: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + pos_embedding)))


def resize_pos_embedding(pos_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + h*w, D) -> (1, 1 + grid[0]*grid[1], D): the class token's entry kept, the square grid resized."""
    cls, patches = pos_embedding[:, :1], pos_embedding[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embedding
    dim = patches.shape[2]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)], 1)


class VisionTransformer(nn.Module):
    head_name = "heads.head"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        patch_size: int = 4,
        layers: int = 12,
        hidden: int = 192,
        heads: int = 3,
        mlp_dim: int = 768,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.grid = patch_size, (height // patch_size, width // patch_size)
        self.conv_proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.encoder = Encoder(1 + self.grid[0] * self.grid[1], layers, hidden, heads, mlp_dim, dropout,
                               attention_dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, num_classes)))
        self.num_features = hidden
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output after the final LayerNorm, shape (N, hidden)."""
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is not a multiple of the patch size {self.patch_size}")
        x = self.conv_proj(x)  # (N, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.encoder(x, resize_pos_embedding(self.encoder.pos_embedding, grid))
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.forward_features(x))

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize a checkpoint's position embedding to this model's grid (used by ``--init-weights``)."""
        key = "encoder.pos_embedding"
        if key in state and state[key].ndim == 3 and state[key].shape != self.encoder.pos_embedding.shape:
            state = dict(state)
            state[key] = resize_pos_embedding(state[key].float(), self.grid).to(state[key].dtype)
        return state


def _vit(num_classes: int, in_channels: int, defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(num_classes, in_channels=in_channels, **{**defaults, **kwargs})


@register_model("vit_tiny_p4")
def vit_tiny_p4(num_classes: int, in_channels: int = 3, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny with 4x4 patches for 32x32 images (64 patches); kwargs image_size, dropout."""
    return _vit(num_classes, in_channels, dict(image_size=32, patch_size=4, hidden=192, heads=3, mlp_dim=768), kwargs)


@register_model("vit_small_p4")
def vit_small_p4(num_classes: int, in_channels: int = 3, **kwargs: Any) -> VisionTransformer:
    """ViT-Small with 4x4 patches for 32x32 images (64 patches); kwargs image_size, dropout."""
    return _vit(num_classes, in_channels, dict(image_size=32, patch_size=4, hidden=384, heads=6, mlp_dim=1536),
                kwargs)


@register_model("vit_b16")
def vit_b16(num_classes: int, in_channels: int = 3, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 for 224x224 images (196 patches); kwargs image_size, dropout."""
    return _vit(num_classes, in_channels, dict(image_size=224, patch_size=16, hidden=768, heads=12, mlp_dim=3072),
                kwargs)
