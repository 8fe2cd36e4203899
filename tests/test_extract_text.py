"""``abaw.extract.text`` with tiny random BERT models built from a vocabulary written here (no download)."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from abaw.extract import text  # noqa: E402
from abaw.extract.__main__ import main  # noqa: E402
from abaw.extract.frames import ExtractError  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "good", "bad", "day", "the", "a", "##s",
         "i", "am", "fine", "you", "are", "well", ","]
VIDEOS = ["a", "b_left", "b_right", "c", "t1", "t2"]


def make_bert(folder: Path, max_positions: int) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert"), 64)


@pytest.fixture(scope="module")
def short_bert(tmp_path_factory) -> Path:
    """At most 24 tokens: 22 words and [CLS] [SEP] per window."""
    return make_bert(tmp_path_factory.mktemp("short_bert"), 24)


def direct(model_dir: Path, words: list[str]) -> np.ndarray:
    """Each word's mean sub-token state from one plain forward pass over the whole text."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    encoded = tokenizer(" ".join(words), return_tensors="pt")
    states = model(**encoded).last_hidden_state[0].detach().numpy()
    owners = np.array([-1 if w is None else w for w in encoded.word_ids()])
    return np.stack([states[owners == k].mean(axis=0) for k in range(len(words))])


def write_csv(path: Path, rows: list[str], header: str = "word,start,end") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def transcripts(tmp_path) -> Path:
    """``a`` at 10 fps (frames 0.05 s, 0.15 s, ... 1.95 s): hello 0-0.2 s, goods 0.25-0.33 s; ``b`` serves
    both sides; nobody speaks in ``c``; the test videos say a word each (30 fps by default)."""
    folder = tmp_path / "transcripts"
    folder.mkdir()
    write_csv(folder / "a.csv", ["hello,0.0,0.2,10", "goods,0.25,0.33,10"], header="word,start,end,fps")
    write_csv(folder / "b.csv", ["i,0.1,0.2", "am,0.2,0.3", "fine,0.3,0.5"])
    write_csv(folder / "c.csv", [])
    write_csv(folder / "t1.csv", ['"well,",0.0,0.1'])
    write_csv(folder / "t2.csv", ["day,0.4,0.6"])
    return folder


def load(root: Path, name: str, video: str) -> np.ndarray:
    return np.load(root / "features" / name / f"{video}.npy")


# ---------------------------------------------------------------------------------------------
# Embeddings per frame


def test_frames_get_the_mean_of_the_words_within_one_second(tiny_root, transcripts, bert):
    report = text.extract_text(tiny_root, transcripts, bert, device="cpu", name="text2", dtype="float32")
    assert sorted(report.written) == VIDEOS
    a = load(tiny_root, "text2", "a")
    hello, goods = direct(bert, ["hello", "goods"])
    assert a.shape == (20, 8)
    np.testing.assert_allclose(a[:12], np.tile((hello + goods) / 2, (12, 1)), atol=1e-5)  # t <= 1.15 s: both
    np.testing.assert_allclose(a[12], goods, atol=1e-5)  # t = 1.25 s: hello ended 1.05 s before
    assert np.isnan(a[13:]).all()  # t >= 1.35 s: nobody within 1 s
    assert not np.allclose(hello, goods)
    assert np.isnan(load(tiny_root, "text2", "c")).all() and load(tiny_root, "text2", "c").shape == (20, 8)
    assert report.missing == 7 + 20 + np.isnan(load(tiny_root, "text2", "t2")).any(axis=1).sum()


def test_the_frame_rate_places_the_words(tiny_root, transcripts, bert, capsys):
    """t2 says 'day' at 0.4-0.6 s: at 30 fps (no rate in the name) every frame (up to 0.65 s) is within 1 s;
    at 10 fps the frames after 1.6 s are not."""
    text.extract_text(tiny_root, transcripts, bert, device="cpu", name="t30")
    assert "30 fps assumed" in capsys.readouterr().out
    assert np.isfinite(load(tiny_root, "t30", "t2")).all()
    write_csv(transcripts / "t2.csv", ["day,0.4,0.6,10"], header="word,start,end,fps")
    text.extract_text(tiny_root, transcripts, bert, device="cpu", name="t10")
    rows = load(tiny_root, "t10", "t2")
    assert np.isfinite(rows[:16]).all() and np.isnan(rows[16:]).all()  # frame 16 at 1.55 s, 17 at 1.65 s


def test_fps_from_the_transcript_then_the_name():
    def transcript(fps):
        return text.Transcript(Path("x.csv"), ["a"], np.zeros(1), np.ones(1), fps)

    assert text.video_fps("10-60-1280x720", transcript(None)) == 60
    assert text.video_fps("10-29-1280x720_left", transcript(None)) == pytest.approx(29.97, abs=1e-3)
    assert text.video_fps("10-60-1280x720", transcript(25.0)) == 25
    assert text.video_fps("video12", transcript(None)) is None


def test_left_and_right_share_the_recordings_transcript_unless_they_have_their_own(tiny_root, transcripts, bert):
    text.extract_text(tiny_root, transcripts, bert, device="cpu", name="shared")
    left, right = load(tiny_root, "shared", "b_left"), load(tiny_root, "shared", "b_right")
    assert np.isfinite(left).all()
    np.testing.assert_array_equal(left, right)
    write_csv(transcripts / "b_right.csv", ["bad,0.1,0.2"])
    text.extract_text(tiny_root, transcripts, bert, device="cpu", name="own")
    np.testing.assert_array_equal(load(tiny_root, "own", "b_left"), left)
    assert not np.allclose(load(tiny_root, "own", "b_right"), right)


def test_long_transcripts_run_in_windows_with_context(short_bert):
    """60 one-token words through a 24-position model: windows of 22 words; the first words come from the
    first window and the last from the last, exactly as a direct pass over those 22 words gives them."""
    plain = [w for w in VOCAB[5:] if w.isalpha()]
    words = [plain[i % len(plain)] for i in range(60)]
    embedded = text.WordEmbedder(short_bert, device="cpu")(words)
    assert np.isfinite(embedded).all()
    np.testing.assert_allclose(embedded[:10], direct(short_bert, words[:22])[:10], atol=1e-5)
    np.testing.assert_allclose(embedded[-10:], direct(short_bert, words[-22:])[-10:], atol=1e-5)


def test_window_means_counts_overlaps_at_both_ends():
    start, end = np.array([2.0, 0.0, 1.0]), np.array([2.5, 0.5, 1.5])
    values = np.eye(3, dtype=np.float32)
    out = text.window_means(np.array([0.5, 2.4, 3.4, 3.6]), start, end, values)
    np.testing.assert_allclose(out[:3], [[0, 0.5, 0.5], [0.5, 0, 0.5], [1, 0, 0]])
    assert np.isnan(out[3]).all()  # [2.6 s, 4.6 s]: the last word ended at 2.5 s


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_rows_are_named_by_file_and_line_before_the_model_runs(tiny_root, transcripts, tmp_path):
    path = write_csv(transcripts / "a.csv", ["hello,0.1,0.2", "bad,x,0.3", "day,0.5,0.4", "", "a,1,2,3", ",1,2",
                                             "well,-1,2"])
    (transcripts / "t2.csv").unlink()
    model = tmp_path / "model"
    model.mkdir()  # an empty folder: the transcripts fail first
    with pytest.raises(ExtractError) as err:
        text.extract_text(tiny_root, transcripts, model)
    message = str(err.value)
    for line, what in [(3, "non-numeric start 'x'"), (4, "end 0.4 before start 0.5"), (6, "expected 3 cells"),
                       (7, "empty word"), (8, "start must be a finite non-negative")]:
        assert f"{path}:{line}: {what}" in message
    assert ":2:" not in message and "for 1 annotated video(s): t2" in message


def test_bad_header_and_mixed_fps(tiny_root, transcripts, bert):
    write_csv(transcripts / "a.csv", ["hello,0,1"], header="token,begin,end")
    write_csv(transcripts / "b.csv", ["hello,0,1,25", "day,1,2,30"], header="word,start,end,fps")
    with pytest.raises(ExtractError) as err:
        text.extract_text(tiny_root, transcripts, bert)
    assert f"{transcripts / 'a.csv'}:1: header must be 'word,start,end'" in str(err.value)
    assert f"{transcripts / 'b.csv'}: the fps column must hold one value" in str(err.value)


def test_missing_model_folder(tiny_root, transcripts, tmp_path):
    with pytest.raises(ExtractError, match=r"nowhere: text model folder does not exist"):
        text.extract_text(tiny_root, transcripts, tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end(tiny_root, transcripts, bert):
    code = main(["text", "--data-root", str(tiny_root), "--transcripts", str(transcripts), "--model", str(bert),
                 "--name", "words", "--device", "cpu"])
    assert code == 0
    assert sorted(p.stem for p in (tiny_root / "features" / "words").glob("*.npy")) == VIDEOS
    assert all(load(tiny_root, "words", v).shape == (20, 8) for v in VIDEOS)
