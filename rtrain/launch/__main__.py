"""`python -m rtrain.launch RECIPE [key=value ...]`."""

import sys

from rtrain.launch.entry import main

sys.exit(main())
