"""Import of official CAUSE release files: strict key mapping, output parity with an official-layout reference.

The reference modules below are written here from the module description of cause-reference §6.1-6.3 (1x1 conv
reductions on the token grid, sequence-first ``nn.MultiheadAttention`` decoder, ``query_pos``); their state dicts are
saved exactly as the official scripts save ``Segment_*.state_dict()`` and ``Cluster.state_dict()``.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causeseg.backbones.checkpoint import CheckpointError
from causeseg.heads import MLPHead, TRHead
from causeseg.model import CauseModel
from causeseg.official import (
    LABEL_LEAK_NOTE,
    MLP_LAYOUT,
    TR_LAYOUT,
    import_official,
    load_official_head,
    official_linear_probe,
    read_modular,
    resolve_backbone_name,
)

C_DIM, PATCH, SIDE, K, NCLS = 16, 8, 4, 12, 5  # tiny: c=16, 4x4 token grid (32 px crops), 12 concepts, 5 classes


# ----------------------------------------------------------------------------------------- official-layout reference
def to_grid(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D, s, s) (square grid, row-major)."""
    b, n, d = t.shape
    s = math.isqrt(n)
    return t.transpose(1, 2).reshape(b, d, s, s)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, D, s, s) -> (B, s*s, D)."""
    return x.flatten(2).transpose(1, 2)


class RefReduction(nn.Module):
    """``f1`` = Conv1x1(c->r), ``f2`` = Conv1x1(c->c), ReLU, Conv1x1(c->r); applied on the token grid."""

    def __init__(self, c: int, r: int):
        super().__init__()
        self.f1 = nn.Conv2d(c, r, kernel_size=1)
        self.f2 = nn.Sequential(nn.Conv2d(c, c, kernel_size=1), nn.ReLU(), nn.Conv2d(c, r, kernel_size=1))

    def reduce(self, tokens: torch.Tensor, drop: nn.Module) -> torch.Tensor:
        g = to_grid(tokens)
        return from_grid(self.f1(drop(g)) + self.f2(drop(g)))


class RefMLPHead(RefReduction):
    def forward(self, tokens: torch.Tensor, drop: nn.Module = nn.Identity()) -> torch.Tensor:
        return self.reduce(tokens, drop)


class RefTRLayer(RefReduction):
    """Post-norm decoder layer, sequence-first attention, extra ``memory + LN3`` residual, then f1 + f2."""

    def __init__(self, c: int, r: int, hidden: int):
        super().__init__(c, r)
        self.self_attn = nn.MultiheadAttention(c, 1, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(c, 1, dropout=0.1)
        self.linear1 = nn.Linear(c, hidden)
        self.dropout = nn.Dropout(0.1)
        self.linear2 = nn.Linear(hidden, c)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, queries_sf, memory_sf, pos_sf, drop):  # all (N, B, c), pos (N, 1, c)
        qk = queries_sf + pos_sf
        x = self.norm1(queries_sf + self.dropout1(self.self_attn(qk, qk, queries_sf)[0]))
        x = self.norm2(x + self.dropout2(self.multihead_attn(x + pos_sf, memory_sf, memory_sf)[0]))
        x = x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        x = memory_sf + self.norm3(x)
        return self.reduce(x.transpose(0, 1), drop)


class RefTRHead(nn.Module):
    def __init__(self, c: int, r: int, nq: int, hidden: int):
        super().__init__()
        self.codebook = None  # plain attribute, set after loading modular.npy (not in the state dict)
        self.query_pos = nn.Parameter(torch.randn(nq, c))
        self.tr = RefTRLayer(c, r, hidden)

    def forward(self, tokens: torch.Tensor, drop: nn.Module = nn.Identity()) -> torch.Tensor:
        # naive concept assignment: for each token the codebook row of maximal cosine (raw row as query)
        b, n, _ = tokens.shape
        q = torch.empty_like(tokens)
        for i in range(b):
            for j in range(n):
                cos = torch.stack([F.cosine_similarity(tokens[i, j], m, dim=0) for m in self.codebook])
                q[i, j] = self.codebook[int(cos.argmax())]
        return self.tr(q.transpose(0, 1), tokens.transpose(0, 1), self.query_pos.unsqueeze(1), drop)


class RefProjection(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.f = conv


class RefSegment(nn.Module):
    """``Segment_MLP`` / ``Segment_TR`` module structure (reference §6.1)."""

    def __init__(self, kind: str, c: int, r: int, n_classes: int, nq: int = SIDE * SIDE, hidden: int = 24,
                 proj: int = 6):
        super().__init__()
        self.dropout = nn.Dropout(0.1)

        def make_head():
            return RefMLPHead(c, r) if kind == "mlp" else RefTRHead(c, r, nq, hidden)

        self.head = make_head()
        self.projection_head = RefProjection(nn.Conv2d(r, proj, kernel_size=1))
        self.head_ema = make_head()
        self.projection_head_ema = RefProjection(nn.Conv2d(r, proj, kernel_size=1))
        self.linear = RefProjection(nn.Conv2d(r, n_classes, kernel_size=1))


def make_reference(kind: str, r: int, seed: int = 0) -> RefSegment:
    torch.manual_seed(seed)
    ref = RefSegment(kind, C_DIM, r, NCLS)
    with torch.no_grad():  # randomise everything (biases, LayerNorm affine, ...) so that a wrong mapping shows
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    return ref.eval()


def write_official(tmp_path, kind: str, r: int, seed: int = 0, *, cluster_codebook=True):
    """Save reference artifacts as the official scripts do; return (ref, segment, cluster, modular, codebook,
    centroids)."""
    ref = make_reference(kind, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    codebook = torch.randn(K, C_DIM, generator=g)
    centroids = torch.randn(NCLS, r, generator=g)
    if kind == "tr":
        ref.head.codebook = codebook
        ref.head_ema.codebook = codebook
    seg, clu, mod = tmp_path / f"segment_{kind}.pth", tmp_path / f"cluster_{kind}.pth", tmp_path / "modular.npy"
    sd = ref.state_dict()
    assert not any("codebook" in k for k in sd)  # as in the official TR (D13)
    torch.save(sd, seg)
    torch.save({"codebook": codebook.clone(), "cluster_probe": centroids.clone()} if cluster_codebook
               else {"cluster_probe": centroids.clone()}, clu)
    np.save(mod, codebook.numpy().astype(np.float32))
    return ref, seg, clu, mod, codebook, centroids


class TinyBackbone(nn.Module):
    """Random patch embedding: images (B, 3, H, W) -> (B, c, H/8, W/8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.proj = nn.Conv2d(3, C_DIM, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x)


TINY_OPTS = {"embed_dim": C_DIM, "depth": 1, "num_heads": 2}


# ----------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("kind,layout", [("mlp", MLP_LAYOUT), ("tr", TR_LAYOUT)])
def test_layout_accounts_for_every_key_of_the_official_module(kind, layout):
    ref = make_reference(kind, 90)
    keys = set(ref.state_dict())
    required = set(layout.official_keys())
    assert required == {k for k in keys if k.startswith("head_ema.")}
    assert all(layout.is_ignored(k) for k in keys - required)
    assert not any(layout.is_ignored(k) for k in required)
    # the mapping targets are exactly our head's parameters
    ours = MLPHead(C_DIM, 90) if kind == "mlp" else TRHead(C_DIM, 90, num_queries=SIDE * SIDE, ffn_dim=24)
    assert set(layout.keys.values()) == set(ours.state_dict())


# ----------------------------------------------------------------------------------------- parity
def _images(seed: int = 3) -> torch.Tensor:
    return torch.rand(2, 3, SIDE * PATCH, SIDE * PATCH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,r", [("mlp", 90), ("tr", 10)])
def test_import_matches_reference_and_round_trips(tmp_path, kind, r):
    ref, seg, clu, mod, codebook, centroids = write_official(tmp_path, kind, r)
    out = import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "out" / "model.pt",
                          backbone_options=TINY_OPTS)
    assert out.is_file()

    tokens = torch.randn(3, SIDE * SIDE, C_DIM, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = ref.head_ema(tokens)
        head, meta = load_official_head(seg)
        got = head(tokens, codebook) if kind == "tr" else head(tokens)
    assert got.shape == (3, SIDE * SIDE, r)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with torch.no_grad():  # sanity: the student head differs, so importing the wrong module would be caught
        assert not torch.allclose(ref.head(tokens), expected, atol=1e-3)

    bb = TinyBackbone()
    model = CauseModel.load(out, backbone=bb)
    assert torch.equal(model.centroids, centroids)
    assert torch.equal(model.codebook, codebook)
    assert model.num_classes == NCLS
    imgs = _images()
    with torch.no_grad():
        y = model.embed(imgs)  # (B, r, h, w)
        feats = bb(imgs)
        ref_y = ref.head_ema(feats.flatten(2).transpose(1, 2))
    assert torch.allclose(y.flatten(2).transpose(1, 2), ref_y, atol=1e-5)

    m = model.meta
    assert m["head"]["kind"] == kind and m["head"]["in_dim"] == C_DIM and m["head"]["out_dim"] == r
    assert m["num_classes"] == NCLS and m["label_free"] is False and m["note"] == LABEL_LEAK_NOTE
    assert m["backbone"] == {"name": "dino_vits8", "weights": None, "options": TINY_OPTS, "pretrained": True}
    assert m["imported_from"]["segment"].endswith(seg.name) and m["imported_from"]["modular"].endswith("modular.npy")
    assert m["official"]["cluster_codebook_matches_modular"] is True
    if kind == "tr":
        assert m["head"]["num_queries"] == SIDE * SIDE and m["head"]["ffn_dim"] == 24
        assert m["train_resolution"] == SIDE * PATCH == m["eval_resolution"]  # inferred from query_pos
    else:
        assert m["train_resolution"] == 224 and m["eval_resolution"] == 320  # official MLP protocol


def test_tr_head_uses_the_clusterbook_from_modular(tmp_path):
    ref, seg, clu, mod, codebook, _ = write_official(tmp_path, "tr", 10)
    other = codebook.flip(0).contiguous()  # same rows, other order: different queries
    np.save(mod, other.numpy())
    out = import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                          backbone_options=TINY_OPTS)
    model = CauseModel.load(out, backbone=TinyBackbone())
    assert torch.equal(model.codebook, other)
    assert model.meta["official"]["cluster_codebook_matches_modular"] is False
    ref.head_ema.codebook = other
    imgs = _images()
    with torch.no_grad():
        feats = model.backbone(imgs)
        assert torch.allclose(model.embed(imgs).flatten(2).transpose(1, 2),
                              ref.head_ema(feats.flatten(2).transpose(1, 2)), atol=1e-5)


def test_modular_none_falls_back_to_the_cluster_codebook(tmp_path, caplog):
    _, seg, clu, _, codebook, _ = write_official(tmp_path, "mlp", 90)
    with caplog.at_level(logging.WARNING, logger="causeseg.official"):
        out = import_official(seg, clu, None, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                              backbone_options=TINY_OPTS)
    assert "no modular.npy" in caplog.text
    assert torch.equal(CauseModel.load(out, backbone=TinyBackbone()).codebook, codebook)
    sub = tmp_path / "no_codebook"
    sub.mkdir()
    _, seg2, clu2, _, _, _ = write_official(sub, "mlp", 90, cluster_codebook=False)
    with pytest.raises(ValueError, match="modular.npy"):
        import_official(seg2, clu2, None, "dino_vits8", num_classes=NCLS, out=tmp_path / "m2.pt",
                        backbone_options=TINY_OPTS)


def test_ddp_module_prefix_is_stripped(tmp_path):
    ref, seg, clu, mod, _, centroids = write_official(tmp_path, "mlp", 90)
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, seg)
    out = import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                          backbone_options=TINY_OPTS)
    assert torch.equal(CauseModel.load(out, backbone=TinyBackbone()).centroids, centroids)


def test_linear_probe_is_read_separately(tmp_path):
    ref, seg, *_ = write_official(tmp_path, "mlp", 90)
    probe = official_linear_probe(seg)
    assert probe.supervised is True
    y = torch.randn(2, 90, SIDE, SIDE)
    with torch.no_grad():
        expected = ref.linear.f(y)
        got = probe(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_missing_or_extra_key_is_reported_with_the_file(tmp_path, kind):
    ref, seg, clu, mod, *_ = write_official(tmp_path, kind, 10)
    sd = ref.state_dict()
    victim = "head_ema.f2.2.bias" if kind == "mlp" else "head_ema.tr.multihead_attn.in_proj_weight"
    broken = {k: v for k, v in sd.items() if k != victim}
    torch.save(broken, seg)
    with pytest.raises(CheckpointError) as e:
        import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                        backbone_options=TINY_OPTS)
    msg = str(e.value)
    assert str(seg) in msg and "missing keys (1)" in msg and victim in msg and "unexpected keys" not in msg

    stray = "head_ema.tr.extra_gate" if kind == "tr" else "head_ema.f3.weight"
    extra = dict(sd, **{stray: torch.zeros(3), "decoder.weight": torch.zeros(2)})
    torch.save(extra, seg)
    with pytest.raises(CheckpointError) as e:
        load_official_head(seg)
    msg = str(e.value)
    assert str(seg) in msg and "unexpected keys (2)" in msg
    assert stray in msg and "decoder.weight" in msg and "missing keys" not in msg
    assert not (tmp_path / "m.pt").exists()


def test_shape_errors_are_reported(tmp_path):
    ref, seg, clu, mod, *_ = write_official(tmp_path, "mlp", 90)
    sd = ref.state_dict()
    sd["head_ema.f1.weight"] = sd["head_ema.f1.weight"].flatten(1)  # not a 1x1 conv
    torch.save(sd, seg)
    with pytest.raises(CheckpointError, match=r"head_ema\.f1\.weight.*1x1"):
        load_official_head(seg)
    sd = ref.state_dict()
    sd["head_ema.f2.0.weight"] = torch.zeros(C_DIM + 1, C_DIM, 1, 1)  # inconsistent with f2.2
    torch.save(sd, seg)
    with pytest.raises(CheckpointError, match=r"f2\.0\.weight"):
        load_official_head(seg)


def test_cluster_file_given_as_segment_and_bad_cluster_files(tmp_path):
    _, seg, clu, mod, codebook, centroids = write_official(tmp_path, "mlp", 90)
    with pytest.raises(CheckpointError, match="not an official CAUSE segment file"):
        import_official(clu, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                        backbone_options=TINY_OPTS)
    bad = tmp_path / "cluster_bad.pth"
    torch.save({"cluster_probe": centroids, "codebook": codebook, "bank": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): bank") as e:
        import_official(seg, bad, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                        backbone_options=TINY_OPTS)
    assert str(bad) in str(e.value)
    torch.save({"codebook": codebook}, bad)
    with pytest.raises(CheckpointError, match="missing keys.*cluster_probe"):
        import_official(seg, bad, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt",
                        backbone_options=TINY_OPTS)


def test_inconsistent_inputs_are_rejected(tmp_path):
    _, seg, clu, mod, *_ = write_official(tmp_path, "tr", 10)
    kw = dict(out=tmp_path / "m.pt", backbone_options=TINY_OPTS)
    with pytest.raises(ValueError, match="--num-classes 5"):
        import_official(seg, clu, mod, "dino_vits8", num_classes=27, **kw)
    with pytest.raises(ValueError, match=r"train_resolution=32"):
        import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, train_resolution=320, **kw)
    with pytest.raises(CheckpointError, match="16-d tokens"):
        import_official(seg, clu, mod, "dino_vits8", num_classes=NCLS, out=tmp_path / "m.pt")  # real ViT-S: 384
    np.save(tmp_path / "bad.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="bad.npy.*2-D"):
        import_official(seg, clu, tmp_path / "bad.npy", "dino_vits8", num_classes=NCLS, **kw)
    with pytest.raises(ValueError, match="unknown backbone"):
        import_official(seg, clu, mod, "resnet50", num_classes=NCLS, **kw)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        import_official(seg, clu, mod, "dino_vits8", tmp_path / "nope.pth", num_classes=NCLS, **kw)
    assert not (tmp_path / "m.pt").exists()
    # num_classes=None takes C from the cluster file
    out = import_official(seg, clu, mod, "dino_vits8", num_classes=None, **kw)
    assert CauseModel.load(out, backbone=TinyBackbone()).num_classes == NCLS


def test_read_modular_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        read_modular(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy"):
        read_modular(tmp_path / "junk.npy")
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.save(tmp_path / "ok.npy", arr)
    t = read_modular(tmp_path / "ok.npy")
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(arr).float())


def test_official_backbone_names():
    assert resolve_backbone_name("dino_vit_base_8") == "dino_vitb8"
    assert resolve_backbone_name("dinov2_vit_base_14.pth") == "dinov2_vitb14"
    assert resolve_backbone_name("dino_vitb16") == "dino_vitb16"


# ----------------------------------------------------------------------------------------- CLI
def test_cli_import_official_real_vit_s_dims(tmp_path, capsys):
    """Full-size ViT-S/8 dims (c=384): the CLI path records the 12-head option (defect D1)."""
    from causeseg.cli import main

    torch.manual_seed(0)
    ref = RefSegment("mlp", 384, 90, 27, proj=4).eval()
    seg, clu, mod = tmp_path / "segment_mlp.pth", tmp_path / "cluster_mlp.pth", tmp_path / "modular.npy"
    torch.save(ref.state_dict(), seg)
    book = torch.randn(8, 384)
    torch.save({"codebook": book, "cluster_probe": torch.randn(27, 90)}, clu)
    np.save(mod, book.numpy())
    weights = tmp_path / "dino_deitsmall8_pretrain.pth"
    weights.write_bytes(b"placeholder")  # only recorded, loaded when the model is used
    out = tmp_path / "model.pt"
    rc = main(["import-official", "--segment", str(seg), "--cluster", str(clu), "--modular", str(mod),
               "--backbone", "dino_vit_small_8", "--backbone-weights", str(weights), "--out", str(out)])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == str(out)
    obj = torch.load(out, map_location="cpu", weights_only=True)
    meta = obj["meta"]
    assert meta["backbone"]["name"] == "dino_vits8" and meta["backbone"]["options"] == {"num_heads": 12}
    assert meta["backbone"]["weights"] == str(weights.resolve())
    assert meta["official"]["vit_small_heads"] == 12 and "num_heads=12" in meta["official"]["vit_small_note"]
    assert meta["num_classes"] == 27 and meta["head"]["in_dim"] == 384
    assert torch.equal(obj["head"]["f1.weight"], ref.head_ema.f1.weight.detach().flatten(1))
    from causeseg.backbones import build_backbone  # the recorded options are accepted by the builder

    bb = build_backbone(meta["backbone"]["name"], pretrained=False, **meta["backbone"]["options"])
    assert bb.num_heads == 12 and bb.embed_dim == 384
