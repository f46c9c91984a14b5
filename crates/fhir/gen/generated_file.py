"""Writing a generated Rust file, or checking that the committed one is up to date."""

import sys


def write_or_check(path, source, check):
    """With `check`, exit 1 when `path` differs from `source`; otherwise write it."""
    if check:
        with open(path) as f:
            if f.read() != source:
                sys.exit("%s is stale; rerun the generator" % path)
        return
    with open(path, "w") as f:
        f.write(source)
    print("wrote %s" % path, file=sys.stderr)
