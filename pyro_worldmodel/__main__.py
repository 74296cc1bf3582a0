"""``python -m pyro_worldmodel``: the ``pyro-worldmodel`` command, e.g. under ``torchrun``::

torchrun --nproc-per-node 2 -m pyro_worldmodel train --env Pendulum-v1
"""

import sys

from .cli import main

sys.exit(main())
