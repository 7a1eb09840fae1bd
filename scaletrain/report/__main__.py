import sys

from scaletrain.report import main

sys.exit(main())
