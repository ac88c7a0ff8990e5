"""Training config schema: every shipped config loads and validates; overrides; errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmvl_core.errors import ConfigError
from training.config import RunConfig, apply_overrides, config_problems, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "training" / "configs"
ALL_YAML = sorted(CONFIG_DIR.glob("*.yaml"))
PRETRAIN = [p for p in ALL_YAML if "kind: encoder_pretrain" in p.read_text()]
SHIPPED = [p for p in ALL_YAML if p not in PRETRAIN]


def test_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    for required in ("ct_chest_3b_pretrain", "ct_chest_3b_finetune_lora", "ct_chest_3b_finetune_full",
                     "ct_m3dclip_3b_pretrain", "medmvl_2d_3b_pretrain", "tiny_ct_pretrain_cpu",
                     "tiny_ct_finetune_lora_cpu", "tiny_scratch_cpu"):
        assert required in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert config_problems(cfg) == []
    assert cfg.data.datasets and cfg.data.datasets[0].path


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
def test_encoder_pretrain_configs_load_and_are_refused_as_run_configs(path):
    from training.encoder_pretrain import load_pretrain_config

    cfg = load_pretrain_config(path)
    assert cfg.encoder.type == "convvit3d" and cfg.data.labels
    with pytest.raises(ConfigError, match="medmvl-train encoder"):
        load_config(path)


def test_released_recipes_match_medmvl():
    # MedM-VL examples/MedM-VL-CT-Chest/pretrain_en.sh: siglip + attn_pooling + mlp2x_gelu, lr 1e-3, batch 16
    ct = load_config(CONFIG_DIR / "ct_chest_3b_pretrain.yaml")
    assert ct.model.encoder_image.type == "siglip" and ct.model.connector_image.type == "attn_pooling"
    assert ct.model.connector_image.options["name"] == "mlp2x_gelu"
    assert (ct.tune.llm, ct.tune.encoder_image, ct.tune.connector_image) == ("frozen", "frozen", "full")
    assert ct.train.lr == 1e-3 and ct.train.micro_batch_size == 16
    m3d = load_config(CONFIG_DIR / "ct_m3dclip_3b_pretrain.yaml")
    assert m3d.model.encoder_image3d.type == "m3dclip" and m3d.model.connector_image3d.type == "spatial_pooling"
    lora = load_config(CONFIG_DIR / "ct_chest_3b_finetune_lora.yaml")
    assert lora.tune.llm == "lora" and lora.tune.lora.r == 128 and lora.model.init_from


def test_overrides_dotted_lists_and_types():
    cfg = load_config(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml",
                      ["train.lr=2e-5", "tune.lora.r=4", "tune.lora.target_modules=[q_proj,v_proj]",
                       "data.datasets.0.ratio=0.5", "model.llm.path=/x/llm", "log.peak_tflops=989"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.tune.lora.r == 4 and cfg.tune.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.datasets[0].ratio == 0.5
    assert cfg.model.llm.path == "/x/llm"
    assert cfg.log.peak_tflops == 989.0


def test_override_appends_dataset():
    raw = apply_overrides({"data": {"datasets": [{"path": "a.json"}]}}, ["data.datasets.1={path: b.json, ratio: 2}"])
    assert raw["data"]["datasets"][1] == {"path": "b.json", "ratio": 2}


def test_unknown_keys_and_bad_types_reported_together():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml", ["train.lrr=1", "train.epochs=abc", "tune.llmm=x"])
    msg = str(ei.value)
    assert "train.lrr: unknown key" in msg and "train.epochs" in msg and "tune.llmm" in msg


def test_semantic_problems_listed():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml",
                    ["tune.llm=half", "train.precision=fp8", "tune.connector_image=frozen", "train.lr=0",
                     "data.datasets=[]"])
    msg = str(ei.value)
    for part in ("tune.llm: 'half'", "train.precision: 'fp8'", "train.lr", "data.datasets"):
        assert part in msg


def test_cache_needs_frozen_encoder():
    with pytest.raises(ConfigError, match="cache_encoder_outputs"):
        load_config(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml", ["tune.encoder_image=full"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml", ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_scratch_needs_tokenizer():
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(CONFIG_DIR / "tiny_scratch_cpu.yaml", ["model.tokenizer=null"])


@pytest.mark.parametrize("path", sorted((CONFIG_DIR.parent / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    c = ClusterConfig.from_yaml_file(str(path))
    ds = c.deepspeed_config or {}
    if ds.get("deepspeed_config_file"):
        import json

        conf = json.loads((CONFIG_DIR.parent.parent / ds["deepspeed_config_file"]).read_text())
        assert conf["zero_optimization"]["stage"] in (2, 3)
        assert conf["gradient_accumulation_steps"] == "auto"


def test_accelerate_setups_shipped():
    names = {p.stem for p in (CONFIG_DIR.parent / "accelerate").glob("*.yaml")}
    assert {"single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= names


def test_train_cli_reports_config_errors(tmp_path, capsys):
    from training.cli import main

    assert main(["--config", str(CONFIG_DIR / "tiny_ct_pretrain_cpu.yaml"), "tune.llm=half"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training config") and "tune.llm" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
