from pxfs.cli.main import main

raise SystemExit(main())
