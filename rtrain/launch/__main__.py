"""`python -m rtrain.launch RECIPE [key=value ...]` (the same command as `rtrain launch`).

Stop signals are handled from the first instruction (rtrain.launch.early), before the imports that take seconds.
"""

import sys

from rtrain.launch.early import install_early_handlers

install_early_handlers()

from rtrain.launch.entry import main  # noqa: E402  (after the handlers: importing takes seconds)

sys.exit(main())
