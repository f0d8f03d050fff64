"""Flags every top-level script shares, so they are spelled the same everywhere."""
import argparse


def common_parser():
    """Parent parser: pass as `parents=[common_parser()]` to a script's ArgumentParser."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="synthetic_parts",
                   choices=["shapenet_part", "s3dis", "modelnet40",
                            "synthetic_parts", "synthetic_cls", "synthetic_rooms"])
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: data/<usual folder name>; synthetic data is "
                        "generated there on first use)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="S3DIS: random training crops per epoch (default: about one look at "
                        "every 4 cm cell); sets the number of steps with --epochs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="run folder (checkpoints, logs)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default: on CUDA only; --amp: on the CPU too (faster "
                        "where the CPU has native bf16: AVX512-BF16, AMX); --no-amp: never")
    return p


def resolve_device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def run_script(main, parser):
    """A top-level script's entry point: main(parsed flags), with a missing file or a bad value
    reported as one line (`error: ...`, exit status 1) instead of a stack trace."""
    try:
        main(parser.parse_args())
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
