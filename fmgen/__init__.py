"""fmgen: flow matching and diffusion for images, from one CPU to many GPUs.

Time convention, everywhere: t = 0 is noise, t = 1 is data (see ``fmgen.core.paths``).

The library API of the math is re-exported here (``from fmgen import get_path, Oracle, ...``).
Layers, each importing only those below it (checked by import-linter in CI):
``core`` < ``base``, ``config`` < ``models`` < ``data`` < ``eval`` < ``pipeline`` < ``train``
< ``cli``.
"""

from fmgen import core
from fmgen.core import *  # noqa: F403  (the library API of the math)

__version__ = "0.1.0"

__all__ = list(core.__all__)
