from uharmony.cli import main

raise SystemExit(main())
