from __future__ import annotations

from reactor.cli import main

raise SystemExit(main())
