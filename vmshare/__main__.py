from vmshare.cli import main

raise SystemExit(main())
