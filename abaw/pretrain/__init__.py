"""Pretraining a visual encoder for ``abaw.extract visual``: MAE on face images (:mod:`.mae`), then
expression fine-tuning on Aff-Wild2 (:mod:`.expr`); ``python -m abaw.pretrain {mae,expr}``."""
