"""Ranges checked in one place when a config is resolved (speechssl/config_check.py), and the command-line
habits around recipes: overrides after options, recipes by name, a warm-up longer than the run."""

import typing

import pytest

from speechssl import config_check
from speechssl.cli import main
from speechssl.config import RECIPE_DIR, SECTIONS, ConfigError, load_config
from speechssl.config_check import RANGES, shortest_input
from train_fixtures import make_corpus, tiny_recipe

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))

# the list (key=value -> what the message must say), plus the other counts and sizes
OUT_OF_RANGE = [
    ("optimization.lr=-1", "optimization.lr=-1.0: must be > 0"),
    ("optimization.lr=nan", "optimization.lr=nan: must be a finite number"),
    ("optimization.lr=inf", "optimization.lr=inf: must be a finite number"),
    ("dataset.num_workers=-3", "dataset.num_workers=-3: must be >= 0"),
    ("model.mask_prob=2.0", "model.mask_prob=2.0: must be in [0, 1)"),
    ("model.encoder_embed_dim=250",
     "model.encoder_embed_dim=250: must be divisible by model.encoder_attention_heads=4"),
    ("model.num_negatives=0", "model.num_negatives=0: wav2vec 2.0 pretraining needs >= 1 distractor"),
    ("model.mask_length=0", "model.mask_length=0: must be >= 1"),
    ("task.max_sample_size=0", "task.max_sample_size=0: must be >= 1, or null (no crop)"),
    ("task.max_sample_size=100", "task.max_sample_size=100: must be >= 330, the receptive field"),
    ("model.extractor_mode=fbank task.max_sample_size=500", "task.max_sample_size=500: must be >= 560, of the "
     "log-mel front-end"),
    ("model.frame_padding=some", "model.frame_padding=some: must be one of auto, all_samples, conv_length"),
    ("optimizer.weight_decay_scope=most", "optimizer.weight_decay_scope=most: must be one of matrices, all"),
    ("optimization.max_update=-5", "optimization.max_update=-5: must be >= 0"),
    ("dataset.batch_size=0", "dataset.batch_size=0: must be >= 1"),
    ("dataset.batch_size=-1", "dataset.batch_size=-1: must be >= 1"),
    ("dataset.max_tokens=0", "dataset.max_tokens=0: must be >= 1"),
    ("dataset.required_batch_size_multiple=0", "dataset.required_batch_size_multiple=0: must be >= 1"),
    ("optimization.update_freq=0", "optimization.update_freq=0: must be >= 1"),
    ("common.log_interval=0", "common.log_interval=0: must be >= 1"),
    ("common.seed=-1", "common.seed=-1: must be >= 0"),
    ("model.dropout=1.5", "model.dropout=1.5: must be in [0, 1)"),
    ("optimizer.adam_betas=[0.9,1.2]", "optimizer.adam_betas=[0.9, 1.2]: every value must be in [0, 1)"),
    ("lr_scheduler.name=linear", "lr_scheduler.name=linear: must be one of polynomial_decay, tri_stage, cosine"),
    ("common.device=gpu", "common.device=gpu: must be auto, cpu, cuda or cuda:N"),
    ("distributed_training.nproc=0", "distributed_training.nproc=0: must be >= 1"),
    ("task.max_sample_size=500000", "task.max_sample_size=500000 exceeds dataset.max_tokens=192000"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE)
def test_out_of_range_settings_are_config_errors_naming_key_value_and_range(override, message, capsys):
    with pytest.raises(ConfigError) as err:
        load_config("wav2vec2_tiny", override.split())
    assert message in str(err.value)
    # the same one line from the command line, exit status 2, no traceback
    assert main(["config", "wav2vec2_tiny", *override.split()]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err + captured.out


DATA2VEC2_OUT_OF_RANGE = [
    ("model.clone_batch=0", "model.clone_batch=0: must be >= 1"),
    ("model.ema_end_decay=1.5", "model.ema_end_decay=1.5: must be in [0, 1]"),
    ("model.decoder_input_dropout=1.0", "model.decoder_input_dropout=1.0: must be in [0, 1)"),
    ("model.loss_scale=0", "model.loss_scale=0.0: must be > 0, or null"),
    ("model.prenet_depth=6", "model.prenet_depth=6: must be < model.encoder_layers=6"),
    ("model.average_top_k_layers=7", "model.average_top_k_layers=7: the targets average the top layers after "
                                     "the prenet, at most"),
    ("model.decoder_dim=100", "model.decoder_dim=100: must be divisible by model.decoder_groups=16"),
    ("model.mask_prob_adjust=0.6", "model.mask_prob=0.5 + model.mask_prob_adjust=0.6: must be < 1"),
    ("task.enable_padding=true", "task.enable_padding=true: data2vec 2.0 pretraining crops every batch"),
    ("criterion.name=wav2vec", "criterion.name=wav2vec: data2vec 2.0 pretraining (model.name=data2vec2) uses "
                               "criterion.name=data2vec2"),
    ("model.layer_norm_first=true", "model.layer_norm_first=true: speechssl's data2vec 2.0 is post-LN"),
]


@pytest.mark.parametrize("override, message", DATA2VEC2_OUT_OF_RANGE)
def test_data2vec2_settings_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("data2vec2_tiny", ["task.data=/data", *override.split()])
    assert message in str(err.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("wav2vec2_tiny", ["optimization.lr=-1", "dataset.num_workers=-3", "model.mask_prob=2"])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid settings:" and len(lines) == 4


def test_training_commands_refuse_before_any_work(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": [8000] * 4, "valid": [8000]})
    save_dir = tmp_path / "run"
    for command in ("pretrain", "finetune"):
        recipe = "wav2vec2_tiny" if command == "pretrain" else "ctc_tiny"
        args = [command, recipe, f"task.data={man}", f"checkpoint.save_dir={save_dir}", "model.mask_length=0"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"speechssl {command}: config error: model.mask_length=0: must be >= 1" in err
        assert not save_dir.exists()  # nothing started


def test_every_recipe_is_in_range():
    for name in RECIPES:
        load_config(name, ["task.data=/data"])


def test_every_setting_has_a_rule():
    free = {"tensorboard_logdir", "data", "label_dir", "vocab", "spm_model", "vocab_specials", "w2v_path", "log_keys"}
    for section, cls in SECTIONS.items():
        for key, tp in typing.get_type_hints(cls).items():
            if tp is not bool and key not in free:
                assert key in RANGES[section], f"{section}.{key} has no range rule"


def test_name_sets_are_the_implementations():
    from speechssl.models import MODEL_NAMES
    from speechssl.models.components import ACTIVATIONS, EXTRACTOR_MODES
    from speechssl.models.frontend import FBANK_MODE
    from speechssl.models.masking import MASK_TYPES
    from speechssl.models.speaker import POOLINGS
    from speechssl.models.wav2vec2 import FRAME_PADDING_RULES
    from speechssl.objectives import OBJECTIVE_NAMES
    from speechssl.train.optim import WEIGHT_DECAY_SCOPES

    assert set(config_check.MODELS) == set(MODEL_NAMES)
    assert set(config_check.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(config_check.EXTRACTOR_MODES) == {*EXTRACTOR_MODES, FBANK_MODE}
    assert set(config_check.FRAME_PADDING) == set(FRAME_PADDING_RULES)
    assert set(config_check.WEIGHT_DECAY_SCOPES) == set(WEIGHT_DECAY_SCOPES)
    from speechssl.tasks.probe import TASKS

    assert set(config_check.PROBE_TASKS) == set(TASKS)
    assert set(config_check.MASK_SELECTIONS) == set(MASK_TYPES)
    assert set(config_check.POOLINGS) == set(POOLINGS)
    assert set(OBJECTIVE_NAMES) <= set(config_check.CRITERIA)


@pytest.mark.parametrize("mode", ["default", "fbank"])
def test_shortest_input_is_the_front_ends(mode):
    import torch

    from speechssl.config import ModelConfig
    from speechssl.models.frontend import build_feature_extractor

    cfg = ModelConfig(conv_feature_layers=[(8, 20, 10), (8, 4, 4), (8, 2, 2)], extractor_mode=mode, fbank_stack=3)
    n, _ = shortest_input(cfg)
    extractor = build_feature_extractor(cfg)
    assert extractor(torch.randn(1, n)).shape[1] == 1  # (batch, frames, channels): one frame
    with pytest.raises(ValueError):
        extractor(torch.randn(1, n - 1))


# --------------------------------------------------------------------------------------------------
# command-line habits (item 7)
# --------------------------------------------------------------------------------------------------


def test_recipe_by_name(capsys):
    assert main(["config", "wav2vec2_tiny"]) == 0
    assert "encoder_embed_dim: 256" in capsys.readouterr().out
    assert main(["config", "wav2vec2_tiny.yaml", "model.encoder_layers=3"]) == 0
    assert "encoder_layers: 3" in capsys.readouterr().out
    assert main(["config", "wav2vec2_tinny"]) == 2
    assert "recipe not found: wav2vec2_tinny" in capsys.readouterr().err


def test_overrides_after_options(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert main(["config", "wav2vec2_tiny", "--out", str(out), "model.encoder_layers=3", "optimization.lr=1e-4"]) == 0
    text = out.read_text()
    assert "encoder_layers: 3" in text and "lr: 0.0001" in text
    # the command line's order is kept: the later of two values wins
    assert main(["config", "wav2vec2_tiny", "model.encoder_layers=5", "--force", "--out", str(out),
                 "model.encoder_layers=6"]) == 0
    assert "encoder_layers: 6" in out.read_text()
    capsys.readouterr()
    # anything else after the options is still an error, with the command's usage
    with pytest.raises(SystemExit) as exit_:
        main(["config", "wav2vec2_tiny", "--out", str(out), "stray"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: speechssl config" in err and "unrecognized arguments: stray" in err


def test_pretrain_override_after_restart_flag(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": [8000] * 6, "valid": [8000]})
    recipe = tiny_recipe(tmp_path / "tiny.yaml", optimization={"max_update": 2},
                         checkpoint={"save_interval_updates": 0})
    run = tmp_path / "run"
    assert main(["pretrain", str(recipe), "--restart", f"task.data={man}", f"checkpoint.save_dir={run}"]) == 0
    assert (run / "checkpoint_last.pt").exists()


def test_warmup_longer_than_the_run_warns_and_runs(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": [8000] * 6, "valid": [8000]})
    recipe = tiny_recipe(tmp_path / "tiny.yaml", optimization={"max_update": 3}, lr_scheduler={"warmup_updates": 10},
                         checkpoint={"save_interval_updates": 0})
    assert main(["pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={tmp_path / 'run'}"]) == 0
    captured = capsys.readouterr()
    assert "warning: lr_scheduler.warmup_updates=10 >= 3 updates (optimization.max_update)" in captured.err
    assert "done: update 3" in captured.out
