"""``python -m lorakern <command>``; see ``lorakern.cli``."""

from lorakern.cli import main

raise SystemExit(main())
