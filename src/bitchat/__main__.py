from bitchat.cli import main

raise SystemExit(main())
