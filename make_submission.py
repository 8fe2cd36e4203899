#!/usr/bin/env python
"""Merge cross-validation runs into an ABAW submission, report honest ensemble scores, check a file.

    python make_submission.py                                   # latest demo run: report + submission
    python make_submission.py --runs runs/A runs/B --merge ccc_centering --out submissions/NAME
    python make_submission.py --report --runs runs/A            # the honest ensemble report only
    python make_submission.py --check FILE --sample SAMPLE      # validate a submission file

See README.md, "Submissions and ensembles".
"""
import sys

from abaw.submission import main

if __name__ == "__main__":
    sys.exit(main())
