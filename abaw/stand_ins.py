"""Stand-in backbones for the raw demo: tiny models built from configs, random weights, saved locally.

The raw demo (``make demo-raw``) and the tests run the real loading code of ``abaw.extract`` end to
end, but nothing may be downloaded, so the real backbones (MAE ViTs, wav2vec 2.0, RoBERTa) are
replaced by tiny models of the same kinds with seeded random weights. Their features carry what a
random projection of the input carries: enough to show the pipeline works, not a benchmark of
features. On the real release, pass real weights (README "From the release to features").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VISUAL_BACKBONE = "test_vit"  # timm's tiny ViT (64-d, class token): the pipeline of vit_*_patch16_224.mae


@dataclass(frozen=True)
class StandIns:
    visual_weights: Path  # a timm checkpoint of VISUAL_BACKBONE
    speech: Path          # a transformers wav2vec 2.0 folder (model + feature extractor)
    text: Path            # a transformers BERT folder (model + tokenizer)


def write_vit(path: Path, seed: int = 0) -> Path:
    import timm
    import torch

    torch.manual_seed(seed)
    torch.save(timm.create_model(VISUAL_BACKBONE, pretrained=False, num_classes=0).state_dict(), path)
    return path


def write_wav2vec(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8,) * 7, feat_extract_norm="layer", num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2)  # the real kernels and strides: 20 ms frames
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


def write_bert(folder: Path, words: list[str], seed: int = 0, hidden: int = 16, max_positions: int = 128) -> Path:
    """A BERT whose WordPiece vocabulary is ``words`` plus the special tokens (whole words only)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(folder)
    return folder


def ensure_stand_ins(folder: str | Path, words: list[str]) -> StandIns:
    """Write the stand-in models into ``folder`` once (each one complete or absent: a marker file last)."""
    folder = Path(folder)
    models = StandIns(folder / "vit.pth", folder / "speech", folder / "text")
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_vit(models.visual_weights)
        write_wav2vec(models.speech)
        write_bert(models.text, words)
        (folder / ".complete").write_text("stand-in models for the raw demo\n")
    return models
