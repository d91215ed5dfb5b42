"""``python -m polprec``: the ``polprec`` command line."""

from polprec.cli import main

raise SystemExit(main())
