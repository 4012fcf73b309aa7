"""A timm-free pre-norm Vision Transformer whose parameter names equal the official checkpoint keys.

The module loads, with ``strict=True`` and without any key mapping, the backbone weights released by
DINO (``dino_deitsmall8_pretrain.pth`` ...), DINOv2 (``dinov2_vits14_pretrain.pth``, ``*_reg4_*``), iBOT, MSN and MAE
once the checkpoint container has been unwrapped (:mod:`causeseg.backbones.checkpoint`).

Parameter names::

    cls_token, pos_embed, patch_embed.proj.{weight,bias},
    blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}, norm.{weight,bias}
    DINOv2 adds blocks.N.ls1.gamma, blocks.N.ls2.gamma, mask_token and (register models) register_tokens;
    DINOv2 ViT-g uses a SwiGLU MLP: blocks.N.mlp.{w12,w3}.{weight,bias}.

Position-embedding interpolation follows the official recipes exactly (see :func:`interpolate_pos_embed`), because the
sampling grid of ``F.interpolate`` depends on the scale factor that is passed, not only on the output size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INTERPOLATION_MODES",
    "InterpolationMode",
    "interpolate_pos_embed",
    "Attention",
    "Mlp",
    "SwiGLUMlp",
    "LayerScale",
    "Block",
    "PatchEmbed",
    "VisionTransformer",
]

InterpolationMode = Literal["dino", "msn", "dinov2_reg"]
INTERPOLATION_MODES: tuple[str, ...] = ("dino", "msn", "dinov2_reg")


def _bicubic(x: torch.Tensor, out_hw: tuple[int, int], scales: tuple[float, float]) -> torch.Tensor:
    """Bicubic resize of ``x`` (1, C, M, M) with the sampling grid defined by ``scales`` and output size ``out_hw``.

    ``F.interpolate(scale_factor=...)`` derives the output size as ``floor(M * scale)``, which for some scales falls
    one short of the intended size because of floating-point rounding (e.g. MSN's ``sqrt(29²/14²) * 14 = 28.999...``;
    the official MSN code would crash there). In that case the same coordinate mapping is applied with the intended
    size through the ATen kernel that ``F.interpolate`` itself calls.
    """
    natural = (math.floor(x.shape[-2] * scales[0]), math.floor(x.shape[-1] * scales[1]))
    if natural == tuple(out_hw):
        return F.interpolate(x, scale_factor=scales, mode="bicubic", align_corners=False)
    kernel = getattr(torch._C._nn, "upsample_bicubic2d", None)  # noqa: SLF001 - same kernel F.interpolate uses
    if kernel is None:  # pragma: no cover - very old/new torch without the op
        raise RuntimeError(
            f"cannot interpolate the position embedding from {tuple(x.shape[-2:])} to {tuple(out_hw)} with scale "
            f"factors {scales}: floor(size * scale) gives {natural}; use another input size"
        )
    return kernel(x, list(out_hw), False, float(scales[0]), float(scales[1]))


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    grid_hw: tuple[int, int],
    mode: str = "dino",
    *,
    num_prefix_tokens: int = 1,
    square_input: bool | None = None,
) -> torch.Tensor:
    """Resample a stored position embedding (1, P + N0, D) to the token grid ``grid_hw = (H/p, W/p)``.

    Official recipes (``dependencies.md`` §3.3):

    * ``"dino"`` (DINO, iBOT, DINOv2 without registers, MAE as loaded by CAUSE, the official CAUSE code): if the token
      count equals the stored one and the input image is square, the stored embedding is returned as is; otherwise
      the patch part is reshaped to (1, D, √N0, √N0) and resized with ``F.interpolate(mode="bicubic",
      scale_factor=((h+0.1)/√N0, (w+0.1)/√N0))`` (no antialias, ``align_corners=False``). The +0.1 changes the
      sampling grid, not only the size.
    * ``"msn"`` (MSN): as is when the token count equals the stored one; otherwise bicubic with
      ``scale_factor = √(N_new/N0)`` and no +0.1 (square grids; a non-square grid uses ``(h/√N0, w/√N0)``, a natural
      extension, since the official code supports square inputs only).
    * ``"dinov2_reg"`` (DINOv2 register models, ``interpolate_offset=0, interpolate_antialias=True`` upstream): as is
      when the count matches and the input is square; otherwise bicubic to ``size=(h, w)`` with ``antialias=True``.

    The computation runs in float32 (as DINOv2 does; identical for float32 weights) and the result is cast back to
    the input dtype. ``square_input`` says whether the input image was square in pixels (the official condition);
    ``None`` means ``h == w``.

    Args:
        pos_embed: (1, P + N0, D) stored embedding, ``P`` prefix positions (the CLS token).
        grid_hw: token grid (h, w) of the current input, in (rows, columns) order.
        mode: one of :data:`INTERPOLATION_MODES`.
        num_prefix_tokens: number of leading positions that are not patches (1: CLS).
        square_input: whether the image was square in pixels.

    Returns:
        (1, P + h*w, D) embedding, patch positions in row-major order.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"unknown position-embedding interpolation mode {mode!r}; expected one of {INTERPOLATION_MODES}")
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, P + N, D), got {tuple(pos_embed.shape)}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"token grid must be at least 1x1, got {(h, w)}")
    n0 = pos_embed.shape[1] - num_prefix_tokens
    m = int(round(math.sqrt(n0)))
    if m * m != n0:
        raise ValueError(f"stored pos_embed has {n0} patch positions, which is not a square grid")
    if square_input is None:
        square_input = h == w
    npatch = h * w
    if mode == "msn":
        if npatch == n0:
            return pos_embed
    elif npatch == n0 and square_input:
        return pos_embed

    dtype = pos_embed.dtype
    pe = pos_embed.float()
    prefix, patch = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
    dim = pe.shape[-1]
    grid = patch.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if mode == "dino":
        out = _bicubic(grid, (h, w), ((h + 0.1) / m, (w + 0.1) / m))
    elif mode == "msn":
        if h == w:
            s = math.sqrt(npatch / n0)
            scales = (s, s)
        else:
            scales = (h / m, w / m)
        out = _bicubic(grid, (h, w), scales)
    else:  # dinov2_reg
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    if tuple(out.shape[-2:]) != (h, w):  # pragma: no cover - guarded by _bicubic
        raise RuntimeError(f"position embedding resized to {tuple(out.shape[-2:])}, expected {(h, w)}")
    out = out.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([prefix, out], dim=1).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` Linear(D, 3D) → ``F.scaled_dot_product_attention`` → ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # default scale 1/sqrt(head_dim) equals the official scale
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit softmax attention weights (B, heads, N, N), for visualisation only."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        return torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1)


class Mlp(nn.Module):
    """``fc1`` → GELU (exact, erf) → ``fc2``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUMlp(nn.Module):
    """DINOv2 ViT-g feed-forward (``SwiGLUFFNFused``): ``w12`` → split → ``silu(x1) * x2`` → ``w3``.

    The hidden width is ``(int(hidden * 2/3) + 7) // 8 * 8`` (4096 for ViT-g with hidden 6144).
    """

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (DINOv2 ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale_init: float | None = None,
        ffn: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden)
        elif ffn == "swiglu":
            self.mlp = SwiGLUMlp(dim, hidden)
        else:
            raise ValueError(f"unknown ffn {ffn!r}; expected 'mlp' or 'swiglu'")
        if layer_scale_init is not None:
            self.ls1: nn.Module = LayerScale(dim, layer_scale_init)
            self.ls2: nn.Module = LayerScale(dim, layer_scale_init)
        else:
            self.ls1 = nn.Identity()
            self.ls2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """``proj``: Conv2d(3, D, kernel = stride = patch); output (B, N, D) and the grid (h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (int(h), int(w))


class VisionTransformer(nn.Module):
    """Pre-norm ViT (DINO / DINOv2 / iBOT / MSN / MAE layout) with official parameter names.

    Args:
        img_size: image size the stored ``pos_embed`` was made for (224 for DINO/iBOT/MSN/MAE, 518 for DINOv2).
        patch_size: patch size (8, 14, 16).
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads (6 for ViT-S, 12 for ViT-B, 16 for ViT-L, 24 for ViT-g; 12 for ViT-S only to
            reproduce the official CAUSE backbone, defect D1).
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias in ``attn.qkv``.
        num_register_tokens: DINOv2 register tokens (inserted after the position embedding, between CLS and patches).
        layer_scale_init: if not None, blocks carry ``ls1.gamma``/``ls2.gamma`` initialised to this value (DINOv2).
        mask_token: create the (unused at inference) DINOv2 ``mask_token`` parameter so official files load strictly.
        ffn: ``"mlp"`` (GELU MLP) or ``"swiglu"`` (DINOv2 ViT-g).
        interpolation: position-embedding interpolation mode, see :func:`interpolate_pos_embed`.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_register_tokens: int = 0,
        layer_scale_init: float | None = None,
        mask_token: bool = False,
        ffn: str = "mlp",
        interpolation: str = "dino",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(
                f"unknown position-embedding interpolation {interpolation!r}; expected one of {INTERPOLATION_MODES}"
            )
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolation = interpolation
        self.num_prefix_tokens = 1 + num_register_tokens
        n0 = (img_size // patch_size) ** 2

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n0, embed_dim))
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_parameter("register_tokens", None)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        else:
            self.register_parameter("mask_token", None)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, ffn) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------ init / loading
    def reset_parameters(self) -> None:
        """Random init (truncated normal std 0.02 for tokens and Linear weights; used for tests and benchmarks)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._pos_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # new weights: cached interpolated position embeddings are stale
        self._pos_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to()/.half()/.cuda(): drop the cache (keys would differ anyway; this frees memory)
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def pos_embed_for(self, grid_hw: tuple[int, int], square_input: bool | None = None) -> torch.Tensor:
        """The (1, 1 + h*w, D) position embedding for grid (h, w), interpolated officially and cached.

        The cache is keyed on the grid, the squareness of the input, dtype, device, and the storage pointer and
        version counter of ``pos_embed``, so any in-place change of the weights invalidates it. Nothing is cached
        while autograd would track ``pos_embed``.
        """
        h, w = int(grid_hw[0]), int(grid_hw[1])
        if square_input is None:
            square_input = h == w
        pe = self.pos_embed
        tracking = torch.is_grad_enabled() and pe.requires_grad
        if tracking:
            return interpolate_pos_embed(pe, (h, w), self.interpolation, square_input=square_input)
        key = (h, w, bool(square_input), pe.dtype, pe.device, pe.data_ptr(), pe._version, self.interpolation)
        hit = self._pos_cache.get(key)
        if hit is None:
            # drop entries of older weights
            stale = [k for k in self._pos_cache if k[5:7] != key[5:7]]
            for k in stale:
                del self._pos_cache[k]
            if len(self._pos_cache) >= 16:
                self._pos_cache.clear()
            with torch.no_grad():
                hit = interpolate_pos_embed(pe, (h, w), self.interpolation, square_input=square_input)
            if hit is pe:
                hit = pe.detach()
            self._pos_cache[key] = hit
        return hit

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding + CLS + position embedding (+ registers after the position embedding)."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        hp, wp = x.shape[-2], x.shape[-1]
        if hp < self.patch_size or wp < self.patch_size:
            raise ValueError(f"input {hp}x{wp} is smaller than one {self.patch_size}x{self.patch_size} patch")
        tokens, grid = self.patch_embed(x)
        b = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(grid, square_input=(hp == wp)).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens after the last block, (B, 1 + R + N, D): CLS, R registers, then patches row-major."""
        tokens, _ = self.prepare_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normed patch tokens (B, N, D) with prefix tokens (CLS + registers) removed, and the grid (h, w)."""
        tokens, grid = self.prepare_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)[:, self.num_prefix_tokens :], grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
