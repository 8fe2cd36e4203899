"""Extraction: the Aff-Wild2 release -> ``ROOT/features/<name>/<video>.npy``, the layout the reader uses.

    python -m abaw.extract visual --data-root ROOT --backbone TIMM_NAME --weights FILE
    python -m abaw.extract audio  --data-root ROOT --videos DIR (--mel | --mfcc | --model DIR)
    python -m abaw.extract text   --data-root ROOT --transcripts DIR --model DIR
    python -m abaw.extract import --data-root ROOT --csv DIR --frame-column COL

Every command writes one row per annotation frame (the count comes from the annotation file, or
from the sample file for a test video), a NaN row where a frame has no input, for every train,
validation and test video; it skips finished videos and writes each file atomically
(:mod:`abaw.extract.frames`).
"""
