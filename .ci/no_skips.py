"""Fails (exit 1) when a test whose name contains one of the given words was skipped, or when none
ran: ``python .ci/no_skips.py RESULTS.xml WORD...`` on a pytest --junitxml report."""
import sys
import xml.etree.ElementTree as ET


def main(report: str, *words: str) -> int:
    cases = [c for c in ET.parse(report).iter("testcase") if any(w in c.get("name", "") for w in words)]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    for name in skipped:
        print(f"skipped, must run here: {name}")
    print(f"{len(cases) - len(skipped)} of {len(cases)} tests naming {', '.join(words)} ran")
    return 1 if skipped or not cases else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
