"""Plain-text result tables: Markdown pipe tables, so a printed result pastes into the README.

Metrics arrive as fractions (see lib/metrics.py) and are printed as percent with 2 decimals;
a missing value (None, e.g. a category with no shapes in the split) is printed as "-".
"""


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(header, rows):
    """Columns padded to a common width so the text also reads well unrendered."""
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


# Columns per breakdown table: ShapeNet part's 16 categories and S3DIS's 13 classes fit one
# table, as the papers print them; ModelNet40's 40 classes (a 400-character row) take three.
COLUMNS_PER_TABLE = 16


def _summary_and_breakdown(summary, breakdown):
    """A one-row summary table, then one column per category / class, COLUMNS_PER_TABLE at most
    to a table."""
    names = list(breakdown)
    tables = [markdown_table(list(summary), [[percent(v) for v in summary.values()]])]
    for start in range(0, max(len(names), 1), COLUMNS_PER_TABLE):
        part = names[start:start + COLUMNS_PER_TABLE]
        tables.append(markdown_table(part, [[percent(breakdown[n]) for n in part]]))
    return "\n\n".join(tables)


def format_results(task, results):
    """The tables for one evaluation; `results` is a metric's `compute()` output."""
    if task == "partseg":
        return _summary_and_breakdown({"Accuracy": results["accuracy"],
                                       "cat. mIoU": results["cat_miou"],
                                       "ins. mIoU": results["ins_miou"]},
                                      results["per_category"])
    if task == "semseg":
        return _summary_and_breakdown({"OA": results["oa"], "mAcc": results["macc"],
                                       "mIoU": results["miou"]},
                                      results["per_class"])
    if task == "cls":
        return _summary_and_breakdown({"OA": results["oa"], "mAcc": results["macc"]},
                                      results["per_class"])
    raise ValueError(f"report: unknown task {task!r}; expected partseg, semseg or cls")


# The summary figures of each task: (column header, results key), in table order.
SUMMARY_COLUMNS = {
    "partseg": (("Accuracy", "accuracy"), ("cat. mIoU", "cat_miou"), ("ins. mIoU", "ins_miou")),
    "semseg": (("OA", "oa"), ("mAcc", "macc"), ("mIoU", "miou")),
    "cls": (("OA", "oa"), ("mAcc", "macc")),
}


def task_of(results):
    """The task whose figures `results` (an evaluation, or a table row) holds."""
    if "ins_miou" in results:
        return "partseg"
    return "semseg" if "miou" in results else "cls"


def format_quant_table(rows):
    """One row per model: name, the task's summary figures (fractions; SUMMARY_COLUMNS),
    budget_ratio (HAQ's weight budget as a fraction of fp32) and honest_kib (honest size in
    KiB); None -> "-". Every row must be of the same task."""
    tasks = {task_of(row) for row in rows}
    if len(tasks) != 1:
        raise ValueError(f"report: one table holds one task; these rows are {sorted(tasks)}")
    columns = SUMMARY_COLUMNS[tasks.pop()]
    header = ["Model", *(title for title, _ in columns), "Budget (% fp32)", "Honest size (KiB)"]
    body = [[row["name"], *(percent(row[key]) for _, key in columns),
             percent(row["budget_ratio"]),
             "-" if row["honest_kib"] is None else f"{row['honest_kib']:.1f}"]
            for row in rows]
    return markdown_table(header, body)


def format_baseline_table(rows, metric_name, metric_fp32):
    """search.py's comparison: the searched policy beside uniform policies within its budget.
    rows: name, method, metric (fraction), budget_ratio, honest_bytes; best metric first."""
    header = ["Policy", "Method", f"{metric_name} (%)", f"vs fp32 {percent(metric_fp32)}",
              "Budget (% fp32)", "Honest size (KiB)"]
    ordered = sorted(rows, key=lambda row: -row["metric"])
    body = [[row["name"], row["method"], percent(row["metric"]),
             f"{100 * (row['metric'] - metric_fp32):+.2f}", percent(row["budget_ratio"]),
             f"{row['honest_bytes'] / 1024:.1f}"] for row in ordered]
    return markdown_table(header, body)


def format_size(results):
    """One line: honest size, its fraction of fp32, and HAQ's weight-bit budget ratio."""
    honest, fp32 = results["honest_bytes"], results["fp32_bytes"]
    return (f"size: {honest / 1024:.1f} KiB honest, {honest / fp32:.4f} of fp32 "
            f"({fp32 / 1024:.1f} KiB); HAQ budget ratio {results['budget_ratio']:.4f}")
