"""Specification of mnist_jax.progress: a bar on a terminal, one line per epoch in a log."""

from __future__ import annotations

import io

import pytest

from mnist_jax.progress import EpochProgress


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_epochs(progress: EpochProgress, epochs: range) -> None:
    progress.set_compiling()
    for epoch in epochs:
        progress.update(epoch, f"loss {1 / epoch:.4f}, acc 0.9{epoch:03d}", 0.5 + epoch / 100)
    progress.close()


def test_a_log_gets_one_plain_line_per_epoch():
    log = io.StringIO()  # not a terminal: a file, CI, nohup
    run_epochs(EpochProgress(3, file=log), range(1, 4))
    assert log.getvalue().splitlines() == [
        "Epoch 1/3 - 0.51s - loss 1.0000, acc 0.9001",
        "Epoch 2/3 - 0.52s - loss 0.5000, acc 0.9002",
        "Epoch 3/3 - 0.53s - loss 0.3333, acc 0.9003",
    ]
    assert "\r" not in log.getvalue()


def test_keras_verbose_2_line_format():
    log = io.StringIO()
    with EpochProgress(100, file=log) as progress:
        progress.update(3, "loss 0.1234, acc 0.9650, test_acc 0.9700", 0.5812)
    assert log.getvalue() == "Epoch 3/100 - 0.58s - loss 0.1234, acc 0.9650, test_acc 0.9700\n"


def test_a_resumed_run_numbers_its_epochs_from_where_it_stopped():
    log = io.StringIO()
    run_epochs(EpochProgress(5, initial=3, file=log), range(4, 6))
    assert [line.split(" - ")[0] for line in log.getvalue().splitlines()] == ["Epoch 4/5", "Epoch 5/5"]


@pytest.mark.parametrize("make", [io.StringIO, FakeTerminal])
def test_disabled_prints_nothing(make):
    stream = make()
    run_epochs(EpochProgress(3, disable=True, file=stream), range(1, 4))
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_with_the_text_as_postfix():
    term = FakeTerminal()
    progress = EpochProgress(4, file=term)
    progress.set_compiling()
    assert "compiling" in term.getvalue()
    progress.update(1, "loss 0.5000, acc 0.8000", 1.0)
    progress.update(2, "loss 0.2500, acc 0.9000", 1.0)
    progress.close()
    out = term.getvalue()
    assert "\r" in out  # redrawn in place, not one line per epoch
    assert "Epoch " not in out
    final = out.split("\r")[-1]
    assert final.startswith("training:") and "2/4" in final
    assert "loss 0.2500, acc 0.9000" in final


def test_a_bar_resumed_at_initial_counts_on_from_there():
    term = FakeTerminal()
    progress = EpochProgress(10, initial=7, file=term)
    progress.update(8, "loss 0.1000", 1.0)
    progress.close()
    assert "8/10" in term.getvalue().split("\r")[-1]


def test_close_twice_is_harmless():
    term = FakeTerminal()
    progress = EpochProgress(2, file=term)
    progress.close()
    progress.close()
    assert term.getvalue().count("training") >= 1


def test_a_stream_without_isatty_counts_as_a_log():
    class NoIsatty:
        def __init__(self):
            self.parts = []

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    stream = NoIsatty()
    EpochProgress(2, file=stream).update(1, "loss 1.0000", 0.25)
    assert "".join(stream.parts) == "Epoch 1/2 - 0.25s - loss 1.0000\n"
