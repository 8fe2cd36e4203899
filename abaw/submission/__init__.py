"""ABAW submissions: merge a run's test predictions, write them in the official format, check them.

One job per module: :mod:`.merge` (the chain of merges and post-processing fitted on OOF),
:mod:`.writer` (the folder, atomically), :mod:`.validator` (a file against the sample),
:mod:`.scoring` (against the demo's test labels) and :mod:`.cli` (``make_submission.py``).
"""
from .cli import main, parser, submit
from .merge import merge_test_predictions, resolve_merges
from .scoring import read_submission, submission_score_row
from .validator import check_submission
from .writer import (HEADER_LINE, PER_VIDEO_DIR, SUBMISSION_FILE, Submission, SubmissionExists, _publish,
                     carry_nearest, check_target, sample_values, write_submission)

__all__ = ["main", "parser", "submit", "merge_test_predictions", "resolve_merges", "read_submission",
           "submission_score_row", "check_submission", "HEADER_LINE", "PER_VIDEO_DIR", "SUBMISSION_FILE",
           "Submission", "SubmissionExists", "carry_nearest", "check_target", "sample_values", "write_submission"]
