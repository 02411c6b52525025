"""Submission builder: pre-flight check of result.json and the zip sent to the organisers.

- `submission.check.check_result(result, test, max_reply_chars=1500) -> CheckReport`
- `submission.package.build_package(result_path, out_zip, description, code_root=REPO) -> Path`
- `submission.taskfile.load_task / fill_result`: read test.json keeping its raw form, write a
  result that differs from it only in the supporter turns.
- `submission.description.write_description(dict) -> str` (DESCRIPTION.md)

The command line is `pesc submission build|check` (pesc/cli/submission.py).
"""

from submission.check import CheckReport, Problem, check_result  # noqa: F401
from submission.package import PackageError, build_package, verify_package  # noqa: F401
