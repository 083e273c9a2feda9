import sys

from megatron_mgt.experiments.cli import main

sys.exit(main())
