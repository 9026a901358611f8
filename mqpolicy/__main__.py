from mqpolicy.cli import main

raise SystemExit(main())
