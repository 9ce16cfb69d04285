"""CTC fine-tuning: the pipeline learns, freezing, resume, pretrained loading, objective, blank alarm."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctc_fixtures import make_tone_corpus, tiny_ctc_recipe
from speechssl.config import Config, ConfigError, load_config
from speechssl.data.dataset import ManifestError
from speechssl.train.checkpoint import load_checkpoint, save_checkpoint
from speechssl.train.loop import RunOptions, run_training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tone_corpus(tmp_path_factory.mktemp("tones") / "data", num_train=24)


def _finetune(tmp_path, corpus, name="run", **sections):
    from speechssl.tasks.ctc import build_ctc_finetuning

    rec = tiny_ctc_recipe(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **sections)
    cfg = load_config(rec)
    run_training(cfg, build_ctc_finetuning, RunOptions())
    return tmp_path / name


def _pretrained_checkpoint(path, seed=0):
    """A speechssl pretraining checkpoint of the tiny wav2vec 2.0 (random weights)."""
    from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config

    torch.manual_seed(seed)
    cfg = Config(model=wav2vec2_tiny_config())
    model = Wav2Vec2Model(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "num_updates": 10}, path)
    return model


def test_upstream_normalisation_is_required_of_the_finetuning_task(tmp_path, corpus):
    """fairseq's Wav2VecEncoder asserts task.normalize == the upstream's: a task.normalize=true upstream (as
    LARGE) fine-tuned with normalize false (the ctc_base_* recipes) is refused, naming both values."""
    from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
    from speechssl.tasks.ctc import build_ctc_finetuning

    ckpt = tmp_path / "pre_normalized.pt"
    cfg = Config(model=wav2vec2_tiny_config())
    cfg.task.normalize = True
    save_checkpoint({"model": Wav2Vec2Model(cfg.model).state_dict(), "config": cfg.to_dict()}, ckpt)
    rec = tiny_ctc_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", model={"w2v_path": str(ckpt)},
                          task={"normalize": False})
    with pytest.raises(ConfigError, match=r"task.normalize=false, but the upstream model.w2v_path=.*pre_normalized"
                                          r"\.pt was pretrained with task.normalize=true.*set task.normalize=true"):
        build_ctc_finetuning(load_config(rec))
    setup = build_ctc_finetuning(load_config(rec, ["task.normalize=true"]))
    assert setup.train_data.normalize  # the audio is normalised as in pretraining
    _pretrained_checkpoint(tmp_path / "pre_plain.pt")  # task.normalize false
    rec = tiny_ctc_recipe(tmp_path / "r2.yaml", corpus, tmp_path / "run2",
                          model={"w2v_path": str(tmp_path / "pre_plain.pt")}, task={"normalize": True})
    with pytest.raises(ConfigError, match="task.normalize=true, but the upstream"):
        build_ctc_finetuning(load_config(rec))


def test_tiny_model_learns_to_transcribe(tmp_path, corpus, one_thread):
    from speechssl.tasks.ctc_eval import evaluate_ctc

    run = _finetune(tmp_path, corpus, optimization={"max_update": 160, "lr": 3e-3},
                    dataset={"validate_interval_updates": 80})
    records = [r for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "valid"]
    assert [r["update"] for r in records] == [80, 160]
    assert records[-1]["wer"] < records[0]["wer"] or records[0]["wer"] < 20
    # best checkpoint by WER, self-contained: evaluated without the recipe, on unseen sentences
    report = evaluate_ctc(run / "checkpoint_best.pt", corpus, "test", tmp_path / "eval", quiet=True)
    assert report["num_utterances"] == 6
    assert report["cer"] < 10.0 and report["wer"] < 20.0, report
    assert set(report["per_speaker"]) == {"s1", "s2"}


def test_missing_labels_is_a_clear_error(tmp_path, corpus):
    from speechssl.tasks.ctc import build_ctc_finetuning

    rec = tiny_ctc_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run", dataset={"valid_subset": "nolabels"})
    (corpus / "nolabels.tsv").write_text((corpus / "valid.tsv").read_text())
    with pytest.raises(ManifestError, match=r"nolabels\.ltr: label file not found"):
        build_ctc_finetuning(load_config(rec))
    rec = tiny_ctc_recipe(tmp_path / "r2.yaml", corpus, tmp_path / "run", task={"labels": ["km"]})
    with pytest.raises(ConfigError, match=r"\[ltr\]"):
        build_ctc_finetuning(load_config(rec))


def test_freezing_and_resume(tmp_path, corpus, one_thread):
    """Extractor never updated; upstream unchanged during freeze_finetune_updates, trained after; a run
    interrupted and resumed ends with exactly the weights of an uninterrupted one."""
    ckpt = tmp_path / "pre.pt"
    pre = _pretrained_checkpoint(ckpt)
    model = {"w2v_path": str(ckpt), "feature_grad_mult": 0.0, "freeze_finetune_updates": 3,
             "apply_mask": True, "mask_prob": 0.3, "mask_channel_prob": 0.2, "mask_channel_length": 8,
             "encoder_layerdrop": 0.1}
    common = {"deterministic": True}
    sched = {"total_num_update": 6}  # the same LR schedule for the 3-update start and the 6-update runs
    frozen = _finetune(tmp_path, corpus, "frozen", model=model, common=common,
                       lr_scheduler=sched, optimization={"max_update": 3, "lr": 1e-3})
    w = load_checkpoint(frozen / "checkpoint_last.pt")["model"]
    ref = pre.state_dict()
    upstream = {k: v for k, v in w.items() if k.startswith("w2v_model.")}
    assert upstream and all(torch.equal(v, ref[k[len("w2v_model."):]]) for k, v in upstream.items())
    assert "w2v_model.quantizer.vars" not in w  # pretraining heads removed
    # resume the same run to 6 updates (the freeze ends at update 3)
    resumed = _finetune(tmp_path, corpus, "frozen", model=model, common=common,
                        lr_scheduler=sched, optimization={"max_update": 6, "lr": 1e-3})
    straight = _finetune(tmp_path, corpus, "straight", model=model, common=common,
                         lr_scheduler=sched, optimization={"max_update": 6, "lr": 1e-3})
    a = load_checkpoint(resumed / "checkpoint_last.pt")
    b = load_checkpoint(straight / "checkpoint_last.pt")
    assert a["num_updates"] == b["num_updates"] == 6
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    w6 = b["model"]
    fe = [k for k in w6 if k.startswith("w2v_model.feature_extractor.")]
    assert fe and all(torch.equal(w6[k], ref[k[len("w2v_model."):]]) for k in fe)
    enc = [k for k in w6 if k.startswith("w2v_model.encoder.")]
    assert any(not torch.equal(w6[k], ref[k[len("w2v_model."):]]) for k in enc)
    # the stored config is self-contained: the upstream's architecture and the vocabulary
    cfg = a["config"]
    assert cfg["model"]["encoder_embed_dim"] == pre.cfg.encoder_embed_dim and cfg["task"]["vocab"][0] == "<s>"


def test_load_pretrained(tmp_path):
    from speechssl.models.ctc import build_ctc_model
    from speechssl.models.pretrained import load_pretrained

    ckpt = tmp_path / "pre.pt"
    pre = _pretrained_checkpoint(ckpt)
    model, cfg = load_pretrained(ckpt, {"dropout": 0.0, "encoder_layerdrop": 0.2})
    assert cfg.dropout == 0.0 and cfg.encoder_layerdrop == 0.2
    x = torch.randn(2, 8000)
    model.eval(), pre.eval()
    torch.testing.assert_close(model(x, mask=False, features_only=True)["x"], pre(x, mask=False, features_only=True)["x"])
    # from a fine-tuned checkpoint: its upstream, heads removed
    ctc = build_ctc_model(dataclasses.replace(cfg, w2v_path=str(ckpt)), 10)
    ft = tmp_path / "ft.pt"
    save_checkpoint({"model": ctc.state_dict(), "config": Config(model=cfg).to_dict()}, ft)
    up, _ = load_pretrained(ft)
    up.eval()
    assert up.quantizer is None
    torch.testing.assert_close(up(x, mask=False, features_only=True)["x"], pre(x, mask=False, features_only=True)["x"])
    with pytest.raises(ConfigError, match="unknown model setting"):
        load_pretrained(ckpt, {"dropuot": 0.1})
    bad = tmp_path / "fairseq.pt"
    torch.save({"args": None, "weights": torch.zeros(2)}, bad)
    with pytest.raises(ConfigError, match="speechssl import"):
        load_pretrained(bad)


def test_ctc_objective_fp32_and_zero_infinity():
    from speechssl.models import wav2vec2_tiny_config
    from speechssl.models.ctc import build_ctc_model
    from speechssl.objectives.ctc import CtcCriterion
    from speechssl.text.vocab import Vocabulary

    vocab = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B"], "letter")
    cfg = dataclasses.replace(wav2vec2_tiny_config(), mask_prob=0.0)
    model = build_ctc_model(cfg, len(vocab))
    crit = CtcCriterion(vocab)
    # 0.5 s = 24 frames; the second target (40 symbols) cannot fit: zero_infinity drops it
    batch = {"source": torch.randn(2, 8000), "padding_mask": None,
             "target": torch.tensor([[5, 6, 4] + [1] * 37, [5] * 40]), "target_lengths": torch.tensor([3, 40]),
             "target_text": ["AB", "A"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(model, batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    alone = crit(model, {**batch, "source": batch["source"][:1], "target": batch["target"][:1],
                         "target_lengths": batch["target_lengths"][:1], "target_text": ["AB"]})
    model.eval()
    ev = crit(model, batch)
    assert {"w_errors", "w_total", "c_errors", "c_total", "emit_ratio", "frame_std_ratio"} <= set(ev.logs)
    assert ev.logs["w_total"] == 2
    assert float(out.sample_size) == 43
    assert torch.isfinite(alone.loss)


def test_blank_alarm_names_causes():
    from speechssl.train.metrics import HealthMonitor

    h = HealthMonitor(blank_alarm_update=100)
    assert h.check({"update": 50, "emit_ratio": 0.0, "loss": 3.0}) == []
    alarms = h.check({"update": 150, "emit_ratio": 0.01, "loss": 3.0})
    assert len(alarms) == 1 and "only blanks" in alarms[0]
    for cause in ("optimization.lr", "freeze_finetune_updates", "vocabulary"):
        assert cause in alarms[0]
    assert h.check({"update": 200, "emit_ratio": 0.8, "loss": 3.0}) == []


def test_frame_std_ratio_tells_a_collapsed_encoder_from_one_that_reads_its_input():
    from speechssl.objectives.ctc import frame_std_ratio

    torch.manual_seed(0)
    lengths = torch.tensor([50, 30])
    reading = torch.randn(2, 50, 8) * 3  # the output follows the input: it changes from frame to frame
    assert 0.8 < float(frame_std_ratio(reading, lengths)) < 1.2
    collapsed = torch.randn(1, 1, 8).expand(2, 50, 8) * 5 + 0.01 * torch.randn(2, 50, 8)  # one vector everywhere
    assert float(frame_std_ratio(collapsed, lengths)) < 0.01
    # padding frames do not count: garbage after the valid frames leaves the collapsed ratio unchanged
    padded = collapsed.clone()
    padded[1, 30:] = 100 * torch.randn(20, 8)
    assert float(frame_std_ratio(padded, lengths)) == pytest.approx(float(frame_std_ratio(collapsed, lengths)), rel=1e-5)


def test_blank_alarm_says_when_the_encoder_collapsed():
    from speechssl.train.metrics import HealthMonitor

    h = HealthMonitor(blank_alarm_update=100)
    for ratio in (0.01, 0.18):  # the stuck runs measured on the demo corpus
        collapsed = h.check({"update": 150, "emit_ratio": 0.0, "frame_std_ratio": ratio, "loss": 3.0})
        assert len(collapsed) == 1 and "collapsed" in collapsed[0] and "optimization.lr" in collapsed[0]
    waiting = h.check({"update": 150, "emit_ratio": 0.0, "frame_std_ratio": 0.6, "loss": 3.0})
    assert len(waiting) == 1 and "collapsed" not in waiting[0] and "plateau for hundreds" in waiting[0]
    assert h.check({"update": 50, "emit_ratio": 0.0, "frame_std_ratio": 0.01, "loss": 3.0}) == []


def test_hubert_upstream_fine_tunes(tmp_path, corpus):
    """A HuBERT pretraining checkpoint loads (load_pretrained) and becomes a CTC model's upstream."""
    from speechssl.models import build_model, hubert_tiny_config
    from speechssl.models.ctc import build_ctc_model, resolve_finetune_config
    from speechssl.models.pretrained import load_pretrained

    cfg = Config(model=hubert_tiny_config())
    hub = build_model(cfg.model)
    ckpt = tmp_path / "hubert.pt"
    save_checkpoint({"model": hub.state_dict(), "config": cfg.to_dict()}, ckpt)
    up, up_cfg = load_pretrained(ckpt)
    assert up_cfg.name == "hubert" and type(up).__name__ == "HubertModel"
    ft_cfg = resolve_finetune_config(dataclasses.replace(Config().model, w2v_path=str(ckpt), mask_prob=0.2))
    assert ft_cfg.name == "hubert" and ft_cfg.encoder_embed_dim == hub.cfg.encoder_embed_dim and ft_cfg.mask_prob == 0.2
    ctc = build_ctc_model(ft_cfg, 9)
    ctc.eval()
    out = ctc(torch.randn(2, 8000), None)
    assert out["logits"].shape == (2, 24, 9)
    hub.eval()
    x = torch.randn(1, 8000)
    torch.testing.assert_close(ctc.w2v_model(x, mask=False, features_only=True)["x"],
                               hub(x, mask=False, features_only=True)["x"])


@pytest.mark.parametrize("name,lr,updates,freeze,channel,layerdrop", [
    ("ctc_base_10m", 5e-5, 13000, 10000, 0.25, 0.1),
    ("ctc_base_1h", 5e-5, 13000, 10000, 0.25, 0.1),
    ("ctc_base_10h", 5e-5, 20000, 10000, 0.5, 0.05),
    ("ctc_base_100h", 3e-5, 80000, 0, 0.5, 0.1),
])
def test_recipes_match_published(name, lr, updates, freeze, channel, layerdrop):
    cfg = load_config(f"{name}.yaml", ["task.data=x"])
    assert (cfg.optimization.lr, cfg.optimization.max_update, cfg.model.freeze_finetune_updates) == (lr, updates, freeze)
    assert (cfg.model.mask_channel_prob, cfg.model.encoder_layerdrop) == (channel, layerdrop)
    assert cfg.model.mask_prob == 0.65 and cfg.model.mask_channel_length == 64 and cfg.model.feature_grad_mult == 0.0
    s = cfg.lr_scheduler
    assert s.name == "tri_stage" and list(s.phase_ratio) == [0.1, 0.4, 0.5] and s.final_lr_scale == 0.05
    assert cfg.optimizer.adam_eps == 1e-8 and cfg.dataset.max_tokens == 3_200_000
    assert cfg.task.labels == ["ltr"] and cfg.checkpoint.best_checkpoint_metric == "wer"
    assert cfg.criterion.name == "ctc" and cfg.criterion.zero_infinity


def test_finetune_cli_dispatch(tmp_path, capsys):
    from speechssl.cli import main

    assert main(["finetune", "ctc_tiny.yaml", "task.data=x", "--print-config"]) == 0
    assert "audio_finetuning" in capsys.readouterr().out
    assert main(["finetune", "wav2vec2_tiny.yaml", "task.data=x"]) == 2
    assert "not a fine-tuning task" in capsys.readouterr().err


def test_validation_blank_alarm_points_at_masking():
    from speechssl.objectives.ctc import CtcCriterion
    from speechssl.text.vocab import Vocabulary

    crit = CtcCriterion(Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "A"], "letter"), blank_alarm_update=100)
    stats = {"w_errors": 5.0, "w_total": 5.0, "c_errors": 9.0, "c_total": 9.0, "emit_ratio": 0.0}
    crit.num_updates = 50
    assert crit.derived_metrics(stats) == {"wer": 100.0, "cer": 100.0}
    crit.num_updates = 150
    alarms = crit.derived_metrics(stats)["alarms"]
    assert "only blanks" in alarms[0] and "model.apply_mask=false" in alarms[0]
    assert "alarms" not in crit.derived_metrics({**stats, "emit_ratio": 0.7})


def test_no_pretrained_weights_takes_the_architecture_not_the_weights(tmp_path, corpus):
    """model.w2v_path + model.no_pretrained_weights: the from-scratch baseline of an experiment gets the
    upstream's architecture (here a non-default encoder width) with fresh weights, and no normalisation
    check (nothing of the upstream is used but its shape)."""
    from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
    from speechssl.tasks.ctc import build_ctc_finetuning

    ckpt = tmp_path / "pre.pt"
    cfg = Config(model=dataclasses.replace(wav2vec2_tiny_config(), encoder_embed_dim=64, encoder_ffn_embed_dim=80))
    cfg.task.normalize = True
    pre = Wav2Vec2Model(cfg.model)
    save_checkpoint({"model": pre.state_dict(), "config": cfg.to_dict()}, ckpt)
    rec = tiny_ctc_recipe(tmp_path / "r.yaml", corpus, tmp_path / "run",
                          model={"w2v_path": str(ckpt), "no_pretrained_weights": True})
    setup = build_ctc_finetuning(load_config(rec))
    up = setup.model.w2v_model
    assert up.cfg.encoder_embed_dim == 64 and up.cfg.no_pretrained_weights
    ref = pre.state_dict()
    assert not torch.equal(up.state_dict()["encoder.layers.0.fc1.weight"], ref["encoder.layers.0.fc1.weight"])
    loaded = build_ctc_finetuning(load_config(rec, ["model.no_pretrained_weights=false", "task.normalize=true"]))
    assert torch.equal(loaded.model.w2v_model.state_dict()["encoder.layers.0.fc1.weight"],
                       ref["encoder.layers.0.fc1.weight"])


def test_no_pretrained_weights_takes_the_architecture_of_a_pretraining_recipe(tmp_path, corpus):
    """model.w2v_path may name the pretraining recipe for the from-scratch baseline: the same architecture
    and the same initial weights (same seed) as from a checkpoint of that recipe, with no pretraining run;
    without model.no_pretrained_weights a recipe is refused (it has no weights)."""
    import yaml

    from speechssl.config import _to_plain
    from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
    from speechssl.tasks.ctc import build_ctc_finetuning

    arch = dataclasses.replace(wav2vec2_tiny_config(), encoder_embed_dim=64, encoder_ffn_embed_dim=80)
    recipe = tmp_path / "pretrain_arch.yaml"
    recipe.write_text(yaml.safe_dump({"base": "wav2vec2_tiny.yaml", "model": _to_plain(dataclasses.asdict(arch))}))
    ckpt = tmp_path / "pre.pt"
    pre_cfg = load_config(recipe)
    save_checkpoint({"model": Wav2Vec2Model(pre_cfg.model).state_dict(), "config": pre_cfg.to_dict()}, ckpt)
    built = {}
    for name, path in (("recipe", recipe), ("checkpoint", ckpt)):
        rec = tiny_ctc_recipe(tmp_path / f"{name}.yaml", corpus, tmp_path / name,
                              model={"w2v_path": str(path), "no_pretrained_weights": True})
        torch.manual_seed(3)
        built[name] = build_ctc_finetuning(load_config(rec)).model
    assert built["recipe"].w2v_model.cfg.encoder_embed_dim == 64
    a, b = built["recipe"].state_dict(), built["checkpoint"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = tiny_ctc_recipe(tmp_path / "weights.yaml", corpus, tmp_path / "w", model={"w2v_path": str(recipe)})
    with pytest.raises(ConfigError, match="no_pretrained_weights=true"):
        build_ctc_finetuning(load_config(rec))
    # a recipe by name, as everywhere else
    from speechssl.config import ModelConfig
    from speechssl.models.ctc import resolve_finetune_config

    named = resolve_finetune_config(ModelConfig(w2v_path="wav2vec2_mel_tiny.yaml", no_pretrained_weights=True))
    assert named.extractor_mode == "fbank" and named.encoder_layers == 6
