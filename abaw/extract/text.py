"""``python -m abaw.extract text``: timed words -> a text model's embeddings, per frame.

Input: ``--transcripts DIR`` holds ``<video>.csv`` with the header ``word,start,end`` (seconds from
the video's start), one spoken word per row in spoken order; an optional fourth column ``fps``
(the same on every row) gives the video's frame rate. A header-only file means nobody speaks. An
annotation ``<video>_left`` / ``_right`` reads its own ``<video>_left.csv`` if present, else the
recording's ``<video>.csv`` (both people hear the same words). Every annotated video needs a file:
missing files and bad rows (named by file and line) are raised together before the model loads.

Embeddings: the words are joined with spaces and run through a local transformers model
(``AutoTokenizer``/``AutoModel``, a fast tokenizer) once per transcript, in windows of the model's
maximum length overlapping by a quarter (each token is taken from the window where it has the most
context); a word's embedding is the mean of its sub-tokens' last hidden states.

Per frame: frame i (1-based) is at t = (i - 0.5) / fps, the rule the audio extractor uses
(:func:`abaw.extract.frames.frame_times`). Its row is the mean embedding of the words whose
[start, end] overlaps [t - 1 s, t + 1 s]; a NaN row where no word does. The frame rate is, in order:
the transcript's ``fps`` column; the name ``ID-FPS-WxH`` (``29`` read as 30000/1001); else 30 fps,
with the videos that fell back listed on the console.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import console
from ..data import Problem, fps_from_name
from ..subjects import video_file_of
from .frames import (ExtractError, ExtractionReport, FeatureWriter, Target, chunk_spans, extraction_targets,
                     frame_times, require_dir, run_extraction, torch_device)

HEADER = ["word", "start", "end"]
WINDOW_SECONDS = 1.0  # each side of the frame time
DEFAULT_FPS = 30.0
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Transcript:
    path: Path
    words: list[str]
    start: np.ndarray  # (m,) seconds
    end: np.ndarray
    fps: float | None  # from the fps column


# ---------------------------------------------------------------------------------------------
# Transcripts


def read_transcript(path: Path) -> tuple[Transcript, list[Problem]]:
    """Parse ``word,start,end[,fps]`` rows, collecting every bad row by line."""
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig")))
    header = [c.strip().lower() for c in next(reader, [])]
    if header not in (HEADER, HEADER + ["fps"]):
        return Transcript(path, [], np.zeros(0), np.zeros(0), None), [
            Problem(path, f"header must be 'word,start,end' (or with ',fps'), got {','.join(header)!r}", line=1)]
    words, times, rates, problems = [], [], set(), []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        line = reader.line_num
        try:
            word, start, end, fps = _parse_row(row, len(header))
        except ValueError as exc:
            problems.append(Problem(path, str(exc), line=line))
            continue
        words.append(word)
        times.append((start, end))
        rates.add(fps)
    if len(rates) > 1:
        problems.append(Problem(path, f"the fps column must hold one value on every row, got {sorted(rates)}"))
    fps = next(iter(rates)) if len(rates) == 1 else None
    times = np.asarray(times, np.float64).reshape(-1, 2)
    return Transcript(path, words, times[:, 0], times[:, 1], fps), problems


def _parse_row(row: list[str], n_columns: int) -> tuple[str, float, float, float | None]:
    if len(row) != n_columns:
        raise ValueError(f"expected {n_columns} cells, got {len(row)}: {','.join(row)!r}")
    word = row[0].strip()
    if not word:
        raise ValueError("empty word")
    numbers = []
    for column, cell in zip(["start", "end", "fps"], row[1:]):
        try:
            value = float(cell)
        except ValueError:
            raise ValueError(f"non-numeric {column} {cell.strip()!r}") from None
        if not math.isfinite(value) or value < 0 or (column == "fps" and value == 0):
            raise ValueError(f"{column} must be a finite {'positive' if column == 'fps' else 'non-negative'} "
                             f"number, got {cell.strip()!r}")
        numbers.append(value)
    if numbers[1] < numbers[0]:
        raise ValueError(f"end {numbers[1]} before start {numbers[0]}")
    return word, numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def transcript_file(video: str, folder: Path) -> Path | None:
    """``<video>.csv``, else (for ``_left``/``_right``) the recording's ``<base>.csv``."""
    for name in dict.fromkeys([video, video_file_of(video)]):
        if (folder / f"{name}.csv").is_file():
            return folder / f"{name}.csv"
    return None


def load_transcripts(targets: list[Target], folder: Path) -> dict[str, Transcript]:
    """Video -> its transcript; every missing file and bad row of every file is raised together."""
    files, missing = {}, []
    for target in targets:
        path = transcript_file(target.video, folder)
        if path is None:
            missing.append(target.video)
        else:
            files[target.video] = path
    parsed, problems = {}, []
    for path in sorted(set(files.values())):
        parsed[path], found = read_transcript(path)
        problems += found
    lines = [f"{folder}: no transcript (<video>.csv) for {len(missing)} annotated video(s): {', '.join(missing)}"] \
        if missing else []
    lines += [str(p) for p in problems]
    if lines:
        raise ExtractError(f"{len(missing) + len(problems)} problem(s) with the transcripts:\n  " + "\n  ".join(lines))
    return {video: parsed[path] for video, path in files.items()}


def video_fps(video: str, transcript: Transcript) -> float | None:
    """The transcript's fps column, else the rate in the name (29 -> 29.97), else None (the caller's default)."""
    if transcript.fps is not None:
        return transcript.fps
    fps = fps_from_name(video)
    if fps == 29:
        return 30000 / 1001
    return float(fps) if fps else None


# ---------------------------------------------------------------------------------------------
# Embeddings


class WordEmbedder:
    """A local text model: a transcript's words -> one embedding each (mean of its sub-tokens' states)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", batch_size: int = 64):
        self.folder = require_dir(model_dir, "text model")
        self.tokenizer, self.model = _load_text_model(self.folder)
        self.device, self.autocast = torch_device(device)
        self.model.to(self.device).eval()
        self.batch_size = max(1, batch_size)
        self.prefix, self.suffix = _special_tokens(self.tokenizer)
        self.window = _max_tokens(self.tokenizer, self.model.config) - len(self.prefix) - len(self.suffix)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, words: list[str]) -> np.ndarray:
        """(len(words), D); a NaN row for a word the tokenizer drops entirely (no token)."""
        text = " ".join(words)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                 verbose=False)  # longer than the model on purpose: windows follow
        ids = np.asarray(encoded["input_ids"], np.int64)
        owner = _token_words(words, encoded["offset_mapping"])
        states = self._token_states(ids)
        sums = np.zeros((len(words), self.dim))
        counts = np.zeros(len(words))
        np.add.at(sums, owner[owner >= 0], states[owner >= 0])
        np.add.at(counts, owner[owner >= 0], 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (sums / counts[:, None]).astype(np.float32)

    def _token_states(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D): each token's last hidden state, from the window where it has the most context."""
        states = np.zeros((len(ids), self.dim), np.float32)
        spans = chunk_spans(len(ids), self.window, self.window // 4) if len(ids) else []
        for i in range(0, len(spans), self.batch_size):
            batch = spans[i:i + self.batch_size]
            rows = np.stack([np.concatenate([self.prefix, ids[s.start:s.stop], self.suffix]) for s in batch])
            for span, hidden in zip(batch, self._forward(rows)):
                keep = slice(span.keep_start - span.start, span.keep_stop - span.start)
                states[span.keep_start:span.keep_stop] = hidden[len(self.prefix):][keep]
        return states

    def _forward(self, rows: np.ndarray) -> np.ndarray:
        import torch

        input_ids = torch.from_numpy(rows).to(self.device)
        with torch.inference_mode(), self.autocast:
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return out.last_hidden_state.float().cpu().numpy()


def _load_text_model(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ExtractError(f"{folder}: cannot load a text model and its tokenizer: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExtractError(f"{folder}: the tokenizer must be a fast one (tokenizer.json): words are matched to "
                           f"tokens by character offsets")
    return tokenizer, model


def _special_tokens(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer puts before and after a text ([CLS] / [SEP], <s> / </s>, ...)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return np.asarray(full[:i], np.int64), np.asarray(full[i + len(bare):], np.int64)
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def _max_tokens(tokenizer, config) -> int:
    """The longest input: the tokenizer's limit where it states one, capped by the position embeddings."""
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_TOKENS
    stated = getattr(tokenizer, "model_max_length", None)
    return min(limit, stated) if stated and stated < 1_000_000 else limit


def _token_words(words: list[str], offsets) -> np.ndarray:
    """Token -> index of the word holding its last character (words joined by single spaces); -1 for none."""
    lengths = np.asarray([len(w) for w in words])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    last = offsets[:, 1] - 1
    owner = np.clip(np.searchsorted(starts, last, side="right") - 1, 0, None)
    inside = (offsets[:, 1] > offsets[:, 0]) & (last < starts[owner] + lengths[owner])  # not a separating space
    return np.where(inside, owner, -1)


# ---------------------------------------------------------------------------------------------
# Per frame


def window_means(times: np.ndarray, start: np.ndarray, end: np.ndarray, values: np.ndarray,
                 half_width: float = WINDOW_SECONDS) -> np.ndarray:
    """(len(times), D): the mean of the rows whose [start, end] overlaps [t - half_width, t + half_width]; NaN if none.

    Prefix sums: the overlapping words are those starting by t + w, less those ended before t - w (a
    subset of the former, since start <= end)."""
    out = np.full((len(times), values.shape[1]), np.nan, np.float32)
    usable = ~np.isnan(values).any(axis=1)
    start, end, values = start[usable], end[usable], values[usable].astype(np.float64)
    by_start, by_end = np.argsort(start, kind="stable"), np.argsort(end, kind="stable")
    started = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values[by_start], axis=0)])
    ended = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values[by_end], axis=0)])
    n_started = np.searchsorted(start[by_start], times + half_width, side="right")
    n_ended = np.searchsorted(end[by_end], times - half_width, side="left")
    count = n_started - n_ended
    spoken = count > 0
    out[spoken] = (started[n_started[spoken]] - ended[n_ended[spoken]]) / count[spoken, None]
    return out


def extract_text(data_root, transcripts_dir, model_dir, batch_size: int = 64, device: str = "auto", name: str = "text",
                 dtype: str = "float16", test_list=None, test_sample=None) -> ExtractionReport:
    """Write ``ROOT/features/<name>/<video>.npy``: per frame, the mean embedding of the words within 1 s."""
    require_dir(model_dir, "text model")
    folder = require_dir(transcripts_dir, "transcripts")
    targets = extraction_targets(data_root, test_list, test_sample)
    writer = FeatureWriter(data_root, name, dtype)
    pending = [t for t in targets if not writer.done(t)]
    transcripts = load_transcripts(pending, folder)
    rates = {t.video: video_fps(t.video, transcripts[t.video]) for t in pending}
    _report_default_fps([v for v, fps in rates.items() if fps is None and transcripts[v].words])
    embed = WordEmbedder(model_dir, device=device, batch_size=batch_size) if pending else None
    cache: dict[Path, np.ndarray] = {}  # the last transcript: _left and _right may share it

    def extract(target: Target) -> np.ndarray:
        transcript = transcripts[target.video]
        if not transcript.words:
            return np.full((target.n_frames, embed.dim), np.nan, np.float32)
        if transcript.path not in cache:
            cache.clear()
            cache[transcript.path] = embed(transcript.words)
        times = frame_times(target.n_frames, rates[target.video] or DEFAULT_FPS)
        return window_means(times, transcript.start, transcript.end, cache[transcript.path])

    ordered = sorted(targets, key=lambda t: (str(getattr(transcripts.get(t.video), "path", "")), t.video))
    return run_extraction(ordered, writer, extract, "text",
                          settings={"command": "text", "model": Path(model_dir).name})


def _report_default_fps(videos: list[str]) -> None:
    if videos:
        more = f" and {len(videos) - 20} more" if len(videos) > 20 else ""
        console.print(f"text: {len(videos)} video(s) have no fps column and no rate in their name; "
                      f"{DEFAULT_FPS:g} fps assumed: {', '.join(videos[:20])}{more}", markup=False)
