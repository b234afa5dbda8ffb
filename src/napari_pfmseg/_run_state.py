"""What a dock shows of its current run: the slide it runs on, a status line and a progress bar.

Every long job (training, prediction, comparison) shows its state through one :class:`RunState`, so
the rules hold in every dock: starting a run resets all three (nothing of the previous run stays on
screen while the new one streams), and a failure, before or during the run, leaves a visible error
state (red status, "failed" bar) until the next run starts.
"""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

IDLE = "Idle."
ERROR_STYLE = "color: #e05555;"


def sentence(text: str) -> str:
    """``"predicting"`` -> ``"Predicting…"``; ``"done"`` -> ``"Done."`` (status lines as a user reads them)."""
    text = text.strip()
    if not text:
        return text
    text = text[:1].upper() + text[1:]
    if text.endswith(("…", ".", "!", "?", ")")):
        return text
    return text + ("…" if text.endswith("ing") else ".")


class RunState(QWidget):
    """Subject, status and progress of one dock's current run (see the module docstring)."""

    def __init__(self, progress_format: str = "%v / %m"):
        super().__init__()
        self.state = "idle"  # idle, running, completed, cancelled, failed
        self.progress_format = progress_format
        self.subject = QLabel("")
        self.subject.setWordWrap(True)
        self.subject.setVisible(False)
        self.progress = QProgressBar()
        self.progress.setFormat(progress_format)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel(IDLE)
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.subject)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

    # --- transitions ---------------------------------------------------------------------------------
    def begin(self, subject: str, text: str = "starting") -> None:
        """A run starts on ``subject`` (e.g. the slide's name): everything of the previous run is cleared."""
        self.state = "running"
        self.subject.setText(subject)
        self.subject.setVisible(bool(subject))
        self.progress.setFormat(self.progress_format)
        self.progress.setRange(0, 0)  # busy until the first progress report
        self.progress.setValue(0)
        self._say(text)

    def advance(self, done: int, total: int, progress_format: str | None = None) -> None:
        if progress_format is not None:
            self.progress.setFormat(progress_format)
        self.progress.setRange(0, max(1, int(total)))
        self.progress.setValue(max(0, min(int(done), max(1, int(total)))))

    def say(self, text: str) -> None:
        """A status line during the run (ignored once the run has ended, so late events cannot mask the end)."""
        if self.state == "running":
            self._say(text)

    def finish(self, status: str, text: str) -> None:
        """The run ended with ``status`` (completed, cancelled or failed) and ``text`` to show."""
        if status == "failed":
            self.fail(text)
            return
        self.state = status
        if self.progress.maximum() == 0:  # never reported progress: show an ended bar, not a busy one
            self.progress.setRange(0, 1)
            self.progress.setValue(1 if status == "completed" else 0)
        elif status == "completed":
            self.progress.setValue(self.progress.maximum())
        self._say(text)

    def fail(self, text: str) -> None:
        """An error, before or during the run: it stays visible until the next run begins."""
        self.state = "failed"
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.progress.setFormat("failed")
        self.status.setText(sentence(text) if text else "Failed.")
        self.status.setStyleSheet(ERROR_STYLE)

    def _say(self, text: str) -> None:
        self.status.setStyleSheet("")
        self.status.setText(sentence(text))

    @property
    def failed(self) -> bool:
        return self.state == "failed"
