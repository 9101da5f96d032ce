from __future__ import annotations

from reactor.cli.main import main

raise SystemExit(main())
