"""Progress bars that `speckv --quiet` hides.

A bar is INFO-level output: it shows when its caller asks for it, unless the `speckv` logger is set
above INFO (what `--quiet` does). A script that never configures logging leaves that logger unset
and keeps its bars, as before there was a logger.
"""

from __future__ import annotations

import logging

from tqdm import tqdm


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """tqdm over `iterable` (or updated by hand with `total=`), on stderr, hidden unless shown."""
    level = logging.getLogger("speckv").level
    hidden = not show or level > logging.INFO
    return tqdm(iterable, disable=hidden, **kwargs)
