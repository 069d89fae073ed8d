from vmshare.cli.main import main

raise SystemExit(main())
