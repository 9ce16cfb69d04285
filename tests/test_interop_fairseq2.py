"""fairseq2 wav2vec 2.0 checkpoints and asset cards, both ways.

Without fairseq2 (the main environment): name/config mapping round trips and export -> import.
With fairseq2 0.8.1 (``tools/test_fairseq2.sh`` runs this file in ``.venv-fairseq2``, torch 2.9.1):
fairseq2's own hub loads the exported card and its encoder outputs == speechssl's; a model fairseq2
creates imports into speechssl with the same outputs. BASE (post-LN, group norm) and LARGE-LV60 (pre-LN,
layer norm, conv bias) layouts, padded batches, eval mode.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import yaml

from speechssl.interop.common import Loaded, check_and_build, imported_config
from speechssl.interop.fairseq2 import (
    _merge, _preset, config_from_fairseq2, export_fairseq2, fairseq2_config, from_fairseq2_state_dict,
    import_fairseq2, to_fairseq2_state_dict,
)

from test_interop_common import STYLES, TOL, features, max_diff, padded_batch, tiny_model

HAVE_FAIRSEQ2 = importlib.util.find_spec("fairseq2") is not None
needs_fairseq2 = pytest.mark.skipif(not HAVE_FAIRSEQ2, reason="fairseq2 is not installed in this environment; "
                                    "tools/test_fairseq2.sh runs these tests in .venv-fairseq2")
pytestmark = pytest.mark.usefixtures("one_thread")


def loaded_of(model) -> Loaded:
    return Loaded(model, model, imported_config(model.cfg), False, 7)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_names_and_config_round_trip(style):
    model = tiny_model("wav2vec2", style)
    weights = to_fairseq2_state_dict(model.state_dict(), model.cfg, 7)
    assert int(weights["quantizer.num_updates"]) == 7
    assert ("encoder.layer_norm.weight" in weights) == (style == "large")
    assert ("encoder_frontend.layer_norm.weight" in weights) == (style == "base")
    back = from_fairseq2_state_dict(weights, "test")
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    arch, over = fairseq2_config(model.cfg)
    cfg = config_from_fairseq2(_merge(_preset(arch), over, "test"), "test")
    for field in ("extractor_mode", "conv_feature_layers", "conv_bias", "encoder_layers", "encoder_embed_dim",
                  "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos",
                  "conv_pos_groups", "final_dim", "latent_vars", "latent_groups", "latent_temp", "mask_prob",
                  "feature_grad_mult", "encoder_layerdrop", "dropout"):
        assert getattr(cfg, field) == getattr(model.cfg, field), field


@pytest.mark.parametrize("style", sorted(STYLES))
def test_export_then_import(tmp_path, style):
    model = tiny_model("wav2vec2", style)
    name = export_fairseq2(loaded_of(model), tmp_path / f"w2v_{style}")
    card = yaml.safe_load((tmp_path / f"w2v_{style}" / f"{name}.yaml").read_text())
    assert card["model_family"] == "wav2vec2" and card["checkpoint"] == "model.pt"
    state, cfg, num_updates = import_fairseq2(tmp_path / f"w2v_{style}")
    assert num_updates == 7
    back = check_and_build(state, cfg, "test")
    source, padding_mask, _ = padded_batch()
    assert max_diff(features(back, source, padding_mask)["x"], features(model, source, padding_mask)["x"]) == 0


def test_refuses_models_fairseq2_cannot_hold(tmp_path):
    from speechssl.interop.common import InteropError

    hubert = tiny_model("hubert", "base")
    with pytest.raises(InteropError, match="wav2vec 2.0 only"):
        export_fairseq2(loaded_of(hubert), tmp_path / "h")
    assert not (tmp_path / "h").exists()


# --------------------------------------------------------------------------------------------------
# Against fairseq2 itself
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asset_root(tmp_path_factory):
    """Export both layouts into one asset folder before fairseq2 reads its asset store (it reads the
    cards of FAIRSEQ2_USER_ASSET_DIR, recursively, once)."""
    root = tmp_path_factory.mktemp("fairseq2_assets")
    models = {}
    for style in STYLES:
        models[style] = tiny_model("wav2vec2", style)
        export_fairseq2(loaded_of(models[style]), root / f"speechssl_tiny_{style}")
    os.environ["FAIRSEQ2_USER_ASSET_DIR"] = str(root)
    os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")
    return root, models


def fairseq2_encoder(model, source, lengths):
    """fairseq2 Wav2Vec2Model inference: frontend (no masking) + encoder, on a padded batch."""
    from fairseq2.nn import BatchLayout

    layout = BatchLayout.of(source, [int(n) for n in lengths])
    with torch.no_grad():
        seqs, layout2, _ = model.encoder_frontend.extract_features(source, layout)
        seqs, _ = model.encoder_frontend.process_features(seqs, layout2, None)
        return model.encoder(seqs, layout2), layout2


@needs_fairseq2
@pytest.mark.parametrize("style", sorted(STYLES))
def test_fairseq2_loads_the_export(asset_root, style):
    from fairseq2.models.wav2vec2 import get_wav2vec2_model_hub

    _, models = asset_root
    model = models[style]
    fs2 = get_wav2vec2_model_hub().load_model(f"speechssl_tiny_{style}", device=torch.device("cpu")).eval()
    source, padding_mask, lengths = padded_batch()
    ours = features(model, source, padding_mask)
    theirs, layout = fairseq2_encoder(fs2, source, lengths)
    valid = ~ours["padding_mask"]
    assert list(layout.seq_lens) == valid.sum(1).tolist()
    assert max_diff(theirs, ours["x"], valid) < TOL
    with torch.no_grad():  # pretraining heads too: quantized targets of the same features
        q = fs2.quantizer.entries.view(model.cfg.latent_groups, model.cfg.latent_vars, -1)
        assert torch.equal(q, model.quantizer.vars.view_as(q))


@needs_fairseq2
@pytest.mark.parametrize("arch", ["base", "large_lv60k"])
def test_import_a_fairseq2_model(tmp_path, arch):
    from fairseq2.models.wav2vec2 import create_wav2vec2_model, get_wav2vec2_model_hub

    over = {"encoder_config": {"model_dim": 48, "feature_dim": 32, "num_encoder_layers": 2,
                               "num_encoder_attn_heads": 4, "ffn_inner_dim": 96, "pos_conv_kernel_size": 16,
                               "num_pos_conv_groups": 4,
                               "feature_extractor_layer_descs": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2},
            "final_dim": 32, "quantized_dim": 32, "num_codebook_entries": 8}
    config = get_wav2vec2_model_hub().get_arch_config(arch)
    for key, value in over.items():
        if key == "encoder_config":
            for k, v in value.items():
                setattr(config.encoder_config, k, [tuple(x) for x in v] if k.endswith("descs") else v)
        else:
            setattr(config, key, value)
    torch.manual_seed(3)
    fs2 = create_wav2vec2_model(config).eval()
    with torch.no_grad():
        for n, p in fs2.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "fs2_model"
    folder.mkdir()
    torch.save({"model": fs2.state_dict()}, folder / "model.pt")
    card = {"name": "fs2_tiny", "model_family": "wav2vec2", "model_arch": arch, "model_config": over,
            "checkpoint": "model.pt"}
    (folder / "fs2_tiny.yaml").write_text(yaml.safe_dump(card))
    state, cfg, _ = import_fairseq2(folder)
    ours = check_and_build(state, cfg, "test")
    assert cfg.model.layer_norm_first == (arch == "large_lv60k")
    source, padding_mask, lengths = padded_batch()
    out = features(ours, source, padding_mask)
    theirs, _ = fairseq2_encoder(fs2, source, lengths)
    assert max_diff(theirs, out["x"], ~out["padding_mask"]) < TOL
