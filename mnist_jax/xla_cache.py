"""XLA's persistent compilation cache, kept in mnist-jax's cache folder.

A later process that compiles the same program (same model, shapes, flags, jax version and
backend) reads the executable from disk instead of compiling it again: a program
that takes seconds to compile is read back in a fraction of that time. The command
line turns it on for its own process; a script may call :func:`enable_compilation_cache`
itself. ``MNIST_JAX_XLA_CACHE=0`` turns it off; a cache folder the user already gave JAX
(``JAX_COMPILATION_CACHE_DIR``) is kept, and so is a threshold the user gave JAX
(``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``; ours is 0.2 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from mnist_jax.data import default_cache_dir

__all__ = ["XLA_CACHE_ENV", "enable_compilation_cache"]

XLA_CACHE_ENV = "MNIST_JAX_XLA_CACHE"
_OFF = ("0", "false", "no", "off")
# Smaller programs compile faster than they would be read back from disk.
_MIN_COMPILE_SECONDS = 0.2


def enable_compilation_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``<cache_dir>/xla`` (default: the data
    cache folder, ``$MNIST_JAX_CACHE_DIR`` or ``~/.cache/mnist_jax``) and return it.

    Call before the first compilation. Returns the folder in use: the user's own
    ``JAX_COMPILATION_CACHE_DIR`` when set, None when ``$MNIST_JAX_XLA_CACHE`` is 0.
    """
    if os.environ.get(XLA_CACHE_ENV, "1").strip().lower() in _OFF:
        return None
    given = jax.config.jax_compilation_cache_dir
    if given:
        return Path(given)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path.expanduser() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    return path
