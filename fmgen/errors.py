"""One base class for the errors a user can fix; the command line prints their message alone."""


class FmgenError(Exception):
    """A bad input, config, data set or checkpoint; the message names the value and the fix."""
