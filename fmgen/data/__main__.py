"""``python -m fmgen.data prepare|index ...`` (no command: ``prepare``, as before ``index``)."""

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["index"]:
        from fmgen.cli.index import main as index_main

        return index_main(argv[1:])
    from fmgen.cli.prepare import main as prepare_main

    return prepare_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
