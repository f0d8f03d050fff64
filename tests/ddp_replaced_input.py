"""Run search.py or finetune.py under torchrun while their input files are replaced between the
ranks' reads: at each rank's first read of a file given by --replace FILE NEXT, rank 0 reads
FILE as it is, then NEXT is put in its place (as a stage that still runs writes its next
best.pt, or a search its policy.json) and rank 1 reads it. Each rank's model at the point it is
used (search: the fp32 model the rewards quantize; finetune: the --distill teacher and the
student before DDP wraps it) is hashed, and rank 0 writes the hashes to --digests as {where:
[one per rank]}. Used by test_distributed.py.

    torchrun ... tests/ddp_replaced_input.py --digests D.json --replace F NEXT -- search ARGS..."""
import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lib.checkpoint  # noqa: E402
import lib.policy_file  # noqa: E402
from lib import distributed  # noqa: E402
from lib.cli import run_script  # noqa: E402


def replaced_at_first_read(read, replacements):
    """read(path, ...) that puts replacements[path] in place between rank 0's first read of
    path and rank 1's."""
    first = set(replacements)

    def read_while_replaced(path, *args, **kwargs):
        path_key = os.path.abspath(path)
        if path_key not in first:
            return read(path, *args, **kwargs)
        first.discard(path_key)
        if distributed.rank() == 0:
            result = read(path, *args, **kwargs)
            distributed.barrier()
            return result
        distributed.barrier()
        os.replace(replacements[path_key], path_key)
        return read(path, *args, **kwargs)
    return read_while_replaced


def hashed_at(where, digests, out):
    """A wrapper of a callable whose first argument is a model: every rank's hash of that model
    is gathered into digests[where], and rank 0 writes them all to `out`."""
    def wrap(make):
        def made(model, *args, **kwargs):
            digest = lib.checkpoint.tensors_sha256(model.state_dict().items())
            digests[where] = distributed.gather_objects(digest)
            if distributed.is_main():
                with open(out, "w") as f:
                    json.dump(digests, f)
            return make(model, *args, **kwargs)
        return made
    return wrap


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--digests", required=True)
    p.add_argument("--replace", nargs=2, action="append", default=[], metavar=("FILE", "NEXT"))
    p.add_argument("script", choices=["search", "finetune"])
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args()
    replacements = {os.path.abspath(f): os.path.abspath(n) for f, n in args.replace}
    # the readers under every way of loading a checkpoint or a policy file
    lib.checkpoint.torch_load = replaced_at_first_read(lib.checkpoint.torch_load, replacements)
    lib.policy_file.read_text_file = replaced_at_first_read(lib.policy_file.read_text_file,
                                                            replacements)
    module = importlib.import_module(args.script)
    digests = {}
    probes = {"search": [(module, "PolicyEvaluator", "rewarded")],
              "finetune": [(module, "DistillLoss", "teacher"),
                           (distributed, "wrap_model", "student")]}[args.script]
    for owner, name, where in probes:
        setattr(owner, name, hashed_at(where, digests, args.digests)(getattr(owner, name)))
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    run_script(module.main, module.get_args_parser(), args.script, argv)


if __name__ == "__main__":
    main()
