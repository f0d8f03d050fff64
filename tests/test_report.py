"""Result tables: Markdown pipe tables with fractions printed as percent, 2 decimals."""
import json

import pytest

from lib.report import format_quant_table, format_results


def rows_of(table):
    """Markdown table -> list of rows of stripped cells (rule lines checked and dropped)."""
    lines = table.strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set("".join(cells[1])) == {"-"}  # header rule
    assert len({len(row) for row in cells}) == 1  # every row has the header's column count
    return [cells[0]] + cells[2:]


def tables_of(text):
    return [rows_of(block) for block in text.split("\n\n")]


def test_partseg_summary_and_per_category_tables():
    results = {"accuracy": 0.93124, "cat_miou": 0.837, "ins_miou": 0.86605,
               "per_category": {"Airplane": 0.8, "Bag": None, "Cap": 0.123449}, "num_shapes": 3}
    summary, categories = tables_of(format_results("partseg", results))
    assert summary == [["Accuracy", "cat. mIoU", "ins. mIoU"], ["93.12", "83.70", "86.61"]]
    assert categories == [["Airplane", "Bag", "Cap"], ["80.00", "-", "12.34"]]


def test_semseg_summary_and_per_class_tables():
    results = {"oa": 2 / 3, "macc": 13 / 18, "miou": 0.5,
               "per_class": {"ceiling": 2 / 3, "floor": 1 / 3, "clutter": None},
               "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 0]]}
    summary, classes = tables_of(format_results("semseg", results))
    assert summary == [["OA", "mAcc", "mIoU"], ["66.67", "72.22", "50.00"]]
    assert classes == [["ceiling", "floor", "clutter"], ["66.67", "33.33", "-"]]


def test_cls_summary_and_per_class_tables():
    results = {"oa": 0.8, "macc": 0.5, "per_class": {"chair": 1.0, "lamp": 0.0, "mug": None}}
    summary, classes = tables_of(format_results("cls", results))
    assert summary == [["OA", "mAcc"], ["80.00", "50.00"]]
    assert classes == [["chair", "lamp", "mug"], ["100.00", "0.00", "-"]]


def test_forty_classes_print_as_tables_of_at_most_sixteen_columns():
    """ModelNet40's per-class row was one table 40 columns wide (about 400 characters)."""
    per_class = {f"class{i}": i / 40 for i in range(40)}
    summary, *parts = tables_of(format_results("cls", {"oa": 0.5, "macc": 0.5,
                                                       "per_class": per_class}))
    assert [len(part[0]) for part in parts] == [16, 16, 8]
    assert [name for part in parts for name in part[0]] == list(per_class)
    assert [value for part in parts for value in part[1]] == [
        f"{100 * i / 40:.2f}" for i in range(40)]


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        format_results("detection", {})


def test_quant_table():
    rows = [{"name": "fp32", "accuracy": 0.9312, "cat_miou": 0.8, "ins_miou": 0.85,
             "budget_ratio": 1.0, "honest_kib": 3712.04},
            {"name": "haq-4bit", "accuracy": 0.92, "cat_miou": None, "ins_miou": 0.84999,
             "budget_ratio": 0.125, "honest_kib": None}]
    (table,) = tables_of(format_quant_table(rows))
    assert table[0][:4] == ["Model", "Accuracy", "cat. mIoU", "ins. mIoU"]
    assert table[1] == ["fp32", "93.12", "80.00", "85.00", "100.00", "3712.0"]
    assert table[2] == ["haq-4bit", "92.00", "-", "85.00", "12.50", "-"]


def test_baseline_table_orders_by_metric_and_shows_gap_to_fp32():
    from lib.report import format_baseline_table
    rows = [{"name": "uniform 3-bit", "method": "kmeans", "metric": 0.70, "budget_ratio": 0.094,
             "honest_bytes": 2048},
            {"name": "searched (HAQ)", "method": "kmeans", "metric": 0.75, "budget_ratio": 0.1,
             "honest_bytes": 3072}]
    lines = format_baseline_table(rows, "ins_miou", 0.8).splitlines()
    assert "searched (HAQ)" in lines[2] and "uniform 3-bit" in lines[3]
    assert "-5.00" in lines[2] and "-10.00" in lines[3]
    assert "3.0" in lines[2] and "9.40" in lines[3]


def test_quant_table_of_each_task_shows_its_own_figures():
    semseg = [{"name": "fp32", "oa": 0.9, "macc": 0.8, "miou": 0.7, "budget_ratio": 1.0,
               "honest_kib": 10.0}]
    cls = [{"name": "mix", "oa": 0.93, "macc": 0.905, "budget_ratio": 0.1, "honest_kib": 1.25}]
    (table,) = tables_of(format_quant_table(semseg))
    assert table == [["Model", "OA", "mAcc", "mIoU", "Budget (% fp32)", "Honest size (KiB)"],
                     ["fp32", "90.00", "80.00", "70.00", "100.00", "10.0"]]
    (table,) = tables_of(format_quant_table(cls))
    assert table == [["Model", "OA", "mAcc", "Budget (% fp32)", "Honest size (KiB)"],
                     ["mix", "93.00", "90.50", "10.00", "1.2"]]
    with pytest.raises(ValueError, match="one task"):
        format_quant_table(semseg + cls)


def test_results_table_rows_from_eval_json_of_every_task(tmp_path):
    from lib.results_table import read_rows, write_table
    figures = {"oa": 0.5, "macc": 0.25, "miou": 0.125, "per_class": {}, "confusion": [],
               "honest_bytes": 2048, "fp32_bytes": 8192, "budget_ratio": 0.25}
    (tmp_path / "a.json").write_text(json.dumps(figures))
    table = write_table(read_rows([f"S3DIS, mix={tmp_path / 'a.json'}"]), str(tmp_path / "t"))
    (shown,) = tables_of(table)
    assert shown[1] == ["S3DIS, mix", "50.00", "25.00", "12.50", "25.00", "2.0"]
    (row,) = json.loads((tmp_path / "t.json").read_text())
    assert row == {"name": "S3DIS, mix", "oa": 0.5, "macc": 0.25, "miou": 0.125,
                   "budget_ratio": 0.25, "honest_kib": 2.0}
