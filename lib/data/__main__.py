"""python -m lib.data --dataset NAME [--data-root DIR]: which form of the dataset the folder
holds and what its splits hold, to check a download (or the synthetic data) before training on
it (data/README.md lists the forms and where to get them). Exits with status 1 when no split
can be read or one stops at a problem (a bad file, too few samples, a file that the folder's
lists or layout call for missing beside the others); a split with no file present is not an
error."""
import argparse

from lib.data import DATASET_NAMES, SPLITS, IncompleteDataset, build_dataset, default_root


def main(args):
    root = args.data_root or default_root(args.dataset)
    data, damaged = None, []
    for split in SPLITS:
        try:
            data = build_dataset(args.dataset, root, split, num_points=args.num_points)
        except (FileNotFoundError, ValueError) as err:
            print(f"{split}: {err}")
            # present, but it cannot be read, or part of it is missing
            if isinstance(err, IncompleteDataset) or not isinstance(err, FileNotFoundError):
                damaged.append(split)
            continue
        sample = data[0]
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sample.items())
        print(f"{split}: {len(data)} samples; first: {shapes}")
    if data is None:
        raise SystemExit(f"{root}: no split could be read")
    print(f"root {root}: task {data.task}, {data.num_classes} classes, "
          f"in_channels {data.in_channels}")
    if data.task == "partseg":
        for name, (start, stop) in zip(data.category_names, data.part_ranges):
            parts = ", ".join(data.class_names[start:stop])
            print(f"  {name}: parts {start}..{stop - 1} ({parts})")
    else:
        print(f"  classes: {', '.join(data.class_names)}")
    if damaged:  # a failing status, so that a scripted check stops here
        raise SystemExit(f"{root}: the {', '.join(damaged)} split stopped at a problem (above)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--num-points", type=int, default=None)
    main(parser.parse_args())
