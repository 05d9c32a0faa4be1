"""``python -m ragpod``: the same as the ``ragpod`` command."""

from ragpod.cli import main

raise SystemExit(main())
