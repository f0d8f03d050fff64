"""Which dataset a folder holds, told by the readers' own layout checks, for a reader's "no
layout found" error: a DATA= or --data-root meant for another TASK (a ShapeNet part folder given
to S3DIS) is named with the flag that reads it. The checks look at names only (a few listings,
no file read), so the error stays instant on a folder of 50,000 files.
"""
from pathlib import Path

from lib.data import SYNTHETIC_DIR

READABLE = {"shapenet_part": "ShapeNet part", "modelnet40": "ModelNet40", "s3dis": "S3DIS"}
# The run scripts' TASKs (run/recipes.sh) that read each dataset; tests/test_run_scripts.py
# checks this against the recipes.
RUN_TASKS = {"shapenet_part": ("partseg",), "modelnet40": ("modelnet40_pt", "modelnet40_pct"),
             "s3dis": ("s3dis",)}
# The synthetic data of each, written in its layouts under data/synthetic/ (lib/data/synthetic.py)
SYNTHETIC = {"shapenet_part": "synthetic_parts", "modelnet40": "synthetic_cls",
             "s3dis": "synthetic_rooms"}
# The order the checks are asked in (each takes only its own layouts; ShapeNet part's h5 check
# leaves ModelNet40's and PointNet's S3DIS h5 files alone: shapenet_part_h5.bare_h5_files)
CHECK_ORDER = ("modelnet40", "s3dis", "shapenet_part")


def layout_held(dataset, folder):
    """The release name of `dataset`'s layout in `folder` (e.g. modelnet40_normal_resampled),
    or None: the reader's own check, as its detect_layout / find_source asks it."""
    if dataset == "modelnet40":
        from lib.data.modelnet40 import LAYOUTS, find_layout
        layout = find_layout(folder)
        described = layout and LAYOUTS[layout]
    elif dataset == "s3dis":
        from lib.data.s3dis_forms import find_form
        form = find_form(str(folder))
        described = form and form[0].layout
    else:
        from lib.data.shapenet_part import LAYOUTS, find_layout
        found = find_layout(folder)
        described = found and LAYOUTS[found[0]]
    # the descriptions read "<release name> (<files>)"; the name is enough in a hint
    return described.split(" (")[0] if described else None


def dataset_held(folder, besides):
    """(dataset, its layout's release name) for the first dataset other than `besides` whose
    layout `folder` holds, or None."""
    for dataset in CHECK_ORDER:
        try:
            layout = dataset != besides and layout_held(dataset, folder)
        except OSError:  # a folder we may not list holds nothing we could read either
            return None
        if layout:
            return dataset, layout
    return None


def named(dataset, layout, folder):
    """(what `folder` holds in words, the --dataset that reads it, the run scripts' TASKs that
    do): for a folder under data/synthetic/, the synthetic dataset's name and no TASK."""
    if Path(folder).resolve().is_relative_to(Path(SYNTHETIC_DIR).resolve()):
        return f"the synthetic {READABLE[dataset]} ({layout})", SYNTHETIC[dataset], ()
    return f"{READABLE[dataset]} ({layout})", dataset, RUN_TASKS[dataset]


def other_dataset_hint(root, besides):
    """'' or, for the error of the reader of `besides` that found none of its layouts in
    `root`, a clause naming the other dataset that `root` (or else its first subfolder that
    holds one) holds and the flags that read it."""
    root = Path(root)
    if not root.is_dir():
        return ""
    held = dataset_held(root, besides)
    if held:
        what, name, tasks = named(*held, root)
        runs = f" / TASK={' or '.join(tasks)}" if tasks else ""
        return f"; it looks like {what}: --dataset {name}{runs} reads it"
    for folder in sorted(root.iterdir()):
        held = folder.is_dir() and not folder.name.startswith(".") and dataset_held(folder, besides)
        if held:
            what, name, tasks = named(*held, folder)
            runs = f" (DATA= with TASK={' or '.join(tasks)})" if tasks else ""
            return (f"; its subfolder {folder.name}/ looks like {what}: give --data-root "
                    f"{folder} with --dataset {name}{runs}")
    return ""
