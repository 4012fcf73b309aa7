import re
from pathlib import Path

import pytest
import yaml

from causeseg.config import CONFIG_DIR, ConfigError, list_presets, load_config, save_config


def test_presets_cover_the_paper_grid():
    names = set(list_presets())
    for ds, phi in (("cocostuff27", 0.3), ("cityscapes27", 0.3), ("voc", 0.2), ("coco81", 0.4), ("coco171", 0.55)):
        for bb in ("dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "dinov2_vitb14"):
            for head in ("mlp", "tr"):
                name = f"{ds}_{bb}_{head}"
                assert name in names
                cfg = load_config(name)
                assert cfg.step2.phi_pos == phi and cfg.step2.phi_neg == 0.1
                assert cfg.step2.head == head and cfg.backbone.name == bb
                assert cfg.step1.k == 2048 and cfg.step2.reduced_dim == 90


def test_official_schedules():
    tr = load_config("cocostuff27_dino_vitb8_tr")
    mlp = load_config("cocostuff27_dino_vitb8_mlp")
    city = load_config("cityscapes27_dino_vits8_tr")
    v2 = load_config("cocostuff27_dinov2_vitb14_tr")
    assert (tr.step2.resolution, tr.step2.grad_clip, tr.step3.epochs) == (320, 2.0, 5)
    assert (mlp.step2.resolution, mlp.step2.grad_clip, mlp.step3.epochs) == (224, 0.1, 1)
    assert (city.step2.weight_decay, city.step2.grad_clip) == (0.0, 1.0)
    assert v2.step1.resolution == 322 and v2.eval.resolution == 322
    assert load_config("voc_dino_vitb8_tr").data.mode == "squash"


def test_overrides_and_errors(tmp_path):
    cfg = load_config("cocostuff27_dino_vitb8_tr", ["step2.phi_pos=0.5", "backbone.options={num_heads: 12}"])
    assert cfg.step2.phi_pos == 0.5 and cfg.backbone.options == {"num_heads": 12}
    with pytest.raises(ConfigError, match="unknown key 'step2.nope'"):
        load_config(None, ["step2.nope=1"])
    with pytest.raises(ConfigError, match="phi_neg"):
        load_config(None, ["step2.phi_pos=0.05"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config("does_not_exist")
    with pytest.raises(ConfigError, match="step3.init"):
        load_config(None, ["step3.init=random"])
    with pytest.raises(ConfigError, match="step3.gamma"):
        load_config(None, ["step3.gamma=0"])
    with pytest.raises(ConfigError, match="step2.bank_impl"):
        load_config(None, ["step2.bank_impl=cuda"])


@pytest.mark.parametrize("override, message", [
    ("step2.epochs=abc", "step2.epochs='abc' must be of type int"),
    ("step2.epochs=2.5", "must be of type int"),
    ("step2.ema_warmup=1", "step2.ema_warmup=1 must be of type bool"),
    ("step2.use_bank=maybe", "must be of type bool"),
    ("step2.lr=fast", "step2.lr='fast' must be of type float"),
    ("step2.loss_chunk=x", "step2.loss_chunk='x' must be of type int"),
    ("backbone.options=3", "must be of type dict"),
])
def test_values_are_type_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_numbers_convert_to_float_fields_and_none_passes_optional():
    cfg = load_config(None, ["step2.lr=1e-3", "step2.tau=1", "step2.loss_chunk=null", "run.seed=3"])
    assert cfg.step2.lr == 1e-3 and isinstance(cfg.step2.lr, float)
    assert cfg.step2.tau == 1.0 and isinstance(cfg.step2.tau, float)
    assert cfg.step2.loss_chunk is None and cfg.run.seed == 3


def test_base_inheritance_and_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("step1: {k: 64}\nstep2: {phi_pos: 0.4}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nstep2: {head: mlp}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.step1.k, cfg.step2.phi_pos, cfg.step2.head) == (64, 0.4, "mlp")
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["step1"]["k"] == 64


def test_config_dir_is_the_repo_configs():
    assert CONFIG_DIR == Path(__file__).resolve().parents[1] / "src" / "causeseg" / "configs"
