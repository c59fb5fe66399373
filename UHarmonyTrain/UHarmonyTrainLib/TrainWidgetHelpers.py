"""Filling the Train module's widgets from the Qt-free logic's results.

Like UHarmonySegmentLib.WidgetHelpers, the Qt classes come in through a namespace argument (`qt`):
PythonQt's ``qt`` module inside Slicer, PySide6's classes in the plain-Qt UI tests, which therefore
run this very code. Nothing here imports Qt or Slicer.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from UHarmonySegmentLib.WidgetHelpers import _get

from .Metrics import Chart, ComparisonRow, RoundRow

ADAPT_CONTROLS = ("sceneCasesRadioButton", "datalistRadioButton", "caseVolumeSelector", "caseSegmentationSelector",
                  "addCaseButton", "findCasesButton", "removeCaseButton", "datalistPathLineEdit", "baseModelSelector",
                  "newModalityCheckBox", "domainNameLineEdit", "existingDomainSelector", "newClassesCheckBox",
                  "addKeepButton", "removeKeepButton", "stepsSpinBox", "evaluateEverySpinBox", "adaptDeviceSelector",
                  "modelNameLineEdit")
JOIN_CONTROLS = ("serverLineEdit", "caPathLineEdit", "keyPathLineEdit", "siteNameLineEdit", "createKeyButton",
                 "fedSceneCasesRadioButton", "fedDatalistRadioButton", "fedDatalistPathLineEdit", "fedDomainLineEdit")


def _color(qt, rgb):
    return qt.QColor(int(rgb[0]), int(rgb[1]), int(rgb[2]))


def draw_chart(qt, label, chart: Chart, empty_text: str = "The loss and Dice curves appear here while adapting") -> None:
    """Paint `chart` (from Metrics.chart_geometry) into a pixmap shown by `label` (a QLabel)."""
    pixmap = qt.QPixmap(chart.width, chart.height)
    pixmap.fill(qt.QColor(255, 255, 255))
    painter = qt.QPainter(pixmap)
    try:
        painter.setRenderHint(qt.QPainter.Antialiasing, True)
        left, top, right, bottom = (int(v) for v in chart.plot)
        grey = qt.QColor(150, 150, 150)
        painter.setPen(qt.QPen(qt.QColor(225, 225, 225), 1))
        for fraction in (0.25, 0.5, 0.75):
            y = int(bottom - fraction * (bottom - top))
            painter.drawLine(left, y, right, y)
        painter.setPen(qt.QPen(grey, 1))
        painter.drawLine(left, bottom, right, bottom)
        painter.drawLine(left, top, left, bottom)
        painter.drawLine(right, top, right, bottom)
        painter.drawText(2, top + 8, "1.0")
        painter.drawText(2, bottom, "0")
        painter.drawText(left, chart.height - 6, "0")
        painter.drawText(right - 40, chart.height - 6, f"{chart.x_range[1]:g} {chart.x_label}")
        if chart.loss_max is not None:
            painter.drawText(right + 3, top + 8, f"{chart.loss_max:g}")
            painter.drawText(right + 3, bottom, "0")
        for line in chart.lines:
            painter.setPen(qt.QPen(_color(qt, line.color), 2))
            points = [(round(x), round(y)) for x, y in line.points]
            for (x0, y0), (x1, y1) in pairwise(points):
                painter.drawLine(x0, y0, x1, y1)
            for x, y in points:
                painter.drawEllipse(x - 2, y - 2, 4, 4)
        if chart.empty:
            painter.setPen(qt.QPen(grey, 1))
            painter.drawText(left + 8, int((top + bottom) / 2), empty_text)
        else:  # legend
            x = left + 6
            for name, rgb in chart.legend():
                painter.setPen(qt.QPen(_color(qt, rgb), 3))
                painter.drawLine(x, top + 6, x + 14, top + 6)
                painter.setPen(qt.QPen(qt.QColor(60, 60, 60), 1))
                painter.drawText(x + 18, top + 10, name)
                x += 26 + 7 * len(name)
    finally:
        painter.end()
    label.setPixmap(pixmap)


def _fill_table(qt, table, rows: Sequence[Sequence[str]], numeric_from: int) -> None:
    table.setRowCount(len(rows))
    for r, texts in enumerate(rows):
        for c, text in enumerate(texts):
            item = qt.QTableWidgetItem(str(text))
            if c >= numeric_from:
                item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            table.setItem(r, c, item)
    table.resizeColumnsToContents()
    table.horizontalHeader().setStretchLastSection(True)


def fill_comparison(qt, table, rows: Sequence[ComparisonRow]) -> None:
    _fill_table(qt, table, [row.texts() for row in rows], numeric_from=2)


def fill_rounds(qt, table, rows: Sequence[RoundRow]) -> None:
    _fill_table(qt, table, [row.texts() for row in rows], numeric_from=1)


def fill_cases(qt, table, cases) -> None:
    from .Cases import segment_names

    rows = []
    for case in cases:
        names = segment_names(case.segmentation) if case.segmentation is not None else []
        rows.append((case.volume.GetName() if case.volume else "-", case.segmentation.GetName() if case.segmentation else "-",
                     ", ".join(names) or "(no segments)"))
    _fill_table(qt, table, rows, numeric_from=99)


def set_adapt_running(ui, running: bool) -> None:
    ui.adaptButton.setText("Cancel" if running else "Adapt")
    ui.adaptButton.setToolTip("Stop the adaptation; nothing is saved and its temporary files are deleted" if running
                              else "Adapt the base model to the cases and save it in your model folder")
    for name in ADAPT_CONTROLS:
        getattr(ui, name).setEnabled(not running)


def set_join_running(ui, running: bool) -> None:
    ui.joinButton.setText("Leave" if running else "Join")
    for name in JOIN_CONTROLS:
        getattr(ui, name).setEnabled(not running)


def show_availability(ui, available: bool, reason: str) -> None:
    """The notice on the Federated tab; Join and Create are only enabled when the library can join."""
    ui.federatedNoticeLabel.setText("Ready: this library can join a federation." if available else reason)
    ui.joinButton.setEnabled(available)
    ui.createKeyButton.setEnabled(available)
    ui.joinButton.setToolTip("Join the federated run on the server" if available else reason)


def show_progress(ui, bar_name: str, text: str, fraction: float) -> None:
    bar = getattr(ui, bar_name)
    bar.setValue(round(max(0.0, min(1.0, fraction)) * _get(bar, "maximum")))
    bar.setFormat(f"{text} %p%" if text else "%p%")
