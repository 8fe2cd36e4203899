"""Benchmark of ``python -m abaw.extract`` on the CPU, in one run (about 2 minutes on 2 cores):

* visual: frames/s of ViT-B/16 at 224 through the real pipeline, and the share of the time spent
  decoding JPEGs (``bench_extract_visual.py``, which takes the options);
* audio: the real-time factor of decoding, log-mel, MFCC and a wav2vec2-base-sized model
  (``bench_extract_audio.py``).

    python benchmarks/bench_extract.py            # both
    python benchmarks/bench_extract.py visual     # one of them
"""
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {"visual": "bench_extract_visual.py", "audio": "bench_extract_audio.py"}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    for part in chosen:
        print(f"== {part}")
        sys.argv = [PARTS[part]]
        runpy.run_path(str(HERE / PARTS[part]), run_name="__main__")
