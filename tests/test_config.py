"""Recipe loading: base chains, typed overrides, fairseq spellings, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from speechssl.config import (
    BASE_CONV_LAYERS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_yaml,
    load_config,
    missing_keys,
    parse_literal,
    require_set,
    save_config,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_base_recipe_matches_published_values():
    cfg = load_config(RECIPES / "wav2vec2_base.yaml", ["task.data=/data/manifests"])
    assert cfg.model.conv_feature_layers == BASE_CONV_LAYERS
    assert cfg.model.encoder_layers == 12 and cfg.model.encoder_embed_dim == 768
    assert cfg.model.latent_temp == (2.0, 0.5, 0.999995)
    assert cfg.model.mask_prob == 0.65 and cfg.model.mask_length == 10
    assert cfg.optimizer.adam_betas == (0.9, 0.98)
    assert cfg.optimizer.adam_eps == pytest.approx(1e-6)
    assert cfg.optimization.lr == pytest.approx(5e-4)  # fairseq's [0.0005]
    assert cfg.optimization.update_freq == 1  # fairseq's [1]
    assert cfg.dataset.max_tokens == 1_400_000
    assert cfg.criterion.loss_weights == [0.1, 10.0]
    assert cfg.task.data == "/data/manifests"
    assert missing_keys(cfg) == []


def test_large_extends_base_and_overrides_only_what_it_sets():
    base = load_config(RECIPES / "wav2vec2_base.yaml")
    large = load_config(RECIPES / "wav2vec2_large.yaml")
    assert large.model.extractor_mode == "layer_norm" and large.model.layer_norm_first
    assert large.model.encoder_layers == 24 and large.model.encoder_embed_dim == 1024
    assert large.model.latent_temp == (2.0, 0.1, 0.999995)
    assert large.criterion.loss_weights == [0.1, 0.0]
    # inherited unchanged from the base recipe
    assert large.model.mask_prob == base.model.mask_prob
    assert large.optimizer == base.optimizer
    assert large.checkpoint.save_interval_updates == base.checkpoint.save_interval_updates


def test_missing_marker_must_be_set():
    cfg = load_config(RECIPES / "wav2vec2_base.yaml")
    assert missing_keys(cfg) == ["task.data"]
    with pytest.raises(ConfigError, match=r"task\.data=\.\.\."):
        require_set(cfg)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "common.bf16=true",
            "optimization.lr=1e-4",  # YAML reads this as a string: still a float
            "optimization.update_freq=[4]",
            "dataset.max_tokens=1.4e6",
            "model.conv_feature_layers=[(64, 10, 5)] + [(64, 3, 2)] * 2",
            "model.latent_temp=[2, 0.5, 0.999]",
            "task.labels=[ltr]",
            "task.max_sample_size=null",
            "checkpoint.save_dir=runs/x",
        ],
    )
    assert cfg.common.bf16 is True
    assert cfg.optimization.lr == pytest.approx(1e-4) and isinstance(cfg.optimization.lr, float)
    assert cfg.optimization.update_freq == 4
    assert cfg.dataset.max_tokens == 1_400_000 and isinstance(cfg.dataset.max_tokens, int)
    assert cfg.model.conv_feature_layers == [(64, 10, 5), (64, 3, 2), (64, 3, 2)]
    assert cfg.model.latent_temp == (2.0, 0.5, 0.999)
    assert cfg.task.labels == ["ltr"]
    assert cfg.task.max_sample_size is None
    assert cfg.checkpoint.save_dir == "runs/x"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("common.bf16=maybe", "common.bf16: expected bool"),
        ("dataset.max_tokens=12.5", "dataset.max_tokens: expected int"),
        ("optimization.lr=fast", "optimization.lr: expected float"),
        ("model.latent_temp=[2, 0.5]", "model.latent_temp: expected a list of 3 values"),
        ("model.conv_feature_layers=__import__('os')", "model.conv_feature_layers: expected a list"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "command line" in str(err.value)


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"optimization": {"max_updates": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    msg = str(err.value)
    assert str(recipe) in msg and "optimization.max_updates" in msg and "did you mean 'max_update'" in msg


def test_unknown_section_and_override_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'optimisation'.*did you mean 'optimization'"):
        load_config(write(tmp_path / "r.yaml", {"optimisation": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="command line.*model.encoder_layer'.*did you mean 'encoder_layers'"):
        load_config(None, ["model.encoder_layer=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=3"])


def test_base_chain_is_relative_to_the_child_and_errors_name_the_right_file(tmp_path):
    (tmp_path / "sub").mkdir()
    grand = write(tmp_path / "grand.yaml", {"model": {"encoder_layers": 2, "encoder_embed_dim": 64}})
    write(tmp_path / "sub" / "parent.yaml", "base: ../grand.yaml\nmodel:\n  encoder_layers: 3\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: parent.yaml\noptimization:\n  lr: [0.01]\n")
    cfg = load_config(child, ["model.encoder_embed_dim=48"])
    assert cfg.model.encoder_layers == 3  # parent wins over grandparent
    assert cfg.model.encoder_embed_dim == 48  # command line wins over files
    assert cfg.optimization.lr == pytest.approx(0.01)
    write(grand, {"model": {"encoder_layerz": 2}})
    with pytest.raises(ConfigError, match=f"{grand}.*encoder_layerz"):
        load_config(child)


def test_base_loop_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*not found"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_names_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_fairseq_name_alias_and_strings(tmp_path):
    recipe = write(
        tmp_path / "fs.yaml",
        "model:\n  _name: hubert\noptimizer:\n  _name: adam\n  adam_betas: (0.9,0.98)\n  adam_eps: 1e-08\n",
    )
    cfg = load_config(recipe)
    assert cfg.model.name == "hubert" and cfg.optimizer.name == "adam"
    assert cfg.optimizer.adam_betas == (0.9, 0.98) and cfg.optimizer.adam_eps == pytest.approx(1e-8)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(RECIPES / "wav2vec2_large.yaml", ["task.data=/d", "common.seed=7"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(config_to_yaml(Config()), str)
    assert not list(tmp_path.glob(".*.tmp"))


def test_parse_literal_refuses_code():
    assert parse_literal("[(512, 10, 5)] + [(512, 3, 2)] * 2") == [(512, 10, 5), (512, 3, 2), (512, 3, 2)]
    for text in ["__import__('os').system('true')", "open('x')", "[1] * 10**9", "x"]:
        with pytest.raises((ValueError, SyntaxError)):
            parse_literal(text)


def test_cli_config_prints_and_refuses_overwrite(tmp_path, capsys):
    from speechssl.cli import main

    assert main(["config", str(RECIPES / "wav2vec2_base.yaml"), "optimization.lr=3e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimization"]["lr"] == pytest.approx(3e-4)
    out = tmp_path / "c.yaml"
    out.write_text("mine")
    assert main(["config", str(RECIPES / "wav2vec2_base.yaml"), "--out", str(out)]) == 1
    assert out.read_text() == "mine"
    assert main(["config", str(RECIPES / "wav2vec2_base.yaml"), "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["model"]["encoder_layers"] == 12
    assert main(["config", str(RECIPES / "wav2vec2_base.yaml"), "model.nope=1"]) == 2
    assert "did you mean" in capsys.readouterr().err
