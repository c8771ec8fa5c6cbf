"""`python -m chargen ...` is the `chargen` command."""

from chargen.cli import main

raise SystemExit(main())
