from ltstudy.cli import main

raise SystemExit(main())
