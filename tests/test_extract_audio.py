"""``abaw.extract.audio`` on tiny video files written here with PyAV, and a tiny random wav2vec 2.0."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("librosa")

from abaw.extract import audio  # noqa: E402
from abaw.extract.__main__ import main  # noqa: E402
from abaw.extract.frames import ExtractError, chunk_spans, frame_times  # noqa: E402

RATE = 48000  # 25 and 30 fps frames are whole numbers of samples


def tone(seconds: float, on=lambda t: np.ones_like(t, bool), freq=440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t) * on(t)).astype(np.float32)


def write_video(path: Path, fps: int = 25, seconds: float = 1.0, sound: np.ndarray | None = None,
                audio_start: float = 0.0, video: bool = True) -> Path:
    """A 32x32 video of ``seconds`` at ``fps`` with ``sound`` (48 kHz mono; AAC in .mp4, PCM otherwise)."""
    with av.open(str(path), "w") as container:
        # Every stream is set up before the first frame is encoded.
        picture = container.add_stream("mpeg4", rate=fps, width=32, height=32, pix_fmt="yuv420p") if video else None
        track = container.add_stream("aac" if path.suffix == ".mp4" else "pcm_s16le", rate=RATE, layout="mono") \
            if sound is not None else None
        if picture is not None:
            _write_picture(container, picture, int(round(seconds * fps)))
        if track is not None:
            _write_sound(container, track, sound, audio_start)
    return path


def _write_picture(container, stream, n_frames: int) -> None:
    for i in range(n_frames):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i % 255, np.uint8), format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _write_sound(container, stream, sound: np.ndarray, start: float) -> None:
    fmt = stream.codec_context.format.name
    size = stream.codec_context.frame_size or 1024
    for offset in range(0, len(sound), size):
        piece = sound[offset:offset + size]
        array = (piece * 32767).astype(np.int16)[None] if fmt.startswith("s16") else piece[None]
        frame = av.AudioFrame.from_ndarray(array, format=fmt, layout="mono")
        frame.sample_rate, frame.time_base = RATE, Fraction(1, RATE)
        frame.pts = offset + int(round(start * RATE))
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def loudness(mel_db: np.ndarray) -> np.ndarray:
    """dB of the summed mel power of each row."""
    return 10 * np.log10((10 ** (mel_db.astype(np.float64) / 10)).sum(axis=1))


@pytest.fixture(scope="module")
def tiny_wav2vec(tmp_path_factory) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("wav2vec")
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8,) * 7, feat_extract_norm="layer", num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2)  # real kernels and strides: 20 ms frames
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


@pytest.fixture
def videos(tiny_root, tmp_path) -> Path:
    """Files for tiny_root's videos (20 frames each): ``a`` has 0.5 s of sound at 25 fps (frames 14-20 past
    it), ``b`` serves b_left and b_right, the rest in every container."""
    folder = tmp_path / "videos"
    (folder / "batch2").mkdir(parents=True)
    write_video(folder / "a.mp4", 25, 0.8, tone(0.5))
    write_video(folder / "b.avi", 30, 0.8, tone(0.8, freq=880))
    write_video(folder / "c.mkv", 25, 0.8, tone(0.8, on=lambda t: t > 0.4))
    write_video(folder / "batch2" / "t1.mov", 30, 0.8, tone(0.8, freq=220))
    write_video(folder / "batch2" / "t2.mp4", 25, 0.8, tone(0.8, freq=660))
    return folder


# ---------------------------------------------------------------------------------------------
# Shared timing helpers


def test_frame_times_are_frame_middles():
    np.testing.assert_allclose(frame_times(3, 25), [0.02, 0.06, 0.10])
    with pytest.raises(ValueError):
        frame_times(3, 0)


@pytest.mark.parametrize("n,size,overlap", [(5, 8, 2), (100, 20, 6), (101, 20, 6), (35, 20, 6)])
def test_chunk_spans_keep_every_position_once_with_context(n, size, overlap):
    spans = chunk_spans(n, size, overlap)
    kept = np.concatenate([np.arange(s.keep_start, s.keep_stop) for s in spans])
    np.testing.assert_array_equal(kept, np.arange(n))
    assert {s.stop - s.start for s in spans} == {min(n, size)}
    assert spans[0].start == 0 and spans[-1].stop == n
    for s in spans:
        assert s.start <= s.keep_start < s.keep_stop <= s.stop
        assert s.keep_start == 0 or s.keep_start - s.start >= overlap // 2
        assert s.keep_stop == n or s.stop - s.keep_stop >= overlap // 2


# ---------------------------------------------------------------------------------------------
# Frame times


@pytest.mark.parametrize("fps,audio_start,suffix", [(25, 0.0, ".mkv"), (30, 0.0, ".mp4"), (30, 0.3, ".mkv")])
def test_a_burst_during_one_image_peaks_at_that_frame(tmp_path, fps, audio_start, suffix):
    """Sound only while image k is shown: frame k (its middle) is loud, its neighbours silent. Sampling at
    frame starts would make frames k and k+1 equally loud. A track that starts late is shifted."""
    k = 20
    on = (k - 1) / fps - audio_start, k / fps - audio_start  # on the sound's own clock
    path = write_video(tmp_path / f"burst{suffix}", fps, 1.5, tone(1.2, on=lambda t: (t >= on[0]) & (t < on[1])),
                       audio_start=audio_start)
    sound = audio.read_sound(path)
    assert sound.fps == fps and sound.start == pytest.approx(audio_start, abs=2e-3)
    level = loudness(audio.frame_features(sound, audio.log_mel(sound), 30)[k - 3:k + 2])  # frames k-2..k+2
    assert np.argmax(level) == 2
    assert level[2] > max(level[1], level[3]) + 40  # at frame starts, frames k and k+1 would be within 1 dB


def test_frames_outside_the_sound_are_nan(tmp_path):
    path = write_video(tmp_path / "late.mkv", 25, 2.0, tone(1.0), audio_start=0.5)  # sound 0.5-1.5 s
    sound = audio.read_sound(path)
    rows = audio.frame_features(sound, audio.mfcc(sound), 50)
    times = frame_times(50, 25)
    inside = (times >= 0.5) & (times <= 1.5)
    assert rows.shape == (50, 39)
    assert np.isnan(rows[~inside]).all() and np.isfinite(rows[inside]).all()


# ---------------------------------------------------------------------------------------------
# extract_audio on a root


def test_extract_mel_writes_every_video_and_counts_frames_past_the_sound(tiny_root, videos):
    report = audio.extract_audio(tiny_root, videos, "mel", name="mel", dtype="float32")
    assert sorted(report.written) == ["a", "b_left", "b_right", "c", "t1", "t2"]
    out = {v: np.load(tiny_root / "features" / "mel" / f"{v}.npy") for v in report.written}
    assert all(x.shape == (20, audio.N_MELS) and x.dtype == np.float32 for x in out.values())
    past = frame_times(20, 25) > 0.5  # a.mp4's sound is 0.5 s (AAC may pad a few ms: frame 13 is at 0.50 s)
    assert np.isnan(out["a"][past]).all() and np.isfinite(out["a"][~past]).all()
    assert report.missing == past.sum()
    loud = loudness(out["c"])  # c's tone starts at 0.4 s: frame 10 (0.38 s) is silent, 12 (0.46 s) loud
    assert loud[9] < -60 < loud[11]


def test_left_and_right_use_the_recordings_file(tiny_root, videos):
    audio.extract_audio(tiny_root, videos, "mfcc", name="mfcc", dtype="float32")
    left, right = (np.load(tiny_root / "features" / "mfcc" / f"b_{side}.npy") for side in ("left", "right"))
    sound = audio.read_sound(videos / "b.avi")
    np.testing.assert_allclose(left, audio.frame_features(sound, audio.mfcc(sound), 20), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(left, right)


def test_a_side_with_its_own_file_uses_it(tiny_root, videos):
    write_video(videos / "b_right.avi", 30, 0.8, tone(0.8, freq=3000))
    audio.extract_audio(tiny_root, videos, "mel", name="mel")
    left, right = (np.load(tiny_root / "features" / "mel" / f"b_{side}.npy") for side in ("left", "right"))
    assert not np.allclose(left, right)


def test_resume_skips_finished_videos_and_keeps_them(tiny_root, videos):
    folder = tiny_root / "features" / "mel"
    audio.extract_audio(tiny_root, videos, "mel", name="mel")
    (folder / "c.npy").unlink()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.npy")}
    (videos / "a.mp4").unlink()  # a finished video needs its file no more
    report = audio.extract_audio(tiny_root, videos, "mel", name="mel")
    assert report.written == ["c"] and len(report.skipped) == 5
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.npy") if p.name != "c.npy"} == before


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_files_are_all_named_before_any_work(tiny_root, videos):
    (videos / "b.avi").unlink()
    (videos / "batch2" / "t2.mp4").unlink()
    with pytest.raises(ExtractError) as err:
        audio.extract_audio(tiny_root, videos, "mel", name="mel")
    message = str(err.value)
    assert str(videos) in message and "3 annotated video(s)" in message
    assert all(name in message for name in ("b_left", "b_right", "t2"))
    assert not (tiny_root / "features" / "mel").exists()


def test_a_video_without_sound_is_named(tiny_root, videos):
    write_video(videos / "c.mkv", 25, 0.8, sound=None)
    with pytest.raises(ExtractError, match=r"c\.mkv: no audio stream"):
        audio.extract_audio(tiny_root, videos, "mel", name="mel")
    assert not (tiny_root / "features" / "mel").exists()


def test_a_file_without_video_has_no_frame_rate(tiny_root, videos):
    (videos / "c.mkv").unlink()
    write_video(videos / "c.mka", sound=tone(0.8), video=False)
    (videos / "c.mka").rename(videos / "c.mkv")
    with pytest.raises(ExtractError, match=r"c\.mkv: no video stream with a frame rate"):
        audio.extract_audio(tiny_root, videos, "mfcc", name="mfcc")


def test_two_files_for_one_video_are_refused(tiny_root, videos):
    write_video(videos / "batch2" / "a.avi", 25, 0.8, tone(0.8))
    with pytest.raises(ExtractError, match=r"a: several files"):
        audio.extract_audio(tiny_root, videos, "mel", name="mel")


def test_missing_model_folder_and_bad_layer(tiny_root, videos, tmp_path, tiny_wav2vec):
    with pytest.raises(ExtractError, match=r"nowhere: speech model folder does not exist"):
        audio.extract_audio(tiny_root, videos, "model", model_dir=tmp_path / "nowhere")
    with pytest.raises(ExtractError, match=r"--layer 3 out of range; .* 0\.\.2"):
        audio.extract_audio(tiny_root, videos, "model", model_dir=tiny_wav2vec, layer=3, name="w2v")
    with pytest.raises(ValueError, match="kind must be one of"):
        audio.extract_audio(tiny_root, videos, "egemaps")


# ---------------------------------------------------------------------------------------------
# Speech model


def test_model_features_per_frame(tiny_root, videos, tiny_wav2vec):
    report = audio.extract_audio(tiny_root, videos, "model", model_dir=tiny_wav2vec, device="cpu", name="w2v",
                                 dtype="float32")
    assert len(report.written) == 6
    a = np.load(tiny_root / "features" / "w2v" / "a.npy")
    past = frame_times(20, 25) > 0.5
    assert a.shape == (20, 16) and np.isnan(a[past]).all() and np.isfinite(a[~past]).all()
    last = audio.extract_audio(tiny_root, videos, "model", model_dir=tiny_wav2vec, layer=1, device="cpu", name="w2v1")
    assert last.written and not np.allclose(np.load(tiny_root / "features" / "w2v1" / "c.npy"),
                                            np.load(tiny_root / "features" / "w2v" / "c.npy"), equal_nan=True)


def test_chunks_are_stitched_at_the_right_times(tiny_wav2vec):
    """Layer 0 sees only ~0.2 s around each frame, so 1 s chunks with 0.25 s of context give the same
    states at the same times as one pass (wrong offsets, per-chunk normalisation or gaps would not)."""
    rng = np.random.default_rng(0)
    sound = audio.Sound(Path("x"), rng.standard_normal(48000).astype(np.float32) * np.linspace(0.1, 2, 48000,
                                                                                                 dtype=np.float32),
                        0.0, 25.0)
    whole = audio.SpeechModel(tiny_wav2vec, layer=0, device="cpu")(sound)
    chunked = audio.SpeechModel(tiny_wav2vec, layer=0, device="cpu", chunk_seconds=1.0, context_seconds=0.25)(sound)
    assert len(whole.times) == 149 and np.all(np.diff(whole.times) == pytest.approx(0.02))
    assert whole.times[0] == pytest.approx(0.0125, abs=1e-4)  # the middle of the first 25 ms receptive field
    np.testing.assert_allclose(chunked.times, whole.times)
    np.testing.assert_allclose(chunked.values, whole.values, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end(tiny_root, videos):
    code = main(["audio", "--data-root", str(tiny_root), "--videos", str(videos), "--mfcc", "--name", "mfcc"])
    assert code == 0
    out = sorted(p.stem for p in (tiny_root / "features" / "mfcc").glob("*.npy"))
    assert out == ["a", "b_left", "b_right", "c", "t1", "t2"]
    assert all(np.load(tiny_root / "features" / "mfcc" / f"{v}.npy").shape == (20, 39) for v in out)


def test_cli_reports_bad_input(tiny_root, videos, tmp_path, capsys):
    code = main(["audio", "--data-root", str(tiny_root), "--videos", str(tmp_path / "none"), "--mel"])
    assert code == 1
    assert "videos folder does not exist" in capsys.readouterr().out
