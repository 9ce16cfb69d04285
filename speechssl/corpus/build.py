"""The corpus build: plan speakers and chapters, render them on worker processes, write the metadata.

Reuse: a finished corpus in OUT with the same config (settings, seed, versions of the generator, tools
and text sources: :func:`corpus_config`) is returned as is; a different one is replaced only with
``force``. The build goes to a temporary directory beside OUT renamed at the end: an interrupted run
never looks finished. Same seed and settings => byte-identical corpus whatever the number of workers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechssl import __version__
from speechssl.corpus.common import (MAX_SECONDS, MAX_WORDS, MIN_SECONDS, MIN_WORDS, SAMPLE_RATE, SNR_DB,
                                     SUBSETS, SYNTH_VERSION, SynthError)
from speechssl.corpus.render import ChapterResult, ChapterTask, init_worker, synth_chapter
from speechssl.corpus.sentences import SentencePool, build_sentence_pool, sources_sha256, text_source_files
from speechssl.corpus.voices import Inventory, Speaker, available_voices, plan_speakers
from speechssl.utils.io import atomic_write_text


@dataclass
class CorpusSummary:
    """What a build produced (or what the reused corpus holds). Per-subset dicts are keyed by SUBSETS."""

    out_dir: str
    speakers: dict[str, int]
    utterances: dict[str, int]
    seconds: dict[str, float]
    sentences_available: int  # distinct sentences in the pool
    sentences_read: int  # distinct sentences in the corpus
    failed: int  # utterances the engine or sox failed on (dropped)
    out_of_range: int  # utterances outside 2-15 s (dropped)
    elapsed: float = 0.0  # seconds this call took
    reused: bool = False

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def report(self) -> str:
        rows = [f"  {s:<5} {self.speakers[s]:3d} speakers {self.utterances[s]:6d} utterances "
                f"{self.seconds[s] / 3600:7.3f} h ({self.seconds[s] / 60:.1f} min)"
                for s in SUBSETS if s != "pool" or self.speakers.get(s)]
        head = "reused finished corpus" if self.reused else "built corpus"
        return "\n".join([
            f"{head} {self.out_dir} in {self.elapsed:.1f} s",
            *rows,
            f"  total {sum(self.speakers.values()):3d} speakers {sum(self.utterances.values()):6d} utterances "
            f"{self.total_seconds / 3600:7.3f} h ({self.total_seconds / 60:.1f} min)",
            f"  sentences: {self.sentences_read} read of {self.sentences_available} available; dropped "
            f"utterances: {self.failed} engine/sox failures, {self.out_of_range} outside "
            f"{MIN_SECONDS:g}-{MAX_SECONDS:g} s",
        ])


def _split_counts(speakers: int, dev: Optional[int], test: Optional[int]) -> tuple[int, int]:
    dev = max(1, round(0.1 * speakers)) if dev is None else dev
    test = max(1, round(0.1 * speakers)) if test is None else test
    if dev < 1 or test < 1 or speakers - dev - test < 1:
        raise SynthError(f"--speakers {speakers} with --dev-speakers {dev} --test-speakers {test} leaves "
                         f"{speakers - dev - test} train speakers: every subset needs at least one speaker")
    return dev, test


def corpus_config(*, minutes: float, speakers: int, dev_speakers: int, test_speakers: int, seed: int,
                  inventory: Inventory, pool_minutes: float = 0.0, pool_speakers: int = 0) -> dict:
    """Everything the corpus content depends on; a finished corpus with an equal config is reused."""
    sources = text_source_files()
    return {
        "generator": "speechssl.corpus",
        "synth_version": SYNTH_VERSION,
        "speechssl_version": __version__,
        "seed": seed,
        "minutes": minutes,
        "speakers": speakers,
        "dev_speakers": dev_speakers,
        "test_speakers": test_speakers,
        "pool_minutes": pool_minutes,
        "pool_speakers": pool_speakers,
        "engines": inventory.engines,
        "voices": {
            "espeak-ng": {"accents": list(inventory.espeak_accents),
                          "variants": {sex: list(v) for sex, v in inventory.espeak_variants.items()}},
            "flite": [v.name for v in inventory.voices if v.engine == "flite"],
            "festival": [v.name for v in inventory.voices if v.engine == "festival"],
        },
        "sample_rate": SAMPLE_RATE,
        "utterance_seconds": [MIN_SECONDS, MAX_SECONDS],
        "snr_db": list(SNR_DB),
        "sentence_words": [MIN_WORDS, MAX_WORDS],
        "tools": inventory.versions,
        "text_sources": {"files": [str(p) for p in sources], "sha256": sources_sha256(sources)},
    }


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary build directories beside ``out`` left by runs that were killed."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        match = re.match(rf"\.{re.escape(out.name)}\.partial-(\d+)-", partial.name)
        if not match or not partial.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass


def _speakers_txt(speakers: Sequence[Speaker], seconds: dict[int, float], seed: int) -> str:
    lines = [f"; Speakers of the speechssl synthesized demo corpus (seed {seed}), LibriSpeech SPEAKERS.TXT layout.",
             "; NAME is the voice: engine, voice and settings; sox transform; mean SNR (sessions: CHAPTERS.TXT).",
             ";ID  |SEX| SUBSET | MINUTES | NAME"]
    for s in speakers:
        lines.append(f"{s.speaker_id:<5}| {s.sex} | {s.subset:<6} | {seconds.get(s.speaker_id, 0.0) / 60:7.2f} | "
                     f"{s.describe()}")
    return "\n".join(lines) + "\n"


def _chapters_txt(speakers: Sequence[Speaker], results: Sequence[ChapterResult]) -> str:
    seconds = {(r.speaker_id, r.chapter_id): r.seconds for r in results}
    lines = ["; Chapters (recording sessions) of the speechssl synthesized demo corpus, LibriSpeech CHAPTERS.TXT "
             "layout.", "; SESSION: the microphone, room and noise colour of the chapter (each chapter its own).",
             ";ID      |READER| MINUTES | SUBSET | SESSION"]
    for s in speakers:
        for chapter_id, session in zip(s.chapters, s.sessions):
            minutes = seconds.get((s.speaker_id, chapter_id), 0.0) / 60
            lines.append(f"{chapter_id:<8}| {s.speaker_id:<5}| {minutes:7.2f} | {s.subset:<6} | {session.describe()}")
    return "\n".join(lines) + "\n"


def synthesize_corpus(out_dir: str | Path, *, minutes: float = 45.0, speakers: int = 30,
                      dev_speakers: Optional[int] = None, test_speakers: Optional[int] = None, seed: int = 0,
                      pool_minutes: float = 330.0, pool_speakers: int = 160,
                      engines: Optional[Sequence[str]] = None, workers: Optional[int] = None,
                      force: bool = False, progress: bool = True) -> CorpusSummary:
    """Build (or reuse) the demo corpus in ``out_dir``; see :mod:`speechssl.corpus` for the layout.

    minutes: total audio of the train, dev and test subsets. speakers: their speakers; dev_speakers /
    test_speakers default to 10% of them (at least 1; 3 + 3 of the default 30). pool_minutes /
    pool_speakers: the unlabeled pretraining pool (subset ``pool``; none when 0), speakers of its own.
    engines: subset of ENGINES (default: every one installed). workers: processes (default: CPU cores);
    the output does not depend on it. force: replace a different corpus in ``out_dir``. Raises
    SynthError with what to do when it cannot build.
    """
    start = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    if minutes <= 0:
        raise SynthError(f"--minutes must be > 0, got {minutes}")
    if pool_minutes < 0 or pool_speakers < 0 or (pool_minutes > 0) != (pool_speakers > 0):
        raise SynthError(f"--pool-minutes {pool_minutes:g} with --pool-speakers {pool_speakers}: give both > 0 "
                         "for an unlabeled pool, or both 0 for none")
    dev_speakers, test_speakers = _split_counts(speakers, dev_speakers, test_speakers)
    inventory = available_voices(list(engines) if engines else None)
    config = corpus_config(minutes=minutes, speakers=speakers, dev_speakers=dev_speakers,
                           test_speakers=test_speakers, seed=seed, inventory=inventory,
                           pool_minutes=pool_minutes, pool_speakers=pool_speakers)

    if out.exists():
        if not out.is_dir():
            raise SynthError(f"{out} exists and is not a directory: choose another output path")
        existing = _read_json(out / "synth_config.json")
        summary = _read_json(out / "synth_summary.json")
        if existing == config and summary is not None and not force:
            return CorpusSummary(out_dir=str(out), elapsed=time.perf_counter() - start, reused=True, **summary)
        if existing is None and any(out.iterdir()):
            raise SynthError(f"{out} is a non-empty directory that is not a synthesized corpus (no "
                             "synth_config.json): choose another path or empty it yourself")
        if existing is not None and not force:
            changed = sorted(k for k in set(config) | set(existing) if config.get(k) != existing.get(k))
            what = f"different settings ({', '.join(changed)})" if changed else "no synth_summary.json"
            raise SynthError(f"{out} holds a corpus with {what}: pass --force to replace it, "
                             "or choose another output directory")

    pool = build_sentence_pool()
    plan = plan_speakers(seed, speakers, dev_speakers, test_speakers, minutes * 60.0, inventory,
                         n_pool=pool_speakers, pool_seconds=pool_minutes * 60.0)
    # Reading order: passages in seeded random order, sentences of a passage consecutive.
    passage_rank = np.random.default_rng([seed, 0x7E47]).permutation(int(pool.passage.max()) + 1)
    order = np.lexsort((np.arange(len(pool)), passage_rank[pool.passage]))
    minutes = minutes + pool_minutes  # every chapter reads its own block of the order, pool chapters too
    _remove_stale_partials(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        tasks, cursor = [], 0.0
        per_second = len(pool) / (minutes * 60.0)  # each chapter's block of the reading order ~ its budget
        for s in plan:
            for chapter_id in s.chapters:
                budget = s.seconds / len(s.chapters)
                block = (int(cursor * per_second), int((cursor + budget) * per_second))
                cursor += budget
                tasks.append(ChapterTask(seed, s, chapter_id, budget, block,
                                         str(partial / s.subset / str(s.speaker_id) / str(chapter_id))))
        results = _run_tasks(tasks, pool, order, workers, progress)
        summary = _summarize(plan, results, len(pool))
        seconds_by_speaker: dict[int, float] = {}
        for r in results:
            seconds_by_speaker[r.speaker_id] = seconds_by_speaker.get(r.speaker_id, 0.0) + r.seconds
        atomic_write_text(partial / "SPEAKERS.TXT", _speakers_txt(plan, seconds_by_speaker, seed))
        atomic_write_text(partial / "CHAPTERS.TXT", _chapters_txt(plan, results))
        atomic_write_text(partial / "synth_summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(partial / "synth_config.json", json.dumps(config, indent=2) + "\n")  # marks finished
        os.chmod(partial, 0o755)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(partial, out)
            shutil.rmtree(trash)
        else:
            os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CorpusSummary(out_dir=str(out), elapsed=time.perf_counter() - start, **summary)


def _run_tasks(tasks: list[ChapterTask], pool: SentencePool, order: np.ndarray, workers: Optional[int],
               progress: bool) -> list[ChapterResult]:
    """Run the chapter tasks on ``workers`` processes (in this process for 1) with a progress bar."""
    from tqdm import tqdm

    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(tasks)))
    bar = tqdm(total=len(tasks), unit="chapter", desc=f"synthesizing ({workers} workers)", disable=not progress)
    results: list[ChapterResult] = []

    def done(result: ChapterResult) -> None:
        results.append(result)
        bar.set_postfix_str(f"{sum(r.seconds for r in results) / 60:.1f} min audio", refresh=False)
        bar.update()

    try:
        if workers == 1:
            init_worker(pool, order)
            for task in tasks:
                done(synth_chapter(task))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")  # workers need no state of the parent
            with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                                     initargs=(pool, order)) as executor:
                futures = [executor.submit(synth_chapter, t) for t in sorted(tasks, key=lambda t: -t.seconds)]
                try:
                    for future in as_completed(futures):
                        done(future.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return sorted(results, key=lambda r: (r.speaker_id, r.chapter_id))


def _summarize(plan: Sequence[Speaker], results: Sequence[ChapterResult], n_pool: int) -> dict:
    subset_of = {s.speaker_id: s.subset for s in plan}
    summary: dict = {key: {k: 0 for k in SUBSETS} for key in ("speakers", "utterances", "seconds")}
    for speaker_id in {r.speaker_id for r in results if r.utterances}:
        summary["speakers"][subset_of[speaker_id]] += 1
    for r in results:
        summary["utterances"][subset_of[r.speaker_id]] += r.utterances
        summary["seconds"][subset_of[r.speaker_id]] += r.seconds
    summary["seconds"] = {k: round(v, 3) for k, v in summary["seconds"].items()}
    return {**summary, "sentences_available": n_pool,
            "sentences_read": len({i for r in results for i in r.sentences}),
            "failed": sum(r.failed for r in results), "out_of_range": sum(r.out_of_range for r in results)}
