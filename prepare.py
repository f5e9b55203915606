"""Turn text corpora into the token files train.py reads.

(Work in progress: the tokenizers and the corpus pipeline land next.)
"""
import os
import sys


class UserError(Exception):
    """Something the user can fix (a bad path, flag or file): shown as one line, no traceback."""


def run_main(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 1.

    GPT_DEBUG=1 shows the full traceback instead. Ctrl-C exits with 130 and no traceback.
    """
    try:
        main()
    except UserError as e:
        if os.environ.get("GPT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("GPT_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
