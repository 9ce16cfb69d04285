"""`speechssl pretrain` end to end on a tiny corpus (in-process), its outputs, and its config errors."""

import json

import pytest
import torch
import yaml

from speechssl.cli import main
from speechssl.config import config_from_dict
from train_fixtures import make_corpus, tiny_recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    man = make_corpus(tmp, {"train": [6000 + 300 * i for i in range(12)], "valid": [7000, 9000, 3000]})
    return tmp, man


def test_run_writes_checkpoints_metrics_tensorboard_config(corpus, capsys):
    tmp, man = corpus
    recipe = tiny_recipe(tmp / "r.yaml", optimization={"max_update": 6}, checkpoint={"save_interval_updates": 3})
    run = tmp / "run"
    assert main(["pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "update      2 | loss" in out and "accuracy" in out and "code_perplexity" in out and "lr" in out
    assert "audio_sec_per_sec" in out and "eta" in out
    assert "1 shorter than task.min_sample_size dropped" not in out  # valid's 3000 is dropped, not train's
    assert "valid: " in out and "(1 dropped)" in out

    names = {p.name for p in run.iterdir()}
    assert {"checkpoint_1_3.pt", "checkpoint_last.pt", "checkpoint_best.pt", "config.yaml", "metrics.jsonl",
            "tb"} <= names
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert state["num_updates"] == 6 and state["config"]["task"]["data"] == str(man)
    assert set(state) >= {"model", "optimizer", "scaler", "epoch", "batch_offset", "rng", "config"}
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.optimization.max_update == 6 and cfg.model.encoder_layers == 2
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in recs if r["split"] == "train"] == [2, 4, 6]
    assert any(r["split"] == "valid" for r in recs)
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_print_config(corpus, capsys):
    tmp, man = corpus
    assert main(["pretrain", "recipes/wav2vec2_base.yaml", f"task.data={man}", "optimization.lr=1e-4",
                 "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optimization"]["lr"] == 1e-4 and cfg["task"]["data"] == str(man)


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "task.data"),  # ??? in the recipe
    (["task.data=/nonexistent/dir"], 1, "not a directory"),
    (["task.data={man}", "optimization.max_update=0"], 2, "set optimization.max_update"),
    (["task.data={man}", "common.bf16=true", "common.fp16=true"], 2, "choose one"),
    (["task.data={man}", "task.max_sample_size=2000000"], 2, "exceeds dataset.max_tokens"),
    (["task.data={man}", "optimizer.nme=adam"], 2, "did you mean 'name'"),
    (["task.data={man}", "--force"], 2, "--force only applies with --restart"),
])
def test_config_errors(corpus, capsys, args, code, message):
    tmp, man = corpus
    args = [a.format(man=man) for a in args]
    assert main(["pretrain", "recipes/wav2vec2_base.yaml", f"checkpoint.save_dir={tmp / 'bad'}", *args]) == code
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_best_checkpoint_metric(corpus, capsys):
    tmp, man = corpus
    recipe = tiny_recipe(tmp / "best.yaml", optimization={"max_update": 3}, checkpoint={"save_interval_updates": 1})
    base = ["pretrain", str(recipe), f"task.data={man}"]
    assert main(base + [f"checkpoint.save_dir={tmp / 'acc'}", "checkpoint.best_checkpoint_metric=accuracy",
                        "checkpoint.maximize_best_checkpoint_metric=true"]) == 0
    state = torch.load(tmp / "acc" / "checkpoint_best.pt", weights_only=True)
    valid = [json.loads(x) for x in (tmp / "acc" / "metrics.jsonl").read_text().splitlines() if '"valid"' in x]
    assert state["best"] == pytest.approx(max(r["accuracy"] for r in valid), abs=1e-6)
    assert main(base + [f"checkpoint.save_dir={tmp / 'wer'}", "checkpoint.best_checkpoint_metric=wer"]) == 2
    assert "'wer' is not a validation metric" in capsys.readouterr().err


def test_collapse_alarm_fires_during_training_on_a_collapsed_codebook(corpus):
    """The codebook-collapse alarm reads the training records' code perplexity (fairseq's: argmax codes
    before the gumbel noise). A quantizer frozen to pick entry 0 of each group (by a margin the noise often
    overturns) must raise it; the same run with the untouched quantizer must not."""
    from speechssl.config import load_config
    from speechssl.pretrain import build_pretraining
    from speechssl.train.loop import RunOptions, run_training
    from speechssl.train.metrics import HealthMonitor

    tmp, man = corpus
    recipe = tiny_recipe(tmp / "collapse.yaml", optimization={"max_update": 4},
                         checkpoint={"save_interval_updates": 4})

    def run(name, collapse):
        def build(cfg):
            setup = build_pretraining(cfg)
            q = setup.model.quantizer
            if collapse:
                with torch.no_grad():
                    q.weight_proj.weight.zero_()
                    q.weight_proj.bias.zero_()
                    q.weight_proj.bias.view(q.groups, q.num_vars)[:, 0] = 2.0
                q.weight_proj.requires_grad_(False)
            setup.health = HealthMonitor(codebook_size=q.groups * q.num_vars, collapse_start_update=1)
            return setup

        cfg = load_config(str(recipe), [f"task.data={man}", f"checkpoint.save_dir={tmp / name}"])
        run_training(cfg, build, RunOptions())
        recs = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r["split"] == "train"]

    collapsed = run("collapsed", True)
    assert all(r["code_perplexity"] == pytest.approx(2.0, abs=1e-3) for r in collapsed)
    assert all(any("codebook collapse" in a for a in r["alarms"]) for r in collapsed)
    assert all(r["prob_perplexity"] > 5 for r in collapsed)  # the softmax is spread: only the argmax collapsed
    healthy = run("healthy", False)
    assert all(not any("codebook collapse" in a for a in r["alarms"]) for r in healthy)


def test_probe_at_validation_points_is_logged_with_the_valid_record(corpus, tmp_path):
    """probe.* settings: a speaker-ID probe of the model being trained runs at the validation points
    (probe.interval_updates apart) and its valid accuracy goes into the valid records; it leaves the
    training itself unchanged (same losses as a run without the probe)."""
    tmp, man = corpus
    spk = tmp_path / "spk"
    spk.mkdir()
    for split in ("train", "valid"):
        lines = (man / f"{split}.tsv").read_text().splitlines()
        (spk / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        (spk / f"{split}.spk").write_text("".join(f"s{i % 2}\n" for i in range(len(lines) - 1)))
    (spk / "dict.spk.txt").write_text("s0 6\ns1 6\n")
    recipe = tiny_recipe(tmp / "probe.yaml", optimization={"max_update": 4}, checkpoint={"save_interval_updates": 2})
    base = ["pretrain", str(recipe), f"task.data={man}"]
    assert main(base + [f"checkpoint.save_dir={tmp_path / 'p'}", f"probe.data={spk}", "probe.interval_updates=4",
                        "probe.updates=20"]) == 0
    assert main(base + [f"checkpoint.save_dir={tmp_path / 'n'}"]) == 0
    probed, plain = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                     for d in ("p", "n"))
    valid = {r["update"]: r for r in probed if r["split"] == "valid"}
    assert sorted(valid) == [2, 4] and "probe_accuracy" not in valid[2]
    assert 0.0 <= valid[4]["probe_accuracy"] <= 100.0 and valid[4]["probe_seconds"] > 0
    train = [(r["update"], r["loss"]) for r in probed if r["split"] == "train"]
    assert train == [(r["update"], r["loss"]) for r in plain if r["split"] == "train"]
    assert main(base + [f"checkpoint.save_dir={tmp_path / 'x'}", f"probe.data={tmp_path}"]) == 2  # no labels there
