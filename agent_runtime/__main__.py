import sys

from agent_runtime.cli.main import main

sys.exit(main())
