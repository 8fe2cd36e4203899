"""``run_cv.py --check``: validate a dataset root and print what it holds."""
from __future__ import annotations

from .console import console, table
from .data import DataError, Dataset, load_dataset


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
    return dataset


def print_summary(dataset: Dataset) -> None:
    console.print(table(dataset.summary(), title=f"Dataset {dataset.root}"))
    console.print(table([{"modality": m, "dim": d} for m, d in dataset.modalities.items()], title="Modalities"))
    console.print(f"subjects: {len(dataset.subjects)}")
    if dataset.length_mismatches:
        console.print(f"{len(dataset.length_mismatches)} video(s) whose feature files were aligned to the "
                      f"frame count (trimmed, or last row carried): {', '.join(dataset.length_mismatches)}")
