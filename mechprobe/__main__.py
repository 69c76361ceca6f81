"""``python -m mechprobe`` runs the command line."""

from mechprobe.cli import main

raise SystemExit(main())
