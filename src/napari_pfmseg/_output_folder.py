"""The output folder as a dock shows it: where results go, a way to change it once, and "Open folder".

The folder itself is the session's decision (:meth:`~._session.Session.output_root`: the user's choice,
remembered, else beside the slide when writable, else the session cache); this row only shows it for
the dock's current slide and lets the user change it, which every dock of the viewer then shows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QWidget

from ._qt_helpers import button, open_folder


class OutputFolderRow(QWidget):
    """``output folder: <path>  [Change…] [Open folder]`` for ``image()``'s slide (None: no slide yet)."""

    def __init__(self, session: Any, image: Callable[[], Any]):
        super().__init__()
        self.session = session
        self.image = image
        self.path = QLabel("")
        self.path.setTextInteractionFlags(self.path.textInteractionFlags())
        self.path.setWordWrap(True)
        self.path.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.change_button = button("Change…", self.change, "choose the folder where every result goes "
                                    "(remembered for next time)")
        self.open_button = button("Open folder", self.open, "show the output folder in the file manager")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("output folder:"))
        layout.addWidget(self.path, 1)
        layout.addWidget(self.change_button)
        layout.addWidget(self.open_button)
        session.output_changed.connect(self.refresh)
        self.destroyed.connect(lambda *_: session.output_changed.disconnect(self.refresh))
        self.refresh()

    def folder(self) -> Path:
        return Path(self.session.output_root(self.image()))

    def refresh(self, *_: Any) -> None:
        folder = self.folder()
        self.path.setText(str(folder))
        self.path.setToolTip(str(folder))

    def change(self) -> None:
        folder = open_folder(self, "Output folder for predictions, training runs and comparisons")
        if folder:
            self.session.choose_output_folder(folder)

    def open(self) -> bool:
        """Open the folder in the system's file manager (created first, so there is something to open)."""
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        return bool(QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))))
