"""Compare timm's test outcomes on its own ConViT with those on swapped ones.

    python tests/timm_suite/compare.py BASELINE.json SWAPPED.json [SWAPPED.json ...]

Each file is a report written by ``convit_swap_plugin`` (``CONVIT_SWAP_REPORT``). Fails (exit 1),
listing the tests, when a test that passed on timm's model does not pass on a swapped one, when a
swapped run swapped no model, or when the baseline passed nothing (a broken run proves nothing).
"""
import json
import sys


def _passed(report):
    return {k for k, v in report["outcomes"].items() if v == "passed"}


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        base = json.load(f)
    want = _passed(base)
    problems = []
    if not want:
        problems.append(f"{argv[0]}: no test passed on timm's own model")
    # Worded unlike a test runner's closing line: CI's own pytest summary is the run's verdict.
    print(f"timm's model as built: {len(want)} tests pass, "
          f"{sum(v == 'failed' for v in base['outcomes'].values())} fail")
    for path in argv[1:]:
        with open(path) as f:
            rep = json.load(f)
        got = _passed(rep)
        lost = sorted(want - got)
        print(f"swapped to {rep['backend']!r} ({rep['swapped_models']} models swapped): {len(got)} tests pass, "
              f"{len(lost)} of timm's passing tests lost")
        if rep["swapped_models"] == 0:
            problems.append(f"{path}: no model was swapped (backend {rep['backend']!r})")
        for test in lost:
            problems.append(f"backend {rep['backend']!r}: {test}: {rep['outcomes'].get(test, 'not run')}")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
