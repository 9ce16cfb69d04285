"""Frozen-upstream probes, SUPERB style: what does an upstream's representation give a small downstream?

The upstream never changes: every utterance of a manifest split goes through it once (eval mode, no
masking, no gradient), and a small downstream is trained on the cached hidden states:

* ``asr``: SUPERB's featurizer (a learnable softmax-weighted sum of the ``N`` hidden states, each
  standardized with its mean and standard deviation over the training frames) -> ``Linear(D, H)`` ->
  a bidirectional LSTM -> ``Linear(2H, V)``, trained with CTC on the letters of ``<split>.ltr``
  (time masking and dropout on the featurizer output as light SpecAugment); greedy decoding, WER/CER;
* ``sid``: the featurizer -> mean over the utterance's frames -> ``Linear(D, S)`` over the speakers of
  ``dict.spk.txt`` (SUPERB's SID downstream: mean pooling + linear); since both steps are linear, the
  per-utterance means of every state are computed once and the probe trains on those.

The checkpoint used for the report is the one with the best validation score (CER, or accuracy with the
validation loss breaking ties), evaluated every ``eval_interval`` updates; the test split is scored once,
with that checkpoint. Upstreams (:func:`load_upstream`): a speechssl checkpoint (pretraining or
fine-tuned), the same architecture randomly initialised, or ``fbank``: 80-d Kaldi log-mel filterbanks
with two frames stacked (20 ms, the frame rate of the models), SUPERB's FBANK baseline at the models'
frame rate, offered as it is and standardized per utterance (:func:`fbank_upstream`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.config import ConfigError

TASKS = ("asr", "sid")
FBANK = "fbank"


@dataclass
class ProbeConfig:
    """Downstream settings. ``updates`` / ``lr`` of 0 take the task's default (:data:`DEFAULTS`)."""

    task: str = "asr"  # asr | sid
    updates: int = 0
    lr: float = 0.0
    batch_size: int = 8  # utterances per update (asr); sid trains on all utterances at once
    hidden: int = 128  # asr: LSTM units per direction
    lstm_layers: int = 1  # asr: 0 = a linear CTC head on the weighted sum (no context of its own: fast,
    # measures what the upstream itself makes linearly readable; not for fbank, which has no context)
    dropout: float = 0.2
    time_mask: float = 0.1  # asr: fraction of the frames zeroed in spans of up to 10 frames
    eval_interval: int = 100
    seed: int = 0
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: Optional[str] = "test"  # None: report valid only
    max_train_utterances: int = 0  # 0: all (pretraining-time probes use a subset)


DEFAULTS = {"asr": {"updates": 1500, "lr": 2e-3}, "sid": {"updates": 600, "lr": 1e-2}}


def resolved(cfg: ProbeConfig) -> ProbeConfig:
    if cfg.task not in TASKS:
        raise ConfigError(f"probe task '{cfg.task}': choose one of {', '.join(TASKS)}")
    d = DEFAULTS[cfg.task]
    out = dataclasses.replace(cfg, updates=cfg.updates or d["updates"], lr=cfg.lr or d["lr"])
    for name in ("updates", "batch_size", "hidden", "eval_interval"):
        if getattr(out, name) < 1:
            raise ConfigError(f"probe {name} must be >= 1, got {getattr(out, name)}")
    if out.lstm_layers < 0:
        raise ConfigError(f"probe lstm_layers must be >= 0 (0: a linear head), got {out.lstm_layers}")
    if not 0.0 <= out.dropout < 1.0 or not 0.0 <= out.time_mask < 0.5:
        raise ConfigError(f"probe dropout must be in [0, 1) and time_mask in [0, 0.5), got {out.dropout}, "
                          f"{out.time_mask}")
    return out


# --------------------------------------------------------------------------------------------------
# Upstreams
# --------------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    """A frozen feature extractor: ``states(wave) -> (N, L, D)`` fp32 hidden states of one utterance."""

    name: str
    num_states: int
    dim: int
    states: Callable[[np.ndarray], Tensor]
    normalize: bool = False  # the upstream expects zero-mean unit-variance waveforms (task.normalize)


def model_upstream(model: nn.Module, name: str, normalize: bool, device: torch.device) -> Upstream:
    """Hidden states of a wav2vec 2.0 / HuBERT model (SUPERB's: the Transformer input and every layer)."""
    from speechssl.data.dataset import normalize_wave
    from speechssl.models.speaker import upstream_hidden_states

    model = model.to(device).eval()

    @torch.inference_mode()
    def states(wave: np.ndarray) -> Tensor:
        if normalize:
            wave = normalize_wave(wave)
        source = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).to(device)[None]
        hidden, _ = upstream_hidden_states(model, source)
        return torch.stack([h[0] for h in hidden]).float().cpu()

    return Upstream(name, len(model.encoder.layers) + 1, model.cfg.encoder_embed_dim, states, normalize)


def fbank_upstream() -> Upstream:
    """SUPERB's FBANK baseline at the models' 20 ms frame rate: 80 log-mel bins, two frames stacked, as two
    "hidden states" for the featurizer to weigh: the log-mel frames as they are (what speaker ID needs: the
    utterance's mean spectrum) and standardized per utterance (the log-mel tiny models' input; better for
    ASR across microphones). The probe learns which to use, so FBANK is the stronger of the two."""
    from speechssl.models.frontend import FbankFeatureExtractor

    plain, standardized = FbankFeatureExtractor(80, 2), FbankFeatureExtractor(80, 2, standardize=True)

    @torch.inference_mode()
    def states(wave: np.ndarray) -> Tensor:
        source = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]
        return torch.cat([plain(source), standardized(source)]).float()

    return Upstream("fbank", 2, plain.out_channels, states)


def load_upstream(spec: str, random_init: bool = False, seed: int = 0,
                  device: str | torch.device = "cpu") -> Upstream:
    """``spec``: a speechssl checkpoint, or ``fbank``. ``random_init``: the checkpoint's architecture
    with freshly initialised weights (seeded), the "same upstream, untrained" baseline; ``spec`` may then be
    the pretraining recipe instead (its model section: the same architecture, no checkpoint needed)."""
    device = torch.device(device)
    if spec == FBANK:
        if random_init:
            raise ConfigError("--random-init needs a checkpoint (its architecture), not fbank")
        return fbank_upstream()
    from speechssl.config import load_config
    from speechssl.models import build_model
    from speechssl.models.pretrained import (is_recipe, load_pretrained, read_model_config, read_task_normalize,
                                             remove_pretraining_modules)
    from speechssl.train.checkpoint import load_checkpoint

    path = Path(spec)
    if is_recipe(path):  # a file, or a recipe's name (find_recipe)
        if not random_init:
            raise ConfigError(f"upstream {spec} is a recipe: it has an architecture but no weights; add "
                              "--random-init to probe that architecture untrained, or give a checkpoint")
        try:
            recipe = load_config(path)
        except ConfigError as exc:
            raise ConfigError(f"upstream {spec}: {exc}") from None
        cfg, normalize = recipe.model, recipe.task.normalize
    else:
        if not path.is_file():
            raise ConfigError(f"upstream {spec}: file not found (a speechssl checkpoint, or 'fbank')")
        state = load_checkpoint(path)
        normalize = read_task_normalize(state)
        if not random_init:
            model, cfg = load_pretrained(str(path), {"encoder_layerdrop": 0.0})
            return model_upstream(model, f"{cfg.name} {path.name}", normalize, device)
        cfg = read_model_config(state, path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = remove_pretraining_modules(build_model(cfg))
    return model_upstream(model, f"random-init {cfg.name}", normalize, device)


# --------------------------------------------------------------------------------------------------
# Data: hidden states of every utterance, standardized
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitFeatures:
    """One split's cached upstream output: per utterance ``(N, L_i, D)`` fp16 states (asr) or
    ``(N, D)`` fp32 per-utterance means (sid), and its labels."""

    name: str
    states: list[Tensor]
    labels: list[Any]  # asr: LongTensor letter ids; sid: int speaker index
    texts: list[str] = field(default_factory=list)  # asr: reference transcripts


def _read_lines(path: Path, count: int, what: str) -> list[str]:
    from speechssl.data.dataset import ManifestError

    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found (see 'speechssl manifest')")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != count:
        raise ManifestError(f"{path}: {len(lines)} lines but the manifest lists {count} utterances")
    return lines


def extract_split(upstream: Upstream, manifest_dir: Path, split: str, task: str, vocab=None,
                  speakers: Optional[dict[str, int]] = None, limit: int = 0) -> SplitFeatures:
    """Run the upstream over ``manifest_dir/<split>.tsv`` (first ``limit`` utterances when > 0)."""
    from speechssl.data.audio import read_audio
    from speechssl.data.dataset import ManifestError, read_manifest

    manifest = read_manifest(manifest_dir / f"{split}.tsv")
    n = len(manifest.files) if limit <= 0 else min(limit, len(manifest.files))
    if task == "asr":
        labels_in = _read_lines(manifest_dir / f"{split}.ltr", len(manifest.files), "letter transcripts (.ltr)")
        texts_in = _read_lines(manifest_dir / f"{split}.wrd", len(manifest.files), "word transcripts (.wrd)")
    else:
        labels_in = _read_lines(manifest_dir / f"{split}.spk", len(manifest.files), "speaker labels (.spk)")
    out = SplitFeatures(split, [], [])
    for i in range(n):
        wave, _ = read_audio(manifest.root / manifest.files[i])
        if wave.ndim != 1:
            raise ManifestError(f"{manifest.root / manifest.files[i]}: {wave.ndim}-d audio; probes read mono files")
        hidden = upstream.states(wave)  # (N, L, D)
        if task == "asr":
            out.states.append(hidden.half())
            out.labels.append(torch.tensor(vocab.encode(labels_in[i]), dtype=torch.long))
            out.texts.append(" ".join(texts_in[i].split()))
        else:
            speaker = labels_in[i].strip()
            if speaker not in speakers:
                raise ManifestError(f"{manifest_dir / f'{split}.spk'}: speaker '{speaker}' (line {i + 1}) is not in "
                                    "the training split's dict.spk.txt; probes are closed-set")
            out.states.append(hidden.mean(dim=1))
            out.labels.append(speakers[speaker])
    return out


def standardizer(train: SplitFeatures) -> tuple[Tensor, Tensor]:
    """Per-state, per-dimension mean and std ``(N, 1, D)`` over the training frames (or utterances)."""
    if train.states[0].dim() == 3:
        total = sum(s.shape[1] for s in train.states)
        mean = sum(s.float().sum(dim=1, keepdim=True) for s in train.states) / total
        var = sum(((s.float() - mean) ** 2).sum(dim=1, keepdim=True) for s in train.states) / total
    else:
        stacked = torch.stack(train.states).float()  # (U, N, D)
        mean, var = stacked.mean(dim=0)[:, None], stacked.var(dim=0, correction=0)[:, None]
    return mean, var.clamp(min=1e-8).sqrt()


# --------------------------------------------------------------------------------------------------
# Downstreams
# --------------------------------------------------------------------------------------------------


def reverse_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each utterance's first ``lengths[b]`` frames of ``x (B, L, C)`` in place of them (padding
    stays at the end). Its own inverse."""
    L = x.shape[1]
    t = torch.arange(L, device=x.device)[None, :]
    n = lengths.to(x.device)[:, None]
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(1, idx[:, :, None].expand_as(x))


class BiLSTM(nn.Module):
    """Bidirectional LSTM over padded batches: ``(B, L, C), (B,) -> (B, L, 2H)``.

    Two unidirectional ``nn.LSTM`` layers per level, the backward one run on each utterance reversed
    within its length (:func:`reverse_valid`): the same outputs at the valid frames as a packed-sequence
    BiLSTM, without packing, which makes torch's CPU LSTM backward 15-20x slower.
    """

    def __init__(self, input_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.forward_lstms = nn.ModuleList()
        self.backward_lstms = nn.ModuleList()
        for i in range(layers):
            dim = input_dim if i == 0 else 2 * hidden
            self.forward_lstms.append(nn.LSTM(dim, hidden, batch_first=True))
            self.backward_lstms.append(nn.LSTM(dim, hidden, batch_first=True))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        for i, (fwd, bwd) in enumerate(zip(self.forward_lstms, self.backward_lstms)):
            if i:
                x = self.dropout(x)
            y_fwd, _ = fwd(x)
            y_bwd, _ = bwd(reverse_valid(x, lengths))
            x = torch.cat([y_fwd, reverse_valid(y_bwd, lengths)], dim=-1)
        return x


class AsrProbe(nn.Module):
    """Weighted sum of ``N`` states -> Linear(D, H) -> BiLSTM -> Linear(2H, V). ``(N, B, L, D) -> (B, L, V)``.
    ``layers=0``: weighted sum -> Linear(D, V) (a linear probe)."""

    def __init__(self, num_states: int, dim: int, vocab_size: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))
        self.dropout = nn.Dropout(dropout)
        self.proj = self.lstm = None
        if layers > 0:
            self.proj = nn.Linear(dim, hidden)
            self.lstm = BiLSTM(hidden, hidden, layers, dropout)
        self.out = nn.Linear(2 * hidden if layers > 0 else dim, vocab_size)

    def featurize(self, states: Tensor) -> Tensor:
        return torch.einsum("n,nbld->bld", self.weights.softmax(0), states)

    def forward(self, states: Tensor, lengths: Tensor, time_mask: Optional[Tensor] = None) -> Tensor:
        x = self.featurize(states)
        if time_mask is not None:
            x = x.masked_fill(time_mask.unsqueeze(-1), 0.0)
        if self.lstm is None:
            return self.out(self.dropout(x))
        x = self.dropout(F.gelu(self.proj(self.dropout(x))))
        return self.out(self.dropout(self.lstm(x, lengths)))


class SidProbe(nn.Module):
    """Weighted sum of ``N`` pooled states -> Linear(D, S). ``(U, N, D) -> (U, S)``."""

    def __init__(self, num_states: int, dim: int, num_speakers: int, dropout: float):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_speakers)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.out(self.dropout(torch.einsum("n,und->ud", self.weights.softmax(0), pooled)))


def _batch(split: SplitFeatures, idx: list[int], mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Padded standardized states ``(N, B, L, D)`` and frame counts ``(B,)``."""
    lengths = torch.tensor([split.states[i].shape[1] for i in idx])
    N, _, D = split.states[idx[0]].shape
    x = torch.zeros(N, len(idx), int(lengths.max()), D)
    for b, i in enumerate(idx):
        x[:, b, : lengths[b]] = (split.states[i].float() - mean) / std
    return x, lengths


def _time_mask(lengths: Tensor, fraction: float, generator: torch.Generator, span: int = 10) -> Tensor:
    """``(B, L)`` bool: about ``fraction`` of each utterance's frames in spans of 1..``span`` frames."""
    B, L = len(lengths), int(lengths.max())
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        for _ in range(int(round(fraction * n / (span / 2)))):
            width = int(torch.randint(1, span + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, n - width), (1,), generator=generator))
            mask[b, start:start + width] = True
    return mask


def _asr_scores(model: AsrProbe, split: SplitFeatures, vocab, mean: Tensor, std: Tensor,
                batch_size: int = 16) -> dict[str, Any]:
    from speechssl.decode.greedy import greedy_decode
    from speechssl.decode.metrics import score

    model.eval()
    hyps: list[str] = []
    with torch.no_grad():
        for start in range(0, len(split.states), batch_size):
            idx = list(range(start, min(start + batch_size, len(split.states))))
            x, lengths = _batch(split, idx, mean, std)
            logits = model(x, lengths)
            hyps += [vocab.decode(ids) for ids in greedy_decode(logits, lengths)]
    model.train()
    result = score(split.texts, hyps)
    result["hypotheses"] = hyps
    return result


def train_asr_probe(train: SplitFeatures, valid: SplitFeatures, test: Optional[SplitFeatures], vocab,
                    cfg: ProbeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mean, std = standardizer(train)
    N, _, D = train.states[0].shape
    model = AsrProbe(N, D, len(vocab), cfg.hidden, cfg.lstm_layers, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.updates // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: min((u + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, u / cfg.updates)))))
    best: Optional[dict[str, Any]] = None
    history = []
    order: list[int] = []
    for update in range(1, cfg.updates + 1):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(train.states), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        x, lengths = _batch(train, idx, mean, std)
        mask = _time_mask(lengths, cfg.time_mask, gen) if cfg.time_mask > 0 else None
        log_probs = model(x, lengths, mask).log_softmax(-1).float()
        targets = [train.labels[i] for i in idx]
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), lengths,
                          torch.tensor([len(t) for t in targets]), blank=0, reduction="sum",
                          zero_infinity=True) / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if update % cfg.eval_interval == 0 or update == cfg.updates:
            scores = _asr_scores(model, valid, vocab, mean, std)
            history.append({"update": update, "loss": loss.item(), "valid_cer": scores["cer"],
                            "valid_wer": scores["wer"]})
            log(f"  probe update {update}: train loss {loss.item():.3f}, valid WER {scores['wer']:.1f} "
                f"CER {scores['cer']:.1f}")
            if best is None or scores["cer"] < best["valid_cer"]:
                best = {"update": update, "valid_cer": scores["cer"], "valid_wer": scores["wer"],
                        "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best.pop("state"))
    result = {**best, "history": history, "layer_weights": model.weights.softmax(0).tolist()}
    if test is not None:
        scores = _asr_scores(model, test, vocab, mean, std)
        result.update(test_wer=scores["wer"], test_cer=scores["cer"], test_hypotheses=scores["hypotheses"])
    return result


def train_sid_probe(train: SplitFeatures, valid: SplitFeatures, test: Optional[SplitFeatures], num_speakers: int,
                    cfg: ProbeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    mean, std = standardizer(train)

    def tensors(split: SplitFeatures) -> tuple[Tensor, Tensor]:
        x = (torch.stack(split.states).float() - mean.transpose(0, 1)) / std.transpose(0, 1)
        return x, torch.tensor(split.labels)

    (xt, yt), (xv, yv) = tensors(train), tensors(valid)
    N, D = xt.shape[1:]
    model = SidProbe(N, D, num_speakers, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best: Optional[dict[str, Any]] = None
    history = []
    for update in range(1, cfg.updates + 1):
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if update % cfg.eval_interval == 0 or update == cfg.updates:
            model.eval()
            with torch.no_grad():
                logits = model(xv)
            model.train()
            acc = 100.0 * float((logits.argmax(-1) == yv).float().mean())
            vloss = float(F.cross_entropy(logits, yv))
            history.append({"update": update, "loss": loss.item(), "valid_accuracy": acc, "valid_loss": vloss})
            if best is None or (acc, -vloss) > (best["valid_accuracy"], -best["valid_loss"]):
                best = {"update": update, "valid_accuracy": acc, "valid_loss": vloss,
                        "state": {k: v.clone() for k, v in model.state_dict().items()}}
    log(f"  probe: best valid accuracy {best['valid_accuracy']:.1f}% at update {best['update']}")
    model.load_state_dict(best.pop("state"))
    model.eval()
    result = {**best, "history": history, "layer_weights": model.weights.softmax(0).tolist()}
    if test is not None:
        xs, ys = tensors(test)
        with torch.no_grad():
            result["test_accuracy"] = 100.0 * float((model(xs).argmax(-1) == ys).float().mean())
    return result


# --------------------------------------------------------------------------------------------------
# The whole probe
# --------------------------------------------------------------------------------------------------


def run_probe(upstream: Upstream, manifest_dir: str | Path, cfg: ProbeConfig,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Extract the splits' hidden states, train the downstream, score valid (and test). Returns a dict:
    ``task``, ``upstream``, the best ``valid_*`` and ``test_*`` scores, ``layer_weights``, ``history``,
    ``seconds`` (``extract_seconds`` of it spent in the upstream)."""
    cfg = resolved(cfg)
    manifest_dir = Path(manifest_dir)
    t0 = time.perf_counter()
    splits = [cfg.train_split, cfg.valid_split] + ([cfg.test_split] if cfg.test_split else [])
    if cfg.task == "asr":
        from speechssl.text.vocab import Vocabulary

        vocab = Vocabulary.from_dict_file(manifest_dir / "dict.ltr.txt")
        feats = [extract_split(upstream, manifest_dir, s, "asr", vocab=vocab,
                               limit=cfg.max_train_utterances if s == cfg.train_split else 0) for s in splits]
    else:
        from speechssl.text.vocab import read_dict_file

        names = read_dict_file(manifest_dir / "dict.spk.txt")
        speakers = {name: i for i, name in enumerate(names)}
        feats = [extract_split(upstream, manifest_dir, s, "sid", speakers=speakers,
                               limit=cfg.max_train_utterances if s == cfg.train_split else 0) for s in splits]
    extract_seconds = time.perf_counter() - t0
    train, valid = feats[0], feats[1]
    test = feats[2] if cfg.test_split else None
    if cfg.task == "asr":
        result = train_asr_probe(train, valid, test, vocab, cfg, log)
    else:
        result = train_sid_probe(train, valid, test, len(speakers), cfg, log)
    result.update(task=cfg.task, upstream=upstream.name, seconds=time.perf_counter() - t0,
                  extract_seconds=extract_seconds, num_train=len(train.states), config=dataclasses.asdict(cfg))
    return result


# --------------------------------------------------------------------------------------------------
# During pretraining
# --------------------------------------------------------------------------------------------------


def training_probe(settings, normalize: bool) -> Callable[[nn.Module], dict[str, float]]:
    """The ``probe.*`` settings (:class:`~speechssl.config.ProbeSettings`) as a function of the model being
    trained: extract the probe manifest's train / valid states with the current weights (eval mode, no
    gradient), train the downstream (CPU; the global RNG state is restored afterwards, so training
    randomness is unchanged) and return ``{"probe_cer", "probe_wer"}`` or ``{"probe_accuracy"}`` of valid.
    The labels and the manifest are checked once, here, so a bad path fails before training starts.
    Probe metrics are logged, not used to select checkpoints (only the main process computes them)."""
    cfg = resolved(ProbeConfig(task=settings.task, updates=settings.updates or 300, test_split=None,
                               seed=settings.seed, max_train_utterances=settings.max_train_utterances,
                               eval_interval=max(1, (settings.updates or 300) // 3)))
    manifest_dir = Path(settings.data)
    for split in (cfg.train_split, cfg.valid_split):
        for ext in (("tsv", "ltr", "wrd") if cfg.task == "asr" else ("tsv", "spk")):
            if not (manifest_dir / f"{split}.{ext}").is_file():
                raise ConfigError(f"probe.data={settings.data}: {split}.{ext} not found (a '{cfg.task}' probe needs "
                                  f"{' + '.join(('tsv', 'ltr', 'wrd') if cfg.task == 'asr' else ('tsv', 'spk'))} "
                                  "of the train and valid splits)")
    dict_file = manifest_dir / ("dict.ltr.txt" if cfg.task == "asr" else "dict.spk.txt")
    if not dict_file.is_file():
        raise ConfigError(f"probe.data={settings.data}: {dict_file.name} not found")

    def probe(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        device = next(model.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                upstream = model_upstream(model, "training", normalize, device)
                result = run_probe(upstream, manifest_dir, cfg, log=lambda _: None)
        finally:
            model.train(was_training)
        if cfg.task == "asr":
            return {"probe_cer": result["valid_cer"], "probe_wer": result["valid_wer"]}
        return {"probe_accuracy": result["valid_accuracy"]}

    return probe
