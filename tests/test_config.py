import pytest

from pesc.errors import ConfigError
from pesc.training.config import PRESETS, RunConfig, load_config


def test_preset_then_yaml_then_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("distill_steps: 7\nlr: 0.01\nloss: l1\n")
    cfg = load_config("smoke", str(y), {"lr": "2e-4", "loss_params": "{topk: 5}"})
    assert cfg.preset == "smoke"
    assert cfg.max_length == PRESETS["smoke"]["max_length"]   # from the preset
    assert cfg.distill_steps == 7                              # from the YAML file
    assert cfg.lr == pytest.approx(2e-4)                       # CLI beats YAML, parsed as a number
    assert isinstance(cfg.lr, float)
    assert cfg.loss == "l1" and cfg.loss_params == {"topk": 5}


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("quickstart", overrides={"seed": "3"})
    cfg.save(tmp_path / "config.yaml")
    again = load_config(None, str(tmp_path / "config.yaml"))
    assert again == cfg


def test_unknown_option_and_preset_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config option.*distil_steps"):
        load_config("smoke", overrides={"distil_steps": "3"})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("smoke", str(bad))


def test_defaults_are_the_research_baseline():
    cfg = RunConfig()
    assert (cfg.loss, cfg.alpha, cfg.temperature) == ("fkl", 0.5, 2.0)
