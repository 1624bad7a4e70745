from qctrain.cli import main

raise SystemExit(main())
