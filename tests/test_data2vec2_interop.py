"""data2vec interop: parity with transformers' ``Data2VecAudioModel`` (the data2vec 1.0 audio encoder, where the
architectures coincide), transformers import / export round trips (pretraining and CTC, padded batches), and
fairseq data2vec 2.0 checkpoints (``data2vec_multi``, synthetic, in fairseq's names) through the restricted
unpickler (speechssl/interop/data2vec.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechssl.cli import main
from speechssl.interop.common import load_speechssl
from speechssl.models import Data2Vec2Model, data2vec2_tiny_config
from speechssl.models.ctc import Wav2VecCtc
from speechssl.models.speaker import upstream_hidden_states
from test_interop_common import LETTERS, VOCAB, features, max_diff, padded_batch, save_ctc, save_model
from test_interop_fairseq import omegaconf  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def hf_config(**overrides):
    """A small transformers Data2VecAudioConfig (conv bias on, so every mapped tensor matters)."""
    return transformers.Data2VecAudioConfig(**{**dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, conv_dim=[32, 32, 32],
        conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], conv_bias=True, num_conv_pos_embeddings=3,
        conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4, mask_time_prob=0.05), **overrides})


def hf_model(cls=None, seed=0, **overrides):
    torch.manual_seed(seed)
    model = (cls or transformers.Data2VecAudioModel)(hf_config(**overrides)).eval()
    with torch.no_grad():  # perturb norm affines and biases so that a wrong mapping shows
        for n, p in model.named_parameters():
            if "layer_norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_hidden(hf, source, padding_mask):
    with torch.no_grad():
        return hf(source, attention_mask=(~padding_mask).long(), output_hidden_states=True).hidden_states


def tiny_d2v(seed=0, **overrides) -> Data2Vec2Model:
    """A tiny data2vec 2.0 with random weights everywhere, the teacher and decoder included."""
    torch.manual_seed(seed)
    model = Data2Vec2Model(dataclasses.replace(data2vec2_tiny_config(), **overrides))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------


def test_encoder_matches_transformers_data2vec_audio_at_every_layer():
    """Same weights, padded batch: the Transformer input and every layer's output within 1e-4 (speechssl's
    data2vec with use_alibi_encoder=false and transformers' zeroing of padded frames)."""
    from speechssl.interop.data2vec import config_from_transformers, with_teacher_from_encoder
    from speechssl.models.weights import convert_reference_state_dict

    hf = hf_model()
    cfg = config_from_transformers(hf.config)
    assert not cfg.use_alibi_encoder and cfg.pos_conv_zero_padding and cfg.conv_pos_width == 15
    ours = Data2Vec2Model(cfg).eval()
    state = convert_reference_state_dict({k: v for k, v in hf.state_dict().items() if k != "masked_spec_embed"},
                                         keep_projection=True)
    state.update({k: v for k, v in ours.state_dict().items() if k.startswith("decoder.")})
    assert not ours.load_state_dict(with_teacher_from_encoder(state), strict=True).missing_keys
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        states, frame_pad = upstream_hidden_states(ours, source, padding_mask)
    theirs = hf_hidden(hf, source, padding_mask)
    assert len(states) == len(theirs) == 4
    valid = ~frame_pad
    for i, (a, b) in enumerate(zip(states, theirs)):
        assert max_diff(a, b, valid) < TOL, i


def test_transformers_model_imports_and_exports_exactly(tmp_path):
    hf = hf_model()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    imported = tmp_path / "d2v.pt"
    assert main(["import", str(src), "--from", "hf", "--out", str(imported)]) == 0
    loaded = load_speechssl(imported)
    assert loaded.cfg.model.name == "data2vec2" and not loaded.is_ctc
    state = loaded.model.state_dict()
    teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    assert teacher and all(torch.equal(v, state["encoder." + k]) for k, v in teacher.items())  # starts as a copy
    source, padding_mask, _ = padded_batch()
    ours = features(loaded.model, source, padding_mask)
    valid = ~ours["padding_mask"]
    assert max_diff(ours["x"], hf_hidden(hf, source, padding_mask)[-1], valid) < TOL
    out = tmp_path / "back"
    assert main(["export", str(imported), "--to", "hf", "--out", str(out)]) == 0
    back, info = transformers.Data2VecAudioModel.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) == {"masked_spec_embed"}  # fine-tuning mask
    original = hf.state_dict()
    for k, v in back.state_dict().items():
        if k != "masked_spec_embed":
            assert torch.equal(v, original[k]), k
    assert max_diff(hf_hidden(back.eval(), source, padding_mask)[-1], hf_hidden(hf, source, padding_mask)[-1],
                    valid) == 0


def test_ctc_round_trip_through_transformers(tmp_path):
    upstream = tiny_d2v(use_alibi_encoder=False, pos_conv_zero_padding=True, mask_prob=0.05)
    torch.manual_seed(1)
    ctc = Wav2VecCtc(upstream, upstream.cfg, len(VOCAB))
    with torch.no_grad():
        ctc.proj.weight.normal_(0, 1.0)
    ctc.eval()
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, upstream.cfg)
    out = tmp_path / "hf_ctc"
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out)]) == 0
    hf, info = transformers.Data2VecAudioForCTC.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= {"data2vec_audio.masked_spec_embed"}
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        ours = ctc(source, padding_mask)
        theirs = hf.eval()(source, attention_mask=(~padding_mask).long()).logits
    valid = ~ours["padding_mask"]
    assert max_diff(ours["logits"], theirs, valid) < TOL  # the same output rows (vocab.json renames the blank)
    back = tmp_path / "back.pt"
    assert main(["import", str(out), "--from", "hf", "--out", str(back)]) == 0
    loaded = load_speechssl(back)
    assert loaded.is_ctc and loaded.vocab == VOCAB and loaded.cfg.model.name == "data2vec2"
    mine = ctc.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.model.state_dict().items())  # exact round trip
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], ours["logits"], valid) == 0


def test_exports_refuse_what_the_target_cannot_compute(tmp_path, capsys):
    ckpt = save_model(tmp_path / "alibi.pt", tiny_d2v())
    for target in ("hf", "torchaudio", "onnx", "fairseq2"):
        assert main(["export", str(ckpt), "--to", target, "--out", str(tmp_path / target)]) == 1
        err = capsys.readouterr().err
        assert "data2vec" in err or "ALiBi" in err, (target, err)
        assert not (tmp_path / target).exists()
    assert "ALiBi" in (main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "x")]) and
                       capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# fairseq
# --------------------------------------------------------------------------------------------------

_BLOCK = {"self_attn.qkv_proj": "attn.qkv", "self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1",
          "final_layer_norm": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
A = "modality_encoders.AUDIO."


def fairseq_encoder_name(key: str, prenet: int) -> str:
    """An encoder parameter name (without ``encoder.``) in fairseq's Data2VecMultiModel, written out here from
    fairseq's module structure (AudioEncoder, BlockEncoder, AltBlock) independently of the code under test."""
    parts = key.split(".")
    if parts[0] == "pos_conv":  # Sequential(TransposeLast, Sequential(Conv1d, ...) x depth, TransposeLast)
        return f"{A}relative_positional_encoder.{int(parts[2]) + 1}.0.{parts[-1]}"
    if parts[0] == "layer_norm":
        return f"{A}context_encoder.norm.{parts[-1]}"
    if parts[0] == "alibi_scale":
        return f"{A}alibi_scale"
    layer, rest = int(parts[1]), ".".join(parts[2:-1])
    inner = f"{_BLOCK[rest]}.{parts[-1]}"
    return f"{A}context_encoder.blocks.{layer}.{inner}" if layer < prenet else f"blocks.{layer - prenet}.{inner}"


def fairseq_weights(model: Data2Vec2Model, prefix: str = "", ema: bool = True) -> dict:
    cfg = model.cfg
    out, teacher = {}, {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key.startswith("feature_extractor.conv_layers."):
            name = f"{A}local_encoder.conv_layers.{parts[2]}." + ("0" if parts[3] == "conv" else "2.1") + f".{parts[4]}"
        elif key.startswith("feature_projection."):  # Sequential(TransposeLast, LayerNorm, Linear)
            name = f"{A}project_features.{'1' if parts[1] == 'layer_norm' else '2'}.{parts[-1]}"
        elif key.startswith("decoder.blocks."):  # Sequential(Conv1d, SamePad, ..., GELU)
            name = f"{A}decoder.blocks.{parts[2]}.0.{parts[3]}"
        elif key.startswith("decoder.proj."):
            name = f"{A}decoder.proj.{parts[-1]}"
        elif key.startswith("teacher."):
            name = fairseq_encoder_name(key[len("teacher."):], cfg.prenet_depth)
            teacher[name] = value.view(1, 1, -1, 1, 1).clone() if name.endswith("alibi_scale") else value.clone()
            continue
        else:
            name = fairseq_encoder_name(key[len("encoder."):], cfg.prenet_depth)
            value = value.view(1, 1, -1, 1, 1) if name.endswith("alibi_scale") else value
        out[prefix + name] = value.clone()
    if ema:
        out[prefix + "_ema"] = teacher
    return out


def fairseq_section(model: Data2Vec2Model) -> dict:
    c = model.cfg
    spec = " + ".join(f"[({ch}, {k}, {s})]" for ch, k, s in c.conv_feature_layers)
    depth = c.encoder_layers - c.prenet_depth
    return {
        "_name": "data2vec_multi", "loss_beta": 0.0, "loss_scale": None, "depth": depth, "embed_dim": c.encoder_embed_dim,
        "num_heads": c.encoder_attention_heads, "mlp_ratio": c.encoder_ffn_embed_dim / c.encoder_embed_dim,
        "norm_eps": 1e-5, "encoder_dropout": 0.1, "post_mlp_drop": 0.1, "attention_dropout": 0.1,
        "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.05, "layer_norm_first": False,
        "average_top_k_layers": c.average_top_k_layers, "clone_batch": c.clone_batch,
        "instance_norm_target_layer": True, "layer_norm_target_layer": False, "ema_decay": 0.999,
        "ema_end_decay": 0.99999, "ema_anneal_end_step": 75000, "ema_encoder_only": False, "max_update": 400000,
        "supported_modality": "AUDIO", "min_target_var": 0.1, "min_pred_var": 0.01, "seed": "${common.seed}",
        "modalities": {"audio": {
            "type": "AUDIO", "extractor_mode": "layer_norm", "feature_encoder_spec": spec,
            "conv_pos_width": c.conv_pos_width, "conv_pos_groups": c.conv_pos_groups,
            "conv_pos_depth": c.conv_pos_depth, "conv_pos_pre_ln": False, "prenet_depth": c.prenet_depth,
            "mask_prob": 0.5, "mask_prob_adjust": 0.05, "mask_length": 3, "mask_noise_std": 0.01,
            "inverse_mask": False, "use_alibi_encoder": True, "learned_alibi_scale": True,
            "learned_alibi_scale_per_head": True, "prenet_dropout": 0.1, "prenet_layerdrop": 0.05,
            "num_alibi_heads": "${model.num_heads}", "model_depth": "${model.depth}",
            "decoder": {"decoder_dim": c.decoder_dim, "decoder_groups": c.decoder_groups,
                        "decoder_kernel": c.decoder_kernel, "decoder_layers": c.decoder_layers,
                        "input_dropout": 0.1}},
            "image": {"type": "IMAGE", "prenet_depth": 2}, "text": {"type": "TEXT"}},
    }


@pytest.mark.parametrize("prenet", [0, 1])
def test_import_synthetic_fairseq_data2vec2_checkpoint(tmp_path, omegaconf, prenet):  # noqa: F811
    model = tiny_d2v(prenet_depth=prenet, average_top_k_layers=2)
    assert any(not torch.equal(model.teacher.state_dict()[k], v) for k, v in model.encoder.state_dict().items())
    src = tmp_path / "fairseq.pt"
    torch.save({"model": fairseq_weights(model), "optimizer_history": [{"num_updates": 4321}],
                "cfg": omegaconf({"model": fairseq_section(model),
                                  "task": {"_name": "audio_pretraining", "normalize": True, "sample_rate": 16000}})},
               src)
    out = tmp_path / "imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    cfg = loaded.cfg.model
    assert (cfg.name, cfg.encoder_layers, cfg.prenet_depth, cfg.use_alibi_encoder, cfg.pos_conv_zero_padding) == \
        ("data2vec2", 3, prenet, True, False)
    assert (cfg.mask_prob, cfg.mask_prob_adjust, cfg.ema_anneal_end_step, cfg.clone_batch) == (0.5, 0.05, 75000, 2)
    assert loaded.cfg.task.normalize and loaded.num_updates == 4321
    for key, value in model.state_dict().items():  # every weight, the EMA teacher's too, lands where it came from
        assert torch.equal(loaded.model.state_dict()[key], value), key
    source, padding_mask, _ = padded_batch()
    assert max_diff(features(loaded.model, source, padding_mask)["x"], features(model, source, padding_mask)["x"]) == 0
    # a pretraining checkpoint resumes its training: the targets come from the imported teacher
    torch.manual_seed(3)
    with torch.no_grad():
        a = loaded.model(source[:, :8000])
    torch.manual_seed(3)
    with torch.no_grad():
        b = model(source[:, :8000])
    assert max_diff(a["targets"], b["targets"]) == 0


def test_import_fairseq_data2vec2_ctc_checkpoint(tmp_path, omegaconf):  # noqa: F811
    upstream = tiny_d2v()
    torch.manual_seed(1)
    ctc = Wav2VecCtc(upstream, upstream.cfg, len(VOCAB)).eval()
    weights = fairseq_weights(ctc.w2v_model, prefix="w2v_encoder.w2v_model.", ema=False)
    weights["w2v_encoder.proj.weight"], weights["w2v_encoder.proj.bias"] = ctc.proj.weight, ctc.proj.bias
    section = {"_name": "wav2vec_ctc", "w2v_path": "/gone/d2v.pt", "apply_mask": True, "mask_prob": 0.4,
               "layerdrop": 0.1, "final_dropout": 0.0, "feature_grad_mult": 0.0, "normalize": True,
               "w2v_args": {"model": fairseq_section(upstream),
                            "task": {"_name": "audio_pretraining", "normalize": True}}}
    src = tmp_path / "ctc.pt"
    torch.save({"model": weights, "cfg": omegaconf({"model": section, "task": {"normalize": True}})}, src)
    dict_file = tmp_path / "dict.ltr.txt"
    dict_file.write_text("".join(f"{s} {100 - i}\n" for i, s in enumerate(LETTERS)))
    out = tmp_path / "ctc_imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--dict", str(dict_file), "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    assert loaded.is_ctc and loaded.cfg.model.name == "data2vec2" and loaded.cfg.model.mask_prob == 0.4
    assert loaded.model.w2v_model.teacher is None and loaded.model.w2v_model.decoder is None
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], ctc(source, padding_mask)["logits"]) == 0


def test_unsupported_fairseq_data2vec2_settings_are_named(tmp_path, omegaconf, capsys):  # noqa: F811
    model = tiny_d2v()
    for where, key, value in (("model", "ema_encoder_only", True), ("audio", "learned_alibi_scale_per_layer", True),
                              ("model", "norm_eps", 1e-6), ("audio", "num_extra_tokens", 1)):
        section = fairseq_section(model)
        (section if where == "model" else section["modalities"]["audio"])[key] = value
        src = tmp_path / f"{key}.pt"
        torch.save({"model": fairseq_weights(model), "cfg": omegaconf({"model": section, "task": {}})}, src)
        assert main(["import", str(src), "--from", "fairseq", "--out", str(tmp_path / f"{key}_out.pt")]) == 1
        assert key in capsys.readouterr().err
    weights = fairseq_weights(model)
    weights["modality_encoders.AUDIO.extra_tokens"] = torch.zeros(1, 1, 48)
    src = tmp_path / "extra.pt"
    torch.save({"model": weights, "cfg": omegaconf({"model": fairseq_section(model), "task": {}})}, src)
    assert main(["import", str(src), "--from", "fairseq", "--out", str(tmp_path / "extra_out.pt")]) == 1
    assert "extra_tokens" in capsys.readouterr().err
