"""Original fairseq checkpoints: the restricted unpickler, and import of synthetic fairseq-layout
checkpoints (pickled with stand-ins of omegaconf / fairseq classes, as real ones are), checked against
the source model and against torchaudio's own fairseq converter."""

from __future__ import annotations

import argparse
import collections
import enum
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from speechssl.cli import main
from speechssl.interop.common import load_speechssl
from speechssl.interop.unpickle import UnsafeCheckpointError, load_fairseq_checkpoint, restricted_pickle, to_plain

from test_interop_common import LETTERS, VOCAB, features, max_diff, padded_batch, tiny_ctc, tiny_model

# --------------------------------------------------------------------------------------------------
# Stand-ins for omegaconf / fairseq classes, registered under their real module names while a test
# pickles with them (the unpickler under test never imports them).
# --------------------------------------------------------------------------------------------------


def _omegaconf_classes():
    base = types.ModuleType("omegaconf.base")
    dictconfig = types.ModuleType("omegaconf.dictconfig")
    listconfig = types.ModuleType("omegaconf.listconfig")
    nodes = types.ModuleType("omegaconf.nodes")
    constants = types.ModuleType("fairseq.dataclass.constants")

    class ContainerMetadata:  # a dataclass in omegaconf; pickled as NEWOBJ + state
        def __init__(self, ref_type, object_type, key_type=None, element_type=None):
            self.ref_type, self.object_type = ref_type, object_type
            self.key_type, self.element_type = key_type, element_type

    class Metadata(ContainerMetadata):
        pass

    class _Container:
        def __init__(self, content, parent=None):
            self.__dict__["_content"] = content
            self.__dict__["_parent"] = parent
            self.__dict__["_metadata"] = ContainerMetadata(typing_any, dict)

        def __getstate__(self):  # omegaconf's Container.__getstate__ copies __dict__
            return dict(self.__dict__)

    class DictConfig(_Container):
        pass

    class ListConfig(_Container):
        pass

    class AnyNode:
        def __init__(self, value):
            self._val, self._parent, self._metadata = value, None, Metadata(typing_any, None)

    class ChoiceEnum(enum.Enum):
        STATIC = "static"
        NORMAL = "normal"

    import typing

    typing_any = typing.Any
    for module, classes in ((base, (ContainerMetadata, Metadata)), (dictconfig, (DictConfig,)),
                            (listconfig, (ListConfig,)), (nodes, (AnyNode,)), (constants, (ChoiceEnum,))):
        for cls in classes:
            cls.__module__ = module.__name__
            cls.__qualname__ = cls.__name__
            setattr(module, cls.__name__, cls)
    return {m.__name__: m for m in (base, dictconfig, listconfig, nodes, constants)}, DictConfig, ListConfig, \
        AnyNode, ChoiceEnum


@pytest.fixture
def omegaconf(monkeypatch):
    modules, DictConfig, ListConfig, AnyNode, ChoiceEnum = _omegaconf_classes()
    for package in ("omegaconf", "fairseq", "fairseq.dataclass"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    def wrap(value):
        """Plain data -> the omegaconf object tree fairseq pickles (values in AnyNodes)."""
        if isinstance(value, dict):
            return DictConfig({k: wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return ListConfig([wrap(v) for v in value])
        if value in ("static", "normal"):
            return AnyNode(ChoiceEnum(value))
        return AnyNode(value)

    return wrap


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


# --------------------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------------------


def test_refuses_code_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for evil, name in ((_Evil(), "system"), (_EvalEvil(), "builtins.eval")):
        with pytest.raises(UnsafeCheckpointError, match=f"refusing to load global '.*{name}'"):
            restricted_pickle.loads(pickle.dumps({"model": {}, "x": evil}))
        path = tmp_path / "evil.pt"
        torch.save({"model": {"w": torch.zeros(2)}, "extra": [evil]}, path)
        with pytest.raises(UnsafeCheckpointError, match=f"evil.pt: refusing to load global '.*{name}'"):
            load_fairseq_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()
    import subprocess

    class _Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["true"],))

    with pytest.raises(UnsafeCheckpointError, match="subprocess.Popen"):
        restricted_pickle.loads(pickle.dumps(_Popen()))


def test_loads_tensors_plain_data_namespace_and_numpy(tmp_path):
    data = {
        "model": collections.OrderedDict(w=torch.arange(6.0).view(2, 3), p=torch.nn.Parameter(torch.ones(2))),
        "args": argparse.Namespace(arch="wav2vec2", lr=[0.1], betas=(0.9, 0.98)),
        "np": np.arange(4, dtype=np.int16), "scalar": np.float32(2.5), "shared": None,
        "misc": {1, 2}, "dtype": torch.float16, "size": torch.Size([2, 3]), "bytes": b"\x00\xff",
    }
    data["shared"] = data["model"]["w"][1]  # a view sharing storage
    path = tmp_path / "ok.pt"
    torch.save(data, path)
    out = load_fairseq_checkpoint(path)
    assert torch.equal(out["model"]["w"], data["model"]["w"]) and torch.equal(out["shared"], torch.tensor([3., 4, 5]))
    assert isinstance(out["model"]["p"], torch.nn.Parameter)
    assert out["args"] == {"arch": "wav2vec2", "lr": [0.1], "betas": (0.9, 0.98)}
    assert np.array_equal(out["np"], data["np"]) and out["np"].dtype == np.int16 and out["scalar"] == 2.5
    assert out["misc"] == {1, 2} and out["dtype"] is torch.float16 and out["size"] == (2, 3)
    assert out["bytes"] == b"\x00\xff"
    # legacy (pre-1.6, non-zip) serialization goes through the same unpickler
    legacy = tmp_path / "legacy.pt"
    torch.save(data["model"], legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_fairseq_checkpoint(legacy)["w"], data["model"]["w"])


def test_omegaconf_objects_become_plain_dicts(tmp_path, omegaconf):
    cfg = omegaconf({"model": {"_name": "wav2vec2", "mask_selection": "static", "latent_temp": [2.0, 0.5, 0.9],
                               "label_rate": "${task.label_rate}", "missing": "???", "none": None},
                     "task": {"normalize": True}})
    path = tmp_path / "omega.pt"
    torch.save({"cfg": cfg, "model": {}}, path)
    out = load_fairseq_checkpoint(path)
    assert out["cfg"] == {"model": {"_name": "wav2vec2", "mask_selection": "static", "latent_temp": [2.0, 0.5, 0.9],
                                    "label_rate": "${task.label_rate}", "missing": "???", "none": None},
                          "task": {"normalize": True}}
    assert to_plain([1, (2, {"a": 3})]) == [1, (2, {"a": 3})]


# A pickle made by the real omegaconf 2.0.6 (the version fairseq pins), zlib + base64, from this script
# (structured config with a fairseq-style enum, a List[float], an interpolation, a missing value):
#
#   import pickle, enum, sys, types
#   from dataclasses import dataclass, field
#   from typing import Any, List, Optional
#   from omegaconf import OmegaConf, II, MISSING
#   for n in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants"):
#       sys.modules[n] = types.ModuleType(n)
#   class ChoiceEnum(enum.Enum):
#       STATIC = "static"
#       NORMAL = "normal"
#   @dataclass
#   class ModelCfg:
#       _name: str = "wav2vec2"
#       conv_feature_layers: str = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
#       mask_selection: ChoiceEnum = ChoiceEnum.STATIC
#       latent_temp: List[float] = field(default_factory=lambda: [2.0, 0.5, 0.999995])
#       label_rate: float = II("task.label_rate")
#       missing: Any = MISSING
#       opt: Optional[int] = None
#   @dataclass
#   class TaskCfg:
#       label_rate: float = 50.0
#       normalize: bool = False
#   @dataclass
#   class Top:
#       model: ModelCfg = field(default_factory=ModelCfg)
#       task: TaskCfg = field(default_factory=TaskCfg)
#   for c in (ChoiceEnum, ModelCfg, TaskCfg, Top):
#       c.__module__ = "fairseq.dataclass.constants"; setattr(sys.modules[c.__module__], c.__name__, c)
#   cfg = OmegaConf.structured(Top)
#   cfg.model.opt = 3
#   with open(sys.argv[1], "wb") as f:
#       pickle.dump({"cfg": cfg, "args": None}, f, protocol=2)

OMEGACONF_206_PICKLE = (
    "eNqFVftfVEUUX0F8XMB8hJpWbkW1CC2C0kNLREQjYKkL1C2h2+zd2Z0rd+/dcx9raJOaYdDD0sreL8uyxx/Vf9BP/VxnZnZggT7G"
    "/jIzzPl+v+d7zpx7sYFDKmM1plIpp1iCdU5QpiXiBH4xW3CdWCzcknECl4NqCQ0dl6CRw/qMtRmD7DKNSYHEBJrqQvMkogYGxMT1"
    "aThWu2LABozdyGFTxtqEsSEt2vFchcJmp0jcMKKQFdccj0RRFnGimPhxZEwGFQMMqxkjgvwZ6sQqqJkZEiWoxG7gEw9aFmQas3QO"
    "WnNWEy6LHilFsIXDXdYWyRcFXpWGtkMcRmGr4wSeh3gYHhkFWiSJF4ukDdjm2HY+cb3Y9W3bUGfb52GHCXdLTuRQItpyVgvuqUfL"
    "1K8J25lL8tZG4U2FhHgKu3IyyMaUYrHfzeGejBRYDgrUgz1MeLqXw70Z1sSER/dxuD/D7mzLmIgdLGJF9rFmto+1LLJWtodhtmm2"
    "lW1jqPcBEx5kbTkmFLFdrJEh80OK2fZJmUJ7Xc18xIuMiTh0/VIO1wY8jEoe4fAoqlpd2+WSZvBSB4f9Qm69aYnvOhKlE9V1KnXt"
    "Ql2XVveYCVmpa6+1XiiqYg27pVNnSbW3Sp1eOIBO7hCtGfhVu0hJnITU9sgcDSPoYUJfL4eDwjUh4xCHPpTB6hh7BOPjmvEJE55U"
    "jKzbOoq4pzN9Pb1d6Z4DXem+jpl0Z7p2cLAr3Yv7/elDS2f4q7shd/AUyhONVSbRrB3RWi/B4TWuDvlJWXl6BHU+zeGZjLVBNKhL"
    "vUIERzn0q4OJyYHJ4UE4JjdY6Nh1YEBucuPm2MAoHJcbPwjL6NZgIt8gRXTVeifu2DGDLHAdKrQYMFTz7CSHU8KzIfRsSHl2WHj2"
    "rPZs2ITntGd4Y2AeRkwYxcTFe/RILNueliswVpe150Z6dIziUo+OHBKOc3het/kLHEzZN0GFhiQOQqNEYxfRDJhwMCHsRBlvwOSK"
    "3ip6AcHDqSvwogkvseYV//RkgKVyGRO5vKxzecWE06xt5e0AOWCa7WRTtSx3z8BMZk0FTwpKVcJXUbnN4TXddoRDXlg4hRZOsZYF"
    "1jqSErSOpi2YQCX4OOs+dSyl/vBAABU5lDQQ4+CuAlongM5ooFkTvCWg/j9XAJU5+Boo4FBZBdQggEADhSZEy0B//fP35VtHriZ5"
    "VGkZsqx56tlYEQqxBE84VDX4WQ6v14ELl2MBPqfBz5lwfumVbUe49vMxPpDsMiqHN2ojsuxGEVYZ+BrDB/w5ZfebyHmBw0XNf4nD"
    "W6Jpav2B9wy4zJpzMk/GhZS3tZR5E64sSREfh/7+fngHuRvVhwMW1vAO44wu0VBxLyLfuxze09zvc/hA5D6NuU8rwgVBeFUTfmjC"
    "R5pwpDHJJ8glhpswAK7JOX+dw8f6AXzC4dP/m/OTGCrH/A0kvaEMvyZIP9Okn5vwxeox/2WGqdJ9xeFrLf8bDt/+V+m+00jfm/CD"
    "xLguOnVYN5icMmrmuOco3Fxj2vEg8CjxlWk/ItNPHG5p1p85/LL665DHAANuo47bSsdNoeNXreM3E37XOhali9pIEuIX/Y9ckv0X"
    "pQzZwA=="
)


def test_real_omegaconf_2_0_6_pickle():
    import base64
    import zlib

    data = to_plain(restricted_pickle.loads(zlib.decompress(base64.b64decode(OMEGACONF_206_PICKLE))))
    assert data == {"args": None, "cfg": {
        "model": {"_name": "wav2vec2",
                  "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
                  "mask_selection": "static", "latent_temp": [2.0, 0.5, 0.999995], "label_rate": "${task.label_rate}",
                  "missing": "???", "opt": 3},
        "task": {"label_rate": 50.0, "normalize": False}}}


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.pt"):
        load_fairseq_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# Synthetic fairseq checkpoints
# --------------------------------------------------------------------------------------------------


def fairseq_state_dict(model, new_weight_norm: bool) -> dict[str, torch.Tensor]:
    """speechssl weights in fairseq's names, written out here independently of the code under test."""
    cfg = model.cfg
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key.startswith("feature_extractor.conv_layers."):
            i, kind = parts[2], parts[3]
            if kind == "conv":
                name = f"feature_extractor.conv_layers.{i}.0.{parts[4]}"
            elif cfg.extractor_mode == "layer_norm":
                name = f"feature_extractor.conv_layers.{i}.2.1.{parts[4]}"
            else:
                name = f"feature_extractor.conv_layers.{i}.2.{parts[4]}"
        elif key.startswith("feature_projection.layer_norm."):
            name = "layer_norm." + parts[-1]
        elif key.startswith("feature_projection.projection."):
            name = "post_extract_proj." + parts[-1]
        elif key.startswith("encoder.pos_conv.conv."):
            if key.endswith("bias"):
                name = "encoder.pos_conv.0.bias"
            elif new_weight_norm:
                name = "encoder.pos_conv.0.parametrizations.weight." + parts[-1]
            else:
                name = "encoder.pos_conv.0." + ("weight_g" if parts[-1] == "original0" else "weight_v")
        elif ".self_attn.qkv_proj." in key:
            for n, chunk in zip("qkv", value.chunk(3)):
                out[f"encoder.layers.{parts[2]}.self_attn.{n}_proj.{parts[-1]}"] = chunk.clone()
            continue
        elif key == "label_embs_concat":  # fairseq's Dictionary rows <s> <pad> </s> <unk> come first
            name, value = key, torch.cat([torch.rand(4, value.shape[1], generator=torch.Generator().manual_seed(9)),
                                          value])
        else:
            name = key
        out[name] = value.clone()
    out["encoder.version"] = torch.tensor([2.0])  # fairseq bookkeeping, ignored
    return out


def fairseq_model_section(model) -> dict:
    c = model.cfg
    layers = " + ".join(f"[({ch}, {k}, {s})]" for ch, k, s in c.conv_feature_layers)
    section = {
        "_name": c.name, "extractor_mode": c.extractor_mode, "conv_feature_layers": layers, "conv_bias": c.conv_bias,
        "encoder_layers": c.encoder_layers, "encoder_embed_dim": c.encoder_embed_dim,
        "encoder_ffn_embed_dim": c.encoder_ffn_embed_dim, "encoder_attention_heads": c.encoder_attention_heads,
        "activation_fn": "gelu", "layer_type": "transformer", "layer_norm_first": c.layer_norm_first,
        "conv_pos": c.conv_pos, "conv_pos_groups": c.conv_pos_groups, "pos_conv_depth": 1,
        "final_dim": c.final_dim, "dropout": 0.1, "encoder_layerdrop": 0.05, "feature_grad_mult": 0.1,
        "mask_prob": 0.65, "mask_selection": "static", "quantize_targets": c.quantize_targets,
        "latent_vars": c.latent_vars, "latent_groups": c.latent_groups, "latent_dim": 0,
        "latent_temp": list(c.latent_temp), "logit_temp": 0.1, "num_negatives": 100, "quantize_input": False,
        "checkpoint_activations": False, "required_seq_len_multiple": 2, "fp16": True,
    }
    if c.name == "hubert":
        section.update(untie_final_proj=c.untie_final_proj, label_rate="${task.label_rate}", skip_masked=False)
    return section


@pytest.mark.parametrize("name,style,new_wn,cfg_kind", [
    ("wav2vec2", "base", False, "omegaconf"), ("wav2vec2", "large", True, "omegaconf"),
    ("wav2vec2", "base", True, "args"), ("hubert", "large", False, "omegaconf"),
])
def test_import_synthetic_fairseq_checkpoint(tmp_path, omegaconf, one_thread, name, style, new_wn, cfg_kind):
    model = tiny_model(name, style)
    section = fairseq_model_section(model)
    task = {"_name": "audio_pretraining" if name == "wav2vec2" else "hubert_pretraining", "sample_rate": 16000,
            "normalize": style == "large", "labels": ["km"], "label_rate": 50.0}
    ckpt = {"model": fairseq_state_dict(model, new_wn), "optimizer_history": [{"num_updates": 1234}],
            "extra_state": {"epoch": 3}}
    if cfg_kind == "omegaconf":
        ckpt.update(args=None, cfg=omegaconf({"common": {"fp16": True}, "model": section, "task": task}))
    else:  # 2020 checkpoints: one argparse.Namespace, arch instead of _name
        flat = {k: v for k, v in {**section, **task}.items() if k != "_name"}
        ckpt["args"] = argparse.Namespace(arch=name, **flat)
    src = tmp_path / "fairseq.pt"
    torch.save(ckpt, src)
    out = tmp_path / "imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    assert loaded.cfg.model.layer_norm_first == (style == "large")
    assert loaded.cfg.task.normalize == (style == "large") and loaded.num_updates == 1234
    assert loaded.cfg.model.feature_grad_mult == 0.1 and loaded.cfg.model.encoder_layerdrop == 0.05
    for key, value in model.state_dict().items():  # every weight lands where it came from
        assert torch.equal(loaded.model.state_dict()[key], value), key
    source, padding_mask, _ = padded_batch()
    assert max_diff(features(loaded.model, source, padding_mask)["x"], features(model, source, padding_mask)["x"]) == 0
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 1  # exists: needs --force
    # fine-tuning takes it as model.w2v_path
    from speechssl.models.pretrained import load_pretrained

    upstream, _ = load_pretrained(out, {"encoder_layerdrop": 0.0})
    assert max_diff(features(upstream, source, padding_mask)["x"], features(model, source, padding_mask)["x"]) == 0


@pytest.mark.parametrize("style", ["base", "large"])
def test_import_matches_torchaudio_fairseq_converter(tmp_path, omegaconf, one_thread, style):
    """torchaudio's own fairseq key mapping (import_fairseq._convert_state_dict) on the same fairseq
    weights gives the same encoder outputs as the imported speechssl model."""
    torchaudio = pytest.importorskip("torchaudio")
    from torchaudio.models.wav2vec2.utils.import_fairseq import _convert_state_dict

    from speechssl.models.weights import torchaudio_model_kwargs

    model = tiny_model("wav2vec2", style)
    weights = fairseq_state_dict(model, new_weight_norm=False)
    src = tmp_path / "fairseq.pt"
    torch.save({"model": weights, "cfg": omegaconf({"model": fairseq_model_section(model), "task": {}})}, src)
    out = tmp_path / "imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 0
    ours = load_speechssl(out).model
    ta = torchaudio.models.wav2vec2_model(**torchaudio_model_kwargs(model.cfg)).eval()
    ta_weights = _convert_state_dict({k: v for k, v in weights.items() if k != "encoder.version"})
    ta.load_state_dict({k: v for k, v in ta_weights.items() if not k.startswith(("mask_emb", "quantizer",
                                                                                   "project_q", "final_proj"))})
    source, padding_mask, lengths = padded_batch()
    with torch.no_grad():
        ta_out, _ = ta(source, lengths)
    out_ours = features(ours, source, padding_mask)
    valid = ~out_ours["padding_mask"]
    assert max_diff(out_ours["x"], ta_out, valid) < 1e-4


@pytest.mark.parametrize("name,style", [("wav2vec2", "base"), ("hubert", "large")])
def test_import_fairseq_ctc_checkpoint(tmp_path, omegaconf, one_thread, name, style):
    """A fine-tuned Wav2VecCtc / HubertCtc checkpoint: upstream under w2v_encoder.w2v_model, output layer
    w2v_encoder.proj, pretraining config in w2v_args, dictionary given with --dict."""
    ctc, cfg = tiny_ctc(name, style)
    upstream_fs = fairseq_state_dict(ctc.w2v_model, new_weight_norm=style == "base")
    weights = {f"w2v_encoder.w2v_model.{k}": v for k, v in upstream_fs.items()}
    weights["w2v_encoder.proj.weight"], weights["w2v_encoder.proj.bias"] = ctc.proj.weight, ctc.proj.bias
    pre_section = fairseq_model_section(ctc.w2v_model)
    model_section = {"_name": "wav2vec_ctc" if name == "wav2vec2" else "hubert_ctc", "w2v_path": "/gone/w2v.pt",
                     "apply_mask": True,
                     "mask_prob": 0.5, "layerdrop": 0.1, "final_dropout": 0.0, "feature_grad_mult": 0.0,
                     "w2v_args": {"model": pre_section, "task": {"_name": "audio_pretraining", "normalize": False}}}
    src = tmp_path / "ctc.pt"
    torch.save({"model": weights, "cfg": omegaconf({"model": model_section, "task": {"normalize": False}})}, src)
    out = tmp_path / "ctc_imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 1  # needs --dict
    dict_file = tmp_path / "dict.ltr.txt"
    dict_file.write_text("".join(f"{s} {100 - i}\n" for i, s in enumerate(LETTERS)))
    assert main(["import", str(src), "--from", "fairseq", "--dict", str(dict_file), "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    assert loaded.is_ctc and loaded.vocab == VOCAB and loaded.cfg.model.name == name
    assert loaded.cfg.model.mask_prob == 0.5 and loaded.cfg.model.encoder_layerdrop == 0.1
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], ctc(source, padding_mask)["logits"]) == 0
    # fine-tuning and pretraining normalisation differ: fairseq refuses to build such a model, so does import
    model_section["w2v_args"]["task"]["normalize"] = True
    torch.save({"model": weights, "cfg": omegaconf({"model": model_section, "task": {"normalize": False}})}, src)
    with pytest.raises(Exception, match=r"task.normalize=false but its upstream \(w2v_args\) was pretrained with "
                                        r"normalize=true"):
        from speechssl.interop.fairseq import import_fairseq

        import_fairseq(src, dict_file)


def test_unknown_and_unsupported_fairseq_content(tmp_path, omegaconf):
    model = tiny_model("wav2vec2", "base")
    weights = fairseq_state_dict(model, False)
    section = fairseq_model_section(model)
    src = tmp_path / "x.pt"
    torch.save({"model": {**weights, "adapter.weight": torch.zeros(1)}, "cfg": omegaconf({"model": section})}, src)
    with pytest.raises(Exception, match="adapter.weight"):
        from speechssl.interop.fairseq import import_fairseq

        import_fairseq(src)
    torch.save({"model": weights, "cfg": omegaconf({"model": {**section, "layer_type": "conformer"}})}, src)
    with pytest.raises(Exception, match="layer_type='conformer' is not supported"):
        import_fairseq(src)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_import_fairseq_checkpoint_without_feature_projection(tmp_path, omegaconf, one_thread, name):
    """fairseq builds post_extract_proj only when the conv channels differ from encoder_embed_dim: a
    checkpoint of such a model has no post_extract_proj.* weights, and imports without one."""
    wide = [(48, 10, 5)] + [(48, 3, 2)] * 4 + [(48, 2, 2)] * 2  # 48 conv channels == encoder_embed_dim 48
    model = tiny_model(name, "base", conv_feature_layers=wide)
    weights = {k: v for k, v in fairseq_state_dict(model, False).items() if not k.startswith("post_extract_proj.")}
    task = {"_name": "hubert_pretraining" if name == "hubert" else "audio_pretraining", "labels": ["km"],
            "label_rate": 50.0}
    src = tmp_path / "fairseq.pt"
    torch.save({"model": weights, "cfg": omegaconf({"model": fairseq_model_section(model), "task": task})}, src)
    out = tmp_path / "imported.pt"
    assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    assert loaded.model.feature_projection.projection is None
    assert not any(k.startswith("feature_projection.projection") for k in loaded.model.state_dict())
    # the encoder sees the normalised conv features themselves: fairseq's forward without post_extract_proj
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        conv = loaded.model.feature_extractor(source)
        normed = torch.nn.functional.layer_norm(conv, (48,), weights["layer_norm.weight"], weights["layer_norm.bias"])
        frame_pad = features(loaded.model, source, padding_mask)["padding_mask"]
        expected, _ = loaded.model.encoder(normed, frame_pad)
    assert max_diff(features(loaded.model, source, padding_mask)["x"], expected) == 0


def hubert_checkpoint(tmp_path, omegaconf, model, weights, name="fairseq.pt"):
    task = {"_name": "hubert_pretraining", "sample_rate": 16000, "normalize": False, "labels": ["km"],
            "label_rate": 50.0}
    src = tmp_path / name
    torch.save({"model": weights, "cfg": omegaconf({"model": fairseq_model_section(model), "task": task})}, src)
    return src


def test_hubert_classes_are_fairseq_dictionary_rows_4_on(tmp_path, omegaconf, one_thread):
    """fairseq's HuBERT has 4 + K label embeddings (Dictionary.load prepends <s> <pad> </s> <unk> to
    dict.km.txt); speechssl's class k is fairseq's row 4 + k, and its softmax runs over the K clusters."""
    model = tiny_model("hubert", "base")  # 8 classes
    weights = fairseq_state_dict(model, False)
    assert weights["label_embs_concat"].shape[0] == 4 + 8
    out = tmp_path / "imported.pt"
    assert main(["import", str(hubert_checkpoint(tmp_path, omegaconf, model, weights)), "--from", "fairseq",
                 "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    assert loaded.cfg.model.num_classes == [8]
    proj = torch.randn(5, loaded.model.final_dim)
    with torch.no_grad():
        mine = loaded.model.label_logits(proj, 0)
    # fairseq's compute_nce logit of class k: cosine with its dictionary row 4 + k, over logit_temp
    rows = weights["label_embs_concat"][4:]
    theirs = torch.cosine_similarity(proj[:, None, :], rows[None], dim=-1) / loaded.cfg.model.logit_temp
    assert max_diff(mine, theirs) < 1e-5
    too_small = {**weights, "label_embs_concat": weights["label_embs_concat"][:4]}
    src = hubert_checkpoint(tmp_path, omegaconf, model, too_small, "small.pt")
    assert main(["import", str(src), "--from", "fairseq", "--out", str(tmp_path / "x.pt")]) == 1


def test_hubert_label_embeddings_round_trip_through_fairseqs_layout(tmp_path, omegaconf, one_thread):
    """One rule both ways: fairseq_state_dict (export) puts 4 dictionary rows in front, import drops them."""
    from speechssl.interop.fairseq import fairseq_state_dict as export_weights

    for style in ("base", "large"):
        model = tiny_model("hubert", style)
        weights = export_weights(model.state_dict(), model.cfg)
        emb = weights["label_embs_concat"]
        assert emb.shape[0] == 4 + 8 and not emb[:4].any()
        assert torch.equal(emb[4:], model.label_embs_concat)
        independent = fairseq_state_dict(model, False)
        assert sorted(weights) == sorted(k for k in independent if k != "encoder.version")
        for key in weights:
            if key != "label_embs_concat":
                assert torch.equal(weights[key], independent[key]), key
        out = tmp_path / f"{style}.pt"
        src = hubert_checkpoint(tmp_path, omegaconf, model, weights, f"{style}_fs.pt")
        assert main(["import", str(src), "--from", "fairseq", "--out", str(out)]) == 0
        back = load_speechssl(out).model
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
