"""Tests of causeseg.backbones: ViT parity with an independent reference, strict checkpoint loading of every official
container, position-embedding interpolation recipes, registry rules, and EfficientNet-Lite0 with real weights.

The reference ViT below is written from the official recipes with explicit maths (unfold patch embedding, manual
LayerNorm, explicit ``softmax(q kᵀ · scale) v`` attention, erf GELU) and operates on a plain dict of tensors whose
keys are the official checkpoint keys; it shares no code with ``causeseg.backbones.vit``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causeseg.backbones import (
    BACKBONES,
    CheckpointError,
    EfficientNetLite0,
    WeightsRequiredError,
    build_backbone,
    extract_backbone_state_dict,
    interpolate_pos_embed,
    list_backbones,
    load_checkpoint_file,
    load_state_dict_strict,
)
from causeseg.backbones.efficientnet import Conv2dSame, packaged_weights_path, tf_same_pad

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(embed_dim=48, depth=2, num_heads=3)


# ================================================================================================ reference ViT
def ref_params(
    *,
    dim: int = 48,
    depth: int = 2,
    patch: int = 16,
    img: int = 224,
    registers: int = 0,
    layer_scale: bool = False,
    mask_token: bool = False,
    swiglu: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random parameters under the official key names (DINO layout; DINOv2 extras on request)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    n0 = (img // patch) ** 2
    p: dict[str, torch.Tensor] = {
        "cls_token": r(1, 1, dim, std=0.5),
        "pos_embed": r(1, 1 + n0, dim, std=0.5),
        "patch_embed.proj.weight": r(dim, 3, patch, patch, std=0.05),
        "patch_embed.proj.bias": r(dim, std=0.1),
    }
    if registers:
        p["register_tokens"] = r(1, registers, dim, std=0.5)
    if mask_token:
        p["mask_token"] = r(1, dim)
    hid = dim * 4
    if swiglu:
        hid = (int(hid * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        p[b + "norm1.weight"] = r(dim, std=0.1, mean=1.0)
        p[b + "norm1.bias"] = r(dim, std=0.1)
        p[b + "attn.qkv.weight"] = r(3 * dim, dim, std=0.3)
        p[b + "attn.qkv.bias"] = r(3 * dim, std=0.1)
        p[b + "attn.proj.weight"] = r(dim, dim, std=0.15)
        p[b + "attn.proj.bias"] = r(dim, std=0.1)
        p[b + "norm2.weight"] = r(dim, std=0.1, mean=1.0)
        p[b + "norm2.bias"] = r(dim, std=0.1)
        if swiglu:
            p[b + "mlp.w12.weight"] = r(2 * hid, dim, std=0.15)
            p[b + "mlp.w12.bias"] = r(2 * hid, std=0.1)
            p[b + "mlp.w3.weight"] = r(dim, hid, std=0.1)
            p[b + "mlp.w3.bias"] = r(dim, std=0.1)
        else:
            p[b + "mlp.fc1.weight"] = r(hid, dim, std=0.15)
            p[b + "mlp.fc1.bias"] = r(hid, std=0.1)
            p[b + "mlp.fc2.weight"] = r(dim, hid, std=0.1)
            p[b + "mlp.fc2.bias"] = r(dim, std=0.1)
        if layer_scale:
            p[b + "ls1.gamma"] = r(dim, std=0.2, mean=0.7)
            p[b + "ls2.gamma"] = r(dim, std=0.2, mean=0.7)
    p["norm.weight"] = r(dim, std=0.1, mean=1.0)
    p["norm.bias"] = r(dim, std=0.1)
    return p


def ref_interp_dino(pe: torch.Tensor, H: int, W: int, patch: int) -> torch.Tensor:
    """Official DINO/iBOT/CAUSE ``interpolate_pos_encoding`` (bicubic, scale (n+0.1)/sqrt(N))."""
    npatch = (H // patch) * (W // patch)
    N = pe.shape[1] - 1
    if npatch == N and H == W:
        return pe
    dim = pe.shape[-1]
    h0, w0 = H // patch + 0.1, W // patch + 0.1
    grid = pe[:, 1:].float().reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)), mode="bicubic")
    assert int(h0) == grid.shape[-2] and int(w0) == grid.shape[-1]
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def ref_interp_msn(pe: torch.Tensor, H: int, W: int, patch: int) -> torch.Tensor:
    """Official MSN ``interpolate_pos_encoding`` (bicubic, scale sqrt(npatch/N), square inputs only)."""
    npatch = (H // patch) * (W // patch)
    N = pe.shape[1] - 1
    if npatch == N:
        return pe
    dim = pe.shape[-1]
    m = int(math.sqrt(N))
    grid = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=math.sqrt(npatch / N), mode="bicubic")
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def ref_interp_dinov2_reg(pe: torch.Tensor, H: int, W: int, patch: int) -> torch.Tensor:
    """Upstream DINOv2 register models: interpolate_offset=0 (size=), antialias=True, float32."""
    npatch = (H // patch) * (W // patch)
    N = pe.shape[1] - 1
    if npatch == N and H == W:
        return pe
    dim = pe.shape[-1]
    m = int(math.sqrt(N))
    grid = pe[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(H // patch, W // patch), mode="bicubic", antialias=True)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


REF_INTERP = {"dino": ref_interp_dino, "msn": ref_interp_msn, "dinov2_reg": ref_interp_dinov2_reg}


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def ref_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, patch: int, interp: str = "dino", registers: int = 0
) -> torch.Tensor:
    """Normed tokens (B, 1 + R + N, D) of normalised images x, explicit maths."""
    B, _, H, W = x.shape
    D = p["cls_token"].shape[-1]
    hp, wp = H // patch, W // patch
    x = x[:, :, : hp * patch, : wp * patch]
    cols = F.unfold(x, kernel_size=patch, stride=patch)  # (B, 3*p*p, N), row-major patches
    tok = cols.transpose(1, 2) @ p["patch_embed.proj.weight"].reshape(D, -1).T + p["patch_embed.proj.bias"]
    tok = torch.cat([p["cls_token"].expand(B, -1, -1), tok], dim=1)
    tok = tok + REF_INTERP[interp](p["pos_embed"], H, W, patch)
    if registers:
        tok = torch.cat([tok[:, :1], p["register_tokens"].expand(B, -1, -1), tok[:, 1:]], dim=1)
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    hd = D // heads
    for i in range(depth):
        b = f"blocks.{i}."
        y = _ln(tok, p[b + "norm1.weight"], p[b + "norm1.bias"])
        qkv = y @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
        n = tok.shape[1]
        qkv = qkv.reshape(B, n, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, heads, n, hd)
        a = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, n, D)
        o = o @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        tok = tok + (p[b + "ls1.gamma"] * o if b + "ls1.gamma" in p else o)
        y = _ln(tok, p[b + "norm2.weight"], p[b + "norm2.bias"])
        if b + "mlp.w12.weight" in p:
            z = y @ p[b + "mlp.w12.weight"].T + p[b + "mlp.w12.bias"]
            z1, z2 = z[..., : z.shape[-1] // 2], z[..., z.shape[-1] // 2 :]
            m = (z1 * torch.sigmoid(z1) * z2) @ p[b + "mlp.w3.weight"].T + p[b + "mlp.w3.bias"]
        else:
            z = y @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"]
            z = 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
            m = z @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"]
        tok = tok + (p[b + "ls2.gamma"] * m if b + "ls2.gamma" in p else m)
    return _ln(tok, p["norm.weight"], p["norm.bias"])


def ref_feature_map(p, x01, *, heads, patch, interp="dino", registers=0) -> torch.Tensor:
    x = (x01 - MEAN) / STD
    tok = ref_forward(p, x, heads=heads, patch=patch, interp=interp, registers=registers)[:, 1 + registers :]
    B, N, D = tok.shape
    return tok.transpose(1, 2).reshape(B, D, x01.shape[-2] // patch, x01.shape[-1] // patch)


def _images(*hw: tuple[int, int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, h, w, generator=g) for h, w in hw]


# ================================================================================================ containers
def _container(kind: str, params: dict[str, torch.Tensor]) -> object:
    """Wrap ``params`` like the official release of ``kind`` (with the extra keys those files carry)."""
    g = torch.Generator().manual_seed(5)
    D = params["cls_token"].shape[-1]
    if kind in ("dino_raw", "dinov2_raw"):
        return dict(params)
    if kind == "dino_full":
        teacher = {"backbone." + k: v for k, v in params.items()}
        teacher["head.mlp.0.weight"] = torch.randn(16, D, generator=g)
        teacher["head.last_layer.weight_g"] = torch.ones(32, 1)
        student = {k: v + 1 for k, v in teacher.items()}
        return {"teacher": teacher, "student": student, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
    if kind == "ibot":
        sd = dict(params)
        sd["masked_embed"] = torch.zeros(1, D)
        sd["head.mlp.0.weight"] = torch.randn(16, D, generator=g)
        sd["head.last_layer2.weight"] = torch.randn(8, 16, generator=g)
        return {"state_dict": sd}
    if kind == "ibot_module":
        sd = {"module.backbone." + k: v for k, v in params.items()}
        sd["module.backbone.masked_embed"] = torch.zeros(1, D)
        sd["module.head.mlp.0.weight"] = torch.randn(16, D, generator=g)
        return {"state_dict": sd}
    if kind == "msn":
        enc = {"module." + k: v for k, v in params.items()}
        enc["module.fc.fc1.weight"] = torch.randn(16, D, generator=g)
        enc["module.fc.bn1.running_mean"] = torch.zeros(16)
        enc["module.fc.bn1.num_batches_tracked"] = torch.tensor(3)
        return {"target_encoder": enc, "encoder": {k: v + 1 for k, v in enc.items()}, "prototypes": torch.randn(4, 8),
                "epoch": 800}
    if kind == "msn_noprefix":
        enc = dict(params)
        enc["fc.fc3.weight"] = torch.randn(16, D, generator=g)
        return {"target_encoder": enc}
    if kind == "mae":
        return {"model": dict(params)}
    raise AssertionError(kind)


# kind, registry name, ref kwargs, heads, patch, interpolation, registers, load kwargs
CASES = [
    ("dino_raw", "dino_vits16", {}, 3, 16, "dino", 0, {}),
    ("dino_full", "dino_vits16", {}, 3, 16, "dino", 0, {"trust_pickle": True}),
    ("dino_raw", "dino_vits8", {"patch": 8}, 3, 8, "dino", 0, {}),
    ("ibot", "ibot_vits16", {}, 3, 16, "dino", 0, {}),
    ("ibot_module", "ibot_vitb16", {}, 3, 16, "dino", 0, {}),
    ("msn", "msn_vits16", {}, 3, 16, "msn", 0, {}),
    ("msn_noprefix", "msn_vitb16", {}, 3, 16, "msn", 0, {}),
    ("mae", "mae_vitb16", {}, 3, 16, "dino", 0, {}),
    ("dinov2_raw", "dinov2_vits14", dict(patch=14, img=518, layer_scale=True, mask_token=True), 3, 14, "dino", 0, {}),
    (
        "dinov2_raw",
        "dinov2_vitb14_reg",
        dict(patch=14, img=518, layer_scale=True, mask_token=True, registers=4),
        3, 14, "dinov2_reg", 4, {},
    ),
    (
        "dinov2_raw",
        "dinov2_vitg14",
        dict(patch=14, img=518, layer_scale=True, mask_token=True, swiglu=True),
        3, 14, "dino", 0, {},
    ),
]


@pytest.mark.parametrize("kind,name,rkw,heads,patch,interp,regs,lkw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_official_container_loads_strictly_and_matches_reference(tmp_path, kind, name, rkw, heads, patch, interp, regs, lkw):
    params = ref_params(**rkw)
    path = tmp_path / f"{kind}.pth"
    torch.save(_container(kind, params), path)
    bb = build_backbone(name, weights=path, embed_dim=48, depth=2, num_heads=heads, **lkw)
    assert bb.weights_source == str(path)
    assert bb.family == BACKBONES[name].family
    assert bb.patch_size == patch and bb.embed_dim == 48
    assert bb.model.interpolation == interp  # registry picks the family's official recipe
    # sizes: stored grid (as-is path), larger square grid, non-square grid
    base = 518 if patch == 14 else 224
    big = 322 if patch == 14 else 320
    sizes = [(base, base), (big, big), (base if patch != 14 else 224, big)]
    if interp == "msn":
        sizes = sizes[:2]  # the official MSN recipe is defined for square inputs only
    with torch.no_grad():
        for x in _images(*sizes):
            got = bb(x)
            want = ref_feature_map(params, x, heads=heads, patch=patch, interp=interp, registers=regs)
            assert got.shape == want.shape == (2, 48, x.shape[-2] // patch, x.shape[-1] // patch)
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (name, tuple(x.shape), (got - want).abs().max())


def test_full_dino_checkpoint_needs_trust_pickle(tmp_path):
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save(_container("dino_full", ref_params()), path)
    with pytest.raises(CheckpointError) as ei:
        build_backbone("dino_vits16", weights=path, **TINY)
    msg = str(ei.value)
    assert str(path) in msg and "trust_pickle=True" in msg
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint_file(path)
    assert "teacher" in load_checkpoint_file(path, trust_pickle=True)


def test_truncated_checkpoint_lists_missing_keys_and_names_file(tmp_path):
    params = ref_params()
    del params["blocks.1.mlp.fc2.weight"]
    del params["norm.bias"]
    path = tmp_path / "truncated.pth"
    torch.save(params, path)
    with pytest.raises(CheckpointError) as ei:
        build_backbone("dino_vits16", weights=path, **TINY)
    msg = str(ei.value)
    assert str(path) in msg
    assert "missing keys (2)" in msg and "blocks.1.mlp.fc2.weight" in msg and "norm.bias" in msg
    assert "unexpected" not in msg


def test_wrong_checkpoint_lists_unexpected_renamed_and_misshaped_keys(tmp_path):
    params = ref_params()
    params["final_norm.weight"] = params.pop("norm.weight")
    params["blocks.0.attn.extra"] = torch.zeros(3)
    params["pos_embed"] = torch.zeros(1, 1 + 100, 48)
    path = tmp_path / "wrong.pth"
    torch.save(params, path)
    with pytest.raises(CheckpointError) as ei:
        build_backbone("dino_vits16", weights=path, **TINY)
    msg = str(ei.value)
    assert str(path) in msg
    assert "missing keys (1): norm.weight" in msg
    assert "final_norm.weight" in msg and "blocks.0.attn.extra" in msg and "unexpected keys (2)" in msg
    assert "pos_embed: file (1, 101, 48) vs model (1, 197, 48)" in msg


def test_ignored_keys_are_family_specific(tmp_path):
    # a projection head is allowed in a DINO *full* checkpoint's teacher, not in a raw DINO file
    params = ref_params()
    params["head.weight"] = torch.zeros(10, 48)
    path = tmp_path / "raw_with_head.pth"
    torch.save(params, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): head.weight"):
        build_backbone("dino_vits16", weights=path, **TINY)
    # MSN's projection head fc.* is dropped for MSN, but not for MAE
    enc = {"target_encoder": {**ref_params(), "fc.fc1.weight": torch.zeros(4, 48)}}
    assert "fc.fc1.weight" not in extract_backbone_state_dict(enc, "msn", "x.pth")
    mae = {"model": {**ref_params(), "fc.fc1.weight": torch.zeros(4, 48)}}
    with pytest.raises(CheckpointError, match="fc.fc1.weight"):
        load_state_dict_strict(build_backbone("mae_vitb16", pretrained=False, **TINY).model,
                               extract_backbone_state_dict(mae, "mae", "mae.pth"), "mae.pth")


def test_container_of_another_family_is_rejected(tmp_path):
    path = tmp_path / "msn.pth.tar"
    torch.save(_container("msn", ref_params()), path)
    with pytest.raises(CheckpointError) as ei:
        build_backbone("dino_vits16", weights=path, **TINY)
    assert str(path) in str(ei.value) and "MSN" in str(ei.value)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint container"):
        extract_backbone_state_dict({"foo": 1, "bar": "x"}, "dino", "odd.pth")


def test_msn_prefix_is_stripped_only_when_present():
    params = ref_params()
    # keys without "module.": the official code's blind 7-character slice would corrupt them
    sd = extract_backbone_state_dict({"target_encoder": dict(params)}, "msn", "m.pth")
    assert set(sd) == set(params)
    sd = extract_backbone_state_dict({"target_encoder": {"module." + k: v for k, v in params.items()}}, "msn", "m.pth")
    assert set(sd) == set(params)


def test_missing_and_garbage_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone("dino_vits16", weights=tmp_path / "nope.pth", **TINY)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError) as ei:
        build_backbone("dino_vits16", weights=bad, **TINY)
    assert str(bad) in str(ei.value)
    # a file cut in the middle
    good = tmp_path / "good.pth"
    torch.save(ref_params(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        build_backbone("dino_vits16", weights=cut, **TINY)


# ================================================================================================ architecture
def _official_dino_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def test_real_size_key_names_and_head_counts():
    s16 = build_backbone("dino_vits16", pretrained=False)
    sd = s16.model.state_dict()
    assert set(sd) == _official_dino_keys(12) and len(sd) == 150
    assert sd["pos_embed"].shape == (1, 197, 384)
    assert s16.num_heads == 6 and s16.model.blocks[0].attn.head_dim == 64
    s8 = build_backbone("dino_vits8", pretrained=False)
    assert s8.model.state_dict()["pos_embed"].shape == (1, 785, 384) and s8.num_heads == 6
    assert build_backbone("dino_vits8", pretrained=False, vit_small_heads=12).num_heads == 12
    assert build_backbone("dino_vits16", pretrained=False, num_heads=12).num_heads == 12
    assert BACKBONES["dino_vitb16"].arch["num_heads"] == 12 and BACKBONES["dino_vitb8"].arch["num_heads"] == 12
    with pytest.raises(ValueError, match="ViT-S"):
        build_backbone("dino_vitb16", pretrained=False, vit_small_heads=12, depth=1)
    # DINOv2 and MSN/iBOT small models are 6-head too; ViT-L 16, ViT-g 24
    for n, h in [("dinov2_vits14", 6), ("ibot_vits16", 6), ("msn_vits16", 6), ("dinov2_vitl14", 16),
                 ("dinov2_vitg14", 24), ("mae_vitb16", 12)]:
        assert BACKBONES[n].arch["num_heads"] == h, n


def test_vitb_registry_build_has_12_heads():
    torch.manual_seed(0)
    b = build_backbone("dino_vitb16", pretrained=False, depth=1)  # depth 1 keeps the test fast; heads from the spec
    assert b.num_heads == 12 and b.embed_dim == 768 and b.model.blocks[0].attn.head_dim == 64


def test_head_count_changes_features_on_same_weights(tmp_path):
    """D1: the same weights with 12 instead of 6 heads give different features (official CAUSE ViT-S)."""
    params = ref_params(dim=48)
    path = tmp_path / "w.pth"
    torch.save(params, path)
    six = build_backbone("dino_vits16", weights=path, embed_dim=48, depth=2, num_heads=6)
    twelve = build_backbone("dino_vits16", weights=path, embed_dim=48, depth=2, num_heads=12)
    (x,) = _images((64, 64))
    with torch.no_grad():
        a, b = six(x), twelve(x)
    assert torch.allclose(a, ref_feature_map(params, x, heads=6, patch=16), atol=2e-5)
    assert torch.allclose(b, ref_feature_map(params, x, heads=12, patch=16), atol=2e-5)
    assert (a - b).abs().max() > 1e-2


def test_dinov2_registers_are_dropped_and_keys_official(tmp_path):
    params = ref_params(patch=14, img=518, layer_scale=True, mask_token=True, registers=4)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(params, path)
    bb = build_backbone("dinov2_vits14_reg", weights=path, **TINY)
    sd = bb.model.state_dict()
    assert sd["register_tokens"].shape == (1, 4, 48) and sd["mask_token"].shape == (1, 48)
    assert "blocks.1.ls1.gamma" in sd and "blocks.1.ls2.gamma" in sd
    (x,) = _images((224, 224))
    with torch.no_grad():
        full = bb.model.forward_features((x - MEAN) / STD)
        fmap = bb(x)
    assert full.shape == (2, 1 + 4 + 256, 48)
    assert fmap.shape == (2, 48, 16, 16)
    ref = ref_forward(params, (x - MEAN) / STD, heads=3, patch=14, interp="dinov2_reg", registers=4)
    assert torch.allclose(full, ref, atol=2e-5)
    assert torch.allclose(fmap.flatten(2).transpose(1, 2), ref[:, 5:], atol=2e-5)


# ================================================================================================ interpolation
def test_interpolation_recipes_match_official_and_differ():
    g = torch.Generator().manual_seed(3)
    pe = torch.randn(1, 1 + 196, 8, generator=g)
    for H, W in [(320, 320), (224, 320), (320, 224), (480, 480)]:
        h, w = H // 16, W // 16
        dino = interpolate_pos_embed(pe, (h, w), "dino", square_input=H == W)
        assert torch.equal(dino, ref_interp_dino(pe, H, W, 16))
        reg = interpolate_pos_embed(pe, (h, w), "dinov2_reg", square_input=H == W)
        assert torch.equal(reg, ref_interp_dinov2_reg(pe, H, W, 16))
        if H == W:
            msn = interpolate_pos_embed(pe, (h, w), "msn")
            assert torch.equal(msn, ref_interp_msn(pe, H, W, 16))
            assert (msn - dino).abs().max() > 1e-3  # MSN has no +0.1: a different sampling grid
        # the +0.1 is not only about the size: size=(h, w) without it samples elsewhere
        plain = F.interpolate(pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(h, w), mode="bicubic")
        plain = plain.permute(0, 2, 3, 1).reshape(1, -1, 8)
        assert (plain - dino[:, 1:]).abs().max() > 1e-3
    # stored grid and square input: returned as is
    assert interpolate_pos_embed(pe, (14, 14), "dino") is pe
    assert interpolate_pos_embed(pe, (14, 14), "msn") is pe
    # same grid from a non-square image (not a multiple of the patch): official DINO still interpolates
    assert not torch.equal(interpolate_pos_embed(pe, (14, 14), "dino", square_input=False), pe)
    # token order is (rows, cols): a (2, 3) grid is not the transpose of (3, 2)
    a = interpolate_pos_embed(pe, (2, 3), "dino")[0, 1:].reshape(2, 3, 8)
    b = interpolate_pos_embed(pe, (3, 2), "dino")[0, 1:].reshape(3, 2, 8)
    assert a.shape == (2, 3, 8) and not torch.allclose(a, b.transpose(0, 1))


def test_msn_sizes_where_floor_rounding_fails_still_work():
    """sqrt(29²/14²)·14 = 28.999…: the official MSN code breaks there; we keep its sampling grid at the right size."""
    pe = torch.randn(1, 197, 4, generator=torch.Generator().manual_seed(0))
    for n in (29, 45):
        out = interpolate_pos_embed(pe, (n, n), "msn")
        assert out.shape == (1, 1 + n * n, 4) and torch.isfinite(out).all()
        # agrees closely with the neighbouring exact recipe (scale n/14) - same grid up to rounding
        near = F.interpolate(pe[:, 1:].reshape(1, 14, 14, 4).permute(0, 3, 1, 2), scale_factor=(n + 1e-9) / 14,
                             mode="bicubic")
        assert torch.allclose(out[:, 1:], near.permute(0, 2, 3, 1).reshape(1, -1, 4), atol=1e-5)


def test_pos_embed_cache_invalidated_when_weights_change(tmp_path):
    p1, p2 = ref_params(seed=1), ref_params(seed=2)
    torch.save(p1, tmp_path / "a.pth")
    bb = build_backbone("dino_vits16", weights=tmp_path / "a.pth", **TINY)
    (x,) = _images((320, 320))
    with torch.no_grad():
        bb(x)  # fills the cache for the 20x20 grid
        assert len(bb.model._pos_cache) == 1
        bb.model.load_state_dict(p2)
        assert torch.allclose(bb(x), ref_feature_map(p2, x, heads=3, patch=16), atol=2e-5)
        bb(x)
        bb.model.pos_embed.mul_(2.0)  # in-place change without load_state_dict: version counter moves
        p3 = dict(p2, pos_embed=p2["pos_embed"] * 2.0)
        assert torch.allclose(bb(x), ref_feature_map(p3, x, heads=3, patch=16), atol=2e-5)


# ================================================================================================ wrapper / registry
def test_backbone_is_frozen_normalises_and_stays_in_eval(tmp_path):
    params = ref_params()
    torch.save(params, tmp_path / "w.pth")
    bb = build_backbone("dino_vits16", weights=tmp_path / "w.pth", **TINY)
    assert not bb.training and all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    (x,) = _images((224, 224))
    with torch.no_grad():
        direct = bb.model.forward_features((x - MEAN) / STD)[:, 1:]
        tokens, grid = bb.forward_tokens(x)
    assert grid == (14, 14) and torch.allclose(tokens, direct, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        bb(torch.rand(3, 224, 224))
    with pytest.raises(TypeError, match="uint8"):
        bb((x * 255).to(torch.uint8))
    d = bb.describe()
    assert d["num_heads"] == 3 and d["patch_size"] == 16 and d["weights"] == str(tmp_path / "w.pth")


def test_pretrained_without_weights_raises_and_download_uses_official_url(monkeypatch):
    with pytest.raises(WeightsRequiredError) as ei:
        build_backbone("dino_vits8")
    msg = str(ei.value)
    assert "--backbone-weights" in msg and "download=True" in msg and "dino_deitsmall8_pretrain.pth" in msg
    calls = []

    def fake(url, **kw):
        calls.append((url, kw))
        return ref_params(patch=8)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    bb = build_backbone("dino_vits8", download=True, **TINY)
    assert calls[0][0] == "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    assert calls[0][1]["weights_only"] is True
    assert bb.weights_source == calls[0][0]
    with pytest.raises(ValueError, match="contradicts"):
        build_backbone("dino_vits8", weights="x.pth", pretrained=False)


def test_registry_names_urls_and_errors():
    expected = {
        "dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "ibot_vits16", "ibot_vitb16", "msn_vits16",
        "msn_vitb16", "mae_vitb16", "efficientnet_lite0",
    } | {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
    assert set(list_backbones()) == expected
    for name, spec in BACKBONES.items():
        if spec.family == "dino":
            assert spec.url.startswith("https://dl.fbaipublicfiles.com/dino/") and spec.container == "raw"
        elif spec.family == "dinov2":
            assert spec.url.startswith("https://dl.fbaipublicfiles.com/dinov2/") and spec.url.endswith(spec.file_name)
            assert ("reg4" in spec.url) == name.endswith("_reg")
            assert spec.arch["num_register_tokens"] == (4 if name.endswith("_reg") else 0)
        elif spec.family == "msn":
            assert spec.container == "target_encoder" and spec.arch["interpolation"] == "msn"
        elif spec.family == "ibot":
            assert spec.container == "state_dict"
        elif spec.family == "mae":
            assert spec.container == "model"
        if spec.is_vit:
            assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert len({s.file_name for s in BACKBONES.values()}) == len(BACKBONES)  # no hub-cache collisions
    with pytest.raises(KeyError, match="dino_vits8"):
        build_backbone("dino_vits32")
    with pytest.raises(TypeError, match="unknown override"):
        build_backbone("dino_vits16", pretrained=False, heads=3)
    with pytest.raises(TypeError, match="feature_stride"):
        build_backbone("efficientnet_lite0", pretrained=False, num_heads=2)
    with pytest.raises(ValueError, match="feature_stride"):
        build_backbone("efficientnet_lite0", pretrained=False, feature_stride=4)


# ================================================================================================ EfficientNet
def test_tf_same_padding_brute_force():
    for size in range(1, 40):
        for k in (1, 3, 5):
            for s in (1, 2):
                before, after = tf_same_pad(size, k, s)
                out = (size + before + after - k) // s + 1
                assert out == math.ceil(size / s)
                # TF: smallest total padding giving ceil(size/s), extra pixel at the end
                best = min(t for t in range(0, k + s) if (size + t - k) // s + 1 >= math.ceil(size / s)
                           and size + t >= k)
                assert before + after == best and after - before in (0, 1)
    conv = Conv2dSame(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 6, 6)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)  # TF pads 0 before, 1 after for 6 / k3 / s2
    assert torch.allclose(conv(x), want)


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


def _load01(path_or_array, size: int = 224) -> torch.Tensor:
    from PIL import Image

    im = Image.fromarray(path_or_array) if isinstance(path_or_array, np.ndarray) else Image.open(path_or_array)
    if im.format == "JPEG":
        im.draft("RGB", (size, size))
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR, reducing_gap=3.0)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0


def test_lite0_packaged_weights_load_strictly(lite0):
    path = packaged_weights_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert set(sd) == set(EfficientNetLite0().state_dict()) and len(sd) == 296
    assert lite0.weights_source == "packaged" and lite0.embed_dim == 40 and lite0.patch_size == 8
    bn = lite0.model._bn0
    assert bn.eps == 1e-3 and torch.equal(bn.running_var, sd["_bn0.running_var"])
    assert torch.equal(lite0.model._blocks[15]._project_conv.weight, sd["_blocks.15._project_conv.weight"])
    broken = dict(sd)
    broken.pop("_blocks.3._bn1.running_var")
    with pytest.raises(CheckpointError, match="_blocks.3._bn1.running_var"):
        load_state_dict_strict(EfficientNetLite0(), broken, path)


def test_lite0_classifies_chelsea_as_cat(lite0):
    from skimage import data

    x = _load01(data.chelsea())[None]
    with torch.no_grad():
        probs = lite0.logits(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probs[281:286].sum() > 0.5


def test_lite0_feature_sizes_and_cat(lite0):
    expected = {
        224: {8: (40, 28), 16: (112, 14), 32: (320, 7)},
        320: {8: (40, 40), 16: (112, 20), 32: (320, 10)},
        321: {8: (40, 41), 16: (112, 21), 32: (320, 11)},
    }
    m = lite0.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size, table in expected.items():
            x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
            maps = {s: m.features(x, s) for s in (8, 16, 32)}
            for s, (c, n) in table.items():
                assert maps[s].shape == (1, c, n, n), (size, s)
            cat = m.features(x, "cat")
            n8 = table[8][1]
            assert cat.shape == (1, 472, n8, n8)
            assert torch.equal(cat[:, :40], maps[8])
            up16 = F.interpolate(maps[16], size=(n8, n8), mode="bilinear", align_corners=False)
            up32 = F.interpolate(maps[32], size=(n8, n8), mode="bilinear", align_corners=False)
            assert torch.allclose(cat[:, 40:152], up16, atol=1e-6) and torch.allclose(cat[:, 152:], up32, atol=1e-6)
    # registry wrapper: stride choice sets channels and patch_size; runs only the blocks needed
    for stride, (c, p) in {16: (112, 16), 32: (320, 32), "cat": (472, 8)}.items():
        b = build_backbone("efficientnet_lite0", feature_stride=stride)
        assert (b.embed_dim, b.patch_size) == (c, p)
    ran: list[int] = []
    hooks = [blk.register_forward_hook(lambda mod, i, o, k=k: ran.append(k)) for k, blk in enumerate(m._blocks)]
    try:
        with torch.no_grad():
            lite0(torch.rand(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1, 2, 3, 4]  # stride 8 = end of stage 2 = block 4


def _shared_data_root() -> Path:
    try:
        from causeseg.data.root import data_root  # type: ignore[import-not-found]

        root = Path(data_root())
    except ImportError:
        env = os.environ.get("CAUSESEG_DATA_ROOT")
        root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    except Exception as exc:  # the helper may raise when the data is absent
        pytest.skip(f"shared data not available: {exc}")
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}; set CAUSESEG_DATA_ROOT")
    return root


@pytest.mark.data
def test_lite0_features_finite_and_deterministic_on_shared_data(lite0):
    """Every real image (resized to 224, centre-cropped) gives finite, non-dead stride-8 maps; the first batch of every
    set is run a second time and must give bit-identical features (a full second pass over all ~530 images would
    double the cost of this, the slowest test, for a property that does not depend on the image)."""
    root = _shared_data_root()
    files = sorted(p for p in root.rglob("*") if p.parent.name == "images" and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        pytest.skip(f"no images under {root}/*/images")
    by_set: dict[Path, list[Path]] = {}
    for f in files:
        by_set.setdefault(f.parent, []).append(f)
    checked_twice = 0
    with torch.inference_mode():
        for folder, group in by_set.items():
            for i in range(0, len(group), 16):
                batch = group[i : i + 16]
                xb = torch.stack([_load01(p) for p in batch])
                assert xb.shape == (len(batch), 3, 224, 224)
                a = lite0(xb)
                assert a.shape == (len(batch), 40, 28, 28)
                assert torch.isfinite(a).all(), batch
                assert a.abs().amax(dim=(1, 2, 3)).min() > 0, batch  # no dead (all-zero) maps
                if i == 0:
                    assert torch.equal(a, lite0(xb)), folder
                    checked_twice += len(batch)
    assert checked_twice >= min(len(files), len(by_set))
