import sys

from protohead.cli.main import main

sys.exit(main())
