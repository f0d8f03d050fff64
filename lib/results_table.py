"""Collect eval.py --json outputs into the quantization results table (markdown + JSON):

    python -m lib.results_table --out checkpoints/demo/results "fp32=a.json" "0.1x preserve=b.json"
"""
import argparse
import json

from lib.report import format_quant_table

COLUMNS = ("accuracy", "cat_miou", "ins_miou")


def table_row(name, results):
    """One row: the part-segmentation summary, the HAQ budget ratio and the honest size."""
    row = {"name": name}
    row.update({key: results.get(key) for key in COLUMNS})
    row["budget_ratio"] = results["budget_ratio"]
    row["honest_kib"] = results["honest_bytes"] / 1024
    return row


def main(args):
    rows = []
    for spec in args.rows:
        name, sep, path = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"row {spec!r}: write it as NAME=results.json")
        with open(path) as f:
            rows.append(table_row(name, json.load(f)))
    table = format_quant_table(rows)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    print(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path without extension; writes .md and .json")
    p.add_argument("rows", nargs="+", help="NAME=eval.json, in table order")
    main(p.parse_args())
