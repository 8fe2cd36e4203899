"""make_submission.py: merge run predictions into a submission, print the honest report, or check a file.

This module parses the command line and calls the library: :mod:`.merge` (the chain fitted on OOF),
:mod:`.writer` (the folder), :mod:`.validator` (the file against the sample), :mod:`.scoring` (the
demo's test labels) and :mod:`abaw.honest` (the report's rows).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..data import DataError, parse_sample_file
from ..ensemble import FOLD_MERGES, MERGERS
from ..honest import ReportRow, honest_report, report_csv, submitted_chain
from ..io import atomic_write_text
from ..post import parse_spec
from ..runs import Inputs, RunError, find_latest_demo_run, load_inputs
from .merge import merge_test_predictions
from .scoring import submission_score_row
from .validator import check_submission
from .writer import Submission, SubmissionExists, check_target, sample_values, write_submission

DEFAULT_MERGE = "auto"
DEFAULT_POST = "auto"


def print_report(rows: Sequence[ReportRow], title: str) -> None:
    from ..console import console, table

    shown = [{k: ("—" if v is None else v) for k, v in row.as_dict().items()
              if k in ("model", "ccc_v", "ccc_a", "mean", "frames", "scored_on")} for row in rows]
    console.print(table(shown, title=title))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_submission.py",
        description="Merge run predictions into an ABAW submission, report honest ensemble scores, "
                    "or check a submission file. With no arguments: the latest demo run, report and submission.")
    p.add_argument("--runs", nargs="+", help="run folders (default: the latest finished demo run under runs/)")
    p.add_argument("--merge", default=DEFAULT_MERGE, choices=list(MERGERS), metavar="NAME",
                   help="auto (default: per dimension, the best of the mean, the calibrated mean, the weighted "
                        "calibrated merge and each member alone, by CCC nested across folds on OOF) | "
                        "calibrated_mean | weighted_calibrated (learned across architectures on OOF, over fold "
                        "merges) | mean | median | ccc_centering (across folds, then the mean across architectures)")
    p.add_argument("--fold-merge", choices=list(FOLD_MERGES), metavar="NAME",
                   help="merge across folds: mean | median | ccc_centering (default: --merge, or mean when "
                        "--merge is learned)")
    p.add_argument("--post", default=DEFAULT_POST, metavar="auto|none|SPEC",
                   help="post-processing of the merged predictions: auto (default: per dimension, smoothing, "
                        "lag shift and calibration chosen on OOF), none, or a SPEC such as "
                        "'valence=gaussian:61,lag:8;arousal=mean:15' (see README)")
    p.add_argument("--out", help="submission folder (default submissions/<run>_<merge>_<UTC time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission folder")
    p.add_argument("--per-video", action="store_true", help="write the older format: one <video>.txt per video")
    p.add_argument("--test-sample", help="official test sample file (default: the run's, found at its data root)")
    p.add_argument("--report", action="store_true", help="print and save the honest ensemble report")
    p.add_argument("--report-csv", help="where --report saves its table (default <first run>/ensemble_report.csv)")
    p.add_argument("--check", metavar="FILE", help="validate a submission file against --sample and exit")
    p.add_argument("--sample", help="the sample file --check compares against")
    p.add_argument("--runs-dir", default="runs", help="where to look for the latest demo run (default runs/)")
    return p


def run_check(file: str, sample_path: str) -> int:
    from ..console import console

    if not Path(sample_path).is_file():
        console.print(f"[bold red]error:[/] sample file {sample_path} not found", markup=True)
        return 1
    sample, problems = parse_sample_file(Path(sample_path))
    if problems:
        console.print(f"[bold red]the sample file has {len(problems)} problem(s):[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return 1
    problems = check_submission(file, sample)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s) in {file}:[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return 1
    console.print(f"{file}: OK ({len(sample.image_locations)} rows match {sample_path})")
    return 0


def print_choices(manifest: dict) -> None:
    """What the merge and the post-processing chose on OOF, per dimension (the manifest has the numbers)."""
    from ..console import console

    chosen = manifest["merge"].get("learned", {}).get("chosen")
    if chosen:
        console.print(f"merge (chosen on OOF): valence {chosen['valence']}, arousal {chosen['arousal']}", markup=False)
    post = manifest.get("post", {})
    if "valence" in post:
        console.print(f"post-processing (chosen on OOF): valence {post['valence']['text']}; "
                      f"arousal {post['arousal']['text']}", markup=False)


def default_out(run_path: str | Path, merge: str) -> Path:
    """A fresh folder name per call, so the no-argument demo command never meets an existing one."""
    return Path("submissions") / f"{Path(run_path).name}_{merge}_{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def submit(inputs: Inputs, merge: str, fold_merge: str | None, out: Path, *, post: str = DEFAULT_POST,
           per_video: bool = False, overwrite: bool = False, report_rows: list[ReportRow] | None = None) -> Submission:
    """Merge the members' test predictions and write the submission folder (with its provenance).

    On the demo dataset, the written values' score joins ``report_rows``.
    """
    predictions, merge_description = merge_test_predictions(inputs.members, merge, inputs.labels, fold_merge, post)
    sample = inputs.dataset.sample
    if report_rows is not None and inputs.truth is not None and not per_video:
        values = sample_values(predictions, sample)[0]
        report_rows.append(submission_score_row(values, sample, inputs.truth, merge, post))
    manifest = {
        "runs": [{"path": str(run.path), "config_hash": run.config_hash, "fold_mode": run.fold_mode}
                 for run in inputs.runs],
        "members": [{"run": str(m.run.path), "arch": m.arch, "folds": m.folds, "config_hash": m.run.config_hash}
                    for m in inputs.members],
        "merge": {"name": merge, **{k: v for k, v in merge_description.items() if k != "post"}},
        "post": merge_description["post"],
        "data_root": str(inputs.dataset.root),
    }
    n_frames = {v.name: v.n_frames for v in inputs.dataset.split("test")}
    return write_submission(predictions, sample, out, manifest, per_video=per_video, n_frames=n_frames,
                            overwrite=overwrite, report_rows=report_rows)


def _make(args: argparse.Namespace, report: bool, write: bool, written: list[Path]) -> int:
    """Report and/or write the submission; each finished output joins ``written`` (for an interruption's message)."""
    from ..console import console

    if args.post not in ("auto", "none"):
        parse_spec(args.post)  # a bad SPEC is an error now, not after minutes of reading and merging
    run_paths = args.runs or [str(find_latest_demo_run(args.runs_dir).path)]
    out = Path(args.out) if args.out else default_out(run_paths[0], args.merge)
    if write:
        check_target(out, args.overwrite)  # before minutes of reading and merging, not after
    inputs = load_inputs(run_paths, args.test_sample)
    rows = None
    if report:
        submitted = submitted_chain(args.merge, args.post, args.fold_merge, len(inputs.members)) if write else None
        rows = honest_report(inputs.members, inputs.labels, inputs.truth, submitted=submitted)
    submission = None
    if write:
        submission = submit(inputs, args.merge, args.fold_merge, out, post=args.post, per_video=args.per_video,
                            overwrite=args.overwrite, report_rows=rows)
        written.append(submission.folder)
    if rows is not None:
        print_report(rows, title=f"Honest ensemble report: {', '.join(run_paths)}")
        if submission:
            console.print(f"report: {submission.folder / 'report.csv'}")
        if args.report_csv or not submission:
            csv_path = Path(args.report_csv or Path(run_paths[0]) / "ensemble_report.csv")
            atomic_write_text(csv_path, report_csv(rows))
            written.append(csv_path)
            console.print(f"report: {csv_path}")
    if submission:
        print_choices(submission.manifest)
        console.print(f"submission: {submission.file}")
        console.print(f"zip: {submission.zip}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from rich.markup import escape

    from ..console import console, interrupted, sigterm_raises
    from ..io import explain_os_error

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.check:
        if not args.sample:
            parser().error("--check needs --sample SAMPLE (the official test sample file)")
        return run_check(args.check, args.sample)
    written: list[Path] = []
    try:
        with sigterm_raises():
            # No arguments: the demo walk-through, report and submission. --report alone: the report only.
            return _make(args, report=args.report or not argv, write=args.out is not None or not args.report,
                         written=written)
    except (RunError, DataError, SubmissionExists, ValueError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except OSError as exc:  # a full disk, a folder we may not write: the submission folder appears whole or not at all
        console.print(f"[bold red]error:[/] {escape(explain_os_error(exc))}")
        return 1
    except KeyboardInterrupt as exc:  # the staging folder is gone: no partial submission anywhere
        if written:  # rerunning would meet the finished submission folder: say what is there instead
            return interrupted(exc, f"{', '.join(map(str, written))} finished and kept whole; nothing else written")
        return interrupted(exc, "nothing was written; rerun the same command for the complete output")
