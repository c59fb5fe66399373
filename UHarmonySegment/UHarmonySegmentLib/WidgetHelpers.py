"""Filling the module's widgets from `Presentation` results.

The Qt classes come in through a namespace argument (`qt`): PythonQt's ``qt`` module inside Slicer,
or PySide6's classes in the plain-Qt UI tests, which therefore run this very code. Nothing here
imports Qt or Slicer.
"""

from __future__ import annotations

from typing import Any, Sequence

from .Presentation import Choice, ResultSummary

EXTRA_INPUTS = 3  # inputSelector1..3 in the .ui, shown for multi-contrast models


def _get(widget, name: str):
    """A Qt property: an attribute in PythonQt, a getter method in PySide6."""
    value = getattr(widget, name)
    return value() if callable(value) else value


def _alignment(qt, *flags) -> Any:
    value = flags[0]
    for flag in flags[1:]:
        value = value | flag
    return value


def fill_choices(qt, combo, choices: Sequence[Choice], current_value: str | None = None) -> None:
    """Replace a combo box's items with `choices`; keep `current_value` selected when possible."""
    combo.blockSignals(True)
    try:
        combo.clear()
        for index, choice in enumerate(choices):
            combo.addItem(choice.label, choice.value)
            if choice.tooltip:
                combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
            if not choice.enabled:
                model = combo.model()
                item = model.item(index) if hasattr(model, "item") else None
                if item is not None:
                    item.setEnabled(False)
        enabled = [i for i, choice in enumerate(choices) if choice.enabled]
        wanted = next((i for i in enabled if choices[i].value == current_value), enabled[0] if enabled else None)
        combo.setCurrentIndex(-1 if wanted is None else wanted)
    finally:
        combo.blockSignals(False)


def combo_value(combo) -> str | None:
    index = _get(combo, "currentIndex")
    if index is None or index < 0:
        return None
    data = combo.itemData(index)
    return None if data is None else str(data)


def show_channel_inputs(ui, channel_names: Sequence[str]) -> None:
    """One input selector per model channel; labels named after the channels."""
    names = list(channel_names) or ["image"]
    ui.inputLabel0.setText(f"{names[0]}:" if len(names) > 1 else "Input volume:")
    for i in range(1, EXTRA_INPUTS + 1):
        visible = i < len(names)
        getattr(ui, f"inputSelector{i}").setVisible(visible)
        label = getattr(ui, f"inputLabel{i}")
        label.setVisible(visible)
        if visible:
            label.setText(f"{names[i]}:")


def set_running(ui, running: bool) -> None:
    ui.segmentButton.setText("Cancel" if running else "Segment")
    ui.segmentButton.setToolTip("Stop the segmentation (its temporary files are deleted)" if running
                                else "Segment the input volume")
    for name in ("inputSelector", "inputSelector1", "inputSelector2", "inputSelector3", "modelSelector",
                 "addModelButton", "deviceSelector", "domainSelector", "replaceCheckBox"):
        getattr(ui, name).setEnabled(not running)


def show_progress(ui, stage: str, fraction: float) -> None:
    ui.progressBar.setValue(int(round(max(0.0, min(1.0, fraction)) * _get(ui.progressBar, "maximum"))))
    ui.progressBar.setFormat(f"{stage} %p%" if stage else "%p%")


def fit_table_height(table, minimum_rows: int = 3) -> None:
    """Make the table exactly as tall as its rows (no empty band below a short list)."""
    rows = max(_get(table, "rowCount"), minimum_rows)
    row_height = table.rowHeight(0) if _get(table, "rowCount") else _get(table.verticalHeader(), "defaultSectionSize")
    height = _get(table.horizontalHeader(), "height") + rows * row_height + 2 * _get(table, "frameWidth") + 4
    table.setMinimumHeight(height)
    table.setMaximumHeight(height)


def clear_result(ui) -> None:
    ui.unfamiliarWarningLabel.setVisible(False)
    for name in ("domainLabel", "probabilitiesLabel", "modelInfoLabel", "cleanupLabel"):
        getattr(ui, name).setText("-")
    ui.segmentsTable.setRowCount(0)
    fit_table_height(ui.segmentsTable)


def show_model_card(ui, intended_use: str, limitations: Sequence[str]) -> None:
    ui.intendedUseLabel.setText(f"<b>Intended use:</b> {_html(intended_use)}" if intended_use else "Intended use: not stated")
    if limitations:
        items = "".join(f"<li>{_html(x)}</li>" for x in limitations)
        ui.limitationsLabel.setText(f"<b>Limitations:</b><ul style='margin-left:-20px'>{items}</ul>")
    else:
        ui.limitationsLabel.setText("Limitations: not stated")


def show_result(qt, ui, summary: ResultSummary) -> None:
    ui.domainLabel.setText(summary.domain_text or "-")
    ui.probabilitiesLabel.setText(summary.probabilities_text or "-")
    ui.modelInfoLabel.setText(" on ".join(x for x in (summary.model_text, summary.device_text) if x) or "-")
    ui.cleanupLabel.setText(summary.cleanup_text or "none")
    ui.unfamiliarWarningLabel.setText(summary.warning_text)
    ui.unfamiliarWarningLabel.setVisible(summary.warned)
    table = ui.segmentsTable
    table.setRowCount(len(summary.rows))
    for row, entry in enumerate(summary.rows):
        name_item = qt.QTableWidgetItem(entry.name)
        if entry.color is not None:
            pixmap = qt.QPixmap(14, 14)
            pixmap.fill(qt.QColor.fromRgbF(*entry.color))
            name_item.setIcon(qt.QIcon(pixmap))
        if entry.voxels is not None:
            name_item.setToolTip(f"label value {entry.value}, {entry.voxels} voxels")
        volume_item = qt.QTableWidgetItem(entry.volume_text)
        volume_item.setTextAlignment(_alignment(qt, qt.Qt.AlignRight, qt.Qt.AlignVCenter))
        table.setItem(row, 0, name_item)
        table.setItem(row, 1, volume_item)
    header = table.horizontalHeader()
    header.setSectionResizeMode(0, qt.QHeaderView.Stretch)
    header.setSectionResizeMode(1, qt.QHeaderView.ResizeToContents)
    fit_table_height(table)
    if summary.intended_use or summary.limitations:
        show_model_card(ui, summary.intended_use, summary.limitations)


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
