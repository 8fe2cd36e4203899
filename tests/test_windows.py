"""Windows cover every frame; whole-video prediction averages overlapping window outputs."""
import numpy as np
import pytest
import torch

from abaw.data import open_dataset
from abaw.windows import WindowDataset, predict_video, predict_videos, window_starts


@pytest.mark.parametrize("n", [1, 50, 300, 301, 499, 500, 501, 1234])
def test_windows_cover_every_frame_and_end_at_the_video_end(n):
    starts = window_starts(n, 300, 200)
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s:s + 300] = True
    assert covered.all()
    assert starts[-1] + 300 == n or (n <= 300 and starts == [0])
    assert starts == sorted(set(starts))


def test_short_video_is_one_padded_masked_window(tiny_root):
    video = open_dataset(tiny_root).videos["a"]  # 20 frames
    item = WindowDataset([video], ["visual", "audio"], window=32, hop=16)[0]
    assert len(WindowDataset([video], ["visual"], window=32, hop=16)) == 1
    assert item["visual"].shape == (32, 8) and item["audio"].shape == (32, 3)
    assert item["mask"].sum() == 20 and not item["mask"][20:].any()
    assert not item["label_mask"][3] and not item["label_mask"][20:].any()
    assert torch.all(item["visual"][20:] == 0)


class FrameEcho(torch.nn.Module):
    """Outputs its first visual feature, plus the window position, to expose how windows are merged."""
    modalities = ("visual",)

    def forward(self, feats, mask):
        x = feats["visual"][..., :1]
        pos = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None].expand_as(x)
        return torch.cat([x, pos], dim=-1)


def test_predict_video_averages_overlapping_windows(tiny_root):
    video = open_dataset(tiny_root).videos["c"]
    feats, _ = video.features("visual")
    pred = predict_video(FrameEcho(), video, window=8, hop=5)
    np.testing.assert_allclose(pred[:, 0], feats[:, 0], rtol=1e-6)  # identical per frame in every window
    # window starts 0, 5, 10, 12: frame 6 is position 6 of window 0 and position 1 of window 5
    assert pred[6, 1] == pytest.approx((6 + 1) / 2)
    assert pred[19, 1] == pytest.approx(7)
    full = predict_video(FrameEcho(), video, full_sequence=True)
    np.testing.assert_allclose(full[:, 1], np.arange(20))


def test_the_presence_channel_marks_frames_with_a_face(tiny_root):
    array = np.ones((20, 8), np.float32)
    array[4:7] = np.nan  # no face in frames 5-7
    np.save(tiny_root / "features" / "visual" / "a.npy", array)
    video = open_dataset(tiny_root).videos["a"]
    item = WindowDataset([video], ["visual", "audio"], window=32, hop=16, presence=True)[0]
    assert item["visual"].shape == (32, 9) and item["audio"].shape == (32, 4)
    presence = item["visual"][:, -1]
    assert presence[:20].tolist() == [1.0] * 4 + [0.0] * 3 + [1.0] * 13
    assert not presence[20:].any()  # padding has no face either
    assert torch.all(item["visual"][4:7, :-1] == 0) and torch.all(item["audio"][:20, -1] == 1)


class PresenceEcho(torch.nn.Module):
    """Outputs the last input channel: with ``presence_channel`` set, the presence flag."""
    modalities = ("visual",)
    presence_channel = True

    def forward(self, feats, mask):
        return feats["visual"][..., -1:].expand(-1, -1, 2)


def test_predict_video_gives_a_presence_model_its_channel(tiny_root):
    array = np.ones((20, 8), np.float32)
    array[10:] = np.nan
    np.save(tiny_root / "features" / "visual" / "c.npy", array)
    video = open_dataset(tiny_root).videos["c"]
    pred = predict_video(PresenceEcho(), video, window=8, hop=5)
    assert pred[:10, 0].tolist() == [1.0] * 10 and pred[10:, 0].tolist() == [0.0] * 10


@pytest.mark.parametrize("batch_size", [3, 64])
def test_predict_videos_batches_windows_across_videos_with_the_same_result(tiny_root, batch_size):
    """Validation pools the windows of all videos into shared batches; every video's prediction is
    what predicting it alone gives (a real model: the demo-size Mamba-VA, masks and padding included)."""
    from abaw.models import create_model

    videos = sorted(open_dataset(tiny_root).videos.values(), key=lambda v: v.name)
    torch.manual_seed(0)
    model = create_model("mamba_va", size="demo", input_dims={"visual": 8})
    together = predict_videos(model, videos, window=8, hop=5, batch_size=batch_size)
    assert set(together) == {v.name for v in videos}
    for video in videos:
        alone = predict_video(model, video, window=8, hop=5)
        assert together[video.name].shape == (video.n_frames, 2)
        np.testing.assert_allclose(together[video.name], alone, rtol=1e-5, atol=1e-6)
    long_window = predict_videos(model, videos, window=32, hop=16, batch_size=batch_size)  # every video padded
    for video in videos:
        np.testing.assert_allclose(long_window[video.name], predict_video(model, video, window=32, hop=16),
                                   rtol=1e-5, atol=1e-6)
