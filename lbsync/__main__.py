from lbsync.cli import main

raise SystemExit(main())
