"""Vision transformers: ViT-Lite-7/4 for 32 x 32 inputs and DeiT-Tiny for 224 x 224;
conventions in :mod:`signgrad.models`.

Every weight matrix is an ``nn.Linear`` (the attention's query/key/value and output
projections, the MLP) and the patch embedding is an ``nn.Conv2d``, so
:func:`signgrad.convert.binarize` binarizes a transformer as it does a CNN: with
``keep="first_last"`` the patch embedding (the stem) and the classifier stay full
precision and every linear layer of the blocks becomes binary (1W32A, or 1W1A with an
input quantizer: the sign of its input). The attention's two matrix products (queries
with keys, weights with values) multiply activations, not weights, and stay real.
"""

import torch
import torch.nn.functional as F
from torch import nn

from signgrad.errors import SigngradError
from signgrad.models.common import check_args, check_int, make_activation

__all__ = ["Attention", "TransformerBlock", "VisionTransformer", "deit_tiny", "vit_lite"]


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` projection, scaled dot-product attention per
    head, ``proj`` output projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % heads:
            raise SigngradError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (Linear-GELU-Linear)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = make_activation(activation, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): ``patch`` x ``patch`` patches embedded by a strided
    convolution, a class token, learned position embeddings, ``depth`` pre-norm blocks,
    a final layer norm and a linear classifier on the class token. ``activation`` is the
    MLP's nonlinearity (GELU in the papers). Weights start as DeiT's: truncated normal
    (std 0.02) for linear layers and embeddings, zero biases."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        qkv_bias: bool,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        check_int("image_size", image_size, patch)
        if image_size % patch:
            raise SigngradError(
                f"a ViT with {patch} x {patch} patches needs an image size divisible by "
                f"{patch}, got {image_size}"
            )
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads, mlp_dim, qkv_bias, activation) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # N x patches x dim
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.fc(self.norm(self.blocks(x))[:, 0])


def vit_lite(
    *, num_classes: int, in_channels: int, image_size: int = 32, activation: str = "gelu"
) -> VisionTransformer:
    """ViT-Lite-7/4 for 32 x 32 inputs: 3.72 M parameters, 0.24 G MACs.

    Hassani et al. 2021: 4 x 4 patches, 7 blocks of width 256, 4 heads, MLP 512; the
    figures with 10 classes, the MACs those of its linear layers."""
    return VisionTransformer(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, patch=4,
        dim=256, depth=7, heads=4, mlp_dim=512, qkv_bias=False, activation=activation,
    )  # fmt: skip


def deit_tiny(
    *, num_classes: int, in_channels: int, image_size: int = 224, activation: str = "gelu"
) -> VisionTransformer:
    """DeiT-Tiny for 224 x 224 inputs: 5.7 M parameters, 1.25 G MACs.

    Touvron et al. 2021: 16 x 16 patches, 12 blocks of width 192, 3 heads, MLP 768;
    5,717,416 parameters with 1,000 classes, 0.18 G of the MACs in the attention's matrix
    products."""
    return VisionTransformer(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, patch=16,
        dim=192, depth=12, heads=3, mlp_dim=768, qkv_bias=True, activation=activation,
    )  # fmt: skip
