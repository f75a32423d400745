from moxy.cli import main

raise SystemExit(main())
