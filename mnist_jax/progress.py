"""Per-epoch progress: a tqdm bar on a terminal, one plain line per epoch anywhere else.

A bar's redraws are ``\\r`` fragments, which pile up by the hundred in a log file, a CI
console or ``nohup.out``; there, like Keras' ``verbose=2``, each epoch is one line:
``Epoch 3/100 - 0.58s - loss 0.1234, acc 0.9650, test_acc 0.9700``.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm


def _is_terminal(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class EpochProgress:
    """Progress of ``total`` epochs, ``initial`` of them done already (a resumed run).

    On a terminal (``file.isatty()``) it is a tqdm bar described "training" whose postfix is
    the latest epoch's text; otherwise ``update`` prints one line per epoch. ``disable``
    prints nothing at all. ``file`` defaults to ``sys.stderr``. Usable as a context manager.
    """

    def __init__(self, total: int, initial: int = 0, disable: bool = False, file: IO[str] | None = None):
        self.total = total
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self._bar = None
        if not disable and _is_terminal(self.file):
            self._bar = tqdm(total=total, initial=initial, desc="training", unit="epoch",
                             file=self.file, dynamic_ncols=True, leave=True)

    def set_compiling(self) -> None:
        """Say that the first epoch is being compiled (on the bar only: a log needs no note)."""
        if self._bar is not None:
            self._bar.set_postfix_str("compiling…")

    def update(self, epoch: int, text: str, seconds: float) -> None:
        """Epoch ``epoch`` (1-based, of ``total``) finished in ``seconds``; ``text`` is its
        metrics, e.g. ``"loss 0.1234, acc 0.9650"``."""
        if self.disable:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(epoch - self._bar.n)  # absolute: robust to skipped or resumed epochs
            return
        print(f"Epoch {epoch}/{self.total} - {seconds:.2f}s - {text}", file=self.file, flush=True)

    def close(self) -> None:
        """Finish the bar (a no-op for plain lines); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
