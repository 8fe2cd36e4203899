"""``run_cv.py --check``: validate a dataset root and print what it holds."""
from __future__ import annotations

from .console import console, table
from .data import FEATURE_LIMIT, DataError, Dataset, load_dataset


def check_dataset(root, **kwargs) -> Dataset | None:
    """Print the dataset summary, or every problem found. Returns the dataset, or None on problems."""
    try:
        dataset, problems = load_dataset(root, **kwargs)
    except DataError as exc:
        problems, dataset = exc.problems, None
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s) in {root}:[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return None
    print_summary(dataset)
    if kwargs.get("scan_values"):
        console.print(f"feature values: every file scanned, no ±inf and no |x| > {FEATURE_LIMIT:g}")
    return dataset


def print_summary(dataset: Dataset) -> None:
    console.print(table(dataset.summary(), title=f"Dataset {dataset.root}"))
    console.print(table([{"modality": m, "dim": d} for m, d in dataset.modalities.items()], title="Modalities"))
    print_subjects(dataset)
    if dataset.alignments:
        console.print(f"{len(dataset.alignments)} feature file(s) within the tolerance of their frame count, "
                      f"aligned to it:")
        for alignment in dataset.alignments:
            console.print(f"  {alignment}", markup=False)


def print_subjects(dataset: Dataset) -> None:
    """The subject count, the rule, and every subject made of more than one video."""
    groups = dataset.subject_videos(min_videos=2)
    console.print(f"subjects: {len(dataset.subjects)} ({dataset.subject_rule}); "
                  f"{len(groups)} made of more than one video")
    for subject, videos in groups.items():  # plain lines, not a table: long names stay whole and greppable
        splits = "/".join(sorted({dataset.videos[v].split for v in videos}))
        console.print(f"  {subject} ({splits}, {len(videos)} videos): {' '.join(videos)}", markup=False)
