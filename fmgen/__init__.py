"""fmgen: flow matching and diffusion for images, from one CPU to many GPUs.

Time convention, everywhere: t = 0 is noise, t = 1 is data (see ``fmgen.paths``).
"""

__version__ = "0.1.0"
